"""GPTQ (Frantar et al., 2022): blocked weight quantization with Hessian-based error compensation.

One linear weight ``W`` [K, N] (our ``weight_t`` layout: K input rows, N output columns), quantized
along K in blocks of ``block_size`` rows, as the rest of the tool quantizes (:mod:`qwen_export.quant.scheme`).
``H = sum_t x_t x_t^T`` [K, K] is the Hessian of the layer's squared output error over the
calibration inputs ``x_t`` (its input rows). Rows are quantized one at a time; the error of row ``k``
is spread over the rows not yet quantized through the Cholesky factor of ``H^-1``, so the layer's
output error, not the weight's, is minimised. Output columns are independent (they share ``H``), so
weights with one input (q/k/v, gate/up) can be quantized separately or concatenated: same codes.

- Scales (and zero points): per block and output column, by the same code as every other algorithm
  (:func:`qwen_export.quant.algorithms.quantize`): RTN, or the clip search weighted by ``diag(H)``
  (the per-row output-error weight), computed from the weights the block holds when GPTQ reaches it
  (dynamic groups), or from the original weights (static groups, always with ``act_order``).
- ``act_order``: rows in decreasing ``diag(H)`` (the most active input channels first, while most
  rows are still free to absorb their error). With static groups every row keeps its own block's
  scale, so the stored layout is the ordinary contiguous one: no ``g_idx``, and every engine runs it.
- Damping: ``damp * mean(diag(H))`` added to the diagonal; dead inputs (``H[k, k] = 0``) are zeroed.

Runs in PyTorch (float32, CPU): the export layer already depends on it, and its Cholesky kernels are
what the reference implementation uses. Memory: a few float32 copies of ``W`` and of ``H``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from qwen_export.export.gptq_clip import clip_quantize
from qwen_export.quant.algorithms import quantize
from qwen_export.quant.numeric import BlockQuantized, code_range
from qwen_export.quant.scheme import QuantAlgorithm

#: rows processed between two lazy (matrix-matrix) error updates; a multiple of every block size.
LAZY_ROWS = 128
#: the same with static groups (``act_order``: no block must lie inside one lazy batch); smaller
#: batches move work from the single-threaded row loop to the block update's matrix product
STATIC_LAZY_ROWS = 32


#: GPTQ's damping: ``damp * mean(diag H)`` added to the Hessian's diagonal. 0.3, not the paper's
#: 0.01: less damping fits the calibration text rather than the model. Measured on the real
#: Qwen2.5-Coder-1.5B (the default int4 layout, 4,096 rows of the built-in calibration text),
#: mean KL against fp32 on three held-out texts (642 + 1,408 + 1,408 tokens), pooled: 0.0467 at
#: 0.01, 0.0425 at 0.1, 0.0415 at 0.3, 0.0404 at 1.0; RTN 0.0482. 0.3 ranks best over the three
#: texts one by one (1.0 wins only the Markdown/C text); benchmarks/README.md, 2026-12-04.
DEFAULT_DAMP = 0.3

#: The 4-bit clip values GPTQ's block-scale search tries (the clip search's own grid has 13; the
#: flipped ratios of symmetric schemes are added as usual). Measured on the real Qwen2.5-Coder-1.5B,
#: pooled mean KL over the three texts: 0.0417 against 0.0415 with the 13 values, for about half
#: the search's time (benchmarks/README.md, 2026-12-05).
GPTQ_CLIP_GRID_4BIT: tuple[float, ...] = (1.0, 0.97, 0.94, 0.9, 0.85, 0.8, 0.7)
#: Calibration tokens GPTQ runs on, where the hidden size needs no more
#: (:meth:`GPTQSettings.tokens_for`: at least one row per channel). On the real Qwen2.5-Coder-1.5B, pooled mean
#: KL over the three texts: 4,096 tokens 0.0415, 3,072 0.0415, 2,048 0.0425; the forward passes and
#: the Hessians cost in proportion (benchmarks/README.md, 2026-12-05).
GPTQ_MAX_TOKENS = 3072
#: Output columns (token ids) of the lm_head, or of a tied table quantized as one, that get GPTQ;
#: the rest get the weighted clip search on the same diag(H). Qwen's byte-level BPE numbers its
#: tokens in merge order, so the later ids are the rarer tokens, and a token's logit error weighs
#: in the KL about as much as its probability. GPTQ's cost is per column (151,936 of them: as much
#: as 7 layers of the tied 1.5B). On the real Qwen2.5-Coder-1.5B made tied (the default layout),
#: pooled mean KL over the three texts: every column 0.0331 (top-1 93.2%), the first 65,536
#: 0.0329 (93.4%), the first 32,768 0.0331 (93.2%), 4 s less export (benchmarks/README.md,
#: 2026-12-05, evening).
HEAD_GPTQ_COLUMNS = 32768


def gptq_width(spec: Any) -> int:
    """The widest input GPTQ runs on when the calibration gives the rows (q/k/v, gate/up: the hidden
    size; o_proj: heads x head_dim); down_proj's wider input gets the weighted clip search."""
    return max(spec.hidden_size, spec.q_size)


