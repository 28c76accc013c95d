"""One OpenVINO artifact under several compute / KV-cache precisions, measured side by side.

Every option set is one engine in this process (the artifact compiled once per set), run
interleaved by ``bench_many`` on the same random prompts (a slow spell of a shared machine hits
them all alike), then, with ``--reference-logits/--text-ids`` (quant_real.py's fp32 logits and
ids), each set's accuracy on that text: the text run in chunks of ``--chunk`` tokens on a
``--logits all`` artifact (``--accuracy-artifact``, the prefill path: the bf16 form of ``split``),
mean KL(ref || model), top-1 and perplexity by ``accuracy.compare``.

    .venv/bin/python benchmarks/openvino_precision.py ART --sets f32/f32,split,bf16/u8 \\
        --prompt-lengths 128,1024 --new-tokens 32 --repeats 3 --threads 2 \\
        [--accuracy-artifact ART_ALL --reference-logits REF.npy --text-ids IDS.npy] [--json-out F]

A set is ``PRECISION/KV`` (``f32/f32``, ``f32/u8``, ``bf16/u8``, ``bf16/bf16``, ...) or ``split``
(prompts in bf16, decode steps in f32, one u8 cache) or ``auto`` (what the engine picks here).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from qwen_export.runtime import bench as bench_mod
from qwen_export.runtime.loader import RuntimeOptions, open_artifact
from qwen_export.targets.openvino.engine import Attention, KVCachePrecision, OpenVINOOptions, Precision


def options(label: str, threads: int) -> OpenVINOOptions:
    precision, _, kv = label.partition("/")
    kv_cache = KVCachePrecision.parse(kv or "f32", "kv cache")
    return OpenVINOOptions(threads=threads, precision=Precision.parse(precision, "precision"), kv_cache=kv_cache,
                           attention=Attention.PAGED)  # fmt: skip


def speed(art: str, labels: list[str], args: argparse.Namespace) -> dict[str, Any]:
    targets = []
    for label in labels:
        engine = open_artifact(art, RuntimeOptions(threads=args.threads, openvino=options(label, args.threads))).engine
        print(f"{label}: {engine.kernel_choices()}", flush=True)
        targets.append(bench_mod.BenchTarget(label, engine))
    cases = [bench_mod.BenchCase(n, args.new_tokens) for n in args.prompt_lengths]
    results = bench_mod.bench_many(targets, cases, repeats=args.repeats, warmup=1, seed=args.seed)
    out: dict[str, Any] = {}
    for target, rows in zip(targets, results, strict=True):
        out[target.label] = {"kernels": target.engine.kernel_choices(), "cases": []}
        for r in rows:
            out[target.label]["cases"].append(
                {
                    "prompt": r.prompt_tokens,
                    "ttft_ms": r.ttft_ms,
                    "prefill_tok_s": r.prefill_tokens_per_s,
                    "decode_tok_s": r.decode_tokens_per_s,
                }  # fmt: skip
            )
    return out


def accuracy(labels: list[str], args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).parent))
    import accuracy as acc

    ids = np.load(args.text_ids)
    out = {}
    for label in labels:
        runtime = RuntimeOptions(threads=args.threads, openvino=options(label, args.threads))
        engine = open_artifact(args.accuracy_artifact, runtime).engine
        if not engine.capabilities.full_logits:
            raise SystemExit(
                f"error: {args.accuracy_artifact} returns last-position logits; export it with --logits all"
            )
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "logits.npy"
            logits = np.lib.format.open_memmap(path, "w+", np.float32, (len(ids), engine.capabilities.vocab_size))
            engine.reset()
            for a in range(0, len(ids), args.chunk):
                logits[a : a + args.chunk] = engine.forward(ids[None, a : a + args.chunk])[0]
            logits.flush()
            out[label] = acc.compare(Path(args.reference_logits), path, ids)
        print(f"{label}: {json.dumps(out[label])}", flush=True)
        del engine
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact")
    p.add_argument("--sets", default="f32/f32,split,bf16/u8,bf16/bf16")
    p.add_argument("--prompt-lengths", type=lambda s: [int(x) for x in s.split(",")], default=[128, 1024])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--accuracy-artifact")
    p.add_argument("--reference-logits")
    p.add_argument("--text-ids")
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    labels = [s for s in args.sets.split(",") if s]
    report: dict[str, Any] = {"artifact": args.artifact, "sets": labels, "load_before": os.getloadavg()}
    if not args.skip_speed:
        report["speed"] = speed(args.artifact, labels, args)
    if args.accuracy_artifact:
        report["accuracy"] = accuracy(labels, args)
    report["load_after"] = os.getloadavg()
    print(json.dumps(report, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
