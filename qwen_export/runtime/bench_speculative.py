"""Speculative decoding against plain decoding, interleaved on one engine (``bench --speculate``).

Both runs go through the same :class:`~qwen_export.runtime.generation.Generator` loop (greedy, no
stop token, exactly ``new_tokens`` tokens, the cache reset before each run), one after the other
on the same prompt in every round, so their ratio holds on a noisy machine. ``bench`` feeds random
prompts: prompt lookup finds little to copy there, so its figure is the overhead on free text;
``benchmarks/speculative.py`` measures the code-editing case it is for.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from qwen_export.runtime.generation import GenerationConfig, GenerationResult, Generator
from qwen_export.runtime.speculative import Speculation, Speculator, make_speculator
from qwen_export.targets.base import Engine


class _Silent:
    """A decoder with no eos and no text: generation runs exactly ``max_new_tokens`` tokens."""

    eos_token_id = None

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return ""


@dataclasses.dataclass(frozen=True)
class SpeculativeResult:
    label: str
    prompt_tokens: int
    new_tokens: int
    runs: int
    plain_tokens_per_s: float  # median decode tok/s (tokens after the first)
    speculative_tokens_per_s: float
    speedup: float  # median over rounds of speculative / plain
    speedup_min: float
    speedup_max: float
    acceptance_rate: float | None  # accepted / drafted over the measured runs
    tokens_per_forward: float  # generated tokens per verifying forward (plain: 1)
    identical: bool  # every speculative run gave the plain run's tokens


def run_pair(
    plain: Generator, speculative: Generator, prompt: list[int], config: GenerationConfig
) -> tuple[GenerationResult, GenerationResult]:
    """One plain and one speculative generation of ``prompt``, each from an empty cache."""
    results = []
    for gen in (plain, speculative):
        gen.reset()
        results.append(gen.generate_text(prompt, config))
    return results[0], results[1]


def summarize(label: str, pairs: list[tuple[GenerationResult, GenerationResult]]) -> SpeculativeResult:
    """Medians, the spread of the per-round ratios and the acceptance over measured ``pairs``."""
    plain = [p.decode_tokens_per_s or float("nan") for p, _ in pairs]
    spec = [s.decode_tokens_per_s or float("nan") for _, s in pairs]
    ratios = [s / p for p, s in zip(plain, spec, strict=True)]
    stats = [s.speculation for _, s in pairs if s.speculation is not None]
    drafted = sum(s.drafted for s in stats)
    steps = sum(s.steps for s in stats)
    tokens = sum(s.completion_tokens - 1 for _, s in pairs)
    first = pairs[0][0]
    return SpeculativeResult(
        label=label,
        prompt_tokens=first.prompt_tokens,
        new_tokens=first.completion_tokens,
        runs=len(pairs),
        plain_tokens_per_s=statistics.median(plain),
        speculative_tokens_per_s=statistics.median(spec),
        speedup=statistics.median(ratios),
        speedup_min=min(ratios),
        speedup_max=max(ratios),
        acceptance_rate=sum(s.accepted for s in stats) / drafted if drafted else None,
        tokens_per_forward=tokens / steps if steps else float("nan"),
        identical=all(p.token_ids == s.token_ids for p, s in pairs),
    )


def bench_speculation(
    targets: Sequence[tuple[str, Engine]],
    speculation: Speculation,
    cases: Sequence[tuple[int, int]],
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    open_draft: Callable[[Path], Engine] | None = None,
    vocab: int = 151643,
) -> list[SpeculativeResult]:
    """For every target and case (prompt tokens, new tokens): plain vs speculative greedy decoding
    on random prompts (ids below ``vocab``), ``warmup`` unmeasured rounds then ``repeats``."""
    out = []
    rng = np.random.default_rng(seed)
    for label, engine in targets:
        speculator = make_speculator(speculation, engine, open_draft)
        assert isinstance(speculator, Speculator)
        plain, spec = Generator(engine, _Silent()), Generator(engine, _Silent(), speculator)
        for prompt_tokens, new_tokens in cases:
            config = GenerationConfig(max_new_tokens=new_tokens, temperature=0.0)
            high = min(vocab, engine.capabilities.vocab_size)
            pairs = []
            for i in range(warmup + repeats):
                prompt = rng.integers(0, high, prompt_tokens).tolist()
                pair = run_pair(plain, spec, prompt, config)
                if i >= warmup:
                    pairs.append(pair)
            plain.reset()
            out.append(summarize(label, pairs))
    return out
