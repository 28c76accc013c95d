"""A vision-language artifact's inputs, without torch and without an engine SDK: chat messages
with image parts, the prompt's image-token runs, and per fed token its embedding (image features
merged in) and its M-RoPE position.

An engine over a VL artifact (:mod:`qwen_export.export.vl_artifact`) owns one
:class:`MultimodalInputs`; its ``forward`` takes token ids as for a text model and asks
:meth:`MultimodalInputs.feeds` for the decoder's ``inputs_embeds`` and ``position_ids``. The
library (:class:`~qwen_export.runtime.llm.LLM`) registers each prompt first
(:meth:`MultimodalInputs.set_prompt`): its images, preprocessed, and every prompt position. Images
are encoded by the engine's vision session when their first token is fed, so an image already in
the KV cache (an earlier chat turn) is not encoded again; a cached image that the new prompt
replaces by another at the same place invalidates the cache from there on.

Positions (:mod:`.mrope`): prompt tokens take the positions of the whole registered prompt; a
token after it (generation, drafts) takes ``index + delta`` in all three streams.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qwen_export.errors import ArtifactError, GenerationError, OptionError
from qwen_export.runtime.mrope import rope_positions
from qwen_export.vision import MultimodalSpec

#: what an image part becomes in the prompt (Qwen2-VL's chat template writes exactly this); the
#: pad token is then repeated once per merged image token
VISION_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
#: the largest number of images one prompt may carry
MAX_IMAGES = 32


@dataclasses.dataclass(frozen=True)
class PromptImage:
    """One image of a prompt: where its pad tokens start, how many, its patches and a content key."""

    start: int
    count: int
    patches: Any  # vision_input.ImagePatches
    key: str


def image_sources(messages: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    """OpenAI-style messages with image parts -> (messages whose content is text, with
    :data:`VISION_PLACEHOLDER` where each image was; the image sources in prompt order).

    Image parts: ``{"type": "image_url", "image_url": {"url": URL}}`` (``data:`` URLs and local
    paths; ``image_url`` may be the URL string itself) and ``{"type": "image", "image": SOURCE}``
    (a path, bytes, a PIL image or an array). Parts are joined without separators, as Qwen2-VL's
    template joins them."""
    out: list[dict[str, Any]] = []
    sources: list[Any] = []
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, list):
            out.append(dict(message) if isinstance(message, Mapping) else message)
            continue
        pieces = []
        for part in content:
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "text" and isinstance(part.get("text"), str):
                pieces.append(part["text"])
            elif kind in ("image_url", "image"):
                sources.append(_image_source(part, kind))
                pieces.append(VISION_PLACEHOLDER)
            else:
                shown = kind if kind is not None else type(part).__name__
                raise OptionError(f"content part {shown!r} is not supported (text, image_url and image parts)")
        out.append({**message, "content": "".join(pieces)})
    if len(sources) > MAX_IMAGES:
        raise OptionError(f"{len(sources)} images in one prompt; at most {MAX_IMAGES}")
    return out, sources


def _image_source(part: Mapping[str, Any], kind: str) -> Any:
    value = part.get(kind)
    if kind == "image_url" and isinstance(value, Mapping):
        value = value.get("url")
    if value is None:
        raise OptionError(f"an {kind!r} content part has no {kind!r} value")
    return value


def has_image_parts(messages: Any) -> bool:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        return False
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, list) and any(
            isinstance(p, Mapping) and p.get("type") in ("image_url", "image") for p in content
        ):
            return True
    return False


class MultimodalInputs:
    """The per-engine state of a VL artifact (see the module docstring)."""

    def __init__(
        self,
        root: Path,
        record: Mapping[str, Any],
        hidden_size: int,
        vocab_size: int,
        dtype: Any,
        encode: Callable[[dict[str, np.ndarray]], np.ndarray],
    ) -> None:
        from qwen_export.runtime.vision_input import ImageProcessing

        try:
            self.spec = MultimodalSpec.from_dict({k: record[k] for k in _SPEC_FIELDS})
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{root}: manifest.extra.multimodal is malformed ({exc})") from None
        self.table = _load_table(root / str(record.get("embeddings")), vocab_size, hidden_size)
        self.processing = ImageProcessing.from_file(root, self.spec.vision)
        self.dtype = np.dtype(dtype)
        self._encode = encode
        self.reset()

    # ------------------------------------------------------------------ prompts
    def reset(self) -> None:
        self._positions = np.zeros((3, 0), np.int64)  # the registered prompt's positions
        self._delta = 0
        self._images: list[PromptImage] = []  # the registered prompt's images
        self._features: dict[str, np.ndarray] = {}  # encoded images of the registered prompt
        self._fed: list[PromptImage] = []  # images whose tokens are in the cache (some of them)
        self._cached = 0

    def prepare_images(self, sources: Sequence[Any]) -> list[Any]:
        """Load and preprocess image sources (OptionError naming a bad one)."""
        from qwen_export.runtime.vision_input import preprocess_image

        return [preprocess_image(source, self.processing) for source in sources]

    def expand(self, ids: Sequence[int], patches: Sequence[Any]) -> list[int]:
        """``ids`` with each single image pad token repeated once per merged token of its image."""
        merge = self.spec.vision.spatial_merge_size
        pad = self.spec.image_token_id
        runs = [i for i, t in enumerate(ids) if t == pad]
        if len(runs) != len(patches):
            raise GenerationError(f"the prompt has {len(runs)} image placeholders for {len(patches)} images")
        images = iter(patches)
        out: list[int] = []
        for token in ids:
            out.extend([pad] * next(images).num_tokens(merge) if token == pad else [token])
        return out

    def set_prompt(self, ids: Sequence[int], patches: Sequence[Any]) -> int:
        """Register the (expanded) prompt about to be fed and its images; return how many cached
        tokens remain valid for it (the start of the first cached image it does not repeat)."""
        if self.spec.video_token_id in ids:
            raise GenerationError("video input is not supported yet (images only)")
        grids = [p.grid_thw for p in patches]
        self._positions, self._delta = rope_positions(ids, self.spec, grids)
        self._images = _prompt_images(ids, self.spec.image_token_id, patches)
        self._features = {k: v for k, v in self._features.items() if any(i.key == k for i in self._images)}
        new = {(i.start, i.count, i.key) for i in self._images}
        valid = min([i.start for i in self._fed if (i.start, i.count, i.key) not in new], default=len(ids))
        return valid

    @property
    def prompt_images(self) -> list[PromptImage]:
        """The registered prompt's images, in order."""
        return list(self._images)

    def truncate(self, num_tokens: int) -> None:
        self._cached = min(self._cached, num_tokens)
        self._fed = [i for i in self._fed if i.start + i.count <= num_tokens]

    # ------------------------------------------------------------------ feeding
    def feeds(self, ids: np.ndarray, cached: int) -> tuple[np.ndarray, np.ndarray]:
        """``inputs_embeds`` [1, S, hidden] and ``position_ids`` [3, 1, S] for ``ids`` [1, S] fed
        after ``cached`` tokens."""
        if ids.shape[0] != 1:
            raise GenerationError(f"a vision-language artifact runs one sequence at a time, not {ids.shape[0]}")
        row = ids[0]
        seq = row.shape[0]
        embeds = np.asarray(self.table[row], dtype=self.dtype)
        index = np.arange(cached, cached + seq, dtype=np.int64)
        pad = row == self.spec.image_token_id
        if pad.any():
            self._merge_images(embeds, index, pad)
        known = self._positions.shape[1]
        positions = np.empty((3, seq), np.int64)
        inside = index < known
        positions[:, inside] = self._positions[:, index[inside]]
        positions[:, ~inside] = index[~inside] + self._delta
        self._cached = cached + seq
        return embeds[None], positions[:, None, :]

    def _merge_images(self, embeds: np.ndarray, index: np.ndarray, pad: np.ndarray) -> None:
        placed = np.zeros(pad.shape, bool)
        lo, hi = int(index[0]), int(index[-1]) + 1
        for image in self._images:
            a, b = max(lo, image.start), min(hi, image.start + image.count)
            if a >= b:
                continue
            features = self.encoded(image)
            embeds[a - lo : b - lo] = features[a - image.start : b - image.start]
            placed[a - lo : b - lo] = True
            if image not in self._fed:
                self._fed.append(image)
        if (pad & ~placed).any():
            raise GenerationError(
                "image pad tokens were fed without their image: give images through chat messages "
                "(LLM.chat / stream with image parts), not as raw token ids"
            )

    def encoded(self, image: PromptImage) -> np.ndarray:
        """The image's features, [count, hidden] (encoded on first use, then kept for this prompt)."""
        features = self._features.get(image.key)
        if features is None:
            from qwen_export.runtime.vision_input import encoder_feeds

            feeds, restore = encoder_feeds(image.patches, self.spec.vision)
            features = np.asarray(self._encode(feeds))
            if restore is not None:
                features = features[restore]
            if features.shape != (image.count, self.table.shape[1]):
                raise ArtifactError(
                    f"the vision model returned features of shape {features.shape}; expected "
                    f"({image.count}, {self.table.shape[1]})"
                )
            self._features[image.key] = features = features.astype(self.dtype, copy=False)
        return features


