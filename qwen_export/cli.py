"""The ``qwen-export`` command line (typer). Thin: parse options, call the library, print.

Every deliberate error (:class:`QwenExportError`) is printed as one ``error: ...`` line on stderr
with exit status 2; no command leaves a half-written artifact behind.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from qwen_export import __version__
from qwen_export.artifact import Terminated
from qwen_export.errors import OptionError, QwenExportError
from qwen_export.spec import DType, LogitsMode, Target

app = typer.Typer(
    name="qwen-export",
    help="Compile Qwen checkpoints into verified engines and run them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def handles_errors(func: F) -> F:
    """Turn QwenExportError into a one-line message and exit status 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except QwenExportError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
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


# ----------------------------------------------------------------------------- export


def _byte_progress() -> Any:
    """A transient progress bar on stderr for steps that report bytes written (export, convert-gguf)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    )


@app.command()
@handles_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(help="Hugging Face checkpoint directory (config.json, *.safetensors).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Artifact directory to create.")],
    target: Annotated[
        str,
        typer.Option(
            help="Engine: onnxruntime | openvino (a stateful OpenVINO IR plus tokenizer IR, loadable by "
            "openvino-genai) | tensorrt (standard-ONNX graph with fixed-capacity KV buffers and a build recipe; "
            "build the engine on the GPU with qwen-export build-engine)."
        ),
    ] = "onnxruntime",
    dtype: Annotated[
        str | None, typer.Option(help="Activation (and unquantized weight) precision: fp32 | fp16 (default fp32).")
    ] = None,
    logits: Annotated[str, typer.Option(help="Logits for the last position or all positions: last | all.")] = "last",
    max_length: Annotated[
        int | None, typer.Option(help="Context the artifact is built for (default: config, capped at 4096).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUTPUT if it exists.")] = False,
    fuse: Annotated[
        bool,
        typer.Option(
            help="--target onnxruntime: fuse RMSNorm and attention into ONNX Runtime's contrib ops "
            "(SimplifiedLayerNormalization, GroupQueryAttention with rotary, packed QKV, one preallocated KV "
            "buffer); --no-fuse keeps plain ONNX ops and a KV cache that grows by concatenation. OpenVINO "
            "fuses itself when it compiles."
        ),
    ] = True,
    strict: Annotated[
        bool,
        typer.Option(
            help="Fail when a fusion matches fewer times than the architecture requires; --no-strict exports "
            "what did fuse and leaves the rest unfused."
        ),
    ] = True,
    explain: Annotated[
        bool, typer.Option("--explain", help="Print why the nearest match of each fusion rule failed (stderr).")
    ] = False,
    dump_dir: Annotated[
        Path | None, typer.Option(help="Write the model after each export phase into this directory (debugging).")
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            help="Weight precision: fp32 | fp16 (the same as --dtype) | int8 | int4 (blockwise quantized linear "
            "weights; the embedding and a tied lm_head in int8; activations in --dtype)."
        ),
    ] = None,
    block_size: Annotated[
        int | None,
        typer.Option(
            help="Quantization block size: 32 | 64 | 128 (default 32) | 0 = per output channel (--target openvino "
            "or tensorrt; tensorrt quantizes int8 per channel anyway)."
        ),
    ] = None,
    symmetric: Annotated[
        bool | None,
        typer.Option(
            "--symmetric/--asymmetric", help="Quantize with zero point 0 (default) or a zero point per block."
        ),
    ] = None,
    algorithm: Annotated[
        str | None,
        typer.Option(help="Quantization algorithm: rtn (default) | clip | awq (calibrated on --calibration)."),
    ] = None,
    keep: Annotated[
        str | None, typer.Option(help="Tensors kept in --dtype, comma-separated: embedding, lm_head.")
    ] = None,
    keep_layers: Annotated[
        str | None, typer.Option(help="Layer indices kept in --dtype, comma-separated (e.g. 0,23).")
    ] = None,
    accuracy_level: Annotated[
        int | None,
        typer.Option(
            help="MatMulNBits activation accuracy: 0 unset | 1 fp32 | 2 fp16 | 3 bf16 | 4 int8 (default 4, fastest)."
        ),
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option(help="--algorithm awq: calibration text file (UTF-8); default: a built-in code and prose text."),
    ] = None,
    embedding_bits: Annotated[
        int | None,
        typer.Option(
            help="Bits of the quantized embedding (and a tied lm_head that shares it): 8 (default) | 4 "
            "(smaller; RTN at --block-size)."
        ),
    ] = None,
    max_batch: Annotated[
        int | None,
        typer.Option(help="--target tensorrt: largest batch of the engine's optimization profiles (default 1)."),
    ] = None,
) -> None:
    """Export CHECKPOINT to an engine artifact in OUTPUT (written atomically)."""
    from qwen_export.export.pipeline import ExportOptions

    if explain and not fuse:
        raise OptionError("--explain reports on the fusion passes; it cannot be combined with --no-fuse")
    if dump_dir is not None and dump_dir.exists() and not dump_dir.is_dir():
        raise OptionError(f"--dump-dir {str(dump_dir)!r} exists and is not a directory")
    engine_target = Target.parse(target, "target")
    act_dtype, quant = _weight_options(
        weights, dtype, block_size, symmetric, algorithm, keep, keep_layers, accuracy_level, embedding_bits
    )
    if (checkpoint / "config.json").is_file():
        quant = _prequantized_default(checkpoint, weights, quant, block_size, symmetric)
    if engine_target is Target.TENSORRT:
        quant = _tensorrt_weights(quant, symmetric, embedding_bits, accuracy_level)
    elif max_batch is not None:
        raise OptionError("--max-batch applies to --target tensorrt only")
    options = ExportOptions(
        target=engine_target,
        max_batch=1 if max_batch is None else max_batch,
        dtype=act_dtype,
        logits=LogitsMode.parse(logits, "logits mode"),
        max_length=max_length,
        overwrite=overwrite,
        fuse=fuse,
        strict=strict,
        explain=explain,
        dump_dir=dump_dir,
        quant=quant,
        accuracy_level=4 if accuracy_level is None else accuracy_level,
        calibration=calibration,
    )
    manifest = _export_with_progress(checkpoint, output, options)
    size = sum(p.stat().st_size for p in output.iterdir() if p.is_file())
    quantized = manifest.extra.get("quantization")
    precision = manifest.dtype if not quantized else f"{quantized['weights']} weights, {manifest.dtype} activations"
    console.print(
        f"[green]exported[/] {checkpoint} -> {output}  ({manifest.target}, {precision}, "
        f"{size / 2**20:.1f} MiB, context {manifest.extra.get('max_length')})"
    )
    kv_line = _kv_cache_line(manifest.extra.get("kv_cache"))
    if kv_line is not None:
        console.print(kv_line, highlight=False, soft_wrap=True)
    if dump_dir is not None:
        console.print(f"intermediate models written to {dump_dir}", highlight=False)


def _tensorrt_weights(
    quant: Any, symmetric: bool | None, embedding_bits: int | None, accuracy_level: int | None
) -> Any:
    """--target tensorrt: refuse the options TensorRT cannot honour; a pre-quantized asymmetric
    (AWQ) checkpoint is requantized symmetric unless --asymmetric was asked for (then the export
    refuses it: TensorRT needs zero points of zero)."""
    if embedding_bits is not None:
        raise OptionError("--embedding-bits: the TensorRT target keeps the embedding in --dtype (no quantized Gather)")
    if accuracy_level is not None:
        raise OptionError("--accuracy-level applies to ONNX Runtime's MatMulNBits, not to --target tensorrt")
    if quant is not None and not quant.symmetric and symmetric is None:
        err_console.print(
            "--target tensorrt: the checkpoint's asymmetric quantization is requantized symmetric (TensorRT needs "
            "zero points of zero)",
            highlight=False,
        )
        return dataclasses.replace(quant, symmetric=True)
    return quant


def _prequantized_default(
    checkpoint: Path, weights: str | None, quant: Any, block_size: int | None, symmetric: bool | None
) -> Any:
    """A pre-quantized (AWQ/GPTQ) checkpoint keeps its own quantization: with no --weights, its
    bits and group size; with --weights of its bits, its group size and symmetry unless given."""
    from qwen_export.errors import QwenExportError
    from qwen_export.quant.prequant import default_scheme
    from qwen_export.spec import ModelSpec

    try:
        ModelSpec.from_config_file(checkpoint / "config.json")
    except QwenExportError:
        return quant  # a defective config.json: the export reports it with its own message
    own = default_scheme(checkpoint)
    if own is None:
        return quant
    if weights is None:
        return own
    if quant is not None and quant.fmt is own.fmt:
        return dataclasses.replace(
            quant,
            block_size=own.block_size if block_size is None else quant.block_size,
            symmetric=own.symmetric if symmetric is None else quant.symmetric,
        )
    return quant


def _weight_options(
    weights: str | None,
    dtype: str | None,
    block_size: int | None,
    symmetric: bool | None,
    algorithm: str | None,
    keep: str | None,
    keep_layers: str | None,
    accuracy_level: int | None,
    embedding_bits: int | None = None,
) -> tuple[DType, Any]:
    """``(activation dtype, QuantScheme or None)`` from the export's precision options."""
    from qwen_export.quant.scheme import Keep, QuantAlgorithm, QuantScheme, WeightFormat

    fmt = _parse_enum(WeightFormat, weights, "--weights") if weights is not None else None
    act = DType.parse(dtype, "dtype") if dtype is not None else None
    if fmt is not None and fmt.bits is None:  # --weights fp32/fp16 is --dtype
        same = DType.parse(fmt.value, "dtype")
        if act is not None and act is not same:
            raise OptionError(f"--weights {fmt.value} contradicts --dtype {act.value}")
        act, fmt = same, None
    act = act or DType.FP32
    given = {
        "--block-size": block_size,
        "--symmetric/--asymmetric": symmetric,
        "--algorithm": algorithm,
        "--keep": keep,
        "--keep-layers": keep_layers,
        "--accuracy-level": accuracy_level,
        "--embedding-bits": embedding_bits,
    }
    if fmt is None:
        extra = [name for name, value in given.items() if value is not None]
        if extra:
            raise OptionError(f"{', '.join(extra)} only apply to quantized weights (--weights int8 or int4)")
        return act, None
    scheme = QuantScheme(
        fmt=fmt,
        block_size=32 if block_size is None else block_size,
        symmetric=True if symmetric is None else symmetric,
        algorithm=_parse_enum(QuantAlgorithm, algorithm, "--algorithm") if algorithm else QuantAlgorithm.RTN,
        keep=frozenset(_parse_enum(Keep, k.strip(), "--keep") for k in (keep or "").split(",") if k.strip()),
        keep_layers=frozenset(_index_list(keep_layers, "--keep-layers")) if keep_layers else frozenset(),
        embedding_bits=8 if embedding_bits is None else embedding_bits,
    )
    if embedding_bits is not None and Keep.EMBEDDING in scheme.keep:
        raise OptionError("--embedding-bits contradicts --keep embedding (the embedding would stay unquantized)")
    if accuracy_level is not None and accuracy_level not in range(5):
        raise OptionError(f"--accuracy-level must be 0, 1, 2, 3 or 4, got {accuracy_level}")
    return act, scheme


