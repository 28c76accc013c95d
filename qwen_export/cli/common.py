"""What every command shares: the typer app, the consoles, error handling, the runtime and sampling
options, and the small printers (streamed text, parity tables, the KV-cache line).

Every deliberate error (:class:`QwenExportError`) is printed as one ``error: ...`` line on stderr
with exit status 2; no command leaves a half-written artifact behind.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from qwen_export import __version__
from qwen_export.artifact import Terminated
from qwen_export.errors import OptionError, QwenExportError

app = typer.Typer(
    name="qwen-export",
    help="Compile Qwen checkpoints into verified engines and run them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
# soft_wrap: a long line (paths, the export summary) is not broken at 80 columns in a pipe or a log
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])


def handles_errors(func: F) -> F:
    """Turn QwenExportError into a one-line message and exit status 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except QwenExportError as exc:
            # escaped: a message may hold brackets (pip extras, lists) that are not markup
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except Terminated:
            err_console.print("terminated", highlight=False)
            raise typer.Exit(143) from None
        except KeyboardInterrupt:
            err_console.print("interrupted", highlight=False)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        console.print(f"qwen-export {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Compile Qwen checkpoints into verified engines and run them."""


# ----------------------------------------------------------------------------- engine options
Threads = Annotated[int, typer.Option(help="Engine threads (0 = engine default).")]
Precision = Annotated[
    str | None,
    typer.Option(
        help="OpenVINO artifacts: inference precision auto (default: split for an int4/int8 artifact on a CPU "
        "with bf16 instructions, else f32) | f32 | bf16 | f16 | split (prompts in bf16, decode steps in f32, "
        "one u8 KV cache; paged attention; weights held twice)."
    ),
]
KVCache = Annotated[
    str | None,
    typer.Option(
        help="OpenVINO artifacts: KV-cache precision f32 (default, exact) | f16 | bf16 | u8 | auto (OpenVINO's "
        "own default, u8 on x86, as openvino-genai runs). ONNX Runtime artifacts take theirs at export "
        "(export --kv-cache int8)."
    ),
]
AttentionOpt = Annotated[
    str | None,
    typer.Option(
        help="OpenVINO artifacts: auto (default: paged, or stateful for a sliding-window model) | paged "
        "(rewritten at load to PagedAttention over a block cache, as openvino-genai runs it; at least as fast) "
        "| stateful (the IR as saved: SDPA with the cache in OpenVINO's state)."
    ),
]
CacheDir = Annotated[
    Path | None, typer.Option(help="OpenVINO artifacts: model cache directory (CACHE_DIR); later loads are fast.")
]
EngineOpt = Annotated[
    str | None,
    typer.Option(
        "--engine",
        help="Engine to run the artifact on (default: its target's). A --target tensorrt artifact also runs on "
        "onnxruntime: its standard-ONNX graph on the CPU, to verify it where TensorRT is absent.",
    ),
]

Int8Prefill = Annotated[
    bool,
    typer.Option(
        "--int8-prefill/--no-int8-prefill",
        help="ONNX Runtime artifacts exported with --prefill int8: run prompts on their int8 graph (default), "
        "or leave it unopened (its memory not spent; prompts about half as fast).",
    ),
]
PrefillChunk = Annotated[
    int | None,
    typer.Option(
        help="Longest piece of a prompt run at once (ONNX Runtime, OpenVINO; default 2048, 0 = the whole "
        "prompt): bounds a long prompt's activation memory."
    ),
]


SpeculateOpt = Annotated[
    str | None,
    typer.Option(
        "--speculate",
        help="Speculative decoding: prompt-lookup (copy n-grams of the prompt) | draft:DIR (a smaller artifact "
        "with the same tokenizer). Any artifact of this version (--logits last or all); greedy output is "
        "plain decoding's.",
    ),
]
MaxDraftOpt = Annotated[
    int | None, typer.Option("--max-draft-tokens", help="Speculative decoding: most draft tokens per forward (8).")
]


def speculation(speculate: str | None, max_draft_tokens: int | None) -> Any:
    """The Speculation the flags ask for (None: plain decoding)."""
    from qwen_export.runtime.speculative import Speculation

    if speculate is None:
        if max_draft_tokens is not None:
            raise OptionError("--max-draft-tokens needs --speculate prompt-lookup|draft:DIR")
        return None
    return Speculation.parse(speculate, 8 if max_draft_tokens is None else max_draft_tokens)


def runtime(
    threads: int,
    precision: str | None,
    kv_cache: str | None,
    cache_dir: Path | None,
    engine: str | None = None,
    attention: str | None = None,
    prefill_chunk: int | None = None,
    int8_prefill: bool = True,
) -> Any:
    """RuntimeOptions from the engine flags."""
    from qwen_export.runtime.llm import runtime_options

    return runtime_options(
        threads,
        precision,
        kv_cache,
        cache_dir,
        engine=engine,
        attention=attention,
        prefill_chunk=prefill_chunk,
        prefill_int8=int8_prefill,
    )


def load_llm(
    artifact: Path,
    threads: int,
    precision: str | None,
    kv_cache: str | None,
    cache_dir: Path | None,
    engine: str | None = None,
    attention: str | None = None,
    speculate: Any = None,
    prefill_chunk: int | None = None,
    int8_prefill: bool = True,
) -> Any:
    """The LLM over ``artifact``; ``speculate``: a Speculation (see :func:`speculation`) or None."""
    from qwen_export.runtime.llm import LLM, speculator
    from qwen_export.runtime.loader import open_artifact

    options = runtime(threads, precision, kv_cache, cache_dir, engine, attention, prefill_chunk, int8_prefill)
    loaded = open_artifact(artifact, options)
    return LLM(loaded, speculator(loaded, speculate, threads))


# ----------------------------------------------------------------------------- sampling options
MaxNew = Annotated[int, typer.Option(help="Maximum new tokens.")]
Temp = Annotated[float | None, typer.Option(help="Sampling temperature; 0 = greedy (default: generation_config).")]
TopK = Annotated[int | None, typer.Option(help="Top-k sampling (0 = off).")]
TopP = Annotated[float | None, typer.Option(help="Top-p (nucleus) sampling (1 = off).")]
MinP = Annotated[float | None, typer.Option(help="Min-p sampling (0 = off).")]
RepPen = Annotated[float | None, typer.Option(help="Repetition penalty (1 = off).")]
Seed = Annotated[int | None, typer.Option(help="Random seed for sampling.")]
Stop = Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")]
Think = Annotated[
    bool | None,
    typer.Option(
        "--think/--no-think",
        help="Qwen3: enable_thinking for the chat template (default: the template's own, thinking on for Qwen3).",
    ),
]


def sampling_options(
    max_new_tokens: int,
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    min_p: float | None,
    repetition_penalty: float | None,
    seed: int | None,
    stop: list[str] | None,
) -> dict[str, Any]:
    """The sampling keywords of ``LLM.stream``/``LLM.chat`` that were given (None: the artifact's default)."""
    options = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "min_p": min_p,
        "repetition_penalty": repetition_penalty,
        "seed": seed,
        "stop_strings": tuple(stop) if stop else None,
    }
    return {k: v for k, v in options.items() if v is not None}


