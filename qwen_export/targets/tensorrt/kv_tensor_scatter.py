"""KV-cache update for TensorRT: ScatterElements at ``cache_position`` -> ``TensorScatter`` (opset 24).

The TensorRT graph is traced with fixed-capacity KV buffers (``CacheIO.SCATTER``): every layer
writes its new keys and values into the past buffer with::

    present.{i}.key = ScatterElements(past_key_values.{i}.key,            [B, KV, C, D]
                                      Expand(cache_position[None, None, :, None]),
                                      k_new, axis=2)                        [B, KV, S, D]

That is correct anywhere, but nothing lets an engine do it in place: TensorRT documents no
aliasing of a network input and output through an ordinary layer. What it documents is its
KV-cache update layer (``IKVCacheUpdateLayer``, TensorRT 10.15+: the cache must be a network
input, the update's output a network output, "they must share the same device memory address"),
which its ONNX parser builds from ONNX ``TensorScatter`` (opset 24; ``past_cache`` and ``update``
4-D, ``axis`` -2). ONNX Runtime's CPU kernel also works in place when the past and present
are bound to one buffer. After this pass::

    write_indices = Expand(Slice(cache_position, [0], [1]), Shape(input_ids)[0:1])    [B] int64
    present.{i}.key = TensorScatter(past_key_values.{i}.key, k_new, write_indices, axis=-2)

(every row writes at the same column: left padding keeps every row in the same KV coordinates),
and the model's default-domain opset becomes 24. The ops the graph holds did not change meaning
between opsets 21 and 24 (those versions only added types). The capacity axis of the buffers is
named ``max_sequence_length``.

Preconditions (checked; otherwise FusionError): every ``present.*`` output is a ScatterElements
on axis 2 with no reduction, over the matching ``past_key_values.*`` input, whose indices are
``cache_position`` broadcast along the batch, head and feature axes.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir

from qwen_export.passes.base import FusionError, GraphPass

RULE = "tensor_scatter"
OPSET = 24
CAPACITY_DIM = "max_sequence_length"


def _reads_cache_position(indices: ir.Value) -> bool:
    """True when ``indices`` is ``cache_position`` reshaped/broadcast (Unsqueeze/Reshape/Expand)."""
    value: ir.Value | None = indices
    for _ in range(8):
        if value is None:
            return False
        if value.is_graph_input():
            return value.name == "cache_position"
        node = value.producer()
        if node is None or node.op_type not in ("Expand", "Unsqueeze", "Reshape"):
            return False
        value = node.inputs[0]
    return False


def _scatter_nodes(model: ir.Model, layers: int) -> list[ir.Node] | str:
    outputs = {v.name: v for v in model.graph.outputs}
    nodes = []
    for i in range(layers):
        for kind in ("key", "value"):
            present = outputs.get(f"present.{i}.{kind}")
            node = present.producer() if present is not None else None
            if node is None or node.op_type != "ScatterElements" or node.domain not in ("", "ai.onnx"):
                return f"present.{i}.{kind} is not produced by ScatterElements"
            axis = node.attributes.get_int("axis", 0)
            if axis not in (2, -2) or node.attributes.get_string("reduction", "none") != "none":
                return f"present.{i}.{kind}: ScatterElements on axis {axis} (expected 2, no reduction)"
            past = node.inputs[0]
            if past is None or not past.is_graph_input() or past.name != f"past_key_values.{i}.{kind}":
                return f"present.{i}.{kind} does not scatter into past_key_values.{i}.{kind}"
            if node.inputs[1] is None or not _reads_cache_position(node.inputs[1]):
                return f"present.{i}.{kind}: the scatter indices are not cache_position"
            nodes.append(node)
    return nodes


def _write_indices(graph: ir.Graph, first_user: ir.Node) -> ir.Value:
    """``[B]`` int64: cache_position[0] repeated for every row (the batch from input_ids, or from a
    VL decoder's inputs_embeds)."""
    inputs = {v.name: v for v in graph.inputs}
    cache_position = inputs["cache_position"]
    input_ids = inputs["input_ids"] if "input_ids" in inputs else inputs["inputs_embeds"]

    def const(name: str, data: list[int]) -> ir.Value:
        value = ir.Value(name=name, const_value=ir.tensor(np.asarray(data, np.int64), name=name))
        graph.register_initializer(value)
        return value

    zero, one = const("kv_write.zero", [0]), const("kv_write.one", [1])
    first = ir.node("Slice", [cache_position, zero, one], name="kv_write/first")
    batch = ir.node("Shape", [input_ids], attributes={"start": 0, "end": 1}, name="kv_write/batch")
    write = ir.node("Expand", [first.outputs[0], batch.outputs[0]], name="kv_write/indices")
    write.outputs[0].name = "kv_write_indices"
    write.outputs[0].dtype = ir.DataType.INT64
    graph.insert_before(first_user, [first, batch, write])
    return write.outputs[0]


def _capacity_shape(shape: ir.Shape | None) -> ir.Shape | None:
    if shape is None or len(shape) != 4:
        return shape
    return ir.Shape([shape[0], shape[1], CAPACITY_DIM, shape[3]])


class TensorScatterKV(GraphPass):
    """Lower the fixed-capacity KV writes to ``TensorScatter`` (in place in TensorRT and ORT)."""

    name = "kv_tensor_scatter"
    requires_ops = ("ScatterElements",)

    def __init__(self, layers: int) -> None:
        self.layers = layers

    def rewrite(self, model: ir.Model) -> dict[str, int]:
        from onnx_ir.passes.common import RemoveUnusedNodesPass

        nodes = _scatter_nodes(model, self.layers)
        if isinstance(nodes, str):
            raise FusionError(f"cannot lower the KV-cache update to TensorScatter: {nodes}")
        graph = model.graph
        write = _write_indices(graph, min(nodes, key=lambda n: list(graph).index(n)))
        for node in nodes:
            past, _, update = node.inputs
            present = node.outputs[0]
            scatter = ir.node(
                "TensorScatter", [past, update, write], attributes={"axis": -2}, name=f"{present.name}/TensorScatter"
            )
            graph.insert_before(node, scatter)
            name, shape, type_ = present.name, present.shape, present.type
            present.replace_all_uses_with(scatter.outputs[0], replace_graph_outputs=True)
            graph.remove(node, safe=True)
            scatter.outputs[0].name, scatter.outputs[0].type = name, type_
            scatter.outputs[0].shape = _capacity_shape(shape)
            assert past is not None
            past.shape = _capacity_shape(past.shape)
        model.opset_imports[""] = OPSET
        RemoveUnusedNodesPass()(model)
        return {RULE: len(nodes) // 2}

    def modified(self, before: Counter[str], after: Counter[str]) -> bool:
        return True  # the KV writes and the opset changed, whatever the op counts