def _parse_enum(enum_cls: Any, value: str, option: str) -> Any:
    try:
        return enum_cls(value.strip().lower())
    except ValueError:
        choices = " | ".join(m.value for m in enum_cls)
        raise OptionError(f"{option} must be one of {choices}, got {value!r}") from None


def _index_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise OptionError(f"{what} must be a comma-separated list of layer indices, got {text!r}") from None
    if any(v < 0 for v in values):
        raise OptionError(f"{what} must list non-negative layer indices, got {text!r}")
    return values


def _bytes(n: float) -> str:
    """``n`` bytes in KiB, MiB or GiB (one decimal)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def _kv_cache_line(kv: Any) -> str | None:
    """``KV cache: 4096 tokens x 12.0 KiB = 48.0 MiB per sequence ...`` from manifest.extra["kv_cache"]."""
    if not isinstance(kv, dict):
        return None
    capacity, per_token = kv.get("capacity"), kv.get("bytes_per_token")
    if not isinstance(capacity, int) or not isinstance(per_token, int):
        return None
    total = f"{capacity} tokens x {_bytes(per_token)} = {_bytes(capacity * per_token)} per sequence"
    layout = kv.get("layout")
    if layout == "shared":
        return f"KV cache: {total}, preallocated (one buffer shared by past and present)"
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


def _export_with_progress(checkpoint: Path, output: Path, options: Any) -> Any:
    from qwen_export.export.pipeline import ExportHooks
    from qwen_export.export.pipeline import export as run_export

    steps = {
        "load": "reading checkpoint",
        "calibrate": "calibrating (AWQ)",
        "trace": "tracing",
        "passes": "graph passes",
        "emit": "writing weights",
    }
    with _byte_progress() as progress:
        task = progress.add_task("starting", total=None)

        def step(name: str) -> None:
            progress.update(task, description=steps.get(name, name), completed=0, total=None)

        def write(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        def message(text: str) -> None:  # e.g. --explain's reports: above the progress bar, on stderr
            end = "" if text.endswith("\n") else "\n"
            progress.console.print(text, end=end, markup=False, highlight=False, soft_wrap=True)

        return run_export(checkpoint, output, options, ExportHooks(step=step, write_progress=write, message=message))


@app.command("build-engine")
@handles_errors
def build_engine(
    artifact: Annotated[Path, typer.Argument(help="A --target tensorrt artifact directory.")],
    max_batch: Annotated[int | None, typer.Option(help="Largest batch (default: the export's recipe).")] = None,
    max_prompt: Annotated[
        int | None, typer.Option(help="Longest prompt run in one prefill (default: the KV capacity).")
    ] = None,
    workspace_mib: Annotated[int | None, typer.Option(help="Builder workspace in MiB (default 4096).")] = None,
    optimization_level: Annotated[
        int, typer.Option(help="TensorRT builder optimization level 0 (fast build) .. 5 (best engine).")
    ] = 3,
    timing_cache: Annotated[bool, typer.Option(help="Reuse and update engines/timing.cache (faster rebuilds).")] = True,
    device: Annotated[int, typer.Option(help="CUDA device index to build for.")] = 0,
) -> None:
    """Build the TensorRT engine of ARTIFACT for this machine's GPU (engines/<gpu>-<trt>.plan).

    Engines are specific to the GPU and the TensorRT version; run this where the engine will run.
    """
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from qwen_export.targets.tensorrt.engine import BuildOptions
    from qwen_export.targets.tensorrt.engine import build_engine as build

    options = BuildOptions(
        max_batch=max_batch,
        max_prompt=max_prompt,
        workspace=None if workspace_mib is None else workspace_mib << 20,
        timing_cache=timing_cache,
        optimization_level=optimization_level,
        device=device,
    )
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task("building TensorRT engine", total=4)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        plan = build(artifact, options, progress, message=lambda text: bar.console.print(text, highlight=False))
    console.print(f"[green]built[/] {plan}", highlight=False)


@app.command("convert-gguf")
@handles_errors
def convert_gguf(
    gguf_file: Annotated[Path, typer.Argument(help="llama.cpp GGUF file of a Qwen2/2.5 or Qwen3 model.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Checkpoint directory to create.")],
    dtype: Annotated[str, typer.Option(help="Precision of the written weights: bf16 | fp16 | fp32.")] = "bf16",
    tokenizer_dir: Annotated[
        Path | None,
        typer.Option(help="Directory with the model's tokenizer.json (default: the bundled Qwen tokenizer)."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUTPUT if it is an existing checkpoint.")] = False,
) -> None:
    """Convert a GGUF file into a Hugging Face checkpoint directory (written atomically) for `export`."""
    from qwen_export.export.gguf_import import convert_gguf as run_convert

    t0 = time.perf_counter()
    with _byte_progress() as progress:
        task = progress.add_task("reading GGUF", total=None)
        run_convert(
            gguf_file,
            output,
            dtype=dtype,
            tokenizer_dir=tokenizer_dir,
            overwrite=overwrite,
            progress=lambda done, total: progress.update(task, description="dequantizing", completed=done, total=total),
        )
    size = sum(p.stat().st_size for p in output.iterdir() if p.is_file())
    console.print(
        f"[green]converted[/] {gguf_file} -> {output}  ({dtype}, {size / 2**20:.1f} MiB, "
        f"{time.perf_counter() - t0:.1f} s)"
    )


# ----------------------------------------------------------------------------- generate / chat
def _sampling_options(
    max_new_tokens: int,
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    min_p: float | None,
    repetition_penalty: float | None,
    seed: int | None,
    stop: list[str] | None,
) -> dict[str, Any]:
    return {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "min_p": min_p,
        "repetition_penalty": repetition_penalty,
        "seed": seed,
        "stop_strings": tuple(stop) if stop else None,
    }


MaxNew = Annotated[int, typer.Option(help="Maximum new tokens.")]
Temp = Annotated[float | None, typer.Option(help="Sampling temperature; 0 = greedy (default: generation_config).")]
TopK = Annotated[int | None, typer.Option(help="Top-k sampling (0 = off).")]
TopP = Annotated[float | None, typer.Option(help="Top-p (nucleus) sampling (1 = off).")]
MinP = Annotated[float | None, typer.Option(help="Min-p sampling (0 = off).")]
RepPen = Annotated[float | None, typer.Option(help="Repetition penalty (1 = off).")]
Seed = Annotated[int | None, typer.Option(help="Random seed for sampling.")]
Stop = Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")]
Threads = Annotated[int, typer.Option(help="Engine threads (0 = engine default).")]
Precision = Annotated[
    str | None, typer.Option(help="OpenVINO artifacts: inference precision f32 (default) | bf16 | f16.")
]
KVCache = Annotated[
    str | None,
    typer.Option(
        help="OpenVINO artifacts: KV-cache precision f32 (default, exact) | f16 | bf16 | u8 | auto (OpenVINO's "
        "own default, u8 on x86, as openvino-genai runs)."
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


def _runtime(
    threads: int,
    precision: str | None,
    kv_cache: str | None,
    cache_dir: Path | None,
    engine: str | None = None,
    attention: str | None = None,
) -> Any:
    from qwen_export.runtime.llm import runtime_options

    return runtime_options(threads, precision, kv_cache, cache_dir, engine=engine, attention=attention)


@app.command()
@handles_errors
def generate(
    artifact: Annotated[Path, typer.Argument(help="Exported artifact directory.")],
    prompt: Annotated[str, typer.Argument(help="Prompt text (a user message unless --raw).")],
    raw: Annotated[bool, typer.Option(help="Feed PROMPT as is, without the chat template.")] = False,
    system: Annotated[str | None, typer.Option(help="System prompt (chat template).")] = None,
    json_schema: Annotated[
        Path | None, typer.Option(help="JSON Schema file: the output is constrained to validate against it.")
    ] = None,
    json_mode: Annotated[bool, typer.Option(help="Constrain the output to be a JSON object.")] = False,
    max_new_tokens: MaxNew = 128,
    temperature: Temp = None,
    top_k: TopK = None,
    top_p: TopP = None,
    min_p: MinP = None,
    repetition_penalty: RepPen = None,
    seed: Seed = None,
    stop: Stop = None,
    threads: Threads = 0,
    precision: Precision = None,
    kv_cache: KVCache = None,
    attention: AttentionOpt = None,
    cache_dir: CacheDir = None,
    engine: EngineOpt = None,
) -> None:
    """Generate a completion for PROMPT, streamed to the terminal."""

    llm = _load_llm(artifact, threads, precision, kv_cache, cache_dir, engine, attention)
    sampling = _sampling_options(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop)
    response_format = _response_format(json_schema, json_mode)
    if raw:
        source: Any = prompt
    else:
        source = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    stream = llm.stream(source, response_format=response_format, **_given(sampling))
    _print_stream(stream)
    result = stream.result
    assert result is not None
    err_console.print(
        f"[dim]{result.prompt_tokens} prompt + {result.completion_tokens} new tokens, "
        f"finish: {result.finish_reason.value}, TTFT {result.timings.time_to_first_token_s * 1e3:.0f} ms, "
        f"decode {result.decode_tokens_per_s or 0:.1f} tok/s[/]",
        highlight=False,
    )


def _load_llm(
    artifact: Path,
    threads: int,
    precision: str | None,
    kv_cache: str | None,
    cache_dir: Path | None,
    engine: str | None = None,
    attention: str | None = None,
) -> Any:
    from qwen_export.runtime.llm import LLM
    from qwen_export.runtime.loader import open_artifact

    return LLM(open_artifact(artifact, _runtime(threads, precision, kv_cache, cache_dir, engine, attention)))


def _given(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None}


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise OptionError(f"{path}: {what} file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OptionError(f"{path}: {what} is not valid UTF-8 JSON ({exc})") from None


def _response_format(json_schema: Path | None, json_mode: bool) -> dict[str, Any] | None:
    if json_schema is not None and json_mode:
        raise OptionError("pass either --json-schema or --json-mode, not both")
    if json_schema is not None:
        schema = _read_json(json_schema, "JSON Schema")
        return {"type": "json_schema", "json_schema": {"name": json_schema.stem, "schema": schema}}
    return {"type": "json_object"} if json_mode else None


def _print_stream(stream: Any) -> str:
    """Write a TextStream's pieces to stdout as they come; return the whole text."""
    pieces = []
    for piece in stream:
        pieces.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(pieces)