# ----------------------------------------------------------------------------- input and output
MAX_JSON_FILE_BYTES = 16 << 20


def read_text(path: Path) -> str:
    """A UTF-8 text file's content; OptionError (one line) when it is missing or not UTF-8."""
    if not path.is_file():
        raise OptionError(f"{path}: text file not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise OptionError(f"{path}: not UTF-8 text") from None


def read_json(path: Path, what: str) -> Any:
    """A JSON file given on the command line: a regular file of at most 16 MiB, UTF-8, bounded depth
    and integers (:func:`qwen_export.runtime.jsonsafe.load_json_text`)."""
    from qwen_export.runtime.jsonsafe import load_json_text
    from qwen_export.safefs import read_regular

    data = read_regular(path, MAX_JSON_FILE_BYTES, OptionError)
    if data is None:
        raise OptionError(f"{path}: {what} file not found")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OptionError(f"{path}: {what} is not UTF-8 (byte {exc.start})") from None
    return load_json_text(text, f"{path}: {what}")


def print_stream(stream: Any) -> str:
    """Write a TextStream's pieces to stdout as they come; return the whole text."""
    pieces = []
    for piece in stream:
        pieces.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(pieces)


def print_parity(report: Any, title: str) -> None:
    table = Table(title=title)
    for column in ("metric", "value", "threshold"):
        table.add_column(column)
    for row in report.rows():
        table.add_row(*row)
    console.print(table)
    console.print("[green]PASS[/]" if report.passed else "[red]FAIL[/]")


def byte_progress() -> Any:
    """A transient progress bar on stderr for steps that report bytes written (export, convert-gguf);
    a step without a byte count (load, trace, passes) shows a spinner instead of ``0/? bytes``."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        ProgressColumn,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    class BytesOrSpinner(ProgressColumn):
        def __init__(self) -> None:
            super().__init__()
            self.bytes, self.spinner = DownloadColumn(), SpinnerColumn()

        def render(self, task: Any) -> Any:
            return self.spinner.render(task) if task.total is None else self.bytes.render(task)

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        BytesOrSpinner(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    )


def format_bytes(n: float) -> str:
    """``n`` bytes in KiB, MiB or GiB (one decimal)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def context_line(context: Any, kv: Any) -> str | None:
    """``context: 131072 tokens (the model's context; RoPE set at export: yarn factor 4), KV cache
    12.0 KiB per token`` from manifest.extra["context"] and ["kv_cache"]."""
    if not isinstance(context, dict) or not isinstance(context.get("max_length"), int):
        return None
    own = (
        "the model's context"
        if context.get("chosen_by") == "model"
        else f"--max-length; the model's context: {context.get('trained')}"
    )
    rope = context.get("rope_override")
    per_token = kv.get("bytes_per_token") if isinstance(kv, dict) else None
    kv_text = f", KV cache {format_bytes(per_token)} per token" if isinstance(per_token, int) else ""
    return f"context: {context['max_length']} tokens ({own}{f'; RoPE set at export: {rope}' if rope else ''}){kv_text}"


def kv_cache_line(kv: Any) -> str | None:
    """``KV cache: 4096 tokens x 12.0 KiB = 48.0 MiB per sequence ...`` from manifest.extra["kv_cache"]."""
    if not isinstance(kv, dict):
        return None
    capacity, per_token = kv.get("capacity"), kv.get("bytes_per_token")
    if not isinstance(capacity, int) or not isinstance(per_token, int):
        return None
    total = f"{capacity} tokens x {format_bytes(per_token)} = {format_bytes(capacity * per_token)} per sequence"
    layout = kv.get("layout")
    if layout == "shared":
        int8 = " in int8 (static per-channel scales calibrated at export)" if kv.get("dtype") == "int8" else ""
        return (
            f"KV cache: up to {total}{int8}, allocated as tokens arrive (one buffer shared by past and present, "
            "grown in steps)"
        )
    if layout == "concat":
        return f"KV cache: up to {total}, grown as tokens arrive (past and present concatenated)"
    if layout == "stateful":
        return (
            f"KV cache: up to {total} at fp32 (less with --kv-cache f16/u8), in blocks the engine grows "
            "(--attention paged, the default) or in OpenVINO's state (stateful)"
        )
    if layout == "fixed":
        return f"KV cache: {total}, fixed-capacity buffers updated in place (TensorScatter; past and present aliased)"
    return f"KV cache: {total} (layout {layout})"
