"""RMSNorm fusion: the traced RMSNorm subgraph -> ONNX Runtime's (Skip)SimplifiedLayerNormalization.

The traced RMSNorm (:class:`qwen_export.export.modeling.RMSNorm`, variance in float32) is, after cleanup::

    [Cast(x, to=FLOAT)] -> Pow(., 2) -> ReduceMean(axes=[-1], keepdims=1) -> Add(., eps) -> Sqrt
        -> Reciprocal -> Mul(x', .) -> [Cast(., to=x.dtype)] -> Mul(weight, .)

(the Casts only when x is not float32). It is replaced by one
``SimplifiedLayerNormalization(x, weight, axis=-1, epsilon=eps, stash_type=1)``; ONNX Runtime
registers that op in the default ONNX domain (opset 1, contrib op). A near miss (other exponent,
reduction over another axis or without keepdims, missing Sqrt, non-scalar or non-constant epsilon,
weight that is not a 1-D initializer of the normalised size) is left alone.

Then, where the normalised tensor is ``Add(residual, h)`` of two equally shaped rank-3 tensors (the
residual stream), the Add and the norm become one
``com.microsoft::SkipSimplifiedLayerNormalization(residual, h, weight)``, whose fourth output
(``input_skip_bias_sum``) replaces the Add's output for its other consumers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from qwen_export.passes.base import MS_DOMAIN, FusionError, GraphPass

__all__ = ["RMS_RULE", "SKIP_RULE", "FusionError", "RMSNormFusion"]

RMS_RULE = "rms_norm"
SKIP_RULE = "skip_rms_norm"


def _scalar(value: ir.Value | None) -> float | None:
    """The value of a constant one-element floating-point tensor, else None."""
    if value is None or value.const_value is None:
        return None
    tensor = value.const_value
    if tensor.size != 1 or not tensor.dtype.is_floating_point():
        return None
    return float(np.asarray(tensor.numpy()).reshape(()))


def _ints(value: ir.Value | None) -> list[int] | None:
    if value is None or value.const_value is None or value.const_value.size > 8:
        return None
    if value.const_value.dtype not in (ir.DataType.INT64, ir.DataType.INT32):
        return None
    return [int(v) for v in np.asarray(value.const_value.numpy()).reshape(-1)]


class _RMSNormRule(pattern.RewriteRuleClassBase):
    def __init__(self, name: str, cast: bool) -> None:
        super().__init__(name)
        self._cast = cast

    def pattern(self, op, x, exponent, axes, eps, weight):  # noqa: ANN001, ANN201
        h = op.Cast(x, _allow_other_attributes=True, _outputs=["upcast"]) if self._cast else x
        mean = op.ReduceMean(op.Pow(h, exponent), axes, _allow_other_attributes=True, _outputs=["mean"])
        normed = op.Mul(h, op.Reciprocal(op.Sqrt(op.Add(mean, eps))))
        if self._cast:
            normed = op.Cast(normed, _allow_other_attributes=True, _outputs=["downcast"])
        return op.Mul(weight, normed)

    def check(self, context, x, exponent, axes, eps, weight, mean, **kw):  # noqa: ANN001, ANN201
        result = pattern.MatchResult()
        if _scalar(exponent) != 2.0:
            return result.fail("exponent is not the constant 2", exponent)
        if x.dtype is None or not x.dtype.is_floating_point():
            return result.fail("input is not floating point", x)
        if self._cast:
            up, down = kw["upcast"].producer(), kw["downcast"].producer()
            if up.attributes.get_int("to") != ir.DataType.FLOAT or down.attributes.get_int("to") != x.dtype:
                return result.fail("casts are not x -> float32 -> x.dtype", x)
        elif x.dtype != ir.DataType.FLOAT:
            return result.fail("variance is not computed in float32", x)
        if x.shape is None or len(x.shape) < 1 or not isinstance(x.shape[-1], int):
            return result.fail("input rank or last dimension unknown", x)
        rank = len(x.shape)
        if _ints(axes) not in ([-1], [rank - 1]):
            return result.fail("ReduceMean is not over the last axis only", axes)
        if mean.producer().attributes.get_int("keepdims", 1) != 1:
            return result.fail("ReduceMean does not keep dims", mean)
        epsilon = _scalar(eps)
        if epsilon is None or not np.isfinite(epsilon) or epsilon < 0:
            return result.fail("epsilon is not a non-negative scalar constant", eps)
        if not weight.is_initializer() or weight.is_graph_input() or weight.const_value is None:
            return result.fail("weight is not a constant initializer", weight)
        if weight.shape is None or tuple(weight.shape) != (x.shape[-1],):
            return result.fail("weight is not 1-D of the normalised size", weight)
        if weight.dtype != x.dtype:
            return result.fail("weight dtype differs from input dtype", weight)
        return result

    def rewrite(self, op, x, eps, weight, **_):  # noqa: ANN001, ANN201
        return op.SimplifiedLayerNormalization(
            x, weight, axis=-1, epsilon=_scalar(eps), stash_type=int(ir.DataType.FLOAT), _domain=""
        )


class _SkipRMSNormRule(pattern.RewriteRuleClassBase):
    def pattern(self, op, residual, h, weight):  # noqa: ANN001, ANN201
        total = op.Add(residual, h, _outputs=["total"])
        normed = op.SimplifiedLayerNormalization(
            total, weight, _domain="", _allow_other_attributes=True, _outputs=["normed"]
        )
        return normed, total

    def check(self, context, residual, h, weight, normed, total, **_):  # noqa: ANN001, ANN201
        result = pattern.MatchResult()
        node = normed.producer()
        attrs = node.attributes
        if attrs.get_int("axis", -1) != -1 or attrs.get_int("stash_type", 1) != 1 or len(node.outputs) != 1:
            return result.fail("norm is not a last-axis float32-stash SimplifiedLayerNormalization", normed)
        for value in (residual, h):
            if value.shape is None or len(value.shape) != 3 or value.dtype != total.dtype:
                return result.fail("Add input is not a rank-3 tensor of the sum's dtype", value)
        if list(residual.shape) != list(h.shape):
            return result.fail("Add would broadcast", h)
        if weight.shape is None or tuple(weight.shape) != (residual.shape[-1],):
            return result.fail("weight does not match the hidden size", weight)
        if total.is_graph_output():
            return result.fail("sum is a graph output", total)
        return result

    def rewrite(self, op, residual, h, weight, normed, **_):  # noqa: ANN001, ANN201
        epsilon = normed.producer().attributes.get_float("epsilon", 1e-5)
        out, _mean, _inv_std, total = op.SkipSimplifiedLayerNormalization(
            residual, h, weight, epsilon=epsilon, _domain=MS_DOMAIN, _outputs=4
        )
        return out, total


def _rms_rules() -> pattern.RewriteRuleSet:
    rules = [_RMSNormRule.rule(f"{RMS_RULE}{'_cast' if c else ''}", cast=c) for c in (False, True)]
    return pattern.RewriteRuleSet(rules, commute=True)


def _skip_rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([_SkipRMSNormRule.rule(SKIP_RULE)], commute=True)


class RMSNormFusion(GraphPass):
    """Fuse RMSNorm into ``SimplifiedLayerNormalization`` (and residual Adds into the Skip variant).

    ``strict_expected``: raise :class:`FusionError` when fewer RMSNorms than this were fused (the
    exporter knows how many norms an architecture has: 2N+1, plus 2N q/k norms for Qwen3).
    ``skip``: also fuse the residual Add (``com.microsoft::SkipSimplifiedLayerNormalization``).
    """

    name = "rmsnorm"
    counted = (RMS_RULE, "RMSNorms")

    def __init__(self, strict_expected: int | None = None, skip: bool = True, explain: Any = None) -> None:
        self.strict_expected = strict_expected
        self.skip = skip
        self.explain = explain

    def rewrite(self, model: Any) -> dict[str, int]:
        fired = {RMS_RULE: self.apply_rules(model, _rms_rules())}
        if self.skip and fired[RMS_RULE]:
            fired[SKIP_RULE] = self.apply_rules(model, _skip_rules(), "skip")
            if fired[SKIP_RULE]:
                model.opset_imports.setdefault(MS_DOMAIN, 1)
        return fired
