"""The clip search of GPTQ's block scales, in PyTorch.

:func:`~qwen_export.quant.algorithms.clip_search` (numpy, single-threaded) tries every clip value
of its grid on every block: 13 quantize-and-measure passes over each weight. In a GPTQ export of
the real Qwen2.5-Coder-1.5B that was about half of the export's time. :func:`clip_choice` makes the
same choice (per block and output column, the grid value with the least importance-weighted
squared error, ties to the earliest) with the blocks' ranges computed once, in-place float32
operations and PyTorch's threads; :func:`clip_quantize` then quantizes with the choice by the
shared numpy code, so the stored codes and scales are formed exactly as every other algorithm's.

The scales are computed with the numpy code's operations in its order (float32, rounded through
the scale dtype), so each candidate's scale and codes are the same; only the error sums' order
differs, which can flip a choice between two clip values whose errors tie to float32 precision.
"""

from __future__ import annotations

import numpy as np
import torch

from qwen_export.quant.algorithms import default_clip_grid
from qwen_export.quant.numeric import BlockQuantized, code_range, quantize_rtn

#: weight elements searched at once (a few float32 copies of a chunk are live)
CHUNK = 1 << 20


def clip_choice(
    w: np.ndarray,
    importance: np.ndarray | None,
    bits: int,
    block_size: int,
    symmetric: bool,
    scale_dtype: type = np.float32,
    *,
    positive_scales: bool = False,
    base_4bit: tuple[float, ...] | None = None,
) -> np.ndarray:
    """Per block of ``block_size`` rows of ``w`` [K, N] and output column, the clip value of
    :func:`~qwen_export.quant.algorithms.default_clip_grid` (with ``base_4bit``) that minimises the
    block's squared error weighted by ``importance`` [K] (unweighted when None): float32 [K / block_size, N]."""
    k, n = w.shape
    blocks = k // block_size
    grid = default_clip_grid(bits, symmetric, positive_scales=positive_scales, base_4bit=base_4bit)
    weights = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).view(blocks, block_size, n)
    weight = (
        None
        if importance is None
        else torch.from_numpy(np.asarray(importance, np.float32).reshape(blocks, block_size, 1))
    )
    best = torch.empty((blocks, n), dtype=torch.float32)
    step = max(1, CHUNK // max(1, k))
    with torch.no_grad():
        for start in range(0, n, step):
            blk = weights[:, :, start : start + step].contiguous()
            found = _best_in_chunk(blk, weight, grid, bits, symmetric, scale_dtype, positive_scales)
            best[:, start : start + step] = found
    return best.numpy()


def _best_in_chunk(
    blk: torch.Tensor,
    weight: torch.Tensor | None,
    grid: tuple[float, ...],
    bits: int,
    symmetric: bool,
    scale_dtype: type,
    positive_scales: bool,
) -> torch.Tensor:
    """The best clip value per block [nb, n] of one chunk of blocks [nb, B, n]."""
    lo_code, hi_code = code_range(bits, symmetric)
    if symmetric:
        where = blk.abs().argmax(dim=1, keepdim=True)
        extreme = torch.gather(blk, 1, where)[:, 0, :]
        ranges = (extreme,)
    else:
        ranges = (blk.amin(dim=1).clamp_max_(0), blk.amax(dim=1).clamp_min_(0))
    if not all(bool(torch.isfinite(r).all()) for r in ranges):
        raise ValueError("cannot quantize a tensor with NaN or infinite values")
    best_err = torch.full(blk.shape[::2], float("inf"))
    best = torch.empty(blk.shape[::2], dtype=torch.float32)
    work = torch.empty_like(blk)
    for ratio in grid:
        clip = np.float32(ratio)
        scale, zero = _params(ranges, clip, lo_code, hi_code, symmetric, scale_dtype, positive_scales)
        torch.div(blk, scale[:, None, :], out=work)
        work.round_()
        if zero is not None:
            work.add_(zero[:, None, :]).clamp_(lo_code, hi_code).sub_(zero[:, None, :])
        else:
            work.clamp_(lo_code, hi_code)
        work.mul_(scale[:, None, :]).sub_(blk).square_()
        if weight is not None:
            work.mul_(weight)
        err = work.sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best[better] = float(clip)
    return best


def _params(
    ranges: tuple[torch.Tensor, ...],
    clip: np.float32,
    lo_code: int,
    hi_code: int,
    symmetric: bool,
    scale_dtype: type,
    positive_scales: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales [nb, n] and zero points (or None) at one clip value, as :mod:`~qwen_export.quant.numeric`'s
    ``_block_params`` computes them."""
    c = float(clip)
    if symmetric:
        extreme = ranges[0] * c
        if positive_scales:
            scale = torch.where(extreme < 0, extreme / float(np.float32(lo_code)), extreme / float(np.float32(hi_code)))
        else:
            scale = extreme / float(np.float32(lo_code))
        zero = None
    else:
        lo, hi = ranges[0] * c, ranges[1] * c
        scale = (hi - lo) / float(np.float32(hi_code))
    if np.dtype(scale_dtype) == np.float16:  # the ranges are finite (checked by the caller)
        scale = scale.to(torch.float16).to(torch.float32)
        if not bool(torch.isfinite(scale).all()):
            raise ValueError(f"a block's scale overflows {np.dtype(scale_dtype).name}")
    scale[scale == 0] = 1.0
    if not symmetric:
        zero = torch.round(-lo / scale).clamp_(lo_code, hi_code)
    return scale, zero


def clip_quantize(
    w: np.ndarray,
    importance: np.ndarray | None,
    bits: int,
    block_size: int,
    symmetric: bool,
    scale_dtype: type = np.float32,
    *,
    positive_scales: bool = False,
    base_4bit: tuple[float, ...] | None = None,
) -> BlockQuantized:
    """``w`` [K, N] quantized along K with :func:`clip_choice`'s clip values (what
    ``quantize(..., algorithm=CLIP, importance=importance)`` returns, computed faster; with
    ``base_4bit``, another 4-bit grid)."""
    clip = clip_choice(
        w, importance, bits, block_size, symmetric, scale_dtype, positive_scales=positive_scales, base_4bit=base_4bit
    )
    return quantize_rtn(
        w, bits, block_size, 0, symmetric, clip=clip, scale_dtype=scale_dtype, positive_scales=positive_scales
    )
