"""The weight-quantization passes every target runs: [AWQ scaling,] portable quantization.

ONNX Runtime appends its MatMulNBits lowering (``targets/onnxruntime``); OpenVINO and TensorRT keep
the blocked ``DequantizeLinear`` form.
"""

from __future__ import annotations

from qwen_export.passes.base import Pass, PassContext, PassReport
from qwen_export.spec import ModelSpec


def quantization_passes(spec: ModelSpec, ctx: PassContext, report: PassReport) -> list[Pass]:
    """With ``ctx.quant``: [AWQ scaling (``ctx.calibration_stats``),] the portable quantization
    (DequantizeLinear). The weights left in the model dtype go into ``report``."""
    if ctx.quant is None:
        return []
    from qwen_export.passes.quantize import QuantizeWeights
    from qwen_export.quant.scheme import QuantAlgorithm

    awq: list[Pass] = []
    importance = None
    if ctx.quant.algorithm is QuantAlgorithm.AWQ:
        from qwen_export.passes.awq import AWQScaling

        if ctx.calibration_stats is None:
            raise ValueError("--algorithm awq: the pass context has no calibration statistics")
        scaling = AWQScaling(ctx.calibration_stats, ctx.quant, spec.num_hidden_layers, explain=ctx.explain)
        awq, importance = [scaling], scaling.importance  # filled when the awq pass runs
    quantize = QuantizeWeights(
        ctx.quant,
        spec.num_hidden_layers,
        explain=ctx.explain,
        kept=report.quantization_kept,
        importance=importance,
        requantized=report.quantization_requantized,
    )
    return [*awq, quantize]
