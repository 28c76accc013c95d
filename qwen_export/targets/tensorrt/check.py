"""TensorRT compatibility: the ONNX ops TensorRT 10.x's ONNX parser accepts, and a checker.

The single place where the ``--target tensorrt`` support list lives. The graph for TensorRT must be
plain ONNX (default domain; opset 24 after the TensorScatter KV lowering, 21 at least): no
``com.microsoft`` ops, only ops the parser imports, with the tensor types it documents for them.
TensorRT cannot be run here, so everything below is taken from documentation and the parser's
source, for **TensorRT 10.15** (the parser documents opsets 9 to 24 for 10.15; TensorRT 10.0
documented 9 to 20; TensorScatter, which the KV update uses, is listed for 10.15):

- onnx-tensorrt ``docs/operators.md`` (TensorRT 10.15 revision), the "Supported Types" and
  "Restrictions" columns: https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md
- onnx-tensorrt ``onnxOpImporters.cpp`` (the importers): ``QuantDequantLinearHelper`` (Q/DQ:
  quantized types, zero point, scale checks, block shape, strongly-typed recommendation),
  ``ScatterElements`` (a reduction other than ``none`` is imported as the ``ScatterElements``
  plugin of libnvinfer_plugin), ``ScatterND`` (reduction must be ``none``), ``Squeeze`` (axes
  omitted needs a static input shape): https://github.com/onnx/onnx-tensorrt/blob/main/onnxOpImporters.cpp
- TensorRT operator reference (layer data types; Gather/Scatter indices are int32 or int64):
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/operators/Gather.html,
  .../operators/Scatter.html, .../operators/Dequantize.html
- ``nvinfer1::IDequantizeLayer`` (NvInfer.h, TensorRT 10): scale scalar (per-tensor), 1-D
  (per-channel) or of the input's rank (block quantization, blocked along the last or second to
  last dimension), scale/zero point of rank <= 2, all scales strictly positive, zero point a
  build-time constant containing only zeros with the input's data type:
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/c-api/classnvinfer1_1_1_i_dequantize_layer.html
- TensorRT developer guide, "Working with Quantized Types" (INT4 is weight-only; quantized types
  only by quantization from a higher-precision float type) and "Explicit Quantization" (pre-quantized
  weights need an IDequantizeLayer between the weights and the linear operator that uses them; use
  explicit quantization with strong typing):
  https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/work-with-quantized-types.html,
  https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/quantized-types-explicit-quantization.html

Restrictions that only show at build time (shapes, values) are not all checked: the checker reads
op types, domains, the opset, value dtypes where known, a few attributes, and constness.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
import onnx_ir as ir

from qwen_export.errors import QwenExportError
from qwen_export.passes.base import GraphPass, constant_array

#: The TensorRT release the table is for, and the opsets its ONNX parser documents.
TENSORRT_VERSION = "10.15"
TENSORRT_OPSET_RANGE = (9, 24)
#: The opset the TensorRT target exports.
REQUIRED_OPSET = 21

_D = ir.DataType
FLOAT = frozenset({_D.FLOAT, _D.FLOAT16, _D.BFLOAT16})
FLOAT_INT = FLOAT | {_D.INT32, _D.INT64}
FLOAT_INT_BOOL = FLOAT_INT | {_D.BOOL}
BOOL = frozenset({_D.BOOL})
INDEX = frozenset({_D.INT32, _D.INT64})  # Gather/Scatter indices, Slice starts/ends/axes/steps, ...
INT64 = frozenset({_D.INT64})  # shape-like inputs (Reshape shape, Expand shape, axes, ...)
ANY: frozenset[ir.DataType] = frozenset()  # not checked
_EMPTY: Mapping[int, frozenset[ir.DataType]] = MappingProxyType({})


@dataclasses.dataclass(frozen=True)
class AttributeRule:
    """An attribute whose value TensorRT restricts (``default`` when the attribute is absent)."""

    name: str
    default: Any
    allowed: tuple[Any, ...]
    why: str


@dataclasses.dataclass(frozen=True)
class OpSupport:
    """One row of onnx-tensorrt's operators.md (TensorRT 10.15), as the checker reads it.

    ``dtypes`` is the documented "Supported Types" column: it applies to the inputs in
    ``typed_inputs`` (None: every input not in ``other_inputs``) and to the outputs (unless
    ``other_outputs`` gives an output its own set). ``other_inputs`` / ``other_outputs`` map a
    position to the dtypes allowed there (indices, shapes, axes, conditions; ``ANY``: unchecked).
    ``constant_inputs`` must be build-time constants (initializer or ``Constant``).
    """

    dtypes: frozenset[ir.DataType]
    typed_inputs: tuple[int, ...] | None = None
    other_inputs: Mapping[int, frozenset[ir.DataType]] = dataclasses.field(default_factory=lambda: _EMPTY)
    other_outputs: Mapping[int, frozenset[ir.DataType]] = dataclasses.field(default_factory=lambda: _EMPTY)
    constant_inputs: tuple[int, ...] = ()
    attributes: tuple[AttributeRule, ...] = ()
    min_opset: int = 1  # the opset that introduced the op (TensorScatter 24, Attention 23, ...)
    max_outputs: int | None = None
    restriction: str = ""


def _m(**kwargs: frozenset[ir.DataType]) -> Mapping[int, frozenset[ir.DataType]]:
    return MappingProxyType({int(k[1:]): v for k, v in kwargs.items()})


def _ops(names: str, support: OpSupport) -> dict[str, OpSupport]:
    return dict.fromkeys(names.split(), support)


_COMPARE = OpSupport(FLOAT_INT, other_outputs=_m(o0=BOOL))
_REDUCE = OpSupport(
    FLOAT_INT,
    typed_inputs=(0,),
    other_inputs=_m(i1=INT64),
    constant_inputs=(1,),
    restriction="axes must be an initializer",
)
_DATA_AND_SHAPE = OpSupport(FLOAT_INT_BOOL, typed_inputs=(0,), other_inputs=_m(i1=INT64))

#: op type -> what TensorRT 10.15's ONNX parser accepts (default domain only).
TENSORRT_OPS: Mapping[str, OpSupport] = MappingProxyType(
    {
        # element-wise arithmetic
        **_ops("Add Sub Mul Div Max Min Sum Mod Abs Neg Sign", OpSupport(FLOAT_INT)),
        "Mean": OpSupport(FLOAT_INT | {_D.FLOAT8E4M3FN}),
        "Pow": OpSupport(FLOAT_INT),
        **_ops(
            "Sqrt Reciprocal Exp Log Erf Cos Sin Tan Acos Asin Atan Cosh Sinh Acosh Asinh Atanh Tanh Sigmoid "
            "Floor Ceil Round Softplus Softsign Elu Selu LeakyRelu HardSigmoid HardSwish Celu ThresholdedRelu",
            OpSupport(FLOAT),
        ),
        "Relu": OpSupport(FLOAT_INT),
        "Gelu": OpSupport(FLOAT_INT | {_D.INT8}),
        "Mish": OpSupport(frozenset({_D.FLOAT, _D.FLOAT16})),
        "Clip": OpSupport(FLOAT),
        "PRelu": OpSupport(FLOAT),
        # comparison and logic
        **_ops("Equal Less LessOrEqual Greater GreaterOrEqual", _COMPARE),
        "IsNaN": _COMPARE,
        "IsInf": OpSupport(FLOAT, other_outputs=_m(o0=BOOL)),
        **_ops("And Or Xor Not", OpSupport(BOOL)),
        "Where": OpSupport(FLOAT_INT_BOOL, typed_inputs=(1, 2), other_inputs=_m(i0=BOOL)),
        # normalisation, softmax, matrix products
        **_ops("Softmax LogSoftmax", OpSupport(FLOAT)),
        "LayerNormalization": OpSupport(FLOAT, max_outputs=1, restriction="only the first output Y is supported"),
        "RMSNormalization": OpSupport(FLOAT, min_opset=23),
        "MatMul": OpSupport(FLOAT),
        "Gemm": OpSupport(FLOAT),
        "Einsum": OpSupport(FLOAT),
        # reductions (axes is input 1 from opset 18)
        **_ops(
            "ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp "
            "ReduceSumSquare",
            _REDUCE,
        ),
        "ArgMax": OpSupport(FLOAT_INT, other_outputs=_m(o0=INT64)),
        "ArgMin": OpSupport(FLOAT_INT, other_outputs=_m(o0=INT64)),
        "CumSum": OpSupport(
            FLOAT,
            typed_inputs=(0,),
            other_inputs=_m(i1=INDEX),
            constant_inputs=(1,),
            restriction="axis must be a build-time constant",
        ),
        "TopK": OpSupport(
            FLOAT_INT,
            typed_inputs=(0,),
            other_inputs=_m(i1=INT64),
            other_outputs=_m(o1=INT64),
            attributes=(AttributeRule("sorted", 1, (1,), "TensorRT's TopK requires sorted=1"),),
            restriction="sorted must be 1; K must be less than 3840",
        ),
        # indexing
        **_ops(
            "Gather GatherElements GatherND",
            OpSupport(FLOAT_INT_BOOL, typed_inputs=(0,), other_inputs=_m(i1=INDEX)),
        ),
        "ScatterElements": OpSupport(
            FLOAT_INT,
            typed_inputs=(0, 2),
            other_inputs=_m(i1=INDEX),
            attributes=(
                AttributeRule(
                    "reduction",
                    "none",
                    ("none",),
                    "a reduction other than 'none' is imported as the ScatterElements plugin of libnvinfer_plugin, "
                    "not a built-in layer",
                ),
            ),
        ),
        "ScatterND": OpSupport(
            FLOAT_INT,
            typed_inputs=(0, 2),
            other_inputs=_m(i1=INDEX),
            attributes=(AttributeRule("reduction", "none", ("none",), "ScatterND with reduction is not supported"),),
        ),
        "TensorScatter": OpSupport(
            FLOAT | {_D.INT32},
            typed_inputs=(0, 1),
            other_inputs=_m(i2=INDEX),
            min_opset=24,
            restriction="past_cache and update must be 4D; axis must be -2",
        ),
        "OneHot": OpSupport(
            FLOAT_INT_BOOL, typed_inputs=(2,), other_inputs=_m(i0=INDEX, i1=FLOAT_INT), constant_inputs=(1,)
        ),
        "NonZero": OpSupport(FLOAT, other_outputs=_m(o0=INT64)),
        "Trilu": OpSupport(FLOAT_INT_BOOL, typed_inputs=(0,), other_inputs=_m(i1=INT64)),
        # shape manipulation
        **_ops("Reshape Expand Tile", _DATA_AND_SHAPE),
        **_ops(
            "Squeeze Unsqueeze",
            OpSupport(
                FLOAT_INT_BOOL,
                typed_inputs=(0,),
                other_inputs=_m(i1=INT64),
                restriction="axes must be resolvable to a constant",
            ),
        ),
        **_ops("Transpose Concat Identity Flatten", OpSupport(FLOAT_INT_BOOL)),
        "Slice": OpSupport(FLOAT_INT_BOOL, typed_inputs=(0,), other_inputs=_m(i1=INDEX, i2=INDEX, i3=INDEX, i4=INDEX)),
        "Split": OpSupport(FLOAT_INT_BOOL, typed_inputs=(0,), other_inputs=_m(i1=INT64)),
        "Pad": OpSupport(FLOAT_INT, typed_inputs=(0, 2), other_inputs=_m(i1=INT64, i3=INDEX)),
        "Shape": OpSupport(FLOAT_INT_BOOL, other_outputs=_m(o0=INT64)),
        "Size": OpSupport(FLOAT_INT_BOOL, other_outputs=_m(o0=INT64)),
        "Range": OpSupport(FLOAT_INT),
        # constants and types
        **_ops(
            "Constant ConstantOfShape",
            OpSupport(
                FLOAT | {_D.FLOAT8E4M3FN, _D.FLOAT4E2M1, _D.INT4, _D.INT32, _D.INT64, _D.BOOL},
                typed_inputs=(),
                other_inputs=_m(i0=INT64),
            ),
        ),
        **_ops("Cast CastLike", OpSupport(FLOAT_INT_BOOL | {_D.UINT8})),
        "Dropout": OpSupport(FLOAT, typed_inputs=(0,), other_inputs=_m(i1=ANY, i2=ANY), other_outputs=_m(o1=ANY)),
        # quantization: dtypes here are the float side; the quantized side is checked by _check_qdq
        "DequantizeLinear": OpSupport(
            FLOAT,
            typed_inputs=(1,),
            other_inputs=_m(i0=ANY, i2=ANY),
            constant_inputs=(1,),
            restriction="x_zero_point must be zero",
        ),
        "QuantizeLinear": OpSupport(
            FLOAT,
            typed_inputs=(0, 1),
            other_inputs=_m(i2=ANY),
            other_outputs=_m(o0=ANY),
            constant_inputs=(1,),
            restriction="y_zero_point must be 0",
        ),
        # attention (opset 23): documented, but not usable in an opset-21 graph
        "Attention": OpSupport(
            FLOAT | {_D.INT8, _D.FLOAT8E4M3FN},
            typed_inputs=(0, 1, 2),
            other_inputs=_m(i3=ANY),
            min_opset=23,
            max_outputs=1,
            restriction="Q, K, V and attn_mask must be 4D; past_key/past_value/nonpad_kv_seqlen inputs and "
            "present_key/present_value/qk_matmul_output outputs are unsupported",
        ),
        "RotaryEmbedding": OpSupport(FLOAT, typed_inputs=(0, 1, 2), other_inputs=_m(i3=INT64), min_opset=23),
        # control flow: dtypes of subgraph nodes are checked node by node
        **_ops("If Loop", OpSupport(ANY, typed_inputs=())),
    }
)


@dataclasses.dataclass(frozen=True)
class DequantizeSupport:
    """What TensorRT 10.x documents for ``DequantizeLinear`` used for weight-only quantization."""

    #: input (x) types: INT8, FP8 (E4M3) and FP4 (E2M1) quantize activations and weights, INT4
    #: weights only. UINT8 only on DLA (parser flag); UINT4 has no TensorRT type.
    input_dtypes: frozenset[ir.DataType]
    #: x types allowed with block quantization (scale of x's rank) in every 10.x release (the
    #: 10.x Dequantize operator page: "2-D tensor for block quantization (supported for kINT4 only)").
    block_dtypes: frozenset[ir.DataType]
    #: scale types (the output type defaults to the scale's)
    scale_dtypes: frozenset[ir.DataType]
    #: max rank of scale / zero point ("a rank that is lower or equal to 2")
    max_scale_rank: int
    #: x must be a build-time constant (weight-only: INT4 is weights-only; we quantize weights only)
    input_must_be_constant: bool
    #: ops a weight DQ is documented in front of ("an IDequantizeLayer is required between the
    #: weights and the linear operator that uses them"); Gather (a quantized embedding) is not one
    consumers: frozenset[str]


DEQUANTIZE = DequantizeSupport(
    input_dtypes=frozenset({_D.INT8, _D.INT4, _D.FLOAT8E4M3FN, _D.FLOAT4E2M1}),
    block_dtypes=frozenset({_D.INT4}),
    scale_dtypes=FLOAT,
    max_scale_rank=2,
    input_must_be_constant=True,
    consumers=frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"}),
)


class TensorRTCompatibilityError(QwenExportError):
    """The graph uses ops, types or patterns TensorRT's ONNX parser rejects."""


