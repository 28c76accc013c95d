"""Interleaved speed measurements over several workers (:class:`harness.Worker`), same prompts for all.

On a shared machine other jobs come and go within seconds; interleaving the engines makes a slow
spell hit all of them alike, and the figures are read as ratios. Two granularities:

* :func:`measure_steps`: every engine prefills in turn, then each decode step runs on every engine
  in turn (A, B, C, A, B, C, ...), then prefill-only rounds with the first engine rotated (a prefill
  is one multi-second shot that a slow spell can hit for one engine only); ratios by
  :func:`step_ratios`. Needs step-wise sessions (ours, og).
* :func:`measure_generations`: whole generations in turn, the first engine rotated each round, then
  prefill-only rounds (one new token); paired prefill ratios (:func:`paired_prefill`) divide two
  engines' TTFTs of the same round. Any session.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import harness
from harness import Worker


def random_prompts(seed: int) -> Any:
    """``next_prompt(length)``: random ordinary token ids, the same sequence for the same seed."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return lambda length: [int(t) for t in rng.integers(0, harness.ORDINARY_TOKENS, length)]


# ----------------------------------------------------------------------------- step by step
def generate_interleaved(workers: list[Worker], prompt: list[int], new_tokens: int) -> dict[str, dict[str, Any]]:
    """One greedy generation on every worker, interleaved step by step.

    Every engine prefills in turn, then each decode step runs on every engine in turn (A, B, C, A,
    B, C, ...), so that a slow spell of a shared machine (a few hundred ms) hits all engines alike.
    Times are taken inside the workers, around the compute only (no IPC).
    """
    out: dict[str, dict[str, Any]] = {w.label: {"steps_s": []} for w in workers}
    for w in workers:
        out[w.label]["ttft_s"] = w.call("prefill", prompt=prompt, new_tokens=new_tokens)["s"]
    for _ in range(new_tokens - 1):
        for w in workers:
            out[w.label]["steps_s"].append(w.call("step")["s"])
    for w in workers:
        out[w.label]["tokens"] = w.call("finish")["tokens"]
    return out


def _step_rounds(workers: list[Worker], next_prompt: Any, length: int, new_tokens: int, repeats: int, warmup: int):
    """``warmup`` + ``repeats`` interleaved generations: per engine TTFTs, steps, rates, agreement."""
    seen: dict[str, dict[str, list]] = {w.label: {"ttft": [], "steps": [], "rates": [], "agree": []} for w in workers}
    for i in range(warmup + repeats):
        runs = generate_interleaved(workers, next_prompt(length), new_tokens)
        kind = "warm-up" if i < warmup else "run"
        for w in workers:
            r = runs[w.label]
            mean_ms = 1e3 * statistics.fmean(r["steps_s"])
            ttft_ms = r["ttft_s"] * 1e3
            msg = f"  {length}+{new_tokens} {kind} {i + 1} {w.label}: TTFT {ttft_ms:.1f} ms, {mean_ms:.2f} ms/token"
            harness.log(msg)
            if i < warmup:
                continue
            s = seen[w.label]
            s["ttft"].append(r["ttft_s"])
            s["steps"] += r["steps_s"]
            s["rates"].append(len(r["steps_s"]) / sum(r["steps_s"]))
            # leading greedy tokens shared with the first engine: a check that all run the same model
            s["agree"].append(harness.leading_agreement(runs[workers[0].label]["tokens"], r["tokens"]))
    return seen


def _prefill_rounds(workers: list[Worker], next_prompt: Any, length: int, new_tokens: int, rounds: int, ttfts) -> None:
    """Prefill-only rounds, the engine order rotated each round; TTFTs appended to ``ttfts[label]``."""
    for i in range(rounds):
        prompt = next_prompt(length)
        order = workers[i % len(workers) :] + workers[: i % len(workers)]
        for w in order:
            ttfts[w.label].append(w.call("prefill", prompt=prompt, new_tokens=new_tokens)["s"])
            w.call("finish")
        harness.log(
            f"  {length} prefill-only {i + 1}: "
            + ", ".join(f"{w.label} {ttfts[w.label][-1] * 1e3:.0f} ms" for w in workers)
        )


def measure_steps(
    workers: list[Worker],
    lengths: list[int],
    new_tokens: int,
    repeats: int,
    warmup: int,
    seed: int,
    prefill_repeats: int = 0,
) -> dict[str, Any]:
    """Per prompt length and engine: TTFT (median of every prefill, and its min), prefill and decode
    tok/s, mean / p50 / p90 ms per decode token, greedy tokens shared with the first engine."""
    next_prompt = random_prompts(seed)
    cases: dict[str, Any] = {}
    for length in lengths:
        seen = _step_rounds(workers, next_prompt, length, new_tokens, repeats, warmup)
        ttfts = {label: s["ttft"] for label, s in seen.items()}
        # A prefill is one multi-second shot per engine, so a slow spell can hit one engine's and
        # not the others'; extra prefill-only rounds (order rotated each round) steady its median.
        _prefill_rounds(workers, next_prompt, length, new_tokens, prefill_repeats, ttfts)
        per_engine = {}
        for label, s in seen.items():
            ttft = harness.spread(s["ttft"])
            per_engine[label] = {
                "runs": repeats,
                "prefill_samples": ttft["n"],
                "ttft_ms": ttft["median"] * 1e3,
                "ttft_ms_min": ttft["min"] * 1e3,
                "ttft_ms_runs": [t * 1e3 for t in s["ttft"]],
                "prefill_tokens_per_s": length / ttft["median"],
                "decode_tokens_per_s": statistics.median(s["rates"]),
                "decode_ms_per_token_mean": 1e3 * statistics.fmean(s["steps"]),
                "decode_ms_per_token_p50": 1e3 * statistics.median(s["steps"]),
                "decode_ms_per_token_p90": 1e3 * harness.percentile(s["steps"], 90),
                "greedy_tokens_matching_first_engine": s["agree"],
            }
        cases[str(length)] = per_engine
    return cases


