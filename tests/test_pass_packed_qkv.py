"""Packed QKV: counts on traced Qwen graphs, numerics against the unpacked graph, the lazy packed
weight, near misses, and the packed-QKV input of GroupQueryAttention."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import ModuleScratch
from onnx import TensorProto, helper

from qwen_export.errors import QwenExportError
from qwen_export.export.checkpoint import Checkpoint
from qwen_export.export.trace import TraceOptions, bind_weights, output_names, trace
from qwen_export.onnx_writer import write_onnx
from qwen_export.passes import packed_qkv
from qwen_export.passes.base import FusionError, op_histogram
from qwen_export.passes.cleanup import CleanupPass
from qwen_export.passes.packed_qkv import GQA_RULE, KV_RULE, QKV_RULE, ConcatTensor, PackedQKVFusion
from qwen_export.spec import DType
from qwen_export.weights import CheckpointTensor

PROJ = "model.layers.{i}.self_attn.{r}_proj.{kind}"


def _session(model: Path | ir.Model) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = str(model) if isinstance(model, Path) else ir.to_proto(model).SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


class _CountingSource:
    """A checkpoint that records which tensors were read whole."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt, self.reads = ckpt, []

    def read(self, name: str) -> np.ndarray:
        self.reads.append(name)
        return self.ckpt.read(name)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return self.ckpt.read_rows(name, start, stop)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.ckpt.shape(name)


def _written(tensor: Any, path: Path) -> bytes:
    """``tensor.write_to`` into a real file (CheckpointTensor parts use ``ndarray.tofile``)."""
    with open(path, "wb") as f:
        assert tensor.write_to(f) == tensor.nbytes
    return path.read_bytes()


def _exported(request: pytest.FixtureRequest, scratch: ModuleScratch, case: str) -> dict[str, Any]:
    """Trace + bind + cleanup, write unpacked, pack, write packed (cached per case)."""
    if case not in scratch.cache:
        ckpt = Checkpoint.open(request.getfixturevalue(case))
        source = _CountingSource(ckpt)
        model = trace(ckpt.spec, TraceOptions(dtype=DType.FP32))
        bind_weights(model, ckpt.spec, source)
        CleanupPass()(model)
        root = scratch.mkdir(f"packed_qkv_{case}")
        (root / "unpacked").mkdir()
        lazy = {name: value.const_value for name, value in model.graph.initializers.items()}
        write_onnx(model, root / "unpacked", "model.onnx", "model.onnx.data")
        for name, tensor in lazy.items():  # the writer leaves external tensors: back to the lazy ones
            model.graph.initializers[name].const_value = tensor
        ops_before = op_histogram(model)
        source.reads.clear()
        result = PackedQKVFusion(strict_expected=ckpt.spec.num_hidden_layers)(model)
        reads_during_pass = list(source.reads)
        packed = {name: value.const_value for name, value in model.graph.initializers.items() if ".qkv_proj." in name}
        (root / "packed").mkdir()
        write_onnx(model, root / "packed", "model.onnx", "model.onnx.data")
        scratch.cache[case] = {
            "ckpt": ckpt,
            "spec": ckpt.spec,
            "result": result,
            "ops": op_histogram(model),
            "ops_before": ops_before,
            "packed": packed,
            "initializers": set(model.graph.initializers),
            "reads_during_pass": reads_during_pass,
            "root": root,
        }
    return scratch.cache[case]


