"""Per-target pass pipelines: one straight-line list of passes per target.

Every pass is a callable ``(model) -> PassResult``; :func:`run_pipeline` runs the list, records
each result (they go into ``manifest.json``) and hands the model to ``dump(phase, model)`` after
each pass (``--dump-dir``). Strict counts come from the architecture: N layers give N attentions,
2N rotaries (q and k), 2N+1 RMSNorms (plus 2N q/k norms for Qwen3) and N packed projections.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, Protocol

from qwen_export.passes.base import FusionError, PassResult, op_histogram
from qwen_export.spec import ModelSpec, Target


class KVLayout(enum.Enum):
    """How an artifact's KV cache is passed between steps."""

    CONCAT = "concat"  # present = concat(past, new): the engine rebinds the presents as the next pasts
    SHARED = "shared"  # one preallocated buffer per layer bound as both past and present (GQA)
    STATEFUL = "stateful"  # OpenVINO variables (ReadValue/Assign) inside the infer request
    FIXED = "fixed"  # fixed-capacity buffers written at cache_position by ScatterElements (TensorRT)


class PassContext(Protocol):
    options: Any  # ExportOptions: .strict, .quant, .accuracy_level
    max_length: int

    @property
    def explain(self) -> Any: ...


Pass = Callable[[Any], PassResult]


def quantization_passes(spec: ModelSpec, ctx: PassContext, lower: bool = True) -> list[Pass]:
    """With ``options.quant``: [AWQ scaling (``ctx.calibration_stats``),] the portable quantization
    (DequantizeLinear) and, with ``lower``, its ONNX Runtime lowering (MatMulNBits /
    GatherBlockQuantized). The
    weights left in the model dtype are reported into ``ctx.quantization_kept`` (a dict, when the
    context has one)."""
    scheme = getattr(ctx.options, "quant", None)
    if scheme is None:
        return []
    from qwen_export.passes.quantize import QuantizeWeights
    from qwen_export.quant.scheme import QuantAlgorithm
    from qwen_export.targets.onnxruntime.matmulnbits import MatMulNBitsLowering

    explain = ctx.explain
    kept = getattr(ctx, "quantization_kept", None)
    awq: list[Pass] = []
    importance = None
    if scheme.algorithm is QuantAlgorithm.AWQ:
        from qwen_export.passes.awq import AWQScaling

        stats = getattr(ctx, "calibration_stats", None)
        if stats is None:
            raise ValueError("--algorithm awq: the pass context has no calibration statistics")
        scaling = AWQScaling(stats, scheme, spec.num_hidden_layers, explain=explain)
        awq, importance = [scaling], scaling.importance  # filled when the awq pass runs
    quantize = QuantizeWeights(
        scheme,
        spec.num_hidden_layers,
        explain=explain,
        kept=kept,
        importance=importance,
        requantized=getattr(ctx, "quantization_requantized", None),
    )
    if not lower:
        return [*awq, quantize]
    return [*awq, quantize, MatMulNBitsLowering(getattr(ctx.options, "accuracy_level", 4), explain=explain)]


def onnxruntime_passes(spec: ModelSpec, fuse: bool, ctx: PassContext) -> tuple[list[Pass], KVLayout]:
    """The ONNX Runtime pipeline: cleanup, then (fused) RMSNorm, rotary, GQA, packed QKV, [weight
    quantization, MatMulNBits lowering], cleanup, shared KV buffer. Unfused: cleanup [, quantization,
    lowering]."""
    from qwen_export.passes.cleanup import CleanupPass

    if not fuse:
        return [CleanupPass(), *quantization_passes(spec, ctx)], KVLayout.CONCAT
    from qwen_export.passes.attention import AttentionFusion
    from qwen_export.passes.packed_qkv import PackedQKVFusion
    from qwen_export.passes.rmsnorm import RMSNormFusion
    from qwen_export.passes.rotary import RotaryFusion
    from qwen_export.targets.onnxruntime.kv_io import SharedKVBuffer

    n = spec.num_hidden_layers
    strict = ctx.options.strict
    explain = ctx.explain
    inv_freq, scale = spec.rope_inv_freq_and_scale()
    norms = 2 * n + 1 + (2 * n if spec.qk_norm else 0)
    passes: list[Pass] = [
        CleanupPass(),
        RMSNormFusion(strict_expected=norms if strict else None, explain=explain),
        RotaryFusion(inv_freq, scale, ctx.max_length, strict_expected=2 * n if strict else None, explain=explain),
        AttentionFusion(strict_expected=n if strict else None, explain=explain),
        PackedQKVFusion(strict_expected=n if strict else None, explain=explain),
        *quantization_passes(spec, ctx),
        CleanupPass(),
        SharedKVBuffer(n, strict=strict),
    ]
    return passes, KVLayout.SHARED


