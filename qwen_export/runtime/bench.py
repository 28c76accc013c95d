"""Latency measurement over any Engine: TTFT, prefill and decode tokens/s, per-token latency, RSS.

Prompts are random token ids (no prefix cache can flatter a run); each measured run starts from an
empty cache. Decode runs greedily for exactly ``new_tokens`` steps (no stop token), so every run
does the same work.

Several engines are measured *interleaved* (:func:`bench_many`): for every case and every round the
engines run one after another on the same random prompt, so a slow spell of a noisy machine hits all
of them alike and their ratios hold.
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qwen_export.errors import OptionError
from qwen_export.spec import DType, KVCacheDType
from qwen_export.spec import kv_bytes_per_token as spec_kv_bytes
from qwen_export.targets.base import Engine

#: Sample prompt ids below this (ordinary BPE tokens of Qwen's vocabulary, no special tokens).
ORDINARY_TOKENS = 151643

#: First prompt length of a context sweep; each next one doubles it.
SWEEP_START = 128
#: Default ceiling of a context sweep (also capped by the artifact's context).
SWEEP_DEFAULT_MAX = 8192

#: Bytes per KV-cache element for each manifest dtype.


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
    peak_rss_mb: float  # process peak so far (includes loading; shared by every engine of the process)
    kv_cache_mb: float | None = None  # KV cache at prompt + new tokens, when the target's size is known
    # the spread over the runs: sample standard deviation (NaN for one run) and min-max
    ttft_ms_std: float = float("nan")
    ttft_ms_min: float = float("nan")
    ttft_ms_max: float = float("nan")
    prefill_tokens_per_s_std: float = float("nan")
    decode_tokens_per_s_std: float = float("nan")
    decode_tokens_per_s_min: float = float("nan")
    decode_tokens_per_s_max: float = float("nan")


@dataclasses.dataclass(frozen=True)
class BenchTarget:
    """One engine to measure in :func:`bench_many`."""

    label: str
    engine: Engine
    kv_bytes_per_token: int | None = None  # see :func:`kv_bytes_per_token`


@dataclasses.dataclass(frozen=True)
class BenchRun:
    """One finished generation, reported to ``on_run`` (in the order they ran)."""

    target: int  # index into the targets
    label: str
    case: BenchCase
    round: int  # 0-based, warm-up rounds first
    warmup: bool


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


def current_rss_mb() -> float:
    """Resident set size of this process now, in MiB."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def machine_info() -> dict[str, Any]:
    """What a benchmark figure depends on besides the artifact: CPU model, cores, kernel-relevant
    flags, OS, Python and the engine packages' versions (read from their metadata, not imported)."""
    import os
    import platform
    from importlib import metadata

    import psutil

    from qwen_export.cpuinfo import KERNEL_FLAGS, cpu_model_and_flags

    model, flags = cpu_model_and_flags()
    packages = {}
    for name in ("onnxruntime", "openvino", "tensorrt", "numpy"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "cpu": model,
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "cpu_flags": [flag for flag in KERNEL_FLAGS if flag in flags],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": packages,
    }


def disk_mb(path: str | Path) -> float:
    """Size of every file under ``path``, in MiB."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**20


def kv_bytes_per_token(spec: dict[str, Any], dtype: str, kv_dtype: str | None = None) -> int:
    """KV-cache bytes one token takes, from a manifest's ``spec`` and ``dtype`` (``kv_dtype``: the
    cache's own element type, ``extra.kv_cache.dtype``, when it has one, e.g. int8)."""
    try:
        layers = int(spec["num_hidden_layers"])
        kv_heads = int(spec.get("num_key_value_heads") or spec["num_attention_heads"])
        head_dim = int(spec["head_dim"])
    except (KeyError, TypeError, ValueError) as exc:
        raise OptionError(f"manifest spec lacks the KV-cache shape ({exc})") from None
    kv = KVCacheDType.parse(kv_dtype, "manifest kv_cache dtype") if kv_dtype is not None else None
    return spec_kv_bytes(layers, kv_heads, head_dim, DType.parse(dtype, "manifest dtype"), kv)


def sweep_lengths(max_tokens: int, start: int = SWEEP_START) -> list[int]:
    """Prompt lengths of a context sweep: ``start``, doubling, up to ``max_tokens`` (itself the last)."""
    if max_tokens < 1:
        raise OptionError(f"the sweep needs a maximum prompt length >= 1, got {max_tokens}")
    lengths = []
    n = start
    while n <= max_tokens:
        lengths.append(n)
        n *= 2
    if not lengths or lengths[-1] != max_tokens:
        lengths.append(max_tokens)
    return lengths


def _std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else float("nan")


def _spread(ttfts: list[float], prompt_tokens: int, rates: list[float]) -> dict[str, float]:
    """The spread fields of a :class:`BenchResult` (``ttfts`` in seconds, ``rates`` decode tokens/s)."""
    nan = float("nan")
    return {
        "ttft_ms_std": _std(ttfts) * 1e3,
        "ttft_ms_min": min(ttfts) * 1e3,
        "ttft_ms_max": max(ttfts) * 1e3,
        "prefill_tokens_per_s_std": _std([prompt_tokens / t for t in ttfts]),
        "decode_tokens_per_s_std": _std(rates),
        "decode_tokens_per_s_min": min(rates) if rates else nan,
        "decode_tokens_per_s_max": max(rates) if rates else nan,
    }


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


