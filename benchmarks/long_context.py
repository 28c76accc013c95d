"""Long-context benchmark at the real Qwen2.5-0.5B shape (random weights, int4, no download).

Steps:

1. build (once) a random-weight bf16 checkpoint with the Qwen2.5-0.5B shape (32768 positions) and
   the Qwen tokenizer, via ``qwen_export.export.tiny``;
2. export it (once per artifact) with ``--weights int4 --algorithm rtn --asymmetric`` (RTN: the
   weights are random, so GPTQ's calibration would only cost time) for each engine, at the model's
   own context (the default ``--max-length``: 32768) and, for the memory comparison, at
   ``--max-length 4096``;
3. for every prompt length and engine, one fresh process (``--child``, through the harness's
   launcher: its own peak RSS) loads the artifact, prefills a random prompt of that length (in
   ``--prefill-chunk`` pieces), decodes ``--new-tokens`` greedy tokens at that depth and reports
   the prefill time (TTFT), decode tokens/s, the KV bytes the engine holds after the run (ONNX
   Runtime: its shared buffers, grown in steps; OpenVINO paged: its block cache) and the peak RSS;
4. the anchors, on their own exports of the same checkpoint, each prompt length in a fresh process
   too (``sessions.py``'s sessions, whole greedy generations of ``--new-tokens`` tokens):
   ``ort-genai``: onnxruntime-genai's model builder (``-p int4 -e cpu``, its defaults: the context
   is the checkpoint's 32768) run by its ``og.Generator``; ``ov-genai``: optimum-intel's int4 IR
   (``--optimum-ir DIR``, made in its own venv: see benchmarks/README.md) run by openvino-genai's
   ``LLMPipeline``. Without the IR (or onnxruntime-genai) the row says why, never silently absent;
5. every run is killed when its process tree's RSS passes ``--rss-cap-gib`` (default 20 of the
   machine's 24 GB) or it runs past ``--timeout-s``: that row says where the engine stopped;
6. a table, and JSON to ``--json-out``.

Targets (issue 23): peak RSS at a 1K prompt on the 32K artifact within 10% of the 4K artifact's;
decode tokens/s at 16K depth at least the anchors'.

    .venv/bin/python benchmarks/long_context.py [--workdir DIR] [--prompts 1024,4096,16384,32000]
        [--engines onnxruntime,openvino,ort-genai,ov-genai] [--optimum-ir DIR] [--new-tokens 32]
        [--prefill-chunk 2048] [--threads 2] [--rss-cap-gib 20] [--timeout-s 3600] [--json-out F]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness
from artifacts import checkpoint_ready, genai_builder_cmd
from compare import OPTIMUM_VENV
from harness import ORDINARY_TOKENS, MiB, log

RSS_TARGET = 1.10  # 32K artifact's peak RSS at a 1K prompt / the 4K artifact's
SHORT_CONTEXT = 4096
DECODE_DEPTH = 16384  # decode at this depth: ours >= every anchor's (issue 23)
OURS = ("onnxruntime", "openvino")
ANCHORS = {"ort-genai": "og", "ov-genai": "ov-genai"}  # engine -> sessions.py kind
WARMUP_PROMPT = 32


# ----------------------------------------------------------------------------- child: one run
def child(artifact: Path, prompt_len: int, args: argparse.Namespace) -> dict[str, Any]:
    """Load, warm up, prefill, decode; what it cost (this process's own peak RSS included)."""
    import resource

    import numpy as np

    rng = np.random.default_rng(0)
    prompt = rng.integers(0, ORDINARY_TOKENS, prompt_len, dtype=np.int64).tolist()
    warm = rng.integers(0, ORDINARY_TOKENS, WARMUP_PROMPT, dtype=np.int64).tolist()
    t0 = time.perf_counter()
    if args.engine in OURS:
        run = ours_runner(artifact, args)
    else:
        import sessions

        run = sessions.open_session(ANCHORS[args.engine], str(artifact), args.threads).generate
    load_s = time.perf_counter() - t0
    run(warm, 2)
    out = run(prompt, args.new_tokens)
    kv = out.pop("kv_bytes", None)
    row = {
        "engine": args.engine,
        "prompt": prompt_len,
        "load_s": round(load_s, 3),
        "prefill_s": round(out["ttft_s"], 3),
        "prefill_tokens_per_s": round(prompt_len / out["ttft_s"], 1),
        "decode_tokens_per_s": round(1.0 / out["tpot_s"], 2) if out.get("tpot_s") else None,
        "kv_bytes": kv,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if args.engine in OURS:
        row["kv_bytes_per_token"] = artifact_kv_per_token(artifact)
    return row


def ours_runner(artifact: Path, args: argparse.Namespace) -> Callable[[list[int], int], dict[str, Any]]:
    """Our engine with the runtime's defaults (``--threads``, ``--prefill-chunk``): a function that
    runs one greedy generation and times it as ``sessions.py`` does (TTFT = prefill + argmax, time
    per output token = median step), plus the KV bytes the engine holds at its end."""
    import statistics

    import numpy as np

    from qwen_export.runtime.loader import RuntimeOptions, open_artifact
    from qwen_export.spec import Target

    options = RuntimeOptions(threads=args.threads, engine=Target.parse(args.engine), prefill_chunk=args.prefill_chunk)
    engine = open_artifact(artifact, options).engine

    def run(prompt: list[int], new_tokens: int) -> dict[str, Any]:
        engine.reset()
        t0 = time.perf_counter()
        token = int(np.argmax(engine.forward(np.asarray([prompt], np.int64))[0, -1]))
        ttft, steps = time.perf_counter() - t0, []
        for _ in range(new_tokens - 1):
            t0 = time.perf_counter()
            token = int(np.argmax(engine.forward(np.array([[token]], np.int64))[0, -1]))
            steps.append(time.perf_counter() - t0)
        kv = int(getattr(engine, "kv_bytes", 0))
        return {"ttft_s": ttft, "tpot_s": statistics.median(steps) if steps else None, "kv_bytes": kv}

    return run


def artifact_kv_per_token(artifact: Path) -> int:
    manifest = json.loads((artifact / "manifest.json").read_text(encoding="utf-8"))
    return int(manifest["extra"]["kv_cache"]["bytes_per_token"])


# ----------------------------------------------------------------------------- parent
def build(ckpt: Path) -> None:
    if checkpoint_ready(ckpt):
        return
    from qwen_export.export.tiny import QWEN25_05B_SHAPE, make_checkpoint

    log(f"building the 0.5B-shape checkpoint in {ckpt}")
    make_checkpoint(ckpt, seed=0, **QWEN25_05B_SHAPE)


def export(ckpt: Path, out: Path, workdir: Path, target: str, max_length: int | None) -> None:
    if (out / "manifest.json").is_file():
        return
    cmd = [harness.cli_path(), "export", str(ckpt), "-o", str(out), "--overwrite", "--target", target]
    cmd += ["--weights", "int4", "--algorithm", "rtn"] + (["--asymmetric"] if target != "tensorrt" else [])
    if max_length is not None:
        cmd += ["--max-length", str(max_length)]
    result = harness.run_logged(f"export-{out.name}", cmd, workdir)
    if result["returncode"] != 0:
        sys.exit(f"export of {out.name} failed")


def export_genai(ckpt: Path, workdir: Path) -> tuple[Path | None, str]:
    """onnxruntime-genai's builder output for ``ckpt`` (int4, CPU, its defaults), built once; or why not."""
    out = workdir / "ort-genai-int4"
    if (out / "genai_config.json").is_file():
        return out, ""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError as exc:
        return None, f"{exc}: pip install onnxruntime-genai==0.18.0 (the dev extra has it)"
    cmd = genai_builder_cmd(ckpt, out, "int4", workdir / "genai-cache")
    result = harness.run_logged("export-ort-genai-int4", cmd, workdir)
    if result["returncode"] != 0 or not (out / "genai_config.json").is_file():
        return None, f"the builder failed: {result['stderr_tail'][-300:]}"
    return out, ""


def optimum_ir(ckpt: Path, ir: Path | None) -> tuple[Path | None, str]:
    """optimum-intel's IR (``--optimum-ir``) when it is there and of this checkpoint; or why not."""
    how = (
        f"make it with `{OPTIMUM_VENV}/bin/optimum-cli export openvino --model {ckpt} --task "
        "text-generation-with-past --weight-format int4 DIR` (optimum-intel's own venv, see "
        "benchmarks/README.md) and pass --optimum-ir DIR"
    )
    if ir is None or not (ir / "openvino_model.xml").is_file():
        return None, f"no optimum-intel IR ({ir or 'no --optimum-ir'}); {how}"
    theirs = json.loads((ir / "config.json").read_text(encoding="utf-8"))
    ours = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings")
    if any(theirs.get(k) != ours.get(k) for k in keys):
        return None, f"{ir} is not an export of {ckpt} (config differs); {how}"
    return ir, ""


def measure(artifact: Path, workdir: Path, engine: str, prompt: int, args: argparse.Namespace) -> dict[str, Any]:
    name = f"run-{artifact.name}-{prompt}"
    cmd = [sys.executable, __file__, "--child", str(artifact), "--engine", engine, "--prompt", str(prompt)]
    cmd += ["--new-tokens", str(args.new_tokens), "--prefill-chunk", str(args.prefill_chunk)]
    cmd += ["--threads", str(args.threads)]
    cap = int(args.rss_cap_gib * 2**30)
    result = harness.run_logged(name, cmd, workdir, rss_cap_bytes=cap, timeout_s=args.timeout_s, poll_interval=0.5)
    where = {"engine": engine, "prompt": prompt, "artifact": artifact.name}
    if result["returncode"] != 0:
        why = result.get("stopped") or result["stderr_tail"][-500:]
        return where | {"error": why, "wall_s": round(result["wall_s"], 1)}
    out = json.loads(result["stdout_tail"].splitlines()[-1])
    return out | where | {"launcher_peak_rss_bytes": result["peak_rss_bytes"]}


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'engine':<12} {'artifact':<22} {'prompt':>6} {'TTFT s':>8} {'prefill t/s':>11} {'decode t/s':>10}"
    head += f" {'KV MiB':>8} {'peak RSS MiB':>12}"
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['engine']:<12} {r['artifact']:<22} {r['prompt']:>6} stopped: {r['error'][-120:]}")
            continue
        kv = f"{r['kv_bytes'] / MiB:>8.1f}" if r.get("kv_bytes") is not None else f"{'-':>8}"
        lines.append(
            f"{r['engine']:<12} {r['artifact']:<22} {r['prompt']:>6} {r['prefill_s']:>8.2f} "
            f"{r['prefill_tokens_per_s']:>11.1f} {r['decode_tokens_per_s'] or 0:>10.2f} {kv} "
            f"{r['peak_rss_bytes'] / MiB:>12.0f}"
        )
    return "\n".join(lines)


