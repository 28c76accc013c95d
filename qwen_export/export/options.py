"""Export option policy: :class:`ExportOptions` and :func:`export_options`, the one place where plain
option values (``qwen-export export``'s flags, a library caller's keywords) become ExportOptions.

The CLI and library callers go through the same function, so they export the same artifact:

    >>> from qwen_export.export.options import export_options
    >>> options = export_options(None, target="onnxruntime", weights="int4", block_size=64)
    >>> options.quant.bits, options.quant.block_size, options.dtype.value
    (4, 64, 'fp32')

What depends on the target (options only one target takes, options a target refuses, how the
weight scheme adapts) is asked of the target's backend in :mod:`qwen_export.targets`; nothing here
names a target.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwen_export import targets
from qwen_export.errors import OptionError, QwenExportError
from qwen_export.quant.budget import SizeBudget, fill_budget, scheme_bytes, shrink_to_budget
from qwen_export.quant.scheme import (
    Keep,
    PrefillWeights,
    QuantAlgorithm,
    QuantScheme,
    ScaleFormat,
    WeightFormat,
    grouped_layers,
)
from qwen_export.spec import (
    DType,
    KVCacheDType,
    LogitsMode,
    ModelSpec,
    RopeOverride,
    RopeScalingChoice,
    RopeType,
    Target,
    parse_choice,
)
from qwen_export.vision import VisionWeights

if TYPE_CHECKING:
    from qwen_export.targets.protocol import TargetBackend


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    target: Target = Target.ONNXRUNTIME
    dtype: DType = DType.FP32
    logits: LogitsMode = LogitsMode.LAST
    max_length: int | None = None  # default: the model's context (ModelSpec.trained_context, after ``rope``)
    rope: RopeOverride | None = None  # --rope-scaling/--rope-factor/--rope-original-max; None: the checkpoint's
    overwrite: bool = False
    fuse: bool = True  # run the target's fusion passes (False: cleanup only, concat KV cache)
    strict: bool = True  # a fusion firing fewer times than the architecture needs is an error
    explain: bool = False  # report each fusion's nearest misses through ExportHooks.message
    dump_dir: Path | None = None  # write the model after each phase there (NN-phase/model.onnx)
    quant: QuantScheme | None = None  # quantize the weights (int8/int4); None: weights in ``dtype``
    accuracy_level: int = 4  # MatMulNBits' activation accuracy (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8)
    calibration: Path | None = None  # AWQ/GPTQ calibration text (UTF-8); None: the built-in text
    max_batch: int = 1  # TensorRT: the batch its optimization profiles are built for (build-engine may change it)
    kv_cache: KVCacheDType | None = None  # ONNX Runtime: the KV cache's element type; None: the activations'
    vision_weights: VisionWeights = VisionWeights.FP32  # a VL checkpoint's vision tower
    prefill: PrefillWeights = PrefillWeights.NONE  # ONNX Runtime: a second, int8 graph for prompts

    def __post_init__(self) -> None:
        if self.accuracy_level not in range(5):
            raise OptionError(f"--accuracy-level must be 0, 1, 2, 3 or 4, got {self.accuracy_level}")
        calibrated = self.quant is not None and self.quant.algorithm.calibrated
        if self.calibration is not None and not calibrated and self.kv_cache is not KVCacheDType.INT8:
            raise OptionError("--calibration only applies to --algorithm awq or gptq, or --kv-cache int8")
        if self.quant is not None and self.quant.algorithm.gptq and self.quant.per_channel:
            raise OptionError("--algorithm gptq quantizes in blocks: use --block-size 32, 64 or 128 (not 0)")
        if self.max_batch < 1:
            raise OptionError(f"--max-batch must be at least 1, got {self.max_batch}")
        self.backend.check_options(self)

    @property
    def backend(self) -> TargetBackend:
        return targets.get(self.target)

    @property
    def graph_dtype(self) -> DType:
        """The traced graph's dtype (the target decides: OpenVINO traces fp32 and stores fp16 weights)."""
        return self.backend.graph_dtype(self.dtype)

    def model_spec(self, spec: ModelSpec) -> ModelSpec:
        """The checkpoint's spec with ``rope`` applied (the spec the artifact is built for)."""
        return self.rope.apply(spec) if self.rope is not None else spec

    def resolved_max_length(self, spec: ModelSpec) -> int:
        """The artifact's context for ``spec`` (with ``rope`` applied): ``max_length``, by default the
        model's own context; beyond it without RoPE scaling is an OptionError naming the flag."""
        spec = self.model_spec(spec)
        context = spec.trained_context
        if self.max_length is None:
            return context
        if self.max_length <= 0:
            raise OptionError(f"--max-length must be positive, got {self.max_length}")
        if self.max_length > context:
            raise OptionError(context_error(spec, self.max_length))
        return self.max_length


