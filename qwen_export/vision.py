"""The vision side of Qwen's vision-language checkpoints (Qwen2-VL, Qwen2.5-VL), parsed from
``config.json``: the vision tower (:class:`VisionSpec`) and what the decoder needs to place image
features and their multimodal rotary positions (:class:`MultimodalSpec`).

Both config layouts are read: the released checkpoints' (text fields at the top level,
``rope_scaling: {"type": "mrope", "mrope_section": [...]}``, ``vision_config.in_chans``) and the one
transformers 5 writes (``text_config`` / ``vision_config`` objects, ``rope_parameters``).

Pure Python like :mod:`qwen_export.spec`: the runtime library imports it.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from qwen_export.errors import ConfigError
from qwen_export.spec import _Getter

#: ``architectures`` entries of the vision-language checkpoints, and their family
VL_ARCHITECTURES = {
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
}


class VisionFamily(str, enum.Enum):
    #: LayerNorm, fc1/GELU/fc2 MLP, full attention in every block, LayerNorm merger
    QWEN2_VL = "qwen2_vl"
    #: RMSNorm, SwiGLU MLP, window attention except ``fullatt_block_indexes``, RMSNorm merger
    QWEN2_5_VL = "qwen2_5_vl"


class VisionWeights(str, enum.Enum):
    """The exported vision tower's linear weights (``export --vision-weights``)."""

    FP32 = "fp32"  # exact (the default)
    INT8 = "int8"  # blockwise int8 (block 32, symmetric RTN) run as MatMulNBits with int8 activations

    @classmethod
    def parse(cls, value: Any) -> VisionWeights:
        from qwen_export.spec import parse_choice

        return parse_choice(cls, value, "--vision-weights")


class VisionNorm(str, enum.Enum):
    LAYER_NORM = "layer_norm"
    RMS_NORM = "rms_norm"


@dataclasses.dataclass(frozen=True)
class VisionSpec:
    """The ViT of a Qwen-VL checkpoint (``vision_config``)."""

    family: VisionFamily
    depth: int
    embed_dim: int
    num_heads: int
    mlp_dim: int
    hidden_act: str
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    #: width of the merged features: the text decoder's hidden size
    out_hidden_size: int
    rope_theta: float = 10000.0
    #: Qwen2.5-VL: side of an attention window in pixels (0: every block attends to the whole frame)
    window_size: int = 0
    fullatt_block_indexes: tuple[int, ...] = ()
    #: Qwen2.5-VL videos: temporal positions per second of video
    tokens_per_second: float = 2.0
    norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per patch in ``pixel_values``: channels x temporal patch x patch x patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        """Patches merged into one decoder token."""
        return self.spatial_merge_size**2

    @property
    def norm(self) -> VisionNorm:
        return VisionNorm.LAYER_NORM if self.family is VisionFamily.QWEN2_VL else VisionNorm.RMS_NORM

    @property
    def windowed(self) -> bool:
        return self.family is VisionFamily.QWEN2_5_VL and self.window_size > 0

    @property
    def window_patches(self) -> int:
        """Patches in a full attention window (Qwen2.5-VL; windows at the frame's right and bottom
        edges hold fewer): ``window_size`` pixels square, counted in merged tokens."""
        side = self.window_size // self.spatial_merge_size // self.patch_size
        return side * side * self.merge_unit

    def is_full_attention(self, block: int) -> bool:
        return not self.windowed or block in self.fullatt_block_indexes

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["family"] = self.family.value
        data["fullatt_block_indexes"] = list(self.fullatt_block_indexes)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VisionSpec:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ConfigError(f"vision spec: unknown fields {unknown}")
        values = dict(data)
        values["family"] = VisionFamily(values["family"])
        values["fullatt_block_indexes"] = tuple(values.get("fullatt_block_indexes", ()))
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class MultimodalSpec:
    """What a VL checkpoint adds to its text decoder: the vision tower, the special tokens that
    frame image features in the prompt, and the multimodal rotary sections (M-RoPE)."""

    vision: VisionSpec
    #: rotary frequency pairs per position stream (time, height, width); sums to head_dim / 2
    mrope_section: tuple[int, int, int]
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "vision": self.vision.to_dict(),
            "mrope_section": list(self.mrope_section),
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MultimodalSpec:
        values = dict(data)
        values["vision"] = VisionSpec.from_dict(values["vision"])
        values["mrope_section"] = tuple(values["mrope_section"])
        return cls(**values)


def vl_family(raw: dict[str, Any]) -> VisionFamily | None:
    """The VL family a config declares (``architectures`` or ``model_type``), or None."""
    archs = raw.get("architectures")
    for name in archs if isinstance(archs, list) else []:
        if isinstance(name, str) and name in VL_ARCHITECTURES:
            return VisionFamily(VL_ARCHITECTURES[name])
    model_type = raw.get("model_type")
    if model_type in (f.value for f in VisionFamily):
        return VisionFamily(model_type)
    return None


