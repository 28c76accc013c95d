"""Packed QKV: one layer's q/k/v projections -> one MatMul on a packed weight, then a Split.

The traced attention projects the normed hidden state three times (see
:class:`qwen_export.export.modeling.Linear`, weights stored transposed as ``<hf name>_t``)::

    q = MatMul(x, <prefix>q_proj.weight_t) [-> Add(., <prefix>q_proj.bias)]      # [in, out_q]
    k = MatMul(x, <prefix>k_proj.weight_t) [-> Add(., <prefix>k_proj.bias)]      # [in, out_k]
    v = MatMul(x, <prefix>v_proj.weight_t) [-> Add(., <prefix>v_proj.bias)]      # [in, out_v]

(biases for Qwen2, none for Qwen3). They become::

    qkv = MatMul(x, <prefix>qkv_proj.weight_t) [-> Add(., <prefix>qkv_proj.bias)]   # [in, q+k+v]
    q, k, v = Split(qkv, <prefix>qkv_proj.split, axis=-1)

The packed weight is a :class:`ConcatTensor`: nothing is read until the model is written, and
:meth:`ConcatTensor.write_to` streams it in row blocks. A near miss (weights of different ``in``
or dtype, a weight that is not a constant initializer or not named ``q_proj``/``k_proj``/``v_proj``
of one prefix, mixed biased/unbiased projections, a projection output that is a graph output) is
left alone.

Where q, k and v are quantized differently (``separate``) but k and v alike (``kv``: the tied int4
layout with k and v both 8-bit in one block size), k and v alone become ``<prefix>kv_proj`` and a
2-way Split (one kernel call a layer fewer; the Split stays, GQA takes no packed key/value).

Second rule (``gqa=True``): where the three Split outputs are exactly the ``query``, ``key`` and
``value`` inputs of one ``com.microsoft::GroupQueryAttention`` and have no other consumer, the Split
is dropped and GQA gets the packed tensor as ``query`` with empty ``key``/``value`` (GQA's packed
QKV form). Anything between the Split and GQA (Qwen3's q/k norms, a Reshape) keeps the Split.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, BinaryIO

import numpy as np
import onnx_ir as ir

from qwen_export.passes.base import MS_DOMAIN, GraphPass
from qwen_export.weights import CHUNK_BYTES

QKV_RULE = "packed_qkv"
KV_RULE = "packed_kv"
GQA_RULE = "packed_qkv_gqa"
_ROLES = ("q", "k", "v")
_WEIGHT_SUFFIX = "_proj.weight_t"


# --- lazy packed tensor ----------------------------------------------------------------------------


class ConcatTensor(ir.LazyTensor):
    """The concatenation of ``parts`` along ``axis``, computed only when read.

    ``numpy()``/``tobytes()`` build it whole. :meth:`write_to` streams it: for ``axis > 0`` it
    reads each part once and writes blocks of about ``CHUNK_BYTES`` of leading-axis rows (peak
    memory: the parts plus one block); for ``axis == 0`` it writes the parts one after the other
    (through their own ``write_to`` when they have one).
    """

    def __init__(self, parts: Sequence[ir.TensorProtocol], axis: int = 1, name: str | None = None) -> None:
        if not parts:
            raise ValueError("ConcatTensor needs at least one part")
        dtype, rank = parts[0].dtype, len(parts[0].shape)
        axis = axis + rank if axis < 0 else axis
        if not 0 <= axis < rank:
            raise ValueError(f"axis {axis} out of range for rank {rank}")
        dims = [[int(d) for d in p.shape.numpy()] for p in parts]
        kept = {tuple(d[:axis] + d[axis + 1 :]) for d in dims}  # every dim but the concatenated one
        if len(kept) != 1 or {len(d) for d in dims} != {rank} or {p.dtype for p in parts} != {dtype}:
            raise ValueError(
                f"ConcatTensor parts do not concatenate on axis {axis}: {dims}, {[p.dtype for p in parts]}"
            )
        shape = list(dims[0])
        shape[axis] = sum(d[axis] for d in dims)
        self.parts, self.axis = tuple(parts), axis
        super().__init__(self._load, dtype=dtype, shape=ir.Shape(shape), name=name)

    def _load(self) -> ir.TensorProtocol:
        return ir.tensor(self._concat([np.asarray(p.numpy()) for p in self.parts]), dtype=self.dtype, name=self.name)

    def _concat(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        return np.ascontiguousarray(np.concatenate(arrays, axis=self.axis))

    def write_to(self, f: BinaryIO) -> int:
        """Write the tensor's raw little-endian bytes to ``f``; return the byte count."""
        if self.axis == 0:
            return sum(_write_part(part, f) for part in self.parts)
        arrays = [np.asarray(p.numpy()) for p in self.parts]
        rows = int(self.shape[0])
        step = max(1, CHUNK_BYTES // max(1, self.nbytes // max(1, rows)))
        written = 0
        for start in range(0, rows, step):
            written += _write_array(self._concat([a[start : start + step] for a in arrays]), f)
        return written


def _write_array(array: np.ndarray, f: BinaryIO) -> int:
    data = np.ascontiguousarray(array)
    f.write(data.reshape(-1).view(np.uint8).data)
    return int(data.nbytes)


def _write_part(part: ir.TensorProtocol, f: BinaryIO) -> int:
    write_to = getattr(part, "write_to", None)
    if write_to is not None:
        return int(write_to(f))
    return _write_array(np.asarray(part.numpy()), f)


# --- rule 1: pack the projections ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Projection:
    matmul: ir.Node
    weight: ir.Value
    add: ir.Node | None
    bias: ir.Value | None

    @property
    def output(self) -> ir.Value:
        return (self.add or self.matmul).outputs[0]


def _constant_initializer(value: ir.Value | None, rank: int) -> bool:
    return (
        value is not None
        and value.is_initializer()
        and not value.is_graph_input()
        and value.const_value is not None
        and value.shape is not None
        and len(value.shape) == rank
        and all(isinstance(d, int) for d in value.shape)
    )


def _dims(value: ir.Value) -> tuple[int, ...]:
    assert value.shape is not None
    return tuple(int(d) for d in value.shape)


def _const(value: ir.Value | None) -> ir.TensorProtocol:
    assert value is not None and value.const_value is not None
    return value.const_value


def _role(weight: ir.Value) -> tuple[str, str] | None:
    """``(prefix, "q"|"k"|"v")`` for a weight named ``<prefix>{q,k,v}_proj.weight_t``."""
    name = weight.name or ""
    if not name.endswith(_WEIGHT_SUFFIX):
        return None
    stem = name[: -len(_WEIGHT_SUFFIX)]
    if not stem or stem[-1] not in _ROLES:
        return None
    prefix = stem[:-1]
    if prefix and not prefix.endswith("."):  # e.g. "qq_proj": not a projection of this layer
        return None
    return prefix, stem[-1]


def _bias_of(matmul: ir.Node) -> tuple[ir.Node, ir.Value] | None:
    """The ``Add(matmul, bias)`` (either order) that is the MatMul output's only consumer."""
    out = matmul.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return None
    add = uses[0].node
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None
    other = add.inputs[1 - uses[0].idx]
    if other is None or other is out or not _constant_initializer(other, 1):
        return None
    return add, other


def _projections(x: ir.Value) -> tuple[str, list[_Projection]] | str | None:
    """The q/k/v projections of ``x`` (in that order) and their layer prefix when they pack; a
    sentence saying why not when ``x`` feeds some projection; None when it feeds none."""
    found: dict[str, list[ir.Node]] = {}
    prefixes = set()
    for use in x.uses():
        node, weight = use.node, use.node.inputs[1] if len(use.node.inputs) == 2 else None
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or use.idx != 0 or weight is None:
            continue
        role = _role(weight)
        if role is not None:
            prefixes.add(role[0])
            found.setdefault(role[1], []).append(node)
    if not found:
        return None
    if len(prefixes) != 1:
        return f"{x.name}: projections of several prefixes {sorted(prefixes)}"
    if any(len(found.get(r, [])) != 1 for r in _ROLES):
        return f"{x.name}: not exactly one q, k and v projection ({ {r: len(n) for r, n in found.items()} })"
    projections = [_projection(found[r][0]) for r in _ROLES]
    why = _why_not_packable(projections)
    return f"{x.name}: {why}" if why else (prefixes.pop(), projections)


def _projection(matmul: ir.Node) -> _Projection:
    weight = matmul.inputs[1]
    assert weight is not None
    add, bias = _bias_of(matmul) or (None, None)
    return _Projection(matmul, weight, add, bias)


def _why_not_packable(projections: list[_Projection]) -> str | None:
    weights = [p.weight for p in projections]
    if not all(_constant_initializer(w, 2) for w in weights):
        return "a weight is not a constant 2-D initializer"
    if len({_dims(w)[0] for w in weights}) != 1 or len({w.dtype for w in weights}) != 1:
        return f"weights differ in input size or dtype: {[(_dims(w), w.dtype) for w in weights]}"
    if any(p.output.is_graph_output() for p in projections):
        return "a projection output is a graph output"
    biased = [p.bias is not None for p in projections]
    if any(biased) and not all(biased):
        return f"mixed biased and unbiased projections (q, k, v biased: {biased})"
    for p in projections:
        if p.bias is not None and (p.bias.dtype != p.weight.dtype or _dims(p.bias)[0] != _dims(p.weight)[1]):
            return f"bias {p.bias.name} does not match its weight"
    return None


def _initializer(graph: ir.Graph, name: str, tensor: ir.TensorProtocol) -> ir.Value:
    value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def _unique(graph: ir.Graph, name: str) -> str:
    taken, candidate, n = graph.initializers, name, 1
    while candidate in taken:
        candidate, n = f"{name}_{n}", n + 1
    return candidate


def _pack(graph: ir.Graph, prefix: str, projections: list[_Projection], roles: Sequence[str] = _ROLES) -> None:
    """``projections`` (of ``roles``, in that order) as one MatMul (+ Add) on their concatenated
    weight and a Split: ``<prefix>qkv_proj``, or ``<prefix>kv_proj`` for k and v alone."""
    x = projections[0].matmul.inputs[0]
    assert x is not None
    base = f"{prefix}{''.join(roles)}_proj"
    sizes = [_dims(p.weight)[1] for p in projections]
    weight = _initializer(
        graph,
        _unique(graph, f"{base}.weight_t"),
        ConcatTensor([_const(p.weight) for p in projections], axis=1, name=f"{base}.weight_t"),
    )
    nodes = [ir.node("MatMul", [x, weight], name=f"{base}/MatMul")]
    packed = nodes[-1].outputs[0]
    if projections[0].bias is not None:
        bias = _initializer(
            graph,
            _unique(graph, f"{base}.bias"),
            ConcatTensor([_const(p.bias) for p in projections], axis=0, name=f"{base}.bias"),
        )
        nodes.append(ir.node("Add", [packed, bias], name=f"{base}/Add"))
        packed = nodes[-1].outputs[0]
    old = [p.output for p in projections]
    dtype = projections[0].weight.dtype  # MatMul/Add keep their inputs' dtype
    packed.name, packed.dtype = f"{base}.out", dtype
    if x.shape is not None and len(x.shape) >= 1:
        packed.shape = ir.Shape([*list(x.shape)[:-1], sum(sizes)])
    split_sizes = _initializer(graph, _unique(graph, f"{base}.split"), ir.tensor(np.array(sizes, np.int64)))
    nodes.append(ir.node("Split", [packed, split_sizes], {"axis": -1}, num_outputs=len(roles), name=f"{base}/Split"))
    graph.insert_before(_first(graph, [p.matmul for p in projections]), nodes)
    for old_value, new_value, role in zip(old, nodes[-1].outputs, roles, strict=True):
        new_value.name, new_value.dtype, new_value.shape = f"{base}.{role}", dtype, old_value.shape
        old_value.replace_all_uses_with(new_value)
    graph.remove([n for p in projections for n in (p.matmul, p.add) if n is not None], safe=True)
    _drop_unused(graph, [p.weight for p in projections] + [p.bias for p in projections if p.bias is not None])


def _first(graph: ir.Graph, nodes: list[ir.Node]) -> ir.Node:
    """The earliest of ``nodes`` in graph order (the packed MatMul goes before all three)."""
    wanted = {id(n) for n in nodes}
    return next(n for n in graph if id(n) in wanted)


def _drop_unused(graph: ir.Graph, values: Sequence[ir.Value | None]) -> None:
    """Remove the initializers among ``values`` that nothing uses any more."""
    for value in values:
        if (
            value is not None
            and not list(value.uses())
            and not value.is_graph_output()
            and value.name in graph.initializers
        ):
            del graph.initializers[value.name]


def _pack_all(
    graph: ir.Graph, misses: list[str], separate: frozenset[str] = frozenset(), kv: frozenset[str] = frozenset()
) -> tuple[int, int]:
    """Pack every q/k/v triple (prefixes in ``separate``: k and v alone where the prefix is in
    ``kv``, else nothing); the counts of triples and of k/v pairs packed."""
    candidates = list(graph.inputs) + [out for node in graph for out in node.outputs]
    fired = pairs = 0
    for x in candidates:
        match = _projections(x)
        if isinstance(match, tuple) and match[0] in separate:
            if match[0] in kv:
                _pack(graph, match[0], match[1][1:], roles=_ROLES[1:])
                pairs += 1
            continue
        if isinstance(match, tuple):
            _pack(graph, *match)
            fired += 1
        elif match is not None:
            misses.append(match)
    return fired, pairs


# --- rule 2: packed QKV straight into GroupQueryAttention -------------------------------------------


def _split_sizes(split: ir.Node) -> list[int] | None:
    value = split.inputs[1] if len(split.inputs) == 2 else None
    if value is None or value.const_value is None or value.const_value.dtype != ir.DataType.INT64:
        return None
    sizes = np.asarray(value.const_value.numpy()).reshape(-1)
    return [int(s) for s in sizes] if sizes.size == 3 else None


def _last_axis(split: ir.Node) -> bool:
    axis = split.attributes.get_int("axis", 0)
    if axis == -1:
        return True
    shape = split.inputs[0].shape if split.inputs[0] is not None else None
    return shape is not None and axis == len(shape) - 1


def _gqa_match(split: ir.Node) -> ir.Node | str | None:
    """The GQA whose query/key/value are exactly the Split's three outputs and their only uses; a
    sentence saying why not when some output feeds a GQA; None when none does."""
    consumers = [use.node for out in split.outputs for use in out.uses()]
    if not any(n.op_type == "GroupQueryAttention" and n.domain == MS_DOMAIN for n in consumers):
        return None
    if split.name.endswith("kv_proj/Split") and len(split.outputs) == 2:
        return None  # a packed k/v pair: GQA takes no packed key/value, the Split stays
    gqa = consumers[0]
    for idx, out in enumerate(split.outputs):
        uses = list(out.uses())
        if len(uses) != 1 or out.is_graph_output() or uses[0].idx != idx or uses[0].node is not gqa:
            return f"{split.name}: outputs are not GQA's query, key, value alone"
    if split.domain not in ("", "ai.onnx") or len(split.outputs) != 3 or not _last_axis(split):
        return f"{split.name}: not a 3-way Split of the last axis"
    sizes = _split_sizes(split)
    if sizes is None or not _gqa_sizes_match(gqa, sizes):
        return f"{split.name}: split sizes {sizes} do not match GQA's num_heads/kv_num_heads"
    return gqa


def _gqa_sizes_match(gqa: ir.Node, sizes: list[int]) -> bool:
    heads, kv_heads = gqa.attributes.get_int("num_heads", 0), gqa.attributes.get_int("kv_num_heads", 0)
    if heads <= 0 or kv_heads <= 0 or sizes[0] % heads:
        return False
    head_size = sizes[0] // heads
    return sizes[1] == sizes[2] == kv_heads * head_size


def _feed_gqa(graph: ir.Graph, split: ir.Node, gqa: ir.Node) -> None:
    gqa.replace_input_with(0, split.inputs[0])
    gqa.replace_input_with(1, None)
    gqa.replace_input_with(2, None)
    sizes_value = split.inputs[1]
    graph.remove(split, safe=True)
    _drop_unused(graph, [sizes_value])


def _feed_gqa_all(graph: ir.Graph, misses: list[str]) -> int:
    fired = 0
    for split in [n for n in graph if n.op_type == "Split"]:
        match = _gqa_match(split)
        if isinstance(match, ir.Node):
            _feed_gqa(graph, split, match)
            fired += 1
        elif match is not None:
            misses.append(match)
    return fired


# --- the pass --------------------------------------------------------------------------------------


class PackedQKVFusion(GraphPass):
    """Pack each layer's q/k/v projections into one MatMul (+ Add) and a Split.

    ``strict_expected``: raise :class:`~qwen_export.passes.base.FusionError` when fewer than this
    many q/k/v triples were packed (one per layer).
    ``gqa``: also feed the packed tensor straight into a ``com.microsoft::GroupQueryAttention``
    that takes the three Split outputs as query/key/value (packed QKV input, Split removed).
    ``explain``: a text stream that gets, per rule, why each near miss was left alone.
    ``separate``: weight prefixes (``model.layers.3.self_attn.``) whose q/k/v are not packed together,
    e.g. because they are quantized differently (:meth:`~qwen_export.quant.scheme.QuantScheme.packs_qkv`:
    one packed weight has one bit width); not counted as near misses.
    ``kv``: those of ``separate`` whose k and v still pack into one ``kv_proj`` MatMul and a 2-way
    Split (:meth:`~qwen_export.quant.scheme.QuantScheme.packs_kv`): one kernel call a layer fewer
    (counted as ``packed_kv``).
    """

    name = "packed_qkv"
    counted = (QKV_RULE, "q/k/v projection triples")

    def __init__(
        self,
        strict_expected: int | None = None,
        gqa: bool = True,
        explain: Any = None,
        separate: frozenset[str] = frozenset(),
        kv: frozenset[str] = frozenset(),
    ) -> None:
        self.strict_expected = strict_expected
        self.gqa = gqa
        self.explain = explain
        self.separate = separate
        self.kv = kv

    def rewrite(self, model: Any) -> dict[str, int]:
        misses: list[str] = []
        triples, pairs = _pack_all(model.graph, misses, self.separate, self.kv)
        fired = {QKV_RULE: triples}
        if self.kv:
            fired[KV_RULE] = pairs
        self.report_misses(fired[QKV_RULE], misses)
        if self.gqa:
            misses = []
            fired[GQA_RULE] = _feed_gqa_all(model.graph, misses)
            self.report_misses(fired[GQA_RULE], misses, "gqa")
        return fired
