"""Reference numerics of blocked weight quantization (pure numpy) and the byte layouts ORT wants.

Conventions (see :mod:`.scheme`): a block is ``block_size`` consecutive elements along ``axis``;
each block has one scale (and, asymmetric, one zero point); ``dequantize(q) = (codes - zp) * scale``
in float32, bit for bit what ONNX ``DequantizeLinear`` (opset 21, ``axis``, ``block_size``),
``com.microsoft::MatMulNBits`` and ``com.microsoft::GatherBlockQuantized`` compute.

Scale conventions (``qmin = -2^(bits-1)``, ``qmax = 2^(bits-1) - 1``):

- symmetric (signed codes in [qmin, qmax], zero point 0): ``scale = m / qmin`` where ``m`` is the
  block's element of largest magnitude *with its sign* (the MLAS / llama.cpp ``Q4_0`` convention).
  The extreme element maps exactly to code ``qmin`` (-8 for int4), so the whole 16-level grid is
  used; the scale is negative when the extreme is positive. Elements of the opposite sign beyond
  ``qmax * |scale|`` are clipped to ``qmax`` (error at most ``|scale|``, every other element at most
  ``|scale| / 2``). On Gaussian and heavy-tailed (t3) blocks of 32 this has 22% lower int4 mean
  squared error than ``absmax / 7`` (and 16% lower than ``absmax / 8`` with a positive scale); for
  int8 the three are within 2%. ONNX and ORT accept negative scales: dequantization is a product.
- symmetric with ``positive_scales`` (TensorRT rejects scales <= 0): ``scale = m / qmin`` when the
  extreme ``m`` is negative (as above: it maps to ``qmin``, the full grid is used) and ``m / qmax``
  when it is positive (it maps to ``qmax``; no element is clipped). Every scale is > 0 and the error
  bounds above hold. Only the blocks with a negative extreme use the extra code: on the same
  Gaussian and t3 blocks the int4 mean squared error is 11% below ``absmax / 7``'s (signed: 22%).
- asymmetric (unsigned codes in [0, 2^bits - 1], a per-block zero point): the block range is widened
  to include 0 (``lo = min(min, 0)``, ``hi = max(max, 0)``) so the zero point is a valid code;
  ``scale = (hi - lo) / (2^bits - 1)``, ``zero_point = clip(round(-lo / scale))``; every element is
  within ``scale / 2`` of its dequantized value.
- ``clip`` (a ratio per block, the scales' shape, from :func:`.algorithms.clip_search`) shrinks the
  range (``m * clip``, ``lo * clip``, ``hi * clip``); elements outside are clipped to the end codes.
  Symmetric only, a negative ``clip`` flips the scale's sign: the extreme then maps towards ``qmax``
  (``clip = -qmin / qmax`` is the ``absmax / qmax`` grid; see :func:`.algorithms.flipped_ratio`);
  with ``positive_scales`` clip ratios must be positive (they keep their meaning: ``m * clip``).
- per-channel is the block spanning the whole axis (``block_size = shape[axis]``, see
  :func:`resolve_block_size`): scales of shape [1, N] for W [K, N] along axis 0, which the
  ``DequantizeLinear`` per-axis form stores as [N] with ``axis=1``.
- a block whose scale would be 0 (all zeros) gets scale 1 and codes 0: no division by zero, no NaN.
- ``scale_dtype`` (e.g. ``np.float16`` when the graph stores fp16 scales): scales are rounded to it
  *before* the codes are computed, so the stored scale is exactly the one the codes were made for.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import BinaryIO

import numpy as np
from onnx_ir import _type_casting

#: elements per quantization chunk: bounds the float32 temporaries of big matrices (~16 MiB each).
CHUNK_ELEMENTS = 1 << 22
SUPPORTED_BITS = (2, 4, 8)
#: code bytes packed at a time (:func:`pack_bits_last`, :func:`pack_codes_last`,
#: :func:`pack_matmulnbits`): the temporaries of a 152064 x 8192 table stay ~16 MiB, not ~2.5x its codes.
PACK_CHUNK_BYTES = 16 << 20


@dataclasses.dataclass(frozen=True)
class BlockQuantized:
    """A tensor quantized in blocks along ``axis``."""

    codes: np.ndarray  # int8 (signed) or uint8 (unsigned) integer codes, same shape as the weight
    scales: np.ndarray  # float32, the weight's shape with the quantized axis divided by block_size
    zero_points: np.ndarray | None  # same shape as scales, uint8 codes; None when symmetric
    bits: int
    block_size: int
    axis: int

    @property
    def signed(self) -> bool:
        return self.zero_points is None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def default_zero_point(self) -> int:
        """The offset that turns signed codes into the unsigned codes MatMulNBits/GBQ store."""
        return 1 << (self.bits - 1)

    def unsigned_codes(self, codes: np.ndarray | None = None) -> np.ndarray:
        """Codes as uint8 in [0, 2^bits): signed codes + 2^(bits-1), unsigned codes as they are;
        ``codes``: a slice of :attr:`codes` to convert instead of all of them."""
        codes = self.codes if codes is None else codes
        if not self.signed:
            return codes.astype(np.uint8, copy=False)
        return (codes.astype(np.int16) + self.default_zero_point).astype(np.uint8)


# --- quantization ----------------------------------------------------------------------------------


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """``(lowest, highest)`` code: [-2^(b-1), 2^(b-1) - 1] signed, [0, 2^b - 1] unsigned."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if symmetric else (0, (1 << bits) - 1)


