"""Build an N-layer graph from a traced prototype with one layer per distinct layer type.

``torch.onnx.export`` costs about 5 s per decoder layer on this machine (torch.export plus its
decompositions), so tracing Qwen2.5-0.5B's 24 layers took over two minutes and a 72B model's 80
layers would take many more. Every decoder layer has the same structure (only its weights and,
for sliding-window models, its mask differ), so we trace a prototype with one layer per distinct
layer type and clone that layer's subgraph for each real layer:

    prototype:  embed ─▶ P0 ─▶ P1 ─▶ norm ─▶ lm_head        (P0 full, P1 sliding, say)
    result:     embed ─▶ L0 ─▶ L1 ─▶ … ─▶ L(N-1) ─▶ norm ─▶ lm_head
                (L_i = clone of the prototype layer of type layer_types[i], with
                 initializers model.layers.{i}.*, inputs past_key_values.{i}.*, outputs present.{i}.*)

A layer's nodes are the ones the exporter recorded under the module scope ``model.layers.{j}``
(see ``DecoderLayer.forward``), except ``Constant`` nodes, which the exporter shares across
scopes. Values a layer reads from outside (constants, mask, cos/sin, shape symbols) are shared by
all clones. The result is checked: every layer has its past inputs, present outputs
and initializers, and the graph is topologically sorted.
"""

from __future__ import annotations

import dataclasses
import re

import onnx_ir as ir

from qwen_export.errors import QwenExportError

_SCOPE_KEY = "pkg.torch.onnx.name_scopes"
#: inputs after the KV cache that every layer reads as is (fixed-capacity caches' write columns,
#: the logits rows of a LogitsMode.LAST graph)
_SHARED_EXTRA_INPUTS = ("cache_position", "logits_indices")
_LAYER_PREFIX = re.compile(r"^model\.layers\.(\d+)(\.|$)")


class ReplicationError(QwenExportError):
    """The traced prototype does not have the layer structure replication relies on."""


@dataclasses.dataclass
class _Layer:
    nodes: list[ir.Node]
    h_in: ir.Value
    h_out: ir.Value
    inits: dict[str, ir.Value]  # initializer name -> value, for model.layers.{j}.*


def _layer_index(node: ir.Node) -> int | None:
    scopes = node.metadata_props.get(_SCOPE_KEY)
    if not scopes:
        return None
    for match in re.finditer(r"'model\.layers\.(\d+)(?:\.[^']*)?'", scopes):
        return int(match.group(1))
    return None


def _collect(graph: ir.Graph, k: int) -> list[_Layer]:
    groups: list[list[ir.Node]] = [[] for _ in range(k)]
    for node in graph:
        j = _layer_index(node)
        if node.op_type == "Constant" and not node.inputs:
            continue  # the exporter shares constants across scopes: keep them, shared by all clones
        if j is not None:
            if j >= k:
                raise ReplicationError(f"node {node.name} is in layer {j} but the prototype has {k} layers")
            groups[j].append(node)
    layers = []
    for j, nodes in enumerate(groups):
        if not nodes:
            raise ReplicationError(f"no traced node is scoped to model.layers.{j}")
        inside = set(nodes)
        produced = {out for n in nodes for out in n.outputs}
        outputs = set(graph.outputs)
        h_out = [v for v in produced if v not in outputs and any(c not in inside for c in v.consumers())]
        if len(h_out) != 1:
            raise ReplicationError(f"layer {j} has {len(h_out)} hidden-state outputs, expected 1")
        inits = {
            name: v
            for name, v in graph.initializers.items()
            if _LAYER_PREFIX.match(name) and int(_LAYER_PREFIX.match(name).group(1)) == j  # type: ignore[union-attr]
        }
        layers.append(_Layer(nodes, h_in=None, h_out=h_out[0], inits=inits))  # type: ignore[arg-type]
    # the hidden input of layer j is the hidden output of layer j-1; layer 0's is the embedding
    for j in range(1, k):
        layers[j].h_in = layers[j - 1].h_out
    first = set(layers[0].nodes)
    feeds = {v for n in first for v in n.inputs if v is not None and v.producer() not in first}
    embed = [v for v in feeds if (p := v.producer()) is not None and p.op_type == "Gather"]
    if not embed:  # a vision-language decoder: the graph input inputs_embeds feeds layer 0
        embed = [v for v in feeds if v.name == "inputs_embeds" and v.producer() is None]
    if len(embed) != 1:
        raise ReplicationError(f"cannot find the embedding output feeding layer 0 (found {len(embed)})")
    layers[0].h_in = embed[0]
    return layers


