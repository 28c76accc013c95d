"""Class 8 of issue 20: safetensors files are held to the format's own rules, as the ``safetensors``
library enforces them: tensors tile the data buffer exactly (no overlap or aliasing, no gap, no
trailing bytes), no duplicate names, ``__metadata__`` maps strings to strings.

Every case is checked against the library itself, so the two agree on what is a safetensors file.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file
from test_artifact_files import assert_cli_error, run_cli

from qwen_export.errors import CheckpointError
from qwen_export.export.checkpoint import read_header


def _raw(path: Path, header: str, data: bytes) -> Path:
    encoded = header.encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


def _entry(offsets: tuple[int, int], shape: tuple[int, ...] = (2,)) -> dict:
    return {"dtype": "F32", "shape": list(shape), "data_offsets": list(offsets)}


DATA = np.arange(4, dtype=np.float32).tobytes()  # 16 bytes: room for two [2] float32 tensors

CASES = {
    "aliased": ({"a": _entry((0, 8)), "b": _entry((0, 8))}, DATA[:8], "overlaps"),
    "overlap": ({"a": _entry((0, 8)), "b": _entry((4, 12))}, DATA[:12], "overlaps"),
    "gap": ({"a": _entry((0, 8)), "b": _entry((12, 20))}, DATA + DATA[:4], "gap"),
    "trailing": ({"a": _entry((0, 8)), "b": _entry((8, 16))}, DATA + b"\0" * 8, "after the last tensor"),
    "not-from-zero": ({"a": _entry((8, 16))}, DATA, "gap"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_layout_violations_are_refused_like_the_library(tmp_path: Path, case: str) -> None:
    header, data, fragment = CASES[case]
    path = _raw(tmp_path / "model.safetensors", json.dumps(header), data)
    with pytest.raises(SafetensorError):
        load_file(path)
    with pytest.raises(CheckpointError, match=fragment):
        read_header(path)


def test_duplicate_names_and_bad_metadata(tmp_path: Path) -> None:
    duplicate = '{"a": ' + json.dumps(_entry((0, 8))) + ', "a": ' + json.dumps(_entry((8, 16))) + "}"
    with pytest.raises(CheckpointError, match="appears twice"):
        read_header(_raw(tmp_path / "dup.safetensors", duplicate, DATA))
    header = json.dumps({"__metadata__": {"format": 1}, "a": _entry((0, 8)), "b": _entry((8, 16))})
    path = _raw(tmp_path / "meta.safetensors", header, DATA)
    with pytest.raises(SafetensorError):
        load_file(path)
    with pytest.raises(CheckpointError, match="__metadata__"):
        read_header(path)


def test_library_written_files_pass(tmp_path: Path) -> None:
    tensors = {"b": np.ones((3, 2), np.float32), "a": np.zeros(5, np.float16), "empty": np.zeros(0, np.float32)}
    save_file(tensors, tmp_path / "ok.safetensors", metadata={"format": "pt"})
    infos = read_header(tmp_path / "ok.safetensors")
    assert sorted(infos) == ["a", "b", "empty"]
    assert infos["b"].shape == (3, 2)


def test_aliased_checkpoint_through_the_cli(qwen2_tied: Path, tmp_path: Path) -> None:
    """Two weights of the real tiny checkpoint made to share bytes (sizes still consistent)."""
    ckpt = shutil.copytree(qwen2_tied, tmp_path / "ckpt")
    path = ckpt / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    a = "model.layers.0.mlp.gate_proj.weight"
    b = "model.layers.0.mlp.up_proj.weight"
    header[b]["data_offsets"] = header[a]["data_offsets"]
    encoded = json.dumps(header).encode()  # data offsets are relative to the end of the header
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + n :])
    proc = run_cli("export", ckpt, "-o", tmp_path / "out", timeout=120)
    assert_cli_error(proc, "not a valid safetensors file")
    assert not (tmp_path / "out").exists()
