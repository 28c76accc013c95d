"""RMSNorm fusion: counts on traced Qwen graphs, numerics against the unfused graph, near misses."""

from __future__ import annotations

from pathlib import Path

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
from qwen_export.passes.base import op_histogram
from qwen_export.passes.cleanup import CleanupPass
from qwen_export.passes.rmsnorm import RMS_RULE, SKIP_RULE, FusionError, RMSNormFusion
from qwen_export.spec import DType


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _exported(request: pytest.FixtureRequest, scratch: ModuleScratch, case: str, dtype: DType):
    """Trace + bind + cleanup, write unfused, fuse, write fused (cached per case and dtype)."""
    key = (case, dtype)
    if key not in scratch.cache:
        ckpt = Checkpoint.open(request.getfixturevalue(case))
        model = trace(ckpt.spec, TraceOptions(dtype=dtype))
        bind_weights(model, ckpt.spec, ckpt)
        CleanupPass()(model)
        root = scratch.mkdir(f"rmsnorm_{case}_{dtype.value}")
        (root / "unfused").mkdir()
        write_onnx(model, root / "unfused", "model.onnx", "model.onnx.data")
        ops_before = op_histogram(model)
        result = RMSNormFusion()(model)
        (root / "fused").mkdir()
        write_onnx(model, root / "fused", "model.onnx", "model.onnx.data")
        scratch.cache[key] = {
            "spec": ckpt.spec,
            "result": result,
            "ops": op_histogram(model),
            "ops_before": ops_before,
            "root": root,
        }
    return scratch.cache[key]