def _feeds(spec, batch: int = 2, past: int = 7, seq: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    feeds = {
        "input_ids": rng.integers(0, spec.vocab_size, (batch, seq)).astype(np.int64),
        "attention_mask": np.ones((batch, past + seq), np.int64),
        "position_ids": np.tile(np.arange(past, past + seq), (batch, 1)).astype(np.int64),
        "logits_indices": np.array([-2, -1], np.int64),  # --logits last: the last two rows
    }
    feeds["attention_mask"][1, :2] = 0
    for i in range(spec.num_hidden_layers):
        for kind in ("key", "value"):
            shape = (batch, spec.num_key_value_heads, past, spec.head_dim)
            feeds[f"past_key_values.{i}.{kind}"] = rng.standard_normal(shape).astype(np.float32)
    return feeds


# --- traced models ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "layers", "bias"), [("qwen2_tied", 2, True), ("qwen3", 2, False)])
def test_every_layer_packs(request, module_scratch, case: str, layers: int, bias: bool) -> None:
    built = _exported(request, module_scratch, case)
    assert built["spec"].num_hidden_layers == layers
    result, ops, before = built["result"], built["ops"], built["ops_before"]
    assert result.fired == {QKV_RULE: layers, GQA_RULE: 0}  # no GroupQueryAttention in the traced graph
    assert before["MatMul"] - ops["MatMul"] == 2 * layers
    assert ops["Split"] - before.get("Split", 0) == layers
    assert before["Add"] - ops["Add"] == (2 * layers if bias else 0)
    assert result.changed and result.nodes_after == result.nodes_before - (4 if bias else 2) * layers + layers
    for i in range(layers):
        assert f"model.layers.{i}.self_attn.qkv_proj.weight_t" in built["initializers"]
        assert (f"model.layers.{i}.self_attn.qkv_proj.bias" in built["initializers"]) is bias
        for r in "qkv":
            assert PROJ.format(i=i, r=r, kind="weight_t") not in built["initializers"]
            assert PROJ.format(i=i, r=r, kind="bias") not in built["initializers"]


@pytest.mark.parametrize("case", ["qwen2_tied", "qwen3"])
def test_packed_outputs_match_unpacked(request, module_scratch, case: str) -> None:
    built = _exported(request, module_scratch, case)
    feeds = _feeds(built["spec"])
    unpacked = _session(built["root"] / "unpacked" / "model.onnx").run(None, feeds)
    packed = _session(built["root"] / "packed" / "model.onnx").run(None, feeds)
    for a, b, name in zip(unpacked, packed, output_names(built["spec"]), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("case", ["qwen2_tied", "qwen3"])
def test_packed_weight_is_lazy_and_streams_exactly(request, module_scratch, tmp_path, monkeypatch, case: str) -> None:
    built = _exported(request, module_scratch, case)
    assert built["reads_during_pass"] == []  # the pass read no checkpoint tensor
    ckpt, spec = built["ckpt"], built["spec"]
    monkeypatch.setattr(packed_qkv, "CHUNK_BYTES", 1000)  # several row blocks
    for i in range(spec.num_hidden_layers):
        weight = built["packed"][f"model.layers.{i}.self_attn.qkv_proj.weight_t"]
        assert isinstance(weight, ConcatTensor) and all(isinstance(p, CheckpointTensor) for p in weight.parts)
        expected = np.concatenate([ckpt.read(PROJ.format(i=i, r=r, kind="weight")).T for r in "qkv"], axis=1)
        assert tuple(weight.shape) == (spec.hidden_size, spec.q_size + 2 * spec.kv_size) == expected.shape
        np.testing.assert_array_equal(weight.numpy(), expected)
        written = _written(weight, tmp_path / "weight")
        assert written == weight.tobytes() == expected.astype(np.float32).tobytes()
        bias = built["packed"].get(f"model.layers.{i}.self_attn.qkv_proj.bias")
        assert (bias is not None) is spec.qkv_bias
        if bias is not None:
            assert _written(bias, tmp_path / "bias") == bias.tobytes()
            expected = np.concatenate([ckpt.read(PROJ.format(i=i, r=r, kind="bias")) for r in "qkv"])
            np.testing.assert_array_equal(bias.numpy(), expected)


def test_strict_count_above_the_layer_count_raises(request, module_scratch) -> None:
    built = _exported(request, module_scratch, "qwen2_tied")
    model = ir.load(built["root"] / "unpacked" / "model.onnx")
    with pytest.raises(FusionError, match="fused 2 .* expected 3") as info:
        PackedQKVFusion(strict_expected=3)(model)
    assert isinstance(info.value, QwenExportError)


# --- ConcatTensor ----------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 40, 1 << 20])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_concat_tensor_write_to_is_byte_exact(monkeypatch, chunk: int, dtype) -> None:
    monkeypatch.setattr(packed_qkv, "CHUNK_BYTES", chunk)
    rng = np.random.default_rng(3)
    arrays = [rng.standard_normal((7, n)).astype(dtype) for n in (6, 3, 3)]
    calls = []

    def lazy(a: np.ndarray) -> ir.LazyTensor:
        def load() -> ir.TensorProtocol:
            calls.append(a.shape)
            return ir.tensor(a)

        return ir.LazyTensor(load, dtype=ir.tensor(a).dtype, shape=ir.Shape(a.shape))

    tensor = ConcatTensor([lazy(a) for a in arrays], axis=1, name="packed")
    assert calls == [] and tuple(tensor.shape) == (7, 12) and tensor.nbytes == 7 * 12 * np.dtype(dtype).itemsize
    f = io.BytesIO()
    assert tensor.write_to(f) == tensor.nbytes
    assert len(calls) == 3  # each part read once, whatever the block size
    expected = np.concatenate(arrays, axis=1)
    assert f.getvalue() == tensor.tobytes() == expected.tobytes()
    np.testing.assert_array_equal(tensor.numpy(), expected)

    rows = ConcatTensor([ir.tensor(a[0]) for a in arrays], axis=0)
    f = io.BytesIO()
    assert rows.write_to(f) == rows.nbytes and f.getvalue() == np.concatenate([a[0] for a in arrays]).tobytes()


def test_concat_tensor_rejects_mismatched_parts() -> None:
    with pytest.raises(ValueError, match="concatenate"):
        ConcatTensor([ir.tensor(np.zeros((4, 2), np.float32)), ir.tensor(np.zeros((5, 2), np.float32))], axis=1)
    with pytest.raises(ValueError, match="concatenate"):
        ConcatTensor([ir.tensor(np.zeros((4, 2), np.float32)), ir.tensor(np.zeros((4, 2), np.float16))], axis=1)


# --- hand-built projections ------------------------------------------------------------------------

HIDDEN, OUT = 8, {"q": 8, "k": 4, "v": 4}


def _proj_graph(
    bias: tuple[bool, bool, bool] = (True, True, True),
    names: dict[str, str] | None = None,
    k_in: int = HIDDEN,
    k_weight_input: bool = False,
    order: str = "qkv",
) -> ir.Model:
    """x -> three MatMuls (+ Adds) -> three outputs (Identity each, so they are not graph outputs)."""
    rng = np.random.default_rng(0)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", HIDDEN])]
    inits, nodes, outputs = [], [], []
    for r in order:
        w = (names or {}).get(r, PROJ.format(i=0, r=r, kind="weight_t"))
        fan_in = k_in if r == "k" else HIDDEN
        if r == "k" and k_weight_input:
            inputs.append(helper.make_tensor_value_info(w, TensorProto.FLOAT, [fan_in, OUT[r]]))
        else:
            inits.append(
                helper.make_tensor(w, TensorProto.FLOAT, [fan_in, OUT[r]], rng.standard_normal(fan_in * OUT[r]))
            )
        nodes.append(helper.make_node("MatMul", ["x", w], [f"{r}_mm"]))
        out = f"{r}_mm"
        if bias["qkv".index(r)]:
            b = PROJ.format(i=0, r=r, kind="bias")
            inits.append(helper.make_tensor(b, TensorProto.FLOAT, [OUT[r]], rng.standard_normal(OUT[r])))
            nodes.append(helper.make_node("Add", [f"{r}_mm", b], [f"{r}_add"]))
            out = f"{r}_add"
        nodes.append(helper.make_node("Identity", [out], [r]))
        outputs.append(helper.make_tensor_value_info(r, TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "qkv", inputs, outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    proto.ir_version = 10
    return ir.from_proto(proto)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("order", ["qkv", "kvq"])
def test_hand_built_projections_pack_and_match(bias: bool, order: str) -> None:
    model = _proj_graph(bias=(bias,) * 3, order=order)
    x = np.random.default_rng(2).standard_normal((2, 3, HIDDEN)).astype(np.float32)
    expected = _session(model).run(None, {"x": x})
    result = PackedQKVFusion(strict_expected=1)(model)
    assert result.fired == {QKV_RULE: 1, GQA_RULE: 0}
    assert dict(op_histogram(model)) == {"MatMul": 1, "Split": 1, "Identity": 3, **({"Add": 1} if bias else {})}
    assert "model.layers.0.self_attn.qkv_proj.weight_t" in model.graph.initializers
    got = _session(model).run(None, {"x": x})
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "near_miss",
    [
        {"k_in": HIDDEN - 2},
        {"k_weight_input": True},
        {"names": {"q": "w_q", "k": "w_k", "v": "w_v"}},
        {"names": {"q": "model.layers.0.self_attn.o_proj.weight_t"}},
        {"names": {"v": "model.layers.1.self_attn.v_proj.weight_t"}},
        {"names": {"q": "model.layers.0.self_attn.qq_proj.weight_t"}},
        {"bias": (True, False, True)},
    ],
    ids=["in_differs", "weight_not_initializer", "names", "o_proj", "other_layer", "qq_proj", "mixed_bias"],
)
def test_near_miss_does_not_pack(near_miss: dict) -> None:
    model = _proj_graph(**near_miss)
    before = op_histogram(model)
    result = PackedQKVFusion()(model)
    assert result.fired[QKV_RULE] == 0 and not result.changed
    assert op_histogram(model) == before
    with pytest.raises(FusionError, match="expected 1"):
        PackedQKVFusion(strict_expected=1)(_proj_graph(**near_miss))


def test_separate_prefixes_stay_unpacked_without_a_miss() -> None:
    """``separate`` (the layers whose q/k/v are quantized differently): left as three MatMuls, and
    neither a near miss nor a strict-count failure when the count leaves them out."""
    model = _proj_graph()
    before = op_histogram(model)
    stream = io.StringIO()
    result = PackedQKVFusion(strict_expected=0, explain=stream, separate=frozenset({"model.layers.0.self_attn."}))(
        model
    )
    assert result.fired[QKV_RULE] == 0 and not result.changed
    assert op_histogram(model) == before
    assert "model.layers.0" not in stream.getvalue()
    assert PackedQKVFusion(separate=frozenset({"model.layers.1.self_attn."}))(model).fired[QKV_RULE] == 1


@pytest.mark.parametrize("bias", [True, False])
def test_separate_prefix_packs_k_and_v_alone(bias: bool) -> None:
    """``kv`` (q quantized differently, k and v alike): q stays its own MatMul, k and v become one
    ``kv_proj`` MatMul and a 2-way Split, with the same outputs; a prefix outside ``kv`` is left."""
    model = _proj_graph(bias=(bias,) * 3)
    x = np.random.default_rng(3).standard_normal((2, 3, HIDDEN)).astype(np.float32)
    expected = _session(model).run(None, {"x": x})
    prefix = frozenset({"model.layers.0.self_attn."})
    result = PackedQKVFusion(strict_expected=0, separate=prefix, kv=prefix)(model)
    assert result.fired == {QKV_RULE: 0, KV_RULE: 1, GQA_RULE: 0}
    assert dict(op_histogram(model)) == {"MatMul": 2, "Split": 1, "Identity": 3, **({"Add": 2} if bias else {})}
    assert "model.layers.0.self_attn.kv_proj.weight_t" in model.graph.initializers
    assert "model.layers.0.self_attn.q_proj.weight_t" in model.graph.initializers
    got = _session(model).run(None, {"x": x})
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
    other = PackedQKVFusion(separate=prefix, kv=frozenset({"model.layers.1.self_attn."}))(_proj_graph())
    assert other.fired[KV_RULE] == 0 and not other.changed


def test_strict_count_above_hand_built_layers_raises() -> None:
    with pytest.raises(FusionError, match="fused 1 .* expected 2"):
        PackedQKVFusion(strict_expected=2)(_proj_graph())


# --- GroupQueryAttention packed input --------------------------------------------------------------

P, HEADS, KV_HEADS, D = 4, 2, 1, 8
Q, KV = HEADS * D, KV_HEADS * D


def _gqa_graph(
    split: bool = True, extra_consumer: bool = False, between: bool = False, swap: bool = False, B: int = 1, S: int = 3
) -> ir.Model:
    """x -> MatMul -> Split (or three projection MatMuls) -> GroupQueryAttention (batch B, new tokens S)."""
    rng = np.random.default_rng(5)
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, S, 16]),
        helper.make_tensor_value_info("past_key", TensorProto.FLOAT, [B, KV_HEADS, P, D]),
        helper.make_tensor_value_info("past_value", TensorProto.FLOAT, [B, KV_HEADS, P, D]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [B]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
    ]
    weight = (rng.standard_normal((16, Q + 2 * KV)) * 0.3).astype(np.float32)
    if split:
        inits = [
            helper.make_tensor("w_qkv", TensorProto.FLOAT, weight.shape, weight.reshape(-1)),
            helper.make_tensor("sizes", TensorProto.INT64, [3], [Q, KV, KV]),
        ]
        nodes = [
            helper.make_node("MatMul", ["x", "w_qkv"], ["qkv"]),
            helper.make_node("Split", ["qkv", "sizes"], ["q", "k", "v"], axis=-1),
        ]
    else:
        parts = np.split(weight, [Q, Q + KV], axis=1)
        inits, nodes = [], []
        for r, part in zip("qkv", parts, strict=True):
            name = PROJ.format(i=0, r=r, kind="weight_t")
            inits.append(helper.make_tensor(name, TensorProto.FLOAT, part.shape, part.reshape(-1)))
            nodes.append(helper.make_node("MatMul", ["x", name], [r]))
    query, key = ("k", "q") if swap else ("q", "k")
    if between:
        nodes.append(helper.make_node("Identity", [query], ["q_between"]))
        query = "q_between"
    outputs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("out", "present_key", "present_value")
    ]
    if extra_consumer:
        nodes.append(helper.make_node("Identity", ["v"], ["v_copy"]))
        outputs.append(helper.make_tensor_value_info("v_copy", TensorProto.FLOAT, None))
    nodes.append(
        helper.make_node(
            "GroupQueryAttention",
            [query, key, "v", "past_key", "past_value", "seqlens_k", "total_sequence_length"],
            ["out", "present_key", "present_value"],
            domain="com.microsoft",
            num_heads=HEADS,
            kv_num_heads=KV_HEADS,
            do_rotary=0,
        )
    )
    graph = helper.make_graph(nodes, "gqa", inputs, outputs, inits)
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    proto.ir_version = 10
    return ir.from_proto(proto)