def _is_constant(value: ir.Value | None) -> bool:
    if value is None:
        return False
    if value.const_value is not None or value.is_initializer():
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx")


def _dtype(value: ir.Value | None) -> ir.DataType | None:
    return None if value is None else value.dtype


def _names(dtypes: frozenset[ir.DataType]) -> str:
    return ", ".join(sorted(d.name for d in dtypes))


def _check_types(node: ir.Node, spec: OpSupport, report: Any) -> None:
    messages: dict[str, None] = {}  # one message per distinct problem of the node, in order
    for i, value in enumerate(node.inputs):
        dtype = _dtype(value)
        if dtype is None:
            continue
        if i in spec.other_inputs:
            allowed = spec.other_inputs[i]
            if allowed and dtype not in allowed:
                messages[f"{node.op_type} input {i} of type {dtype.name} (TensorRT allows {_names(allowed)})"] = None
        elif (spec.typed_inputs is None or i in spec.typed_inputs) and spec.dtypes and dtype not in spec.dtypes:
            messages[f"{node.op_type} on {dtype.name} (TensorRT allows {_names(spec.dtypes)})"] = None
    for i, value in enumerate(node.outputs):
        dtype = value.dtype
        if dtype is None:
            continue
        if i in spec.other_outputs:
            allowed = spec.other_outputs[i]
            if allowed and dtype not in allowed:
                messages[f"{node.op_type} output {i} of type {dtype.name} (TensorRT allows {_names(allowed)})"] = None
        elif spec.dtypes and dtype not in spec.dtypes:
            messages[f"{node.op_type} on {dtype.name} (TensorRT allows {_names(spec.dtypes)})"] = None
    for message in messages:
        report(node, message)


