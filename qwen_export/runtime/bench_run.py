"""``qwen-export bench`` as a library: settings from plain option values, artifacts loaded, cases
planned and measured interleaved (:func:`~qwen_export.runtime.bench.bench_many`), one report.

The phases are separate so a caller can show progress around each (the CLI: a status line while
loading, a progress bar while measuring); :func:`run_bench` runs them all::

    settings = bench_settings(prompt_lengths="128,512", new_tokens="64", repeats=3)
    report = run_bench(["art-fp32", "art-int4"], settings)
    report.to_json()["artifacts"][1]["results"][0]["decode_vs_first"]
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qwen_export.errors import OptionError
from qwen_export.quant.scheme import describe_weights
from qwen_export.runtime import bandwidth
from qwen_export.runtime import bench as bench_mod
from qwen_export.runtime.bandwidth import CopyBandwidth
from qwen_export.runtime.bench import BenchCase, BenchResult, BenchRun, BenchTarget
from qwen_export.runtime.loader import RuntimeOptions

#: What ``peak_rss_mb`` and ``rss_load_mb`` mean when several artifacts share one process.
RSS_NOTE = (
    "all artifacts share one process, so their RSS peaks cannot be told apart: rss_load_mb is the RSS "
    "increase while each artifact loaded; peak_rss_mb is the process peak (VmHWM) over all of them"
)


class BenchFormat(enum.Enum):
    TABLE = "table"
    JSON = "json"
    MARKDOWN = "markdown"
    CSV = "csv"

    @classmethod
    def parse(cls, value: str) -> BenchFormat:
        try:
            return cls(value)
        except ValueError:
            raise OptionError(f"--format must be one of {', '.join(f.value for f in cls)}, got {value!r}") from None


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """A checked bench run: :func:`bench_settings` builds it."""

    prompt_lengths: tuple[int, ...] | None  # None: a context sweep (lengths chosen from the context)
    new_tokens: tuple[int, ...]
    repeats: int = 3
    warmup: int = 1
    seed: int = 0
    sweep: bool = False
    sweep_max: int | None = None  # None: min(SWEEP_DEFAULT_MAX, context - new tokens)
    plot: Path | None = None  # .png / .svg / .pdf of decode tok/s and TTFT against prompt length


@dataclasses.dataclass(frozen=True)
class ArtifactLoad:
    """How one artifact loaded (its JSON fields in this order)."""

    artifact: str
    label: str
    dtype: str
    weights: str  # the weight scheme, e.g. "int4 gptq b32 asym, embedding int8, fp32 activations"
    threads: int  # engine threads asked for (0: the engine's default)
    context: int
    load_s: float
    disk_mb: float
    rss_load_mb: float  # the RSS increase while it loaded
    kv_bytes_per_token: int
    weight_bytes_per_token: int = 0  # weights one decode step reads (bandwidth.decode_weight_bytes)
    kernels: dict[str, str] = dataclasses.field(default_factory=dict)  # what the engine chose


@dataclasses.dataclass(frozen=True)
class BenchReport:
    settings: BenchSettings
    loads: list[ArtifactLoad]
    prompt_lengths: list[int]  # the sweep's when settings.sweep
    cases: list[BenchCase]
    results: list[list[BenchResult]]  # results[artifact][case]
    peak_rss_mb: float  # the process peak (VmHWM), shared by every artifact
    copy: CopyBandwidth | None = None  # the machine's copy bandwidth, measured after the runs

    @property
    def labels(self) -> list[str]:
        return [load.label for load in self.loads]

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per artifact and case (llama-bench's table): what markdown and CSV show."""
        out = []
        for info, rs in zip(self.loads, self.results, strict=True):
            for r in rs:
                out.append(
                    {
                        "artifact": info.label,
                        "weights": info.weights,
                        "threads": info.threads,
                        "prompt": r.prompt_tokens,
                        "new": r.new_tokens,
                        "runs": r.runs,
                        "ttft_ms": r.ttft_ms,
                        "ttft_ms_std": r.ttft_ms_std,
                        "prefill_tok_s": r.prefill_tokens_per_s,
                        "prefill_tok_s_std": r.prefill_tokens_per_s_std,
                        "decode_tok_s": r.decode_tokens_per_s,
                        "decode_tok_s_std": r.decode_tokens_per_s_std,
                    }
                )
        return out

    def to_csv(self) -> str:
        """The rows as CSV (spreads in their own columns; empty when undefined: one run)."""
        import csv
        import io

        rows = self.rows()
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(v) for k, v in row.items()})
        return buffer.getvalue()

    def to_markdown(self) -> str:
        """The rows as a markdown table, figures as ``median ± std``."""
        header = ["artifact", "weights", "threads", "prompt", "new", "TTFT ms", "prefill tok/s", "decode tok/s"]
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * 5) + "|"]
        for row in self.rows():
            cells = [row["artifact"], row["weights"], str(row["threads"] or "default"), str(row["prompt"])]
            cells += [str(row["new"]), pm(row["ttft_ms"], row["ttft_ms_std"], 1)]
            cells += [pm(row["prefill_tok_s"], row["prefill_tok_s_std"], 1)]
            cells += [pm(row["decode_tok_s"], row["decode_tok_s_std"], 2)]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        """``qwen-export bench --json``'s payload (NaN and infinities as null: strict JSON)."""
        base = self.results[0]
        per_artifact = []
        for info, rs in zip(self.loads, self.results, strict=True):
            rows = []
            for r, b in zip(rs, base, strict=True):
                row = dataclasses.asdict(r)
                row["decode_vs_first"] = ratio(r.decode_tokens_per_s, b.decode_tokens_per_s)
                row["ttft_vs_first"] = ratio(r.ttft_ms, b.ttft_ms)
                row["decode_bandwidth"] = self.decode_bandwidth(info, r)
                rows.append(row)
            per_artifact.append({**dataclasses.asdict(info), "results": rows})
        settings = self.settings
        payload = {
            "machine": bench_mod.machine_info(),
            "artifacts": per_artifact,  # each artifact's results, listed once; ratios to the first
            "order": "interleaved",
            "repeats": settings.repeats,
            "warmup": settings.warmup,
            "seed": settings.seed,
            "sweep": settings.sweep,
            "prompt_lengths": self.prompt_lengths,
            "new_tokens": list(settings.new_tokens),
            "peak_rss_mb": self.peak_rss_mb,
            "rss_note": RSS_NOTE,
            "copy_bandwidth": None if self.copy is None else dataclasses.asdict(self.copy),
            "plot": None if settings.plot is None else str(settings.plot),
        }
        return finite(payload)

    def decode_bandwidth(self, info: ArtifactLoad, result: BenchResult) -> dict[str, Any] | None:
        """Decode's achieved bandwidth against the copy bandwidth (None: not measured / no decode)."""
        if (
            self.copy is None
            or not info.weight_bytes_per_token
            or result.decode_tokens_per_s != result.decode_tokens_per_s
        ):
            return None
        context = result.prompt_tokens + result.new_tokens // 2  # the average step's cache
        measured = bandwidth.decode_bandwidth(
            info.weight_bytes_per_token, info.kv_bytes_per_token, context, result.decode_tokens_per_s, self.copy
        )
        return dataclasses.asdict(measured)