def context_error(spec: ModelSpec, wanted: int) -> str:
    """Why ``wanted`` positions are beyond ``spec``'s context, naming the flag that extends it."""
    s = spec.rope_scaling
    if s is not None and s.rope_type is RopeType.YARN and s.original_max_position_embeddings:
        original = s.original_max_position_embeddings
        factor = math.ceil(wanted / original)
        return (
            f"--max-length {wanted} exceeds the YaRN context of {spec.trained_context} tokens "
            f"(original {original} x factor {s.factor:g}); raise --rope-factor to {factor} or lower --max-length"
        )
    trained = spec.max_position_embeddings
    return (
        f"--max-length {wanted} exceeds the {trained} positions the model was trained for "
        f"(max_position_embeddings); extend it with --rope-scaling yarn --rope-factor {math.ceil(wanted / trained)} "
        "or lower --max-length"
    )


def rope_override(scaling: str | None, factor: float | None, original_max: int | None) -> RopeOverride | None:
    """The RopeOverride of ``--rope-scaling/--rope-factor/--rope-original-max`` (None: none given)."""
    if scaling is None:
        if factor is not None or original_max is not None:
            raise OptionError("--rope-factor and --rope-original-max need --rope-scaling yarn")
        return None
    return RopeOverride(parse_choice(RopeScalingChoice, scaling, "--rope-scaling"), factor, original_max)


def export_options(
    checkpoint: str | Path | None = None,
    *,
    target: str | Target = "onnxruntime",
    weights: str | None = None,
    dtype: str | DType | None = None,
    block_size: int | None = None,
    symmetric: bool | None = None,
    algorithm: str | None = None,
    keep: str | Iterable[str] | None = None,
    keep_layers: str | Iterable[int] | None = None,
    accuracy_level: int | None = None,
    embedding_bits: int | None = None,
    int8: str | Iterable[str] | None = None,
    block: str | Iterable[str] | None = None,
    budget: str | float | None = None,
    scales: str | ScaleFormat | None = None,
    calibration: str | Path | None = None,
    logits: str | LogitsMode = "last",
    max_length: int | None = None,
    rope_scaling: str | None = None,
    rope_factor: float | None = None,
    rope_original_max: int | None = None,
    max_batch: int | None = None,
    kv_cache: str | KVCacheDType | None = None,
    vision_weights: str | VisionWeights | None = None,
    prefill: str | PrefillWeights | None = None,
    fuse: bool = True,
    strict: bool = True,
    explain: bool = False,
    dump_dir: str | Path | None = None,
    overwrite: bool = False,
    message: Callable[[str], None] | None = None,
) -> ExportOptions:
    """ExportOptions from ``qwen-export export``'s flag values (None: not given); OptionError with the CLI's message.
    ``checkpoint``: its directory (a pre-quantized one keeps its quantization: :func:`prequantized_default`);
    ``keep`` / ``keep_layers``: comma-separated or lists; ``message`` hears how the target adapted the options."""
    dump, engine_target = _dump_dir(dump_dir, explain, fuse), Target.parse(target, "target")
    backend, message = targets.get(engine_target), message or (lambda text: None)
    defaults = Int4Defaults.for_export(checkpoint, backend) if _is_int4(weights) else None
    act_dtype, quant = weight_options(
        weights,
        dtype,
        block_size,
        defaults.symmetric if symmetric is None and defaults is not None else symmetric,
        defaults.algorithm.value if algorithm is None and defaults is not None else algorithm,
        keep,
        keep_layers,
        accuracy_level,
        _default_embedding_bits(defaults, keep) if embedding_bits is None else embedding_bits,
        defaults.int8_weights if int8 is None and defaults is not None else int8,
        _default_blocks(defaults) if block is None and defaults is not None else block,
    )
    if checkpoint is not None and (Path(checkpoint) / "config.json").is_file():
        quant = prequantized_default(Path(checkpoint), weights, quant, block_size, symmetric)
    layout = (int8, block, keep, keep_layers, embedding_bits, block_size)
    quant = spend_budget(scale_format(quant, scales, defaults, backend), budget, defaults, backend, message, layout)
    given = dict(symmetric=symmetric, embedding_bits=embedding_bits, accuracy_level=accuracy_level, prefill=prefill)
    given |= dict(max_batch=max_batch, kv_cache=kv_cache)
    _refuse_other_targets_options(backend, given)
    quant = backend.adapt_weights(quant, given, message)
    return ExportOptions(
        target=engine_target,
        max_batch=1 if max_batch is None else max_batch,
        dtype=act_dtype,
        logits=LogitsMode.parse(logits, "logits mode"),
        max_length=max_length,
        rope=rope_override(rope_scaling, rope_factor, rope_original_max),
        overwrite=overwrite,
        fuse=fuse,
        strict=strict,
        explain=explain,
        dump_dir=dump,
        quant=quant,
        accuracy_level=4 if accuracy_level is None else accuracy_level,
        calibration=Path(calibration) if calibration is not None else None,
        kv_cache=None if kv_cache is None else KVCacheDType.parse(kv_cache, "--kv-cache"),
        vision_weights=VisionWeights.FP32 if vision_weights is None else VisionWeights.parse(vision_weights),
        prefill=PrefillWeights.parse(prefill or "none"),
    )


