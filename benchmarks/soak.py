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
import sys
import time
from pathlib import Path

import harness
import numpy as np
from harness import rss_mib

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


def turn_config(turn: int, n: int, rng: np.random.Generator) -> GenerationConfig:
    """Turn 0: greedy, fixed length (the same prompt must give the same tokens every time); then
    seeded sampling and greedy with a repetition penalty, alternating, ``n`` tokens."""
    if turn == 0:
        return GenerationConfig(max_new_tokens=48, temperature=0.0)
    if turn % 2:
        seed = int(rng.integers(2**31))
        return GenerationConfig(
            max_new_tokens=n, temperature=0.8, top_k=40, top_p=0.95, min_p=0.02, repetition_penalty=1.1, seed=seed
        )
    return GenerationConfig(max_new_tokens=n, temperature=0.0, repetition_penalty=1.05)


class Soak:
    """Conversations on one engine; ``stats`` counts them, their resets and what went wrong."""

    def __init__(self, artifact_dir: Path, tolerance: float) -> None:
        loaded = open_artifact(artifact_dir)
        self.tok, self.engine = loaded.tokenizer, loaded.engine
        self.context = self.engine.capabilities.max_context
        self.probe = self.tok.encode(PROBE_TEXT)
        self.reference = probe_logits(open_artifact(artifact_dir).engine, self.probe)  # a freshly opened engine
        self.generator = Generator(self.engine, self.tok)
        self.rng = np.random.default_rng(0)
        self.tolerance = tolerance
        self.greedy_first: dict[int, tuple[int, ...]] = {}  # first greedy turn per question: must repeat exactly
        self.stats = dict.fromkeys(("cycles", "turns", "tokens", "reused_tokens", "resets"), 0)
        self.stats |= {"max_reset_diff": 0.0, "unclean_resets": 0, "greedy_mismatches": 0}

    def reset_and_check(self) -> None:
        stats = self.stats
        self.generator.reset()
        got = probe_logits(self.engine, self.probe)
        diff = float(np.max(np.abs(got - self.reference))) if got.shape == self.reference.shape else float("inf")
        stats["resets"] += 1
        stats["max_reset_diff"] = max(stats["max_reset_diff"], diff)
        if diff > self.tolerance:
            stats["unclean_resets"] += 1
            print(
                f"UNCLEAN reset #{stats['resets']}: max |logit diff| {diff:.3g} > {self.tolerance:g}", file=sys.stderr
            )

    def conversation(self) -> None:
        """A reset, then turns until the context is full."""
        stats = self.stats
        self.reset_and_check()
        q = stats["cycles"] % len(QUESTIONS)
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[q]}]
        turn = 0
        while True:
            ids = self.tok.apply_chat_template_ids(messages)
            n = int(self.rng.integers(32, 65))
            if len(ids) + n > self.context:
                break  # context full: start a new conversation (reset)
            result = self.generator.generate_text(ids, turn_config(turn, n, self.rng))
            if turn == 0:
                first = self.greedy_first.setdefault(q, result.token_ids)
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


def soak(artifact_dir: Path, seconds: float, tolerance: float, report_every: float, warmup_cycles: int) -> dict:
    run = Soak(artifact_dir, tolerance)
    stats = run.stats
    t0 = time.perf_counter()
    run.conversation()  # at least one
    while stats["cycles"] < warmup_cycles:
        run.conversation()
    now = time.perf_counter() - t0
    baseline = rss_mib()
    samples: list[tuple[float, float]] = [(0.0, baseline)]
    start_tokens = stats["tokens"]
    print(f"[{now:6.1f} s] warm-up done after {stats['cycles']} conversations: RSS {baseline:.1f} MiB", flush=True)
    start = time.perf_counter()  # the measured period starts now
    next_report = report_every
    while time.perf_counter() - start < seconds:
        run.conversation()
        now = time.perf_counter() - start
        if now >= next_report:
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
        harness.write_json(args.json_out, report)
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