def _check_rules(node: ir.Node, spec: OpSupport, opset: int, report: Any) -> None:
    if opset < spec.min_opset:
        report(node, f"{node.op_type} needs opset {spec.min_opset} (the model imports {opset})")
    for i in spec.constant_inputs:
        if i < len(node.inputs) and node.inputs[i] is not None and not _is_constant(node.inputs[i]):
            report(node, f"{node.op_type} input {i} is not a build-time constant ({spec.restriction or 'required'})")
    for rule in spec.attributes:
        attr = node.attributes.get(rule.name)
        value = rule.default if attr is None else attr.value
        if value not in rule.allowed:
            report(node, f"{node.op_type} {rule.name}={value!r}: {rule.why}")
    if spec.max_outputs is not None:
        used = [i for i, v in enumerate(node.outputs) if i >= spec.max_outputs and (v.uses() or v.is_graph_output())]
        if used:
            report(node, f"{node.op_type} uses output(s) {used}: {spec.restriction}")
    if node.op_type == "Squeeze" and (len(node.inputs) < 2 or node.inputs[1] is None):
        shape = node.inputs[0].shape if node.inputs and node.inputs[0] is not None else None
        if shape is None or not shape.is_static():
            report(node, "Squeeze without axes on an input of dynamic shape (TensorRT cannot infer the axes)")


