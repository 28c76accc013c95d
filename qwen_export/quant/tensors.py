"""Lazy quantized initializers: their bytes are computed when the model is written.

A quantized weight becomes two or three initializers (codes, scales, zero points) derived from one
quantization of one source tensor (anything with ``.numpy()``: a
:class:`~qwen_export.export.trace.CheckpointTensor`, a :class:`~qwen_export.passes.packed_qkv.ConcatTensor`,
an ``ir.Tensor``). They share a :class:`SharedQuantization`: the first part read reads the source
and quantizes it once, computing every part's array; each part's array is dropped as soon as that
part has been read, so after the codes were written only the (small) scales and zero points are
held, and nothing once all parts were read (the writer writes initializers in order, so a weight's
parts are written one after the other). Reading a part again recomputes everything (correct, slower).

:class:`StoredQuantization` is the same contract for a quantization that is read, not computed: the
codes, scales and zero points a pre-quantized (AWQ/GPTQ) checkpoint stores (:mod:`qwen_export.quant.prequant`).

Three layouts (:func:`dequantize_linear_initializers`, :func:`matmulnbits_initializers`,
:func:`gather_block_quantized_initializers`, see :mod:`.numeric` for the byte formats), and
:func:`tied_embedding_initializers`: the embedding's GatherBlockQuantized initializers and the tied
lm_head's MatMulNBits initializers from a single read and quantization of ``E``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

import numpy as np
import onnx_ir as ir

from qwen_export.quant import numeric
from qwen_export.quant.algorithms import quantize
from qwen_export.quant.numeric import BlockQuantized
from qwen_export.quant.scheme import QuantAlgorithm

#: scale dtypes the graph may hold (DequantizeLinear: scale dtype = output dtype; MatMulNBits /
#: GatherBlockQuantized: scales dtype = the activation / output dtype).
_SCALE_DTYPES = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16}


class SharedQuantization:
    """One quantization of ``source``, shared by the lazy tensors of its parts.

    ``source``: anything with ``.numpy()`` and ``.shape`` (or a numpy array). The quantized tensor is ``source``, or
    its transpose when ``transpose`` (2-D only), quantized along ``axis`` of that tensor.
    ``block_size`` 0: per-channel (2-D only): one block spanning ``axis``; :attr:`per_channel` is set
    and :attr:`block_size` is then the axis' length (the BlockQuantized's block size).
    ``positive_scales``: symmetric scales all > 0 (:mod:`.numeric`).
    ``reads`` counts how many times the source was read (tests, diagnostics).
    """

    def __init__(
        self,
        source: Any,
        *,
        bits: int,
        block_size: int,
        axis: int,
        symmetric: bool,
        algorithm: QuantAlgorithm = QuantAlgorithm.RTN,
        awq_scale: np.ndarray | None = None,
        importance: np.ndarray | None = None,
        scale_dtype: ir.DataType = ir.DataType.FLOAT,
        transpose: bool = False,
        name: str | None = None,
        positive_scales: bool = False,
    ) -> None:
        if scale_dtype not in _SCALE_DTYPES:
            raise ValueError(f"scale dtype must be FLOAT or FLOAT16, got {scale_dtype}")
        dims = tuple(int(d) for d in (source.shape.numpy() if hasattr(source.shape, "numpy") else source.shape))
        if transpose and len(dims) != 2:
            raise ValueError(f"transpose needs a 2-D source, got shape {dims}")
        self.shape = dims[::-1] if transpose else dims
        self.axis = axis % len(self.shape)
        self.per_channel = block_size == 0
        if self.per_channel and len(self.shape) != 2:
            raise ValueError(f"per-channel quantization (block_size 0) needs a 2-D tensor, got shape {self.shape}")
        block_size = numeric.resolve_block_size(self.shape, block_size, self.axis)
        numeric.code_range(bits, symmetric)  # validate bits
        self.scales_shape = numeric.scales_shape(self.shape, block_size, self.axis)  # ValueError if not divisible
        for what, vector in (("awq_scale", awq_scale), ("importance", importance)):
            if vector is not None and np.shape(vector) != (self.shape[self.axis],):
                raise ValueError(f"{what} has shape {np.shape(vector)}, expected ({self.shape[self.axis]},)")
        self.source, self.transpose, self.name = source, transpose, name
        self.bits, self.block_size, self.symmetric = bits, block_size, symmetric
        self.algorithm, self.awq_scale, self.scale_dtype = algorithm, awq_scale, scale_dtype
        self.importance = importance
        self.positive_scales = positive_scales
        self.reads = 0
        self._parts: dict[str, Callable[[BlockQuantized], np.ndarray]] = {}
        self._pending: dict[str, np.ndarray] = {}

    def quantize(self) -> BlockQuantized:
        """Read the source and quantize it (not cached: :meth:`part` is what caches)."""
        self.reads += 1
        array = np.asarray(self.source.numpy() if hasattr(self.source, "numpy") else self.source)
        # a transposed source is quantized as it is stored (along the other axis) and then seen
        # transposed: no transposed copy of the weight
        q = quantize(
            array,
            self.bits,
            self.block_size,
            1 - self.axis if self.transpose else self.axis,
            self.symmetric,
            algorithm=self.algorithm,
            awq_scale=self.awq_scale,
            scale_dtype=_SCALE_DTYPES[self.scale_dtype],
            importance=self.importance,
            positive_scales=self.positive_scales,
        )
        return numeric.transpose_blocks(q) if self.transpose else q

    def fresh(self, name: str | None) -> SharedQuantization:
        """A new quantization of the same source with the same parameters and no parts (the ONNX
        Runtime lowering derives its own layouts from it)."""
        return SharedQuantization(
            self.source,
            bits=self.bits,
            block_size=0 if self.per_channel else self.block_size,
            axis=self.axis,
            symmetric=self.symmetric,
            algorithm=self.algorithm,
            awq_scale=self.awq_scale,
            importance=self.importance,
            scale_dtype=self.scale_dtype,
            transpose=self.transpose,
            name=name,
            positive_scales=self.positive_scales,
        )

    def add_part(self, key: str, derive: Callable[[BlockQuantized], np.ndarray]) -> None:
        if key in self._parts:
            raise ValueError(f"part {key!r} already registered")
        self._parts[key] = derive

    def part(self, key: str) -> np.ndarray:
        """The array of part ``key``; quantizes (once for all parts) when it is not pending."""
        if key not in self._parts:
            raise KeyError(key)
        if key not in self._pending:
            q = self.quantize()
            self._pending = {k: derive(q) for k, derive in self._parts.items()}
            del q
        return self._pending.pop(key)

    @property
    def holding(self) -> tuple[str, ...]:
        """The parts computed but not read yet (what this object holds in memory)."""
        return tuple(self._pending)


class StoredQuantization(SharedQuantization):
    """A :class:`SharedQuantization` whose values are read from storage instead of computed.

    ``source``: the float view of the weight W [K, N] (its shape and dtype; never read here);
    ``stored``: anything with ``shape`` (K, N), ``bits``, ``block_size`` and
    ``block_quantized(symmetric, scale_dtype) -> BlockQuantized`` [K, N] along axis 0 (e.g.
    :class:`qwen_export.quant.prequant.StoredLinear`): the stored codes with the requested signedness (signed
    codes and no zero points when ``symmetric``) and scales rounded to the graph's scale dtype.

    ``positive_scales``: the graph needs every scale > 0 (TensorRT). GPTQ and AWQ store positive
    scales (``(max - min) / maxq``, floored), so the stored values are used as they are; should a
    stored scale be <= 0 (after rounding to the scale dtype), the weight is requantized from its float
    view (``source``, RTN with positive scales at the stored bits and group size) with a warning:
    this is only known when the scales are read, at write time, after the quantize pass recorded
    the weight as ``prequantized``.
    """

    def __init__(
        self,
        source: Any,
        stored: Any,
        *,
        symmetric: bool,
        scale_dtype: ir.DataType,
        name: str | None = None,
        positive_scales: bool = False,
    ) -> None:
        super().__init__(
            source,
            bits=stored.bits,
            block_size=stored.block_size,
            axis=0,
            symmetric=symmetric,
            scale_dtype=scale_dtype,
            name=name,
            positive_scales=positive_scales,
        )
        if tuple(self.shape) != tuple(stored.shape):
            raise ValueError(f"stored quantization of shape {tuple(stored.shape)} for a weight of shape {self.shape}")
        self.stored = stored

    def quantize(self) -> BlockQuantized:
        """The stored values (read and unpacked, not quantized)."""
        self.reads += 1
        q = self.stored.block_quantized(self.symmetric, _SCALE_DTYPES[self.scale_dtype])
        if q.codes.shape != self.shape or q.axis != 0 or q.block_size != self.block_size or q.bits != self.bits:
            raise RuntimeError(f"{self.name}: stored quantization does not match {self.shape} int{self.bits}")
        if self.positive_scales and not (q.scales > 0).all():
            warnings.warn(
                f"{self.name}: the checkpoint stores scales <= 0, which positive_scales forbids; "
                "requantized from the dequantized weight (RTN)",
                stacklevel=2,
            )
            self.reads -= 1  # SharedQuantization.quantize counts its own read
            return super().quantize()
        return q

    def fresh(self, name: str | None) -> StoredQuantization:
        return StoredQuantization(
            self.source,
            self.stored,
            symmetric=self.symmetric,
            scale_dtype=self.scale_dtype,
            name=name,
            positive_scales=self.positive_scales,
        )


class QuantizedPartTensor(ir.LazyTensor):
    """An initializer whose data is one part of a :class:`SharedQuantization`.

    ``numpy()`` gives the part's values (int4/uint4 parts: one int8/uint8 value per element, as
    onnx_ir represents them); ``tobytes()`` / :meth:`write_to` give its ONNX raw data (int4 packed).
    """

    def __init__(
        self, quant: SharedQuantization, key: str, dtype: ir.DataType, shape: Sequence[int], name: str | None = None
    ) -> None:
        self.quant, self.key = quant, key
        super().__init__(self._load, dtype=dtype, shape=ir.Shape([int(d) for d in shape]), name=name)

    def _array(self) -> np.ndarray:
        array = self.quant.part(self.key)
        expected = tuple(int(d) for d in self.shape.numpy())
        if array.shape != expected:
            raise RuntimeError(f"{self.name}: quantized part {self.key} has shape {array.shape}, expected {expected}")
        return array

    def _load(self) -> ir.TensorProtocol:
        return ir.tensor(self._array(), dtype=self.dtype, name=self.name)

    def write_to(self, f: BinaryIO) -> int:
        """Write the tensor's ONNX raw data to ``f``; return the byte count."""
        array = self._array()
        if self.dtype in (ir.DataType.INT4, ir.DataType.UINT4):
            data = numeric.pack_onnx_int4(array)
        else:
            data = np.ascontiguousarray(array).tobytes()
        f.write(data)
        return len(data)