def _geometry(shape: Sequence[int], block_size: int, axis: int) -> tuple[int, int, int, int]:
    """``(axis, pre, blocks, post)``: the weight seen as [pre, blocks, block_size, post]."""
    rank = len(shape)
    if rank == 0:
        raise ValueError("cannot block-quantize a scalar")
    if not -rank <= axis < rank:
        raise ValueError(f"axis {axis} out of range for a rank-{rank} tensor")
    axis %= rank
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    length = int(shape[axis])
    if length == 0 or length % block_size:
        raise ValueError(
            f"axis {axis} of length {length} (shape {tuple(shape)}) is not a positive multiple of block_size "
            f"{block_size}: this tensor cannot be block-quantized; keep it unquantized"
        )
    return axis, math.prod(shape[:axis]), length // block_size, math.prod(shape[axis + 1 :])


def resolve_block_size(shape: Sequence[int], block_size: int, axis: int) -> int:
    """The block length along ``axis``: ``block_size``, or the axis' whole length when it is 0
    (per-channel: :data:`~.scheme.PER_CHANNEL`)."""
    if block_size != 0:
        return block_size
    rank = len(shape)
    if not -rank <= axis < rank:
        raise ValueError(f"axis {axis} out of range for a rank-{rank} tensor")
    return int(shape[axis % rank])


def scales_shape(shape: Sequence[int], block_size: int, axis: int) -> tuple[int, ...]:
    """The scales' (and zero points') shape for a weight of ``shape``: ``axis`` divided by ``block_size``."""
    axis, _, blocks, _ = _geometry(shape, block_size, axis)
    return tuple(blocks if i == axis else int(d) for i, d in enumerate(shape))


