"""Attention fusion for ONNX Runtime: the traced attention block -> ``com.microsoft::GroupQueryAttention``.

Runs after :mod:`.rmsnorm` and :mod:`.rotary`. One layer's attention is then, for q/k/v
projections ``q_in`` [B, S, H*D], ``k_in``/``v_in`` [B, S, KV*D]::

    q  = RotaryEmbedding(Transpose(N(Reshape(q_in, [B, S, H, D])), [0, 2, 1, 3]), pos, cos, sin)
    k  = RotaryEmbedding(Transpose(N(Reshape(k_in, [B, S, KV, D])), [0, 2, 1, 3]), pos, cos, sin)
    v  = Transpose(Reshape(v_in, [B, S, KV, D]), [0, 2, 1, 3])
    present_k = Concat(past_k, k, axis=2)                    present_v = Concat(past_v, v, axis=2)
    k_all = Reshape(Expand(Unsqueeze(present_k, [2]), ..))   (GQA head grouping; v_all alike)
    p  = Softmax(Add(Mul([Cast](MatMul(q, Transpose(k_all, [0, 1, 3, 2]))), scale), mask), axis=-1)
    out = Reshape(Transpose(MatMul([Cast](p), v_all), [0, 2, 1, 3]), [B, S, H*D])

(N is the Qwen3 q/k RMSNorm, already a ``SimplifiedLayerNormalization``; the Casts appear when the
weights are fp16/bf16 and the softmax runs in float32.) ``mask`` must be the additive mask built
from the ``attention_mask`` input that is causal, masks padding and, for sliding layers, a window
(:func:`analyse_mask`); anything else (a non-causal or unrecognised mask, another scale shape,
keys not concatenated after the past) is a near miss and stays unfused.

The replacement is one ``GroupQueryAttention(q, k, v, past_k, past_v, seqlens_k,
total_sequence_length, cos_cache, sin_cache, attention_bias, query_seqlens)`` with ``do_rotary=1``
(the rotary tables are taken over from the RotaryEmbedding nodes), ``local_window_size = window``
for sliding layers (ORT keeps keys k > q - window, as transformers does: measured on the sliding
fixture), and the two present outputs replacing the Concats. The GQA inputs derived from
``attention_mask`` are built once and shared by all layers:

- ``seqlens_k`` = total - 1 for every row and ``total_sequence_length`` = total, where total is
  ``attention_mask``'s width: the cache holds every column of the mask, padding included
  (left padding stays in the cache, as in transformers' KV-cache coordinates);
- ``attention_bias`` [B, 1, S, total]: 0 where ``attention_mask`` is 1, half the dtype's lowest
  value where it is 0, so padded keys are never attended;
- ``query_seqlens`` = S for every row (every new token is a cache entry; padding is masked by the
  bias): ORT only accepts a multi-token chunk after a past for batch > 1 with this input.

GQA derives rotary positions from cache coordinates (row b's tokens sit at columns 0..total-1), so
a left-padded row is rotated by positions shifted by its padding length. Rotary attention only
depends on position differences, so this equals transformers' ``cumsum(mask) - 1`` positions
exactly in real arithmetic (the float32 tables differ in the last bits).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from qwen_export.passes.base import MS_DOMAIN, FusionError, GraphPass, constant_array

RULE = "group_query_attention"


# ---------------------------------------------------------------------------------------------- mask
@dataclasses.dataclass(frozen=True)
class MaskInfo:
    """An additive attention mask recognised as causal + padding (+ sliding window)."""

    attention_mask: ir.Value
    window: int | None


def _node(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    if node is None or node.op_type != op_type or node.domain not in ("", "ai.onnx"):
        return None
    return node


def _axes(node: ir.Node) -> list[int] | None:
    axes = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    return None if axes is None else [int(a) for a in axes.reshape(-1)]


def _arange(value: ir.Value | None, unsqueeze_axis: int) -> bool:
    """``Unsqueeze(Range(0, n, 1), [axis])``."""
    unsq = _node(value, "Unsqueeze")
    if unsq is None or _axes(unsq) != [unsqueeze_axis]:
        return False
    rng = _node(unsq.inputs[0], "Range")
    if rng is None:
        return False
    start, delta = constant_array(rng.inputs[0]), constant_array(rng.inputs[2])
    return start is not None and delta is not None and int(start) == 0 and int(delta) == 1


def _query_positions(value: ir.Value | None) -> bool:
    """``Add(Unsqueeze(Range(0, S, 1), [1]), past_length)``: query positions in cache coordinates."""
    add = _node(value, "Add")
    return add is not None and _arange(add.inputs[0], 1)


def _conjuncts(value: ir.Value | None) -> list[ir.Value]:
    node = _node(value, "And")
    if node is None:
        return [value] if value is not None else []
    return [term for operand in node.inputs for term in _conjuncts(operand)]


class _MaskTerms:
    def __init__(self) -> None:
        self.causal = False
        self.padding: ir.Value | None = None
        self.window: int | None = None
        self.unknown: list[str] = []

    def add(self, term: ir.Value) -> None:
        unsq = _node(term, "Unsqueeze")
        inner = unsq.inputs[0] if unsq is not None else None
        if (le := _node(inner, "LessOrEqual")) is not None and _axes(unsq) == [0, 1]:
            if _arange(le.inputs[0], 0) and _query_positions(le.inputs[1]):
                self.causal = True
                return
        if (gt := _node(term, "Greater")) is not None and self._padding(gt):
            return
        if (gt := _node(inner, "Greater")) is not None and _axes(unsq) == [0, 1] and self._window(gt):
            return
        self.unknown.append(term.name or "?")

    def _padding(self, gt: ir.Node) -> bool:
        unsq, zero = _node(gt.inputs[0], "Unsqueeze"), constant_array(gt.inputs[1])
        if unsq is None or _axes(unsq) != [1, 2] or zero is None or zero.size != 1 or zero.reshape(()) != 0:
            return False
        source = unsq.inputs[0]
        if source is None or not source.is_graph_input() or source.name != "attention_mask":
            return False
        self.padding = source
        return True

    def _window(self, gt: ir.Node) -> bool:
        sub = _node(gt.inputs[1], "Sub")
        if not _arange(gt.inputs[0], 0) or sub is None or not _query_positions(sub.inputs[0]):
            return False
        window = constant_array(sub.inputs[1])
        if window is None or window.size != 1 or int(window.reshape(())) <= 0:
            return False
        self.window = int(window.reshape(()))
        return True


def analyse_mask(value: ir.Value) -> MaskInfo | str:
    """The mask's :class:`MaskInfo`, or a sentence saying why it is not a causal padding mask."""
    where = _node(value, "Where")
    if where is None:
        return "mask is not Where(condition, 0, -big)"
    zero, low = constant_array(where.inputs[1]), constant_array(where.inputs[2])
    if zero is None or zero.size != 1 or float(zero.reshape(())) != 0.0:
        return "mask's allowed value is not 0"
    if low is None or low.size != 1 or float(low.reshape(())) > -1e4:
        return "mask's blocked value is not a large negative constant"
    terms = _MaskTerms()
    for term in _conjuncts(where.inputs[0]):
        terms.add(term)
    if terms.unknown:
        return f"mask has unrecognised terms ({', '.join(terms.unknown)})"
    if not terms.causal:
        return "mask is not causal (no key <= query term)"
    if terms.padding is None:
        return "mask does not come from the attention_mask input"
    return MaskInfo(terms.padding, terms.window)