def scale_format(
    quant: QuantScheme | None, scales: str | ScaleFormat | None, defaults: Int4Defaults | None, backend: TargetBackend
) -> QuantScheme | None:
    """``quant`` with ``--scales`` (given, or the int4 default's: ``log8`` where the target stores it,
    for an asymmetric dense model); OptionError where a given ``log8`` cannot apply."""
    moe = defaults is not None and defaults.spec is not None and defaults.spec.moe is not None
    if scales is None:
        usable = quant is not None and quant.bits == 4 and not quant.symmetric and defaults is not None and not moe
        wanted = ScaleFormat.LOG8 if usable and backend.log_scales else ScaleFormat.FLOAT16
    else:
        wanted = ScaleFormat.parse(scales)
    if scales is not None and wanted is ScaleFormat.LOG8:
        if not backend.log_scales:
            raise OptionError("--scales log8 is an ONNX Runtime format: this target stores float16 scales")
        if quant is None or quant.bits != 4 or defaults is None or moe:
            raise OptionError(
                "--scales log8 stores the scales of an int4 export of a dense, not pre-quantized checkpoint: "
                "use it with --weights int4"
            )
        if quant.symmetric:
            raise OptionError("--scales log8 needs non-negative scales: drop --symmetric (asymmetric weights)")
    return quant if quant is None else dataclasses.replace(quant, scale_format=wanted)


def spend_budget(
    quant: QuantScheme | None,
    budget: str | float | None,
    defaults: Int4Defaults | None,
    backend: TargetBackend,
    message: Callable[[str], None],
    layout: tuple[Any, ...],
) -> QuantScheme | None:
    """``quant`` fitted to ``--budget`` (given, or the int4 default's, :attr:`Int4Defaults.budget`,
    where none of the ``layout`` options, ``--int8 --block --keep --keep-layers --embedding-bits
    --block-size``, is given): 8-bit down_proj where it is under, bytes given back where it is over
    (:mod:`qwen_export.quant.budget`); OptionError where a given ``--budget`` cannot apply."""
    if budget is None and any(v is not None for v in layout):
        return quant
    wanted = SizeBudget.parse(budget) if budget is not None else defaults.budget if defaults else None
    if budget is not None and wanted is not None:
        if quant is None or quant.bits != 4 or defaults is None:
            raise OptionError(
                "--budget spends the spare bytes of an int4 export of a dense, not pre-quantized checkpoint: "
                "use it with --weights int4"
            )
        if not backend.mixed_bits:
            raise OptionError("--budget promotes tensors to 8 bits: this target's int4 has one bit width")
        if defaults.spec is None or defaults.spec.moe is not None:
            raise OptionError("--budget needs a dense model's config.json (mixture-of-experts: not yet)")
    if quant is None or wanted is None or defaults is None or defaults.spec is None:
        return quant
    spec = defaults.spec
    limit = wanted.bytes_for(spec)
    if scheme_bytes(spec, quant) > limit:
        fitted, changes = shrink_to_budget(spec, quant, limit)
        done = "; ".join(f"{what} in {n} layers" for what, n in changes.items()) or "nothing to shrink"
    else:
        fitted, promoted = fill_budget(spec, quant, limit)
        done = "8 bits for " + (" ".join(grouped_layers(promoted)) or "nothing")
    size = scheme_bytes(spec, fitted)
    over = f", {(size - limit) / 2**20:.1f} MiB over it: --budget sets another" if size > limit else ""
    message(
        f"--budget {wanted.describe()} ({limit / 2**20:.1f} MiB): {done}; weights about {size / 2**20:.1f} MiB{over}"
    )
    return fitted