@app.command()
@handles_errors
def chat(
    artifact: Annotated[Path, typer.Argument(help="Exported artifact directory.")],
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    tools: Annotated[
        Path | None, typer.Option(help="JSON file with a list of tools (OpenAI function specs) the model may call.")
    ] = None,
    max_new_tokens: MaxNew = 256,
    temperature: Temp = None,
    top_k: TopK = None,
    top_p: TopP = None,
    min_p: MinP = None,
    repetition_penalty: RepPen = None,
    seed: Seed = None,
    threads: Threads = 0,
    precision: Precision = None,
    kv_cache: KVCache = None,
    attention: AttentionOpt = None,
    cache_dir: CacheDir = None,
    engine: EngineOpt = None,
) -> None:
    """Interactive multi-turn chat; earlier turns stay in the KV cache. Commands: /reset, /exit.

    With --tools, the model's tool calls are printed as JSON and you type each tool's result.
    """

    tool_specs = _read_json(tools, "tools") if tools is not None else None
    if tool_specs is not None and not isinstance(tool_specs, list):
        raise OptionError(f"{tools}: expected a JSON list of tool specs")
    llm = _load_llm(artifact, threads, precision, kv_cache, cache_dir, engine, attention)
    sampling = _given(
        _sampling_options(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, None)
    )
    start: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    err_console.print("[dim]chat: /reset starts over, /exit or Ctrl-D quits[/]")
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages = list(start)
            llm.reset()
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        if tool_specs is None:  # plain chat: stream the reply as it is generated
            stream = llm.stream(messages, **sampling)
            messages.append({"role": "assistant", "content": _print_stream(stream)})
            assert stream.result is not None
            err_console.print(
                f"[dim]({stream.result.reused_tokens} of {stream.result.prompt_tokens} prompt tokens reused "
                "from the cache)[/]",
                highlight=False,
            )
            continue
        while True:  # one user turn may take several assistant turns when tools are called
            result = llm.chat(messages, tools=tool_specs, **sampling)
            console.print(result.text, highlight=False, markup=False)
            messages.append(result.message())
            err_console.print(
                f"[dim]({result.reused_tokens} of {result.prompt_tokens} prompt tokens reused from the cache)[/]",
                highlight=False,
            )
            for call in result.tool_calls:
                shown = (
                    {"name": call.name, "arguments": call.arguments}
                    if call.error is None
                    else {"error": call.error, "raw": call.raw}
                )
                console.print_json(json.dumps({"tool_call": shown}))
            good = [c for c in result.tool_calls if c.error is None]
            if not good:
                break
            try:
                for call in good:
                    messages.append({"role": "tool", "name": call.name, "content": input(f"{call.name} result> ")})
            except EOFError:
                return


