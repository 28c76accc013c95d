"""The TensorRT support table and checker (qwen_export.targets.tensorrt.check) on hand-built graphs
and on the unfused export of the tiny checkpoint."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from qwen_export.errors import QwenExportError
from qwen_export.targets.tensorrt.check import (
    TENSORRT_OPS,
    TensorRTCompatibility,
    TensorRTCompatibilityError,
    check_tensorrt_graph,
)

F32, F16, I64, I4, U4, U8, BOOL = (
    ir.DataType.FLOAT,
    ir.DataType.FLOAT16,
    ir.DataType.INT64,
    ir.DataType.INT4,
    ir.DataType.UINT4,
    ir.DataType.UINT8,
    ir.DataType.BOOL,
)


def _input(name: str, dtype: ir.DataType, shape: Sequence[int | str]) -> ir.Value:
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))


def _init(name: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
    tensor = ir.tensor(array, dtype=dtype, name=name)
    return ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=tensor.shape, const_value=tensor)


def _node(op: str, inputs: Sequence[ir.Value | None], dtype: ir.DataType | None, domain: str = "", **attrs) -> ir.Node:
    node = ir.node(op, list(inputs), attributes=attrs, domain=domain, name=f"{op}_node")
    if dtype is not None:
        node.outputs[0].dtype = dtype
    return node


def _model(
    nodes: Sequence[ir.Node], inputs: Sequence[ir.Value], initializers: Sequence[ir.Value] = (), opset: int = 21
) -> ir.Model:
    imports = {"": opset}
    imports.update({n.domain: 1 for n in nodes if n.domain})
    graph = ir.Graph(
        list(inputs), [nodes[-1].outputs[0]], nodes=list(nodes), initializers=list(initializers), opset_imports=imports
    )
    return ir.Model(graph, ir_version=10)


def _softmax_model(opset: int = 21, dtype: ir.DataType = F32) -> ir.Model:
    x = _input("x", dtype, ["batch", 8])
    w = _init("w", np.ones((8, 8), dtype=np.float32 if dtype == F32 else np.float16))
    matmul = _node("MatMul", [x, w], dtype)
    softmax = _node("Softmax", [matmul.outputs[0]], dtype, axis=-1)
    return _model([matmul, softmax], [x], [w], opset=opset)


def _dq_model(
    codes: ir.Value, scale: ir.Value, zero_point: ir.Value | None = None, consumer: str = "MatMul", **attrs
) -> ir.Model:
    x = _input("x", F32, ["batch", codes.shape[0]])
    dq = _node("DequantizeLinear", [codes, scale] + ([zero_point] if zero_point is not None else []), F32, **attrs)
    if consumer == "MatMul":
        use = _node("MatMul", [x, dq.outputs[0]], F32)
        inputs = [x]
    else:
        ids = _input("ids", I64, ["batch"])
        use = _node("Gather", [dq.outputs[0], ids], F32, axis=0)
        inputs = [ids]
    inits = [v for v in (codes, scale, zero_point) if v is not None and v.const_value is not None]
    extra = [v for v in (codes,) if v.const_value is None]
    return _model([dq, use], inputs + extra, inits)


def _blocked_int4(k: int = 64, n: int = 16, block: int = 32) -> tuple[ir.Value, ir.Value]:
    codes = _init("w_codes", np.zeros((k, n), dtype=np.int8), dtype=I4)
    scale = _init("w_scales", np.full((k // block, n), 0.1, dtype=np.float32))
    return codes, scale


def _one(problems: list[str], *fragments: str) -> str:
    assert len(problems) == 1, problems
    for fragment in fragments:
        assert fragment in problems[0], problems
    return problems[0]


def test_compatible_graph_has_no_problems() -> None:
    assert check_tensorrt_graph(_softmax_model()) == []
    assert check_tensorrt_graph(_softmax_model(dtype=F16)) == []


def test_table_covers_the_decoder_ops() -> None:
    needed = (
        "Add Sub Mul Div Pow Sqrt Reciprocal Neg Cos Sin Exp Sigmoid Tanh Softmax MatMul Gemm Gather ScatterElements "
        "ScatterND Reshape Transpose Concat Slice Split Squeeze Unsqueeze Expand Shape Range Cast Where Equal Less "
        "LessOrEqual Greater GreaterOrEqual And Or Not ReduceMean ReduceSum ReduceMax Constant ConstantOfShape CumSum "
        "Trilu Identity DequantizeLinear QuantizeLinear Erf Max Min Abs"
    ).split()
    assert [op for op in needed if op not in TENSORRT_OPS] == []


def test_microsoft_op_is_reported() -> None:
    x = _input("x", F32, [2, 8])
    gamma = _init("gamma", np.ones(8, dtype=np.float32))
    norm = _node("SimplifiedLayerNormalization", [x, gamma], F32, domain="com.microsoft")
    _one(check_tensorrt_graph(_model([norm], [x], [gamma])), "com.microsoft::SimplifiedLayerNormalization", "plugin")


def test_unknown_op_is_reported() -> None:
    x = _input("x", F32, [2, 8])
    node = _node("StringNormalizer", [x], F32)
    _one(check_tensorrt_graph(_model([node], [x])), "StringNormalizer is not in TensorRT")


def test_old_opset_is_reported() -> None:
    _one(check_tensorrt_graph(_softmax_model(opset=18)), "opset 18 is below 21")


def test_disallowed_dtype_is_reported() -> None:
    x = _input("x", I64, [2, 8])
    w = _init("w", np.ones((8, 8), dtype=np.int64))
    matmul = _node("MatMul", [x, w], I64)
    problems = check_tensorrt_graph(_model([matmul], [x], [w]))
    assert problems == ["MatMul on INT64 (TensorRT allows BFLOAT16, FLOAT, FLOAT16) (MatMul_node)"]
    b = _input("b", BOOL, [4])
    add = _node("Add", [b, b], BOOL)
    _one(check_tensorrt_graph(_model([add], [b])), "Add on BOOL", "INT32, INT64")


def test_index_and_condition_inputs_have_their_own_types() -> None:
    table, ids = _input("table", F16, [10, 4]), _input("ids", I64, ["n"])
    gather = _node("Gather", [table, ids], F16, axis=0)
    assert check_tensorrt_graph(_model([gather], [table, ids])) == []
    cond, a = _input("cond", BOOL, [4]), _input("a", F32, [4])
    where = _node("Where", [cond, a, a], F32)
    assert check_tensorrt_graph(_model([where], [cond, a])) == []
    table, fids = _input("table", F16, [10, 4]), _input("fids", F32, ["n"])
    bad = _node("Gather", [table, fids], F16, axis=0)
    _one(check_tensorrt_graph(_model([bad], [table, fids])), "Gather input 1 of type FLOAT", "INT32, INT64")


def test_repeated_problems_are_grouped() -> None:
    x = _input("x", F32, [2, 8])
    nodes, prev = [], x
    for i in range(24):
        node = ir.node("FusedMatMul", [prev], domain="com.microsoft", name=f"fused_{i}")
        nodes.append(node)
        prev = node.outputs[0]
    _one(check_tensorrt_graph(_model(nodes, [x])), "com.microsoft::FusedMatMul", "24 nodes (first: fused_0)")


def _scatter_model(**attrs: object) -> ir.Model:
    data, idx, upd = _input("data", F32, [2, 8]), _input("idx", I64, [2, 1]), _input("upd", F32, [2, 1])
    return _model([_node("ScatterElements", [data, idx, upd], F32, axis=1, **attrs)], [data, idx, upd])


def test_scatter_reduction_is_reported() -> None:
    assert check_tensorrt_graph(_scatter_model()) == []
    _one(check_tensorrt_graph(_scatter_model(reduction="add")), "reduction='add'", "plugin")


def test_reduce_axes_must_be_constant() -> None:
    x = _input("x", F32, [2, 8])
    axes = _input("axes", I64, [1])
    node = _node("ReduceMean", [x, axes], F32)
    _one(check_tensorrt_graph(_model([node], [x, axes])), "ReduceMean input 1 is not a build-time constant")


def test_block_quantized_int4_weight_is_compatible() -> None:
    assert check_tensorrt_graph(_dq_model(*_blocked_int4(), axis=0, block_size=32)) == []
    zero = _init("w_zp", np.zeros((2, 16), dtype=np.int8), dtype=I4)
    assert check_tensorrt_graph(_dq_model(*_blocked_int4(), zero, axis=0, block_size=32)) == []


def test_nonzero_zero_point_is_reported() -> None:
    codes = _init("w_codes", np.zeros((64, 16), dtype=np.uint8), dtype=U4)
    scale = _init("w_scales", np.full((2, 16), 0.1, dtype=np.float32))
    zero = _init("w_zp", np.full((2, 16), 8, dtype=np.uint8), dtype=U4)
    problems = check_tensorrt_graph(_dq_model(codes, scale, zero, axis=0, block_size=32))
    assert any("zero point is not all zeros" in p and "symmetric" in p for p in problems), problems
    assert any("DequantizeLinear input of type UINT4" in p for p in problems), problems


def test_non_constant_dequantize_input_is_reported() -> None:
    codes = _input("codes", I4, [64, 16])
    scale = _init("w_scales", np.full((2, 16), 0.1, dtype=np.float32))
    problems = check_tensorrt_graph(_dq_model(codes, scale, axis=0, block_size=32))
    _one(problems, "DequantizeLinear input is not a constant initializer")


def _int8_codes() -> ir.Value:
    return _init("w_codes", np.zeros((64, 16), dtype=np.int8))


def _scales(shape: tuple[int, ...], value: float = 0.1) -> ir.Value:
    return _init("w_scales", np.full(shape, value, dtype=np.float32))


def test_dequantize_layout_rules() -> None:
    # INT8 blocks are outside what every TensorRT 10.x documents (block quantization: INT4)
    _one(
        check_tensorrt_graph(_dq_model(_int8_codes(), _scales((2, 16)), axis=0, block_size=32)),
        "block quantization of INT8",
    )
    codes, scale = _blocked_int4()
    _one(check_tensorrt_graph(_dq_model(codes, scale, axis=1, block_size=32)), "blocks dimension 0 but its axis is 1")
    codes, _ = _blocked_int4()
    _one(
        check_tensorrt_graph(_dq_model(codes, _scales((2, 16), -0.1), axis=0, block_size=32)),
        "not all strictly positive",
    )
    # per-channel and per-tensor INT8 are fine
    assert check_tensorrt_graph(_dq_model(_int8_codes(), _scales((16,)), axis=1)) == []
    assert check_tensorrt_graph(_dq_model(_int8_codes(), _scales(()))) == []


def test_dequantize_into_gather_is_reported() -> None:
    codes, scale = _blocked_int4(k=64, n=64)
    scale = _init("w_scales", np.full((64, 2), 0.1, dtype=np.float32))
    problems = check_tensorrt_graph(_dq_model(codes, scale, consumer="Gather", axis=1, block_size=32))
    _one(problems, "DequantizeLinear feeds Gather")


def test_pass_raises_on_bad_graph_and_is_a_no_op_on_good_one() -> None:
    good = _softmax_model()
    result = TensorRTCompatibility()(good)
    assert result.changed is False and result.fired == {}
    assert result.nodes_before == result.nodes_after == 2
    assert result.name == TensorRTCompatibility.name
    with pytest.raises(TensorRTCompatibilityError, match="rejected by TensorRT .*ONNX parser.*opset 18") as info:
        TensorRTCompatibility()(_softmax_model(opset=18))
    assert isinstance(info.value, QwenExportError)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_unfused_tiny_export_is_tensorrt_compatible(export: Callable[..., Path], dtype: str) -> None:
    """The standard traced graph (cleanup only, no com.microsoft fusions) uses only ops, types and
    constant inputs TensorRT 10.x's ONNX parser documents."""
    model = ir.load(export("qwen2_tied", dtype=dtype, fuse=False) / "model.onnx")
    assert model.opset_imports.get("") == 21
    assert check_tensorrt_graph(model) == []
