"""Soak test: generate for a while and watch memory and reset hygiene.

Builds (or reuses) the tiny Qwen2 checkpoint and its ONNX Runtime artifact in ``--workdir``, then
loops conversations through :class:`qwen_export.runtime.generation.Generator` until ``--seconds`` have
passed: greedy and seeded-sampling turns of 32-64 tokens, multi-turn with prefix reuse, ``reset()``
when the context fills up. After every reset the engine must be clean: its logits for a fixed probe
prompt must equal (within ``--tolerance``) those of a freshly opened engine. RSS (psutil) is read
after a warm-up, at intervals and at the end.

Exit status 1 when RSS grew by more than ``--max-growth-mib`` after the warm-up, when a reset was not
clean, or when greedy output for the same prompt changed between conversations.

    .venv/bin/python benchmarks/soak.py --seconds 120 [--workdir DIR] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import psutil

from qwen_export.runtime.generation import GenerationConfig, Generator
from qwen_export.runtime.loader import open_artifact

SYSTEM = "You are a helpful assistant."
QUESTIONS = [
    "Write a quicksort in Python.",
    "What is the capital of France?",
    "Explain KV caches in one sentence.",
    "Name three prime numbers.",
    "Translate 'good morning' into German.",
]
PROBE_TEXT = "The quick brown fox jumps over the lazy dog."


def rss_mib() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def build(workdir: Path) -> Path:
    """The tiny artifact in ``workdir``, built and exported unless it is already there."""
    ckpt, out = workdir / "tiny-qwen2", workdir / "tiny-qwen2-onnx"
    if (out / "manifest.json").is_file():
        return out
    from qwen_export.export.pipeline import ExportOptions, export
    from qwen_export.export.tiny import make_checkpoint

    if not (ckpt / "config.json").is_file():
        make_checkpoint(ckpt)
    export(ckpt, out, ExportOptions(overwrite=True))
    return out


def probe_logits(engine, probe: list[int]) -> np.ndarray:
    """Logits of ``probe`` fed to an engine assumed empty; the engine is reset afterwards."""
    logits = np.array(engine.forward(np.asarray([probe], np.int64)), copy=True)
    engine.reset()
    return logits


def soak(artifact_dir: Path, seconds: float, tolerance: float, report_every: float, warmup_cycles: int) -> dict:
    loaded = open_artifact(artifact_dir)
    tok, engine = loaded.tokenizer, loaded.engine
    context = engine.capabilities.max_context
    probe = tok.encode(PROBE_TEXT)
    reference = probe_logits(open_artifact(artifact_dir).engine, probe)  # a freshly opened engine
    generator = Generator(engine, tok)
    rng = np.random.default_rng(0)

    greedy_first: dict[int, tuple[int, ...]] = {}  # first greedy turn per question: must repeat exactly
    stats = {
        "cycles": 0,
        "turns": 0,
        "tokens": 0,
        "reused_tokens": 0,
        "resets": 0,
        "max_reset_diff": 0.0,
        "unclean_resets": 0,
        "greedy_mismatches": 0,
    }
    samples: list[tuple[float, float]] = []
    baseline: float | None = None
    start = time.perf_counter()
    next_report = 0.0

    def reset_and_check() -> None:
        generator.reset()
        got = probe_logits(engine, probe)
        diff = float(np.max(np.abs(got - reference))) if got.shape == reference.shape else float("inf")
        stats["resets"] += 1
        stats["max_reset_diff"] = max(stats["max_reset_diff"], diff)
        if diff > tolerance:
            stats["unclean_resets"] += 1
            print(f"UNCLEAN reset #{stats['resets']}: max |logit diff| {diff:.3g} > {tolerance:g}", file=sys.stderr)

    while True:
        elapsed = time.perf_counter() - start
        if baseline is not None and elapsed >= seconds:
            break
        reset_and_check()
        q = stats["cycles"] % len(QUESTIONS)
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[q]}]
        turn = 0
        while True:
            ids = tok.apply_chat_template_ids(messages)
            n = int(rng.integers(32, 65))
            if len(ids) + n > context:
                break  # context full: start a new conversation (reset)
            if turn == 0:  # greedy, fixed length: the same prompt must give the same tokens every time
                config = GenerationConfig(max_new_tokens=48, temperature=0.0)
            elif turn % 2:
                config = GenerationConfig(
                    max_new_tokens=n,
                    temperature=0.8,
                    top_k=40,
                    top_p=0.95,
                    min_p=0.02,
                    repetition_penalty=1.1,
                    seed=int(rng.integers(2**31)),
                )
            else:
                config = GenerationConfig(max_new_tokens=n, temperature=0.0, repetition_penalty=1.05)
            result = generator.generate_text(ids, config)
            if turn == 0:
                first = greedy_first.setdefault(q, result.token_ids)
                if result.token_ids != first:
                    stats["greedy_mismatches"] += 1
                    print(f"greedy output for question {q} changed between conversations", file=sys.stderr)
            elif result.reused_tokens == 0:
                print(f"turn {turn} reused no prompt tokens", file=sys.stderr)
            stats["turns"] += 1
            stats["tokens"] += result.completion_tokens
            stats["reused_tokens"] += result.reused_tokens
            messages += [
                {"role": "assistant", "content": result.text},
                {"role": "user", "content": QUESTIONS[(q + turn + 1) % len(QUESTIONS)]},
            ]
            turn += 1
        stats["cycles"] += 1
        now = time.perf_counter() - start
        if baseline is None and stats["cycles"] >= warmup_cycles:
            baseline = rss_mib()
            samples.append((0.0, baseline))
            start_tokens = stats["tokens"]
            print(
                f"[{now:6.1f} s] warm-up done after {stats['cycles']} conversations: RSS {baseline:.1f} MiB", flush=True
            )
            start = time.perf_counter()  # the measured period starts now
            next_report = report_every
            continue
        if baseline is not None and now >= next_report:
            rss = rss_mib()
            samples.append((now, rss))
            print(
                f"[{now:6.1f} s] RSS {rss:.1f} MiB ({rss - baseline:+.1f}), {stats['tokens'] - start_tokens} tokens, "
                f"{stats['resets']} resets",
                flush=True,
            )
            next_report += report_every

    end_rss = rss_mib()
    measured = time.perf_counter() - start
    samples.append((measured, end_rss))
    assert baseline is not None
    return {
        **stats,
        "seconds": measured,
        "tokens_measured": stats["tokens"] - start_tokens,
        "tokens_per_s": (stats["tokens"] - start_tokens) / measured if measured > 0 else 0.0,
        "rss_start_mib": baseline,
        "rss_end_mib": end_rss,
        "rss_max_mib": max(r for _, r in samples),
        "rss_growth_mib": end_rss - baseline,
        "rss_samples": [{"t": round(t, 1), "rss_mib": round(r, 1)} for t, r in samples],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120, help="measured duration after warm-up (default 120)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qe-soak"), help="checkpoint + artifact cache")
    parser.add_argument("--max-growth-mib", type=float, default=20.0, help="RSS growth allowed after warm-up")
    parser.add_argument("--tolerance", type=float, default=1e-6, help="max |logit diff| of a clean reset")
    parser.add_argument("--report-every", type=float, default=15.0, help="seconds between RSS reports")
    parser.add_argument("--warmup-cycles", type=int, default=len(QUESTIONS), help="conversations before the baseline")
    parser.add_argument("--json-out", type=Path, help="write the report as JSON here")
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    artifact_dir = build(args.workdir)
    print(f"artifact {artifact_dir} ready in {time.perf_counter() - t0:.1f} s", flush=True)
    report = soak(artifact_dir, args.seconds, args.tolerance, args.report_every, args.warmup_cycles)
    failures = []
    if report["rss_growth_mib"] > args.max_growth_mib:
        failures.append(f"RSS grew {report['rss_growth_mib']:.1f} MiB > {args.max_growth_mib:g} MiB")
    if report["unclean_resets"]:
        failures.append(f"{report['unclean_resets']} of {report['resets']} resets were not clean")
    if report["greedy_mismatches"]:
        failures.append(f"{report['greedy_mismatches']} greedy turns differed from the first run of their prompt")
    report["failures"] = failures
    print(
        f"soak: {report['seconds']:.0f} s measured, {report['cycles']} conversations, {report['turns']} turns, "
        f"{report['tokens_measured']} tokens ({report['tokens_per_s']:.1f} tok/s), {report['resets']} resets "
        f"(max |logit diff| {report['max_reset_diff']:.3g}), RSS {report['rss_start_mib']:.1f} -> "
        f"{report['rss_end_mib']:.1f} MiB (growth {report['rss_growth_mib']:+.1f} MiB, max {report['rss_max_mib']:.1f})"
    )
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