def bench_settings(
    *,
    prompt_lengths: str | Sequence[int] | None = None,
    new_tokens: str | Sequence[int] = "64",
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    sweep: bool = False,
    sweep_max: int | None = None,
    plot: str | Path | None = None,
) -> BenchSettings:
    """Checked settings from ``qwen-export bench``'s option values (lengths comma-separated or as a
    list; ``prompt_lengths`` None: 128, or the sweep's). A ``plot`` needs matplotlib: checked here,
    before the long part. Raises OptionError."""
    news = int_list(new_tokens, "--new-tokens")
    if sweep_max is not None and not sweep:
        raise OptionError("--sweep-max needs --sweep")
    if sweep and prompt_lengths is not None:
        raise OptionError("--sweep chooses the prompt lengths itself; drop --prompt-lengths")
    if sweep_max is not None and sweep_max < 1:
        raise OptionError(f"--sweep-max must be >= 1, got {sweep_max}")
    prompts = None if sweep else int_list("128" if prompt_lengths is None else prompt_lengths, "--prompt-lengths")
    plot_path = Path(plot) if plot is not None else None
    if plot_path is not None:
        if plot_path.suffix.lower() not in (".png", ".svg", ".pdf"):
            raise OptionError(f"--plot must name a .png, .svg or .pdf file, got {str(plot)!r}")
        if not plot_path.parent.is_dir():
            raise OptionError(f"--plot: directory {str(plot_path.parent)!r} does not exist")
        bench_mod.require_matplotlib()
    return BenchSettings(
        prompt_lengths=None if prompts is None else tuple(prompts),
        new_tokens=tuple(news),
        repeats=repeats,
        warmup=warmup,
        seed=seed,
        sweep=sweep,
        sweep_max=sweep_max,
        plot=plot_path,
    )


def load_targets(
    artifacts: Sequence[str | Path],
    runtime: RuntimeOptions | None = None,
    on_load: Callable[[str], None] | None = None,
    label_suffix: str = "",
) -> tuple[list[BenchTarget], list[ArtifactLoad]]:
    """Open every artifact (``on_load(label)`` before each), timing the load and its RSS increase;
    ``label_suffix`` tells apart loads of one artifact with different runtime options (threads)."""
    from qwen_export.runtime.loader import open_artifact

    paths = check_artifacts(artifacts)
    found, loads = [], []
    for name, path in zip(labels(paths), paths, strict=True):
        label = name + label_suffix
        if on_load is not None:
            on_load(label)
        rss0 = bench_mod.current_rss_mb()
        t0 = time.perf_counter()
        loaded = open_artifact(path, runtime)
        load_s = time.perf_counter() - t0
        manifest = loaded.manifest
        kv_dtype = (manifest.extra.get("kv_cache") or {}).get("dtype")
        kv = bench_mod.kv_bytes_per_token(manifest.spec, manifest.dtype, kv_dtype)
        found.append(BenchTarget(label, loaded.engine, kv))
        loads.append(
            ArtifactLoad(
                artifact=str(path),
                label=label,
                dtype=manifest.dtype,
                weights=describe_weights(manifest.dtype, manifest.extra.get("quantization")),
                threads=runtime.threads if runtime is not None else 0,
                context=loaded.engine.capabilities.max_context,
                load_s=load_s,
                disk_mb=bench_mod.disk_mb(path),
                rss_load_mb=bench_mod.current_rss_mb() - rss0,
                kv_bytes_per_token=kv,
                weight_bytes_per_token=bandwidth.decode_weight_bytes(path, manifest),
                kernels=kernel_choices(loaded.engine),
            )
        )
    return found, loads