def step_ratios(cases: dict[str, Any], base: str, others: list[str]) -> dict[str, Any]:
    """base/other for prefill tok/s and decode tok/s, per prompt length (> 1: base is faster)."""
    out: dict[str, Any] = {}
    for other in others:
        per_len = {}
        for length, engines in cases.items():
            if base not in engines or other not in engines:
                continue
            b, o = engines[base], engines[other]
            per_len[length] = {
                "prefill": b["prefill_tokens_per_s"] / o["prefill_tokens_per_s"],
                # the same from the fastest prefill of each (the least disturbed by other jobs)
                "prefill_best": o["ttft_ms_min"] / b["ttft_ms_min"],
                "decode": b["decode_tokens_per_s"] / o["decode_tokens_per_s"],
                # the same from the median step (robust to a few slow steps on a shared machine)
                "decode_p50": o["decode_ms_per_token_p50"] / b["decode_ms_per_token_p50"],
            }
        out[f"{base}/{other}"] = per_len
    return out


# ----------------------------------------------------------------------------- whole generations
def _generation_case(length: int, prefills: dict[str, list[float]], runs: dict[str, list[dict]]) -> dict[str, Any]:
    first = next(iter(runs.values()))
    return {
        label: {
            "ttft_ms": 1e3 * statistics.median(prefills[label]),
            "ttft_all_ms": [round(1e3 * t, 1) for t in prefills[label]],
            "prefill_tokens_per_s": length / statistics.median(prefills[label]),
            "decode_tokens_per_s": 1.0 / statistics.median(r["tpot_s"] for r in rs) if rs else float("nan"),
            # each measured round's own decode rate, in round order: the spread behind the median
            "decode_all_tok_s": [round(1.0 / r["tpot_s"], 2) for r in rs],
            "greedy_tokens_matching_first_engine": [
                harness.leading_agreement(a["tokens"], b["tokens"]) for a, b in zip(first, rs, strict=True)
            ],
        }
        for label, rs in runs.items()
    }


def measure_generations(
    workers: list[Worker],
    lengths: list[int],
    new_tokens: int,
    repeats: int,
    warmup: int,
    seed: int,
    prefill_repeats: int = 0,
    gap_s: float = 0.0,
) -> dict[str, Any]:
    """Per prompt length: ``warmup`` + ``repeats`` generations of ``new_tokens`` per engine, then
    ``prefill_repeats`` prefill-only rounds (one new token); the engines take turns on the same
    prompt each round, the first engine rotating. TTFT is the median over every timed prefill
    (generation and prefill-only rounds); ``paired`` ratios divide two engines' TTFTs of the same
    round (neighbours in time, so a slow spell of the shared machine hits both). ``gap_s``: idle
    seconds before each call, so the previous engine's worker threads have gone to sleep. Progress
    goes to stderr."""
    next_prompt = random_prompts(seed)
    cases: dict[str, Any] = {}
    for length in lengths:
        runs: dict[str, list[dict[str, Any]]] = {w.label: [] for w in workers}
        prefills: dict[str, list[float]] = {w.label: [] for w in workers}
        rounds = [("generate", new_tokens)] * (warmup + repeats) + [("prefill", 1)] * prefill_repeats
        for i, (kind, tokens) in enumerate(rounds):
            prompt = next_prompt(length)
            order = workers[i % len(workers) :] + workers[: i % len(workers)]  # rotate who goes first
            for w in order:
                time.sleep(gap_s)
                r = w.generate(prompt, tokens)
                if w.first_ttft_s is None:
                    w.first_ttft_s = r["ttft_s"]
                timed = i >= warmup
                tag = "warm-up" if not timed else ("run" if kind == "generate" else "prefill-only")
                tpot = f", {r['tpot_s'] * 1e3:.1f} ms/token" if r["tpot_s"] is not None else ""
                msg = f"  {length}+{tokens} {tag} {i + 1} {w.label}: TTFT {r['ttft_s'] * 1e3:.0f} ms{tpot}"
                harness.log(msg, file=sys.stderr)
                if timed:
                    prefills[w.label].append(r["ttft_s"])
                    if kind == "generate":
                        runs[w.label].append(r)
        cases[str(length)] = _generation_case(length, prefills, runs)
    return cases


def paired_prefill(per: dict[str, Any], label: str, base: str) -> dict[str, float]:
    """Median and range of base TTFT / label TTFT over the rounds (> 1: label prefills faster)."""
    return harness.spread([b / a for a, b in zip(per[label]["ttft_all_ms"], per[base]["ttft_all_ms"], strict=True)])
