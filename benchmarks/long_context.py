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
4. a table, and JSON to ``--json-out``.

Target (issue 23): peak RSS at a 1K prompt on the 32K artifact within 10% of the 4K artifact's.

    .venv/bin/python benchmarks/long_context.py [--workdir DIR] [--prompts 1024,4096,16384]
        [--engines onnxruntime,openvino] [--new-tokens 32] [--prefill-chunk 2048] [--json-out F]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import harness
from artifacts import checkpoint_ready
from harness import ORDINARY_TOKENS, MiB, log

RSS_TARGET = 1.10  # 32K artifact's peak RSS at a 1K prompt / the 4K artifact's
SHORT_CONTEXT = 4096


# ----------------------------------------------------------------------------- child: one run
def child(artifact: Path, prompt_len: int, new_tokens: int, prefill_chunk: int, engine_name: str) -> dict[str, Any]:
    """Load, prefill, decode; what it cost (this process's own peak RSS included)."""
    import resource

    import numpy as np

    from qwen_export.runtime.loader import RuntimeOptions, open_artifact
    from qwen_export.spec import Target

    t0 = time.perf_counter()
    options = RuntimeOptions(engine=Target.parse(engine_name), prefill_chunk=prefill_chunk)
    engine = open_artifact(artifact, options).engine
    load_s = time.perf_counter() - t0
    prompt = np.random.default_rng(0).integers(0, ORDINARY_TOKENS, (1, prompt_len), dtype=np.int64)
    t0 = time.perf_counter()
    logits = engine.forward(prompt)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        logits = engine.forward(np.array([[int(np.argmax(logits[0, -1]))]], np.int64))
    decode_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "engine": engine_name,
        "prompt": prompt_len,
        "load_s": round(load_s, 3),
        "prefill_s": round(prefill_s, 3),
        "prefill_tokens_per_s": round(prompt_len / prefill_s, 1),
        "decode_tokens_per_s": round(new_tokens / decode_s, 2) if new_tokens else None,
        "kv_bytes": int(getattr(engine, "kv_bytes", 0)),
        "kv_bytes_per_token": int(artifact_kv_per_token(artifact)),
        "cached_tokens": engine.num_cached_tokens,
        "peak_rss_bytes": peak,
    }


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


def measure(artifact: Path, workdir: Path, engine: str, prompt: int, args: argparse.Namespace) -> dict[str, Any]:
    name = f"run-{artifact.name}-{prompt}"
    cmd = [sys.executable, __file__, "--child", str(artifact), "--engine", engine, "--prompt", str(prompt)]
    cmd += ["--new-tokens", str(args.new_tokens), "--prefill-chunk", str(args.prefill_chunk)]
    result = harness.run_logged(name, cmd, workdir)
    if result["returncode"] != 0:
        return {"engine": engine, "prompt": prompt, "artifact": artifact.name, "error": result["stderr_tail"][-500:]}
    out = json.loads(result["stdout_tail"].splitlines()[-1])
    return out | {"artifact": artifact.name, "launcher_peak_rss_bytes": result["peak_rss_bytes"]}


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'engine':<12} {'artifact':<22} {'prompt':>6} {'TTFT s':>8} {'decode t/s':>10} {'KV MiB':>8}"
    head += f" {'peak RSS MiB':>12}"
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['engine']:<12} {r['artifact']:<22} {r['prompt']:>6} error: {r['error'][-80:]}")
            continue
        lines.append(
            f"{r['engine']:<12} {r['artifact']:<22} {r['prompt']:>6} {r['prefill_s']:>8.2f} "
            f"{r['decode_tokens_per_s'] or 0:>10.1f} {r['kv_bytes'] / MiB:>8.1f} {r['peak_rss_bytes'] / MiB:>12.0f}"
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qwen-export-long-context"))
    ap.add_argument("--prompts", default="1024,4096,16384", help="prompt lengths, comma-separated")
    ap.add_argument("--engines", default="onnxruntime,openvino")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prefill-chunk", type=int, default=2048)
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--engine", default="onnxruntime", help=argparse.SUPPRESS)
    ap.add_argument("--prompt", type=int, default=1024, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.prompt, args.new_tokens, args.prefill_chunk, args.engine)))
        return 0
    prompts = [int(p) for p in args.prompts.split(",")]
    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt = args.workdir / "checkpoint"
    build(ckpt)
    rows = []
    for engine in args.engines.split(","):
        for label, max_length in (("32k", None), ("4k", SHORT_CONTEXT)):
            artifact = args.workdir / f"{engine}-int4-{label}"
            export(ckpt, artifact, args.workdir, engine, max_length)
            for prompt in prompts if max_length is None else [p for p in prompts if p < max_length][:1]:
                rows.append(measure(artifact, args.workdir, engine, prompt, args))
    print(table(rows))
    checks = [c for e in args.engines.split(",") if (c := rss_check(rows, e, min(prompts))) is not None]
    print("\n".join(checks))
    if args.json_out is not None:
        harness.write_json(args.json_out, {"host": harness.host(), "rows": rows, "checks": checks})
    return 0


if __name__ == "__main__":
    sys.exit(main())
