"""``qwen-export bench``: parse the flags, show progress, print the report. Loading, planning and
measuring (interleaved), the plot and the JSON payload are :mod:`qwen_export.runtime.bench_run`'s."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from qwen_export.cli.common import (
    AttentionOpt,
    CacheDir,
    EngineOpt,
    Int8Prefill,
    KVCache,
    MaxDraftOpt,
    Precision,
    PrefillChunk,
    SpeculateOpt,
    app,
    console,
    err_console,
    handles_errors,
    runtime,
    speculation,
)

if TYPE_CHECKING:  # imported when a command runs: --help and the other commands start faster
    from qwen_export.runtime import bench_run
    from qwen_export.runtime.bench_run import BenchReport
    from qwen_export.runtime.bench_speculative import SpeculativeResult

Artifacts = Annotated[
    list[Path], typer.Argument(help="Exported artifact directories; the first is the baseline for ratios.")
]
PromptLengths = Annotated[str | None, typer.Option(help="Comma-separated prompt lengths in tokens (default 128).")]
NewTokens = Annotated[str, typer.Option(help="Comma-separated new-token counts.")]
Repeats = Annotated[int, typer.Option(help="Measured runs per case and artifact.")]
Warmup = Annotated[int, typer.Option(help="Unmeasured warm-up runs per case and artifact.")]
Seed = Annotated[int, typer.Option(help="Seed of the random prompts.")]
Sweep = Annotated[
    bool, typer.Option("--sweep", help="Context sweep: prompt lengths 128, 256, 512, ... up to --sweep-max.")
]
SweepMax = Annotated[
    int | None,
    typer.Option(help="Longest sweep prompt (default: min(8192, context - new tokens)); needs --sweep."),
]
Plot = Annotated[Path | None, typer.Option("--plot", help="Write decode tok/s and TTFT vs prompt length here (.png).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON (the same as --format json).")]
Format = Annotated[
    str,
    typer.Option("--format", help="table (default) | json | markdown | csv (one row per artifact and case)."),
]
ThreadList = Annotated[
    str,
    typer.Option(
        "--threads",
        help="Engine threads (0 = engine default); a comma-separated list (e.g. 1,2) loads every artifact once "
        "per count and runs them all interleaved.",
    ),
]


@app.command()
@handles_errors
def bench(
    artifacts: Artifacts,
    prompt_lengths: PromptLengths = None,
    new_tokens: NewTokens = "64",
    repeats: Repeats = 3,
    warmup: Warmup = 1,
    seed: Seed = 0,
    sweep: Sweep = False,
    sweep_max: SweepMax = None,
    plot: Plot = None,
    threads: ThreadList = "0",
    precision: Precision = None,
    kv_cache: KVCache = None,
    attention: AttentionOpt = None,
    cache_dir: CacheDir = None,
    engine: EngineOpt = None,
    prefill_chunk: PrefillChunk = None,
    int8_prefill: Int8Prefill = True,
    speculate: SpeculateOpt = None,
    max_draft_tokens: MaxDraftOpt = None,
    as_json: AsJson = False,
    output_format: Format = "table",
) -> None:
    """Measure TTFT, prefill and decode tokens/s, memory and load time of one or more ARTIFACTS.

    Artifacts load once up front, then run interleaved (A, B, A, B, ... on the same prompts) so ratios hold.
    With --speculate, each artifact also runs plain and speculative decoding interleaved: acceptance rate and
    speed-up (random prompts: prompt lookup's overhead on free text).
    """
    from qwen_export.runtime import bench_run

    spec = speculation(speculate, max_draft_tokens)
    settings = bench_run.bench_settings(
        prompt_lengths=prompt_lengths,
        new_tokens=new_tokens,
        repeats=repeats,
        warmup=warmup,
        seed=seed,
        sweep=sweep,
        sweep_max=sweep_max,
        plot=plot,
    )
    fmt = bench_run.BenchFormat.parse("json" if as_json else output_format)
    counts = [0] if threads.strip() == "0" else bench_run.int_list(threads, "--threads")
    bench_run.check_artifacts(artifacts)
    flags = (precision, kv_cache, cache_dir, engine, attention, prefill_chunk, int8_prefill)
    options = [runtime(n, *flags) for n in counts]
    targets, loads = [], []
    with err_console.status("loading artifacts") as status:
        for n, option in zip(counts, options, strict=True):
            suffix = f" @{n}t" if len(counts) > 1 else ""
            found, loaded = bench_run.load_targets(
                artifacts, option, lambda label: status.update(f"loading {label}"), label_suffix=suffix
            )
            targets += found
            loads += loaded
    prompts, cases = bench_run.plan_cases(settings, targets)
    report = _measure_with_progress(settings, targets, loads, prompts, cases)
    speculative = None if spec is None else _speculate(spec, targets, cases, settings, counts[0])
    if fmt is not bench_run.BenchFormat.TABLE:
        if fmt is bench_run.BenchFormat.JSON:
            payload = report.to_json()
            if speculative is not None:
                payload["speculation"] = bench_run.finite([dataclasses.asdict(r) for r in speculative])
            console.print_json(json.dumps(payload))
        else:
            text = report.to_markdown() if fmt is bench_run.BenchFormat.MARKDOWN else report.to_csv()
            sys.stdout.write(text)
        return
    console.print(_artifacts_table(report))
    console.print(_results_table(report))
    if speculative is not None:
        console.print(_speculation_table(speculative))
    console.print(
        f"peak RSS (VmHWM) of this process: {report.peak_rss_mb:.0f} MiB. All artifacts share one process, so "
        "their RSS peaks cannot be told apart; 'RSS +MiB at load' is the increase while each one loaded.",
        highlight=False,
    )
    if plot is not None:
        console.print(f"plot written to {plot}", highlight=False)


def _speculate(
    spec: object,
    targets: list[bench_run.BenchTarget],
    cases: list[bench_run.BenchCase],
    settings: bench_run.BenchSettings,
    threads: int,
) -> list[SpeculativeResult]:
    from qwen_export.runtime.bench_speculative import bench_speculation
    from qwen_export.runtime.loader import RuntimeOptions, open_artifact

    def open_draft(path: Path) -> object:
        return open_artifact(path, RuntimeOptions(threads=threads)).engine

    with err_console.status("speculative decoding vs plain"):
        return bench_speculation(
            [(t.label, t.engine) for t in targets],
            spec,  # type: ignore[arg-type]
            [(c.prompt_tokens, c.new_tokens) for c in cases],
            settings.repeats,
            settings.warmup,
            settings.seed,
            open_draft,  # type: ignore[arg-type]
        )


def _speculation_table(results: list[SpeculativeResult]) -> Table:
    table = Table(title="speculative decoding vs plain (greedy, same engine, interleaved; median (min-max))")
    headers = ["artifact", "prompt", "new", "plain tok/s", "speculative tok/s", "speed-up", "accepted", "tok/forward"]
    for column in headers + ["same tokens"]:
        table.add_column(column, justify="left" if column == "artifact" else "right", overflow="fold")
    for r in results:
        rate = "n/a" if r.acceptance_rate is None else f"{r.acceptance_rate:.0%}"
        table.add_row(
            r.label,
            str(r.prompt_tokens),
            str(r.new_tokens),
            f"{r.plain_tokens_per_s:.1f}",
            f"{r.speculative_tokens_per_s:.1f}",
            f"{r.speedup:.2f} ({r.speedup_min:.2f}-{r.speedup_max:.2f})",
            rate,
            f"{r.tokens_per_forward:.2f}",
            "yes" if r.identical else "NO",
        )
    return table


def _measure_with_progress(
    settings: bench_run.BenchSettings,
    targets: list[bench_run.BenchTarget],
    loads: list[bench_run.ArtifactLoad],
    prompts: list[int],
    cases: list[bench_run.BenchCase],
) -> BenchReport:
    """:func:`bench_run.measure` with a progress bar on stderr (one step per generation)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from qwen_export.runtime import bench_run

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task("benchmarking", total=bench_run.total_runs(settings, targets, cases))

        def advance(run: bench_run.BenchRun) -> None:
            kind = "warm-up" if run.warmup else "run"
            progress.update(
                task,
                advance=1,
                description=f"{run.label} {run.case.prompt_tokens}+{run.case.new_tokens} {kind} {run.round + 1}",
            )

        return bench_run.measure(settings, targets, loads, prompts, cases, on_run=advance)


def _artifacts_table(report: BenchReport) -> Table:
    table = Table(title="artifacts" + (" (run interleaved)" if len(report.loads) > 1 else ""))
    columns = ("artifact", "weights", "threads", "disk MiB", "load s", "RSS +MiB at load", "KV KiB/token")
    for column in (*columns, "weights MiB/token", "engine chose"):
        table.add_column(column, justify="left" if column == "artifact" else "right", overflow="fold")
    for info in report.loads:
        table.add_row(
            info.label,
            info.weights,
            str(info.threads or "default"),
            f"{info.disk_mb:.1f}",
            f"{info.load_s:.2f}",
            f"{info.rss_load_mb:.0f}",
            f"{info.kv_bytes_per_token / 1024:.1f}",
            f"{info.weight_bytes_per_token / 2**20:.1f}",
            ", ".join(f"{k}={v}" for k, v in info.kernels.items()) or "-",
        )
    return table


def _results_table(report: BenchReport) -> Table:
    from qwen_export.runtime.bench_run import pm, ratio

    settings, labels, base = report.settings, report.labels, report.results[0]
    many, sweep = len(labels) > 1, settings.sweep
    title = f"{'context sweep' if sweep else 'latency'}: {settings.repeats} run(s) after {settings.warmup} warm-up"
    title += " (median ± standard deviation over the runs)" if settings.repeats > 1 else ""
    if report.copy is not None:
        copy = report.copy
        title += (
            f"; machine copy bandwidth {copy.best_gbs:.1f} GB/s, read {copy.read_gbs:.1f} GB/s ({copy.threads} threads)"
        )
    table = Table(title=title + " per case")
    headers = ["artifact", "prompt", "new"] + (["KV cache MiB"] if sweep else [])
    headers += ["TTFT ms", "prefill tok/s", "decode tok/s", "p10/p50/p90 ms", "decode GB/s (of read)"]
    headers += ["decode × first", "TTFT × first"] if many else []
    for column in headers:
        table.add_column(column, justify="left" if column == "artifact" else "right", overflow="fold")
    for c in range(len(report.cases)):
        for k, label in enumerate(labels):
            r, b = report.results[k][c], base[c]
            row = [label, str(r.prompt_tokens), str(r.new_tokens)]
            row += [f"{r.kv_cache_mb:.2f}"] if sweep and r.kv_cache_mb is not None else ([""] if sweep else [])
            row += [
                pm(r.ttft_ms, r.ttft_ms_std, 1),
                pm(r.prefill_tokens_per_s, r.prefill_tokens_per_s_std, 1),
                pm(r.decode_tokens_per_s, r.decode_tokens_per_s_std, 1),
                f"{r.token_latency_ms_p10:.2f}/{r.token_latency_ms_p50:.2f}/{r.token_latency_ms_p90:.2f}",
                _bandwidth_cell(report.decode_bandwidth(report.loads[k], r)),
            ]
            if many:
                row += [
                    f"{ratio(r.decode_tokens_per_s, b.decode_tokens_per_s):.2f}",
                    f"{ratio(r.ttft_ms, b.ttft_ms):.2f}",
                ]
            table.add_row(*row, end_section=many and k == len(labels) - 1)
    return table


def _bandwidth_cell(measured: dict[str, float] | None) -> str:
    if measured is None:
        return "-"
    return f"{measured['achieved_gbs']:.2f} ({100 * measured.get('fraction_of_read', 0.0):.0f}%)"
