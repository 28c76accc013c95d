"""ONNX Runtime lowering of float linears to int8 GEMMs with dynamically quantized activations.

``MatMul(x, W)`` of a constant float32 ``W`` [K, N] (and a following ``Add(., bias)`` of a constant
[N] bias, folded in) -> ``com.microsoft.DynamicQuantizeMatMul(x, codes, scales, , bias)``:

- ``codes`` int8 [K, N]: ``W`` per output column, symmetric round-to-nearest in [-127, 127];
  ``scales`` float32 [N] = max |column| / 127;
- at run time the kernel quantizes ``x`` to uint8 over the whole tensor (its min and max) and runs
  MLAS's u8 x s8 GEMM, which uses VNNI (AVX-512 or AVX) where the CPU has it.

This is for prefill-shaped work (the vision tower encodes thousands of patches at once), where the
u8 x s8 GEMM is about 3x float32's speed on an AVX-512 VNNI CPU (benchmarks/vl_bench.py). The
decoder's weights keep ``MatMulNBits``, whose kernels are built for its block-quantized layouts.
The new initializers are lazy: computed from ``W`` (itself lazy) when the model is written.

**CPUs without VNNI** (x86 with AVX2 or AVX-512 only): MLAS's u8 x s8 kernel there adds pairs of
products in int16 (``vpmaddubsw``), which saturates (2 * 255 * 127 > 32767). Storing 7-bit weights
would avoid it everywhere, but measured on the Qwen2.5-VL-3B shape it raised the features' error from
6% to 9%. So the artifact keeps 8-bit signed codes, and on such a CPU :func:`unsigned_codes` turns
them into uint8 codes with zero point 128 when the session is created: MLAS's u8 x u8 kernel widens
to 16 bits first and cannot saturate. The integer products are the same, so the features are the
same on every CPU; only the speed differs (u8 x u8 measured 2.8x slower than u8 x s8 on VNNI).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

from qwen_export import cpuinfo
from qwen_export.passes.base import MS_DOMAIN
from qwen_export.targets.onnxruntime.matmulnbits import _bias, _replace, _trim

#: levels each side of zero of the int8 weight codes
WEIGHT_LEVELS = 127
#: the flags with which MLAS's u8 x s8 GEMM uses VNNI (no int16 saturation)
VNNI_FLAGS = cpuinfo.VNNI_FLAGS
RULE = "dynamic_quantize_matmul"


class _ColumnQuantization:
    """Per-column symmetric int8 codes and scales of one lazy float weight, computed once for both
    initializers (the writer asks for them one after the other)."""

    def __init__(self, weight: ir.TensorProtocol) -> None:
        self.weight = weight
        self._parts: tuple[np.ndarray, np.ndarray] | None = None

    def parts(self) -> tuple[np.ndarray, np.ndarray]:
        if self._parts is None:
            w = np.asarray(self.weight.numpy(), dtype=np.float32)
            scales = np.abs(w).max(axis=0) / WEIGHT_LEVELS
            scales = np.where(scales > 0, scales, np.float32(1.0)).astype(np.float32)
            codes = np.clip(np.rint(w / scales), -WEIGHT_LEVELS, WEIGHT_LEVELS).astype(np.int8)
            self._parts = codes, scales
        return self._parts

    def release(self) -> None:
        self._parts = None


def _lazy(quant: _ColumnQuantization, index: int, dtype: ir.DataType, shape: tuple[int, ...], name: str) -> ir.Value:
    def load() -> ir.TensorProtocol:
        array = quant.parts()[index]
        if index == 1:  # the scales come second: both parts are written now
            quant.release()
        return ir.tensor(array, dtype=dtype, name=name)

    tensor = ir.LazyTensor(load, dtype=dtype, shape=ir.Shape(list(shape)), name=name)
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(list(shape)), const_value=tensor)


def _weight(matmul: ir.Node) -> tuple[ir.Value, ir.TensorProtocol] | None:
    value = matmul.inputs[1] if len(matmul.inputs) == 2 else None
    if value is None or value.const_value is None or not value.is_initializer():
        return None
    if value.dtype != ir.DataType.FLOAT or value.shape is None or len(value.shape) != 2:
        return None
    return value, value.const_value


def lower_dynamic_int8(model: ir.Model, select: Callable[[str], bool]) -> int:
    """Lower every ``MatMul`` whose B is a float32 initializer ``select`` accepts (by name); return
    how many were lowered. An initializer that other nodes read too stays (float32) for them."""
    graph = model.graph
    lowered = 0
    for matmul in [n for n in graph if n.op_type == "MatMul" and n.domain in ("", "ai.onnx")]:
        found = _weight(matmul)
        if found is None or not select(found[0].name or ""):
            continue
        value, weight = found
        k, n = (int(d) for d in value.shape)  # type: ignore[union-attr]
        quant = _ColumnQuantization(weight)
        base = value.name
        codes = _lazy(quant, 0, ir.DataType.INT8, (k, n), f"{base}/int8")
        scales = _lazy(quant, 1, ir.DataType.FLOAT, (n,), f"{base}/int8_scale")
        for init in (codes, scales):
            graph.register_initializer(init)
        bias = _bias(matmul, n, ir.DataType.FLOAT)
        inputs = [matmul.inputs[0], codes, scales, None, bias[1] if bias else None]
        node = ir.node("DynamicQuantizeMatMul", _trim(inputs), domain=MS_DOMAIN, name=f"{base}/DynamicQuantizeMatMul")
        old_out = bias[0].outputs[0] if bias else None
        _replace(graph, matmul, node, old_out)
        graph.remove([bias[0], matmul] if bias else matmul, safe=True)
        if not value.uses():
            graph.initializers.pop(value.name)  # type: ignore[arg-type]
        lowered += 1
    return lowered


def saturates(machine: str, flags: frozenset[str]) -> bool:
    """True on an x86 CPU whose u8 x s8 GEMM would saturate: one without VNNI (see the module
    docstring; :func:`qwen_export.cpuinfo.int8_gemm_saturates`)."""
    return cpuinfo.int8_gemm_saturates(machine, flags)


def unsigned_codes(model: Any) -> int:
    """In an ``onnx.ModelProto`` (external data loaded), make every ``DynamicQuantizeMatMul``'s
    int8 B uint8 (code + 128) with a zero point of 128; return how many were changed."""
    from onnx import TensorProto, helper, numpy_helper

    inits = {init.name: init for init in model.graph.initializer}
    changed = 0
    for node in model.graph.node:
        if node.op_type != "DynamicQuantizeMatMul" or node.domain != MS_DOMAIN:
            continue
        codes = inits.get(node.input[1])
        if codes is None or codes.data_type != TensorProto.INT8 or (len(node.input) > 3 and node.input[3]):
            continue
        unsigned = (numpy_helper.to_array(codes).astype(np.int16) + 128).astype(np.uint8)
        codes.CopyFrom(numpy_helper.from_array(unsigned, codes.name))
        columns = unsigned.shape[1]
        zero = helper.make_tensor(f"{codes.name}/zero_point", TensorProto.UINT8, [columns], [128] * columns)
        model.graph.initializer.append(zero)
        inputs = list(node.input) + [""] * (5 - len(node.input))
        inputs[3] = zero.name
        del node.input[:]
        node.input.extend(inputs[:5] if inputs[4] else inputs[:4])
        changed += 1
    return changed