def _dump_dir(dump_dir: str | Path | None, explain: bool, fuse: bool) -> Path | None:
    """``--dump-dir`` as a Path; OptionError for it or ``--explain`` with ``--no-fuse``."""
    if explain and not fuse:
        raise OptionError("--explain reports on the fusion passes; it cannot be combined with --no-fuse")
    dump = Path(dump_dir) if dump_dir is not None else None
    if dump is not None and dump.exists() and not dump.is_dir():
        raise OptionError(f"--dump-dir {str(dump_dir)!r} exists and is not a directory")
    return dump


@dataclasses.dataclass(frozen=True)
class Int4Defaults:
    """What ``--weights int4`` means when ``--algorithm``, ``--symmetric/--asymmetric`` and
    ``--embedding-bits`` are not given: the most accurate combination measured on a real Qwen2.5
    checkpoint within the size of optimum-intel's int4 artifact (benchmarks/README.md, quant_real.py).

    - ``algorithm``: RTN for mixture-of-experts models (GPTQ is not built for them); otherwise
      GPTQ (on the real Qwen2.5-Coder-1.5B, asymmetric, all-4-bit: mean KL 0.0326 against RTN's
      0.0368 and onnxruntime-genai int4's 0.0483; with the 8-bit attention below 0.0264 against
      RTN's 0.0286; ``awq-gptq`` on that layout: 0.0292, with a better top-1, 91.3%);
    - asymmetric (a zero point per block) where the target takes zero points (not TensorRT);
    - the embedding at 4 bits when the lm_head is separate (untied): it is only gathered, and its
      8 bits would put the artifact over that size;
    - a tied model (the embedding is also the lm_head), where the target mixes bit widths: every
      weight at 4 bits, block 32, the shared table too, except ``v_proj`` at 8 bits
      (:data:`TIED_INT8`; llama.cpp's Q4_K_M also keeps ``attn_v`` wider). Measured on the real
      Qwen2.5-Coder-1.5B made tied (its GGUF's two copies of the one matrix: the Q6_K one kept),
      mean KL against transformers' fp32 logits pooled over three texts (3,458 tokens): **0.0394**
      (top-1 92.6%; GPTQ quantizes the table as the lm_head: ``GPTQSettings.tied_table``; at RTN
      0.0418) in 864 MiB of weights, against onnxruntime-genai int4's 0.0692 (937 MiB) and
      optimum-intel int4's 0.0789 (873 MiB); all at 4 bits: 0.0459 in 859 MiB; k and v at 8 bits:
      0.0399 in 869 MiB, but about 4% slower decode (two 8-bit kernels a layer). The previous tied
      default (8-bit table and attention) reached 0.0275 but in 1063 MiB, over optimum-intel's
      size, and decoded 13-20% slower; it is still ``--embedding-bits 8 --int8
      'model.layers.*.self_attn.*'``. Within the size, the 4-bit MLP in blocks of 32 matters most:
      blocks of 64 with 8-bit attention gave 0.0476, blocks of 128 with an 8-bit table 0.0638
      (benchmarks/README.md, 2026-12-05);
    - the attention projections (q/k/v and o) at 8 bits where the target mixes bit widths (not
      TensorRT) and the model is untied: of the tensor classes measured one at a time (RTN asymmetric on the real 1.5B,
      benchmarks/README.md), they cut the mean KL most per byte added (0.0379 -> 0.0286 for +76 MiB;
      every down_proj: 0.0304 for +189 MiB; the lm_head: 0.0285 for +115 MiB), and with ONNX Runtime's
      compact scales the artifact stays within optimum-intel's size;
    - with an untied lm_head (dense models, ONNX Runtime: ``small_blocks_fast``): the lm_head at 4
      bits, quantized by GPTQ on the final norm's outputs, every 4-bit linear in blocks of 32, the
      8-bit attention and the (4-bit, only gathered) embedding in blocks of 128 (:data:`UNTIED_BLOCKS`,
      ``--block``; :data:`UNTIED_INT8` is empty). On the real Qwen2.5-Coder-1.5B, pooled mean KL over
      the three evaluation texts **0.0356** (top-1 92.7%) in 1034 MiB (optimum-intel's int4: 1098),
      against 0.0419 in 1090 MiB for the layout it replaced (2026-12-05: the lm_head at 8 bits, block
      128, and the MLP in blocks of 64), decoding at 0.98-1.02x its speed (three in-process runs) with
      prompts 9-11% slower on the decode graph (the MLP's smaller blocks; ``--prefill int8`` has its own).
      Also 8-bit down_proj in the first and last four layers: 0.0316 in 1088 MiB, 5% slower decode
      (benchmarks/README.md, "the untied lm_head at 4 bits").
    - where the target mixes bit widths and the model is dense, a size budget (``--budget``): what
      optimum-intel's default int4 export of the checkpoint takes; what the layout above leaves of it
      goes to 8 bits: ``k_proj`` where ``v_proj`` is 8-bit, then ``down_proj`` layer by layer in
      llama.cpp's Q4_K_M order (:func:`~qwen_export.quant.budget.fill_budget`). On the real
      Qwen2.5-Coder-1.5B, with ONNX Runtime's one-byte scales (``--scales log8``,
      :func:`scale_format`): untied, 14 layers, pooled KL 0.0356 -> 0.0293 in 1080 MiB; tied,
      k_proj and 7 layers, 0.0394 -> 0.0331 in 870 MiB (float16 scales: 10 layers, 0.0310 in 1092
      MiB; k_proj alone, 0.0371 in 869 MiB).
      A layout over the budget (3B and up) gives bytes back instead
      (:func:`~qwen_export.quant.budget.shrink_to_budget`).
    """

    algorithm: QuantAlgorithm = QuantAlgorithm.GPTQ
    symmetric: bool = False
    embedding_bits: int = 8
    int8_weights: tuple[str, ...] = ()
    block_overrides: tuple[tuple[str, int], ...] = ()
    #: the layout's size budget (``--budget``'s default): optimum-intel's int4 size where the target
    #: mixes bit widths and the model is dense (:func:`~qwen_export.quant.budget.fill_budget`)
    budget: SizeBudget | None = None
    spec: ModelSpec | None = None

    @classmethod
    def for_export(cls, checkpoint: str | Path | None, backend: TargetBackend) -> Int4Defaults | None:
        """The defaults for ``checkpoint`` on ``backend``; None for a pre-quantized checkpoint (it
        keeps its own quantization: :func:`prequantized_default`)."""
        from qwen_export.quant.prequant import read_config

        tied, moe, spec = True, False, None
        config = Path(checkpoint) / "config.json" if checkpoint is not None else None
        if config is not None and config.is_file():
            try:
                if read_config(config) is not None:
                    return None
                spec = ModelSpec.from_config_file(config)
                tied, moe = spec.tie_word_embeddings, spec.moe is not None
            except QwenExportError:
                pass  # a defective config.json: the export reports it with its own message
        # MoE: GPTQ's layer runner does not route calibration tokens through the experts: RTN
        algorithm = QuantAlgorithm.RTN if moe else cls.algorithm
        untied_layout = backend.small_blocks_fast and spec is not None and not tied and not moe
        tied_layout = backend.mixed_bits and tied  # 4-bit but v_proj: within optimum-intel's size (see above)
        promoted = ATTENTION_INT8 + (UNTIED_INT8 if untied_layout else ()) if backend.mixed_bits else ()
        return cls(
            algorithm=algorithm,
            symmetric=not backend.zero_points,
            embedding_bits=8 if tied and not tied_layout else 4,
            int8_weights=TIED_INT8 if tied_layout else promoted,
            block_overrides=untied_blocks(spec) if untied_layout and spec is not None else (),
            budget=SizeBudget() if backend.mixed_bits and spec is not None and not moe else None,
            spec=spec,
        )


