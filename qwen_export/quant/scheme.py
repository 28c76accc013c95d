"""What to quantize and how: the options of ``qwen-export export --weights/--block-size/...``.

Conventions shared by :mod:`.numeric`, :mod:`.algorithms`, the ``quantize`` pass and the ONNX
Runtime lowering:

- a linear weight is stored as ``W`` [K, N] = [in, out] (our ``*_t`` initializers); it is quantized
  in blocks of ``block_size`` consecutive input rows (axis 0), one scale (and zero point) per block
  and output column: ``scales`` [K / block_size, N];
- the embedding ``E`` [V, H] is quantized along H (axis 1) in blocks: ``scales`` [V, H / block_size]
  (so each vocabulary row is self-contained for ``Gather`` and, transposed, for the tied lm_head);
- per-channel (``block_size = 0``): one block spans the whole quantized axis, one scale per output
  channel: the graph holds ``DequantizeLinear(codes [K, N], scales [N], axis=1)`` (no ``block_size``
  attribute; the embedding: ``scales`` [V], ``axis=0``), the ONNX per-axis form TensorRT accepts
  for INT8;
- codes: symmetric int4 in [-8, 7] / int8 in [-128, 127] with zero point 0; asymmetric uint4 in
  [0, 15] / uint8 in [0, 255] with a per-block zero point;
- ``dequantize(q) = (q - zero_point) * scale``, exactly ONNX ``DequantizeLinear`` (opset 21,
  ``axis``, ``block_size``);
- ``positive_scales`` (symmetric only): every scale is > 0 (TensorRT rejects negative scales); the
  default signed-extreme convention gives negative scales to blocks whose extreme is positive (see
  :mod:`.numeric`).
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import re
from typing import Any

from qwen_export.errors import OptionError

#: ``QuantScheme.block_size`` meaning one block spanning the whole quantized axis (per-channel).
PER_CHANNEL = 0
BLOCK_SIZES = (PER_CHANNEL, 32, 64, 128)
#: block sizes one tensor may be given by :attr:`QuantScheme.block_overrides` (``--block PATTERN=SIZE``):
#: the power-of-two blocks every mixing target's kernels take (MatMulNBits / GatherBlockQuantized: >= 16)
OVERRIDE_BLOCK_SIZES = (16, 32, 64, 128)


class WeightFormat(enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"

    @property
    def bits(self) -> int | None:
        return {WeightFormat.INT8: 8, WeightFormat.INT4: 4}.get(self)


class PrefillWeights(enum.Enum):
    """A second graph for prompt processing in an ONNX Runtime artifact (``export --prefill``,
    ``manifest.extra.prefill.weights``). ``int8``: its q/k/v, o, gate and up projections run as
    int8 GEMMs with activations quantized at run time (SmoothQuant-smoothed), about 2x the prompt
    speed on a CPU with VNNI, for a byte per weight of those projections more on disk and in memory."""

    NONE = "none"
    INT8 = "int8"

    @classmethod
    def parse(cls, value: Any) -> PrefillWeights:
        from qwen_export.spec import parse_choice

        return parse_choice(cls, value, "--prefill")


class QuantAlgorithm(enum.Enum):
    RTN = "rtn"  # round to nearest, scale from the block's range
    CLIP = "clip"  # data-free: per-block clipping ratio searched to minimise the weight error
    AWQ = "awq"  # calibration: activation-aware per-input-channel scaling, searched on real activations
    GPTQ = "gptq"  # calibration: Hessian-based error compensation, layer by layer (qwen_export.export.gptq)
    AWQ_GPTQ = "awq-gptq"  # calibration: AWQ scales folded first, then GPTQ on the scaled weights

    @property
    def calibrated(self) -> bool:
        """Needs calibration text run through the model at export time."""
        return self in (QuantAlgorithm.AWQ, QuantAlgorithm.GPTQ, QuantAlgorithm.AWQ_GPTQ)

    @property
    def gptq(self) -> bool:
        """Quantized by GPTQ at calibration time (:mod:`qwen_export.export.gptq_layers`)."""
        return self in (QuantAlgorithm.GPTQ, QuantAlgorithm.AWQ_GPTQ)


class ScaleFormat(enum.Enum):
    """How an artifact's files store the block scales of 4-bit weights (``--scales``).
    ``float16``: two bytes a block; ``log8``: one byte a block on a logarithmic grid per row, plus
    3 bytes a row (:mod:`qwen_export.quant.log_scales`; ONNX Runtime, asymmetric weights, whose
    scales are non-negative). 8-bit weights keep float16 scales either way. Engines compute float
    scales from either when they load the artifact: the formats differ on disk, not in memory."""

    FLOAT16 = "float16"
    LOG8 = "log8"

    @classmethod
    def parse(cls, value: Any) -> ScaleFormat:
        from qwen_export.spec import parse_choice

        return parse_choice(cls, value, "--scales")


class Keep(enum.Enum):
    """Tensors that may stay in higher precision (mixed precision)."""

    EMBEDDING = "embedding"  # embed_tokens (and a tied lm_head, which shares it)
    LM_HEAD = "lm_head"  # an untied lm_head


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    fmt: WeightFormat
    block_size: int = 32
    symmetric: bool = True
    algorithm: QuantAlgorithm = QuantAlgorithm.RTN
    #: tensors kept in the model dtype; the embedding/tied head is quantized to int8 by default
    #: (``embedding_bits``) rather than kept: it is the largest tensor.
    keep: frozenset[Keep] = frozenset()
    #: bits for the embedding (and tied lm_head) when not kept: 8 by default even for int4.
    embedding_bits: int = 8
    #: layer indices kept in the model dtype (e.g. the first and last layers, most sensitive).
    keep_layers: frozenset[int] = frozenset()
    #: symmetric schemes: strictly positive scales (a block whose extreme is positive maps it to the
    #: top code, ``extreme / qmax``, instead of ``extreme / qmin`` < 0); for TensorRT.
    positive_scales: bool = False
    #: mixed precision (int4 schemes): glob patterns of linear modules (checkpoint names, e.g.
    #: ``model.layers.*.mlp.down_proj``, ``lm_head``) quantized to 8 bits, same blocks
    #: (:meth:`linear_bits`; q/k/v are packed into one weight only where they agree)
    int8_weights: tuple[str, ...] = ()
    #: per-tensor block sizes (int4/int8 blocked schemes): ``(pattern, block)`` pairs, the first
    #: matching pattern wins (:meth:`block_for`); patterns as :attr:`int8_weights`, plus
    #: ``model.embed_tokens`` for the embedding (and a tied lm_head, which shares it)
    block_overrides: tuple[tuple[str, int], ...] = ()
    #: the files' format of 4-bit block scales (:class:`ScaleFormat`)
    scale_format: ScaleFormat = ScaleFormat.FLOAT16

    def __post_init__(self) -> None:
        if self.fmt.bits is None:
            raise OptionError(f"--weights {self.fmt.value} is not a quantized format")
        if self.block_size not in BLOCK_SIZES:
            raise OptionError(f"--block-size must be 32, 64 or 128 (or 0: per-channel), got {self.block_size}")
        if self.embedding_bits not in (4, 8):
            raise OptionError(f"embedding bits must be 4 or 8, got {self.embedding_bits}")
        if self.int8_weights and self.bits != 4:
            raise OptionError("--int8 selects tensors of an int4 export for 8 bits: use it with --weights int4")
        if any(not isinstance(p, str) or not p.strip() for p in self.int8_weights):
            raise OptionError("--int8 takes glob patterns of module names, e.g. 'model.layers.*.mlp.down_proj'")
        self._check_overrides()

    def _check_overrides(self) -> None:
        if not self.block_overrides:
            return
        if self.per_channel:
            raise OptionError("--block sets blocks of some tensors: it needs a blocked scheme, not --block-size 0")
        for pattern, block in self.block_overrides:
            if not isinstance(pattern, str) or not pattern.strip():
                raise OptionError("--block takes PATTERN=SIZE, e.g. lm_head=16 or 'model.layers.*.mlp.down_proj=16'")
            if block not in OVERRIDE_BLOCK_SIZES:
                sizes = ", ".join(str(b) for b in OVERRIDE_BLOCK_SIZES)
                raise OptionError(f"--block {pattern}={block}: the block size must be one of {sizes}")

    def block_for(self, module: str) -> int:
        """The block size of ``module`` (a checkpoint module path, ``...qkv_proj`` or
        ``model.embed_tokens``): the first :attr:`block_overrides` pattern it matches (for the
        packed ``qkv_proj``: that any of q/k/v matches), else :attr:`block_size`.

        >>> s = QuantScheme(WeightFormat.INT4, block_overrides=(("lm_head", 16), ("*.v_proj", 64)))
        >>> [s.block_for(m) for m in ("lm_head", "model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.up_proj")]
        [16, 64, 32]
        """
        members = _packed_members(module)
        for pattern, block in self.block_overrides:
            if any(fnmatch.fnmatchcase(name, pattern) for name in members):
                return block
        return self.block_size

    def linear_bits(self, module: str) -> int:
        """The bits of linear ``module`` (a checkpoint module path, or the packed ``...qkv_proj``):
        8 when it matches an :attr:`int8_weights` pattern, else :attr:`bits`. q, k and v each have
        their own; a packed ``qkv_proj`` (made only where the three agree: :meth:`packs_qkv`) is
        8-bit when any of them matches.

        >>> s = QuantScheme(WeightFormat.INT4, int8_weights=("*.v_proj", "lm_head"))
        >>> attention = "model.layers.0.self_attn."
        >>> [s.linear_bits(attention + p) for p in ("q_proj", "v_proj", "qkv_proj")]
        [4, 8, 8]
        >>> [s.linear_bits(m) for m in ("model.layers.0.mlp.down_proj", "lm_head")]
        [4, 8]
        """
        return 8 if any(self.promotes(name) for name in _packed_members(module)) else self.bits

    def packs_qkv(self, attention: str) -> bool:
        """Whether the q/k/v projections of ``attention`` (e.g. ``model.layers.3.self_attn``) have one
        bit width and block size, so they can share one packed weight.

        >>> s = QuantScheme(WeightFormat.INT4, int8_weights=("model.layers.1.self_attn.v_proj",))
        >>> [s.packs_qkv(f"model.layers.{i}.self_attn") for i in (0, 1)]
        [True, False]
        """
        return self._same_quantization(attention, "qkv")

    def packs_kv(self, attention: str) -> bool:
        """Whether the k and v projections of ``attention`` have one bit width and block size (where
        q differs, the two still share one packed ``kv_proj`` weight).

        >>> s = QuantScheme(WeightFormat.INT4, int8_weights=("*.k_proj", "*.v_proj"))
        >>> [s.packs_qkv("model.layers.0.self_attn"), s.packs_kv("model.layers.0.self_attn")]
        [False, True]
        """
        return self._same_quantization(attention, "kv")

    def _same_quantization(self, attention: str, roles: str) -> bool:
        members = [f"{attention}.{p}_proj" for p in roles]
        return len({(self.linear_bits(m), self.block_for(m)) for m in members}) == 1

    def promotes(self, module: str) -> bool:
        """``module`` matches one of :attr:`int8_weights` (no packing considered)."""
        return any(fnmatch.fnmatchcase(module, pattern) for pattern in self.int8_weights)

    @property
    def bits(self) -> int:
        assert self.fmt.bits is not None
        return self.fmt.bits

    @property
    def per_channel(self) -> bool:
        """``block_size == 0``: one scale per output channel (the block spans the quantized axis)."""
        return self.block_size == PER_CHANNEL

    def require_blocks(self, target: str) -> None:
        """OptionError for a per-channel scheme on a target whose kernels need blocks (ONNX Runtime's
        MatMulNBits / GatherBlockQuantized: power-of-two blocks >= 16), e.g. ``--target onnxruntime``."""
        if self.per_channel:
            raise OptionError(
                f"--block-size 0 (per-channel) is not supported for --target {target}: its quantized kernels "
                "need blocks; use --block-size 32, 64 or 128"
            )

    def to_dict(self) -> dict[str, object]:
        """The manifest record; ``positive_scales`` appears only when set (older records unchanged)."""
        record: dict[str, object] = {
            "weights": self.fmt.value,
            "bits": self.bits,
            "block_size": self.block_size,
            "symmetric": self.symmetric,
            "algorithm": self.algorithm.value,
            "keep": sorted(k.value for k in self.keep),
            "embedding_bits": self.embedding_bits,
            "keep_layers": sorted(self.keep_layers),
        }
        if self.positive_scales:
            record["positive_scales"] = True
        if self.int8_weights:
            record["int8_weights"] = list(self.int8_weights)
        if self.block_overrides:
            record["block_overrides"] = [[pattern, block] for pattern, block in self.block_overrides]
        if self.scale_format is not ScaleFormat.FLOAT16:
            record["scale_format"] = self.scale_format.value
        return record

    @property
    def log_scales(self) -> bool:
        """4-bit scales stored in :attr:`ScaleFormat.LOG8` (asymmetric: the scales are non-negative)."""
        return self.scale_format is ScaleFormat.LOG8 and not self.symmetric


_PACKED = re.compile(r"\.(qkv|kv)_proj$")


def _packed_members(module: str) -> list[str]:
    """``module``, and for a packed ``...qkv_proj`` (``...kv_proj``) the q/k/v (k/v) projections it
    packs."""
    match = _PACKED.search(module)
    if match is None:
        return [module]
    base = module[: match.start()]
    return [*(f"{base}.{p}_proj" for p in match.group(1)), module]


def describe_weights(dtype: str, quantization: dict[str, object] | None) -> str:
    """The weight scheme of an artifact in one phrase, from its manifest's ``dtype`` and
    ``extra["quantization"]`` record: ``fp32``, or e.g. ``int4 gptq b32 asym, embedding int4, fp32 activations``.

    >>> describe_weights("fp16", None)
    'fp16'
    >>> describe_weights("fp32", {"weights": "int4", "block_size": 32, "symmetric": True, "algorithm": "rtn",
    ...                           "keep": [], "embedding_bits": 8, "keep_layers": []})
    'int4 rtn b32 sym, embedding int8, fp32 activations'
    """
    if not quantization:
        return dtype
    block = quantization.get("block_size")
    parts = [
        str(quantization.get("weights")),
        str(quantization.get("algorithm", "rtn")),
        "per-channel" if block == PER_CHANNEL else f"b{block}",
        "sym" if quantization.get("symmetric") else "asym",
    ]
    if quantization.get("scale_format") == ScaleFormat.LOG8.value:
        parts.append("log8-scales")
    keep = quantization.get("keep") or []
    kept = keep if isinstance(keep, list) else []
    pieces = [" ".join(parts)]
    if Keep.EMBEDDING.value in kept:
        pieces.append(f"embedding {dtype}")
    else:
        pieces.append(f"embedding int{quantization.get('embedding_bits', 8)}")
    if Keep.LM_HEAD.value in kept:
        pieces.append(f"lm_head {dtype}")
    layers = quantization.get("keep_layers") or []
    if isinstance(layers, list) and layers:
        pieces.append(f"layers {','.join(str(i) for i in layers)} {dtype}")
    promoted = quantization.get("int8_weights") or []
    if isinstance(promoted, list) and promoted:
        pieces.append(f"int8 {' '.join(grouped_layers([str(p) for p in promoted]))}")
    overrides = quantization.get("block_overrides") or []
    if isinstance(overrides, list) and overrides:
        pairs = [(int(o[1]), str(o[0])) for o in overrides if isinstance(o, list) and len(o) == 2]
        runs = [pairs[i:j] for i, j in _runs([b for b, _ in pairs])]  # consecutive overrides of one block
        pieces.append(" ".join(f"b{run[0][0]} {p}" for run in runs for p in grouped_layers([q for _, q in run])))
    pieces.append(f"{dtype} activations")
    return ", ".join(pieces)


def _runs(values: list[int]) -> list[tuple[int, int]]:
    """``(start, stop)`` of each run of equal consecutive ``values``."""
    starts = [i for i in range(len(values)) if i == 0 or values[i] != values[i - 1]]
    return list(zip(starts, [*starts[1:], len(values)], strict=True))


def grouped_layers(names: list[str]) -> list[str]:
    """``names`` with the per-layer names of one module merged (layers in ascending order), in
    first-seen order.

    >>> grouped_layers(["model.layers.*.self_attn.*", "model.layers.27.mlp.down_proj", "model.layers.0.mlp.down_proj"])
    ['model.layers.*.self_attn.*', 'model.layers.{0,27}.mlp.down_proj']
    """
    groups: dict[tuple[bool, str], list[int]] = {}
    for name in names:
        match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        key = (True, match.group(2)) if match else (False, name)
        groups.setdefault(key, []).append(int(match.group(1)) if match else -1)
    out = []
    for (per_layer, key), layers in groups.items():
        if not per_layer:
            out.append(key)
        else:
            indices = ",".join(str(i) for i in sorted(layers))
            out.append(f"model.layers.{indices if len(layers) == 1 else '{' + indices + '}'}.{key}")
    return out