class QuantizedCodesTensor(QuantizedPartTensor):
    """The codes part (DequantizeLinear ``x``, MatMulNBits ``B``, GatherBlockQuantized ``data``)."""


class QuantizedScalesTensor(QuantizedPartTensor):
    """The scales part."""


class QuantizedZeroPointsTensor(QuantizedPartTensor):
    """The zero-points part (asymmetric schemes only)."""


@dataclasses.dataclass(frozen=True)
class QuantizedInitializers:
    """The lazy initializers of one quantized weight in one layout, and the node attributes."""

    codes: QuantizedCodesTensor
    scales: QuantizedScalesTensor
    zero_points: QuantizedZeroPointsTensor | None
    attributes: dict[str, int]
    quantization: SharedQuantization

    @property
    def tensors(self) -> tuple[QuantizedPartTensor, ...]:
        """The initializers in the order to register them (codes, scales[, zero points])."""
        return (self.codes, self.scales) + ((self.zero_points,) if self.zero_points is not None else ())


_Derive = Callable[[BlockQuantized], np.ndarray]
_Part = tuple[str, _Derive, ir.DataType, tuple[int, ...]]


def _codes(q: BlockQuantized) -> np.ndarray:
    return q.codes


def _zero_points(q: BlockQuantized) -> np.ndarray:
    assert q.zero_points is not None
    return q.zero_points