def _check_zero_point(node: ir.Node, zero_point: ir.Value | None, x_dtype: ir.DataType | None, report: Any) -> None:
    if zero_point is None:
        return
    if not _is_constant(zero_point):
        report(node, f"{node.op_type} zero point is not a build-time constant (TensorRT needs an all-zero constant)")
        return
    array = constant_array(zero_point, limit=1 << 62)
    if array is None and zero_point.producer() is not None:
        attr = zero_point.producer().attributes.get("value")
        array = None if attr is None else np.asarray(attr.value.numpy())
    if array is not None and np.any(array.astype(np.int64) != 0):
        report(node, f"{node.op_type} zero point is not all zeros (TensorRT supports symmetric quantization only)")
    if x_dtype is not None and zero_point.dtype is not None and zero_point.dtype != x_dtype:
        report(node, f"{node.op_type} zero point type {zero_point.dtype.name} differs from the input's {x_dtype.name}")


def _check_dequantize(node: ir.Node, report: Any) -> None:
    x = node.inputs[0] if node.inputs else None
    scale = node.inputs[1] if len(node.inputs) > 1 else None
    zero_point = node.inputs[2] if len(node.inputs) > 2 else None
    x_dtype = _dtype(x)
    if x_dtype is not None and x_dtype not in DEQUANTIZE.input_dtypes:
        report(
            node,
            f"DequantizeLinear input of type {x_dtype.name} (TensorRT dequantizes {_names(DEQUANTIZE.input_dtypes)}; "
            "UINT8 only on DLA)",
        )
    if DEQUANTIZE.input_must_be_constant and not _is_constant(x):
        report(
            node, "DequantizeLinear input is not a constant initializer (weight-only quantization needs constant codes)"
        )
    _check_zero_point(node, zero_point, x_dtype, report)
    if scale is not None and scale.dtype is not None and scale.dtype not in DEQUANTIZE.scale_dtypes:
        report(
            node,
            f"DequantizeLinear scale of type {scale.dtype.name} (TensorRT allows {_names(DEQUANTIZE.scale_dtypes)})",
        )
    scales = constant_array(scale, limit=1 << 62) if scale is not None else None
    if scales is not None and not np.all(scales.astype(np.float32) > 0):
        report(node, "DequantizeLinear scales are not all strictly positive")
    output_dtype = node.attributes.get_int("output_dtype", 0)
    if output_dtype and ir.DataType(output_dtype) not in FLOAT:
        report(
            node, f"DequantizeLinear output_dtype {ir.DataType(output_dtype).name} (TensorRT allows {_names(FLOAT)})"
        )
    _check_granularity(node, x, scale, x_dtype, report)
    for use in node.outputs[0].uses():
        if use.node.op_type not in DEQUANTIZE.consumers:
            report(
                node,
                f"DequantizeLinear feeds {use.node.op_type} (TensorRT documents weight dequantization only in front "
                f"of {', '.join(sorted(DEQUANTIZE.consumers))})",
            )