def block_chunks(pre: int, post: int, per_row: int) -> list[tuple[slice, slice]]:
    """Slices of [pre, ..., post] of about CHUNK_ELEMENTS each, cut along the larger of pre/post."""
    if pre >= post:
        step = max(1, CHUNK_ELEMENTS // max(1, per_row * post))
        return [(slice(i, i + step), slice(None)) for i in range(0, pre, step)]
    step = max(1, CHUNK_ELEMENTS // max(1, per_row * pre))
    return [(slice(None), slice(j, j + step)) for j in range(0, post, step)]


def _block_params(
    blk: np.ndarray,
    bits: int,
    symmetric: bool,
    clip: np.ndarray | float | None,
    scale_dtype: np.dtype,
    *,
    positive_scales: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Scales (float32) and zero points (float32 integers, or None) of blocks [p, nb, B, q] -> [p, nb, q]."""
    lo_code, hi_code = code_range(bits, symmetric)
    if symmetric:
        where = np.abs(blk).argmax(axis=2)[:, :, None, :]
        extreme = np.take_along_axis(blk, where, axis=2)[:, :, 0, :]
        if clip is not None:
            extreme = extreme * clip
        if positive_scales:
            if clip is not None and not (np.asarray(clip) > 0).all():
                raise ValueError("with positive_scales, clip ratios must be positive")
            scale = np.where(extreme < 0, extreme / np.float32(lo_code), extreme / np.float32(hi_code))
        else:
            scale = extreme / np.float32(lo_code)
        zero = None
    else:
        lo = np.minimum(blk.min(axis=2), 0)
        hi = np.maximum(blk.max(axis=2), 0)
        if clip is not None:
            lo, hi = lo * clip, hi * clip
        scale = (hi - lo) / np.float32(hi_code)
    scale = np.asarray(scale, dtype=np.float32)
    if not np.isfinite(scale).all():
        raise ValueError("cannot quantize a tensor with NaN or infinite values")
    scale = scale.astype(scale_dtype).astype(np.float32)  # the scale the graph will hold
    scale[scale == 0] = 1.0
    if not np.isfinite(scale).all():
        raise ValueError(f"a block's scale overflows {np.dtype(scale_dtype).name}")
    if not symmetric:
        zero = np.clip(np.rint(-lo / scale), lo_code, hi_code).astype(np.float32)
    return scale, zero


def quantize_blocks(
    blk: np.ndarray,
    bits: int,
    symmetric: bool,
    clip: np.ndarray | float | None,
    scale_dtype: np.dtype | type,
    *,
    positive_scales: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Quantize float32 blocks [p, nb, B, q]: ``(codes, scales, zero_points)``, codes as float32
    integers [p, nb, B, q] in the code range, scales [p, nb, q] float32, zero points [p, nb, q]
    float32 integers or None. The building block of :func:`quantize_rtn` and the searches."""
    lo_code, hi_code = code_range(bits, symmetric)
    scale, zero = _block_params(blk, bits, symmetric, clip, np.dtype(scale_dtype), positive_scales=positive_scales)
    q = np.rint(blk / scale[:, :, None, :])
    if zero is not None:
        q += zero[:, :, None, :]
    np.clip(q, lo_code, hi_code, out=q)
    return q, scale, zero


def block_sq_error(
    blk: np.ndarray, q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, weight: np.ndarray | None = None
) -> np.ndarray:
    """Per-block squared dequantization error [p, nb, q] of :func:`quantize_blocks`' result;
    ``weight`` (broadcastable to the blocks, e.g. [1, nb, B, 1]) weights each element's square."""
    if zero is not None:
        q = q - zero[:, :, None, :]
    diff = q * scale[:, :, None, :] - blk
    if weight is None:
        return np.einsum("pnbq,pnbq->pnq", diff, diff)
    return np.einsum("pnbq,pnbq->pnq", diff * weight, diff)


def quantize_rtn(
    w: np.ndarray,
    bits: int,
    block_size: int,
    axis: int,
    symmetric: bool,
    clip: np.ndarray | None = None,
    scale_dtype: np.dtype | type = np.float32,
    *,
    positive_scales: bool = False,
) -> BlockQuantized:
    """Round-to-nearest blocked quantization of ``w`` along ``axis`` (conventions: module doc).

    ``block_size``: 0 is per-channel (one block spanning the axis; the result's ``block_size`` is
    the axis' length).
    ``clip``: an optional ratio per block (the scales' shape) shrinking the block's range.
    ``scale_dtype``: the dtype the scales will be stored in (float32 or float16); the returned
    scales are float32 arrays holding values exactly representable in it.
    ``positive_scales``: symmetric scales all > 0 (module doc); ``clip`` must then be positive.
    Raises ValueError when ``block_size`` does not divide the axis (keep such a tensor unquantized).
    """
    w = np.asarray(w)
    block_size = resolve_block_size(w.shape, block_size, axis)
    axis, pre, blocks, post = _geometry(w.shape, block_size, axis)
    code_range(bits, symmetric)  # validates bits
    out_shape = scales_shape(w.shape, block_size, axis)
    if clip is not None:
        clip = np.asarray(clip, dtype=np.float32)
        if clip.shape != out_shape:
            raise ValueError(f"clip has shape {clip.shape}, expected the scales' shape {out_shape}")
        if not symmetric and not (clip > 0).all():
            raise ValueError("asymmetric clip ratios must be positive")
        clip = clip.reshape(pre, blocks, post)
    view = w.reshape(pre, blocks, block_size, post)
    codes = np.empty((pre, blocks, block_size, post), np.int8 if symmetric else np.uint8)
    scales = np.empty((pre, blocks, post), np.float32)
    zeros = None if symmetric else np.empty((pre, blocks, post), np.uint8)
    for rows, cols in block_chunks(pre, post, blocks * block_size):
        blk = view[rows, :, :, cols].astype(np.float32)
        block_clip = None if clip is None else clip[rows, :, cols]
        q, scale, zero = quantize_blocks(blk, bits, symmetric, block_clip, scale_dtype, positive_scales=positive_scales)
        codes[rows, :, :, cols] = q
        scales[rows, :, cols] = scale
        if zeros is not None and zero is not None:
            zeros[rows, :, cols] = zero
    return BlockQuantized(
        codes=codes.reshape(w.shape),
        scales=scales.reshape(out_shape),
        zero_points=None if zeros is None else zeros.reshape(out_shape),
        bits=bits,
        block_size=block_size,
        axis=axis,
    )


def expand_blocks(per_block: np.ndarray, q: BlockQuantized) -> np.ndarray:
    """A per-block array (the scales' shape) repeated ``block_size`` times along the quantized axis."""
    return np.repeat(per_block, q.block_size, axis=q.axis)


def dequantize(q: BlockQuantized) -> np.ndarray:
    """``(codes - zero_point) * scale`` in float32: ONNX DequantizeLinear's blocked semantics, exactly."""
    _, pre, blocks, post = _geometry(q.codes.shape, q.block_size, q.axis)
    codes = q.codes.reshape(pre, blocks, q.block_size, post).astype(np.float32)
    if q.zero_points is not None:
        codes -= q.zero_points.reshape(pre, blocks, 1, post).astype(np.float32)
    return (codes * q.scales.reshape(pre, blocks, 1, post)).reshape(q.codes.shape)


# --- ONNX INT4/UINT4 raw data ----------------------------------------------------------------------


def pack_onnx_int4(codes: np.ndarray) -> bytes:
    """ONNX INT4/UINT4 raw data: the flattened codes two per byte, the first in the low nibble (an
    odd count is padded with a zero nibble). Codes are int8 in [-8, 7] or uint8 in [0, 15]."""
    codes = np.asarray(codes)
    if codes.dtype not in (np.int8, np.uint8):
        raise ValueError(f"int4 codes must be int8 or uint8, got {codes.dtype}")
    return _type_casting.pack_4bitx2(codes).tobytes()


def write_onnx_int4(codes: np.ndarray, f: BinaryIO) -> int:
    """Write :func:`pack_onnx_int4` of ``codes`` to ``f``, packed in chunks of rows when each row
    holds an even count of codes (chunk edges then fall between bytes): no full-size copy of the
    codes or of the packed bytes. Returns the byte count."""
    codes = np.asarray(codes)
    if codes.dtype not in (np.int8, np.uint8):
        raise ValueError(f"int4 codes must be int8 or uint8, got {codes.dtype}")
    if codes.ndim < 2 or math.prod(codes.shape[1:]) % 2:
        return f.write(pack_onnx_int4(codes))
    written = 0
    step = _chunk_rows(codes)
    for a in range(0, codes.shape[0], step):
        packed = _type_casting.pack_4bitx2(codes[a : a + step])
        f.write(packed.data)
        written += packed.nbytes
    return written


def unpack_onnx_int4(data: bytes, shape: Sequence[int], signed: bool) -> np.ndarray:
    """Inverse of :func:`pack_onnx_int4`: int8 (sign-extended) when ``signed``, else uint8."""
    count = math.prod(shape)
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size != (count + 1) // 2:
        raise ValueError(f"{raw.size} bytes cannot hold {count} int4 values (expected {(count + 1) // 2})")
    values = _type_casting.unpack_4bitx2(raw.copy(), [count]).reshape(tuple(shape))
    if signed:
        return ((values.astype(np.int8) ^ 8) - 8).astype(np.int8)  # sign-extend bit 3
    return values


# --- com.microsoft layouts -------------------------------------------------------------------------


def pack_bits_last(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``bits``-bit values (uint8) along the last axis, low-order bits first (the
    MatMulNBits / GatherBlockQuantized sub-byte layout); each row is padded to whole bytes. A big
    array is packed in chunks along its first axis (:data:`PACK_CHUNK_BYTES`): the only full-size
    allocation is the result."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    values = np.asarray(values, dtype=np.uint8)
    if bits == 8:
        return np.ascontiguousarray(values)
    packed = np.empty((*values.shape[:-1], _packed_len(values.shape[-1], bits)), np.uint8)
    if values.ndim < 2:
        _pack_into(packed, values, bits)
        return packed
    step = _chunk_rows(values)
    for a in range(0, values.shape[0], step):
        _pack_into(packed[a : a + step], values[a : a + step], bits)
    return packed


def _packed_len(count: int, bits: int) -> int:
    """Bytes of ``count`` ``bits``-bit values packed by :func:`pack_bits_last`."""
    return -(-count // (8 // bits))


def _chunk_rows(values: np.ndarray) -> int:
    """Slices along the first axis of ``values`` packed at a time."""
    return max(1, PACK_CHUNK_BYTES // max(1, math.prod(values.shape[1:]) * values.itemsize))


def _pack_into(out: np.ndarray, values: np.ndarray, bits: int) -> None:
    """:func:`pack_bits_last` of ``values`` (uint8, sub-byte ``bits``) written into ``out``."""
    per = 8 // bits
    pad = -values.shape[-1] % per
    if pad:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], pad), np.uint8)], axis=-1)
    grouped = values.reshape(*values.shape[:-1], values.shape[-1] // per, per)
    mask = (1 << bits) - 1
    np.bitwise_and(grouped[..., 0], mask, out=out)
    for i in range(1, per):
        out |= (grouped[..., i] & mask) << (i * bits)


def pack_codes_last(q: BlockQuantized) -> np.ndarray:
    """``pack_bits_last(q.unsigned_codes(), q.bits)``, converted and packed in chunks of rows: no
    full-size unsigned (or int16) copy of the codes."""
    codes = q.codes
    if codes.ndim < 2:
        return pack_bits_last(q.unsigned_codes(), q.bits)
    packed = np.empty((*codes.shape[:-1], _packed_len(codes.shape[-1], q.bits)), np.uint8)
    step = _chunk_rows(codes)
    for a in range(0, codes.shape[0], step):
        packed[a : a + step] = pack_bits_last(q.unsigned_codes(codes[a : a + step]), q.bits)
    return packed


def unpack_bits_last(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits_last`: the first ``count`` values of each row, uint8."""
    packed = np.asarray(packed, dtype=np.uint8)
    if bits == 8:
        return packed[..., :count].copy()
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits)[None, :]
    values = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return values.reshape(*packed.shape[:-1], packed.shape[-1] * per)[..., :count].astype(np.uint8)


def _check_2d(q: BlockQuantized, axis: int, what: str) -> tuple[int, int]:
    if q.codes.ndim != 2 or q.axis != axis:
        raise ValueError(f"{what} needs a 2-D tensor quantized along axis {axis}, got shape {q.shape} axis {q.axis}")
    if q.block_size < 16 or q.block_size & (q.block_size - 1):
        raise ValueError(f"{what} needs a power-of-two block_size >= 16, got {q.block_size}")
    rows, cols = q.shape
    return rows, cols


def pack_matmulnbits(q: BlockQuantized) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(B, scales, zero_points)`` of ``com.microsoft::MatMulNBits`` for a [K, N] weight quantized
    along axis 0 (attributes ``K``, ``N``, ``bits``, ``block_size``):

    - ``B`` uint8 [N, K/block, block*bits/8]: row n holds column n of the weight, its unsigned codes
      packed along K, low-order bits first (signed codes are stored + 2^(bits-1), which is
      MatMulNBits' default zero point when ``zero_points`` is omitted);
    - ``scales`` float32 [N * K/block] (N-major);
    - ``zero_points`` uint8 [N * ceil((K/block) * bits / 8)] (each row packed like B), or None
      when symmetric.
    """
    k, n = _check_2d(q, 0, "MatMulNBits")
    blocks = k // q.block_size
    b = np.empty((n, blocks, _packed_len(q.block_size, q.bits)), np.uint8)
    step = max(1, PACK_CHUNK_BYTES // k)  # columns of the codes transposed and packed at a time
    for a in range(0, n, step):
        columns = np.ascontiguousarray(q.unsigned_codes(q.codes[:, a : a + step]).T)
        b[a : a + step] = pack_bits_last(columns.reshape(-1, blocks, q.block_size), q.bits)
    scales = np.ascontiguousarray(q.scales.T).reshape(-1)
    zeros = None
    if q.zero_points is not None:
        zeros = pack_bits_last(np.ascontiguousarray(q.zero_points.T), q.bits).reshape(-1)
    return b, scales, zeros


def pack_gather_block_quantized(q: BlockQuantized) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(data, scales, zero_points)`` of ``com.microsoft::GatherBlockQuantized`` (uint8 data) for an
    embedding [V, H] quantized along axis 1; attributes: :func:`gather_block_quantized_attributes`.

    - ``data`` uint8 [V, H*bits/8]: each row's unsigned codes packed along H, low-order bits first
      (signed codes stored + 2^(bits-1), the op's default zero point for uint8 data);
    - ``scales`` float32 [V, H/block];
    - ``zero_points`` uint8 [V, ceil((H/block) * bits / 8)] packed like ``data``, or None.

    Row v of ``data`` holds exactly the bytes of row v of MatMulNBits' ``B`` for the tied lm_head
    (``B`` = the same codes as [N=V, K/block, block*bits/8]), and the scales/zero points are the
    same bytes as MatMulNBits' (N-major) ones.
    """
    v, h = _check_2d(q, 1, "GatherBlockQuantized")
    data = pack_codes_last(q)
    zeros = None if q.zero_points is None else pack_bits_last(q.zero_points, q.bits)
    return data, np.ascontiguousarray(q.scales, dtype=np.float32), zeros


def gather_block_quantized_attributes(q: BlockQuantized) -> dict[str, int]:
    """The attributes of the GatherBlockQuantized node for :func:`pack_gather_block_quantized`."""
    return {"bits": q.bits, "block_size": q.block_size, "gather_axis": 0, "quantize_axis": 1}


def transpose_blocks(q: BlockQuantized) -> BlockQuantized:
    """The same quantization seen transposed (2-D): an embedding [V, H] along axis 1 becomes the tied
    lm_head weight [K=H, N=V] along axis 0 (codes, scales and zero points transposed, no requantizing)."""
    if q.codes.ndim != 2:
        raise ValueError(f"transpose_blocks needs a 2-D tensor, got shape {q.shape}")
    return BlockQuantized(
        codes=q.codes.T,
        scales=q.scales.T,
        zero_points=None if q.zero_points is None else q.zero_points.T,
        bits=q.bits,
        block_size=q.block_size,
        axis=1 - q.axis,
    )
