"""Latency measurement over any Engine: TTFT, prefill and decode tokens/s, per-token latency, RSS.

Prompts are random token ids (no prefix cache can flatter a run); each measured run starts from an
empty cache. Decode runs greedily for exactly ``new_tokens`` steps (no stop token), so every run
does the same work.
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

from .errors import OptionError
from .runtimes.base import Engine

#: Sample prompt ids below this (ordinary BPE tokens of Qwen's vocabulary, no special tokens).
ORDINARY_TOKENS = 151643


@dataclasses.dataclass(frozen=True)
class BenchCase:
    prompt_tokens: int
    new_tokens: int


@dataclasses.dataclass(frozen=True)
class BenchResult:
    prompt_tokens: int
    new_tokens: int
    runs: int
    ttft_ms: float  # median over runs: prefill forward + first token choice
    prefill_tokens_per_s: float
    decode_tokens_per_s: float  # median over runs
    token_latency_ms_p10: float
    token_latency_ms_p50: float
    token_latency_ms_p90: float
    peak_rss_mb: float  # process peak so far (includes loading)


def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MiB.

    On Linux this is ``VmHWM`` from /proc/self/status: ``ru_maxrss`` is inherited across fork and
    exec, so a process started by a large parent would report the parent's peak.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def run_once(engine: Engine, prompt: np.ndarray, new_tokens: int) -> tuple[float, list[float]]:
    """One measured generation: returns (ttft seconds, per-decode-token seconds)."""
    engine.reset()
    start = time.perf_counter()
    logits = engine.forward(prompt[None, :])
    token = int(np.argmax(logits[0, -1]))
    ttft = time.perf_counter() - start
    steps: list[float] = []
    for _ in range(new_tokens - 1):
        t0 = time.perf_counter()
        logits = engine.forward(np.array([[token]], np.int64))
        token = int(np.argmax(logits[0, -1]))
        steps.append(time.perf_counter() - t0)
    engine.reset()
    return ttft, steps


def bench(
    engine: Engine,
    cases: list[BenchCase],
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    on_run: Callable[[], None] | None = None,
) -> list[BenchResult]:
    """Measure every case ``repeats`` times after ``warmup`` unmeasured runs."""
    if repeats < 1 or warmup < 0:
        raise OptionError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    vocab = min(engine.capabilities.vocab_size, ORDINARY_TOKENS)
    rng = np.random.default_rng(seed)
    results = []
    for case in cases:
        if case.prompt_tokens < 1 or case.new_tokens < 1:
            raise OptionError(f"prompt and new-token counts must be >= 1, got {case}")
        if case.prompt_tokens + case.new_tokens > engine.capabilities.max_context:
            raise OptionError(
                f"{case.prompt_tokens} + {case.new_tokens} tokens exceed the artifact's context "
                f"of {engine.capabilities.max_context}"
            )
        ttfts, decode_rates, steps_all = [], [], []
        for i in range(warmup + repeats):
            prompt = rng.integers(0, vocab, case.prompt_tokens, dtype=np.int64)
            ttft, steps = run_once(engine, prompt, case.new_tokens)
            if on_run is not None:
                on_run()
            if i < warmup:
                continue
            ttfts.append(ttft)
            steps_all += steps
            if steps:
                decode_rates.append(len(steps) / sum(steps))
        ttft = statistics.median(ttfts)
        results.append(
            BenchResult(
                prompt_tokens=case.prompt_tokens,
                new_tokens=case.new_tokens,
                runs=repeats,
                ttft_ms=ttft * 1e3,
                prefill_tokens_per_s=case.prompt_tokens / ttft,
                decode_tokens_per_s=statistics.median(decode_rates) if decode_rates else float("nan"),
                token_latency_ms_p10=_percentile(steps_all, 10) * 1e3,
                token_latency_ms_p50=_percentile(steps_all, 50) * 1e3,
                token_latency_ms_p90=_percentile(steps_all, 90) * 1e3,
                peak_rss_mb=peak_rss_mb(),
            )
        )
    return results