def untied_blocks(spec: ModelSpec) -> tuple[tuple[str, int], ...]:
    """:data:`UNTIED_BLOCKS`, less any whose block does not divide that tensor's length along its
    blocks (K for a linear, the hidden size for the embedding): such a tensor keeps ``--block-size``."""
    attention = math.gcd(spec.hidden_size, spec.num_attention_heads * spec.head_dim)  # q/k/v: hidden; o: heads
    lengths = {"model.embed_tokens": spec.hidden_size, ATTENTION_INT8[0]: attention}
    return tuple((pattern, block) for pattern, block in UNTIED_BLOCKS if lengths[pattern] % block == 0)


def _default_blocks(defaults: Int4Defaults) -> list[str]:
    return [f"{pattern}={block}" for pattern, block in defaults.block_overrides] or ["none"]


#: ``--int8``'s default for int4 (:class:`Int4Defaults`): every attention projection
ATTENTION_INT8 = ("model.layers.*.self_attn.*",)
#: ``--int8``'s default for int4 with a tied table where the target mixes bit widths (:class:`Int4Defaults`):
#: v_proj (q/k/v then stay three MatMuls on ONNX Runtime: one packed weight has one bit width)
TIED_INT8 = ("model.layers.*.self_attn.v_proj",)
#: ``--int8``'s addition for int4 with a separate (untied) lm_head on ONNX Runtime (:class:`Int4Defaults`):
#: none since 2026-12-05 (the lm_head at 4 bits, quantized by GPTQ, and the MLP in blocks of 32 are more
#: accurate in fewer bytes than an 8-bit lm_head with the MLP in blocks of 64)
UNTIED_INT8: tuple[str, ...] = ()
#: ``--block``'s default for int4 with a separate (untied) lm_head on ONNX Runtime (:class:`Int4Defaults`):
#: the 8-bit attention and the (4-bit, only gathered) embedding in blocks of 128; the rest at ``--block-size``
UNTIED_BLOCKS: tuple[tuple[str, int], ...] = (
    (ATTENTION_INT8[0], 128),
    ("model.embed_tokens", 128),
)