def _check_granularity(
    node: ir.Node, x: ir.Value | None, scale: ir.Value | None, x_dtype: ir.DataType | None, report: Any
) -> None:
    if x is None or scale is None or x.shape is None or scale.shape is None:
        return
    rank, scale_rank = x.shape.rank(), scale.shape.rank()
    axis = node.attributes.get_int("axis", 1)
    axis = axis + rank if axis < 0 else axis
    if scale_rank > DEQUANTIZE.max_scale_rank:
        report(
            node, f"DequantizeLinear scale of rank {scale_rank} (TensorRT allows rank <= {DEQUANTIZE.max_scale_rank})"
        )
    if scale_rank == 0 or (scale.shape.is_static() and int(np.prod(scale.shape.numpy())) == 1):
        return  # per-tensor
    if scale_rank == 1:  # per-channel
        if not 0 <= axis < rank:
            report(node, f"DequantizeLinear axis {axis} out of range for an input of rank {rank}")
        elif isinstance(x.shape[axis], int) and isinstance(scale.shape[0], int) and x.shape[axis] != scale.shape[0]:
            report(node, f"DequantizeLinear has {scale.shape[0]} scales for {x.shape[axis]} channels on axis {axis}")
        return
    if scale_rank != rank:
        report(node, f"DequantizeLinear scale of rank {scale_rank} for an input of rank {rank}")
        return
    if x_dtype is not None and x_dtype not in DEQUANTIZE.block_dtypes:
        report(
            node,
            f"DequantizeLinear block quantization of {x_dtype.name} "
            f"(TensorRT 10.x blocks {_names(DEQUANTIZE.block_dtypes)} only)",
        )
    if not (x.shape.is_static() and scale.shape.is_static()):
        return
    blocked = [d for d in range(rank) if x.shape[d] != scale.shape[d]]
    block_size = node.attributes.get_int("block_size", 0)
    if len(blocked) != 1:
        report(node, f"DequantizeLinear blocks {len(blocked)} dimensions (TensorRT allows exactly one)")
        return
    dim = blocked[0]
    if dim < rank - 2:
        report(node, f"DequantizeLinear blocks dimension {dim} of {rank} (TensorRT: the last or second to last only)")
    if dim != axis:
        report(node, f"DequantizeLinear blocks dimension {dim} but its axis is {axis}")
    if x.shape[dim] % scale.shape[dim] or (block_size and x.shape[dim] != block_size * scale.shape[dim]):
        report(
            node,
            f"DequantizeLinear block size {block_size} does not tile {x.shape[dim]} into {scale.shape[dim]} blocks",
        )


