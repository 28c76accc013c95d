"""Tiny seeded Qwen2-VL / Qwen2.5-VL checkpoints (transformers' own classes, random weights, the
real Qwen tokenizer) for tests and benchmarks; the vision-language counterpart of :mod:`.tiny`."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from qwen_export.export.tiny import REAL_VOCAB_SIZE, TOKENIZER_FILES, _save, _tokenizer_source
from qwen_export.vision import VisionFamily

_ENDOFTEXT, _IM_END = 151643, 151645

#: ``make_vl_checkpoint`` arguments for the real Qwen2.5-VL-3B shape (config.json of
#: Qwen/Qwen2.5-VL-3B-Instruct), bf16 like the released weights
QWEN25_VL_3B_SHAPE: dict[str, Any] = dict(
    family="qwen2_5_vl",
    dtype="bfloat16",
    layers=36,
    hidden=2048,
    heads=16,
    kv_heads=2,
    inter=11008,
    vision_depth=32,
    vision_width=1280,
    vision_heads=16,
    vision_mlp=3420,
    fullatt=(7, 15, 23, 31),
    window_size=112,
    max_positions=128000,
    rope_theta=1_000_000.0,
)


def make_vl_checkpoint(
    out_dir: str | Path,
    family: str = "qwen2_vl",
    *,
    dtype: str = "float32",
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    inter: int = 128,
    vision_depth: int = 4,
    vision_width: int = 32,
    vision_heads: int = 2,
    vision_mlp: int = 64,
    fullatt: tuple[int, ...] = (1, 3),
    window_size: int = 56,
    max_positions: int = 1024,
    rope_theta: float = 10000.0,
    seed: int = 0,
) -> Path:
    """Write a tiny VL checkpoint as transformers saves one (``config.json`` with ``text_config``
    and ``vision_config``, safetensors), with the Qwen tokenizer files. ``family`` is ``qwen2_vl``
    or ``qwen2_5_vl`` (which alone takes ``fullatt`` and ``window_size``); the vision MLP is
    ``vision_mlp`` wide (Qwen2-VL: through ``mlp_ratio``, so a multiple of ``vision_width``).
    Returns ``out_dir``."""
    import torch

    model = _build(VisionFamily(family), locals())
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    model = model.to(dtypes[dtype])
    out = Path(out_dir)
    _save(model, out, 1)
    src = _tokenizer_source(REAL_VOCAB_SIZE, True, None)
    assert src is not None
    for name in TOKENIZER_FILES:
        shutil.copyfile(src / name, out / name)
    return out


def _build(family: VisionFamily, a: dict[str, Any]) -> Any:
    import torch
    import transformers

    head_dim = a["hidden"] // a["heads"]
    half = head_dim // 2  # split as the released models split 64 pairs: 16 time, 24 height, 24 width
    spatial = (half - half // 4) // 2
    section = [half - 2 * spatial, spatial, spatial]
    text = dict(
        vocab_size=REAL_VOCAB_SIZE,
        hidden_size=a["hidden"],
        intermediate_size=a["inter"],
        num_hidden_layers=a["layers"],
        num_attention_heads=a["heads"],
        num_key_value_heads=a["kv_heads"],
        max_position_embeddings=a["max_positions"],
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": a["rope_theta"]},
        bos_token_id=_ENDOFTEXT,
        eos_token_id=_IM_END,
        pad_token_id=_ENDOFTEXT,
    )
    vision: dict[str, Any] = dict(
        depth=a["vision_depth"],
        num_heads=a["vision_heads"],
        in_channels=3,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    if family is VisionFamily.QWEN2_VL:
        vision.update(
            embed_dim=a["vision_width"], hidden_size=a["hidden"], mlp_ratio=a["vision_mlp"] // a["vision_width"]
        )
        config_cls, model_cls = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    else:
        vision.update(
            hidden_size=a["vision_width"],
            out_hidden_size=a["hidden"],
            intermediate_size=a["vision_mlp"],
            fullatt_block_indexes=list(a["fullatt"]),
            window_size=a["window_size"],
            tokens_per_second=2,
        )
        config_cls, model_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    config = config_cls(text_config=text, vision_config=vision, tie_word_embeddings=True)
    torch.manual_seed(a["seed"])
    model = model_cls(config).eval()
    _reinit(model, a["seed"])
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=_ENDOFTEXT, eos_token_id=[_IM_END, _ENDOFTEXT], pad_token_id=_ENDOFTEXT
    )
    return model


def _reinit(model: Any, seed: int) -> None:
    """Seeded weights with scales that keep a tiny model lively (unit-variance linears, norms near 1)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                values = (1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(param.shape, generator=gen)
            elif name.endswith(".bias"):
                values = 0.1 * torch.randn(param.shape, generator=gen)
            elif "embed_tokens" in name or name == "lm_head.weight":
                values = 0.5 * torch.randn(param.shape, generator=gen)
            else:
                fan_in = math.prod(param.shape[1:]) if param.dim() > 1 else param.shape[0]
                values = torch.randn(param.shape, generator=gen) / math.sqrt(fan_in)
            param.copy_(values)
