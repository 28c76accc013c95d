"""Decode speed at a deep context, two or more ONNX Runtime artifacts interleaved step by step in one
process (e.g. the same weights exported with the fp32 and the int8 KV cache: ``export --kv-cache int8``).

Each artifact is loaded once (``--threads`` intra-op threads), prefills the same random prompt of
``--depth`` tokens (in ``--prefill-chunk`` pieces, so a ``--logits all`` artifact's logits stay
small), then the artifacts take turns: one greedy decode step each, ``--steps`` rounds, after
``--warmup`` untimed rounds. A step's time is taken around ``engine.forward`` only, so machine load
hits every artifact alike; ``uptime``'s load averages are recorded before and after.

    .venv/bin/python benchmarks/kv_cache_speed.py A_DIR B_DIR [--depth 4096] [--steps 64] [--json-out F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ORDINARY_TOKENS = 151643  # Qwen's ordinary (non-special) token ids: 0 .. 151642


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def measure(paths: list[Path], depth: int, steps: int, warmup: int, threads: int, chunk: int) -> dict[str, Any]:
    import numpy as np

    from qwen_export.runtime.loader import RuntimeOptions, open_artifact

    engines, loaded_info = [], []
    for path in paths:
        loaded = open_artifact(path, RuntimeOptions(threads=threads, prefill_chunk=chunk))
        engines.append(loaded.engine)
        kv = loaded.manifest.extra.get("kv_cache") or {}
        loaded_info.append({"artifact": str(path), "kv_dtype": kv.get("dtype", loaded.manifest.dtype)})
    prompt = np.random.default_rng(0).integers(0, ORDINARY_TOKENS, (1, depth), dtype=np.int64)
    last = []
    for engine, info in zip(engines, loaded_info, strict=True):
        t0 = time.perf_counter()
        logits = engine.forward(prompt)
        info["prefill_s"] = time.perf_counter() - t0
        last.append(int(np.argmax(logits[0, -1])))
    times: list[list[float]] = [[] for _ in engines]
    for round_ in range(warmup + steps):
        for i, engine in enumerate(engines):
            t0 = time.perf_counter()
            logits = engine.forward(np.array([[last[i]]], np.int64))
            elapsed = time.perf_counter() - t0
            last[i] = int(np.argmax(logits[0, -1]))
            if round_ >= warmup:
                times[i].append(elapsed)
    for engine, info, samples in zip(engines, loaded_info, times, strict=True):
        info["decode_tok_s_median"] = 1.0 / statistics.median(samples)
        info["decode_tok_s_mean"] = len(samples) / sum(samples)
        info["step_ms_p10_p90"] = [1e3 * q for q in statistics.quantiles(samples, n=10)[::8]]
        info["kv_bytes"] = int(engine.kv_bytes)
        info["kv_capacity"] = int(engine.kv_capacity)
        info["kernels"] = engine.kernel_choices()
    return {"depth": depth, "steps": steps, "warmup": warmup, "threads": threads, "artifacts": loaded_info}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", type=Path, nargs="+")
    ap.add_argument("--depth", type=int, default=4096, help="tokens in the cache before decoding")
    ap.add_argument("--steps", type=int, default=64, help="timed decode steps per artifact")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill-chunk", type=int, default=256)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    before = _uptime()
    report = measure(args.artifacts, args.depth, args.steps, args.warmup, args.threads, args.prefill_chunk)
    report.update(uptime_before=before, uptime_after=_uptime(), command=" ".join(sys.argv))
    for info in report["artifacts"]:
        print(
            f"{info['artifact']}: KV {info['kv_dtype']}, {info['kv_bytes'] / 2**20:.1f} MiB held, "
            f"decode {info['decode_tok_s_median']:.2f} tok/s (median; mean {info['decode_tok_s_mean']:.2f}) "
            f"at depth {args.depth}, prefill {info['prefill_s']:.1f} s"
        )
    print(f"uptime before: {report['uptime_before']}\nuptime after:  {report['uptime_after']}")
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
