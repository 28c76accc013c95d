"""Multimodal rotary positions (M-RoPE) of Qwen2-VL / Qwen2.5-VL, without torch.

Every prompt token gets three positions (time, height, width). Text tokens get the same running
position in all three; the ``<|image_pad|>`` (or ``<|video_pad|>``) run of an image gets its merged
grid's coordinates offset by the position where the run starts, and the text after it continues
from that start plus the grid's longer side (in merged tokens). After the prompt every stream moves
together: a token at cache index ``i`` has position ``i + delta`` in all three, ``delta`` being the
prompt's largest position + 1 - its length (0 for a text-only prompt, where M-RoPE is plain RoPE).

The same rule as transformers' ``get_rope_index`` (its ``mm_token_type_ids`` being the pad tokens);
``tests/test_vl_vision.py`` compares the two.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from qwen_export.errors import GenerationError
from qwen_export.vision import MultimodalSpec

TEXT, IMAGE, VIDEO = 0, 1, 2


def token_types(input_ids: Sequence[int], spec: MultimodalSpec) -> np.ndarray:
    ids = np.asarray(input_ids, dtype=np.int64)
    types = np.zeros(ids.shape, dtype=np.int64)
    types[ids == spec.image_token_id] = IMAGE
    types[ids == spec.video_token_id] = VIDEO
    return types


def rope_positions(
    input_ids: Sequence[int],
    spec: MultimodalSpec,
    image_grids: Sequence[tuple[int, int, int]] = (),
    video_grids: Sequence[tuple[int, int, int]] = (),
    video_seconds_per_grid: Sequence[float] = (),
) -> tuple[np.ndarray, int]:
    """int64 [3, len(input_ids)] positions of a prompt, and its ``delta`` (see the module doc).

    ``image_grids``: each image's (t, h, w) in patches, in prompt order; every run of image pad
    tokens must hold exactly that image's merged tokens (t * h * w / merge^2)."""
    merge = spec.vision.spatial_merge_size
    grids = {IMAGE: iter(image_grids), VIDEO: iter(video_grids)}
    seconds = iter(video_seconds_per_grid)
    pieces, current = [], 0
    groups = itertools.groupby(enumerate(token_types(input_ids, spec).tolist()), key=lambda item: item[1])
    for kind, run in groups:
        run_length = len(list(run))
        if kind == TEXT:
            pieces.append(np.broadcast_to(np.arange(run_length, dtype=np.int64) + current, (3, run_length)))
            current += run_length
            continue
        grid = next(grids[kind], None)
        if grid is None:
            raise GenerationError(f"the prompt has more {'image' if kind == IMAGE else 'video'} runs than inputs")
        t, h, w = grid
        if run_length != t * h * w // merge**2:
            raise GenerationError(
                f"a run of {run_length} vision tokens does not match its grid {grid} ({t * h * w // merge**2} tokens)"
            )
        interval = spec.vision.tokens_per_second * next(seconds, 1.0) if kind == VIDEO else 1.0
        pieces.append(_grid_positions(current, grid, merge, interval))
        current += max(h, w) // merge
    positions = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), dtype=np.int64)
    delta = int(positions.max()) + 1 - positions.shape[1] if positions.size else 0
    return np.ascontiguousarray(positions), delta


def _grid_positions(start: int, grid: tuple[int, int, int], merge: int, interval: float) -> np.ndarray:
    t, h, w = grid[0], grid[1] // merge, grid[2] // merge
    time = (np.arange(t) * interval).astype(np.int64)
    tt, hh, ww = np.meshgrid(time, np.arange(h) + start, np.arange(w) + start, indexing="ij")
    positions = np.stack([tt, hh, ww]).reshape(3, -1).astype(np.int64)
    positions[0] += start
    return positions


def decode_positions(first_index: int, count: int, delta: int) -> np.ndarray:
    """int64 [3, count]: positions of ``count`` tokens after the prompt, from cache index ``first_index``."""
    return np.broadcast_to(np.arange(first_index, first_index + count, dtype=np.int64) + delta, (3, count)).copy()