# ---------------------------------------------------------------------------------------------- rule
@dataclasses.dataclass
class _Shared:
    """GQA inputs derived from ``attention_mask``, built on first use and shared by every layer."""

    input_ids: ir.Value
    values: dict[str, ir.Value] = dataclasses.field(default_factory=dict)

    def const(self, op: Any, name: str, array: np.ndarray) -> ir.Value:
        """A small constant initializer, created once per pass run (names must be unique)."""
        if name not in self.values:
            self.values[name] = op.initializer(ir.tensor(array), name)
        return self.values[name]

    def get(self, op: Any, mask: ir.Value, dtype: ir.DataType) -> tuple[ir.Value, ...]:
        if "seqlens_k" not in self.values:
            total = op.Shape(mask, start=1, end=2)
            total32 = op.Cast(total, to=ir.DataType.INT32)
            one = self.const(op, "gqa.one_i32", np.array([1], np.int32))
            self.values["total"] = op.Squeeze(total32)
            self.values["seqlens_k"] = op.Expand(op.Sub(total32, one), op.Shape(mask, start=0, end=1))
            allowed = op.Unsqueeze(
                op.Cast(mask, to=ir.DataType.BOOL),
                self.const(op, "gqa.bias_axes", np.array([1, 2], np.int64)),
            )  # [B, 1, 1, total]
            ones = self.const(op, "gqa.ones_2", np.array([1, 1], np.int64))
            one = self.const(op, "gqa.one", np.array([1], np.int64))
            seq = op.Shape(self.input_ids, start=1, end=2)
            rows = op.Concat(ones, seq, one, axis=0)
            self.values["query_seqlens"] = op.Expand(op.Cast(seq, to=ir.DataType.INT32), op.Shape(mask, start=0, end=1))
            self.values["allowed"] = op.Expand(allowed, rows)  # [B, 1, S, total]: GQA wants S rows
        key = f"bias_{dtype.name}"
        if key not in self.values:
            np_dtype = dtype.numpy()
            zero = self.const(op, f"gqa.zero_{dtype.name}", np.array(0, np_dtype))
            low = self.const(op, f"gqa.low_{dtype.name}", np.array(np.finfo(np_dtype).min / 2, np_dtype))
            self.values[key] = op.Where(self.values["allowed"], zero, low)
        return self.values["seqlens_k"], self.values["total"], self.values[key], self.values["query_seqlens"]