# ----------------------------------------------------------------------------- check
@app.command()
@handles_errors
def check(
    artifact: Annotated[Path, typer.Argument(help="Exported artifact directory.")],
    reference: Annotated[Path, typer.Option(help="Source checkpoint (transformers runs it as the reference).")],
    text: Annotated[Path | None, typer.Option(help="UTF-8 text file to evaluate on (default: built-in).")] = None,
    max_tokens: Annotated[int, typer.Option(help="Evaluate at most this many tokens of the text.")] = 128,
    greedy_tokens: Annotated[int, typer.Option(help="Greedy continuation length compared.")] = 16,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    threads: Threads = 0,
    precision: Precision = None,
    kv_cache: KVCache = None,
    attention: AttentionOpt = None,
    cache_dir: CacheDir = None,
    engine: EngineOpt = None,
) -> None:
    """Compare ARTIFACT with transformers on REFERENCE; exit 1 past the precision's thresholds."""
    from qwen_export.export import parity
    from qwen_export.runtime.loader import open_artifact

    if max_tokens < 2 or greedy_tokens < 1:
        raise OptionError("--max-tokens must be >= 2 and --greedy-tokens >= 1")
    loaded = open_artifact(artifact, _runtime(threads, precision, kv_cache, cache_dir, engine, attention))
    if text is not None:
        if not text.is_file():
            raise OptionError(f"{text}: text file not found")
        try:
            content = text.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise OptionError(f"{text}: not UTF-8 text") from None
    else:
        content = parity.DEFAULT_TEXT
    ids = loaded.tokenizer.encode(content)[:max_tokens]
    report = parity.check(
        loaded.engine,
        parity.Reference(reference),
        ids,
        DType.parse(loaded.manifest.dtype),
        greedy_tokens,
        quantization=loaded.manifest.extra.get("quantization"),
    )
    if as_json:
        console.print_json(json.dumps(parity.to_dict(report)))
    else:
        quantized = loaded.manifest.extra.get("quantization")
        precision = loaded.manifest.dtype + (f", {quantized['weights']} weights" if quantized else "")
        _print_parity(report, f"parity: {artifact} vs transformers ({precision})")
    if not report.passed:
        err_console.print(f"[bold red]parity FAILED:[/] {'; '.join(report.failures)}", highlight=False)
        raise typer.Exit(1)


