"""ONNX Runtime (CPU): the fused ``com.microsoft`` graph (GroupQueryAttention with rotary and packed
QKV, SkipSimplifiedLayerNormalization), MatMulNBits weights and one shared KV buffer per layer."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from qwen_export.errors import OptionError
from qwen_export.spec import CacheIO, DType, KVCacheDType, KVLayout, ModelSpec, Target
from qwen_export.targets.protocol import EmitJob


def unpacked_attention(spec: ModelSpec, ctx: Any) -> frozenset[str]:
    """The attention weight prefixes whose q/k/v stay separate MatMuls: where ``--int8`` or
    ``--block`` give q, k and v different quantizations (one packed weight has one)."""
    quant = ctx.quant
    if quant is None:
        return frozenset()
    layers = (f"model.layers.{i}.self_attn" for i in range(spec.num_hidden_layers))
    return frozenset(f"{a}." for a in layers if not quant.packs_qkv(a))


def packed_kv(spec: ModelSpec, ctx: Any, separate: frozenset[str]) -> frozenset[str]:
    """The prefixes of ``separate`` whose k and v still share one quantization (the tied int4
    default: q 4-bit, k and v 8-bit): they pack into one ``kv_proj``."""
    quant = ctx.quant
    if quant is None:
        return frozenset()
    return frozenset(p for p in separate if quant.packs_kv(p.removesuffix(".")))


@dataclasses.dataclass(frozen=True)
class OnnxRuntimeTarget:
    target: Target = Target.ONNXRUNTIME
    cache_io: CacheIO = CacheIO.CONCAT
    engines: tuple[Target, ...] = (Target.ONNXRUNTIME,)
    options_field: str | None = None
    own_options: frozenset[str] = frozenset({"kv_cache", "prefill"})
    load_options: tuple[str, ...] = ()
    cpu_module: str = "onnxruntime"
    zero_points: bool = True
    mixed_bits: bool = True
    small_blocks_fast: bool = True  # MatMulNBits 8-bit at block 128: near 4-bit block 32's speed
    log_scales: bool = True  # computed float32 scales, folded at session creation (matmulnbits.py)

    def cpu_runs(self) -> dict[str, dict[str, Any]]:
        return {"onnxruntime": {}}

    def graph_dtype(self, dtype: DType) -> DType:
        return dtype

    def adapt_weights(self, quant: Any, given: Mapping[str, Any], message: Callable[[str], None]) -> Any:
        return quant

    def check_options(self, options: Any) -> None:
        """``--kv-cache``: the activations' dtype, or int8 (the fused graph, an ONNX Runtime whose
        CPU GroupQueryAttention takes a quantized cache). ``--prefill int8``: see
        :func:`.prefill_int8.check_options`."""
        from qwen_export.targets.onnxruntime.prefill_int8 import check_options

        check_options(options)
        kv = options.kv_cache
        if kv is None or kv.value == options.dtype.value:
            return
        if kv is not KVCacheDType.INT8:
            raise OptionError(
                f"--kv-cache {kv.value} with --dtype {options.dtype.value}: ONNX Runtime's CPU GroupQueryAttention "
                "keeps a float cache only in the activations' dtype; give --dtype "
                f"{kv.value}, or --kv-cache int8 for a smaller cache"
            )
        if not options.fuse:
            raise OptionError("--kv-cache int8 is GroupQueryAttention's cache: drop --no-fuse")
        from qwen_export.targets.onnxruntime.kv_quant import check_int8_kv_support

        check_int8_kv_support()

    def adapt_options(self, options: Any, message: Callable[[str], None]) -> Any:
        if options.quant is not None:
            options.quant.require_blocks(self.target.value)  # MatMulNBits / GatherBlockQuantized are blocked
        return options

    def passes(self, spec: ModelSpec, fuse: bool, ctx: Any, report: Any) -> tuple[list[Any], KVLayout]:
        """Fused: cleanup, RMSNorm, rotary, GQA, packed QKV, [weight quantization, MatMulNBits
        lowering], [MoE: experts -> MoE / QMoE], cleanup, shared KV buffer. Unfused: cleanup [,
        quantization, lowering]."""
        from qwen_export.passes.cleanup import CleanupPass
        from qwen_export.passes.quantization import quantization_passes

        quantize = quantization_passes(spec, ctx, report)
        if quantize:
            from qwen_export.targets.onnxruntime.matmulnbits import MatMulNBitsLowering

            log_scales = ctx.quant.log_scales
            quantize.append(
                MatMulNBitsLowering(ctx.accuracy_level, ctx.explain, compact_scales=True, log_scales=log_scales)
            )
        if not fuse:
            return [CleanupPass(), *quantize], KVLayout.CONCAT
        from qwen_export.passes.attention import AttentionFusion
        from qwen_export.passes.packed_qkv import PackedQKVFusion
        from qwen_export.passes.rmsnorm import RMSNormFusion
        from qwen_export.passes.rotary import RotaryFusion
        from qwen_export.targets.onnxruntime.kv_io import SharedKVBuffer

        n = spec.num_hidden_layers
        strict = ctx.strict

        def expected(count: int) -> int | None:
            return count if strict else None

        norms = 2 * n + 1 + (2 * n if spec.qk_norm else 0)
        if spec.mrope_section is not None:  # a VL decoder: M-RoPE is not RotaryEmbedding; GQA takes q/k rotated
            return [
                CleanupPass(),
                RMSNormFusion(strict_expected=expected(norms), explain=ctx.explain),
                AttentionFusion(strict_expected=expected(n), explain=ctx.explain, prerotated=True),
                *quantize,
                CleanupPass(),
                SharedKVBuffer(n, strict=strict),
                *self._int8_kv(ctx),
            ], KVLayout.SHARED
        inv_freq, scale = spec.rope_inv_freq_and_scale()
        separate = unpacked_attention(spec, ctx)
        passes = [
            CleanupPass(),
            RMSNormFusion(strict_expected=expected(norms), explain=ctx.explain),
            RotaryFusion(inv_freq, scale, ctx.max_length, strict_expected=expected(2 * n), explain=ctx.explain),
            AttentionFusion(strict_expected=expected(n), explain=ctx.explain),
            PackedQKVFusion(
                strict_expected=expected(n - len(separate)),
                explain=ctx.explain,
                separate=separate,
                kv=packed_kv(spec, ctx, separate),
            ),
            *quantize,
            *self._moe(spec, ctx),
            CleanupPass(),
            SharedKVBuffer(n, strict=strict),
            *self._int8_kv(ctx),
        ]
        return passes, KVLayout.SHARED

    @staticmethod
    def _int8_kv(ctx: Any) -> list[Any]:
        """``--kv-cache int8``: the int8 cache with the scales of the calibration's maxima."""
        if ctx.kv_ranges is None:
            return []
        from qwen_export.quant.kv_cache import kv_scales
        from qwen_export.targets.onnxruntime.kv_quant import Int8KVCache

        return [Int8KVCache([kv_scales(k, v) for k, v in ctx.kv_ranges])]

    @staticmethod
    def _moe(spec: ModelSpec, ctx: Any) -> list[Any]:
        """An MoE model's routed experts -> com.microsoft MoE / QMoE (after the MatMulNBits lowering)."""
        if spec.moe is None:
            return []
        from qwen_export.targets.onnxruntime.moe import MoELowering

        return [MoELowering(spec, explain=ctx.explain)]

    def emit(self, model: Any, out: Path, job: EmitJob) -> dict[str, Any]:
        """model.onnx + model.onnx.data (streamed), onnxruntime-genai's genai_config.json (text models)
        and with ``--prefill int8`` the int8 prompt graph (prefill.onnx + prefill.onnx.data)."""
        from qwen_export.onnx_writer import io_signature
        from qwen_export.targets.onnxruntime.engine import emit
        from qwen_export.targets.onnxruntime.genai_config import write_genai_config

        emit(model, out, progress=job.progress)
        io = io_signature(model)
        extra: dict[str, Any] = {"io": io}
        if job.prefill_peaks is not None:
            from qwen_export.targets.onnxruntime.prefill_int8 import write

            job.message("writing the int8 prompt graph (prefill.onnx)")
            extra["prefill"] = write(out, job.prefill_peaks)
        if "inputs_embeds" in io["inputs"]:  # a VL decoder: onnxruntime-genai's VLM configs are not written
            return extra
        write_genai_config(
            out,
            job.spec,
            max_length=job.max_length,
            kv_layout_shared=job.kv_layout is KVLayout.SHARED,
            # inputs with a default (an initializer of the same name: logits_indices) are optional
            input_names=[name for name in io["inputs"] if name not in model.graph.initializers],
            output_names=io["outputs"],
            turn_end_token_id=job.turn_end_token_id,
        )
        return extra

    def open_engine(self, root: Path, manifest: Any, options: Any) -> Any:
        from qwen_export.targets.onnxruntime.engine import OnnxRuntimeEngine, OrtOptions

        chunk = {} if options.prefill_chunk is None else {"prefill_chunk": options.prefill_chunk}
        return OnnxRuntimeEngine(
            root, manifest, OrtOptions(threads=options.threads, prefill_int8=options.prefill_int8, **chunk)
        )

    def engine_options(self, threads: int, given: Mapping[str, Any], engine: Target | None) -> Any:
        return None  # threads only, from RuntimeOptions.threads

    def inspect_lines(self, root: Path, manifest: Any) -> list[str]:
        return []

    def foreign_options_error(self, root: Path, artifact: Target) -> str:
        return ""


TARGET = OnnxRuntimeTarget()
