"""ModelSpec (parsed from a Hugging Face ``config.json``) and the option enums of the toolchain.

Supported: the Qwen2 architecture (Qwen1.5, Qwen2, Qwen2.5 and Coder/Math/Instruct variants:
q/k/v bias, GQA, tied or untied embeddings, rope_theta, YaRN, sliding-window fields) and Qwen3
dense (per-head q_norm/k_norm, explicit head_dim, optional attention bias), and their
mixture-of-experts variants Qwen2-MoE and Qwen3-MoE (:mod:`qwen_export.moe`). Anything else is a
:class:`ConfigError` that names what is supported.

This module is pure Python (no torch, no numpy): the runtime library imports it.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qwen_export.errors import ConfigError, OptionError
from qwen_export.moe import MoESpec, parse_moe


def parse_choice(enum_cls: type[enum.Enum], value: Any, what: str | None = None) -> Any:
    """The member of ``enum_cls`` whose value is ``value`` (case-insensitive, spaces stripped);
    otherwise an OptionError that lists the valid values. The one parser of every option enum."""
    if isinstance(value, enum_cls):
        return value
    for member in enum_cls:
        if member.value == str(value).strip().lower():
            return member
    valid = ", ".join(str(m.value) for m in enum_cls)
    raise OptionError(f"unknown {what or enum_cls.__name__} {value!r}; valid values: {valid}")


class _ChoiceEnum(str, enum.Enum):
    """A string enum whose parse error lists the valid values."""

    @classmethod
    def parse(cls, value: str | _ChoiceEnum, what: str | None = None) -> Any:
        return parse_choice(cls, value, what)

    def __str__(self) -> str:
        return str(self.value)


class Architecture(_ChoiceEnum):
    QWEN2 = "qwen2"
    QWEN3 = "qwen3"
    QWEN2_MOE = "qwen2_moe"
    QWEN3_MOE = "qwen3_moe"

    @property
    def is_moe(self) -> bool:
        return self in (Architecture.QWEN2_MOE, Architecture.QWEN3_MOE)


class Target(_ChoiceEnum):
    ONNXRUNTIME = "onnxruntime"
    OPENVINO = "openvino"
    TENSORRT = "tensorrt"


class KVLayout(enum.Enum):
    """How an artifact's KV cache is passed between steps (``manifest.extra.kv_cache.layout``)."""

    CONCAT = "concat"  # present = concat(past, new): the engine rebinds the presents as the next pasts
    SHARED = "shared"  # one preallocated buffer per layer bound as both past and present (GQA)
    STATEFUL = "stateful"  # OpenVINO variables (ReadValue/Assign) inside the infer request
    FIXED = "fixed"  # fixed-capacity buffers written at cache_position by ScatterElements (TensorRT)


class CacheIO(_ChoiceEnum):
    """How the traced graph passes the KV cache.

    ``concat``: ``present = concat(past, new)`` (ONNX Runtime, OpenVINO; lowered further by their
    passes). ``scatter``: fixed-capacity buffers [B, KV, capacity, D]; the new keys and values are
    written at ``cache_position`` (ScatterElements) and attention reads the first
    ``attention_mask.shape[1]`` columns (TensorRT: standard ops, the engine binds past and present
    to the same memory).
    """

    CONCAT = "concat"
    SCATTER = "scatter"


class DType(_ChoiceEnum):
    FP32 = "fp32"
    FP16 = "fp16"


