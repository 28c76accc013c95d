"""Our OpenVINO target vs our ONNX Runtime target vs optimum-intel's export run in openvino-genai.

One run on one checkpoint, CPU, ``--threads`` (2) threads per engine:

1. artifacts (each reused when its directory already holds one, unless ``--force``):

   * ours, for each ``--weights`` (int4, int8): ``qwen-export export CKPT -o W/ov-<w> --target
     openvino --weights <w>`` and ``qwen-export export CKPT -o W/ort-<w> --weights <w>`` (the CLI's
     defaults: RTN, symmetric, block 32, int8 embedding, last-position logits);
   * a variant of ours: ``--export-args "ARGS" --tag T`` appends the (shlex-split) ARGS to both
     export commands and writes ``W/ov-<w>-T`` and ``W/ort-<w>-T`` instead (engine labels
     ``ours-ov@T``, ``ours-ort@T``, ``genai-ours@T``); the ARGS are recorded next to each artifact
     (``W/ov-<w>-T.export-args.json``) and a reused artifact made with other ARGS is an error;
     ``--baseline`` also measures the default ``W/ov-<w>`` as engine ``ours-ov`` in the same run
     (accuracy and speed), so variant, default and optimum are side by side;
   * the anchor: ``--anchors DIR/<prefix>-<w>``, made by ``optimum-cli export openvino --model CKPT
     --task text-generation-with-past --weight-format <w> OUT`` in optimum-intel's own virtual
     environment (see benchmarks/README.md); a missing anchor is reported, never silently skipped;

2. accuracy (``--reference-logits REF.npy --text-ids IDS.npy``, as written by quant_real.py: our
   fp32 artifact's every-position logits on a fixed text): each OpenVINO IR, ours and the anchor,
   is teacher-forced through the same raw OpenVINO code (a compiled stateful model fed
   ``input_ids``/``attention_mask``/``position_ids``/``beam_idx``; f32 inference, f32 KV cache, so
   the figure is the weights' accuracy), one token at a time for a last-position-logits IR; mean
   KL(ref || model), top-1 agreement and perplexity (``quant_real.compare``);

3. speed: every engine in its own worker process, generations interleaved (A, B, C, A, B, C, ...)
   on the same random prompts, ``--warmup`` + ``--repeats`` rounds per prompt length:

   * ``ours-ov``: our OpenVINOEngine (``open_artifact``) with ``attention=stateful`` (the IR as
     saved), greedy loop in Python; KV cache f32 (ours' default) unless ``--kv-cache``;
   * ``ours-paged``: the same artifact on our engine with ``attention=paged`` (PagedAttention over
     the engine's block cache, the model openvino-genai runs; the engine's default since
     2026-11-29 for models without sliding-window layers), same loop and KV-cache precision;
   * ``ours-ort``: our OnnxRuntimeEngine on the ONNX Runtime artifact of the same weights;
   * ``genai-ours`` and ``genai-optimum``: ``openvino_genai.LLMPipeline(IR, "CPU",
     INFERENCE_NUM_THREADS=T)`` with its defaults (u8 KV cache on x86), ``min_new_tokens =
     max_new_tokens`` so every run emits exactly ``--new-tokens``; TTFT and time per output token
     from its ``perf_metrics``.

   ``--prefill-repeats N`` adds N prefill-only rounds (one new token) per prompt length, the same
   rotation: a prefill is one multi-second shot that a slow spell of the shared machine can hit
   for one engine only, so more of them are needed than generations give. TTFT is the median over
   every timed prefill; the *paired* prefill ratio is the median over rounds of optimum's TTFT /
   the engine's TTFT in the same round (neighbours in time), printed with its range. "first TTFT"
   is each engine's first prefill after load (its one-time weight repacking included).

   TTFT is prefill + first token; prefill tok/s = prompt / TTFT; decode tok/s = 1 / median time
   per output token (ours: per step; genai: its TPOT per run, median over runs). ``--engines
   a,b`` keeps only those engines (a label, or its part before ``@``: ``ours-ov`` keeps
   ``ours-ov@T`` and the baseline ``ours-ov``); accuracy is measured for the kept OpenVINO IRs
   run by raw OpenVINO (``ours-ov*``, ``genai-optimum``); the ONNX Runtime artifact is exported only
   when ``ours-ort`` is kept (so ``--engines ours-ov --skip-speed`` exports just the IR).

4. prints one table per weight format (engine x mean KL, top-1, ppl, size MiB, load s, prefill and
   decode tok/s per prompt length) and the ratios of every engine to genai-optimum; targets for
   ours-ov: prefill >= 1.0x, decode >= 1.1x at equal or better mean KL. ``--json-out FILE`` writes
   everything (the export args and tag included).

    .venv/bin/python benchmarks/openvino_vs_optimum.py --checkpoint CKPT --anchors DIR --anchor-prefix ov-real
        [--workdir W] [--weights int4,int8] [--prompt-lengths 128,512] [--new-tokens 128]
        [--reference-logits REF.npy --text-ids IDS.npy] [--json-out FILE]
        [--export-args "--block-size 128 --asymmetric" --tag b128a [--baseline]] [--engines a,b]
        [--prefill-repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ort_vs_genai as ovg  # noqa: E402 - shared launcher, logging, memory helpers
import quant_real  # noqa: E402 - compare(): KL / top-1 / ppl against reference logits

TARGET_PREFILL = 1.0
TARGET_DECODE = 1.1


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- artifacts
def build_ours(
    ckpt: Path, out: Path, target: str, weights: str, workdir: Path, force: bool, extra: list[str] | None = None
) -> dict[str, Any]:
    """Export (or reuse) one artifact; ``extra`` args go after the defaults and are recorded beside it."""
    extra = list(extra or [])
    record = out.with_name(out.name + ".export-args.json")  # outside the artifact: its manifest lists files
    if (out / "manifest.json").is_file() and not force:
        recorded = json.loads(record.read_text())["export_args"] if record.is_file() else []
        if recorded != extra:
            error = f"{out} was exported with {recorded}, not {extra}: use --force or another --tag"
            return {"reused": True, "path": str(out), "returncode": 2, "error": error}
        return {"reused": True, "path": str(out), "export_args": extra}
    cmd = [ovg.cli_path(), "export", str(ckpt), "-o", str(out), "--target", target, "--weights", weights, *extra]
    if force:
        cmd.append("--overwrite")
    result = ovg.run_logged(f"export-{out.name}", cmd, workdir)
    result["path"], result["export_args"] = str(out), extra
    if result["returncode"] == 0 and extra:
        record.write_text(json.dumps({"export_args": extra, "command": cmd}, indent=2))
    elif result["returncode"] == 0:
        record.unlink(missing_ok=True)
    return result


def ir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.name.startswith(("openvino_model", "model.onnx")))


# ----------------------------------------------------------------------------- workers
class _EngineSession:
    def __init__(self, path: str, threads: int, kv_cache: str | None, attention: str | None = None) -> None:
        from qwen_export.runtime.llm import runtime_options
        from qwen_export.runtime.loader import open_artifact

        manifest = json.loads((Path(path) / "manifest.json").read_text())
        ov_opts = manifest["target"] == "openvino"
        options = (
            runtime_options(threads, kv_cache=kv_cache or "f32", attention=attention)
            if ov_opts
            else runtime_options(threads)
        )
        self.engine = open_artifact(path, options).engine

    def generate(self, prompt: list[int], new_tokens: int) -> dict[str, Any]:
        import numpy as np

        self.engine.reset()
        start = time.perf_counter()
        token = int(np.argmax(self.engine.forward(np.asarray([prompt], np.int64))[0, -1]))
        ttft = time.perf_counter() - start
        steps, tokens = [], [token]
        for _ in range(new_tokens - 1):
            t0 = time.perf_counter()
            token = int(np.argmax(self.engine.forward(np.array([[token]], np.int64))[0, -1]))
            steps.append(time.perf_counter() - t0)
            tokens.append(token)
        return {"ttft_s": ttft, "tpot_s": statistics.median(steps) if steps else None, "tokens": tokens}


class _GenaiSession:
    def __init__(self, path: str, threads: int, kv_cache: str | None) -> None:
        import openvino as ov
        import openvino_genai

        self.ov, self.og = ov, openvino_genai
        props: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads} if threads else {}
        if kv_cache:
            props["KV_CACHE_PRECISION"] = kv_cache
        self.pipe = openvino_genai.LLMPipeline(path, "CPU", **props)

    def generate(self, prompt: list[int], new_tokens: int) -> dict[str, Any]:
        import numpy as np

        config = self.og.GenerationConfig()
        config.max_new_tokens = config.min_new_tokens = new_tokens
        config.do_sample = False
        config.ignore_eos = True
        ids = np.asarray([prompt], np.int64)
        res = self.pipe.generate(
            self.og.TokenizedInputs(self.ov.Tensor(ids), self.ov.Tensor(np.ones_like(ids))), config
        )
        metrics = res.perf_metrics
        return {
            "ttft_s": metrics.get_ttft().mean / 1e3,
            "tpot_s": metrics.get_tpot().mean / 1e3 if new_tokens > 1 else None,
            "tokens": [int(t) for t in res.tokens[0]],
        }


def worker_main(kind: str, path: str, threads: int, kv_cache: str | None) -> int:
    """JSON lines on stdin: {"prompt", "new_tokens"} -> one generation's timings; EOF ends."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    t0 = time.perf_counter()
    try:
        if kind == "genai":
            session: Any = _GenaiSession(path, threads, kv_cache)
        else:
            session = _EngineSession(path, threads, kv_cache, "paged" if kind == "engine-paged" else "stateful")
    except Exception as exc:
        proto.write(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}) + "\n")
        return 1
    proto.write(json.dumps({"ok": True, "load_s": time.perf_counter() - t0, "rss_mib": ovg.vm_hwm_mib()}) + "\n")
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            proto.write(json.dumps({"ok": True, **session.generate(msg["prompt"], int(msg["new_tokens"]))}) + "\n")
        except Exception as exc:
            proto.write(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}) + "\n")
    return 0