def _scales(np_dtype: type, transposed: bool, flat: bool = False) -> _Derive:
    """Scales in the graph's dtype, as they are ([..]) or N-major and flat (MatMulNBits); ``flat``:
    1-D (per-channel DequantizeLinear: [1, N] or [V, 1] -> [N] or [V])."""

    def derive(q: BlockQuantized) -> np.ndarray:
        if transposed:
            return np.ascontiguousarray(q.scales.T, dtype=np_dtype).reshape(-1)
        if flat:
            return np.ascontiguousarray(q.scales, dtype=np_dtype).reshape(-1)
        return np.ascontiguousarray(q.scales, dtype=np_dtype)

    return derive


def _flat_zero_points(q: BlockQuantized) -> np.ndarray:
    return np.ascontiguousarray(_zero_points(q)).reshape(-1)


def _packed_zero_points(bits: int, transposed: bool) -> _Derive:
    """Zero points packed per row like the codes ([V, ..] as they are, or N-major and flat)."""

    def derive(q: BlockQuantized) -> np.ndarray:
        zp = _zero_points(q)
        if transposed:
            return numeric.pack_bits_last(np.ascontiguousarray(zp.T), bits).reshape(-1)
        return numeric.pack_bits_last(zp, bits)

    return derive


def _matmulnbits_b(q: BlockQuantized) -> np.ndarray:
    return numeric.pack_matmulnbits(q)[0]


def _gather_data(q: BlockQuantized) -> np.ndarray:
    return numeric.pack_bits_last(q.unsigned_codes(), q.bits)


def _suffixed(name: str | None, suffix: str) -> str | None:
    return None if name is None else f"{name}{suffix}"