def openvino_passes(spec: ModelSpec, ctx: PassContext) -> tuple[list[Pass], KVLayout]:
    """The OpenVINO pipeline: cleanup [, AWQ scaling, portable weight quantization]. The graph stays
    standard ONNX: OpenVINO's converter and CPU plugin fuse attention (with its internal KV cache),
    RoPE and RMSNorm themselves, which the runtime-model inspection of the OpenVINO target checks;
    its weights stay compressed behind blocked DequantizeLinear. The KV cache is made stateful when
    the IR is emitted (:mod:`qwen_export.targets.openvino.engine`)."""
    from qwen_export.passes.cleanup import CleanupPass

    return [CleanupPass(), *quantization_passes(spec, ctx, lower=False)], KVLayout.STATEFUL


def tensorrt_passes(spec: ModelSpec, ctx: PassContext) -> tuple[list[Pass], KVLayout]:
    """The TensorRT pipeline: cleanup [, AWQ scaling, portable weight quantization (symmetric: zero
        points are left out)], the KV-cache writes lowered to TensorScatter (TensorRT's in-place KV-cache
    update layer; opset 24), then the compatibility check against TensorRT's ONNX parser (op, dtype and
        DequantizeLinear constraints; changes nothing, raises on a violation). The graph was traced with
        fixed-capacity KV buffers (``CacheIO.SCATTER``); TensorRT fuses attention and normalisation
        itself when it builds the engine."""
    from qwen_export.passes.cleanup import CleanupPass
    from qwen_export.targets.tensorrt.check import TensorRTCompatibility
    from qwen_export.targets.tensorrt.kv_tensor_scatter import TensorScatterKV

    passes: list[Pass] = [
        CleanupPass(),
        *quantization_passes(spec, ctx, lower=False),
        TensorScatterKV(spec.num_hidden_layers),
        TensorRTCompatibility(),
    ]
    return passes, KVLayout.FIXED


def run_pipeline(
    model: Any, spec: ModelSpec, target: Target, fuse: bool, ctx: PassContext, dump: Callable[[str, Any], None]
) -> tuple[list[dict[str, Any]], KVLayout]:
    """Run the target's pipeline on ``model`` in place; return the pass records and the KV layout.

    A non-strict fused export whose attention did not fuse falls back to the concat layout.
    """
    if target is Target.OPENVINO:
        passes, layout = openvino_passes(spec, ctx)
    elif target is Target.TENSORRT:
        passes, layout = tensorrt_passes(spec, ctx)
    else:
        passes, layout = onnxruntime_passes(spec, fuse, ctx)
    records = []
    outputs = [v.name for v in model.graph.outputs]
    for p in passes:
        _check_requires(p, model)
        result = p(model)
        _check_graph(result.name, model, outputs)
        records.append(result.to_dict())
        dump(result.name, model)
    if layout is KVLayout.SHARED and not records[-1]["changed"]:
        layout = KVLayout.CONCAT
    return records, layout


def _check_requires(p: Any, model: Any) -> None:
    """Precondition: a pass that lowers an earlier pass's output names the ops it needs."""
    needed = getattr(p, "requires_ops", ())
    present = op_histogram(model)
    missing = [op for op in needed if op not in present]
    strict = getattr(p, "strict_expected", None) is not None or getattr(p, "strict", False)
    if missing and strict:
        raise FusionError(f"{p.name} pass needs {', '.join(missing)} in the graph; an earlier fusion did not run")


def _check_graph(pass_name: str, model: Any, outputs: list[str]) -> None:
    """Postcondition of every pass: graph outputs keep their names and every node input is defined
    before use (graph input, initializer or an earlier node's output)."""
    if [v.name for v in model.graph.outputs] != outputs:
        raise FusionError(f"{pass_name} pass changed the graph outputs; this is a bug in the pass")
    defined = {id(v) for v in model.graph.inputs} | {id(v) for v in model.graph.initializers.values()}
    for node in model.graph:
        for value in node.inputs:
            if value is not None and id(value) not in defined and value.producer() is not None:
                raise FusionError(
                    f"{pass_name} pass left {node.name or node.op_type} reading {value.name} before it is computed"
                )
            if value is not None and value.producer() is None and id(value) not in defined:
                raise FusionError(f"{pass_name} pass left {node.name or node.op_type} reading undefined {value.name}")
        defined.update(id(v) for v in node.outputs)