class Worker:
    def __init__(self, label: str, kind: str, path: Path, threads: int, kv_cache: str | None, workdir: Path) -> None:
        self.label = label
        self.first_ttft_s: float | None = None  # its first prefill after load (weight repacking included)
        self.stderr_path = workdir / f"worker-{label}.stderr.log"
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in close()
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, str(path), "--threads", str(threads)]
        if kv_cache:
            cmd += ["--kv-cache", kv_cache]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True, bufsize=1
        )
        self.ready = self.recv()

    def recv(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        msg = json.loads(line) if line else {"ok": False, "error": f"exited ({self.proc.wait()})"}
        if not msg.get("ok"):
            tail = self.stderr_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"worker {self.label}: {msg.get('error')}\n{tail}")
        return msg

    def generate(self, prompt: list[int], new_tokens: int) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"prompt": prompt, "new_tokens": new_tokens}) + "\n")
        self.proc.stdin.flush()
        return self.recv()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=120)
        self._stderr.close()


def measure(
    workers: list[Worker],
    lengths: list[int],
    new_tokens: int,
    repeats: int,
    warmup: int,
    seed: int,
    prefill_repeats: int = 0,
    gap_s: float = 0.0,
) -> dict:
    """Per prompt length: ``warmup`` + ``repeats`` generations of ``new_tokens`` per engine, then
    ``prefill_repeats`` prefill-only rounds (one new token); the engines take turns on the same
    prompt each round, the first engine rotating. TTFT is the median over every timed prefill
    (generation and prefill-only rounds); ``paired`` ratios divide two engines' TTFTs of the same
    round (neighbours in time, so a slow spell of the shared machine hits both). ``gap_s``: idle
    seconds before each call, so the previous engine's worker threads have gone to sleep."""
    import numpy as np

    rng = np.random.default_rng(seed)
    cases: dict[str, Any] = {}
    for length in lengths:
        runs: dict[str, list[dict[str, Any]]] = {w.label: [] for w in workers}
        prefills: dict[str, list[float]] = {w.label: [] for w in workers}
        rounds = [("generate", new_tokens)] * (warmup + repeats) + [("prefill", 1)] * prefill_repeats
        for i, (kind, tokens) in enumerate(rounds):
            prompt = [int(t) for t in rng.integers(0, ovg.ORDINARY_TOKENS, length)]
            order = workers[i % len(workers) :] + workers[: i % len(workers)]  # rotate who goes first
            for w in order:
                time.sleep(gap_s)
                r = w.generate(prompt, tokens)
                if w.first_ttft_s is None:
                    w.first_ttft_s = r["ttft_s"]
                timed = i >= warmup
                tag = "warm-up" if not timed else ("run" if kind == "generate" else "prefill-only")
                tpot = f", {r['tpot_s'] * 1e3:.1f} ms/token" if r["tpot_s"] is not None else ""
                log(f"  {length}+{tokens} {tag} {i + 1} {w.label}: TTFT {r['ttft_s'] * 1e3:.0f} ms{tpot}")
                if timed:
                    prefills[w.label].append(r["ttft_s"])
                    if kind == "generate":
                        runs[w.label].append(r)
        first = runs[workers[0].label]
        cases[str(length)] = {
            label: {
                "ttft_ms": 1e3 * statistics.median(prefills[label]),
                "ttft_all_ms": [round(1e3 * t, 1) for t in prefills[label]],
                "prefill_tokens_per_s": length / statistics.median(prefills[label]),
                "decode_tokens_per_s": 1.0 / statistics.median(r["tpot_s"] for r in rs) if rs else float("nan"),
                "greedy_tokens_matching_first_engine": [
                    next(
                        (k for k, (x, y) in enumerate(zip(a["tokens"], b["tokens"], strict=False)) if x != y),
                        min(len(a["tokens"]), len(b["tokens"])),
                    )
                    for a, b in zip(first, rs, strict=True)
                ],  # fmt: skip
            }
            for label, rs in runs.items()
        }
    return cases