def _bundle(
    quant: SharedQuantization,
    prefix: str,
    parts: tuple[_Part, ...],
    attributes: dict[str, int],
) -> QuantizedInitializers:
    classes = (QuantizedCodesTensor, QuantizedScalesTensor, QuantizedZeroPointsTensor)
    tensors = []
    for cls, (suffix, derive, dtype, shape) in zip(classes, parts, strict=False):
        key = f"{prefix}{suffix or '.codes'}"
        quant.add_part(key, derive)
        tensors.append(cls(quant, key, dtype, shape, name=_suffixed(quant.name, suffix)))
    return QuantizedInitializers(
        codes=tensors[0],
        scales=tensors[1],
        zero_points=tensors[2] if len(tensors) > 2 else None,
        attributes=attributes,
        quantization=quant,
    )


def _codes_dtype(bits: int, symmetric: bool) -> ir.DataType:
    table = {
        (4, True): ir.DataType.INT4,
        (4, False): ir.DataType.UINT4,
        (8, True): ir.DataType.INT8,
        (8, False): ir.DataType.UINT8,
    }
    if (bits, symmetric) not in table:
        raise ValueError(f"DequantizeLinear codes need 4 or 8 bits, got {bits}")
    return table[bits, symmetric]


def _no_per_channel(op: str, block_size: int, quantization: SharedQuantization | None) -> None:
    if block_size == 0 or (quantization is not None and quantization.per_channel):
        raise ValueError(
            f"{op} needs blocks (a power-of-two block_size >= 16); per-channel quantization (block_size 0) "
            "has only the DequantizeLinear form (dequantize_linear_initializers)"
        )


# --- (a) ONNX DequantizeLinear ---------------------------------------------------------------------


def dequantize_linear_initializers(
    source: Any,
    *,
    bits: int,
    block_size: int,
    axis: int,
    symmetric: bool,
    algorithm: QuantAlgorithm = QuantAlgorithm.RTN,
    awq_scale: np.ndarray | None = None,
    importance: np.ndarray | None = None,
    output_dtype: ir.DataType = ir.DataType.FLOAT,
    name: str | None = None,
    quantization: SharedQuantization | None = None,
    positive_scales: bool = False,
) -> QuantizedInitializers:
    """Initializers of ``DequantizeLinear(codes, scales[, zero_points], axis, block_size)`` (opset 21).

    ``codes``: INT4 / UINT4 / INT8 / UINT8 (symmetric / asymmetric), the source's shape (e.g.
    [K, N] along axis 0, or the embedding [V, H] along axis 1); ``scales``: ``output_dtype``
    (DequantizeLinear's output dtype is its scale dtype), the scales' shape; ``zero_points``: the
    codes' dtype, the scales' shape, or None when symmetric. Attributes: ``axis``, ``block_size``.

    Per-channel (``block_size`` 0, 2-D ``source`` quantized along ``axis``): the ONNX per-axis form,
    one scale per slice of the *other* axis: ``scales`` (and ``zero_points``) 1-D of that axis'
    length, attributes ``{"axis": 1 - axis}`` and no ``block_size`` (W [K, N] along 0: scales [N],
    ``axis=1``; E [V, H] along 1: scales [V], ``axis=0``).
    ``positive_scales``: symmetric scales all > 0 (:mod:`.numeric`).
    ``quantization``: reuse an existing :class:`SharedQuantization` (its parameters win).
    """
    quant = quantization or SharedQuantization(
        source,
        bits=bits,
        block_size=block_size,
        axis=axis,
        symmetric=symmetric,
        algorithm=algorithm,
        awq_scale=awq_scale,
        importance=importance,
        scale_dtype=output_dtype,
        name=name,
        positive_scales=positive_scales,
    )
    codes_dtype = _codes_dtype(quant.bits, quant.symmetric)
    np_scale = _SCALE_DTYPES[quant.scale_dtype]
    if quant.per_channel:
        channels = (quant.shape[1 - quant.axis],)
        parts: list[_Part] = [
            ("", _codes, codes_dtype, quant.shape),
            (".scales", _scales(np_scale, transposed=False, flat=True), quant.scale_dtype, channels),
        ]
        if not quant.symmetric:
            parts.append((".zero_points", _flat_zero_points, codes_dtype, channels))
        return _bundle(quant, "dql", tuple(parts), {"axis": 1 - quant.axis})
    parts = [
        ("", _codes, codes_dtype, quant.shape),
        (".scales", _scales(np_scale, transposed=False), quant.scale_dtype, quant.scales_shape),
    ]
    if not quant.symmetric:
        parts.append((".zero_points", _zero_points, codes_dtype, quant.scales_shape))
    return _bundle(quant, "dql", tuple(parts), {"axis": quant.axis, "block_size": quant.block_size})


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
