"""What a vision-language artifact holds beside its decoder graph (issue 25).

A Qwen2-VL / Qwen2.5-VL artifact is three parts:

- ``model.onnx``: the text decoder, traced with ``inputs_embeds`` [B, S, hidden] instead of
  ``input_ids`` and M-RoPE ``position_ids`` [3, B, S], through the target's passes (quantized
  like a text model's decoder);
- ``vision.onnx``: the vision tower (:mod:`.vision_export`) in float32, patches in, merged image
  features out;
- ``embed_tokens.npy``: the token embedding table, which the runtime reads (memory-mapped, one row
  per token) to build ``inputs_embeds`` and into which it merges the image features. Stored in the
  decoder's activation dtype for a float export (so parity with transformers is exact), and as
  float16 for a quantized one (its rounding, about 5e-4 relative, is far below int8/int4 weight
  noise; it halves a 3B model's 1.2 GB table).

The checkpoint's ``preprocessor_config.json`` (image size limits, normalisation) is copied when
present; the runtime falls back to the Qwen2-VL processor defaults otherwise. ``manifest.extra
["multimodal"]`` records the :class:`~qwen_export.vision.MultimodalSpec` and these file names.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from qwen_export.errors import CheckpointError, OptionError
from qwen_export.vision import MultimodalSpec, VisionWeights, parse_multimodal

VISION_STEM = "vision"
EMBEDDINGS_FILE = "embed_tokens.npy"
PREPROCESSOR_FILE = "preprocessor_config.json"
EMBEDDING_NAME = "model.embed_tokens.weight"
#: targets whose runtime runs a VL artifact today
VL_TARGETS = ("onnxruntime", "openvino", "tensorrt")


def checkpoint_multimodal(directory: str | Path) -> MultimodalSpec | None:
    """The checkpoint's :class:`MultimodalSpec` when it is a Qwen2-VL / Qwen2.5-VL one, else None
    (ConfigError for a VL config with a defect; a missing or unreadable config is left to the
    checkpoint loader, which names it)."""
    from qwen_export.spec import read_config_json

    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    return parse_multimodal(read_config_json(path), str(path))


def check_target(target: str, vision_weights: VisionWeights = VisionWeights.FP32) -> None:
    if target not in VL_TARGETS:
        raise OptionError(f"--target {target}: vision-language export is built for --target {' | '.join(VL_TARGETS)}")
    if target != "onnxruntime" and vision_weights is not VisionWeights.FP32:
        raise OptionError(
            f"--vision-weights {vision_weights.value} lowers the tower to ONNX Runtime's DynamicQuantizeMatMul; "
            f"--target {target} takes --vision-weights fp32"
        )


def embedding_dtype(activation_dtype: Any, quantized: bool) -> np.dtype:
    return np.dtype(np.float16) if quantized else np.dtype(activation_dtype)


#: rows of the embedding table read and written at a time (16 MiB of float32 at hidden 2048)
TABLE_CHUNK_ROWS = 2048


def write_embeddings(source: Any, out_dir: Path, dtype: np.dtype) -> None:
    """``embed_tokens.npy`` from the checkpoint's table, streamed in row chunks (bounded memory)."""
    if EMBEDDING_NAME not in source:
        raise CheckpointError(f"the checkpoint has no {EMBEDDING_NAME}")
    shape = tuple(source.info(EMBEDDING_NAME).shape)
    if len(shape) != 2:
        raise CheckpointError(f"{EMBEDDING_NAME} has shape {shape}; expected [vocab, hidden]")
    table = np.lib.format.open_memmap(out_dir / EMBEDDINGS_FILE, mode="w+", dtype=dtype, shape=shape)
    for start in range(0, shape[0], TABLE_CHUNK_ROWS):
        stop = min(shape[0], start + TABLE_CHUNK_ROWS)
        table[start:stop] = source.read_rows(EMBEDDING_NAME, start, stop)
    table.flush()
    del table


def write_parts(
    checkpoint: Any,
    multimodal: MultimodalSpec,
    out_dir: Path,
    *,
    activation_dtype: Any,
    quantized: bool,
    vision_weights: VisionWeights = VisionWeights.FP32,
    step: Callable[[str], None] = lambda name: None,
) -> dict[str, Any]:
    """Write the vision tower, the embedding table and the preprocessor config into ``out_dir``;
    return ``manifest.extra["multimodal"]``."""
    from qwen_export.export.vision_export import export_vision, input_names

    step("vision")
    rewrite = quantize_tower if vision_weights is VisionWeights.INT8 else None
    export_vision(checkpoint, checkpoint.names(), multimodal.vision, out_dir, stem=VISION_STEM, rewrite=rewrite)
    dtype = embedding_dtype(activation_dtype, quantized)
    write_embeddings(checkpoint, out_dir, dtype)
    preprocessor = checkpoint.directory / PREPROCESSOR_FILE
    if preprocessor.is_file():
        shutil.copyfile(preprocessor, out_dir / PREPROCESSOR_FILE)
    return {
        "max_image_patches": max_image_patches(preprocessor, multimodal),
        **multimodal.to_dict(),
        "vision_model": f"{VISION_STEM}.onnx",
        "vision_inputs": input_names(multimodal.vision),
        "embeddings": EMBEDDINGS_FILE,
        "embeddings_dtype": dtype.name,
        "vision_weights": vision_weights.value,
    }


def max_image_patches(preprocessor: Path, multimodal: MultimodalSpec) -> int:
    """Patches of the largest image the preprocessor makes (``max_pixels`` / patch area, whole
    merge units): what TensorRT's vision profile is built up to."""
    from qwen_export.runtime.vision_input import ImageProcessing

    processing = ImageProcessing.from_file(preprocessor, multimodal.vision)
    unit = multimodal.vision.merge_unit
    return max(unit, processing.max_pixels // processing.patch_size**2 // unit * unit)


def quantize_tower(model: Any) -> None:
    """``--vision-weights int8``: every linear of the tower but the patch embedding (``*.weight_t``
    [K, N], the B of a MatMul) -> per-column int8 weights with dynamically quantized int8
    activations (ONNX Runtime's ``DynamicQuantizeMatMul``, :mod:`~qwen_export.targets.onnxruntime.
    dynamic_int8`), the biases folded in. The patch embedding reads raw pixels and is cheap (K =
    1176): it stays float32."""
    from qwen_export.targets.onnxruntime.dynamic_int8 import lower_dynamic_int8

    lower_dynamic_int8(model, lambda name: name.endswith(".weight_t") and not name.startswith("patch_embed."))