def _default_embedding_bits(defaults: Int4Defaults | None, keep: str | Iterable[str] | None) -> int | None:
    return defaults.embedding_bits if defaults and not _keeps_embedding(keep) else None


def _keeps_embedding(keep: str | Iterable[str] | None) -> bool:
    return any(str(k).strip().lower() == Keep.EMBEDDING.value for k in _items(keep))


def _is_int4(weights: str | None) -> bool:
    try:
        return weights is not None and parse_choice(WeightFormat, weights, "--weights") is WeightFormat.INT4
    except OptionError:
        return False  # weight_options reports it


def _refuse_other_targets_options(backend: TargetBackend, given: Mapping[str, Any]) -> None:
    """OptionError for an option given that only other targets take (``own_options``)."""
    for name, value in given.items():
        if value is None or name in backend.own_options:
            continue
        owners = [b.target.value for b in targets.registered() if name in b.own_options]
        if owners:
            flag = "--" + name.replace("_", "-")
            raise OptionError(f"{flag} applies to --target {' or '.join(owners)} only")


def prequantized_default(
    checkpoint: Path, weights: str | None, quant: QuantScheme | None, block_size: int | None, symmetric: bool | None
) -> QuantScheme | None:
    """A pre-quantized (AWQ/GPTQ) checkpoint keeps its own quantization: with no --weights, its
    bits and group size; with --weights of its bits, its group size and symmetry unless given."""
    from qwen_export.quant.prequant import default_scheme

    try:
        ModelSpec.from_config_file(checkpoint / "config.json")
    except QwenExportError:
        return quant  # a defective config.json: the export reports it with its own message
    own = default_scheme(checkpoint)
    if own is None:
        return quant
    if weights is None:
        return own
    if quant is not None and quant.fmt is own.fmt:
        return dataclasses.replace(
            quant,
            block_size=own.block_size if block_size is None else quant.block_size,
            symmetric=own.symmetric if symmetric is None else quant.symmetric,
        )
    return quant