class _AttentionRule(pattern.RewriteRuleClassBase):
    def __init__(self, name: str, qk_norm: bool, cast: bool, shared: _Shared) -> None:
        super().__init__(name)
        self._qk_norm, self._cast, self._shared = qk_norm, cast, shared

    def _heads(self, op, x, shape, norm_weight, out_name):  # noqa: ANN001, ANN201
        heads = op.Reshape(x, shape, _allow_other_attributes=True, _outputs=[out_name])
        if self._qk_norm:
            heads = op.SimplifiedLayerNormalization(
                heads, norm_weight, _allow_other_attributes=True, _outputs=[f"{out_name}_normed"]
            )
        return op.Transpose(heads, perm=[0, 2, 1, 3])

    def pattern(  # noqa: ANN201, PLR0913
        self,
        op,
        q_in,
        k_in,
        v_in,
        q_shape,
        k_shape,
        v_shape,
        q_w,
        k_w,
        pos,
        cos,
        sin,  # noqa: ANN001
        past_k,
        past_v,
        k_axes,
        k_expand,
        k_reshape,
        v_axes,
        v_expand,
        v_reshape,
        scale,
        mask,
        out_shape,  # noqa: ANN001
    ):
        q = op.RotaryEmbedding(
            self._heads(op, q_in, q_shape, q_w, "q4"),
            pos,
            cos,
            sin,
            _domain=MS_DOMAIN,
            _allow_other_attributes=True,
            _outputs=["q_rot"],
        )
        k = op.RotaryEmbedding(
            self._heads(op, k_in, k_shape, k_w, "k4"),
            pos,
            cos,
            sin,
            _domain=MS_DOMAIN,
            _allow_other_attributes=True,
            _outputs=["k_rot"],
        )
        v = op.Transpose(op.Reshape(v_in, v_shape, _allow_other_attributes=True), perm=[0, 2, 1, 3])
        present_k = op.Concat(past_k, k, axis=2, _outputs=["present_k"])
        present_v = op.Concat(past_v, v, axis=2, _outputs=["present_v"])
        k_all = op.Reshape(
            op.Expand(op.Unsqueeze(present_k, k_axes, _outputs=["k_group"]), k_expand),
            k_reshape,
            _allow_other_attributes=True,
        )
        v_all = op.Reshape(
            op.Expand(op.Unsqueeze(present_v, v_axes, _outputs=["v_group"]), v_expand),
            v_reshape,
            _allow_other_attributes=True,
        )
        scores = op.MatMul(q, op.Transpose(k_all, perm=[0, 1, 3, 2]))
        if self._cast:
            scores = op.Cast(scores, to=ir.DataType.FLOAT)
        probs = op.Softmax(op.Add(op.Mul(scores, scale), mask), axis=-1)
        if self._cast:
            probs = op.Cast(probs, _allow_other_attributes=True)
        out = op.Reshape(
            op.Transpose(op.MatMul(probs, v_all), perm=[0, 2, 1, 3]),
            out_shape,
            _allow_other_attributes=True,
            _outputs=["out"],
        )
        return out, present_k, present_v

    def check(self, context, q_in, k_in, v_in, scale, mask, q_rot, k_rot, q4, k4, present_k, present_v, out, **kw):  # noqa: ANN001, ANN201, PLR0911
        result = pattern.MatchResult()
        q_shape, k_shape = q4.shape, k4.shape
        if q_shape is None or k_shape is None or len(q_shape) != 4 or len(k_shape) != 4:
            return result.fail("q/k heads are not 4-D", q4)
        heads, kv_heads, d = q_shape[2], k_shape[2], q_shape[3]
        if not all(isinstance(n, int) for n in (heads, kv_heads, d)) or k_shape[3] != d:
            return result.fail("head counts or head size unknown", q4)
        if heads % kv_heads:
            return result.fail("query heads are not a multiple of KV heads", k4)
        for value in (q_in, k_in, v_in, out):
            if value.shape is None or len(value.shape) != 3:
                return result.fail("projection is not [B, S, hidden]", value)
        if q_in.shape[2] != heads * d or k_in.shape[2] != kv_heads * d or v_in.shape[2] != kv_heads * d:
            return result.fail("projection widths do not match the head layout", q_in)
        for rot in (q_rot, k_rot):
            if rot.producer().attributes.get_int("interleaved", 0) != 0:
                return result.fail("rotary is interleaved", rot)
        if q_rot.producer().inputs[2:4] != k_rot.producer().inputs[2:4]:
            return result.fail("q and k use different rotary tables", k_rot)
        for axes in (kw["k_axes"], kw["v_axes"]):
            found = constant_array(axes)
            if found is None or [int(a) for a in found.reshape(-1)] != [2]:
                return result.fail("keys/values are not grouped along a new axis 2", axes)
        s = constant_array(scale)
        if s is None or s.size != 1:
            return result.fail("score scale is not a scalar constant", scale)
        info = analyse_mask(mask)
        if isinstance(info, str):
            return result.fail(info, mask)
        past_k, past_v = present_k.producer().inputs[0], present_v.producer().inputs[0]
        for past in (past_k, past_v):
            if not past.is_graph_input():
                return result.fail("past key/value is not a graph input", past)
        self._match = dict(heads=heads, kv_heads=kv_heads, scale=float(s.reshape(())), mask=info)
        return result

    def rewrite(self, op, q_in, k_in, v_in, q_rot, k_rot, present_k, present_v, q4, k4, **kw):  # noqa: ANN001, ANN201
        m = self._match
        dtype = q_in.dtype
        q, k = q_in, k_in
        if self._qk_norm:  # keep the per-head norm (ORT CPU does not take it into GQA)
            q = self._normed_flat(op, q_in, q4, kw["q4_normed"])
            k = self._normed_flat(op, k_in, k4, kw["k4_normed"])
        rot = q_rot.producer()
        cos_cache, sin_cache = rot.inputs[2], rot.inputs[3]
        seqlens_k, total, bias, query_seqlens = self._shared.get(op, m["mask"].attention_mask, dtype)
        window = m["mask"].window
        out, new_k, new_v = op.GroupQueryAttention(
            q,
            k,
            v_in,
            present_k.producer().inputs[0],
            present_v.producer().inputs[0],
            seqlens_k,
            total,
            cos_cache,
            sin_cache,
            None,
            bias,
            None,
            None,
            None,
            None,
            None,
            query_seqlens,
            num_heads=m["heads"],
            kv_num_heads=m["kv_heads"],
            scale=m["scale"],
            do_rotary=1,
            rotary_interleaved=0,
            local_window_size=window or -1,
            _domain=MS_DOMAIN,
            _outputs=3,
        )
        return out, new_k, new_v

    def _normed_flat(self, op: Any, x: ir.Value, heads: ir.Value, normed: ir.Value) -> ir.Value:
        """Rebuild ``Reshape -> SimplifiedLayerNormalization`` per head, then flatten to [B, S, H*D]."""
        norm = normed.producer()
        shape = heads.producer().inputs[1]
        flat = self._shared.const(op, "gqa.flatten_heads", np.array([0, 0, -1], np.int64))
        attrs = {name: attr.value for name, attr in norm.attributes.items()}
        y = op.SimplifiedLayerNormalization(op.Reshape(x, shape, allowzero=1), norm.inputs[1], **attrs)
        return op.Reshape(y, flat)