class KVCacheDType(_ChoiceEnum):
    """Element type of the KV cache an ONNX Runtime artifact is exported with (``export --kv-cache``,
    ``manifest.extra.kv_cache.dtype``). ``int8``: GroupQueryAttention's quantized cache, symmetric
    int8 with static per-channel scales calibrated at export."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"

    @property
    def itemsize(self) -> int:
        return {"fp32": 4, "fp16": 2, "int8": 1}[self.value]


class LogitsMode(_ChoiceEnum):
    """Which positions the exported graph returns logits for."""

    LAST = "last"
    ALL = "all"


class LayerType(_ChoiceEnum):
    FULL = "full_attention"
    SLIDING = "sliding_attention"


class RopeType(_ChoiceEnum):
    DEFAULT = "default"
    LINEAR = "linear"
    DYNAMIC = "dynamic"
    YARN = "yarn"


#: config.json ``architectures`` values we accept, per architecture.
SUPPORTED_ARCHITECTURES: dict[str, Architecture] = {
    "Qwen2ForCausalLM": Architecture.QWEN2,
    "Qwen3ForCausalLM": Architecture.QWEN3,
    "Qwen2MoeForCausalLM": Architecture.QWEN2_MOE,
    "Qwen3MoeForCausalLM": Architecture.QWEN3_MOE,
}
_MODEL_TYPES = {a.value: a for a in Architecture}
_VISION_LANGUAGE = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")  # see vision.py
_SUPPORTED_TEXT = (
    "Qwen2ForCausalLM (Qwen1.5/Qwen2/Qwen2.5 and variants), Qwen3ForCausalLM (Qwen3 dense), "
    "Qwen2MoeForCausalLM (Qwen1.5-MoE, Qwen2-MoE), Qwen3MoeForCausalLM (Qwen3-MoE)"
)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE scaling parameters, with transformers' defaults already applied."""

    rope_type: RopeType
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


class RopeScalingChoice(_ChoiceEnum):
    """``--rope-scaling``: ``yarn`` sets YaRN at export (the checkpoint is not edited); ``none``
    drops the checkpoint's own scaling."""

    NONE = "none"
    YARN = "yarn"