def _feeds(spec, np_dtype: type, batch: int = 2, past: int = 7, seq: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    feeds = {
        "input_ids": rng.integers(0, spec.vocab_size, (batch, seq)).astype(np.int64),
        "attention_mask": np.ones((batch, past + seq), np.int64),
        "position_ids": np.tile(np.arange(past, past + seq), (batch, 1)).astype(np.int64),
        "logits_indices": np.array([-1], np.int64),  # --logits last: the last row
    }
    feeds["attention_mask"][1, :2] = 0
    for i in range(spec.num_hidden_layers):
        for kind in ("key", "value"):
            shape = (batch, spec.num_key_value_heads, past, spec.head_dim)
            feeds[f"past_key_values.{i}.{kind}"] = rng.standard_normal(shape).astype(np_dtype)
    return feeds


@pytest.mark.parametrize(
    ("case", "layers", "qk_norm"), [("qwen2_tied", 2, False), ("qwen2_sliding", 3, False), ("qwen3", 2, True)]
)
def test_every_norm_fuses(request, module_scratch, case: str, layers: int, qk_norm: bool) -> None:
    built = _exported(request, module_scratch, case, DType.FP32)
    assert built["spec"].num_hidden_layers == layers
    expected = 2 * layers + 1 + (2 * layers if qk_norm else 0)
    result, ops = built["result"], built["ops"]
    assert result.fired[RMS_RULE] == expected
    # Every norm takes a residual Add except layer 0's input norm (the embedding); the final norm
    # (logits=last) takes the pruned last layer's [B, K, H] sum (K: the logits_indices rows)
    # directly. The per-head q/k norms take a Reshape.
    assert result.fired[SKIP_RULE] == 2 * layers
    assert ops["SimplifiedLayerNormalization"] == expected - 2 * layers
    assert ops["com.microsoft::SkipSimplifiedLayerNormalization"] == 2 * layers
    for op in ("Pow", "Sqrt", "Reciprocal", "ReduceMean"):
        assert op not in ops, op
    assert result.changed and result.nodes_after < result.nodes_before


@pytest.mark.parametrize("case", ["qwen2_tied", "qwen3"])
def test_fused_outputs_match_unfused(request, module_scratch, case: str) -> None:
    built = _exported(request, module_scratch, case, DType.FP32)
    feeds = _feeds(built["spec"], np.float32)
    unfused = _session(built["root"] / "unfused" / "model.onnx").run(None, feeds)
    fused = _session(built["root"] / "fused" / "model.onnx").run(None, feeds)
    for a, b, name in zip(unfused, fused, output_names(built["spec"]), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4, err_msg=name)


def test_fp16_graph_fuses_through_the_casts(request, module_scratch) -> None:
    built = _exported(request, module_scratch, "qwen2_tied", DType.FP16)
    assert built["result"].fired[RMS_RULE] == 5
    assert built["result"].fired[SKIP_RULE] == 4
    assert built["ops_before"]["Cast"] - built["ops"]["Cast"] == 2 * 5  # x -> float32 -> x.dtype per norm
    feeds = _feeds(built["spec"], np.float16)
    unfused = _session(built["root"] / "unfused" / "model.onnx").run(None, feeds)
    fused = _session(built["root"] / "fused" / "model.onnx").run(None, feeds)
    for a, b, name in zip(unfused, fused, output_names(built["spec"]), strict=True):
        np.testing.assert_allclose(b.astype(np.float32), a.astype(np.float32), rtol=2e-2, atol=2e-2, err_msg=name)


# --- hand-built graphs -----------------------------------------------------------------------------

HIDDEN = 8


def _norm_graph(
    exponent: float = 2.0,
    axes: tuple[int, ...] = (-1,),
    keepdims: int = 1,
    sqrt: bool = True,
    eps_input: bool = False,
    weight_size: int = HIDDEN,
) -> ir.Model:
    rng = np.random.default_rng(0)
    inits = [
        helper.make_tensor("two", TensorProto.FLOAT, [], [exponent]),
        helper.make_tensor("axes", TensorProto.INT64, [len(axes)], list(axes)),
        helper.make_tensor("weight", TensorProto.FLOAT, [weight_size], rng.standard_normal(weight_size).tolist()),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", HIDDEN])]
    if eps_input:
        inputs.append(helper.make_tensor_value_info("eps", TensorProto.FLOAT, []))
    else:
        inits.append(helper.make_tensor("eps", TensorProto.FLOAT, [], [1e-6]))
    nodes = [
        helper.make_node("Pow", ["x", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["mean"], keepdims=keepdims),
        helper.make_node("Add", ["mean", "eps"], ["var"]),
        helper.make_node("Sqrt", ["var"], ["std"]) if sqrt else helper.make_node("Identity", ["var"], ["std"]),
        helper.make_node("Reciprocal", ["std"], ["inv"]),
        helper.make_node("Mul", ["x", "inv"], ["normed"]),
        helper.make_node("Mul", ["weight", "normed"], ["y"]),
    ]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "norm", inputs, [out], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    proto.ir_version = 10
    return ir.from_proto(proto)


def test_hand_built_norm_fuses_and_matches_numpy() -> None:
    model = _norm_graph()
    result = RMSNormFusion(strict_expected=1)(model)
    assert result.fired == {RMS_RULE: 1, SKIP_RULE: 0}
    assert dict(op_histogram(model)) == {"SimplifiedLayerNormalization": 1}
    x = np.random.default_rng(2).standard_normal((2, 3, HIDDEN)).astype(np.float32)
    weight = model.graph.initializers["weight"].const_value.numpy()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x})
    expected = weight * x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "near_miss",
    [
        {"exponent": 3.0},
        {"axes": (1,)},
        {"axes": (1, 2)},
        {"keepdims": 0},
        {"sqrt": False},
        {"eps_input": True},
        {"weight_size": 1},
    ],
    ids=lambda d: next(iter(d)) + "=" + str(next(iter(d.values()))),
)
def test_near_miss_does_not_fuse(near_miss: dict) -> None:
    model = _norm_graph(**near_miss)
    before = op_histogram(model)
    result = RMSNormFusion()(model)
    assert result.fired[RMS_RULE] == 0 and not result.changed
    assert op_histogram(model) == before
    with pytest.raises(FusionError, match="expected 1") as info:
        RMSNormFusion(strict_expected=1)(_norm_graph(**near_miss))
    assert isinstance(info.value, QwenExportError)
