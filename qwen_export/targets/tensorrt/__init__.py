"""TensorRT (NVIDIA GPUs): standard ONNX only, strongly typed, fixed-capacity KV buffers updated in
place (TensorScatter), checked against TensorRT's ONNX parser rules; engines are built on the GPU."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
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

    def graph_dtype(self, dtype: DType) -> DType:
        return dtype

    def check_options(self, options: Any) -> None:
        if not options.fuse:
            raise OptionError(
                "--no-fuse applies to --target onnxruntime only; tensorrt fuses attention, RoPE and RMSNorm itself "
                "when it compiles the model"
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
        from qwen_export.targets.tensorrt.engine import emit

        extra = emit(
            model,
            out,
            job.progress,
            spec=job.spec,
            capacity=job.max_length,
            dtype=job.dtype.value,
            max_batch=job.max_batch,
            max_prompt=job.max_length,
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

    def foreign_options_error(self, root: Path, artifact: Target) -> str:
        if artifact is self.target:  # a TensorRT artifact run on another engine
            return "the TensorRT options apply to the TensorRT engine, not --engine onnxruntime"
        return (
            f"device 'cuda' and the TensorRT options apply to --target tensorrt artifacts; {root} is a "
            f"{artifact.value} artifact, which runs on the CPU"
        )


TARGET = TensorRTTarget()