def rss_check(rows: list[dict[str, Any]], engine: str, shortest: int) -> str | None:
    """The target: the 32K artifact's peak RSS at the shortest prompt vs the 4K artifact's."""
    at = {r["artifact"].rsplit("-", 1)[-1]: r for r in rows if r["engine"] == engine and r["prompt"] == shortest}
    full, short = at.get("32k"), at.get("4k")
    if not full or not short or "error" in full or "error" in short:
        return None
    ratio = full["peak_rss_bytes"] / short["peak_rss_bytes"]
    verdict = "meets" if ratio <= RSS_TARGET else "MISSES"
    what = f"{engine}: peak RSS at a {shortest}-token prompt, 32K artifact / 4K artifact"
    return f"{what} = {ratio:.3f} ({verdict} <= {RSS_TARGET})"


def decode_check(rows: list[dict[str, Any]], depth: int) -> str | None:
    """The target: our best decode tokens/s at ``depth`` vs the best anchor's (which ran there)."""
    at = [r for r in rows if r["prompt"] == depth and r.get("artifact", "").endswith(("32k", "int4"))]
    ours = [r for r in at if r["engine"] in OURS and r.get("decode_tokens_per_s")]
    theirs = [r for r in at if r["engine"] in ANCHORS and r.get("decode_tokens_per_s")]
    if not ours or not theirs:
        return None
    best = max(ours, key=lambda r: r["decode_tokens_per_s"])
    anchor = max(theirs, key=lambda r: r["decode_tokens_per_s"])
    ratio = best["decode_tokens_per_s"] / anchor["decode_tokens_per_s"]
    verdict = "meets" if ratio >= 1.0 else "MISSES"
    return (
        f"decode at {depth} tokens: ours ({best['engine']}) {best['decode_tokens_per_s']:.2f} t/s / best anchor "
        f"({anchor['engine']}) {anchor['decode_tokens_per_s']:.2f} t/s = {ratio:.2f} ({verdict} >= 1.0)"
    )