def _check_quantize(node: ir.Node, report: Any) -> None:
    zero_point = node.inputs[2] if len(node.inputs) > 2 else None
    _check_zero_point(node, zero_point, _dtype(zero_point), report)
    out = node.outputs[0].dtype
    if out is not None and out not in DEQUANTIZE.input_dtypes:
        report(node, f"QuantizeLinear to {out.name} (TensorRT quantizes to {_names(DEQUANTIZE.input_dtypes)})")


def check_tensorrt_graph(model: ir.Model) -> list[str]:
    """Problems that would make TensorRT 10.x's ONNX parser (or builder) reject ``model``: one line
    each, repeated problems grouped ("...: 24 nodes (first: name)"). Empty: compatible."""
    found: Counter[str] = Counter()
    first: dict[str, str] = {}

    def report(node: ir.Node | None, message: str) -> None:
        found[message] += 1
        first.setdefault(message, "" if node is None else (node.name or node.op_type))

    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    low, high = TENSORRT_OPSET_RANGE
    if opset < REQUIRED_OPSET:
        report(None, f"default-domain opset {opset} is below {REQUIRED_OPSET}, the TensorRT target's opset")
    if not low <= opset <= high:
        report(
            None, f"default-domain opset {opset} is outside {low}..{high}, the range TensorRT {TENSORRT_VERSION} parses"
        )
    for node in model.graph.all_nodes():
        if node.domain not in ("", "ai.onnx"):
            report(node, f"{node.domain}::{node.op_type} is not a standard ONNX op (TensorRT needs a plugin for it)")
            continue
        spec = TENSORRT_OPS.get(node.op_type)
        if spec is None:
            report(node, f"{node.op_type} is not in TensorRT {TENSORRT_VERSION}'s supported ONNX operators")
            continue
        _check_types(node, spec, report)
        _check_rules(node, spec, opset, report)
        if node.op_type == "DequantizeLinear":
            _check_dequantize(node, report)
        elif node.op_type == "QuantizeLinear":
            _check_quantize(node, report)
    problems = []
    for message, count in found.items():
        where = first[message]
        if count > 1:
            problems.append(f"{message}: {count} nodes (first: {where})")
        else:
            problems.append(f"{message} ({where})" if where else message)
    return problems


class TensorRTCompatibility(GraphPass):
    """Check-only pass: raise :class:`TensorRTCompatibilityError` when the graph is not importable
    by TensorRT's ONNX parser; changes nothing."""

    name = "tensorrt_compatibility"

    def rewrite(self, model: ir.Model) -> dict[str, int]:
        problems = check_tensorrt_graph(model)
        if problems:
            raise TensorRTCompatibilityError(
                f"the graph would be rejected by TensorRT {TENSORRT_VERSION}'s ONNX parser (onnx-tensorrt): "
                + "; ".join(problems)
            )
        return {}
