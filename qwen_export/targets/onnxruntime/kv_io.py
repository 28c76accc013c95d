"""KV-cache IO rewriting for ONNX Runtime: past and present become one preallocated buffer.

After :mod:`.attention`, every ``present.{i}.key``/``.value`` output is produced by a
``GroupQueryAttention`` whose ``past_key``/``past_value`` input is ``past_key_values.{i}.*``.
GQA writes the new tokens into the past buffer in place when the engine binds the same
``OrtValue`` as the past input and the present output (ORT compares the data pointers), so a
decode step copies no cache. This pass checks that contract for every layer, names the cache axis
``max_sequence_length`` on both sides (the buffer's capacity, fixed by the engine from the
artifact's ``max_length``) and drops the ``position_ids`` input, which the fused graph no longer
reads (GQA derives rotary positions from the cache coordinates).

A graph where some present is not a GQA output (attention left unfused) cannot share buffers:
the pass then changes nothing and, in strict mode, raises :class:`FusionError`.
"""

from __future__ import annotations

from collections import Counter

import onnx_ir as ir

from qwen_export.passes.base import MS_DOMAIN, FusionError, GraphPass

RULE = "shared_kv_buffer"
CAPACITY_DIM = "max_sequence_length"


def _gqa_pairs(model: ir.Model, layers: int) -> list[tuple[ir.Value, ir.Value]] | str:
    """(past input, present output) for every layer's key and value, or why they cannot share."""
    outputs = {v.name: v for v in model.graph.outputs}
    pairs: list[tuple[ir.Value, ir.Value]] = []
    for i in range(layers):
        for slot, kind in ((1, "key"), (2, "value")):
            present = outputs.get(f"present.{i}.{kind}")
            node = present.producer() if present is not None else None
            if node is None or node.op_type != "GroupQueryAttention" or node.domain != MS_DOMAIN:
                return f"present.{i}.{kind} is not produced by GroupQueryAttention (attention left unfused)"
            if node.outputs[slot] is not present:
                return f"present.{i}.{kind} is not GroupQueryAttention's present {kind}"
            past = node.inputs[2 + slot]
            if past is None or not past.is_graph_input() or past.name != f"past_key_values.{i}.{kind}":
                return f"layer {i}: GroupQueryAttention's past {kind} is not the past_key_values.{i}.{kind} input"
            pairs.append((past, present))
    return pairs


def _with_capacity(shape: ir.Shape | None) -> ir.Shape | None:
    if shape is None or len(shape) != 4:
        return shape
    return ir.Shape([shape[0], shape[1], CAPACITY_DIM, shape[3]])


class SharedKVBuffer(GraphPass):
    """Rewrite the KV IO for one shared past/present buffer per layer (ONNX Runtime, after GQA).

    ``layers``: the model's layer count; ``strict``: raise when the graph cannot share buffers.
    """

    name = "kv_io"
    requires_ops = ("com.microsoft::GroupQueryAttention",)

    def __init__(self, layers: int, strict: bool = True) -> None:
        self.layers = layers
        self.strict = strict
        self.shared = False  # after a call: whether the buffers are shared (the IO was rewritten)

    def rewrite(self, model: ir.Model) -> dict[str, int]:
        self.shared = False
        pairs = _gqa_pairs(model, self.layers)
        if isinstance(pairs, str):
            if self.strict:
                raise FusionError(f"cannot share the KV buffers: {pairs}; export with --no-fuse or --no-strict")
            return {RULE: 0}
        self.shared = True
        for past, present in pairs:
            past.shape = _with_capacity(past.shape)
            present.shape = _with_capacity(present.shape)
        removed = _drop_unused_inputs(model, ("position_ids",))
        return {RULE: len(pairs) // 2, **{f"removed_input:{n}": 1 for n in removed}}

    def modified(self, before: Counter[str], after: Counter[str]) -> bool:
        return self.shared  # the IO changed (shapes, inputs), not the ops


def _drop_unused_inputs(model: ir.Model, names: tuple[str, ...]) -> list[str]:
    removed = []
    for value in list(model.graph.inputs):
        if value.name in names and not value.uses():
            model.graph.inputs.remove(value)
            removed.append(value.name)
    return removed
