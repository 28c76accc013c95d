"""Lazy quantized initializers: their bytes are computed when the model is written.

A quantized weight becomes two or three initializers (codes, scales, zero points) derived from one
quantization of one source tensor (anything with ``.numpy()``: a
:class:`~qwen_export.weights.CheckpointTensor`, a :class:`~qwen_export.passes.packed_qkv.ConcatTensor`,
an ``ir.Tensor``). They share a :class:`SharedQuantization`: the first part read reads the source
and quantizes it once, computing every part's array; each part's array is dropped as soon as that
part has been read, so after the codes were written only the (small) scales and zero points are
held, and nothing once all parts were read (the writer writes initializers in order, so a weight's
parts are written one after the other). Reading a part again recomputes everything (correct, slower).

:class:`StoredQuantization` is the same contract for a quantization that is read, not computed: the
codes, scales and zero points a pre-quantized (AWQ/GPTQ) checkpoint stores (:mod:`qwen_export.quant.prequant`).

The standard layout is here (:func:`dequantize_linear_initializers`); the ``com.microsoft``
contrib-op layouts (MatMulNBits, GatherBlockQuantized, a tied embedding and lm_head from one
quantization) are in :mod:`.contrib`; :mod:`.numeric` has the byte formats.
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
#: float32 bytes of a checkpoint tensor read and quantized at a time (:meth:`SharedQuantization.quantize`)
STREAM_BYTES = 64 << 20


def _with_length(shape: tuple[int, ...], axis: int, length: int) -> tuple[int, ...]:
    return tuple(length if i == axis else d for i, d in enumerate(shape))


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
        """Read the source and quantize it (not cached: :meth:`part` is what caches). A checkpoint
        tensor whose stored rows run along the axis not quantized is read and quantized in chunks of
        rows (:meth:`_quantize_streamed`): never the whole float tensor in memory."""
        self.reads += 1
        streamed = self._quantize_streamed()
        if streamed is not None:
            return streamed
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

    def _row_reader(self) -> tuple[Callable[[int, int], np.ndarray], int] | None:
        """``(read(a, b), rows)`` when the source is a checkpoint tensor (a
        :class:`~qwen_export.weights.CheckpointTensor`) whose stored rows are slices of the quantized
        view along the axis *not* quantized (the embedding's vocabulary rows, a linear's output
        columns): ``read`` gives stored rows ``a:b`` cast to the source's dtype."""
        binding, reader = getattr(self.source, "binding", None), getattr(self.source, "source", None)
        if binding is None or binding.computed is not None or binding.hf_name is None:
            return None
        if not hasattr(reader, "read_rows") or len(self.shape) != 2:
            return None
        stored_axis = int(binding.transpose) ^ int(self.transpose)  # the stored rows' axis in the view
        if stored_axis == self.axis:
            return None
        dtype = np.dtype(self.source.dtype.numpy())
        name = binding.hf_name

        def read(a: int, b: int) -> np.ndarray:
            rows = np.asarray(reader.read_rows(name, a, b)).astype(dtype, copy=False)
            return rows if stored_axis == 0 else rows.T

        return read, self.shape[stored_axis]

    def _quantize_streamed(self) -> BlockQuantized | None:
        """The quantization computed from chunks of about :data:`STREAM_BYTES` of stored rows, or None
        when the source cannot be read that way. Every block lies inside one chunk (blocks run along
        the quantized axis), so the result equals quantizing the whole tensor."""
        found = self._row_reader()
        if found is None:
            return None
        read, rows = found
        other = 1 - self.axis
        width = self.shape[self.axis]
        step = max(1, STREAM_BYTES // (4 * width))
        if rows <= step:
            return None  # one chunk: the plain path is as small
        codes = scales = zeros = None
        q: BlockQuantized | None = None
        for a in range(0, rows, step):
            b = min(rows, a + step)
            q = quantize(
                read(a, b),
                self.bits,
                self.block_size,
                self.axis,
                self.symmetric,
                algorithm=self.algorithm,
                awq_scale=self.awq_scale,
                scale_dtype=_SCALE_DTYPES[self.scale_dtype],
                importance=self.importance,
                positive_scales=self.positive_scales,
            )
            if codes is None:
                codes = np.empty(self.shape, q.codes.dtype)
                scales = np.empty(_with_length(q.scales.shape, other, rows), np.float32)
                if q.zero_points is not None:
                    zeros = np.empty(scales.shape, q.zero_points.dtype)
            index = (slice(a, b), slice(None)) if other == 0 else (slice(None), slice(a, b))
            codes[index], scales[index] = q.codes, q.scales
            if zeros is not None:
                zeros[index] = q.zero_points
        assert q is not None and codes is not None and scales is not None
        return BlockQuantized(codes, scales, zeros, q.bits, q.block_size, self.axis)

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

    ``transposed``: ``source`` is W^T [N, K], quantized along axis 1 (a tied embedding [V, H], whose
    stored quantization is the lm_head's [H, V] along axis 0: :mod:`qwen_export.export.gptq_layers`).
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
        transposed: bool = False,
    ) -> None:
        super().__init__(
            source,
            bits=stored.bits,
            block_size=stored.block_size,
            axis=int(transposed),
            symmetric=symmetric,
            scale_dtype=scale_dtype,
            name=name,
            positive_scales=positive_scales,
        )
        expected = tuple(stored.shape)[::-1] if transposed else tuple(stored.shape)
        if tuple(self.shape) != expected:
            raise ValueError(f"stored quantization of shape {tuple(stored.shape)} for a weight of shape {self.shape}")
        self.stored, self.transposed = stored, transposed

    def quantize(self) -> BlockQuantized:
        """The stored values (read and unpacked, not quantized)."""
        self.reads += 1
        q = self.stored.block_quantized(self.symmetric, _SCALE_DTYPES[self.scale_dtype])
        if self.transposed and q.codes.ndim == 2:
            q = numeric.transpose_blocks(q)
        matches = q.codes.shape == self.shape and q.axis == self.axis
        if not matches or q.block_size != self.block_size or q.bits != self.bits:
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
            transposed=self.transposed,
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
            return numeric.write_onnx_int4(array, f)
        data = np.ascontiguousarray(array)
        f.write(data.data)  # the array's own buffer: no bytes copy of a big part
        return int(data.nbytes)


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
    return numeric.pack_codes_last(q)


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
