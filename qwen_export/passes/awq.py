"""AWQ scaling: per-input-channel scales folded into the weights, before weight quantization.

For each group of linear weights sharing one input (:mod:`qwen_export.export.calibration`), AWQ
(:func:`~qwen_export.quant.algorithms.awq_scales`) searches scales ``s`` [K] on the calibration
activations; the pass then replaces, in place, the initializers' data (the graph does not change):

=================  ================================  ==============================================
group              weights (rows multiplied by s)    divided by s (function preserved)
=================  ================================  ==============================================
``qkv``            packed ``qkv_proj.weight_t`` (or  ``input_layernorm.weight``
                   q/k/v ``weight_t`` unfused)
``gate_up``        ``gate_proj``, ``up_proj``        ``post_attention_layernorm.weight``
``down``           ``down_proj``                     the columns of ``up_proj`` (and its bias)
``lm_head``        untied ``lm_head.weight_t``       ``model.norm.weight``
=================  ================================  ==============================================

o_proj is never scaled (Qwen uses GQA, see :mod:`qwen_export.quant.algorithms`), nor is a tied
head (its table is also the embedding). Groups of ``scheme.keep_layers`` / a kept lm_head, whose K is
not a multiple of the block size, or whose tensors are not where expected are left alone (counted
as ``skipped``). The new data are :class:`ScaledTensor`: lazy, computed from the source when the
model is written (or quantized), so memory stays bounded. The weights are read once here for the
search. The quantize pass that follows quantizes the scaled weights (RTN, or the importance-weighted
clip search with :attr:`AWQScaling.importance`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from qwen_export.passes.base import GraphPass
from qwen_export.quant.algorithms import awq_scales, input_importance
from qwen_export.quant.scheme import Keep, QuantScheme

GROUPS = ("qkv", "gate_up", "down", "lm_head")
#: ops a fold target may be read by: the (fused or unfused) RMSNorm, up_proj's MatMul and bias Add
_FOLD_OPS = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "Mul", "MatMul", "Add"}


class ScaledTensor(ir.LazyTensor):
    """``source`` with its slices along each axis of ``factors`` multiplied by the factor vector;
    computed in float32 when read, cast back to the source dtype. Scaling a ScaledTensor merges the
    factors (one rounding)."""

    def __init__(self, source: ir.TensorProtocol, factors: Mapping[int, np.ndarray], name: str | None = None) -> None:
        merged: dict[int, np.ndarray] = {}
        if isinstance(source, ScaledTensor):
            merged.update(source.factors)
            source = source.source
        shape = tuple(int(d) for d in source.shape.numpy())
        for axis, factor in factors.items():
            factor = np.asarray(factor, dtype=np.float32).reshape(-1)
            if factor.shape != (shape[axis],):
                raise ValueError(f"factor of shape {factor.shape} does not match axis {axis} of {shape}")
            merged[axis] = merged[axis] * factor if axis in merged else factor
        self.source, self.factors = source, merged
        super().__init__(self._load, dtype=source.dtype, shape=ir.Shape(shape), name=name or source.name)

    def _load(self) -> ir.TensorProtocol:
        array = np.asarray(self.source.numpy(), dtype=np.float32)
        for axis, factor in self.factors.items():
            view = [1] * array.ndim
            view[axis] = -1
            array = array * factor.reshape(view)
        return ir.tensor(np.ascontiguousarray(array, dtype=self.dtype.numpy()), dtype=self.dtype, name=self.name)


class AWQScaling(GraphPass):
    """Fold AWQ scales into the weights (see the module docstring).

    ``stats``: :func:`~qwen_export.export.calibration.collect_activation_stats`' result. After a
    call, :attr:`scales` maps each group (``layers.{i}.qkv``, ..., ``lm_head``) to its ``s`` and
    :attr:`importance` maps each scaled weight's name to ``E[(x / s)^2]`` per input channel (what
    the importance-weighted clip search needs)."""

    name = "awq"
    explain_heading = "skipped"

    def __init__(
        self,
        stats: Mapping[str, Any],
        scheme: QuantScheme,
        num_layers: int,
        grid: int = 20,
        explain: Any = None,
    ) -> None:
        self.stats, self.scheme, self.num_layers, self.grid = stats, scheme, num_layers, grid
        self.explain = explain
        self.scales: dict[str, np.ndarray] = {}
        self.importance: dict[str, np.ndarray] = {}
        self.skipped: dict[str, str] = {}

    def rewrite(self, model: Any) -> dict[str, int]:
        inits = model.graph.initializers
        self.scales.clear()
        self.importance.clear()
        self.skipped.clear()
        fired = dict.fromkeys(GROUPS, 0)
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            if i in self.scheme.keep_layers:
                self.skipped[f"layers.{i}"] = "layer in keep_layers"
                continue
            packed = p + "self_attn.qkv_proj.weight_t"
            qkv = [packed] if packed in inits else [p + f"self_attn.{x}_proj.weight_t" for x in "qkv"]
            up, up_bias = p + "mlp.up_proj.weight_t", p + "mlp.up_proj.bias"
            groups: list[tuple[str, Sequence[str], list[tuple[str, int]]]] = [
                ("qkv", qkv, [(p + "input_layernorm.weight", 0)]),
                ("gate_up", [p + "mlp.gate_proj.weight_t", up], [(p + "post_attention_layernorm.weight", 0)]),
                ("down", [p + "mlp.down_proj.weight_t"], [(up, 1)] + ([(up_bias, 0)] if up_bias in inits else [])),
            ]
            for kind, weights, folds in groups:
                fired[kind] += self._group(inits, f"layers.{i}.{kind}", weights, folds)
        if "lm_head.weight_t" in inits and "lm_head" in self.stats:
            if Keep.LM_HEAD in self.scheme.keep:
                self.skipped["lm_head"] = "keep lm_head"
            else:
                fired["lm_head"] += self._group(inits, "lm_head", ["lm_head.weight_t"], [("model.norm.weight", 0)])
        fired["skipped"] = len(self.skipped)
        return fired

    def modified(self, before: Counter[str], after: Counter[str]) -> bool:
        return bool(self.scales)  # the initializers' data changed, not the graph

    def left_alone(self) -> list[str]:
        return [f"{name}: {why}" for name, why in self.skipped.items()]

    def _why_not(self, inits: Any, group: str, weights: Sequence[str], folds: Sequence[tuple[str, int]]) -> str | None:
        if group not in self.stats:
            return "no calibration statistics"
        k = None
        for name in weights:
            value = inits.get(name)
            if value is None or value.const_value is None or value.shape is None or len(value.shape) != 2:
                return f"{name}: not a constant 2-D initializer"
            if any(u.node.op_type != "MatMul" or u.idx != 1 for u in value.uses()):
                return f"{name}: not used as the weight of MatMul alone"
            k = int(value.shape[0]) if k is None else k
            if int(value.shape[0]) != k:
                return f"{name}: K differs within the group"
        assert k is not None
        if self.scheme.block_size and k % self.scheme.block_size:
            return f"K={k} is not a multiple of the block size {self.scheme.block_size}"
        for name, axis in folds:
            value = inits.get(name)
            if value is None or value.const_value is None or value.shape is None:
                return f"{name}: not a constant initializer"
            if int(value.shape[axis]) != k:
                return f"{name}: axis {axis} is not {k} long"
            if any(u.node.op_type not in _FOLD_OPS for u in value.uses()):
                return f"{name}: read by {sorted({u.node.op_type for u in value.uses()})}"
        if self.stats[group].mean_abs.shape != (k,):
            return f"calibration statistics have {self.stats[group].mean_abs.shape[0]} channels, not {k}"
        return None

    def _group(self, inits: Any, group: str, weights: Sequence[str], folds: Sequence[tuple[str, int]]) -> int:
        why = self._why_not(inits, group, weights, folds)
        if why is not None:
            self.skipped[group] = why
            return 0
        stat = self.stats[group]
        arrays = [np.asarray(inits[name].const_value.numpy(), dtype=np.float32) for name in weights]
        s = awq_scales(
            arrays,
            stat.mean_abs,
            stat.sample,
            self.scheme.bits,
            self.scheme.block_size,
            self.scheme.symmetric,
            grid=self.grid,
            positive_scales=self.scheme.positive_scales,
        )
        del arrays
        self.scales[group] = s
        importance = input_importance(stat.sample, s)
        for name in weights:
            value = inits[name]
            value.const_value = ScaledTensor(value.const_value, {0: s}, name=name)
            self.importance[name] = importance
        inverse = (1.0 / s.astype(np.float64)).astype(np.float32)
        for name, axis in folds:
            value = inits[name]
            value.const_value = ScaledTensor(value.const_value, {axis: inverse}, name=name)
        return 1
