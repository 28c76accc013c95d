"""Pre-quantized checkpoints (AutoAWQ GEMM int4, GPTQ int4/int8): read the stored quantization as is.

A checkpoint whose ``config.json`` has a ``quantization_config`` stores each quantized linear
``<prefix>.weight`` (HF layout [N, K] = [out, in]) as packed int32 words instead:

AutoAWQ, ``quant_method "awq"``, ``version "gemm"`` (``awq/modules/linear/gemm.py``, ``WQLinear_GEMM``):

- ``qweight`` int32 [K, N/8]: word ``c`` of input row ``k`` holds output columns ``8c .. 8c+7``,
  4 bits each, in the interleaved order :data:`AWQ_ORDER`: nibble ``i`` (bits ``4i .. 4i+3``) is
  column ``8c + AWQ_ORDER[i]``;
- ``qzeros`` int32 [K/G, N/8]: the zero points (unsigned, 0..15), packed like ``qweight``;
- ``scales`` fp16 [K/G, N]; ``W[n, k] = (q[k, n] - z[k // G, n]) * s[k // G, n]``.

GPTQ, ``quant_method "gptq"`` (AutoGPTQ ``QuantLinear.pack``, gptqmodel, transformers' GPTQ integration):

- ``qweight`` int32 [K*b/32, N], packed along the *input* dim: field ``i`` (bits ``b*i ..``) of
  word row ``r`` is input row ``r * 32/b + i``;
- ``qzeros`` int32 [K/G, N*b/32], packed along N, fields in order (no interleaving);
  ``checkpoint_format "gptq"`` (v1, the default) stores ``zero - 1`` (read back as field + 1),
  ``"gptq_v2"`` stores the zero point itself;
- ``scales`` [K/G, N] (fp16); ``g_idx`` int32 [K], the group of each input row: ``k // G`` unless
  the checkpoint was quantized with ``desc_act`` (act-order), which permutes the groups: refused;
- ``sym: true`` quantizes with the fixed zero point 2^(b-1) (8 for int4).

Our layout (:mod:`.quant.scheme`) is the same blocking: ``W^T`` [K, N] quantized along K (axis 0) in
blocks of G, so the stored values map one to one onto a :class:`~.quant.numeric.BlockQuantized`
(codes [K, N], scales [K/G, N], zero points [K/G, N]). No requantization: AWQ and asymmetric GPTQ
become unsigned codes with zero points (uint4); symmetric GPTQ becomes signed codes ``q - 8`` with
no zero points, which ``MatMulNBits`` stores as the very same nibbles (its default zero point is 8).
lm_head and the embedding are float in both formats (a GPTQ ``lm_head: true`` head is read too).

The exporter also sees every quantized linear as the float ``<prefix>.weight`` [N, K] of its
dequantized values ``(q - z) * s`` (float32, exact: a small integer times an fp16 scale), read one
tensor at a time (see :class:`~.checkpoint.Checkpoint`), so float exports, kept layers and
requantization at another bit width / block size work unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qwen_export.errors import CheckpointError
from qwen_export.quant.numeric import BlockQuantized
from qwen_export.quant.prequant_config import (  # detect, read_config: this module's entry points too
    Method,
    PrequantConfig,
    detect,  # noqa: F401
    read_config,
)
from qwen_export.quant.scheme import Keep, QuantAlgorithm, QuantScheme, WeightFormat

#: AutoAWQ's GEMM pack order: nibble i of a word holds column 8c + AWQ_ORDER[i].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
#: block sizes a QuantScheme (and so the exact import) supports.
SCHEME_BLOCK_SIZES = (32, 64, 128)
EMBEDDING = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
_FLOAT_DTYPES = ("F16", "BF16", "F32")
_CHUNK_ELEMENTS = 1 << 22  # unpacking temporaries: about 16 MiB of uint32 at a time


# --- the stored tensors of one linear ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PackedLinear:
    """One pre-quantized linear: its HF weight name, [N, K] shape and stored tensor names."""

    weight: str  # "<prefix>.weight", the name the exporter reads
    n: int
    k: int
    config: PrequantConfig
    has_g_idx: bool

    @property
    def prefix(self) -> str:
        return self.weight[: -len(".weight")]

    @property
    def qweight(self) -> str:
        return f"{self.prefix}.qweight"

    @property
    def qzeros(self) -> str:
        return f"{self.prefix}.qzeros"

    @property
    def scales(self) -> str:
        return f"{self.prefix}.scales"

    @property
    def g_idx(self) -> str:
        return f"{self.prefix}.g_idx"

    @property
    def parts(self) -> tuple[str, ...]:
        """The stored tensors this linear is made of."""
        return (self.qweight, self.qzeros, self.scales) + ((self.g_idx,) if self.has_g_idx else ())

    @property
    def group(self) -> int:
        return self.config.group(self.k)

    def packed_shapes(self) -> dict[str, tuple[int, ...]]:
        """Expected stored shapes (module docstring)."""
        p, groups = self.config.per_word, self.k // self.group
        qweight = (self.k, self.n // p) if self.config.method is Method.AWQ else (self.k // p, self.n)
        shapes = {self.qweight: qweight, self.qzeros: (groups, self.n // p), self.scales: (groups, self.n)}
        if self.has_g_idx:
            shapes[self.g_idx] = (self.k,)
        return shapes


@dataclasses.dataclass(frozen=True)
class Prequantized:
    """A checkpoint's quantization: its config and every pre-quantized linear by HF weight name."""

    config: PrequantConfig
    linears: Mapping[str, PackedLinear]

    @property
    def parts(self) -> frozenset[str]:
        return frozenset(name for linear in self.linears.values() for name in linear.parts)