@dataclasses.dataclass(frozen=True)
class RopeOverride:
    """RoPE scaling chosen at export (``--rope-scaling``, ``--rope-factor``, ``--rope-original-max``),
    replacing the checkpoint's. With YaRN, ``factor`` defaults to the checkpoint's own YaRN factor
    and ``original_max`` to its ``original_max_position_embeddings`` (else ``max_position_embeddings``);
    beta/mscale/attention-factor settings of a checkpoint's own YaRN are kept, transformers' defaults
    otherwise."""

    scaling: RopeScalingChoice = RopeScalingChoice.YARN
    factor: float | None = None
    original_max: int | None = None

    def __post_init__(self) -> None:
        if self.scaling is RopeScalingChoice.NONE and (self.factor is not None or self.original_max is not None):
            raise OptionError("--rope-factor and --rope-original-max apply with --rope-scaling yarn, not none")
        if self.factor is not None and (_finite(self.factor) is None or not 1.0 <= self.factor <= 1024.0):
            raise OptionError(f"--rope-factor must be a number in 1 .. 1024, got {self.factor!r}")
        bad = isinstance(self.original_max, bool) or not isinstance(self.original_max, (int, type(None)))
        if bad or (self.original_max is not None and not 0 < self.original_max <= 10_000_000):
            raise OptionError(f"--rope-original-max must be an integer in 1 .. 10,000,000, got {self.original_max!r}")

    def apply(self, spec: ModelSpec) -> ModelSpec:
        """``spec`` with this scaling; OptionError when YaRN has no factor to use."""
        if self.scaling is RopeScalingChoice.NONE:
            return dataclasses.replace(spec, rope_scaling=None)
        own = spec.rope_scaling if spec.rope_scaling and spec.rope_scaling.rope_type is RopeType.YARN else None
        factor = self.factor if self.factor is not None else (own.factor if own else None)
        if factor is None:
            raise OptionError("--rope-scaling yarn needs --rope-factor F (the context becomes F x the original length)")
        original = self.original_max or (own.original_max_position_embeddings if own else None)
        scaling = own or RopeScaling(RopeType.YARN)
        scaling = dataclasses.replace(
            scaling, factor=float(factor), original_max_position_embeddings=original or spec.max_position_embeddings
        )
        return dataclasses.replace(spec, rope_scaling=scaling)

    def describe(self) -> str:
        if self.scaling is RopeScalingChoice.NONE:
            return "none"
        parts = ["yarn"] + ([f"factor {self.factor:g}"] if self.factor is not None else [])
        return " ".join(parts + ([f"original {self.original_max}"] if self.original_max else []))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything the exporter needs to know about a Qwen decoder, frozen."""

    architecture: Architecture
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    layer_types: tuple[LayerType, ...]
    sliding_window: int | None
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    #: the sparse MLP of an MoE model (Qwen2-MoE, Qwen3-MoE); None for dense models
    moe: MoESpec | None = None
    #: vision-language decoders (Qwen2-VL, Qwen2.5-VL): rotary frequency pairs per position stream
    #: (time, height, width), M-RoPE; None: one position stream
    mrope_section: tuple[int, int, int] | None = None

    # ---------------------------------------------------------------- derived
    def is_sparse_layer(self, layer: int) -> bool:
        """Layer ``layer`` routes its MLP to experts (an MoE model's sparse layer)."""
        return self.moe is not None and self.moe.sparse_layers[layer]

    @property
    def kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def kv_bytes_per_token(self, dtype: DType, kv: KVCacheDType | None = None) -> int:
        """KV-cache bytes one token costs for one sequence (keys and values of every layer); ``kv``:
        the cache's own element type when it is not ``dtype``'s (an int8 cache)."""
        return kv_bytes_per_token(self.num_hidden_layers, self.num_key_value_heads, self.head_dim, dtype, kv)

    @property
    def trained_context(self) -> int:
        """Positions the model handles as configured: ``max_position_embeddings``, or with YaRN
        ``original_max_position_embeddings x factor`` when larger (Qwen2.5: 32768 x 4 = 131072).
        Linear and dynamic scaling keep ``max_position_embeddings`` (dynamic runs as default here)."""
        s = self.rope_scaling
        if s is not None and s.rope_type is RopeType.YARN and s.original_max_position_embeddings:
            return max(self.max_position_embeddings, int(s.original_max_position_embeddings * s.factor))
        return self.max_position_embeddings

    @property
    def has_sliding_layers(self) -> bool:
        return LayerType.SLIDING in self.layer_types

    def rope_inv_freq_and_scale(self, pos_freqs: Sequence[float] | None = None) -> tuple[list[float], float]:
        """Inverse frequencies and the cos/sin scale, exactly as transformers computes them.

        Mirrors ``transformers.modeling_rope_utils`` (default, linear and YaRN; float32 arithmetic
        is applied by the caller). Dynamic NTK scaling only changes frequencies beyond the original
        context and is treated as default here, as transformers does for short sequences.
        """
        dim = self.head_dim
        base = _f32(self.rope_theta)
        # transformers computes in float32: every operation below is rounded to float32 as torch does;
        # torch's float32 pow is not correctly rounded everywhere (1 ulp off at some exponents), so an
        # exporter passes the ``base ** (2i / dim)`` torch computes (export/trace.rope_inv_freq_and_scale)
        if pos_freqs is None:
            pos_freqs = [_f32(base ** _f32(i / dim)) for i in range(0, dim, 2)]
        pos_freqs = [_f32(p) for p in pos_freqs]
        scaling = self.rope_scaling
        if scaling is None or scaling.rope_type in (RopeType.DEFAULT, RopeType.DYNAMIC):
            return [_f32(1.0 / p) for p in pos_freqs], 1.0
        if scaling.rope_type is RopeType.LINEAR:
            return [_f32(_f32(1.0 / p) / _f32(scaling.factor)) for p in pos_freqs], 1.0
        return _yarn(self, scaling, pos_freqs)

    # ---------------------------------------------------------------- parsing
    @classmethod
    def from_config_file(cls, path: str | Path) -> ModelSpec:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        return cls.from_config(read_config_json(path), source=str(path))

    @classmethod
    def from_config(cls, raw: dict[str, Any], source: str = "config.json") -> ModelSpec:
        arch = _architecture(raw, source)
        get = _Getter(raw, source)
        hidden = get.int("hidden_size")
        heads = get.int("num_attention_heads")
        kv_heads = get.int("num_key_value_heads", default=None) or heads
        layers = get.int("num_hidden_layers")
        if heads % kv_heads:
            raise ConfigError(
                f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
            )
        # transformers' Qwen3Config defaults head_dim to 128; Qwen2Config derives it from hidden_size;
        # the MoE attentions read head_dim when the config has one, else hidden_size // heads.
        head_dim = get.int("head_dim", default=128 if arch is Architecture.QWEN3 else None)
        if head_dim is None:
            if hidden % heads:
                raise ConfigError(f"{source}: hidden_size={hidden} is not divisible by num_attention_heads={heads}")
            head_dim = hidden // heads
        if head_dim % 2:
            raise ConfigError(f"{source}: head_dim={head_dim} must be even for rotary embeddings")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act={act!r} is not supported; Qwen uses 'silu'")
        max_pos = get.int("max_position_embeddings", default=None) or 32768
        rope_theta, scaling = _rope(raw, source, max_pos)
        use_sw = bool(raw.get("use_sliding_window", False))
        sliding_window = get.int("sliding_window", default=None) if use_sw else None
        layer_types = _layer_types(raw, source, layers, sliding_window)
        if any(t is LayerType.SLIDING for t in layer_types) and sliding_window is None:
            raise ConfigError(f"{source}: layer_types has sliding_attention layers but no sliding_window is set")
        moe = parse_moe(raw, source, arch.value, layers) if arch.is_moe else None
        if arch is Architecture.QWEN2:
            qkv_bias, o_bias, qk_norm = True, False, False
        elif arch is Architecture.QWEN2_MOE:
            qkv_bias, o_bias, qk_norm = bool(raw.get("qkv_bias", True)), False, False
        else:
            bias = bool(raw.get("attention_bias", False))
            qkv_bias, o_bias, qk_norm = bias, bias, True
        eps = raw.get("rms_norm_eps", 1e-6)
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
            raise ConfigError(f"{source}: rms_norm_eps={eps!r} must be a number in (0, 1)")
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        for key, ids in (
            ("eos_token_id", eos_ids),
            ("bos_token_id", (raw.get("bos_token_id"),)),
            ("pad_token_id", (raw.get("pad_token_id"),)),
        ):
            if not all(i is None or (isinstance(i, int) and not isinstance(i, bool)) for i in ids) or (
                key == "eos_token_id" and None in ids
            ):
                raise ConfigError(f"{source}: {key}={raw.get(key)!r} must be a token id (integer) or a list of them")
        dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
        return cls(
            architecture=arch,
            vocab_size=get.int("vocab_size"),
            hidden_size=hidden,
            intermediate_size=get.int("intermediate_size"),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=max_pos,
            rms_norm_eps=float(eps),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            qk_norm=qk_norm,
            layer_types=layer_types,
            sliding_window=sliding_window,
            torch_dtype=str(dtype),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            pad_token_id=raw.get("pad_token_id"),
            moe=moe,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (enums as their values); :meth:`from_dict` inverts it."""
        out = dataclasses.asdict(self)
        out["architecture"] = self.architecture.value
        out["layer_types"] = [t.value for t in self.layer_types]
        if self.rope_scaling is not None:
            out["rope_scaling"]["rope_type"] = self.rope_scaling.rope_type.value
        out["eos_token_ids"] = list(self.eos_token_ids)
        if self.mrope_section is None:
            del out["mrope_section"]  # text models' manifests stay as they were
        else:
            out["mrope_section"] = list(self.mrope_section)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        data = dict(data)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ConfigError(f"model spec has unknown fields {sorted(unknown)}; was it written by a newer version?")
        data["architecture"] = Architecture.parse(data["architecture"], "architecture")
        data["layer_types"] = tuple(LayerType.parse(t, "layer type") for t in data["layer_types"])
        data["eos_token_ids"] = tuple(data.get("eos_token_ids", ()))
        if data.get("mrope_section") is not None:
            data["mrope_section"] = tuple(data["mrope_section"])
        if data.get("moe") is not None:
            data["moe"] = MoESpec.from_dict(data["moe"])
        rs = data.get("rope_scaling")
        if rs is not None:
            rs = dict(rs)
            rs["rope_type"] = RopeType.parse(rs["rope_type"], "rope type")
            data["rope_scaling"] = RopeScaling(**rs)
        return cls(**data)


# -------------------------------------------------------------------- helpers
def read_config_json(path: str | Path) -> dict[str, Any]:
    """``config.json`` as a dict; a ConfigError that names the defect otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found; a Hugging Face checkpoint directory needs config.json")
    from qwen_export.safefs import read_regular

    try:
        text = (read_regular(path, 16 << 20, ConfigError) or b"").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer over 4300 digits, absurd nesting
        raise ConfigError(f"{path}: invalid JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    return raw


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype: DType, kv: KVCacheDType | None = None) -> int:
    """KV-cache bytes one token takes: 2 (K and V) x layers x kv_heads x head_dim x element bytes
    (``kv``'s when given, else ``dtype``'s)."""
    itemsize = kv.itemsize if kv is not None else (2 if dtype is DType.FP16 else 4)
    return 2 * layers * kv_heads * head_dim * itemsize


class _Getter:
    def __init__(self, raw: dict[str, Any], source: str) -> None:
        self.raw, self.source = raw, source

    _MISSING = object()

    def int(self, key: str, default: Any = _MISSING) -> Any:
        value = self.raw.get(key, default)
        if value is _Getter._MISSING:
            raise ConfigError(f"{self.source}: required field {key!r} is missing")
        if value is None:
            if default is _Getter._MISSING:
                raise ConfigError(f"{self.source}: required field {key!r} is null")
            return None  # explicit null: the caller's "not set" handling applies
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{self.source}: {key}={value!r} must be an integer")
        if value <= 0 or value > 10_000_000:
            raise ConfigError(f"{self.source}: {key}={value} is out of range (1 .. 10,000,000)")
        return value


def _architecture(raw: dict[str, Any], source: str) -> Architecture:
    archs = raw.get("architectures")
    if isinstance(archs, list) and archs:
        for name in archs:
            if isinstance(name, str) and name in SUPPORTED_ARCHITECTURES:
                return SUPPORTED_ARCHITECTURES[name]
        if archs[0] in _VISION_LANGUAGE:
            raise ConfigError(
                f"{source}: {archs[0]} is a vision-language model: `qwen-export export` takes it "
                f"(--target onnxruntime), this step takes text models only: {_SUPPORTED_TEXT}"
            )
        raise ConfigError(f"{source}: architecture {archs[0]!r} is not supported; supported: {_SUPPORTED_TEXT}")
    model_type = raw.get("model_type")
    if isinstance(model_type, str) and model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    raise ConfigError(f"{source}: model_type {model_type!r} is not supported; supported: {_SUPPORTED_TEXT}")


def _rope(raw: dict[str, Any], source: str, max_pos: int) -> tuple[float, RopeScaling | None]:
    """Accept both the classic ``rope_theta`` + ``rope_scaling`` and the newer ``rope_parameters``."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: rope_scaling/rope_parameters must be an object, found {params!r}")
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    if _finite(theta) is None or theta <= 1:
        raise ConfigError(f"{source}: rope_theta={theta!r} must be a number > 1")
    kind = params.get("rope_type", params.get("type", "default"))
    rope_type = RopeType.parse(kind, f"rope type in {source}")
    if rope_type is RopeType.DEFAULT:
        return float(theta), None
    factor = params.get("factor")
    if rope_type is RopeType.YARN:
        orig = raw.get("original_max_position_embeddings", params.get("original_max_position_embeddings", max_pos))
        if isinstance(orig, bool) or not isinstance(orig, int) or not 0 < orig <= 10_000_000:
            raise ConfigError(
                f"{source}: original_max_position_embeddings={orig!r} must be an integer in 1 .. 10,000,000"
            )
        if factor is None:
            factor = max_pos / orig
    if _finite(factor) is None or factor <= 0:
        raise ConfigError(f"{source}: rope scaling factor={factor!r} must be a positive number")
    if rope_type is not RopeType.YARN:
        return float(theta), RopeScaling(rope_type=rope_type, factor=float(factor))
    attention_factor = params.get("attention_factor")
    for key in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
        if params.get(key) is not None and (
            _finite(params[key]) is None or (key.startswith("beta") and params[key] < 0)
        ):
            raise ConfigError(f"{source}: rope scaling {key}={params[key]!r} must be a finite (beta: >= 0) number")
    return float(theta), RopeScaling(
        rope_type=rope_type,
        factor=float(factor),
        original_max_position_embeddings=int(orig),
        attention_factor=None if attention_factor is None else float(attention_factor),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=_finite(params.get("mscale")),
        mscale_all_dim=_finite(params.get("mscale_all_dim")),
        truncate=bool(params.get("truncate", True)),
    )


def _layer_types(raw: dict[str, Any], source: str, layers: int, window: int | None) -> tuple[LayerType, ...]:
    given = raw.get("layer_types")
    if given is not None:
        if not isinstance(given, list) or len(given) != layers:
            raise ConfigError(f"{source}: layer_types must list one entry per layer ({layers})")
        types = tuple(LayerType.parse(t, f"layer type in {source}") for t in given)
        # transformers drops the window when use_sliding_window is false: every layer is full then.
        return types if window is not None else tuple(LayerType.FULL for _ in types)
    max_window_layers = raw.get("max_window_layers", 28)
    if window is not None and (isinstance(max_window_layers, bool) or not isinstance(max_window_layers, int)):
        raise ConfigError(f"{source}: max_window_layers={max_window_layers!r} must be an integer")
    return tuple(
        LayerType.SLIDING if window is not None and i >= max_window_layers else LayerType.FULL for i in range(layers)
    )


def _finite(value: Any) -> float | None:
    """``value`` as a finite float, or None when it is not a finite real number (bools excluded)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        out = float(value)
    except OverflowError:  # an int beyond float range
        return None
    return out if math.isfinite(out) else None


def _yarn(spec: ModelSpec, s: RopeScaling, pos_freqs: list[float]) -> tuple[list[float], float]:
    """YaRN inverse frequencies, transcribed from transformers' ``_compute_yarn_parameters``."""
    dim, base, factor = spec.head_dim, spec.rope_theta, s.factor
    orig = s.original_max_position_embeddings or spec.max_position_embeddings

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = s.attention_factor
    if attention_factor is None:
        if s.mscale and s.mscale_all_dim:
            attention_factor = get_mscale(factor, s.mscale) / get_mscale(factor, s.mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)

    def correction_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    inv = []
    span = _f32(high - low)
    for i, p in enumerate(pos_freqs):  # float32 at every step, as transformers' torch code
        ramp = min(max(_f32(_f32(i - _f32(low)) / span), 0.0), 1.0)
        extrap = _f32(1 - ramp)
        interpolated = _f32(_f32(1.0 / _f32(_f32(factor) * p)) * _f32(1 - extrap))
        inv.append(_f32(interpolated + _f32(_f32(1.0 / p) * extrap)))
    return inv, float(attention_factor)


def _f32(value: float) -> float:
    """``value`` rounded to the nearest float32 (what a torch float32 operation stores)."""
    return float(struct.unpack("f", struct.pack("f", value))[0])
