"""Images in for Qwen-VL, without torch: loading (paths, ``data:`` URLs, bytes, PIL images,
arrays), the resize rule and patch layout of transformers' Qwen2-VL image processor, and the
per-patch indices the vision encoder takes (2-D rotary positions, Qwen2.5-VL's attention windows).

Numerics follow transformers' PIL image processor (``Qwen2VLImageProcessorPil``) step by step:
RGB (transparency composited onto white), ``smart_resize`` to multiples of patch x merge, Pillow's
bicubic resize of the uint8 image, ``x * (1/255)`` in float64 cast to float32, ``(x - mean) / std``
in float32, then the patch layout ``(grid_h/m, grid_w/m, m, m, C, T, P, P)`` with the frame
repeated ``temporal_patch_size`` times. ``tests/test_vl_vision.py`` checks equality against it.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from qwen_export.errors import MissingDependencyError, OptionError
from qwen_export.vision import VisionSpec

#: CLIP's normalisation constants, the Qwen2-VL image processor's defaults
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_FILE = "preprocessor_config.json"
#: largest encoded image accepted (a data URL or file); decoded size is bounded by max_pixels
MAX_IMAGE_BYTES = 64 << 20
#: largest decoded image (pixels) before resizing: Pillow's decompression-bomb guard, made an error
MAX_SOURCE_PIXELS = 16384 * 16384


@dataclasses.dataclass(frozen=True)
class ImageProcessing:
    """The image processor's settings (``preprocessor_config.json``)."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def for_vision(cls, vision: VisionSpec, **overrides: Any) -> ImageProcessing:
        base = cls(
            patch_size=vision.patch_size,
            temporal_patch_size=vision.temporal_patch_size,
            merge_size=vision.spatial_merge_size,
        )
        return dataclasses.replace(base, **overrides)

    @classmethod
    def from_file(cls, path: str | Path, vision: VisionSpec | None = None) -> ImageProcessing:
        """Read ``preprocessor_config.json`` (``min_pixels``/``max_pixels`` or ``size``'s
        ``shortest_edge``/``longest_edge``, ``image_mean``, ``image_std``, patch fields)."""
        path = Path(path)
        if path.is_dir():
            path = path / PREPROCESSOR_FILE
        base = cls.for_vision(vision) if vision else cls()
        if not path.is_file():
            return base
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise OptionError(f"{path}: not a readable JSON preprocessor config ({exc})") from None
        if not isinstance(raw, dict):
            raise OptionError(f"{path}: expected a JSON object")
        size = raw.get("size") if isinstance(raw.get("size"), dict) else {}
        values: dict[str, Any] = {
            "min_pixels": raw.get("min_pixels", size.get("shortest_edge", size.get("min_pixels"))),
            "max_pixels": raw.get("max_pixels", size.get("longest_edge", size.get("max_pixels"))),
            "patch_size": raw.get("patch_size"),
            "temporal_patch_size": raw.get("temporal_patch_size"),
            "merge_size": raw.get("merge_size"),
            "image_mean": _triple(raw.get("image_mean"), path, "image_mean"),
            "image_std": _triple(raw.get("image_std"), path, "image_std"),
            "rescale_factor": raw.get("rescale_factor"),
        }
        values = {k: v for k, v in values.items() if v is not None}
        for key, value in values.items():
            if key in ("image_mean", "image_std", "rescale_factor"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise OptionError(f"{path}: {key}={value!r} must be a positive integer")
        return dataclasses.replace(base, **values)


def _triple(value: Any, path: Path, what: str) -> tuple[float, float, float] | None:
    if value is None:
        return None
    if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value)):
        raise OptionError(f"{path}: {what}={value!r} must be three numbers")
    return (float(value[0]), float(value[1]), float(value[2]))