def kernel_choices(engine: Any) -> dict[str, str]:
    """What the engine chose for this CPU (its ``kernel_choices()``; {} for an engine without one)."""
    choices = getattr(engine, "kernel_choices", None)
    return {str(k): str(v) for k, v in choices().items()} if callable(choices) else {}


def check_artifacts(artifacts: Sequence[str | Path]) -> list[Path]:
    """The artifact paths; OptionError for one that is not a directory."""
    paths = [Path(a) for a in artifacts]
    for path in paths:
        if not path.is_dir():
            raise OptionError(f"{path} is not an artifact directory")
    return paths


def plan_cases(settings: BenchSettings, targets: Sequence[BenchTarget]) -> tuple[list[int], list[BenchCase]]:
    """The prompt lengths (a sweep's from the smallest context) and every case, checked against
    every target's context before anything runs."""
    news = list(settings.new_tokens)
    if settings.prompt_lengths is not None:
        prompts = list(settings.prompt_lengths)
    else:
        room = min(t.engine.capabilities.max_context for t in targets) - max(news)
        limit = min(bench_mod.SWEEP_DEFAULT_MAX, room) if settings.sweep_max is None else settings.sweep_max
        if limit < 1:
            raise OptionError(f"no room for a sweep: the context leaves {room} prompt tokens beside {max(news)} new")
        prompts = bench_mod.sweep_lengths(limit)
    cases = [BenchCase(p, n) for p in prompts for n in news]
    bench_mod.check_cases(targets, cases, settings.repeats, settings.warmup)
    return prompts, cases


def measure(
    settings: BenchSettings,
    targets: Sequence[BenchTarget],
    loads: list[ArtifactLoad],
    prompts: list[int],
    cases: list[BenchCase],
    on_run: Callable[[BenchRun], None] | None = None,
) -> BenchReport:
    """Run the cases interleaved; write the plot when the settings ask for one."""
    results = bench_mod.bench_many(targets, cases, settings.repeats, settings.warmup, settings.seed, on_run=on_run)
    peak = bench_mod.peak_rss_mb()
    copy = bandwidth.copy_bandwidth(threads=os.cpu_count() or 1)
    if settings.plot is not None:
        bench_mod.plot(settings.plot, list(zip([t.label for t in targets], results, strict=True)))
    return BenchReport(settings, loads, prompts, cases, results, peak, copy)


def total_runs(settings: BenchSettings, targets: Sequence[BenchTarget], cases: Sequence[BenchCase]) -> int:
    """How many generations :func:`measure` runs (warm-up included): what ``on_run`` will count to."""
    return len(cases) * (settings.repeats + settings.warmup) * len(targets)


def run_bench(
    artifacts: Sequence[str | Path],
    settings: BenchSettings,
    runtime: RuntimeOptions | None = None,
    on_load: Callable[[str], None] | None = None,
    on_run: Callable[[BenchRun], None] | None = None,
) -> BenchReport:
    """Load, plan and measure: ``qwen-export bench`` without the printing."""
    targets, loads = load_targets(artifacts, runtime, on_load)
    prompts, cases = plan_cases(settings, targets)
    return measure(settings, targets, loads, prompts, cases, on_run)


def labels(artifacts: Sequence[Path]) -> list[str]:
    """Short, distinct names for the artifacts (their directory names, or whole paths when those clash)."""
    names = [p.name or str(p) for p in artifacts]
    if len(set(names)) < len(names):
        names = [str(p) for p in artifacts]
    if len(set(names)) < len(names):
        names = [f"{i + 1}:{n}" for i, n in enumerate(names)]
    return names


def int_list(values: str | Sequence[int], what: str) -> list[int]:
    """Positive integers from a comma-separated string (or a list); OptionError naming ``what``."""
    text = values if isinstance(values, str) else ",".join(str(v) for v in values)
    try:
        numbers = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise OptionError(f"{what} must be a comma-separated list of integers, got {text!r}") from None
    if not numbers or any(v < 1 for v in numbers):
        raise OptionError(f"{what} must list positive integers, got {text!r}")
    return numbers


def pm(value: float, std: float, digits: int) -> str:
    """``value ± std`` (just ``value`` when the spread is undefined: one run)."""
    if not math.isfinite(std):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ± {std:.{digits}f}"


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    return value


def ratio(value: float, base: float) -> float:
    """``value / base``; NaN when either is NaN or ``base`` is 0."""
    return value / base if base and base == base and value == value else float("nan")


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None (strict JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value