class _PrerotatedAttentionRule(_AttentionRule):
    """The attention of a decoder whose rotary is not ``RotaryEmbedding`` (Qwen2-VL's M-RoPE: three
    position streams): q and k arrive rotated, [B, H, S, D]; the replacement is the same
    ``GroupQueryAttention`` with ``do_rotary=0``, fed q and k transposed back to [B, S, H*D]."""

    def pattern(  # noqa: ANN201, PLR0913
        self, op, q_rot, k_rot, v_in, v_shape, past_k, past_v, k_axes, k_expand, k_reshape,
        v_axes, v_expand, v_reshape, scale, mask, out_shape,  # noqa: ANN001
    ):  # fmt: skip
        v = op.Transpose(op.Reshape(v_in, v_shape, _allow_other_attributes=True), perm=[0, 2, 1, 3])
        present_k = op.Concat(past_k, k_rot, axis=2, _outputs=["present_k"])
        present_v = op.Concat(past_v, v, axis=2, _outputs=["present_v"])
        k_all = op.Reshape(
            op.Expand(op.Unsqueeze(present_k, k_axes), k_expand), k_reshape, _allow_other_attributes=True
        )
        v_all = op.Reshape(
            op.Expand(op.Unsqueeze(present_v, v_axes), v_expand), v_reshape, _allow_other_attributes=True
        )
        scores = op.MatMul(q_rot, op.Transpose(k_all, perm=[0, 1, 3, 2]))
        if self._cast:
            scores = op.Cast(scores, to=ir.DataType.FLOAT)
        probs = op.Softmax(op.Add(op.Mul(scores, scale), mask), axis=-1)
        if self._cast:
            probs = op.Cast(probs, _allow_other_attributes=True)
        out = op.Reshape(
            op.Transpose(op.MatMul(probs, v_all), perm=[0, 2, 1, 3]),
            out_shape,
            _allow_other_attributes=True,
            _outputs=["out"],
        )
        return out, present_k, present_v

    def check(self, context, q_rot, k_rot, v_in, scale, mask, present_k, present_v, out, **kw):  # noqa: ANN001, ANN201, PLR0911
        result = pattern.MatchResult()
        q_shape, k_shape = q_rot.shape, k_rot.shape
        if q_shape is None or k_shape is None or len(q_shape) != 4 or len(k_shape) != 4:
            return result.fail("rotated q/k are not 4-D", q_rot)
        heads, kv_heads, d = q_shape[1], k_shape[1], q_shape[3]
        if not all(isinstance(n, int) for n in (heads, kv_heads, d)) or k_shape[3] != d or heads % kv_heads:
            return result.fail("head counts or head size unknown, or heads not a multiple of KV heads", q_rot)
        if v_in.shape is None or len(v_in.shape) != 3 or v_in.shape[2] != kv_heads * d:
            return result.fail("value projection does not match the head layout", v_in)
        for axes in (kw["k_axes"], kw["v_axes"]):
            found = constant_array(axes)
            if found is None or [int(a) for a in found.reshape(-1)] != [2]:
                return result.fail("keys/values are not grouped along a new axis 2", axes)
        s = constant_array(scale)
        if s is None or s.size != 1:
            return result.fail("score scale is not a scalar constant", scale)
        info = analyse_mask(mask)
        if isinstance(info, str):
            return result.fail(info, mask)
        for past in (present_k.producer().inputs[0], present_v.producer().inputs[0]):
            if not past.is_graph_input():
                return result.fail("past key/value is not a graph input", past)
        self._match = dict(heads=heads, kv_heads=kv_heads, scale=float(s.reshape(())), mask=info)
        return result

    def rewrite(self, op, q_rot, k_rot, v_in, present_k, present_v, **kw):  # noqa: ANN001, ANN201
        m = self._match
        flat = self._shared.const(op, "gqa.flatten_heads", np.array([0, 0, -1], np.int64))
        q = op.Reshape(op.Transpose(q_rot, perm=[0, 2, 1, 3]), flat)
        k = op.Reshape(op.Transpose(k_rot, perm=[0, 2, 1, 3]), flat)
        seqlens_k, total, bias, query_seqlens = self._shared.get(op, m["mask"].attention_mask, v_in.dtype)
        return op.GroupQueryAttention(
            q, k, v_in, present_k.producer().inputs[0], present_v.producer().inputs[0], seqlens_k, total,
            None, None, None, bias, None, None, None, None, None, query_seqlens,
            num_heads=m["heads"], kv_num_heads=m["kv_heads"], scale=m["scale"], do_rotary=0,
            local_window_size=m["mask"].window or -1, _domain=MS_DOMAIN, _outputs=3,
        )  # fmt: skip


