"""TensorRT (NVIDIA GPUs): standard ONNX only, strongly typed, fixed-capacity KV buffers updated in
place (TensorScatter), checked against TensorRT's ONNX parser rules; engines are built on the GPU."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from qwen_export.errors import EngineUnavailableError, OptionError
from qwen_export.spec import CacheIO, DType, KVLayout, ModelSpec, Target
from qwen_export.targets.protocol import EmitJob


@dataclasses.dataclass(frozen=True)
class TensorRTTarget:
    target: Target = Target.TENSORRT
    cache_io: CacheIO = CacheIO.SCATTER
    #: its standard-ONNX graph also runs on ONNX Runtime CPU (how it is verified without TensorRT)
    engines: tuple[Target, ...] = (Target.TENSORRT, Target.ONNXRUNTIME)
    options_field: str | None = "tensorrt"
    #: the largest batch of the engine's optimization profiles
    own_options: frozenset[str] = frozenset({"max_batch"})
    #: the load option of the TensorRT engine (``device`` is common to every engine)
    load_options: tuple[str, ...] = ("cuda_graphs",)
    cpu_module: str = "onnxruntime"
    zero_points: bool = False
    mixed_bits: bool = False
    log_scales: bool = False
    small_blocks_fast: bool = False  # one block size per artifact (``--block`` is refused)

    def cpu_runs(self) -> dict[str, dict[str, Any]]:
        """Its standard-ONNX graph (fixed-capacity KV buffers scattered in place) on ONNX Runtime
        CPU: TensorRT itself needs an NVIDIA GPU."""
        return {"tensorrt": {"engine": Target.ONNXRUNTIME}}

    def graph_dtype(self, dtype: DType) -> DType:
        return dtype

    def adapt_weights(self, quant: Any, given: Mapping[str, Any], message: Callable[[str], None]) -> Any:
        """Refuse the options TensorRT cannot honour; a pre-quantized asymmetric (AWQ) checkpoint is
        requantized symmetric unless --asymmetric was asked for (then :meth:`check_options` refuses
        it: TensorRT needs zero points of zero)."""
        if given.get("embedding_bits") is not None:
            raise OptionError(
                "--embedding-bits: the TensorRT target keeps the embedding in --dtype (no quantized Gather)"
            )
        if given.get("accuracy_level") is not None:
            raise OptionError("--accuracy-level applies to ONNX Runtime's MatMulNBits, not to --target tensorrt")
        if quant is not None and not quant.symmetric and given.get("symmetric") is None:
            message(
                "--target tensorrt: the checkpoint's asymmetric quantization is requantized symmetric (TensorRT "
                "needs zero points of zero)"
            )
            return dataclasses.replace(quant, symmetric=True)
        return quant

    def check_options(self, options: Any) -> None:
        if not options.fuse:
            raise OptionError(
                "--no-fuse applies to --target onnxruntime only; tensorrt fuses attention, RoPE and RMSNorm itself "
                "when it compiles the model"
            )
        if options.quant is not None and options.quant.int8_weights:
            raise OptionError(
                "--int8 (8-bit tensors in an int4 export) is not supported by --target tensorrt: TensorRT "
                "block-quantizes INT4 only; drop --int8"
            )
        if options.quant is not None and options.quant.block_overrides:
            raise OptionError(
                "--block (per-tensor block sizes) is not supported by --target tensorrt: it is built and checked "
                "with one block size per artifact; drop --block and choose --block-size"
            )
        if options.quant is not None and not options.quant.symmetric:
            raise OptionError(
                "--target tensorrt needs symmetric weights (TensorRT requires DequantizeLinear zero points of "
                "zero); drop --asymmetric"
            )

    def adapt_options(self, options: Any, message: Callable[[str], None]) -> Any:
        """TensorRT's DequantizeLinear rules: scales strictly positive; block quantization for INT4
        only, so int8 weights are quantized per output channel; dequantization only in front of
        MatMul/Gemm, so the embedding (and a tied lm_head, which shares it) stays in the model dtype."""
        quant = options.quant
        if quant is None:
            return options
        if quant.bits == 4 and quant.per_channel:
            raise OptionError(
                "--target tensorrt: int4 weights need blocks (--block-size 32, 64 or 128), not per channel"
            )
        from qwen_export.quant.scheme import PER_CHANNEL, Keep

        changes: dict[str, Any] = {"positive_scales": True, "keep": quant.keep | {Keep.EMBEDDING}}
        if quant.bits == 8 and not quant.per_channel:
            changes["block_size"] = PER_CHANNEL
            message(
                f"--target tensorrt: int8 weights are quantized per output channel, not in blocks of "
                f"{quant.block_size} (TensorRT block-quantizes INT4 only)"
            )
        if Keep.EMBEDDING not in quant.keep:
            message(
                "--target tensorrt: the embedding stays in "
                f"{options.dtype.value} (TensorRT dequantizes weights only in front of MatMul/Gemm, not Gather)"
            )
        return dataclasses.replace(options, quant=dataclasses.replace(quant, **changes))

    def passes(self, spec: ModelSpec, fuse: bool, ctx: Any, report: Any) -> tuple[list[Any], KVLayout]:
        """Cleanup [, AWQ scaling, portable weight quantization (symmetric: zero points are left
        out)], the KV-cache writes lowered to TensorScatter (TensorRT's in-place KV-cache update
        layer; opset 24), then the compatibility check against TensorRT's ONNX parser (op, dtype and
        DequantizeLinear constraints; changes nothing, raises on a violation). TensorRT fuses
        attention and normalisation itself when it builds the engine."""
        from qwen_export.passes.cleanup import CleanupPass
        from qwen_export.passes.quantization import quantization_passes
        from qwen_export.targets.tensorrt.check import TensorRTCompatibility
        from qwen_export.targets.tensorrt.kv_tensor_scatter import TensorScatterKV

        passes = [
            CleanupPass(),
            *quantization_passes(spec, ctx, report),
            TensorScatterKV(spec.num_hidden_layers),
            TensorRTCompatibility(),
        ]
        return passes, KVLayout.FIXED

    def emit(self, model: Any, out: Path, job: EmitJob) -> dict[str, Any]:
        """model.onnx + model.onnx.data and the engine-build recipe (engines are built on the GPU)."""
        from qwen_export.onnx_writer import io_signature
        from qwen_export.targets.base import DEFAULT_PREFILL_CHUNK
        from qwen_export.targets.tensorrt.build import emit

        extra = emit(
            model,
            out,
            job.progress,
            spec=job.spec,
            capacity=job.max_length,
            dtype=job.dtype.value,
            max_batch=job.max_batch,
            # prefill activations grow with the prompt squared (attention scores): longer prompts
            # run in pieces of this many tokens, as the other engines' chunked prefill
            max_prompt=min(job.max_length, DEFAULT_PREFILL_CHUNK),
        )
        return {"io": io_signature(model), **extra}

    def open_engine(self, root: Path, manifest: Any, options: Any) -> Any:
        from qwen_export.targets.tensorrt.engine import TensorRTEngine, TensorRTOptions

        try:
            return TensorRTEngine(root, manifest, options.tensorrt or TensorRTOptions())
        except EngineUnavailableError as exc:
            raise EngineUnavailableError(
                f"{exc}; or run this artifact's ONNX on the CPU with --engine onnxruntime (load(..., "
                "engine='onnxruntime'))"
            ) from None

    def engine_options(self, threads: int, given: Mapping[str, Any], engine: Target | None) -> Any:
        """TensorRTOptions for ``device`` ``"cuda"`` / ``"cuda:N"`` or ``cuda_graphs``; ``"cpu"`` is
        refused for the TensorRT engine (its graph runs on the CPU under --engine onnxruntime)."""
        device, cuda_graphs = given.get("device"), given.get("cuda_graphs")
        cuda = device is not None and (device == "cuda" or device.startswith("cuda:"))
        if device not in (None, "cpu") and not cuda:
            raise OptionError(f"unknown device {device!r}; valid: cpu, cuda, cuda:N")
        if cuda or cuda_graphs:
            if engine not in (None, self.target):
                raise OptionError(f"device {device!r} and CUDA graphs apply to the TensorRT engine, not {engine.value}")
            from qwen_export.targets.tensorrt.engine import TensorRTOptions

            index = device.split(":", 1)[1] if device is not None and ":" in device else "0"
            if not index.isdigit():
                raise OptionError(f"device {device!r}: expected cuda:N with N a device index")
            return TensorRTOptions(device=int(index), cuda_graphs=bool(cuda_graphs))
        if device == "cpu" and engine is self.target:
            raise OptionError(
                "the TensorRT engine runs on cuda; use --engine onnxruntime to run this artifact on the CPU"
            )
        return None

    def inspect_lines(self, root: Path, manifest: Any) -> list[str]:
        """The engine-build recipe and the engines built so far."""
        recipe = manifest.extra.get("tensorrt")
        if not isinstance(recipe, dict):
            return []
        engines = sorted(p.name for p in (root / "engines").glob("*.plan")) or ["none (run build-engine)"]
        return [
            f"tensorrt: profiles {[p.get('name') for p in recipe.get('profiles', [])]}, max batch "
            f"{recipe.get('max_batch')}, max prompt {recipe.get('max_prompt')}, strongly typed "
            f"{recipe.get('strongly_typed')}; engines built: {', '.join(engines)}"
        ]

    def foreign_options_error(self, root: Path, artifact: Target) -> str:
        if artifact is self.target:  # a TensorRT artifact run on another engine
            return "the TensorRT options apply to the TensorRT engine, not --engine onnxruntime"
        return (
            f"device 'cuda' and the TensorRT options apply to --target tensorrt artifacts; {root} is a "
            f"{artifact.value} artifact, which runs on the CPU"
        )


TARGET = TensorRTTarget()