def _gqa_feeds(B: int, S: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(6)
    return {
        "x": rng.standard_normal((B, S, 16)).astype(np.float32),
        "past_key": rng.standard_normal((B, KV_HEADS, P, D)).astype(np.float32),
        "past_value": rng.standard_normal((B, KV_HEADS, P, D)).astype(np.float32),
        "seqlens_k": np.full(B, P + S - 1, np.int32),
        "total_sequence_length": np.array(P + S, np.int32),
    }


def _gqa_node(model: ir.Model) -> ir.Node:
    (node,) = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    return node


# ORT's CPU GQA takes past context with several new tokens only for batch 1: prefill-like and decode shapes.
@pytest.mark.parametrize(("B", "S"), [(1, 3), (2, 1)])
@pytest.mark.parametrize("split", [True, False], ids=["split", "three_matmuls"])
def test_gqa_takes_the_packed_qkv(split: bool, B: int, S: int) -> None:
    model = _gqa_graph(split=split, B=B, S=S)
    expected = _session(model).run(None, _gqa_feeds(B, S))
    result = PackedQKVFusion()(model)
    assert result.fired == {QKV_RULE: 0 if split else 1, GQA_RULE: 1}
    assert op_histogram(model) == {"MatMul": 1, "com.microsoft::GroupQueryAttention": 1}
    gqa = _gqa_node(model)
    assert gqa.inputs[0] is not None and gqa.inputs[0].producer().op_type == "MatMul"
    assert gqa.inputs[1] is None and gqa.inputs[2] is None
    assert "sizes" not in model.graph.initializers
    assert not any(name.endswith(".split") for name in model.graph.initializers)
    got = _session(model).run(None, _gqa_feeds(B, S))
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "near_miss", [{"extra_consumer": True}, {"between": True}, {"swap": True}], ids=lambda d: next(iter(d))
)
def test_gqa_near_miss_keeps_the_split(near_miss: dict) -> None:
    model = _gqa_graph(**near_miss)
    before = op_histogram(model)
    result = PackedQKVFusion()(model)
    assert result.fired == {QKV_RULE: 0, GQA_RULE: 0} and not result.changed
    assert op_histogram(model) == before
    assert all(v is not None for v in _gqa_node(model).inputs[:3])


