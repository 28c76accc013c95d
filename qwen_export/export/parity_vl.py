"""Parity of a vision-language artifact (Qwen2-VL / Qwen2.5-VL) against transformers.

On one image and a chat prompt (the image, then the evaluation text, as a user message):

- the vision features: the artifact's vision model on our preprocessing against transformers'
  tower (``model.model.visual``) on the same pixel values, as max |error| / max |reference|;
- the decoder: :func:`qwen_export.export.parity.check` on the whole prompt (every position's
  logits fed one token at a time, then a greedy continuation after the whole prompt), the
  reference being transformers' ``AutoModelForImageTextToText`` given the image.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from qwen_export.errors import OptionError

#: ``--vision-weights int8``: the tower's features against transformers' (max error / max
#: reference). Its activations are quantized per tensor at each of the 2 x depth + 2 GEMMs, so the
#: error grows with depth: measured 0.028 on the tiny random Qwen2.5-VL of the tests (4 blocks), 0.061
#: (448x448) and 0.074 (1024x768) at the random Qwen2.5-VL-3B shape (32 blocks).
INT8_TOWER_ERROR = 0.10
#: a tower computed in bf16 or f16 (OpenVINO's ``vision_precision``): measured 0.014-0.016 at the
#: random Qwen2.5-VL-3B shape (448x448, 1024x768), bf16 on an AMD EPYC with AVX512-BF16
HALF_TOWER_ERROR = 0.05


def tower_limit(int8_tower: bool, half_tower: bool, exact: float) -> float:
    """The largest relative error `check` allows the tower's features."""
    return INT8_TOWER_ERROR if int8_tower else HALF_TOWER_ERROR if half_tower else exact


def builtin_image() -> Any:
    """The built-in image: 336x252, colour gradients with a few shapes (deterministic)."""
    from PIL import Image

    h, w = 252, 336
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), ((x // 28 + y // 28) % 2) * 200], -1)
    rgb[(x - 100) ** 2 + (y - 120) ** 2 < 50**2] = (240, 40, 40)
    rgb[150:220, 200:300] = (30, 60, 220)
    return Image.fromarray(rgb.astype(np.uint8))


@dataclasses.dataclass(frozen=True)
class VisionPrompt:
    ids: list[int]
    patches: Any  # vision_input.ImagePatches
    text_tokens: int


def vision_prompt(loaded: Any, image: Any, text: str, max_tokens: int) -> VisionPrompt:
    """The evaluation prompt of a VL artifact (registered with its engine): the chat template on a
    user message of ``image`` then ``text`` (cut to ``max_tokens`` tokens), pad tokens expanded."""
    from qwen_export.runtime.multimodal import image_sources

    multimodal = loaded.engine.multimodal
    tokenizer = loaded.tokenizer
    text = tokenizer.decode(tokenizer.encode(text)[:max_tokens])
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]
    plain, sources = image_sources(messages)
    patches = multimodal.prepare_images(sources)
    ids = multimodal.expand(tokenizer.apply_chat_template_ids(plain), patches)
    multimodal.set_prompt(ids, patches)
    return VisionPrompt(ids, patches[0], max_tokens)


class VisionReference:
    """transformers' Qwen2-VL / Qwen2.5-VL (fp32, eager attention) on one image: the decoder
    reference for :func:`~qwen_export.export.parity.check` (``logits`` / ``greedy``) and the tower's
    features."""

    def __init__(self, checkpoint: str | Path, patches: Any, multimodal: Any) -> None:
        import torch
        import transformers

        self._torch = torch
        transformers.utils.logging.disable_progress_bar()
        self.model = transformers.AutoModelForImageTextToText.from_pretrained(
            str(checkpoint), dtype=torch.float32, attn_implementation="eager"
        ).eval()
        self.patches, self.multimodal = patches, multimodal

    def features(self) -> np.ndarray:
        torch = self._torch
        with torch.no_grad():
            out = self.model.model.visual(
                torch.from_numpy(self.patches.pixel_values), grid_thw=torch.tensor([self.patches.grid_thw])
            )
        return out.pooler_output.numpy()

    def _inputs(self, ids: list[int]) -> dict[str, Any]:
        from qwen_export.runtime.mrope import token_types

        torch = self._torch
        inputs: dict[str, Any] = {"input_ids": torch.tensor([ids])}
        if self.multimodal.image_token_id in ids:
            inputs.update(
                pixel_values=torch.from_numpy(self.patches.pixel_values),
                image_grid_thw=torch.tensor([self.patches.grid_thw]),
                mm_token_type_ids=torch.from_numpy(token_types(ids, self.multimodal)).unsqueeze(0).int(),
            )
        return inputs

    def logits(self, ids: list[int]) -> np.ndarray:
        with self._torch.no_grad():
            return self.model(**self._inputs(ids)).logits[0].numpy()

    def greedy(self, ids: list[int], n: int) -> list[int]:
        with self._torch.no_grad():
            out = self.model.generate(
                **self._inputs(ids), max_new_tokens=n, do_sample=False, min_new_tokens=n, pad_token_id=0
            )
        return [int(t) for t in out[0, len(ids) :]]


def vision_error(engine: Any, reference: VisionReference, prompt: VisionPrompt) -> float:
    """max |artifact features - transformers'| / max |transformers'| for the prompt's image."""
    multimodal = engine.multimodal
    image = next(i for i in multimodal.prompt_images if i.patches is prompt.patches)
    ours = multimodal.encoded(image).astype(np.float64)
    theirs = reference.features().astype(np.float64)
    if ours.shape != theirs.shape:
        raise OptionError(f"vision features of shape {ours.shape}; transformers' are {theirs.shape}")
    return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-12))