@dataclasses.dataclass(frozen=True)
class GPTQSettings:
    """How GPTQ runs: damping fraction, row order, and how block scales are chosen."""

    damp: float = DEFAULT_DAMP
    act_order: bool = True
    #: CLIP: block scales by the diag(H)-weighted clip search; RTN: from the block's range.
    scales: QuantAlgorithm = QuantAlgorithm.CLIP
    #: AWQ scales searched (on this many grid points) and folded before GPTQ; 0: none
    awq_grid: int = 0
    #: GPTQ for an input only when the calibration gives at least this many rows per input channel
    #: (rows >= ratio * K); a wider input's weights get the block scales alone (the diag(H)-weighted
    #: clip search, :func:`weighted_quantize`): with fewer rows than channels the Hessian is rank
    #: deficient and GPTQ fits the calibration text instead of the layer. Measured on the real
    #: Qwen2.5-Coder-1.5B's down_proj (K = 8960, 4,096 calibration rows), output error on held-out
    #: text relative to RTN's: GPTQ 1.07-1.27x, the weighted clip search 0.92-0.94x.
    min_rows_per_input: float = 1.0
    #: GPTQ for weights of at most this many bits; wider ones (the int8 parts of a mixed layout) get
    #: the weighted clip search alone: their rounding error is about 16x smaller than int4's, and
    #: GPTQ's row loop on them (the lm_head above all) cost more export time than the rest of it
    max_bits: int = 4
    #: the calibration forward's matrix products in bfloat16 (PyTorch autocast; the Hessians are
    #: still summed in float32); None: where the CPU multiplies bfloat16 in hardware
    #: (:func:`qwen_export.cpuinfo.native_bf16`), twice float32's speed there
    bf16_forward: bool | None = None
    #: the 4-bit clip values of the block-scale search (:data:`GPTQ_CLIP_GRID_4BIT`)
    clip_grid_4bit: tuple[float, ...] = GPTQ_CLIP_GRID_4BIT
    #: calibration tokens used at most (:data:`GPTQ_MAX_TOKENS`)
    max_tokens: int = GPTQ_MAX_TOKENS
    #: a tied embedding's table quantized as the lm_head it also is: GPTQ on the final norm's
    #: outputs (the weighted clip search at more than :attr:`max_bits`); False: the quantize pass's
    #: RTN, as for an embedding alone. The gather reads the same codes: its error is not what GPTQ
    #: minimises, but the logits' is. On the real Qwen2.5-Coder-1.5B made tied (the tied int4
    #: default), pooled mean KL over the three evaluation texts: RTN 0.0418, the weighted clip
    #: search alone 0.0404, GPTQ 0.0394 (damping 0.1: 0.0400, 1.0: 0.0398); top-1 91.5% -> 92.6%
    #: (benchmarks/README.md, "the tied table quantized as the lm_head")
    tied_table: bool = True
    #: GPTQ for the first so many output columns of the lm_head (or tied table) only
    #: (:data:`HEAD_GPTQ_COLUMNS`); None: every column
    head_gptq_columns: int | None = HEAD_GPTQ_COLUMNS

    def __post_init__(self) -> None:
        if self.head_gptq_columns is not None and self.head_gptq_columns < 1:
            raise ValueError(f"head_gptq_columns must be None (every column) or positive, got {self.head_gptq_columns}")

    def describe(self) -> str:
        order = "act-order" if self.act_order else "in order"
        awq = f", AWQ scales first (grid {self.awq_grid})" if self.awq_grid else ""
        wide = f", inputs of more than rows/{self.min_rows_per_input:g} channels: weighted clip"
        narrow = f", weights over {self.max_bits} bits: weighted clip"
        forward = ", bf16 forward" if self.forward_in_bf16() and not self.awq_grid else ""
        grid = f" ({len(self.clip_grid_4bit)} ratios at 4 bits)" if self.scales is QuantAlgorithm.CLIP else ""
        table = ", tied table as the lm_head" if self.tied_table else ""
        head = "" if self.head_gptq_columns is None else f", lm_head GPTQ on token ids < {self.head_gptq_columns}"
        return f"damp {self.damp:g}, {order}, {self.scales.value} scales{grid}{awq}{wide}{narrow}{forward}{table}{head}"

    def forward_in_bf16(self) -> bool:
        """Whether the calibration forward multiplies in bfloat16 (see :attr:`bf16_forward`)."""
        if self.bf16_forward is None:
            from qwen_export.cpuinfo import native_bf16

            return native_bf16()
        return self.bf16_forward

    def tokens_for(self, widest: int, sequence: int) -> int:
        """Calibration tokens GPTQ runs on: :attr:`max_tokens`, or more where an input of ``widest``
        channels (the hidden size at 7B and up) needs them for :meth:`uses_gptq` (the runner cuts
        the tokens into sequences of at most ``sequence``, one token a sequence may be dropped)."""
        need = -(-int(self.min_rows_per_input * widest * 1000) // 1000)
        return max(self.max_tokens, need + -(-need // sequence))

    def uses_gptq(self, k: int, rows: int) -> bool:
        """Whether an input of ``k`` channels gets GPTQ with ``rows`` calibration rows."""
        return rows >= self.min_rows_per_input * k


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The target quantization of one weight: bits, block size (rows along K), signedness."""

    bits: int
    block_size: int
    symmetric: bool
    positive_scales: bool = False
    scale_dtype: type = np.float32


def _quantize_blocks(
    w: np.ndarray, importance: np.ndarray, geo: Geometry, settings: GPTQSettings, block_size: int
) -> BlockQuantized:
    """The RTN / clip-search quantization of ``w`` [R, N] (numpy float32) in blocks of rows: where
    GPTQ takes its scales and zero points from (the clip search in PyTorch: :mod:`.gptq_clip`)."""
    if settings.scales is QuantAlgorithm.CLIP:
        return clip_quantize(
            w,
            importance,
            geo.bits,
            block_size,
            geo.symmetric,
            geo.scale_dtype,
            positive_scales=geo.positive_scales,
            base_4bit=settings.clip_grid_4bit,
        )
    return quantize(
        w,
        geo.bits,
        block_size,
        0,
        geo.symmetric,
        algorithm=settings.scales,
        scale_dtype=geo.scale_dtype,
        importance=importance if settings.scales is QuantAlgorithm.CLIP else None,
        positive_scales=geo.positive_scales,
    )


def _block_scales(
    w_block: np.ndarray, importance: np.ndarray, geo: Geometry, settings: GPTQSettings
) -> tuple[np.ndarray, np.ndarray | None]:
    """Scales [N] and zero points [N] (or None) of one block of rows [B, N] (numpy float32)."""
    q = _quantize_blocks(w_block, importance, geo, settings, w_block.shape[0])
    zeros = None if q.zero_points is None else q.zero_points.reshape(-1).astype(np.float32)
    return q.scales.reshape(-1).astype(np.float32), zeros


def _inverse_factor(flipped: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1`` (float32: ``U^T U = H^-1``)
    from ``flipped = J H J`` (``J`` the reversal), damping raised tenfold until the factorisation
    succeeds (a near-singular H from few calibration tokens). ``flipped`` is damped in place.

    One Cholesky and one triangular inverse instead of Cholesky, inverse and a second Cholesky:
    ``J H J = L L^T`` gives ``H = R R^T`` for the upper ``R = J L J``, so ``H^-1 = R^-T R^-1`` and
    ``U = R^-1 = J L^-1 J`` (upper, positive diagonal: the same factor). Besides ``flipped``, at
    most two [K, K] matrices live at once (L and its inverse, computed in place; then the inverse
    and U)."""
    mean = float(torch.diag(flipped).mean())
    added = 0.0
    for scale in (damp * 10.0**i for i in range(6)):
        flipped.diagonal().add_(scale * mean - added)
        added = scale * mean
        lower, info = torch.linalg.cholesky_ex(flipped)
        if int(info) == 0:
            inverse = torch.eye(flipped.shape[0], dtype=flipped.dtype)
            torch.linalg.solve_triangular(lower, inverse, upper=False, out=inverse)
            del lower
            if bool(torch.isfinite(inverse.diagonal()).all()):
                return torch.flip(inverse, (0, 1))
    raise ValueError("GPTQ: the calibration Hessian is not positive definite even with heavy damping")


@dataclasses.dataclass(frozen=True)
class Factor:
    """What GPTQ needs of a Hessian, computed once for every weight reading the same input:
    the row order, the upper Cholesky factor of the damped inverse (in that order), the
    per-row importance ``diag(H)`` (original order) and the dead rows."""

    perm: torch.Tensor
    upper: torch.Tensor
    importance: np.ndarray
    dead: torch.Tensor

    @property
    def k(self) -> int:
        return int(self.perm.shape[0])


def factorize(hessian: np.ndarray | torch.Tensor, settings: GPTQSettings | None = None) -> Factor:
    """:class:`Factor` of ``hessian`` [K, K] (see the module docstring). A torch float32 ``hessian``
    is consumed (modified in place): pass a copy to keep it."""
    settings = settings or GPTQSettings()
    h = torch.as_tensor(np.asarray(hessian, dtype=np.float32) if isinstance(hessian, np.ndarray) else hessian)
    h = h.to(torch.float32)
    del hessian  # the permuted copy below is then the only [K, K] matrix held
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"a Hessian must be square, got {tuple(h.shape)}")
    diag = torch.diag(h).clone()
    dead = diag <= 0
    h[dead, dead] = 1.0
    k = h.shape[0]
    perm = torch.argsort(diag, descending=True, stable=True) if settings.act_order else torch.arange(k)
    reverse = perm.flip(0)
    h = h[reverse[:, None], reverse[None, :]]  # J H[perm][:, perm] J in one copy (see _inverse_factor)
    upper = _inverse_factor(h, settings.damp)
    return Factor(perm, upper, diag.clamp_min(0).numpy(), dead)


def _compensate(
    weights: torch.Tensor,
    factor: Factor,
    row_group: np.ndarray,
    scales: np.ndarray,
    zeros: np.ndarray | None,
    codes: torch.Tensor,
    geo: Geometry,
    settings: GPTQSettings,
    threads: int,
) -> None:
    """GPTQ's row loop over ``weights`` (rows in factor order, modified in place): quantize each row
    with its block's scales, spread its error over the rows after it; ``codes`` gets the codes."""
    if settings.act_order:
        _compensate_static(weights, factor, row_group, scales, zeros, codes, geo, threads)
        return
    k, b, upper = weights.shape[0], geo.block_size, factor.upper
    lo, hi = code_range(geo.bits, geo.symmetric)
    for start in range(0, k, LAZY_ROWS):
        stop = min(start + LAZY_ROWS, k)
        torch.set_num_threads(1)  # the row loop's small ops: thread hand-offs cost more than they give
        block = weights[start:stop].clone()
        errors = torch.zeros_like(block)
        tri = upper[start:stop, start:stop]
        for i in range(stop - start):
            row = start + i
            group = int(row_group[row])
            if not settings.act_order and row % b == 0:
                scales[group], zero = _block_scales(
                    block[i : i + b].numpy(), factor.importance[row : row + b], geo, settings
                )
                if zeros is not None:
                    zeros[group] = zero
            s = torch.from_numpy(scales[group])
            z = None if zeros is None else torch.from_numpy(zeros[group])
            x = block[i]
            q = torch.round(x / s)
            if z is not None:
                q += z
            q.clamp_(lo, hi)
            codes[row] = q.to(codes.dtype)
            deq = (q - z) * s if z is not None else q * s
            err = (x - deq) / tri[i, i]
            block[i + 1 :] -= tri[i, i + 1 :, None] * err[None, :]
            errors[i] = err
        torch.set_num_threads(threads)
        weights[stop:] -= upper[start:stop, stop:].T @ errors


def _compensate_static(
    weights: torch.Tensor,
    factor: Factor,
    row_group: np.ndarray,
    scales: np.ndarray,
    zeros: np.ndarray | None,
    codes: torch.Tensor,
    geo: Geometry,
    threads: int,
) -> None:
    """:func:`_compensate` with static groups (``act_order``): every row's scales and zero points
    are known before the loop, so they are gathered per row once. Two levels of lazy updates: the
    row loop's rank-1 updates stay inside a batch of :data:`STATIC_LAZY_ROWS` rows (single-threaded
    vector work), a batch's errors go to the rest of its :data:`LAZY_ROWS` rows, and those rows'
    errors to all later rows in one matrix product (the same sums, grouped: the updates of the
    later rows read and write them once per :data:`LAZY_ROWS` rows, not once per batch)."""
    k, upper = weights.shape[0], factor.upper
    groups = torch.from_numpy(row_group.astype(np.int64))
    for outer in range(0, k, LAZY_ROWS):
        end = min(outer + LAZY_ROWS, k)
        errors = torch.empty((end - outer, weights.shape[1]), dtype=weights.dtype)
        for start in range(outer, end, STATIC_LAZY_ROWS):
            stop = min(start + STATIC_LAZY_ROWS, end)
            torch.set_num_threads(1)
            batch = errors[start - outer : stop - outer]
            _quantize_rows(
                weights[start:stop].clone(),
                upper[start:stop, start:stop],
                batch,
                start,
                groups,
                scales,
                zeros,
                codes,
                geo,
            )
            torch.set_num_threads(threads)
            if stop < end:
                weights[stop:end].addmm_(upper[start:stop, stop:end].T, batch, alpha=-1.0)
        if end < k:
            weights[end:].addmm_(upper[outer:end, end:].T, errors, alpha=-1.0)


def _quantize_rows(
    block: torch.Tensor,
    tri: torch.Tensor,
    errors: torch.Tensor,
    start: int,
    groups: torch.Tensor,
    scales: np.ndarray,
    zeros: np.ndarray | None,
    codes: torch.Tensor,
    geo: Geometry,
) -> None:
    """GPTQ's row loop on ``block`` (rows ``start:`` of the weights, modified in place) with ``tri``
    the factor's square for those rows: codes of each row, its scaled error into ``errors``, and
    the error spread over the block's later rows."""
    lo, hi = code_range(geo.bits, geo.symmetric)
    stop = start + block.shape[0]
    s = torch.from_numpy(scales)[groups[start:stop]]
    z = None if zeros is None else torch.from_numpy(zeros)[groups[start:stop]]
    q = torch.empty_like(block[0])
    for i in range(block.shape[0]):
        x = block[i]
        torch.div(x, s[i], out=q)
        q.round_()
        if z is not None:
            q.add_(z[i]).clamp_(lo, hi)
            codes[start + i] = q
            q.sub_(z[i])
        else:
            q.clamp_(lo, hi)
            codes[start + i] = q
        err = errors[i]
        torch.sub(x, q.mul_(s[i]), out=err).div_(tri[i, i])
        if i + 1 < block.shape[0]:
            block[i + 1 :].addr_(tri[i, i + 1 :], err, alpha=-1.0)


def gptq_quantize(
    w: np.ndarray,
    hessian: np.ndarray | torch.Tensor | Factor,
    geo: Geometry,
    settings: GPTQSettings | None = None,
) -> BlockQuantized:
    """GPTQ of ``w`` [K, N] along axis 0 given ``hessian`` [K, K] (or its :func:`factorize`d form,
    with the same ``settings``) (see the module docstring).

    Returns the codes (int8, signed for symmetric schemes), scales [K / B, N] and zero points in the
    same :class:`~qwen_export.quant.numeric.BlockQuantized` form RTN produces.
    """
    settings = settings or GPTQSettings()
    k, n = w.shape
    b = geo.block_size
    if b <= 0 or k % b or LAZY_ROWS % b:
        raise ValueError(f"GPTQ needs a block size dividing K={k} and {LAZY_ROWS}, got {b}")
    if not isinstance(hessian, Factor):
        if tuple(hessian.shape) != (k, k):
            raise ValueError(f"Hessian of shape {tuple(hessian.shape)} for a weight with K={k}")
        hessian = factorize(hessian.clone() if isinstance(hessian, torch.Tensor) else hessian, settings)
    factor = hessian
    if factor.k != k:
        raise ValueError(f"Hessian of size {factor.k} for a weight with K={k}")
    weights = torch.from_numpy(np.array(w, dtype=np.float32, copy=True))
    weights[factor.dead] = 0.0
    scales = np.empty((k // b, n), np.float32)
    zeros = None if geo.symmetric else np.empty((k // b, n), np.float32)
    if settings.act_order:  # static groups: scales from the original weights, all blocks at once
        first = _quantize_blocks(weights.numpy(), factor.importance, geo, settings, b)
        scales[...] = first.scales
        if zeros is not None:
            zeros[...] = first.zero_points
        del first
    perm = factor.perm
    weights = weights[perm]
    row_group = (perm // b).numpy()
    codes = torch.empty((k, n), dtype=torch.int8 if geo.symmetric else torch.uint8)
    threads = torch.get_num_threads()
    try:
        _compensate(weights, factor, row_group, scales, zeros, codes, geo, settings, threads)
    finally:
        torch.set_num_threads(threads)
    out = torch.empty_like(codes)
    out[perm] = codes
    del codes
    zero_points = None if zeros is None else zeros.astype(np.uint8)
    return BlockQuantized(out.numpy(), scales, zero_points, geo.bits, b, 0)


def weighted_quantize(w: np.ndarray, importance: np.ndarray, geo: Geometry, settings: GPTQSettings) -> BlockQuantized:
    """``w`` [K, N] quantized with GPTQ's block scales and no error compensation: the clip search
    weighted by ``importance`` = diag(H) (or RTN with ``settings.scales`` RTN); for inputs too wide
    for the calibration rows (:attr:`GPTQSettings.min_rows_per_input`)."""
    return _quantize_blocks(np.asarray(w, np.float32), importance, geo, settings, geo.block_size)


#: column blocks :class:`HessianAccumulator` splits ``x^T x`` into: only the blocks on and above the
#: diagonal are multiplied (10 of 16), the ones below are their transposes (on a [3072, 1536]
#: input, 41 ms against 62 ms for the whole product, the same sums)
HESSIAN_PARTS = 4


class HessianAccumulator:
    """``sum_t x_t x_t^T`` over the rows of every tensor added (float32 [K, K], :attr:`h`) and the row
    count. The sums are formed in the upper block triangle (:data:`HESSIAN_PARTS`) and mirrored
    when :attr:`h` is read."""

    def __init__(self, k: int) -> None:
        self._h = torch.zeros((k, k), dtype=torch.float32)
        self._cuts = sorted({k * p // HESSIAN_PARTS for p in range(HESSIAN_PARTS + 1)})
        self._mirrored = True
        self.rows = 0

    @property
    def h(self) -> torch.Tensor:
        """The symmetric [K, K] sum."""
        if not self._mirrored:
            cuts = self._cuts
            for a, b in zip(cuts, cuts[1:], strict=False):
                self._h[b:, a:b] = self._h[a:b, b:].T
            self._mirrored = True
        return self._h

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        cuts = self._cuts
        for a, b in zip(cuts, cuts[1:], strict=False):
            self._h[a:b, a:].addmm_(x[:, a:b].T, x[:, a:])
        self._mirrored = len(cuts) <= 2
        self.rows += x.shape[0]

    def scale_inputs(self, factor: torch.Tensor) -> None:
        """The Hessian of the inputs ``x * factor`` (per channel)."""
        self.h.mul_(factor[:, None]).mul_(factor[None, :])

    def diagonal(self) -> np.ndarray:
        return torch.diag(self.h).clamp_min(0).numpy()


#: input channels whose squares :class:`DiagonalAccumulator` forms at once (the same sums, in a
#: tenth of the memory traffic for down_proj's 3,072 x 8,960 input)
DIAGONAL_COLUMNS = 1024


class DiagonalAccumulator(HessianAccumulator):
    """Only ``diag(H) = sum_t x_t^2`` [K]: what the weighted clip search of an input too wide for
    GPTQ needs (K floats instead of K^2: for down_proj, 8960 instead of 80 million)."""

    def __init__(self, k: int) -> None:  # noqa: D107 - no [K, K] matrix
        self._h = torch.zeros(k, dtype=torch.float32)
        self.rows = 0

    @property
    def h(self) -> torch.Tensor:
        """The diagonal [K]."""
        return self._h

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        for start in range(0, x.shape[1], DIAGONAL_COLUMNS):  # float32 squares a slice at a time
            part = x[:, start : start + DIAGONAL_COLUMNS].to(torch.float32, copy=True)
            self.h[start : start + DIAGONAL_COLUMNS].add_(part.square_().sum(0))
        self.rows += x.shape[0]

    def scale_inputs(self, factor: torch.Tensor) -> None:
        self.h.mul_(factor * factor)

    def diagonal(self) -> np.ndarray:
        return self.h.clamp_min(0).numpy()


def output_error(w: np.ndarray, q: BlockQuantized, hessian: np.ndarray | torch.Tensor) -> float:
    """``trace((W - Q)^T H (W - Q))``: the layer's summed squared output error over the calibration
    rows (what GPTQ minimises; tests and diagnostics)."""
    from qwen_export.quant.numeric import dequantize

    d = torch.from_numpy(np.asarray(w, np.float32) - dequantize(q).astype(np.float32))
    h = torch.as_tensor(hessian, dtype=torch.float32)
    return float((d * (h @ d)).sum())
