"""ONNX Runtime: each sparse layer's routed experts -> one ``com.microsoft`` ``MoE`` / ``QMoE`` node.

Runs after the MatMulNBits lowering, on the fused fp32 graph. The traced block
(:class:`qwen_export.export.modeling.SparseMoE`) computes, per expert in order, its routed tokens
with ``NonZero``/``GatherND``/three MatMuls/``ScatterND``: about 15 nodes per expert and step even
when no token picks the expert. ONNX Runtime's CPU kernels route and run the selected experts
inside one node:

- float weights: ``MoE(flat, router_logits, fc1, -, fc2)`` with ``fc1`` [E, 2I, H] (gate and up rows
  interleaved: ``swiglu_fusion=1``, the CPU kernel's form; ``activation_alpha=1``, ``beta=0`` and no
  limit make its SwiGLU ``silu(gate) * up``) and ``fc2`` [E, H, I]; ``normalize_routing_weights`` is
  ``norm_topk_prob`` (softmax over all experts, top-k, optionally renormalised, as transformers);
- blocked int4 / int8 weights (every expert projection a MatMulNBits with the same bits, block size,
  accuracy level and zero points or none): ``QMoE`` with the MatMulNBits bytes stacked per expert
  ([E, N, K*bits/8] codes, [E, N, K/B] scales, [E, N, packed] zero points). ONNX Runtime 1.32's CPU
  QMoE always renormalises the top-k weights (``benchmarks/moe_ort_qmoe_probe.py``): without
  ``norm_topk_prob`` its output is multiplied by the sum of the top-k probabilities the traced
  router already computes (``ReduceSum(TopK(...))``), which gives transformers' weights back.

The block's router MatMul, softmax and top-k stay (QMoE re-routes from the logits); the shared
expert and its gate (Qwen2-MoE) stay as they are. A layer whose experts do not fit (weights kept
in float beside quantized ones, fp16 activations, an unexpected structure) keeps the traced form;
its reason is recorded. The stacked initializers are lazy and written one expert at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, BinaryIO

import numpy as np
import onnx_ir as ir

from qwen_export.passes.base import MS_DOMAIN, GraphPass
from qwen_export.spec import ModelSpec

MOE_RULE = "moe"
QMOE_RULE = "qmoe"
KEPT_RULE = "kept"
_PROJ = ("gate", "up", "down")


class StackedTensor(ir.LazyTensor):
    """[E, ...] from one array per expert, each made on demand; :meth:`write_to` streams them."""

    def __init__(self, parts: list[Callable[[], np.ndarray]], dtype: ir.DataType, shape: tuple[int, ...], name: str):
        self.parts = parts
        super().__init__(self._load, dtype=dtype, shape=ir.Shape(shape), name=name)

    def _part(self, make: Callable[[], np.ndarray]) -> np.ndarray:
        array = np.ascontiguousarray(make(), dtype=self.dtype.numpy())
        expected = tuple(int(d) for d in self.shape.dims[1:])
        if array.shape != expected:
            raise ValueError(f"{self.name}: an expert's part has shape {array.shape}, expected {expected}")
        return array

    def _load(self) -> ir.TensorProtocol:
        return ir.tensor(np.stack([self._part(make) for make in self.parts]), name=self.name)

    def write_to(self, f: BinaryIO) -> int:
        total = 0
        for make in self.parts:
            array = self._part(make)
            array.tofile(f)
            total += array.nbytes
        return total


def _interleave(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """Rows g0, u0, g1, u1, ... (QMoE/MoE's fused SwiGLU layout)."""
    out = np.empty((2 * gate.shape[0], *gate.shape[1:]), gate.dtype)
    out[0::2], out[1::2] = gate, up
    return out


@dataclasses.dataclass
class _Block:
    """One sparse layer's pieces in the graph."""

    flat: ir.Value
    logits: ir.Value
    topk_values: ir.Value
    routed: ir.Value  # the sum of the routed experts' outputs (before the shared expert)
    nodes: dict[tuple[int, str], ir.Node]  # (expert, proj) -> MatMul or MatMulNBits


def _find_block(graph: ir.Graph, layer: int, experts: int) -> _Block | str:
    """The block's values, or why the layer keeps its traced form."""
    p = f"model.layers.{layer}.mlp."
    router = graph.initializers.get(p + "gate.weight_t")
    if router is None or router.dtype is not ir.DataType.FLOAT:
        return "router weight missing or not float32 (fp16 graphs keep the traced form)"
    uses = [u for u in router.uses() if u.node.op_type == "MatMul" and u.idx == 1]
    if len(uses) != 1:
        return "router MatMul not found"
    router_mm = uses[0].node
    topk = [u.node for v in router_mm.outputs for u in v.uses() if u.node.op_type == "Softmax"]
    topk = [u.node for s in topk for u in s.outputs[0].uses() if u.node.op_type == "TopK"]
    if len(topk) != 1:
        return "router Softmax -> TopK not found"
    by_weight = {}
    for node in graph:
        if node.op_type == "MatMul" and node.domain == "" and len(node.inputs) == 2 and node.inputs[1] is not None:
            by_weight[node.inputs[1].name] = node
        elif node.op_type == "MatMulNBits" and node.domain == MS_DOMAIN and node.inputs[1] is not None:
            by_weight[str(node.inputs[1].name).removesuffix(".B")] = node
    nodes = {}
    for e in range(experts):
        for proj in _PROJ:
            node = by_weight.get(f"{p}experts.{e}.{proj}_proj.weight_t")
            if node is None:
                return f"expert {e} {proj}_proj is neither a MatMul nor a MatMulNBits"
            nodes[(e, proj)] = node
    routed = _routed_sum(nodes[(experts - 1, "down")])
    if routed is None:
        return "the last expert's Mul -> ScatterND -> Add chain not found"
    return _Block(router_mm.inputs[0], router_mm.outputs[0], topk[0].outputs[0], routed, nodes)  # type: ignore[arg-type]


def _routed_sum(down: ir.Node) -> ir.Value | None:
    value = down.outputs[0]
    for op in ("Mul", "ScatterND", "Add"):
        consumers = [u.node for u in value.uses()]
        if len(consumers) != 1 or consumers[0].op_type != op:
            return None
        value = consumers[0].outputs[0]
    return value


class MoELowering(GraphPass):
    """Each sparse layer's routed experts -> one ``MoE`` (float) or ``QMoE`` (MatMulNBits weights)."""

    name = "moe"
    explain_heading = "sparse layers left in their traced form"

    def __init__(self, spec: ModelSpec, explain: Any = None) -> None:
        super().__init__()
        assert spec.moe is not None
        self.explain = explain
        self.spec, self.moe = spec, spec.moe
        #: layer -> why it keeps the traced form
        self.kept: dict[int, str] = {}

    def left_alone(self) -> list[str]:
        return [f"layer {layer}: {why}" for layer, why in self.kept.items()]

    def rewrite(self, model: Any) -> dict[str, int]:
        graph = model.graph
        self.kept.clear()
        fired = {MOE_RULE: 0, QMOE_RULE: 0, KEPT_RULE: 0}
        for layer, sparse in enumerate(self.moe.sparse_layers):
            if not sparse:
                continue
            block = _find_block(graph, layer, self.moe.num_experts)
            kind = block if isinstance(block, str) else self._kind(block)
            if isinstance(kind, str):
                self.kept[layer] = kind
                fired[KEPT_RULE] += 1
                continue
            out = self._lower(graph, layer, block, kind)  # type: ignore[arg-type]
            block.routed.replace_all_uses_with(out)  # type: ignore[union-attr]
            fired[QMOE_RULE if kind else MOE_RULE] += 1
        return fired

    def _kind(self, block: _Block) -> dict[str, int] | None | str:
        """None: float MoE; the shared MatMulNBits attributes for QMoE; or why neither."""
        ops = {n.op_type for n in block.nodes.values()}
        if ops == {"MatMul"}:
            return None
        if ops != {"MatMulNBits"}:
            return "experts mix float and quantized weights"
        attrs = set()
        for node in block.nodes.values():
            a = node.attributes
            zero_points = len(node.inputs) > 3 and node.inputs[3] is not None
            extra = len(node.inputs) > 4 and any(v is not None for v in node.inputs[4:])
            if extra:
                return "an expert MatMulNBits has a bias or g_idx"
            attrs.add((a.get_int("bits"), a.get_int("block_size"), a.get_int("accuracy_level", 0), zero_points))
        if len(attrs) != 1:
            return "experts quantized with different bits, block sizes or accuracy levels"
        bits, block, accuracy, zero_points = attrs.pop()
        return {"bits": bits, "block_size": block, "accuracy_level": accuracy, "zero_points": int(zero_points)}

    def _lower(self, graph: ir.Graph, layer: int, block: _Block, quant: dict[str, int] | None) -> ir.Value:
        moe = self.moe
        base = f"model.layers.{layer}.mlp.experts"
        attrs: dict[str, Any] = dict(
            k=moe.top_k,
            activation_type="swiglu",
            swiglu_fusion=1,
            activation_alpha=1.0,
            activation_beta=0.0,
            normalize_routing_weights=int(moe.norm_topk_prob),
        )

        def stacked(suffix: str, parts: list[Callable[[], np.ndarray]], dtype: ir.DataType, shape: tuple) -> ir.Value:
            name, full = f"{base}.{suffix}", (moe.num_experts, *shape)
            value = ir.Value(name=name, shape=ir.Shape(list(full)), type=ir.TensorType(dtype))
            value.const_value = StackedTensor(parts, dtype, full, name)
            graph.register_initializer(value)
            return value

        # the expert tensors themselves (lazy), not the nodes: those are removed after this pass
        tensors = {
            (e, proj, idx): _constant_tensor(node.inputs[idx])
            for (e, proj), node in block.nodes.items()
            for idx in range(1, min(len(node.inputs), 4))
            if node.inputs[idx] is not None
        }

        def as_activation(value: ir.Value) -> ir.Value:
            """Compact (float16-stored) scales cast to the activations' float type, as MatMulNBits read them."""
            if value.dtype == block.flat.dtype or block.flat.dtype is None:
                return value
            cast = ir.node("Cast", [value], {"to": block.flat.dtype}, name=f"{value.name}/Cast")
            cast.outputs[0].name, cast.outputs[0].dtype = f"{value.name}_cast", block.flat.dtype
            cast.outputs[0].shape = value.shape
            graph.insert_before(block.routed.producer(), cast)  # type: ignore[arg-type]
            return cast.outputs[0]

        if quant is None:
            op, inputs = "MoE", self._float_inputs(tensors, stacked)
        else:
            op, inputs = "QMoE", self._quantized_inputs(tensors, quant, stacked)
            inputs = [as_activation(v) if v is not None and v.name.endswith("_scales") else v for v in inputs]
            attrs |= {"expert_weight_bits": quant["bits"], "block_size": quant["block_size"]}
            attrs["accuracy_level"] = quant["accuracy_level"]
        node = ir.node(op, [block.flat, block.logits, *inputs], attrs, domain=MS_DOMAIN, name=f"{base}/{op}")
        graph.insert_before(block.routed.producer(), node)  # type: ignore[arg-type]
        if quant is None or moe.norm_topk_prob:
            return node.outputs[0]
        # QMoE renormalises the top-k weights: scale back by their sum (transformers does not renormalise)
        axes = _const(graph, f"{base}.sum_axes", np.array([-1]))
        total = ir.node("ReduceSum", [block.topk_values, axes], {"keepdims": 1}, name=f"{base}/topk_sum")
        scaled = ir.node("Mul", [node.outputs[0], total.outputs[0]], name=f"{base}/unnormalise")
        graph.insert_before(block.routed.producer(), [total, scaled])  # type: ignore[arg-type]
        return scaled.outputs[0]

    def _float_inputs(self, tensors: dict[tuple[int, str, int], Any], stacked: Callable[..., ir.Value]) -> list[Any]:
        """MoE's fc1 [E, 2I, H] (gate/up rows interleaved) and fc2 [E, H, I]: the [in, out] weights
        transposed back."""
        h, inter, experts = self.spec.hidden_size, self.moe.intermediate_size, self.moe.num_experts

        def w(e: int, proj: str) -> np.ndarray:
            return np.asarray(tensors[(e, proj, 1)].numpy()).T

        fc1 = [lambda e=e: _interleave(w(e, "gate"), w(e, "up")) for e in range(experts)]
        fc2 = [lambda e=e: w(e, "down") for e in range(experts)]
        return [
            stacked("fc1", fc1, ir.DataType.FLOAT, (2 * inter, h)),
            None,
            stacked("fc2", fc2, ir.DataType.FLOAT, (h, inter)),
        ]

    def _quantized_inputs(
        self, tensors: dict[tuple[int, str, int], Any], quant: dict[str, int], stacked: Callable[..., ir.Value]
    ) -> list[Any]:
        """QMoE's fc1 / fc2 codes, scales and zero points, stacked from the MatMulNBits inputs."""
        h, inter, experts = self.spec.hidden_size, self.moe.intermediate_size, self.moe.num_experts
        bits, bs = quant["bits"], quant["block_size"]

        def part(e: int, proj: str, idx: int, rows: int) -> np.ndarray:
            return np.asarray(tensors[(e, proj, idx)].numpy()).reshape(rows, -1)

        def fc1(idx: int) -> list[Callable[[], np.ndarray]]:
            return [
                lambda e=e: _interleave(part(e, "gate", idx, inter), part(e, "up", idx, inter)) for e in range(experts)
            ]

        def fc2(idx: int) -> list[Callable[[], np.ndarray]]:
            return [lambda e=e: part(e, "down", idx, h) for e in range(experts)]

        def zp_bytes(k: int) -> int:  # packed zero points per row
            return -(-(k // bs) * bits // 8)

        scale_type = tensors[(0, "gate", 2)].dtype
        out: list[Any] = [
            stacked("fc1_weights", fc1(1), ir.DataType.UINT8, (2 * inter, h * bits // 8)),
            stacked("fc1_scales", fc1(2), scale_type, (2 * inter, h // bs)),
            None,
            stacked("fc2_weights", fc2(1), ir.DataType.UINT8, (h, inter * bits // 8)),
            stacked("fc2_scales", fc2(2), scale_type, (h, inter // bs)),
            *([None] * 4),
        ]
        if quant["zero_points"]:
            out += [
                stacked("fc1_zero_points", fc1(3), ir.DataType.UINT8, (2 * inter, zp_bytes(h))),
                stacked("fc2_zero_points", fc2(3), ir.DataType.UINT8, (h, zp_bytes(inter))),
            ]
        return out


def _constant_tensor(value: ir.Value) -> Any:
    """The constant tensor ``value`` holds: an initializer's, or for compact scales (a ``Cast`` of a
    float16 initializer, :mod:`.matmulnbits`) the float16 initializer's."""
    if value.const_value is not None:
        return value.const_value
    producer = value.producer()
    if producer is not None and producer.op_type == "Cast" and producer.inputs[0] is not None:
        return producer.inputs[0].const_value
    return None


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    if name in graph.initializers:
        return graph.initializers[name]
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.INT64))
    value.const_value = ir.tensor(array.astype(np.int64), name=name)
    graph.register_initializer(value)
    return value