def paired_prefill(per: dict[str, Any], label: str, base: str) -> dict[str, float]:
    """Median and range of base TTFT / label TTFT over the rounds (> 1: label prefills faster)."""
    ratios = [b / a for a, b in zip(per[label]["ttft_all_ms"], per[base]["ttft_all_ms"], strict=True)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "n": len(ratios)}


# ----------------------------------------------------------------------------- accuracy
def eval_worker(path: str, ids_path: str, out_path: str, threads: int) -> int:
    """Teacher-force the ids through an OpenVINO IR (ours or optimum's); save every position's logits."""
    import numpy as np
    import openvino as ov

    ids = np.load(ids_path).astype(np.int64)
    core = ov.Core()
    props = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32", "INFERENCE_NUM_THREADS": threads}
    compiled = core.compile_model(str(Path(path) / "openvino_model.xml"), "CPU", props)
    request = compiled.create_infer_request()
    request.reset_state()
    n, out, done = len(ids), None, 0
    positions = compiled.output("logits").get_partial_shape()[1]  # ours: 1 (or 0..1), optimum's: any
    chunk = 1 if positions.get_max_length() == 1 else 256
    while done < n:
        step = ids[done : done + chunk]
        request.infer({
            "input_ids": step[None, :],
            "attention_mask": np.ones((1, done + len(step)), np.int64),
            "position_ids": np.arange(done, done + len(step), dtype=np.int64)[None, :],
            "beam_idx": np.zeros(1, np.int32),
        })  # fmt: skip
        logits = request.get_tensor("logits").data[0]
        if out is None:
            out = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.float32, shape=(n, logits.shape[-1]))
        out[done + len(step) - logits.shape[0] : done + len(step)] = logits
        done += len(step)
    assert out is not None
    out.flush()
    return 0


