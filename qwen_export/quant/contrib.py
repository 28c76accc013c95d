"""The ``com.microsoft`` contrib-op layouts of lazy quantized initializers (see :mod:`.tensors`):
:func:`matmulnbits_initializers`, :func:`gather_block_quantized_initializers`, and
:func:`tied_embedding_initializers`: the embedding's GatherBlockQuantized initializers and the tied
lm_head's MatMulNBits initializers from a single read and quantization of ``E``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

from qwen_export.quant import numeric
from qwen_export.quant.numeric import BlockQuantized
from qwen_export.quant.scheme import QuantAlgorithm
from qwen_export.quant.tensors import (
    _SCALE_DTYPES,
    QuantizedInitializers,
    SharedQuantization,
    _bundle,
    _gather_data,
    _matmulnbits_b,
    _no_per_channel,
    _packed_zero_points,
    _Part,
    _scales,
)

# --- (b) com.microsoft::MatMulNBits ----------------------------------------------------------------


def matmulnbits_initializers(
    source: Any,
    *,
    bits: int,
    block_size: int,
    symmetric: bool,
    algorithm: QuantAlgorithm = QuantAlgorithm.RTN,
    awq_scale: np.ndarray | None = None,
    importance: np.ndarray | None = None,
    scale_dtype: ir.DataType = ir.DataType.FLOAT,
    transposed_source: bool = False,
    accuracy_level: int = 0,
    name: str | None = None,
    quantization: SharedQuantization | None = None,
    positive_scales: bool = False,
) -> QuantizedInitializers:
    """Initializers of ``MatMulNBits(A, B, scales[, zero_points])`` for a weight W [K, N].

    ``source`` is W [K, N], or, with ``transposed_source``, W's transpose [N, K] (an HF-layout
    weight, or the embedding E [V, H] for the tied lm_head: K = H, N = V). ``B`` uint8
    [N, K/block, block*bits/8], ``scales`` ``scale_dtype`` [N * K/block] (must be A's dtype),
    ``zero_points`` uint8 [N * ceil(K/block * bits / 8)] or None. Attributes: ``K``, ``N``,
    ``bits``, ``block_size``, ``accuracy_level``. ``awq_scale`` [K] multiplies W's rows;
    ``importance`` [K] weights the clip search (see :func:`.algorithms.quantize`).
    Per-channel (``block_size`` 0) has no MatMulNBits form (ValueError).
    """
    _no_per_channel("MatMulNBits", block_size, quantization)
    quant = quantization or SharedQuantization(
        source,
        bits=bits,
        block_size=block_size,
        axis=0,
        symmetric=symmetric,
        algorithm=algorithm,
        awq_scale=awq_scale,
        importance=importance,
        scale_dtype=scale_dtype,
        transpose=transposed_source,
        name=name,
        positive_scales=positive_scales,
    )
    if len(quant.shape) != 2 or quant.axis != 0:
        raise ValueError(f"MatMulNBits needs W [K, N] quantized along K, got shape {quant.shape} axis {quant.axis}")
    k, n = quant.shape
    kb = k // quant.block_size
    np_scale = _SCALE_DTYPES[quant.scale_dtype]
    parts: list[_Part] = [
        ("", _matmulnbits_b, ir.DataType.UINT8, (n, kb, quant.block_size * quant.bits // 8)),
        (".scales", _scales(np_scale, transposed=True), quant.scale_dtype, (n * kb,)),
    ]
    if not quant.symmetric:
        zp_bytes = (kb * quant.bits + 7) // 8
        parts.append((".zero_points", _packed_zero_points(quant.bits, True), ir.DataType.UINT8, (n * zp_bytes,)))
    attributes = {"K": k, "N": n, "bits": quant.bits, "block_size": quant.block_size, "accuracy_level": accuracy_level}
    return _bundle(quant, "matmulnbits", tuple(parts), attributes)


# --- (c) com.microsoft::GatherBlockQuantized -------------------------------------------------------


def gather_block_quantized_initializers(
    source: Any,
    *,
    bits: int,
    block_size: int,
    symmetric: bool,
    algorithm: QuantAlgorithm = QuantAlgorithm.RTN,
    scale_dtype: ir.DataType = ir.DataType.FLOAT,
    name: str | None = None,
    quantization: SharedQuantization | None = None,
    positive_scales: bool = False,
) -> QuantizedInitializers:
    """Initializers of ``GatherBlockQuantized(data, indices, scales[, zero_points])`` for E [V, H].

    ``data`` uint8 [V, H*bits/8], ``scales`` ``scale_dtype`` [V, H/block] (the output dtype),
    ``zero_points`` uint8 [V, ceil(H/block * bits / 8)] or None. Attributes: ``bits``,
    ``block_size``, ``gather_axis`` 0, ``quantize_axis`` 1. Per-channel (``block_size`` 0): ValueError.
    """
    _no_per_channel("GatherBlockQuantized", block_size, quantization)
    quant = quantization or SharedQuantization(
        source,
        bits=bits,
        block_size=block_size,
        axis=1,
        symmetric=symmetric,
        algorithm=algorithm,
        scale_dtype=scale_dtype,
        name=name,
        positive_scales=positive_scales,
    )
    if len(quant.shape) != 2 or quant.axis != 1:
        raise ValueError(f"GatherBlockQuantized needs E [V, H] quantized along H, got {quant.shape} axis {quant.axis}")
    v, h = quant.shape
    kb = h // quant.block_size
    np_scale = _SCALE_DTYPES[quant.scale_dtype]
    parts: list[_Part] = [
        ("", _gather_data, ir.DataType.UINT8, (v, h * quant.bits // 8)),
        (".scales", _scales(np_scale, transposed=False), quant.scale_dtype, (v, kb)),
    ]
    if not quant.symmetric:
        zp_bytes = (kb * quant.bits + 7) // 8
        parts.append((".zero_points", _packed_zero_points(quant.bits, False), ir.DataType.UINT8, (v, zp_bytes)))
    attributes = {"bits": quant.bits, "block_size": quant.block_size, "gather_axis": 0, "quantize_axis": 1}
    return _bundle(quant, "gbq", tuple(parts), attributes)


# --- tied embedding / lm_head ----------------------------------------------------------------------


def tied_embedding_initializers(
    embedding: Any,
    *,
    bits: int,
    block_size: int,
    symmetric: bool,
    algorithm: QuantAlgorithm = QuantAlgorithm.RTN,
    scale_dtype: ir.DataType = ir.DataType.FLOAT,
    accuracy_level: int = 0,
    name: str | None = None,
    head_name: str | None = None,
    positive_scales: bool = False,
) -> tuple[QuantizedInitializers, QuantizedInitializers]:
    """``(embedding GatherBlockQuantized, lm_head MatMulNBits)`` initializers from one quantization of
    E [V, H] along H: E is read and quantized once for the five or six tensors.

    They are separate initializers holding the same bytes (``B`` is ``data`` reshaped to
    [V, H/block, block*bits/8]; the scales and zero points are the same bytes too). One initializer
    *can* serve both ops: GatherBlockQuantized accepts the 3-D ``B`` itself (``quantize_axis=2``,
    scales [V, H/block, 1], a runtime Reshape of its output to [..., H]), whereas a Reshape of ``B``
    to 2-D is constant-folded by ORT into a second copy. But on ORT CPU sharing costs memory:
    MatMulNBits prepacks ``B`` into its own buffer and frees the initializer only when nothing else
    uses it, so a shared ``B`` stays resident twice (measured, V=131072, H=1024, int4: +60 MiB RSS
    over separate initializers, about one ``B``). Sharing only saves disk. Use every part returned:
    a part never read keeps its array alive once another part was read.
    """
    _no_per_channel("GatherBlockQuantized", block_size, None)
    quant = SharedQuantization(
        embedding,
        bits=bits,
        block_size=block_size,
        axis=1,
        symmetric=symmetric,
        algorithm=algorithm,
        scale_dtype=scale_dtype,
        name=name,
        positive_scales=positive_scales,
    )
    gather = gather_block_quantized_initializers(
        embedding, bits=bits, block_size=block_size, symmetric=symmetric, quantization=quant
    )
    head_quant = _TransposedView(quant, head_name)
    head = matmulnbits_initializers(
        embedding,
        bits=bits,
        block_size=block_size,
        symmetric=symmetric,
        accuracy_level=accuracy_level,
        quantization=head_quant,  # type: ignore[arg-type]
    )
    return gather, head


class _TransposedView(SharedQuantization):
    """The tied lm_head's view of the embedding's quantization: W = E^T [K=H, N=V] along axis 0.

    Parts registered here are derived from the embedding's (transposed) BlockQuantized and live in
    the embedding's :class:`SharedQuantization`, so E is read and quantized once for both ops.
    """

    def __init__(self, base: SharedQuantization, name: str | None) -> None:  # noqa: D107 - no super().__init__
        self.base, self.name = base, name
        self.shape = base.shape[::-1]
        self.axis = 0
        self.scales_shape = base.scales_shape[::-1]
        self.bits, self.block_size, self.symmetric = base.bits, base.block_size, base.symmetric
        self.algorithm, self.awq_scale, self.scale_dtype = base.algorithm, None, base.scale_dtype
        self.importance = None
        self.transpose = True
        self.source = base.source
        self.per_channel, self.positive_scales = base.per_channel, base.positive_scales

    @property
    def reads(self) -> int:  # type: ignore[override]
        return self.base.reads

    def quantize(self) -> BlockQuantized:
        return numeric.transpose_blocks(self.base.quantize())

    def add_part(self, key: str, derive: Callable[[BlockQuantized], np.ndarray]) -> None:
        self.base.add_part(f"head.{key}", lambda q: derive(numeric.transpose_blocks(q)))

    def part(self, key: str) -> np.ndarray:
        return self.base.part(f"head.{key}")

    @property
    def holding(self) -> tuple[str, ...]:
        return self.base.holding
