"""8-bit logarithmic block scales (``--scales log8``): one byte a block instead of float16's two.

A 4-bit weight in blocks of 32 spends half a bit per weight on its float16 scales (an eighth of its
bytes). Within one row (an output channel of a linear, a row of the table) the scales span a few
octaves at most, so each is stored as a byte ``q`` on a logarithmic grid below the row's largest:

    scale = top * 2 ** (-q * step / 256)        q, step in 0..255 (uint8), top float16

``top`` (the row's largest scale, float16) and ``step`` (the grid's spacing in 256ths of an octave,
the smallest that spans the row's smallest non-zero scale) are stored per row: 3 bytes a row. A
grid point is at most ``step / 512`` octaves from a scale: at the usual 2-4 octaves a row, within
0.2-0.4% of it. The codes are not changed: a 4-bit code is at most 15 steps from its zero point,
so a weight moves by at most ``15 * 0.4% = 6%`` of a quantization step, an error variance some
0.1% of the rounding's own (a byte-rounded scale costs 8-bit codes far more: they keep float16).

Blocks whose codes all sit on the zero point dequantize to 0 under any scale; they take the row's
median and do not widen its range. The graph computes the float scales with ``Cast``, ``Mul``,
``Exp`` (:func:`decode`'s steps, in float32: four over the whole tensor), which ONNX Runtime's
constant folding runs once when the session is created (the kernels then see plain float32
scales, prepacked as before).
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np

from qwen_export.quant.numeric import BlockQuantized

#: ``step`` is in 1/STEP_UNIT octaves
STEP_UNIT = 256
#: the codes' largest value (the grid spans ``LEVELS * step / STEP_UNIT`` octaves below ``top``)
LEVELS = 255
#: the factor of ``q * step`` in the exponent: 2 ** (-q * step / 256) = exp(q * step * EXPONENT)
EXPONENT = np.float32(-math.log(2.0) / STEP_UNIT)
#: bytes a row stores beside its codes (float16 ``top``, uint8 ``step``)
ROW_BYTES = 3
#: codes compared at a time by :func:`free_blocks`
CHUNK = 1 << 24


@dataclasses.dataclass(frozen=True)
class LogScales:
    """Scales [rows, blocks] as bytes: ``codes`` uint8 [rows, blocks], ``top`` float16 [rows, 1],
    ``step`` uint8 [rows, 1]."""

    codes: np.ndarray
    top: np.ndarray
    step: np.ndarray


def encode(scales: np.ndarray, free: np.ndarray | None = None) -> LogScales:
    """``scales`` [rows, blocks] (>= 0) on each row's logarithmic grid; ``free`` [rows, blocks]:
    blocks any scale serves (their codes are all on the zero point). ValueError for a negative or
    non-finite scale, or a row's largest beyond float16's range."""
    s = np.asarray(scales, dtype=np.float32)
    if s.ndim != 2:
        raise ValueError(f"log8 scales are encoded per row of a 2-D array, got shape {s.shape}")
    if not np.isfinite(s).all() or (s < 0).any():
        raise ValueError("log8 scales must be finite and non-negative")
    used = s > 0 if free is None else (s > 0) & ~np.asarray(free, dtype=bool)
    big = np.where(used, s, 0).max(axis=1, initial=0.0)
    if float(big.max(initial=0.0)) > float(np.finfo(np.float16).max):
        raise ValueError(f"a quantization scale of {float(big.max()):g} is beyond float16's range (65504)")
    top = big.astype(np.float16)
    top32 = top.astype(np.float32)
    small = np.where(used, s, np.inf).min(axis=1, initial=np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        span = np.where((top32 > 0) & np.isfinite(small), np.log2(top32 / small), 0.0)
    step = np.clip(np.ceil(np.maximum(span, 0) * STEP_UNIT / LEVELS), 1, 255).astype(np.uint8)
    with np.errstate(divide="ignore", invalid="ignore"):
        octaves = np.log2(top32[:, None] / s)  # inf for 0 (clipped to the grid's bottom)
    q = np.rint(np.nan_to_num(octaves, nan=0.0, posinf=1e9) * STEP_UNIT / step[:, None].astype(np.float32))
    codes = np.clip(q, 0, LEVELS).astype(np.uint8)
    codes = _free_to_median(codes, used)
    return LogScales(codes, top[:, None], step[:, None])


def _free_to_median(codes: np.ndarray, used: np.ndarray) -> np.ndarray:
    """Rows' free (or zero) blocks at the code of the row's median used block (0 in a row without)."""
    if used.all():
        return codes
    masked = np.where(used, codes.astype(np.float32), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "All-NaN slice": a row without a used block
        median = np.nan_to_num(np.nanmedian(masked, axis=1), nan=0.0)
    return np.where(used, codes, np.rint(median)[:, None].astype(np.uint8))


def decode(log: LogScales) -> np.ndarray:
    """The float32 scales [rows, blocks] the graph computes: ``top * exp(q * (step * EXPONENT))``."""
    rate = log.step.astype(np.float32) * EXPONENT
    return np.exp(log.codes.astype(np.float32) * rate) * log.top.astype(np.float32)


def stored_bytes(rows: int, blocks: int) -> int:
    """File bytes of [rows, blocks] scales in this format."""
    return rows * blocks + rows * ROW_BYTES


def free_blocks(q: BlockQuantized) -> np.ndarray:
    """[the scales' shape] bool: blocks of ``q`` whose codes all sit on the zero point (they
    dequantize to 0 whatever their scale). Compared about :data:`CHUNK` codes at a time."""
    shape = q.codes.shape
    axis = q.axis % len(shape)
    pre, post = int(np.prod(shape[:axis])), int(np.prod(shape[axis + 1 :]))
    blocks = shape[axis] // q.block_size
    codes = q.codes.reshape(pre, blocks, q.block_size, post)
    zero = np.zeros((1, 1, 1, 1), codes.dtype) if q.zero_points is None else q.zero_points.reshape(pre, blocks, 1, post)
    free = np.empty((pre, blocks, post), bool)
    if pre > 1:  # slices of the leading rows
        rows = max(1, CHUNK // (shape[axis] * post))
        for start in range(0, pre, rows):
            part = slice(start, start + rows)
            free[part] = (codes[part] == zero[part if zero.shape[0] > 1 else slice(None)]).all(axis=2)
    else:  # quantized along the first axis: slices of the columns
        cols = max(1, CHUNK // shape[axis])
        for start in range(0, post, cols):
            part = slice(start, start + cols)
            free[..., part] = (codes[..., part] == zero[..., part if zero.shape[-1] > 1 else slice(None)]).all(axis=2)
    return free.reshape(q.scales.shape)