def plan(
    config: PrequantConfig, tensors: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], source: str
) -> Prequantized:
    """Map every expected 2-D ``*.weight`` (except the embedding) stored as ``qweight`` to its
    :class:`PackedLinear`, checking the stored names, dtypes and shapes; one CheckpointError lists
    every problem. ``tensors``: stored name -> info (``.dtype``, ``.shape``)."""
    linears: dict[str, PackedLinear] = {}
    problems: list[str] = []
    missing: list[str] = []
    for name, shape in expected.items():
        if not name.endswith(".weight") or len(shape) != 2 or name == EMBEDDING:
            continue
        prefix = name[: -len(".weight")]
        if f"{prefix}.qweight" not in tensors:
            continue
        n, k = shape
        linear = PackedLinear(name, n, k, config, f"{prefix}.g_idx" in tensors)
        if name in tensors:
            problems.append(f"{source} stores both {name} and {linear.qweight}")
        group = linear.group
        if k % group or n % config.per_word or (config.method is Method.GPTQ and k % config.per_word):
            problems.append(
                f"{linear.prefix} [{n}, {k}] cannot hold {config.describe()}: K must be a multiple of the group "
                f"size and of {config.per_word}, N a multiple of {config.per_word}"
            )
            continue
        if config.desc_act and config.method is Method.GPTQ and not linear.has_g_idx:
            missing.append(linear.g_idx)
        for part, want in linear.packed_shapes().items():
            info = tensors.get(part)
            if info is None:
                missing.append(part)
                continue
            dtypes = _FLOAT_DTYPES if part == linear.scales else ("I32",)
            if tuple(info.shape) != want or info.dtype not in dtypes:
                problems.append(
                    f"tensor {part} is {info.dtype} {list(info.shape)}, expected {'/'.join(dtypes)} {list(want)} "
                    f"for {config.describe()} of a [{n}, {k}] weight"
                )
        linears[name] = linear
    if missing:
        problems.insert(
            0,
            f"{source} is missing {len(missing)} tensor(s) of its {config.describe()} linears: {_some(missing)} "
            f"(each quantized linear stores qweight, qzeros and scales{', g_idx' if config.desc_act else ''}); "
            "the checkpoint is incomplete or in another packing",
        )
    if not linears and not problems:
        problems.append(
            f"{source}: config.json declares {config.describe()} but no linear is stored as <prefix>.qweight; "
            "remove quantization_config from config.json if the weights are float"
        )
    if problems:
        raise CheckpointError("; ".join(problems))
    return Prequantized(config, dict(linears))


def _some(names: Sequence[str], show: int = 5) -> str:
    shown = ", ".join(names[:show])
    return shown if len(names) <= show else f"{shown}, ... ({len(names)} in all)"


# --- unpacking -----------------------------------------------------------------------------------------


def _words(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.int32).view(np.uint32)