class AttentionFusion(GraphPass):
    """Fuse each layer's attention into ``GroupQueryAttention`` (ONNX Runtime lowering).

    ``strict_expected``: minimum number of fused attentions (the layer count); ``explain``: a
    stream for the nearest-match report.
    """

    name = "attention"
    counted = (RULE, "attentions")
    requires_ops = ("com.microsoft::RotaryEmbedding",)

    def __init__(self, strict_expected: int | None = None, explain: Any = None, prerotated: bool = False) -> None:
        """``prerotated``: the decoder's rotary is not ``RotaryEmbedding`` (M-RoPE); q and k come
        rotated and GroupQueryAttention does no rotary of its own."""
        self.strict_expected = strict_expected
        self.explain = explain
        self.prerotated = prerotated
        if prerotated:
            self.requires_ops = ()

    def rewrite(self, model: ir.Model) -> dict[str, int]:
        inputs = {v.name: v for v in model.graph.inputs}
        tokens = inputs.get("input_ids") or inputs.get("inputs_embeds")
        if tokens is None:
            raise FusionError("attention fusion needs the input_ids (or inputs_embeds) graph input")
        shared = _Shared(tokens)
        if self.prerotated:
            rules = pattern.RewriteRuleSet(
                [
                    _PrerotatedAttentionRule.rule(f"{RULE}_prerotated{'_cast' if c else ''}", False, c, shared)
                    for c in (False, True)
                ]
            )
            fired = self.apply_rules(model, rules)
            if fired:
                model.opset_imports.setdefault(MS_DOMAIN, 1)
            return {RULE: fired}
        rules = pattern.RewriteRuleSet(
            [
                _AttentionRule.rule(
                    f"{RULE}{'_qknorm' if n else ''}{'_cast' if c else ''}", qk_norm=n, cast=c, shared=shared
                )
                for n in (False, True)
                for c in (False, True)
            ]
        )
        fired = self.apply_rules(model, rules)
        if fired:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        return {RULE: fired}