_SPEC_FIELDS = (
    "vision",
    "mrope_section",
    "image_token_id",
    "video_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
)


def _load_table(path: Path, vocab_size: int, hidden_size: int) -> np.ndarray:
    """The embedding table, memory-mapped (never unpickled), checked against the decoder's shape."""
    try:
        table = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: cannot read the embedding table ({exc})") from None
    if table.ndim != 2 or table.shape[1] != hidden_size or table.shape[0] < vocab_size:
        raise ArtifactError(f"{path}: embedding table of shape {table.shape}; expected [{vocab_size}, {hidden_size}]")
    if table.dtype not in (np.float16, np.float32):
        raise ArtifactError(f"{path}: embedding table of dtype {table.dtype}; expected float16 or float32")
    return table


def _prompt_images(ids: Sequence[int], pad: int, patches: Sequence[Any]) -> list[PromptImage]:
    """The prompt's image runs paired with their patches (in order)."""
    array = np.asarray(ids, np.int64)
    is_pad = np.concatenate([[False], array == pad, [False]])
    starts = np.flatnonzero(~is_pad[:-1] & is_pad[1:])
    ends = np.flatnonzero(is_pad[:-1] & ~is_pad[1:])
    if len(starts) != len(patches):
        raise GenerationError(f"the prompt has {len(starts)} image runs for {len(patches)} images")
    return [PromptImage(int(a), int(b - a), p, _key(p)) for a, b, p in zip(starts, ends, patches, strict=True)]


def _key(patches: Any) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(patches.pixel_values).tobytes())
    digest.update(repr(patches.grid_thw).encode())
    return digest.hexdigest()