def _clone_value(value: ir.Value, name: str | None) -> ir.Value:
    return ir.Value(name=name, shape=value.shape, type=value.type)


def replicate_layers(model: ir.Model, layer_types: list[int], prototype_layers: int) -> None:
    """Rebuild ``model`` (a prototype with ``prototype_layers`` layers) with one layer per entry of
    ``layer_types``, each naming the prototype layer to clone. Canonical IO names are kept."""
    graph = model.graph
    protos = _collect(graph, prototype_layers)
    inputs = {v.name: v for v in graph.inputs}
    outputs = {v.name: v for v in graph.outputs}  # keyed by the canonical names, before renaming
    final_consumers_of = protos[-1].h_out
    for value in [*graph.inputs, *graph.outputs, *(v for p in protos for v in p.inits.values())]:
        if value.name and value.name.startswith(("past_key_values.", "present.", "model.layers.")):
            value.name = f"prototype.{value.name}"  # free the canonical names for the clones
    first = inputs.get("input_ids") or inputs["inputs_embeds"]
    new_inputs: list[ir.Value] = [first, inputs["attention_mask"], inputs["position_ids"]]
    new_outputs: list[ir.Value] = [outputs["logits"]]
    new_nodes: list[ir.Node] = []
    new_inits: list[ir.Value] = []
    current = protos[0].h_in
    for i, j in enumerate(layer_types):
        proto = protos[j]
        mapping: dict[ir.Value, ir.Value] = {proto.h_in: current}
        for kind in ("key", "value"):
            old = inputs[f"past_key_values.{j}.{kind}"]
            new = _clone_value(old, f"past_key_values.{i}.{kind}")
            mapping[old] = new
            new_inputs.append(new)
        for name, old in proto.inits.items():  # name: the canonical name it was traced with
            new = _clone_value(old, f"model.layers.{i}." + name.split(".", 3)[3])
            new.const_value = old.const_value  # placeholder (shape/dtype); bind_weights binds the data
            new_inits.append(new)
            mapping[old] = new
        for node in proto.nodes:
            outs = [_clone_value(o, f"{o.name}__l{i}" if o.name else None) for o in node.outputs]
            clone = ir.Node(
                node.domain,
                node.op_type,
                [mapping.get(v, v) if v is not None else None for v in node.inputs],
                list(node.attributes.values()),
                overload=node.overload,
                outputs=outs,
                version=node.version,
                name=f"{node.name}__l{i}" if node.name else None,
                metadata_props=dict(node.metadata_props),
            )
            mapping.update(zip(node.outputs, outs, strict=True))
            new_nodes.append(clone)
        for kind in ("key", "value"):
            present = mapping[outputs[f"present.{j}.{kind}"]]
            present.name = f"present.{i}.{kind}"
            new_outputs.append(present)
        current = mapping[proto.h_out]
    # the final norm now reads the last clone; then drop the prototype layers
    old_nodes = [n for p in protos for n in p.nodes]
    old_set = set(old_nodes)
    for use in list(final_consumers_of.uses()):
        if use.node not in old_set:
            use.node.replace_input_with(use.idx, current)
    old_inits = [v for p in protos for v in p.inits.values()]
    graph.outputs.clear()
    graph.inputs.clear()
    graph.remove(old_nodes, safe=True)
    _redirect_shape_reads(inputs, new_inputs, prototype_layers)
    for value in old_inits:
        graph.initializers.pop(value.name)  # type: ignore[arg-type]
    for node in new_nodes:
        graph.append(node)
    for value in new_inits:
        graph.register_initializer(value)
    graph.inputs.extend(new_inputs)
    graph.inputs.extend(v for name, v in inputs.items() if name in _SHARED_EXTRA_INPUTS)
    graph.outputs.extend(new_outputs)
    graph.sort()


def _redirect_shape_reads(inputs: dict[str, ir.Value], new_inputs: list[ir.Value], prototype_layers: int) -> None:
    """Shape symbols the exporter computed outside the layers from a prototype past input now read
    ``past_key_values.0.*``: every layer's past has the same shape."""
    by_name = {v.name: v for v in new_inputs}
    for j in range(prototype_layers):
        for kind in ("key", "value"):
            old = inputs[f"past_key_values.{j}.{kind}"]
            for use in list(old.uses()):
                if use.node.op_type not in ("Shape", "Size"):
                    raise ReplicationError(
                        f"{use.node.op_type} node {use.node.name} outside the layers reads past_key_values.{j}.{kind}"
                    )
                use.node.replace_input_with(use.idx, by_name[f"past_key_values.0.{kind}"])