def test_gqa_rule_off() -> None:
    model = _gqa_graph(split=False)
    result = PackedQKVFusion(gqa=False)(model)
    assert result.fired == {QKV_RULE: 1}
    assert op_histogram(model)["Split"] == 1


@pytest.mark.parametrize(
    ("graph", "reason"),
    [
        (lambda: _proj_graph(bias=(True, False, True)), "mixed biased and unbiased"),
        (lambda: _proj_graph(k_in=HIDDEN - 2), "differ in input size"),
        (lambda: _proj_graph(k_weight_input=True), "not a constant 2-D initializer"),
        (lambda: _proj_graph(names={"v": "model.layers.1.self_attn.v_proj.weight_t"}), "several prefixes"),
        (lambda: _gqa_graph(between=True), "not GQA's query, key, value alone"),
    ],
    ids=["mixed_bias", "in_differs", "weight_not_initializer", "other_layer", "gqa_between"],
)
def test_explain_says_why(graph, reason: str) -> None:
    stream = io.StringIO()
    PackedQKVFusion(explain=stream)(graph())
    report = stream.getvalue()
    assert "--- packed_qkv: fired 0 time(s); nearest misses left:" in report
    assert "--- packed_qkv/gqa: fired 0 time(s)" in report
    assert reason in report


def test_explain_on_a_fused_graph_reports_no_misses() -> None:
    stream = io.StringIO()
    PackedQKVFusion(explain=stream)(_gqa_graph(split=False))
    assert stream.getvalue().count("(none)") == 2
    assert "packed_qkv: fired 1 time(s)" in stream.getvalue() and "packed_qkv/gqa: fired 1 time(s)" in stream.getvalue()