def weight_options(
    weights: str | None,
    dtype: str | DType | None,
    block_size: int | None,
    symmetric: bool | None,
    algorithm: str | None,
    keep: str | Iterable[str] | None,
    keep_layers: str | Iterable[int] | None,
    accuracy_level: int | None,
    embedding_bits: int | None = None,
    int8: str | Iterable[str] | None = None,
    block: str | Iterable[str] | None = None,
) -> tuple[DType, QuantScheme | None]:
    """``(activation dtype, QuantScheme or None)`` from the export's precision options."""
    fmt = parse_choice(WeightFormat, weights, "--weights") if weights is not None else None
    act = DType.parse(dtype, "dtype") if dtype is not None else None
    if fmt is not None and fmt.bits is None:  # --weights fp32/fp16 is --dtype
        same = DType.parse(fmt.value, "dtype")
        if act is not None and act is not same:
            raise OptionError(f"--weights {fmt.value} contradicts --dtype {act.value}")
        act, fmt = same, None
    act = act or DType.FP32
    given = {
        "--block-size": block_size,
        "--symmetric/--asymmetric": symmetric,
        "--algorithm": algorithm,
        "--keep": keep,
        "--keep-layers": keep_layers,
        "--accuracy-level": accuracy_level,
        "--embedding-bits": embedding_bits,
        "--int8": int8,
        "--block": block,
    }
    if fmt is None:
        extra = [name for name, value in given.items() if value is not None]
        if extra:
            raise OptionError(f"{', '.join(extra)} only apply to quantized weights (--weights int8 or int4)")
        return act, None
    scheme = QuantScheme(
        fmt=fmt,
        block_size=32 if block_size is None else block_size,
        symmetric=True if symmetric is None else symmetric,
        algorithm=parse_choice(QuantAlgorithm, algorithm, "--algorithm") if algorithm else QuantAlgorithm.RTN,
        keep=frozenset(parse_choice(Keep, k, "--keep") for k in _items(keep)),
        keep_layers=frozenset(_index_list(keep_layers, "--keep-layers")) if keep_layers else frozenset(),
        embedding_bits=8 if embedding_bits is None else embedding_bits,
        int8_weights=tuple(_patterns(int8)),
        block_overrides=tuple(_block_overrides(block)),
    )
    if embedding_bits is not None and Keep.EMBEDDING in scheme.keep:
        raise OptionError("--embedding-bits contradicts --keep embedding (the embedding would stay unquantized)")
    return act, scheme  # --accuracy-level's range: ExportOptions checks it


def _patterns(values: str | Iterable[str] | None) -> list[str]:
    """``--int8``'s patterns: each value comma-separated, the option repeatable; ``none`` alone: no
    8-bit tensors (the int4 default's promotions off)."""
    items = _items(",".join([values] if isinstance(values, str) else list(values or [])))
    if [i.lower() for i in items] == ["none"]:
        return []
    if any(i.lower() == "none" for i in items):
        raise OptionError("--int8 none turns the 8-bit tensors off: give it alone, without patterns")
    return items


def _block_overrides(values: str | Iterable[str] | None) -> list[tuple[str, int]]:
    """``--block``'s ``PATTERN=SIZE`` items (comma-separated, the option repeatable); ``none`` alone:
    every tensor at ``--block-size`` (the int4 default's overrides off)."""
    items = _items(",".join([values] if isinstance(values, str) else list(values or [])))
    if [i.lower() for i in items] == ["none"]:
        return []
    pairs = []
    for item in items:
        pattern, sep, size = item.rpartition("=")
        if not sep or not pattern.strip() or not size.strip().isdigit():
            raise OptionError(f"--block takes PATTERN=SIZE (e.g. lm_head=16), or none alone; got {item!r}")
        pairs.append((pattern.strip(), int(size)))
    return pairs


def _items(values: str | Iterable[Any] | None) -> list[str]:
    """The non-empty items of a comma-separated string or a list, stripped."""
    if values is None:
        return []
    parts = values.split(",") if isinstance(values, str) else [str(v) for v in values]
    return [p.strip() for p in parts if p.strip()]


def _index_list(values: str | Iterable[int], what: str) -> list[int]:
    text = values if isinstance(values, str) else ",".join(str(v) for v in values)
    try:
        indices = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise OptionError(f"{what} must be a comma-separated list of layer indices, got {text!r}") from None
    if any(v < 0 for v in indices):
        raise OptionError(f"{what} must list non-negative layer indices, got {text!r}")
    return indices
