"""Rotary-embedding recognition: ``x * cos + rotate_half(x) * sin`` -> ``com.microsoft::RotaryEmbedding``.

The traced rotary (:meth:`qwen_export.export.modeling.QwenForExport._rotary` and ``Attention.forward``) is,
after cleanup, for x of shape [B, H, S, D] and h = D/2::

    freqs = Mul(Unsqueeze(Cast(position_ids, to=FLOAT), [2]), inv_freq[1, 1, h])
    emb   = Concat(freqs, freqs, axis=-1)
    cos   = Unsqueeze([Cast(to=dtype)]([Mul(scale)](Cos(emb))), [1])      (sin: the same with Sin)
    out   = Add(Mul(x, cos), Mul(Concat(Neg(Slice(x, h:D)), Slice(x, 0:h), axis=-1), sin))

It becomes ``RotaryEmbedding(x, position_ids, cos_cache, sin_cache, interleaved=0)`` with the
tables of shape [max_length, h]: ``cos(pos * inv_freq) * scale`` in float32 (the traced arithmetic,
with the graph's own float32 ``inv_freq``), cast to x's dtype, computed by a constant subgraph that
ONNX Runtime folds when the session is created (:func:`rotary_table_values`). The same tables are what
``GroupQueryAttention(do_rotary=1)`` reads, so the attention pass can take them over.

The inverse frequencies found in the graph must equal the ModelSpec's (rope_theta, linear or YaRN
scaling) and the scale its attention factor: a mismatched table is a near miss and is left alone,
as is a rotation that is not rotate-half, a cos/sin pair computed from different angles, or angles
that do not come from the ``position_ids`` input.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from qwen_export.passes.base import MS_DOMAIN, GraphPass, constant_array

RULE = "rotary"
COS_CACHE, SIN_CACHE = "rotary.cos_cache", "rotary.sin_cache"
INV_FREQ = "rotary.cache_inv_freq"
#: Relative tolerance when comparing the graph's inverse frequencies with the spec's.
TABLE_RTOL = 1e-6


def rotary_tables(
    inv_freq: np.ndarray, scale: float, max_length: int, dtype: ir.DataType
) -> tuple[ir.Tensor, ir.Tensor]:
    """cos/sin caches [max_length, D/2] with the traced float32 arithmetic, cast to ``dtype``."""
    positions = np.arange(max_length, dtype=np.float32)[:, None]
    freqs = positions * np.asarray(inv_freq, np.float32)[None, :]
    np_dtype = dtype.numpy()
    cos = (np.cos(freqs) * np.float32(scale)).astype(np_dtype)
    sin = (np.sin(freqs) * np.float32(scale)).astype(np_dtype)
    return ir.tensor(cos, name=COS_CACHE), ir.tensor(sin, name=SIN_CACHE)


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    if node is None or node.op_type != op_type or node.domain not in ("", "ai.onnx"):
        return None
    return node


def _unsqueezed_axes(node: ir.Node) -> list[int] | None:
    axes = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    return None if axes is None else [int(a) for a in axes.reshape(-1)]


class _Angles:
    """What the cos/sin inputs of one rotary are computed from (or why they are not recognised)."""

    def __init__(self, cos: ir.Value, sin: ir.Value) -> None:
        self.failure: str | None = None
        self.inv_freq: np.ndarray | None = None
        self.scale = 1.0
        self.position_ids: ir.Value | None = None
        emb_cos, scale_cos = self._unwrap(cos, "Cos")
        emb_sin, scale_sin = self._unwrap(sin, "Sin")
        if self.failure:
            return
        if emb_cos is not emb_sin:
            self.failure = "cos and sin are computed from different angles"
        elif scale_cos != scale_sin:
            self.failure = "cos and sin are scaled differently"
        else:
            self.scale = scale_cos
            self._angles(emb_cos)

    def _unwrap(self, value: ir.Value, trig: str) -> tuple[ir.Value | None, float]:
        unsq = _producer(value, "Unsqueeze")
        if unsq is None or _unsqueezed_axes(unsq) != [1]:
            self.failure = f"{trig.lower()} is not unsqueezed at axis 1"
            return None, 1.0
        inner = unsq.inputs[0]
        cast = _producer(inner, "Cast")
        if cast is not None:
            inner = cast.inputs[0]
        scale = 1.0
        mul = _producer(inner, "Mul")
        if mul is not None:
            const = [constant_array(v) for v in mul.inputs]
            k = 0 if const[0] is not None and const[0].size == 1 else 1
            if const[k] is None or const[k].size != 1:
                self.failure = f"{trig.lower()} is multiplied by a non-constant"
                return None, 1.0
            scale, inner = float(const[k].reshape(())), mul.inputs[1 - k]
        node = _producer(inner, trig)
        if node is None:
            self.failure = f"{trig.lower()} input is not produced by {trig}"
            return None, 1.0
        return node.inputs[0], scale

    def _angles(self, emb: ir.Value | None) -> None:
        cat = _producer(emb, "Concat")
        if cat is None or len(cat.inputs) != 2 or cat.inputs[0] is not cat.inputs[1]:
            self.failure = "angles are not Concat(freqs, freqs)"
            return
        mul = _producer(cat.inputs[0], "Mul")
        if mul is None:
            self.failure = "freqs are not position * inv_freq"
            return
        for k in (0, 1):
            inv = constant_array(mul.inputs[k])
            if inv is not None:
                self.inv_freq = inv.reshape(-1).astype(np.float64)
                self._positions(mul.inputs[1 - k])
                return
        self.failure = "inv_freq is not a constant"

    def _positions(self, value: ir.Value | None) -> None:
        unsq = _producer(value, "Unsqueeze")
        cast = _producer(unsq.inputs[0], "Cast") if unsq is not None else None
        if cast is None or cast.attributes.get_int("to") != ir.DataType.FLOAT:
            self.failure = "positions are not Unsqueeze(Cast(position_ids, float32))"
            return
        source = cast.inputs[0]
        if source is None or not source.is_graph_input() or source.dtype != ir.DataType.INT64:
            self.failure = "positions do not come from an int64 graph input"
            return
        self.position_ids = source


class _RotaryRule(pattern.RewriteRuleClassBase):
    def __init__(self, name: str, inv_freq: np.ndarray, scale: float, max_length: int) -> None:
        super().__init__(name)
        self._inv_freq = np.asarray(inv_freq, np.float64)
        self._scale = float(scale)
        self._max_length = max_length
        self._tables: dict[ir.DataType, tuple[ir.Value, ir.Value]] = {}

    def pattern(self, op, x, cos, sin, s1, e1, a1, st1, s2, e2, a2, st2):  # noqa: ANN001, ANN201
        upper = op.Slice(x, s1, e1, a1, st1, _outputs=["upper"])
        lower = op.Slice(x, s2, e2, a2, st2, _outputs=["lower"])
        rotated = op.Concat(op.Neg(upper), lower, axis=-1)
        return op.Add(op.Mul(x, cos), op.Mul(rotated, sin))

    def check(self, context, x, cos, sin, upper, lower, **_):  # noqa: ANN001, ANN201
        result = pattern.MatchResult()
        if x.shape is None or len(x.shape) != 4 or not isinstance(x.shape[3], int):
            return result.fail("input is not 4-D [B, H, S, D] with a known head size", x)
        d = x.shape[3]
        if d % 2 or _slice_range(upper, d) != (d // 2, d) or _slice_range(lower, d) != (0, d // 2):
            return result.fail("rotation is not rotate_half (x[..., D/2:], x[..., :D/2])", upper)
        angles = _Angles(cos, sin)
        if angles.failure:
            return result.fail(angles.failure, cos)
        assert angles.inv_freq is not None
        if angles.inv_freq.shape != self._inv_freq.shape or not np.allclose(
            angles.inv_freq, self._inv_freq, rtol=TABLE_RTOL, atol=0.0
        ):
            return result.fail("inverse frequencies differ from the model's rope_theta/scaling", cos)
        if not np.isclose(angles.scale, self._scale, rtol=TABLE_RTOL):
            return result.fail(f"cos/sin scale {angles.scale} differs from the model's {self._scale}", cos)
        if cos.dtype != x.dtype:
            return result.fail("cos/sin dtype differs from the input's", cos)
        self._positions = angles.position_ids
        self._found_inv_freq = angles.inv_freq  # the tables repeat the graph's float32 values exactly
        return result

    def rewrite(self, op, x, **_):  # noqa: ANN001, ANN201
        cos_cache, sin_cache = self._cache_values(op, x.dtype)
        return op.RotaryEmbedding(x, self._positions, cos_cache, sin_cache, interleaved=0, _domain=MS_DOMAIN)

    def _cache_values(self, op: Any, dtype: ir.DataType) -> tuple[ir.Value, ir.Value]:
        if dtype not in self._tables:
            self._tables[dtype] = rotary_table_values(op, self._found_inv_freq, self._scale, self._max_length, dtype)
        return self._tables[dtype]


def rotary_table_values(
    op: Any, inv_freq: np.ndarray, scale: float, max_length: int, dtype: ir.DataType
) -> tuple[ir.Value, ir.Value]:
    """The :func:`rotary_tables` computed in the graph from constants only (the [1, D/2] inverse
    frequencies and the positions ``Range(0, max_length)``), with the same float32 arithmetic:
    ONNX Runtime's constant folding computes them once when the session is created, and the file
    holds D/2 floats instead of two [max_length, D/2] tables (16 MiB for a 32K-context Qwen2.5, 64
    MiB at 128K)."""
    inv = ir.tensor(np.asarray(inv_freq, np.float32)[None, :], name=INV_FREQ)
    positions = op.Range(
        op.Constant(value_float=0.0), op.Constant(value_float=float(max_length)), op.Constant(value_float=1.0)
    )
    freqs = op.Mul(op.Unsqueeze(positions, op.Constant(value_ints=[1])), op.initializer(inv, INV_FREQ))
    factor = op.Constant(value_float=float(np.float32(scale)))
    cos, sin = op.Mul(op.Cos(freqs), factor), op.Mul(op.Sin(freqs), factor)
    if dtype != ir.DataType.FLOAT:
        cos, sin = op.Cast(cos, to=dtype), op.Cast(sin, to=dtype)
    return cos, sin


def _slice_range(value: ir.Value, d: int) -> tuple[int, int] | None:
    """(start, end) of a last-axis, step-1 Slice of a rank-4 tensor with last dim d, else None."""
    node = value.producer()
    starts, ends, axes, steps = (constant_array(v) for v in node.inputs[1:5]) if len(node.inputs) >= 5 else (None,) * 4
    if starts is None or ends is None or axes is None or steps is None:
        return None
    if [int(a) for a in axes.reshape(-1)] not in ([-1], [3]) or [int(s) for s in steps.reshape(-1)] != [1]:
        return None
    start, end = int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])
    return max(0, start if start >= 0 else d + start), min(d, end if end >= 0 else d + end)


class RotaryFusion(GraphPass):
    """Replace each recognised rotary with ``com.microsoft::RotaryEmbedding`` (tables as initializers).

    ``inv_freq``/``scale``: the model's tables (:meth:`ModelSpec.rope_inv_freq_and_scale`);
    ``max_length``: rows of the cos/sin caches; ``strict_expected``: minimum fire count (2 per
    layer: q and k). ``explain``: a stream to which the nearest-match report is written.
    """

    name = "rotary"
    counted = (RULE, "rotary embeddings")

    def __init__(
        self,
        inv_freq: list[float] | np.ndarray,
        scale: float,
        max_length: int,
        strict_expected: int | None = None,
        explain: Any = None,
    ) -> None:
        self.inv_freq, self.scale, self.max_length = np.asarray(inv_freq, np.float64), scale, max_length
        self.strict_expected = strict_expected
        self.explain = explain

    def rewrite(self, model: ir.Model) -> dict[str, int]:
        rules = pattern.RewriteRuleSet(
            [_RotaryRule.rule(RULE, self.inv_freq, self.scale, self.max_length)], commute=True
        )
        fired = self.apply_rules(model, rules)
        if fired:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        return {RULE: fired}