def evaluate(label: str, path: Path, args: Any, workdir: Path) -> dict[str, Any]:
    out = workdir / "logits" / f"{label}.npy"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, os.path.abspath(__file__), "--eval-worker", str(path), str(args.text_ids), str(out),
           "--threads", str(args.threads)]  # fmt: skip
    result = ovg.run_logged(f"eval-{label}", cmd, workdir)
    if result["returncode"] != 0:
        return {"error": result["stderr_tail"][-500:]}
    import numpy as np

    metrics = quant_real.compare(Path(args.reference_logits), out, np.load(args.text_ids).astype(np.int64))
    out.unlink()  # [tokens, vocab] float32: hundreds of MB each
    return metrics


# ----------------------------------------------------------------------------- report
def summary(report: dict[str, Any]) -> str:
    lines = [f"# OpenVINO vs ONNX Runtime vs optimum-intel/openvino-genai — {report['checkpoint']}",
             f"{report['machine']}; {report['threads']} threads; new tokens {report['new_tokens']}"]  # fmt: skip
    if report.get("tag"):
        lines.append(f"ours@{report['tag']}: qwen-export export ... {shlex.join(report['export_args'])}"
                     + ("; ours-ov: the CLI defaults" if report.get("baseline") else ""))  # fmt: skip
    else:
        lines.append("ours: the CLI defaults")
    lines.append("")
    for weights, block in report["results"].items():
        lines.append(f"## {weights}")
        lengths = list(block["speed"])
        head = (
            "| engine | mean KL | top-1 | ppl | size MiB | load s |"
            + "".join(f" prefill@{n} tok/s | decode@{n} tok/s |" for n in lengths)
            + " first TTFT ms |"
        )
        lines += [head, "|" + "---|" * (7 + 2 * len(lengths))]
        for label, info in block["engines"].items():
            acc = info.get("accuracy") or {}
            nan = float("nan")
            row = f"| {label} | {acc.get('mean_kl', nan):.4f} | {acc.get('top1', nan):.3f} |"
            row += f" {acc.get('ppl', nan):.3f} |"
            row += f" {info['bytes'] / 2**20:.0f} | {info.get('load_s', 0):.1f} |"
            for n in lengths:
                s = block["speed"][n].get(label, {})
                row += f" {s.get('prefill_tokens_per_s', nan):.1f} | {s.get('decode_tokens_per_s', nan):.2f} |"
            row += f" {info['first_ttft_ms']:.0f} |" if "first_ttft_ms" in info else " - |"
            lines.append(row)
        for n, r in block.get("ratios", {}).items():
            per = "; ".join(f"{label} prefill {x['prefill']:.2f}x (paired per round: median "
                            f"{x['prefill_paired']['median']:.2f}x, {x['prefill_paired']['min']:.2f}-"
                            f"{x['prefill_paired']['max']:.2f}x over {x['prefill_paired']['n']}), "
                            f"decode {x['decode']:.2f}x"
                            for label, x in r.get("engines", {}).items())  # fmt: skip
            lines.append(f"- {n}-token prompt, engine / genai-optimum (targets for ours-ov: prefill >= "
                         f"{TARGET_PREFILL}x, decode >= {TARGET_DECODE}x): {per}")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", nargs=2, metavar=("KIND", "PATH"))
    p.add_argument("--eval-worker", nargs=3, metavar=("IR", "IDS", "OUT"))
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--anchors", type=Path, default=Path("/work/anchors"))
    p.add_argument("--anchor-prefix", default="ov-real")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/qe-ov-bench"))
    p.add_argument("--weights", default="int4,int8")
    p.add_argument("--prompt-lengths", default="128,512")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prefill-repeats", type=int, default=0, help="extra prefill-only rounds per prompt length")
    p.add_argument(
        "--gap-s", type=float, default=0.0, help="idle seconds before each engine call (worker threads settle)"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv-cache", default=None, help="KV_CACHE_PRECISION for ours-ov (default f32) and genai")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference-logits", type=Path)
    p.add_argument("--text-ids", type=Path)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--force", action="store_true")
    p.add_argument("--json-out", type=Path)
    p.add_argument(
        "--export-args",
        default="",
        help="extra `qwen-export export` args (shlex-split), ov and ort; one flag alone: --export-args=--asymmetric",
    )
    p.add_argument("--tag", default="", help="artifact suffix for --export-args: W/ov-<w>-TAG, labels ours-ov@TAG")
    p.add_argument("--baseline", action="store_true", help="with --tag: also the default W/ov-<w> as engine ours-ov")
    p.add_argument("--engines", default="", help="comma-separated engine labels (or their part before @) to keep")
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args.worker[0], args.worker[1], args.threads, args.kv_cache)
    if args.eval_worker:
        return eval_worker(*args.eval_worker, args.threads)
    if args.checkpoint is None:
        p.error("--checkpoint is required")
    export_args = shlex.split(args.export_args)
    if export_args and not args.tag:
        p.error("--export-args needs --tag (the default artifact directories hold the CLI defaults)")
    if args.baseline and not args.tag:
        p.error("--baseline needs --tag")
    if args.tag and not args.tag.replace("-", "").replace("_", "").isalnum():
        p.error("--tag: letters, digits, - and _ only")
    keep = {x for x in args.engines.split(",") if x}
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    lengths = [int(x) for x in args.prompt_lengths.split(",")]
    report: dict[str, Any] = {
        "checkpoint": str(args.checkpoint),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "threads": args.threads,
        "new_tokens": args.new_tokens,
        "export_args": export_args,
        "tag": args.tag,
        "baseline": args.baseline,
        "results": {},
    }
    failed = False
    for weights in args.weights.split(","):
        suffix, at = (f"-{args.tag}", f"@{args.tag}") if args.tag else ("", "")
        ours_ov = workdir / f"ov-{weights}{suffix}"
        ours_ort = workdir / f"ort-{weights}{suffix}"
        anchor = args.anchors / f"{args.anchor_prefix}-{weights}"
        builds = {
            f"ours-ov{at}": build_ours(args.checkpoint, ours_ov, "openvino", weights, workdir, args.force, export_args)
        }
        if not keep or f"ours-ort{at}" in keep or "ours-ort" in keep:  # only ours-ort runs the ORT artifact
            builds[f"ours-ort{at}"] = build_ours(
                args.checkpoint, ours_ort, "onnxruntime", weights, workdir, args.force, export_args
            )
        if args.baseline:  # the CLI defaults, kept (never --force'd) beside the variant
            base_ov = workdir / f"ov-{weights}"
            builds["ours-ov"] = build_ours(args.checkpoint, base_ov, "openvino", weights, workdir, False)
        for label, b in builds.items():
            if b.get("error"):
                log(f"{label}: {b['error']}")
        if any(b.get("returncode", 0) != 0 for b in builds.values()):
            failed = True
            continue
        if not (anchor / "openvino_model.xml").is_file():
            log(f"anchor {anchor} is missing: make it with optimum-cli (benchmarks/README.md); measuring ours only")
        paths = {
            f"ours-ov{at}": ours_ov,
            f"ours-paged{at}": ours_ov,
            f"ours-ort{at}": ours_ort,
            f"genai-ours{at}": ours_ov,
        }
        if args.baseline:
            paths["ours-ov"] = workdir / f"ov-{weights}"
        if (anchor / "openvino_model.xml").is_file():
            paths["genai-optimum"] = anchor
        if keep:
            paths = {label: path for label, path in paths.items() if label in keep or label.split("@")[0] in keep}
        engines: dict[str, Any] = {
            label: {
                "path": str(path),
                "bytes": ir_bytes(path),
                "build": builds.get(label),
                "export_args": None if label == "genai-optimum" else (export_args if "@" in label else []),
            }
            for label, path in paths.items()
        }
        if args.reference_logits and args.text_ids:
            for label in paths:
                if label.startswith("ours-ov") or label == "genai-optimum":
                    log(f"accuracy of {label} ({weights})")
                    engines[label]["accuracy"] = evaluate(f"{label}-{weights}", paths[label], args, workdir)
        speed: dict[str, Any] = {}
        if not args.skip_speed:
            workers = []
            try:
                for label, path in paths.items():
                    kind = "genai" if label.startswith("genai") else "engine"
                    kind = "engine-paged" if label.startswith("ours-paged") else kind
                    w = Worker(label, kind, path, args.threads, args.kv_cache, workdir)
                    engines[label]["load_s"] = w.ready["load_s"]
                    workers.append(w)
                speed = measure(
                    workers,
                    lengths,
                    args.new_tokens,
                    args.repeats,
                    args.warmup,
                    args.seed,
                    args.prefill_repeats,
                    args.gap_s,
                )
            except RuntimeError as exc:
                log(str(exc))
                failed = True
            finally:
                for w in workers:
                    if w.first_ttft_s is not None:
                        engines[w.label]["first_ttft_ms"] = 1e3 * w.first_ttft_s
                    w.close()
        ratios: dict[str, Any] = {}
        for n, per in speed.items():
            if "genai-optimum" in per:
                base = per["genai-optimum"]
                each = {
                    label: {
                        "prefill": s["prefill_tokens_per_s"] / base["prefill_tokens_per_s"],
                        "prefill_paired": paired_prefill(per, label, "genai-optimum"),
                        "decode": s["decode_tokens_per_s"] / base["decode_tokens_per_s"],
                    }
                    for label, s in per.items()
                    if label != "genai-optimum"
                }
                ratios[n] = {"engines": each}  # and, as before, ours-ov / genai-ours (the variant's, with --tag)
                if f"ours-ov{at}" in each:
                    ratios[n].update(each[f"ours-ov{at}"])
                if f"genai-ours{at}" in each:
                    ratios[n]["genai_prefill"] = each[f"genai-ours{at}"]["prefill"]
                    ratios[n]["genai_decode"] = each[f"genai-ours{at}"]["decode"]
        report["results"][weights] = {"engines": engines, "speed": speed, "ratios": ratios}
        if args.json_out:
            args.json_out.write_text(json.dumps(report, indent=2))
    print(summary(report))
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