def text_config(raw: dict[str, Any]) -> dict[str, Any]:
    """The decoder's fields of a VL config as a plain Qwen2 config: ``text_config`` when present
    (transformers 5's layout), else the top level; M-RoPE rotary parameters become plain ones."""
    nested = raw.get("text_config")
    text = dict(nested) if isinstance(nested, dict) else {k: v for k, v in raw.items() if k != "vision_config"}
    for key in ("rope_scaling", "rope_parameters"):
        params = text.get(key)
        if isinstance(params, dict) and "mrope_section" in params:
            plain = {k: v for k, v in params.items() if k not in ("mrope_section", "type", "rope_type")}
            text[key] = plain or None
            if key == "rope_parameters" and not plain:
                text.pop(key)
    text["architectures"] = ["Qwen2ForCausalLM"]
    text["model_type"] = "qwen2"
    if "tie_word_embeddings" in raw and "tie_word_embeddings" not in text:
        text["tie_word_embeddings"] = raw["tie_word_embeddings"]
    return text


def parse_multimodal(raw: dict[str, Any], source: str = "config.json") -> MultimodalSpec | None:
    """The :class:`MultimodalSpec` of a VL config, None for a text-only one."""
    family = vl_family(raw)
    if family is None:
        return None
    vision_raw = raw.get("vision_config")
    if not isinstance(vision_raw, dict):
        raise ConfigError(f"{source}: a {family.value} config needs a vision_config object")
    text = text_config(raw)
    get = _Getter(text, source)
    head_dim = get.int("hidden_size") // get.int("num_attention_heads")
    vision = _vision(family, vision_raw, f"{source}: vision_config", get.int("hidden_size"))
    ids = _Getter({**raw, **{k: v for k, v in text.items() if k.endswith("_token_id")}}, source)
    return MultimodalSpec(
        vision=vision,
        mrope_section=_mrope_section(raw, text, source, head_dim),
        image_token_id=ids.int("image_token_id", 151655),
        video_token_id=ids.int("video_token_id", 151656),
        vision_start_token_id=ids.int("vision_start_token_id", 151652),
        vision_end_token_id=ids.int("vision_end_token_id", 151653),
    )


def _vision(family: VisionFamily, raw: dict[str, Any], source: str, text_hidden: int) -> VisionSpec:
    get = _Getter(raw, source)
    heads = get.int("num_heads")
    patch = get.int("patch_size", 14)
    merge = get.int("spatial_merge_size", 2)
    channels = get.int("in_channels", None) or get.int("in_chans", 3)
    theta = (raw.get("rope_parameters") or {}).get("rope_theta", raw.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not 0 < theta < 1e12:
        raise ConfigError(f"{source}: rope_theta={theta!r} must be a positive number")
    if family is VisionFamily.QWEN2_VL:
        embed = get.int("embed_dim")
        mlp_ratio = raw.get("mlp_ratio", 4)
        if not isinstance(mlp_ratio, (int, float)) or isinstance(mlp_ratio, bool) or not 0 < mlp_ratio <= 64:
            raise ConfigError(f"{source}: mlp_ratio={mlp_ratio!r} must be a positive number")
        mlp, act, out = int(embed * mlp_ratio), raw.get("hidden_act", "quick_gelu"), get.int("hidden_size", text_hidden)
        window, full = 0, ()
    else:
        embed, mlp, act = get.int("hidden_size"), get.int("intermediate_size"), raw.get("hidden_act", "silu")
        out = get.int("out_hidden_size", text_hidden)
        window = get.int("window_size", 112)
        full = _indexes(raw.get("fullatt_block_indexes", (7, 15, 23, 31)), source)
    if embed % heads or (embed // heads) % 4:
        raise ConfigError(f"{source}: width {embed} must split into {heads} heads of a multiple of 4")
    if act not in _ACTIVATIONS:
        raise ConfigError(f"{source}: hidden_act={act!r} is not supported; supported: {', '.join(_ACTIVATIONS)}")
    if out != text_hidden:
        raise ConfigError(f"{source}: merged width {out} differs from the text model's hidden_size {text_hidden}")
    return VisionSpec(
        family=family,
        depth=get.int("depth"),
        embed_dim=embed,
        num_heads=heads,
        mlp_dim=mlp,
        hidden_act=act,
        in_channels=channels,
        patch_size=patch,
        temporal_patch_size=get.int("temporal_patch_size", 2),
        spatial_merge_size=merge,
        out_hidden_size=out,
        rope_theta=float(theta),
        window_size=window,
        fullatt_block_indexes=full,
        tokens_per_second=float(raw.get("tokens_per_second", 2) or 2),
    )


_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_pytorch_tanh", "silu")


def _indexes(value: Any, source: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and v >= 0 for v in value):
        raise ConfigError(f"{source}: fullatt_block_indexes={value!r} must be a list of block numbers")
    return tuple(value)


def _mrope_section(raw: dict[str, Any], text: dict[str, Any], source: str, head_dim: int) -> tuple[int, int, int]:
    section = None
    for holder in (raw, text, raw.get("text_config") or {}):
        for key in ("rope_scaling", "rope_parameters"):
            params = holder.get(key) if isinstance(holder, dict) else None
            if isinstance(params, dict) and "mrope_section" in params:
                section = params["mrope_section"]
    if section is None:
        raise ConfigError(f"{source}: rope_scaling.mrope_section is missing (a VL config needs it)")
    if not (isinstance(section, list) and len(section) == 3 and all(isinstance(s, int) and s > 0 for s in section)):
        raise ConfigError(f"{source}: mrope_section={section!r} must be three positive integers")
    if sum(section) != head_dim // 2:
        raise ConfigError(f"{source}: mrope_section {section} must sum to head_dim/2 = {head_dim // 2}")
    return (section[0], section[1], section[2])