@dataclasses.dataclass(frozen=True)
class ImagePatches:
    """One image (or video clip) ready for the vision encoder."""

    #: float32 [grid_t * grid_h * grid_w, C * T * P * P]
    pixel_values: np.ndarray
    #: (grid_t, grid_h, grid_w) in patches
    grid_thw: tuple[int, int, int]

    @property
    def num_patches(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w

    def num_tokens(self, merge_size: int) -> int:
        """Decoder tokens (``<|image_pad|>``) the image takes."""
        return self.num_patches // merge_size**2


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers' ``smart_resize``: both sides multiples of ``factor``, the area within
    ``[min_pixels, max_pixels]``, the aspect ratio kept as closely as possible."""
    if min(height, width) <= 0:
        raise OptionError(f"image of {width}x{height} pixels has no area")
    if max(height, width) / min(height, width) > 200:
        raise OptionError(f"image of {width}x{height} pixels: the aspect ratio must be under 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise MissingDependencyError(
            "images need Pillow: pip install 'qwen-export[vision]' (or pip install pillow)"
        ) from None
    return Image


def load_image(source: Any) -> Any:
    """A PIL image in RGB (transparency composited onto white, as transformers does) from a local
    path, a ``data:image/...;base64,`` URL, encoded bytes, a PIL image or an HxWx3 uint8 array.
    Remote URLs are refused: the runtime never fetches."""
    image_mod = _pil()
    if isinstance(source, image_mod.Image):
        image = source
    elif isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 3 or source.shape[2] not in (3, 4):
            raise OptionError(f"an image array must be HxWx3 (or x4) uint8, got {source.dtype} {source.shape}")
        image = image_mod.fromarray(source)
    else:
        image = _decode(image_mod, _image_bytes(source))
    return _to_rgb(image_mod, image)


def _image_bytes(source: Any) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    elif isinstance(source, (str, Path)) and str(source).startswith("data:"):
        header, _, payload = str(source).partition(",")
        if ";base64" not in header or not header[5:].startswith("image/"):
            raise OptionError("an image data URL must be data:image/<type>;base64,<data>")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise OptionError("the image data URL's base64 payload is invalid") from None
    elif isinstance(source, (str, Path)):
        text = str(source)
        if text.startswith(("http://", "https://")):
            raise OptionError(f"{text}: remote images are not fetched; download it and pass the file or a data URL")
        path = Path(text).expanduser()
        if not path.is_file():
            raise OptionError(f"{path}: image file not found")
        if path.stat().st_size > MAX_IMAGE_BYTES:
            raise OptionError(f"{path}: image file over {MAX_IMAGE_BYTES >> 20} MiB")
        data = path.read_bytes()
    else:
        raise OptionError(
            f"an image must be a path, a data URL, bytes, a PIL image or an array, not {type(source).__name__}"
        )
    if len(data) > MAX_IMAGE_BYTES:
        raise OptionError(f"image over {MAX_IMAGE_BYTES >> 20} MiB")
    return data


def _decode(image_mod: Any, data: bytes) -> Any:
    try:
        image = image_mod.open(io.BytesIO(data))
        if image.width * image.height > MAX_SOURCE_PIXELS:
            raise OptionError(f"image of {image.width}x{image.height} pixels is over the {MAX_SOURCE_PIXELS} limit")
        image.load()
    except OptionError:
        raise
    except (OSError, ValueError, SyntaxError, image_mod.DecompressionBombError) as exc:
        raise OptionError(f"cannot decode the image ({type(exc).__name__}: {exc})") from None
    return image


def _to_rgb(image_mod: Any, image: Any) -> Any:
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = image_mod.new("RGBA", rgba.size, (255, 255, 255, 255))
        return image_mod.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def preprocess_image(source: Any, processing: ImageProcessing) -> ImagePatches:
    """The patches of one image, as transformers' Qwen2-VL image processor makes them."""
    image_mod = _pil()
    image = load_image(source)
    height, width = smart_resize(
        image.height, image.width, processing.factor, processing.min_pixels, processing.max_pixels
    )
    resized = np.asarray(image.resize((width, height), resample=image_mod.Resampling.BICUBIC))
    chw = np.moveaxis(resized, -1, 0)
    scaled = (chw.astype(np.float64) * processing.rescale_factor).astype(np.float32)
    mean = np.asarray(processing.image_mean, dtype=np.float32)
    std = np.asarray(processing.image_std, dtype=np.float32)
    normalized = ((scaled.T - mean) / std).T
    return ImagePatches(*_patchify(normalized, processing))


def _patchify(image: np.ndarray, p: ImageProcessing) -> tuple[np.ndarray, tuple[int, int, int]]:
    channels, height, width = image.shape
    grid_h, grid_w, m, size = height // p.patch_size, width // p.patch_size, p.merge_size, p.patch_size
    patches = image.reshape(channels, grid_h // m, m, size, grid_w // m, m, size)
    patches = np.transpose(patches, (1, 4, 2, 5, 0, 3, 6))
    patches = np.broadcast_to(
        patches[:, :, :, :, :, None, :, :],
        (*patches.shape[:5], p.temporal_patch_size, *patches.shape[5:]),
    )
    flat = np.ascontiguousarray(patches.reshape(grid_h * grid_w, channels * p.temporal_patch_size * size * size))
    return flat, (1, grid_h, grid_w)


def vision_position_ids(grid_thw: tuple[int, int, int], merge_size: int) -> np.ndarray:
    """int64 [t*h*w, 2]: each patch's (row, column) in its frame, in the processor's block-major
    order (``merge_size`` x ``merge_size`` blocks), repeated per frame."""
    t, h, w = grid_thw
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge_size, merge_size, w // merge_size, merge_size)
    rows = rows.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    cols = cols.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    return np.tile(np.stack([rows, cols], axis=-1), (t, 1)).astype(np.int64)


def window_layout(grid_thw: tuple[int, int, int], vision: VisionSpec) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5-VL's attention windows for one frame grid: ``order`` (int64 [merged tokens]), the
    merged tokens in window order (transformers' ``window_index``), and ``window_ids`` (int64
    [patches]) the window of each patch in that order. Windows are ``window_size`` pixels square,
    counted from the top left, cut short at the right and bottom edges."""
    t, h, w = grid_thw
    m = vision.spatial_merge_size
    side = vision.window_size // m // vision.patch_size
    llm_h, llm_w = h // m, w // m
    index = np.arange(t * llm_h * llm_w).reshape(t, llm_h, llm_w)
    pad_h, pad_w = side - llm_h % side, side - llm_w % side
    n_h, n_w = (llm_h + pad_h) // side, (llm_w + pad_w) // side
    padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-100)
    padded = padded.reshape(t, n_h, side, n_w, side).transpose(0, 1, 3, 2, 4).reshape(t, n_h * n_w, side * side)
    sizes = (padded != -100).sum(axis=-1).reshape(-1)
    order = padded.reshape(-1)
    order = order[order != -100].astype(np.int64)
    window_of_token = np.repeat(np.arange(sizes.size), sizes)
    window_ids = np.repeat(window_of_token, vision.merge_unit).astype(np.int64)
    return order, window_ids


def encoder_feeds(patches: ImagePatches, vision: VisionSpec) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The vision graph's inputs for one image (``qwen_export.export.vision_modeling``'s IO), and
    for Qwen2.5-VL the order that puts its output rows back (None: already in order)."""
    t, h, w = patches.grid_thw
    positions = vision_position_ids(patches.grid_thw, vision.spatial_merge_size)
    segments = np.repeat(np.arange(t, dtype=np.int64), h * w)
    pixels = patches.pixel_values
    if patches.pixel_values.shape != (t * h * w, vision.patch_dim):
        raise OptionError(
            f"pixel_values of shape {patches.pixel_values.shape} do not match grid {patches.grid_thw} "
            f"and {vision.patch_dim} values per patch"
        )
    if not vision.windowed:
        return {"pixel_values": pixels, "position_ids": positions, "segment_ids": segments}, None
    order, window_ids = window_layout(patches.grid_thw, vision)
    unit = vision.merge_unit
    rows = (order[:, None] * unit + np.arange(unit)[None, :]).reshape(-1)
    feeds = {
        "pixel_values": np.ascontiguousarray(pixels[rows]),
        "position_ids": np.ascontiguousarray(positions[rows]),
        "segment_ids": segments[rows],
        **window_slots(window_ids, vision.window_patches),
        "window_ids": window_ids,  # the dense-mask towers of artifacts made before window_slots
    }
    return feeds, np.argsort(order)


def window_slots(window_ids: np.ndarray, width: int) -> dict[str, np.ndarray]:
    """The windowed blocks' inputs from each patch's window (``window_ids``, non-decreasing):
    ``window_slots`` [windows, width] (the patch in each slot, 0 in a padding slot),
    ``window_mask`` [windows, width] float32 (0, or the most negative float for padding) and
    ``window_rows`` [patches] (each patch's slot, row-major)."""
    _, dense = np.unique(window_ids, return_inverse=True)  # windows cut away at the edges hold none
    count = int(dense[-1]) + 1 if dense.size else 0
    starts = np.searchsorted(dense, np.arange(count))
    offsets = np.arange(dense.size) - starts[dense]
    if offsets.size and int(offsets.max()) >= width:
        raise OptionError(f"an attention window holds more than {width} patches")
    rows = (dense * width + offsets).astype(np.int64)
    slots = np.zeros(count * width, dtype=np.int64)
    slots[rows] = np.arange(window_ids.size)
    mask = np.full(count * width, np.finfo(np.float32).min, dtype=np.float32)
    mask[rows] = 0.0
    return {
        "window_slots": slots.reshape(count, width),
        "window_mask": mask.reshape(count, width),
        "window_rows": rows,
    }