def unpack_along_columns(words: np.ndarray, bits: int, order: Sequence[int] | None = None) -> np.ndarray:
    """int32 [R, W] -> uint8 [R, W * 32/bits]: field ``i`` (bits ``bits*i ..``) of word ``c`` is
    column ``c * 32/bits + order[i]`` (``order`` None: ``i``, GPTQ's qzeros; :data:`AWQ_ORDER`: AutoAWQ)."""
    u = _words(words)
    p = 32 // bits
    rows, width = u.shape
    out = np.empty((rows, width, p), np.uint8)
    shifts = (np.arange(p, dtype=np.uint32) * bits)[None, None, :]
    where = list(order) if order is not None else list(range(p))
    step = max(1, _CHUNK_ELEMENTS // max(1, width * p))
    for r in range(0, rows, step):
        fields = (u[r : r + step, :, None] >> shifts) & np.uint32((1 << bits) - 1)
        out[r : r + step][:, :, where] = fields.astype(np.uint8)
    return out.reshape(rows, width * p)


def unpack_along_rows(words: np.ndarray, bits: int) -> np.ndarray:
    """int32 [R, N] -> uint8 [R * 32/bits, N]: field ``i`` of word row ``r`` is row ``r * 32/bits + i``
    (GPTQ's qweight, packed along the input dim)."""
    u = _words(words)
    p = 32 // bits
    rows, cols = u.shape
    out = np.empty((rows, p, cols), np.uint8)
    shifts = (np.arange(p, dtype=np.uint32) * bits)[None, :, None]
    step = max(1, _CHUNK_ELEMENTS // max(1, cols * p))
    for r in range(0, rows, step):
        out[r : r + step] = ((u[r : r + step, None, :] >> shifts) & np.uint32((1 << bits) - 1)).astype(np.uint8)
    return out.reshape(rows * p, cols)


@dataclasses.dataclass(frozen=True)
class PackedArrays:
    """The stored arrays of one linear, as read (int32 words, float scales, optional g_idx)."""

    linear: PackedLinear
    qweight: np.ndarray
    qzeros: np.ndarray
    scales: np.ndarray
    g_idx: np.ndarray | None

    @classmethod
    def read(cls, linear: PackedLinear, read: Callable[[str], np.ndarray]) -> PackedArrays:
        """Read the stored tensors with ``read`` (a raw tensor reader); checks ``g_idx``."""
        g_idx = read(linear.g_idx) if linear.has_g_idx else None
        if g_idx is not None:
            check_g_idx(linear, g_idx)
        return cls(linear, read(linear.qweight), read(linear.qzeros), read(linear.scales), g_idx)


def check_g_idx(linear: PackedLinear, g_idx: np.ndarray) -> None:
    """g_idx must map input row k to group k // G (no act-order permutation)."""
    trivial = np.arange(linear.k, dtype=np.int64) // linear.group
    if np.asarray(g_idx).shape != trivial.shape or not np.array_equal(np.asarray(g_idx, np.int64), trivial):
        raise CheckpointError(
            f"tensor {linear.g_idx} assigns input channels to groups out of order (GPTQ desc_act / act-order): the "
            f"groups are not contiguous blocks of K, which blockwise int{linear.config.bits} (MatMulNBits) cannot "
            "express; use a GPTQ checkpoint quantized with desc_act=false, or re-quantize from the float "
            "checkpoint (--weights int4)"
        )


@dataclasses.dataclass(frozen=True)
class Decoded:
    """Columns [lo, hi) of one linear's W^T [K, N]: unsigned codes uint8 [K, n], zero points int16
    [K/G, n] (the stored value plus the format's offset: may exceed 2^bits - 1 in a broken v1 file),
    scales float32 [K/G, n]."""

    codes: np.ndarray
    zeros: np.ndarray
    scales: np.ndarray
    bits: int
    group: int


def decode(packed: PackedArrays, lo: int = 0, hi: int | None = None) -> Decoded:
    """Unpack output columns ``lo:hi`` (default all) of ``packed`` (module docstring for the layouts)."""
    linear, cfg = packed.linear, packed.linear.config
    hi = linear.n if hi is None else min(hi, linear.n)
    lo = max(0, min(lo, hi))
    p = cfg.per_word
    w0, w1 = lo // p, -(-hi // p)
    cut = slice(lo - w0 * p, hi - w0 * p)
    order = AWQ_ORDER if cfg.method is Method.AWQ else None
    if cfg.method is Method.AWQ:
        codes = unpack_along_columns(packed.qweight[:, w0:w1], cfg.bits, AWQ_ORDER)[:, cut]
    else:
        codes = unpack_along_rows(packed.qweight[:, lo:hi], cfg.bits)
    zeros = unpack_along_columns(packed.qzeros[:, w0:w1], cfg.bits, order)[:, cut].astype(np.int16)
    zeros += cfg.zero_offset
    scales = np.asarray(packed.scales[:, lo:hi], dtype=np.float32)
    return Decoded(np.ascontiguousarray(codes), zeros, scales, cfg.bits, linear.group)


def dequantize_transposed(decoded: Decoded) -> np.ndarray:
    """The float view [n, K] (HF layout) of decoded columns: ``(q - z) * s`` in float32, in K chunks."""
    k, n = decoded.codes.shape
    g = decoded.group
    out = np.empty((n, k), np.float32)
    step = max(1, _CHUNK_ELEMENTS // max(1, g * n)) * g
    for k0 in range(0, k, step):
        k1 = min(k, k0 + step)
        blocks = decoded.codes[k0:k1].reshape(-1, g, n).astype(np.float32)
        blocks -= decoded.zeros[k0 // g : k1 // g, None, :]
        blocks *= decoded.scales[k0 // g : k1 // g, None, :]
        out[:, k0:k1] = blocks.reshape(k1 - k0, n).T
    return out


def dequantize_weight(linear: PackedLinear, read: Callable[[str], np.ndarray]) -> np.ndarray:
    """The float view of a whole linear: ``<prefix>.weight`` [N, K] float32, ``(q - z) * s``."""
    return dequantize_transposed(decode(PackedArrays.read(linear, read)))


# --- the exact path: stored values as BlockQuantized ------------------------------------------------------


def _block_quantized(decoded: Decoded, symmetric: bool, scale_dtype: Any, what: str) -> BlockQuantized:
    """``decoded`` as a BlockQuantized [K, N] along axis 0 (the quantize pass's layout), no requantizing:
    asymmetric: unsigned codes and zero points; symmetric: signed codes ``q - 2^(bits-1)`` (every zero
    point must be 2^(bits-1)). Scales are rounded to ``scale_dtype`` (exact for fp16 scales)."""
    bits, half = decoded.bits, 1 << (decoded.bits - 1)
    scales = decoded.scales.astype(scale_dtype).astype(np.float32)
    if symmetric:
        if not (decoded.zeros == half).all():
            raise CheckpointError(
                f"{what}: config.json says symmetric (sym=true) but zero points other than {half} are stored; "
                "export with --asymmetric to keep them"
            )
        codes = (decoded.codes.astype(np.int16) - half).astype(np.int8)
        return BlockQuantized(codes, scales, None, bits, decoded.group, 0)
    if decoded.zeros.min() < 0 or decoded.zeros.max() > (1 << bits) - 1:
        raise CheckpointError(f"{what}: {_zero_overflow(bits)}")
    return BlockQuantized(decoded.codes, scales, decoded.zeros.astype(np.uint8), bits, decoded.group, 0)


def _zero_overflow(bits: int) -> str:
    return (
        f"a stored zero point reads back as {1 << bits} (GPTQ v1 stores zero - 1, so a zero point of 0 wrapped "
        f"around), which uint{bits} cannot hold"
    )


class StoredLinear:
    """The stored quantization of one linear as the quantize pass sees W = weight^T [K, N]: nothing is
    read until :meth:`block_quantized` (or :meth:`mismatch` for a GPTQ v1 asymmetric check)."""

    def __init__(self, linear: PackedLinear, read: Callable[[str], np.ndarray]) -> None:
        self.linear, self._read = linear, read
        self.shape = (linear.k, linear.n)
        self.bits, self.block_size = linear.config.bits, linear.group
        self.symmetric = linear.config.symmetric

    @property
    def members(self) -> tuple[StoredLinear, ...]:
        return (self,)

    def decoded(self) -> Decoded:
        return decode(PackedArrays.read(self.linear, self._read))

    def zero_problem(self) -> str | None:
        """Why the stored zero points cannot be uint``bits`` codes (GPTQ v1 only), else None."""
        cfg = self.linear.config
        if cfg.zero_offset == 0 or cfg.symmetric:
            return None
        order = AWQ_ORDER if cfg.method is Method.AWQ else None
        zeros = unpack_along_columns(self._read(self.linear.qzeros), cfg.bits, order)
        return _zero_overflow(cfg.bits) if (zeros.astype(np.int16) + cfg.zero_offset).max() >= 1 << cfg.bits else None

    def describe(self) -> str:
        return self.linear.config.describe()

    def mismatch(self, bits: int, block_size: int, symmetric: bool) -> str | None:
        """Why the stored values cannot be used for a scheme of ``bits``/``block_size``/``symmetric``
        (the weight is then requantized from its dequantized floats), or None when they can."""
        asked = f"int{bits} block {block_size} {'symmetric' if symmetric else 'asymmetric'}"
        if bits != self.bits or block_size != self.block_size:
            return f"stored {self.describe()} differs from the requested {asked}"
        if symmetric and not self.symmetric:
            return f"stored {self.describe()} needs zero points; the requested {asked} has none (use --asymmetric)"
        for member in self.members:
            problem = member.zero_problem()
            if problem is not None:
                return f"{member.linear.qzeros}: {problem}"
        return None

    def block_quantized(self, symmetric: bool, scale_dtype: Any = np.float32) -> BlockQuantized:
        """The stored values as W^T's BlockQuantized (see :func:`_block_quantized`)."""
        return _block_quantized(self.decoded(), symmetric, scale_dtype, self.linear.prefix)


class StoredConcat(StoredLinear):
    """Several stored linears of one K concatenated along N (the packed ``qkv_proj``): blocks run
    along K, so concatenating codes, scales and zero points column-wise is exact."""

    def __init__(self, parts: Sequence[StoredLinear]) -> None:  # noqa: D107 - no super().__init__
        first = parts[0]
        kinds = {(p.shape[0], p.bits, p.block_size, p.symmetric) for p in parts}
        if len(kinds) != 1:
            raise ValueError("stored linears to concatenate differ in K, bits, group size or symmetry")
        self.parts = tuple(m for p in parts for m in p.members)
        self.linear = first.linear
        self.shape = (first.shape[0], sum(p.shape[1] for p in parts))
        self.bits, self.block_size, self.symmetric = first.bits, first.block_size, first.symmetric

    @property
    def members(self) -> tuple[StoredLinear, ...]:
        return self.parts

    def decoded(self) -> Decoded:
        pieces = [p.decoded() for p in self.parts]
        return Decoded(
            np.concatenate([d.codes for d in pieces], axis=1),
            np.concatenate([d.zeros for d in pieces], axis=1),
            np.concatenate([d.scales for d in pieces], axis=1),
            self.bits,
            self.block_size,
        )

    def block_quantized(self, symmetric: bool, scale_dtype: Any = np.float32) -> BlockQuantized:
        what = "+".join(p.linear.prefix for p in self.parts)
        return _block_quantized(self.decoded(), symmetric, scale_dtype, what)


# --- export defaults ---------------------------------------------------------------------------------------


def _config_of(checkpoint: Any) -> tuple[PrequantConfig | None, Mapping[str, PackedLinear]]:
    """``checkpoint``: a Checkpoint, a :class:`Prequantized` or a checkpoint directory."""
    pre = checkpoint if isinstance(checkpoint, Prequantized) else getattr(checkpoint, "prequantized", None)
    if pre is not None:
        return pre.config, pre.linears
    if isinstance(checkpoint, (str, Path)):
        return read_config(checkpoint), {}
    return None, {}


def default_scheme(checkpoint: Any) -> QuantScheme | None:
    """The QuantScheme that keeps a pre-quantized checkpoint's own quantization (None for a float one).

    ``checkpoint``: a :class:`~.checkpoint.Checkpoint` (or its :class:`Prequantized`) or a checkpoint
    directory (only config.json is read). int4/int8 at the
    checkpoint's group size, symmetric for GPTQ ``sym`` (else asymmetric), RTN (only used for a weight
    the pass cannot take as stored), the embedding kept in the model dtype as the checkpoint stores it,
    and lm_head too unless it is stored quantized. Raises CheckpointError for a group size no scheme has.
    """
    config, linears = _config_of(checkpoint)
    if config is None:
        return None
    if config.group_size not in SCHEME_BLOCK_SIZES:
        raise CheckpointError(
            f"the checkpoint's {config.describe()} cannot be kept as stored: block sizes are "
            f"{', '.join(map(str, SCHEME_BLOCK_SIZES))}; pass --weights int{config.bits} --block-size 128 to "
            "re-quantize its dequantized weights, or --weights fp16 for a float export"
        )
    keep = {Keep.EMBEDDING} | (set() if LM_HEAD in linears else {Keep.LM_HEAD})
    return QuantScheme(
        WeightFormat.INT4 if config.bits == 4 else WeightFormat.INT8,
        block_size=config.group_size,
        symmetric=config.symmetric,
        algorithm=QuantAlgorithm.RTN,
        keep=frozenset(keep),
    )


def record(checkpoint: Any) -> dict[str, Any] | None:
    """``manifest.extra["quantization"]["prequantized"]``: the source checkpoint's quantization, or None."""
    config, linears = _config_of(checkpoint)
    if config is None:
        return None
    return {**config.to_dict(), "linears": len(linears)}