def check_cases(targets: Sequence[BenchTarget], cases: Sequence[BenchCase], repeats: int, warmup: int) -> None:
    """Raise :class:`OptionError` for any case that some target cannot run (before anything runs)."""
    if repeats < 1 or warmup < 0:
        raise OptionError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    if not targets:
        raise OptionError("nothing to benchmark: no artifacts")
    if not cases:
        raise OptionError("nothing to benchmark: no cases")
    for case in cases:
        if case.prompt_tokens < 1 or case.new_tokens < 1:
            raise OptionError(f"prompt and new-token counts must be >= 1, got {case}")
        for t in targets:
            context = t.engine.capabilities.max_context
            if case.prompt_tokens + case.new_tokens > context:
                raise OptionError(
                    f"{case.prompt_tokens} + {case.new_tokens} tokens exceed the context of {t.label} ({context})"
                )


def bench_many(
    targets: Sequence[BenchTarget],
    cases: Sequence[BenchCase],
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    on_run: Callable[[BenchRun], None] | None = None,
) -> list[list[BenchResult]]:
    """Measure every case on every target, interleaved; returns results[target][case].

    For each case: ``warmup`` unmeasured rounds, then ``repeats`` measured ones; in every round each
    target runs once, in order, on the same random prompt.
    """
    check_cases(targets, cases, repeats, warmup)
    vocab = min(min(t.engine.capabilities.vocab_size for t in targets), ORDINARY_TOKENS)
    rng = np.random.default_rng(seed)
    results: list[list[BenchResult]] = [[] for _ in targets]
    for case in cases:
        ttfts: list[list[float]] = [[] for _ in targets]
        rates: list[list[float]] = [[] for _ in targets]
        steps_all: list[list[float]] = [[] for _ in targets]
        for i in range(warmup + repeats):
            prompt = rng.integers(0, vocab, case.prompt_tokens, dtype=np.int64)
            for k, target in enumerate(targets):
                ttft, steps = run_once(target.engine, prompt, case.new_tokens)
                if on_run is not None:
                    on_run(BenchRun(k, target.label, case, i, i < warmup))
                if i < warmup:
                    continue
                ttfts[k].append(ttft)
                steps_all[k] += steps
                if steps:
                    rates[k].append(len(steps) / sum(steps))
        rss = peak_rss_mb()
        for k, target in enumerate(targets):
            ttft = statistics.median(ttfts[k])
            kv = target.kv_bytes_per_token
            results[k].append(
                BenchResult(
                    prompt_tokens=case.prompt_tokens,
                    new_tokens=case.new_tokens,
                    runs=repeats,
                    ttft_ms=ttft * 1e3,
                    prefill_tokens_per_s=case.prompt_tokens / ttft,
                    decode_tokens_per_s=statistics.median(rates[k]) if rates[k] else float("nan"),
                    token_latency_ms_p10=_percentile(steps_all[k], 10) * 1e3,
                    token_latency_ms_p50=_percentile(steps_all[k], 50) * 1e3,
                    token_latency_ms_p90=_percentile(steps_all[k], 90) * 1e3,
                    peak_rss_mb=rss,
                    kv_cache_mb=None if kv is None else kv * (case.prompt_tokens + case.new_tokens) / 2**20,
                    **_spread(ttfts[k], case.prompt_tokens, rates[k]),
                )
            )
    return results


def bench(
    engine: Engine,
    cases: list[BenchCase],
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    on_run: Callable[[], None] | None = None,
) -> list[BenchResult]:
    """Measure every case ``repeats`` times after ``warmup`` unmeasured runs (one engine)."""
    callback = None if on_run is None else (lambda _run: on_run())
    return bench_many([BenchTarget("engine", engine)], cases, repeats, warmup, seed, callback)[0]


def plot(path: str | Path, series: Sequence[tuple[str, Sequence[BenchResult]]]) -> None:
    """Write decode tokens/s and TTFT against prompt length, one line per series, to ``path``.

    matplotlib (``pip install matplotlib``, the ``plot`` extra) is imported here, with the Agg backend.
    """
    mpl = require_matplotlib()
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_decode, ax_ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    try:
        for label, results in series:
            by_new: dict[int, list[BenchResult]] = {}
            for r in results:
                by_new.setdefault(r.new_tokens, []).append(r)
            for new, rs in by_new.items():
                rs = sorted(rs, key=lambda r: r.prompt_tokens)
                name = label if len(by_new) == 1 else f"{label} ({new} new)"
                x = [r.prompt_tokens for r in rs]
                ax_decode.plot(x, [r.decode_tokens_per_s for r in rs], marker="o", label=name)
                ax_ttft.plot(x, [r.ttft_ms for r in rs], marker="o", label=name)
        ax_decode.set(title="decode speed", xlabel="prompt tokens", ylabel="decode tokens/s")
        ax_ttft.set(title="time to first token", xlabel="prompt tokens", ylabel="TTFT ms")
        for ax in (ax_decode, ax_ttft):
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def require_matplotlib() -> Any:
    """Import matplotlib or raise a one-line :class:`OptionError` that says how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise OptionError("--plot needs matplotlib: pip install matplotlib (or qwen-export[plot])") from None
    return matplotlib