def anchor_artifacts(ckpt: Path, args: argparse.Namespace) -> dict[str, tuple[Path | None, str]]:
    engines = args.engines.split(",")
    found = {}
    if "ort-genai" in engines:
        found["ort-genai"] = export_genai(ckpt, args.workdir)
    if "ov-genai" in engines:
        found["ov-genai"] = optimum_ir(ckpt, args.optimum_ir)
    return found


def run_all(ckpt: Path, prompts: list[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    anchors = anchor_artifacts(ckpt, args)
    for engine in args.engines.split(","):
        if engine in anchors:
            artifact, why = anchors[engine]
            for prompt in prompts:
                if artifact is None:
                    rows.append({"engine": engine, "prompt": prompt, "artifact": "-", "error": f"not available: {why}"})
                else:
                    rows.append(measure(artifact, args.workdir, engine, prompt, args))
            continue
        for label, max_length in (("32k", None), ("4k", SHORT_CONTEXT)):
            artifact = args.workdir / f"{engine}-int4-{label}"
            export(ckpt, artifact, args.workdir, engine, max_length)
            for prompt in prompts if max_length is None else [p for p in prompts if p < max_length][:1]:
                rows.append(measure(artifact, args.workdir, engine, prompt, args))
    return rows


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qwen-export-long-context"))
    ap.add_argument("--prompts", default="1024,4096,16384", help="prompt lengths, comma-separated")
    ap.add_argument("--engines", default="onnxruntime,openvino,ort-genai,ov-genai")
    ap.add_argument("--optimum-ir", type=Path, help="optimum-intel's int4 IR of the workdir's checkpoint")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prefill-chunk", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rss-cap-gib", type=float, default=20.0, help="kill a run whose RSS passes this")
    ap.add_argument("--timeout-s", type=float, default=3600.0, help="kill a run after this long")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--engine", default="onnxruntime", help=argparse.SUPPRESS)
    ap.add_argument("--prompt", type=int, default=1024, help=argparse.SUPPRESS)
    args = ap.parse_args()
    unknown = set(args.engines.split(",")) - set(OURS) - set(ANCHORS)
    if unknown:
        ap.error(f"unknown engines {sorted(unknown)}; valid: {', '.join((*OURS, *ANCHORS))}")
    return args


def main() -> int:
    args = parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.prompt, args)))
        return 0
    prompts = [int(p) for p in args.prompts.split(",")]
    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt = args.workdir / "checkpoint"
    build(ckpt)
    before = harness.loadavg()
    rows = run_all(ckpt, prompts, args)
    print(table(rows))
    checks = [c for e in OURS if (c := rss_check(rows, e, min(prompts))) is not None]
    checks += [c for c in [decode_check(rows, DECODE_DEPTH)] if c is not None]
    print("\n".join(checks))
    if args.json_out is not None:
        load = {"loadavg_before": before, "loadavg_after": harness.loadavg()}
        harness.write_json(args.json_out, {"host": harness.host(), **load, "rows": rows, "checks": checks})
    return 0


if __name__ == "__main__":
    sys.exit(main())