def _print_parity(report: Any, title: str) -> None:
    table = Table(title=title)
    for column in ("metric", "value", "threshold"):
        table.add_column(column)
    for row in report.rows():
        table.add_row(*row)
    console.print(table)
    console.print("[green]PASS[/]" if report.passed else "[red]FAIL[/]")


# ----------------------------------------------------------------------------- inspect
@app.command()
@handles_errors
def inspect(
    artifact: Annotated[Path, typer.Argument(help="Exported artifact directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show an artifact's IO signature, op histogram, sizes and manifest."""
    from qwen_export.artifact import load_manifest
    from qwen_export.runtime.inspection import describe

    manifest = load_manifest(artifact, verify=True)
    info = describe(artifact, manifest)
    if as_json:
        console.print_json(json.dumps(info))
        return
    spec = manifest.spec
    console.print(
        f"[bold]{artifact}[/]  target={manifest.target} dtype={manifest.dtype} logits={manifest.logits} "
        f"schema={manifest.schema_version} qwen-export {manifest.qwen_export_version}"
    )
    console.print(
        f"model: {spec['architecture']} layers={spec['num_hidden_layers']} hidden={spec['hidden_size']} "
        f"heads={spec['num_attention_heads']}/{spec['num_key_value_heads']} head_dim={spec['head_dim']} "
        f"vocab={spec['vocab_size']} tied={spec['tie_word_embeddings']} context={manifest.extra.get('max_length')}"
    )
    io = Table(title="IO signature")
    for column in ("direction", "name", "dtype", "shape"):
        io.add_column(column)
    for direction in ("inputs", "outputs"):
        items = list(manifest.io.get(direction, {}).items())
        shown = (
            items
            if len(items) <= 8
            else items[:5] + [("…", {"dtype": "", "shape": f"{len(items) - 6} more"})] + items[-1:]
        )
        for name, v in shown:
            io.add_row(direction, name, str(v.get("dtype")), str(v.get("shape")))
    console.print(io)
    ops = Table(title=f"op histogram ({info['nodes']} nodes)")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, n in info["ops"].items():
        ops.add_row(op, str(n))
    console.print(ops)
    files = Table(title="files")
    files.add_column("file")
    files.add_column("MiB", justify="right")
    for name, size in info["files"].items():
        files.add_row(name, f"{size / 2**20:.2f}")
    console.print(files)
    for record in info["passes"]:  # one line per pass, never wrapped (grep-friendly)
        console.print(
            f"pass {record['name']}: nodes {record['nodes']}, fired: {record['rules']}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    kv_line = _kv_cache_line(manifest.extra.get("kv_cache"))
    console.print(kv_line or "KV cache: not recorded in manifest.json", highlight=False, soft_wrap=True)
    if info.get("genai") is not None:
        genai = info["genai"]
        console.print(
            f"onnxruntime-genai: genai_config.json (type {genai['type']}, max_length {genai['max_length']}, "
            f"past_present_share_buffer={str(genai['past_present_share_buffer']).lower()})",
            highlight=False,
            soft_wrap=True,
        )
    recipe = manifest.extra.get("tensorrt")
    if isinstance(recipe, dict):
        engines = sorted(p.name for p in (artifact / "engines").glob("*.plan")) or ["none (run build-engine)"]
        console.print(
            f"tensorrt: profiles {[p.get('name') for p in recipe.get('profiles', [])]}, max batch "
            f"{recipe.get('max_batch')}, max prompt {recipe.get('max_prompt')}, strongly typed "
            f"{recipe.get('strongly_typed')}; engines built: {', '.join(engines)}",
            highlight=False,
            soft_wrap=True,
        )
    console.print(f"packages: {manifest.packages}")


# ----------------------------------------------------------------------------- bench
def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise OptionError(f"{what} must be a comma-separated list of integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise OptionError(f"{what} must list positive integers, got {text!r}")
    return values


def _bench_labels(artifacts: list[Path]) -> list[str]:
    """Short, distinct names for the artifacts (their directory names, or whole paths when those clash)."""
    names = [p.name or str(p) for p in artifacts]
    if len(set(names)) < len(names):
        names = [str(p) for p in artifacts]
    if len(set(names)) < len(names):
        names = [f"{i + 1}:{n}" for i, n in enumerate(names)]
    return names


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None (strict JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _ratio(value: float, base: float) -> float:
    return value / base if base and base == base and value == value else float("nan")


@app.command()
@handles_errors
def bench(
    artifacts: Annotated[
        list[Path], typer.Argument(help="Exported artifact directories; the first is the baseline for ratios.")
    ],
    prompt_lengths: Annotated[
        str | None, typer.Option(help="Comma-separated prompt lengths in tokens (default 128).")
    ] = None,
    new_tokens: Annotated[str, typer.Option(help="Comma-separated new-token counts.")] = "64",
    repeats: Annotated[int, typer.Option(help="Measured runs per case and artifact.")] = 3,
    warmup: Annotated[int, typer.Option(help="Unmeasured warm-up runs per case and artifact.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the random prompts.")] = 0,
    sweep: Annotated[
        bool, typer.Option("--sweep", help="Context sweep: prompt lengths 128, 256, 512, ... up to --sweep-max.")
    ] = False,
    sweep_max: Annotated[
        int | None,
        typer.Option(help="Longest sweep prompt (default: min(8192, context - new tokens)); needs --sweep."),
    ] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write decode tok/s and TTFT vs prompt length here (.png).")
    ] = None,
    threads: Threads = 0,
    precision: Precision = None,
    kv_cache: KVCache = None,
    attention: AttentionOpt = None,
    cache_dir: CacheDir = None,
    engine: EngineOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Measure TTFT, prefill and decode tokens/s, memory and load time of one or more ARTIFACTS.

    Artifacts load once up front, then run interleaved (A, B, A, B, ... on the same prompts) so ratios hold.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from qwen_export.runtime import bench as bench_mod
    from qwen_export.runtime.loader import open_artifact

    news = _int_list(new_tokens, "--new-tokens")
    if sweep_max is not None and not sweep:
        raise OptionError("--sweep-max needs --sweep")
    if sweep and prompt_lengths is not None:
        raise OptionError("--sweep chooses the prompt lengths itself; drop --prompt-lengths")
    if sweep_max is not None and sweep_max < 1:
        raise OptionError(f"--sweep-max must be >= 1, got {sweep_max}")
    prompts = None if sweep else _int_list(prompt_lengths or "128", "--prompt-lengths")
    if plot is not None:
        if plot.suffix.lower() not in (".png", ".svg", ".pdf"):
            raise OptionError(f"--plot must name a .png, .svg or .pdf file, got {str(plot)!r}")
        if not plot.parent.is_dir():
            raise OptionError(f"--plot: directory {str(plot.parent)!r} does not exist")
        bench_mod.require_matplotlib()  # fail before the long part, not after it
    for path in artifacts:
        if not Path(path).is_dir():
            raise OptionError(f"{path} is not an artifact directory")

    labels = _bench_labels(artifacts)
    # import the runtime first, so that the first artifact's load RSS does not include it
    from qwen_export.targets.onnxruntime import engine as _ort  # noqa: F401

    targets, loads = [], []
    with err_console.status("loading artifacts") as status:
        for label, path in zip(labels, artifacts, strict=True):
            status.update(f"loading {label}")
            rss0 = bench_mod.current_rss_mb()
            t0 = time.perf_counter()
            loaded = open_artifact(path, _runtime(threads, precision, kv_cache, cache_dir, engine, attention))
            load_s = time.perf_counter() - t0
            manifest = loaded.manifest
            kv = bench_mod.kv_bytes_per_token(manifest.spec, manifest.dtype)
            targets.append(bench_mod.BenchTarget(label, loaded.engine, kv))
            loads.append(
                {
                    "artifact": str(path),
                    "label": label,
                    "dtype": manifest.dtype,
                    "context": loaded.engine.capabilities.max_context,
                    "load_s": load_s,
                    "disk_mb": bench_mod.disk_mb(path),
                    "rss_load_mb": bench_mod.current_rss_mb() - rss0,
                    "kv_bytes_per_token": kv,
                }
            )
    if prompts is None:
        room = min(t.engine.capabilities.max_context for t in targets) - max(news)
        limit = min(bench_mod.SWEEP_DEFAULT_MAX, room) if sweep_max is None else sweep_max
        if limit < 1:
            raise OptionError(f"no room for a sweep: the context leaves {room} prompt tokens beside {max(news)} new")
        prompts = bench_mod.sweep_lengths(limit)
    cases = [bench_mod.BenchCase(p, n) for p in prompts for n in news]
    bench_mod.check_cases(targets, cases, repeats, warmup)

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task("benchmarking", total=len(cases) * (repeats + warmup) * len(targets))

        def advance(run: bench_mod.BenchRun) -> None:
            kind = "warm-up" if run.warmup else "run"
            progress.update(
                task,
                advance=1,
                description=f"{run.label} {run.case.prompt_tokens}+{run.case.new_tokens} {kind} {run.round + 1}",
            )

        results = bench_mod.bench_many(targets, cases, repeats, warmup, seed, on_run=advance)
    peak = bench_mod.peak_rss_mb()
    rss_note = (
        "all artifacts share one process, so their RSS peaks cannot be told apart: rss_load_mb is the RSS "
        "increase while each artifact loaded; peak_rss_mb is the process peak (VmHWM) over all of them"
    )
    if plot is not None:
        bench_mod.plot(plot, list(zip(labels, results, strict=True)))

    base = results[0]
    if as_json:
        per_artifact = []
        for info, rs in zip(loads, results, strict=True):
            rows = []
            for r, b in zip(rs, base, strict=True):
                row = dataclasses.asdict(r)
                row["decode_vs_first"] = _ratio(r.decode_tokens_per_s, b.decode_tokens_per_s)
                row["ttft_vs_first"] = _ratio(r.ttft_ms, b.ttft_ms)
                rows.append(row)
            per_artifact.append({**info, "results": rows})
        payload = {
            # the first (baseline) artifact's figures at the top level, as the one-artifact form had them
            "artifact": loads[0]["artifact"],
            "load_s": loads[0]["load_s"],
            "disk_mb": loads[0]["disk_mb"],
            "results": per_artifact[0]["results"],
            "artifacts": per_artifact,
            "order": "interleaved",
            "repeats": repeats,
            "warmup": warmup,
            "seed": seed,
            "sweep": sweep,
            "prompt_lengths": prompts,
            "new_tokens": news,
            "peak_rss_mb": peak,
            "rss_note": rss_note,
            "plot": None if plot is None else str(plot),
        }
        console.print_json(json.dumps(_finite(payload)))
        return

    many = len(targets) > 1
    info_table = Table(title="artifacts" + (" (run interleaved)" if many else ""))
    for column in ("artifact", "dtype", "disk MiB", "load s", "RSS +MiB at load", "KV KiB/token"):
        info_table.add_column(column, justify="left" if column == "artifact" else "right", overflow="fold")
    for info in loads:
        info_table.add_row(
            info["label"],
            info["dtype"],
            f"{info['disk_mb']:.1f}",
            f"{info['load_s']:.2f}",
            f"{info['rss_load_mb']:.0f}",
            f"{info['kv_bytes_per_token'] / 1024:.1f}",
        )
    console.print(info_table)

    title = f"{'context sweep' if sweep else 'latency'}: {repeats} run(s) after {warmup} warm-up per case"
    table = Table(title=title)
    headers = ["artifact", "prompt", "new"] + (["KV cache MiB"] if sweep else [])
    headers += ["TTFT ms", "prefill tok/s", "decode tok/s", "p10/p50/p90 ms"]
    headers += ["decode × first", "TTFT × first"] if many else []
    for column in headers:
        table.add_column(column, justify="left" if column == "artifact" else "right", overflow="fold")
    for c in range(len(cases)):
        for k, label in enumerate(labels):
            r, b = results[k][c], base[c]
            row = [label, str(r.prompt_tokens), str(r.new_tokens)]
            row += [f"{r.kv_cache_mb:.2f}"] if sweep and r.kv_cache_mb is not None else ([""] if sweep else [])
            row += [
                f"{r.ttft_ms:.1f}",
                f"{r.prefill_tokens_per_s:.1f}",
                f"{r.decode_tokens_per_s:.1f}",
                f"{r.token_latency_ms_p10:.2f}/{r.token_latency_ms_p50:.2f}/{r.token_latency_ms_p90:.2f}",
            ]
            if many:
                row += [
                    f"{_ratio(r.decode_tokens_per_s, b.decode_tokens_per_s):.2f}",
                    f"{_ratio(r.ttft_ms, b.ttft_ms):.2f}",
                ]
            table.add_row(*row, end_section=many and k == len(labels) - 1)
    console.print(table)
    console.print(
        f"peak RSS (VmHWM) of this process: {peak:.0f} MiB. All artifacts share one process, so their RSS "
        "peaks cannot be told apart; 'RSS +MiB at load' is the increase while each one loaded.",
        highlight=False,
    )
    if plot is not None:
        console.print(f"plot written to {plot}", highlight=False)


# ----------------------------------------------------------------------------- demo
@app.command()
@handles_errors
def demo(
    workdir: Annotated[Path | None, typer.Option(help="Keep the checkpoint and artifact here (default: temp).")] = None,
    prompt: Annotated[str, typer.Option(help="User message for the chat demo.")] = "Write a haiku about compilers.",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 24,
) -> None:
    """Build a tiny random Qwen2 checkpoint (no download), export it, chat with it, check parity."""
    from qwen_export.export import parity
    from qwen_export.export.pipeline import ExportOptions
    from qwen_export.export.tiny import make_checkpoint
    from qwen_export.runtime.llm import load

    root = Path(tempfile.mkdtemp(prefix="qwen-export-demo-")) if workdir is None else workdir
    try:
        root.mkdir(parents=True, exist_ok=True)
        ckpt, out = root / "tiny-qwen2", root / "tiny-qwen2-onnx"
        console.print(f"[bold]1. building a tiny random Qwen2 checkpoint[/] in {ckpt}")
        make_checkpoint(ckpt)
        console.print("[bold]2. exporting to ONNX Runtime[/] (fp32)")
        _export_with_progress(ckpt, out, ExportOptions(overwrite=True))
        llm = load(out)
        messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": prompt}]
        console.print("[bold]3. chat[/] (the weights are random, so the text is noise)")
        console.print(f"[cyan]user:[/] {prompt}\n[cyan]assistant:[/] ", end="")
        stream = llm.stream(messages, max_new_tokens=max_new_tokens, temperature=0.0)
        _print_stream(stream)
        result = stream.result
        assert result is not None
        console.print(
            f"[dim]{result.prompt_tokens} prompt + {result.completion_tokens} new tokens, "
            f"finish: {result.finish_reason.value}[/]"
        )
        console.print("[bold]4. parity against transformers[/]")
        report = parity.check(llm.engine, parity.Reference(ckpt), llm.tokenizer.encode(parity.DEFAULT_TEXT), DType.FP32)
        _print_parity(report, "tiny Qwen2, fp32: qwen-export (ONNX Runtime) vs transformers")
        if not report.passed:
            raise typer.Exit(1)
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
