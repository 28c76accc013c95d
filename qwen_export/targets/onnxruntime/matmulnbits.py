"""ONNX Runtime lowering of the quantized weights: ``DequantizeLinear`` -> ``com.microsoft`` ops.

Runs after :mod:`.quantize`. Each ``DequantizeLinear(codes, scales[, zero_points], axis,
block_size)`` of constant, 2-D, int4/uint4/int8/uint8 codes is matched with its consumers:

- ``matmulnbits``: ``MatMul(x, DQ(W, axis=0))`` [K, N] -> ``MatMulNBits(x, B, scales[, zero_points]
  [, bias], K, N, bits, block_size, accuracy_level)``. A following ``Add(., bias)`` of a constant
  1-D bias [N] (Qwen2's packed q/k/v bias) becomes MatMulNBits' ``bias`` input;
- ``gather_block_quantized``: ``Gather(DQ(E, axis=1), ids)`` [V, H] ->
  ``GatherBlockQuantized(data, ids, scales[, zero_points], gather_axis=0)``;
- ``tied_lm_head``: ``Gemm(x, DQ(E, axis=1), transB=1)`` (alpha 1, no C) -> ``MatMulNBits`` with
  K = H, N = V. The embedding's rows are MatMulNBits' weight columns quantized along K, so the tied
  head and ``GatherBlockQuantized`` share one packed ``data`` initializer [V, H/B, B*bits/8]
  (GatherBlockQuantized then reads it with ``quantize_axis=2``, scales [V, H/B, 1], and its output
  is reshaped to [..., H]). Only the small scales and zero points are stored twice: ORT checks
  MatMulNBits' scales to be [N * K/B] or [N, K/B], and GatherBlockQuantized's to have data's rank.

Codes are stored unsigned, as both ops want: signed codes + 2^(bits-1) (the ops' default zero point
when ``zero_points`` is omitted), unsigned codes with their zero points packed like the codes.
The new initializers are lazy: computed from the ``DequantizeLinear`` inputs (themselves lazy, see
:mod:`.quantize`) when the model is written, one weight at a time.

A ``DequantizeLinear`` with any other consumer, or one that does not fit the ops (a block size
that is not a power of two >= 16, rank != 2, a Gemm with alpha/beta/C), is left alone.

``compact_scales`` (the target's default): float32 scales are stored as float16 initializers read
through a ``Cast`` to float32, which ONNX Runtime's constant folding (graph optimization ``basic``
and up) computes once when the session is created: the file holds half the scale bytes (int4 block
32: 4.5 instead of 5 bits per weight) and the kernels see the same float32 scales as before,
prepacked. The scales lose float16's rounding (relative 2**-11), far below a block's quantization
step; below f16's normal range (2**-14) they become subnormals (absolute error at most 2**-25, a
flushed block dequantizes to zero). A scale above 65504 (f16's largest) is an error when the model
is written (no real checkpoint has weights near 65504 * 7).

``log_scales`` (``--scales log8``, the int4 default): a 4-bit asymmetric weight's large scales are
stored as one byte a block on a logarithmic grid per row (:mod:`qwen_export.quant.log_scales`: uint8
codes, a float16 ``top`` and a uint8 ``step`` per row), and computed by ``Cast``/``Mul``/``Exp``
nodes that ONNX Runtime folds once at session creation, like the ``Cast`` above: 4.375 instead of
4.625 bits per weight at block 32; the kernels see float32 scales within 0.2-0.4% of the searched
ones (the codes are kept). 8-bit weights keep float16 scales.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from qwen_export.passes.base import MS_DOMAIN, GraphPass
from qwen_export.quant.numeric import BlockQuantized
from qwen_export.quant.tensors import QuantizedPartTensor, SharedQuantization, StoredQuantization
from qwen_export.targets.onnxruntime.lowered import LoweredWeight, unique_name

MATMUL_RULE = "matmulnbits"
BIAS_RULE = "matmulnbits_bias"
GATHER_RULE = "gather_block_quantized"
TIED_RULE = "tied_lm_head"
#: the pass record's count of scale values stored as float16 (runtime/bandwidth.py reads it)
COMPACT_VALUES = "compact_scale_values"
#: the pass record's count of scale values stored as log8 bytes (runtime/bandwidth.py reads it)
LOG8_VALUES = "log8_scale_values"

_CODE_BITS = {ir.DataType.INT4: 4, ir.DataType.UINT4: 4, ir.DataType.INT8: 8, ir.DataType.UINT8: 8}
_SIGNED = (ir.DataType.INT4, ir.DataType.INT8)
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


# --- the quantized weight a DequantizeLinear holds --------------------------------------------------


def _as_int(array: np.ndarray) -> np.ndarray:
    """Integer codes (ml_dtypes int4/uint4 included) as int16."""
    return np.asarray(array).astype(np.int16)


class _ConstantQuantization(SharedQuantization):
    """A :class:`SharedQuantization` whose "quantization" is DequantizeLinear's constant inputs read
    back (any constant codes, not only the quantize pass's lazy ones). Codes become unsigned with
    explicit zero points when a zero point is given or the codes are unsigned; signed codes without
    zero points stay signed (the com.microsoft ops' default zero point 2^(bits-1))."""

    def __init__(
        self,
        codes: ir.TensorProtocol,
        scales: ir.TensorProtocol,
        zeros: ir.TensorProtocol | None,
        axis: int,
        block_size: int,
        name: str | None,
    ) -> None:
        self.signed = codes.dtype in _SIGNED
        super().__init__(
            codes,
            bits=_CODE_BITS[codes.dtype],
            block_size=block_size,
            axis=axis,
            symmetric=zeros is None and self.signed,
            scale_dtype=scales.dtype,
            name=name,
        )
        self.codes, self.scales, self.zeros = codes, scales, zeros

    def quantize(self) -> BlockQuantized:
        self.reads += 1
        c = _as_int(self.codes.numpy())
        s = np.asarray(self.scales.numpy(), dtype=np.float32)
        if self.symmetric:
            return BlockQuantized(c.astype(np.int8), s, None, self.bits, self.block_size, self.axis)
        offset = (1 << (self.bits - 1)) if self.signed else 0
        z = np.zeros(s.shape, np.int16) if self.zeros is None else _as_int(self.zeros.numpy())
        return BlockQuantized(
            (c + offset).astype(np.uint8), s, (z + offset).astype(np.uint8), self.bits, self.block_size, self.axis
        )


def _shared_quantization(
    codes: ir.TensorProtocol,
    scales: ir.TensorProtocol,
    zeros: ir.TensorProtocol | None,
    axis: int,
    block_size: int,
    name: str | None,
) -> SharedQuantization:
    """The quantization the lowered tensors derive from.

    The quantize pass's lazy parts (:class:`QuantizedPartTensor` of one :class:`SharedQuantization`,
    or of a :class:`StoredQuantization` of a pre-quantized checkpoint) give a fresh quantization of
    the same source and parameters: the source is quantized (or the stored values read) at write
    time again, straight into the lowered layouts (the DequantizeLinear parts are never computed,
    and the old object, with its parts, goes away with the removed initializers). Any other constant
    codes are read back (:class:`_ConstantQuantization`)."""
    parts = [t for t in (codes, scales, zeros) if t is not None]
    quant = getattr(codes, "quant", None)
    if (
        type(quant) in (SharedQuantization, StoredQuantization)
        and all(isinstance(t, QuantizedPartTensor) and t.quant is quant for t in parts)
        and quant.axis == axis
        and quant.block_size == block_size
    ):
        return quant.fresh(name)
    return _ConstantQuantization(codes, scales, zeros, axis, block_size, name)


@dataclasses.dataclass(frozen=True)
class DequantizeMatch:
    """A DequantizeLinear of constant 2-D blocked codes, as the com.microsoft ops can take it."""

    node: ir.Node
    quant: SharedQuantization
    rows: int
    cols: int
    axis: int
    bits: int
    block_size: int
    symmetric: bool  # no zero points stored (signed codes, the ops' default zero point)
    float_type: ir.DataType  # scales' (and the output's) dtype
    name: str  # the codes' name: the lowered initializers are named "<name>.<part>"

    @property
    def blocks(self) -> int:
        return (self.rows if self.axis == 0 else self.cols) // self.block_size

    @property
    def inputs(self) -> list[ir.Value]:
        return [v for v in self.node.inputs if v is not None]


def _constant(value: ir.Value | None) -> ir.TensorProtocol | None:
    if value is None or not value.is_initializer() or value.is_graph_input() or value.const_value is None:
        return None
    return value.const_value


def _dims(tensor: ir.TensorProtocol) -> tuple[int, ...]:
    return tuple(int(d) for d in tensor.shape.numpy())


def match_dequantize(node: ir.Node) -> DequantizeMatch | str:
    """The :class:`DequantizeMatch` of a DequantizeLinear node, or why it does not fit the com.microsoft ops."""
    inputs = list(node.inputs) + [None] * (3 - len(node.inputs))
    codes, scales, zeros = (_constant(v) for v in inputs[:3])
    if codes is None or scales is None or (inputs[2] is not None and zeros is None):
        return "inputs are not constant initializers"
    if codes.dtype not in _CODE_BITS or scales.dtype not in _FLOAT_TYPES:
        return f"codes {codes.dtype} / scales {scales.dtype} are not int4/int8 codes with float scales"
    if zeros is not None and zeros.dtype != codes.dtype:
        return "zero points and codes differ in type"
    shape = _dims(codes)
    if len(shape) != 2:
        return f"codes of rank {len(shape)}, not 2"
    axis = node.attributes.get_int("axis", 1)
    axis = axis + 2 if axis < 0 else axis
    block = node.attributes.get_int("block_size", 0)
    if axis not in (0, 1) or block < 16 or block & (block - 1) or shape[axis] % block:
        return f"axis {axis} / block size {block} do not fit MatMulNBits (a power of two >= 16 dividing the axis)"
    expected = tuple(d // block if i == axis else d for i, d in enumerate(shape))
    if _dims(scales) != expected or (zeros is not None and _dims(zeros) != expected):
        return f"scales of shape {_dims(scales)}, expected {expected}"
    if scales.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
        return f"scales of type {scales.dtype}: only float and float16 are lowered"
    name = inputs[0].name or node.name or "weight"  # type: ignore[union-attr]
    quant = _shared_quantization(codes, scales, zeros, axis, block, name)
    return DequantizeMatch(
        node, quant, shape[0], shape[1], axis, quant.bits, block, quant.symmetric, scales.dtype, name
    )


# --- rewrites ----------------------------------------------------------------------------------------


def _default_domain(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def _trim(inputs: list[ir.Value | None]) -> list[ir.Value | None]:
    while inputs and inputs[-1] is None:
        inputs.pop()
    return inputs


def _replace(graph: ir.Graph, old: ir.Node, new: ir.Node, old_out: ir.Value | None = None) -> None:
    """Insert ``new`` before ``old`` and make ``new``'s output take the place of ``old_out``."""
    old_out = old_out or old.outputs[0]
    out = new.outputs[0]
    graph.insert_before(old, new)
    name = old_out.name
    if old_out.dtype is not None:
        out.dtype = old_out.dtype
    out.shape = old_out.shape
    old_out.replace_all_uses_with(out, replace_graph_outputs=True)
    old_out.name = None
    out.name = name


def _bias(matmul: ir.Node, n: int, dtype: ir.DataType) -> tuple[ir.Node, ir.Value] | None:
    """``Add(matmul, bias)`` of a constant [N] bias, the MatMul output's only use."""
    out = matmul.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return None
    add = uses[0].node
    if add.op_type != "Add" or not _default_domain(add) or len(add.inputs) != 2:
        return None
    other = add.inputs[1 - uses[0].idx]
    if other is None or other is out or _constant(other) is None or other.dtype != dtype:
        return None
    if other.shape is None or list(other.shape) != [n]:
        return None
    return add, other


def _lower_matmul(
    graph: ir.Graph, lowered: LoweredWeight, matmul: ir.Node, accuracy_level: int, fired: dict[str, int]
) -> None:
    dq = lowered.dq
    weights, k, n = lowered.matmul_inputs()
    x = matmul.inputs[0]
    bias = _bias(matmul, n, dq.float_type)
    inputs: list[ir.Value | None] = [x, *weights, None, bias[1] if bias else None]
    attrs = {"K": k, "N": n, "bits": dq.bits, "block_size": dq.block_size, "accuracy_level": accuracy_level}
    base = dq.name
    node = ir.node("MatMulNBits", _trim(inputs), attrs, domain=MS_DOMAIN, name=f"{base}/MatMulNBits")
    if bias is None:
        _replace(graph, matmul, node)
        graph.remove(matmul, safe=True)
    else:
        add, _ = bias
        _replace(graph, matmul, node, add.outputs[0])
        graph.remove([add, matmul], safe=True)
        fired[BIAS_RULE] += 1
    fired[MATMUL_RULE] += 1


def _lower_gather(graph: ir.Graph, lowered: LoweredWeight, gather: ir.Node, fired: dict[str, int]) -> None:
    dq = lowered.dq
    ids = gather.inputs[1]
    data = lowered.table_data()
    scales, zeros = lowered.gather_inputs()
    attrs = {"bits": dq.bits, "block_size": dq.block_size, "gather_axis": 0, "quantize_axis": 2}
    base = dq.name
    node = ir.node(
        "GatherBlockQuantized", _trim([data, ids, scales, zeros]), attrs, domain=MS_DOMAIN, name=f"{base}/Gather"
    )
    gathered = node.outputs[0]
    gathered.name, gathered.dtype = f"{base}.gathered", dq.float_type
    out = gather.outputs[0]
    rank = len(out.shape) if out.shape is not None else None
    if rank is None:  # [..., H/B, B] -> [..., H]: keep every leading dim, whatever the rank
        raise ValueError("unknown rank")
    shape = ir.Value(
        name=unique_name(graph, f"{base}.gathered_shape"),
        shape=ir.Shape([rank]),
        type=ir.TensorType(ir.DataType.INT64),
        const_value=ir.tensor(np.array([0] * (rank - 1) + [dq.cols], np.int64)),
    )
    graph.register_initializer(shape)
    reshape = ir.node("Reshape", [gathered, shape], name=f"{base}/Reshape")
    graph.insert_before(gather, node)
    _replace(graph, gather, reshape)
    graph.remove(gather, safe=True)
    fired[GATHER_RULE] += 1


def _lower_tied(
    graph: ir.Graph, lowered: LoweredWeight, gemm: ir.Node, accuracy_level: int, fired: dict[str, int]
) -> None:
    dq = lowered.dq
    data = lowered.table_data()
    scales, zeros = lowered.tied_inputs()
    attrs = {"K": dq.cols, "N": dq.rows, "bits": dq.bits, "block_size": dq.block_size, "accuracy_level": accuracy_level}
    base = dq.name
    node = ir.node(
        "MatMulNBits", _trim([gemm.inputs[0], data, scales, zeros]), attrs, domain=MS_DOMAIN, name=f"{base}/lm_head"
    )
    _replace(graph, gemm, node)
    graph.remove(gemm, safe=True)
    fired[TIED_RULE] += 1


def _use_kind(use: Any, dq: DequantizeMatch) -> str | None:
    node = use.node
    if not _default_domain(node):
        return None
    if dq.axis == 0 and node.op_type == "MatMul" and use.idx == 1 and node.inputs[0] is not None:
        return "matmul" if node.inputs[0].dtype in (None, dq.float_type) else None  # a valid MatMul: same dtype
    if dq.axis == 1 and node.op_type == "Gather" and use.idx == 0 and node.attributes.get_int("axis", 0) == 0:
        out = node.outputs[0]
        return "gather" if out.shape is not None and len(out.shape) >= 1 else None
    if (
        dq.axis == 1
        and node.op_type == "Gemm"
        and use.idx == 1
        and len([v for v in node.inputs if v is not None]) == 2
        and node.attributes.get_int("transB", 0) == 1
        and node.attributes.get_int("transA", 0) == 0
        and node.attributes.get_float("alpha", 1.0) == 1.0
        and node.inputs[0] is not None
        and node.inputs[0].dtype in (None, dq.float_type)
    ):
        return "tied"
    return None


# --- the pass ----------------------------------------------------------------------------------------


class MatMulNBitsLowering(GraphPass):
    """Lower quantized ``DequantizeLinear`` weights to ``MatMulNBits`` / ``GatherBlockQuantized``.

    ``accuracy_level``: MatMulNBits' minimum accuracy of the activations (0 unset, 1 fp32, 2 fp16,
    3 bf16, 4 int8: activations quantized per block, the fastest on CPU).
    ``explain``: a text stream that gets the DequantizeLinear nodes left alone and why.
    """

    name = "matmulnbits"
    requires_ops = ("DequantizeLinear",)
    explain_heading = "left alone"

    def __init__(
        self, accuracy_level: int = 4, explain: Any = None, compact_scales: bool = False, log_scales: bool = False
    ) -> None:
        if accuracy_level not in range(5):
            raise ValueError(f"accuracy_level must be 0..4, got {accuracy_level}")
        self.accuracy_level = accuracy_level
        self.compact_scales, self.log_scales = compact_scales, log_scales
        self.explain = explain
        #: after a call: the DequantizeLinear nodes left alone, and why
        self.misses: list[str] = []

    def rewrite(self, model: Any) -> dict[str, int]:
        graph = model.graph
        fired = {MATMUL_RULE: 0, BIAS_RULE: 0, GATHER_RULE: 0, TIED_RULE: 0}
        self.misses = []
        for node in [n for n in graph if n.op_type == "DequantizeLinear" and _default_domain(n)]:
            dq = match_dequantize(node)
            if isinstance(dq, str):
                self.misses.append(f"{node.name}: {dq}")
                continue
            out = node.outputs[0]
            uses = list(out.uses())
            kinds = [_use_kind(u, dq) for u in uses]
            if not uses or None in kinds or out.is_graph_output():
                self.misses.append(f"{node.name}: consumers {[u.node.op_type for u in uses]} are not all lowerable")
                continue
            lowered = LoweredWeight(graph, dq, self.compact_scales, self.log_scales and not dq.symmetric)
            for use, kind in zip(uses, kinds, strict=True):
                if kind == "matmul":
                    _lower_matmul(graph, lowered, use.node, self.accuracy_level, fired)
                elif kind == "gather":
                    _lower_gather(graph, lowered, use.node, fired)
                else:
                    _lower_tied(graph, lowered, use.node, self.accuracy_level, fired)
            old_inputs = dq.inputs
            graph.remove(node, safe=True)
            for value in old_inputs:
                if not list(value.uses()) and value.name in graph.initializers:
                    del graph.initializers[value.name]
            lowered.finalize()
            for key, count in ((COMPACT_VALUES, lowered.compact_values), (LOG8_VALUES, lowered.log8_values)):
                if count:
                    fired[key] = fired.get(key, 0) + count
        return fired

    def left_alone(self) -> list[str]:
        return self.misses
