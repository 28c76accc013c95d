"""Checkpoint: lazy safetensors reading, validation against the spec, clear errors on corruption."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch

from qwen_export.errors import CheckpointError
from qwen_export.export.checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint, expected_tensors


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name))


def _rewrite(path: Path, edit) -> None:
    """Load a safetensors file (fp32 only), apply ``edit`` to the dict, save it back."""
    tensors = safetensors.numpy.load_file(str(path))
    edit(tensors)
    safetensors.numpy.save_file(tensors, str(path))


# ---------------------------------------------------------------------- reading
def test_single_file_matches_torch(qwen2_tied: Path) -> None:
    ckpt = Checkpoint.open(qwen2_tied)
    ckpt.validate()
    ref = safetensors.torch.load_file(str(qwen2_tied / SINGLE_FILE))
    assert ckpt.names() == sorted(ref)
    assert "lm_head.weight" not in ckpt  # tied: not stored
    assert set(ckpt.names()) == set(expected_tensors(ckpt.spec))
    for name, tensor in ref.items():
        assert ckpt.shape(name) == tuple(tensor.shape)
        assert ckpt.dtype(name) == "F32"
        got = ckpt.read(name)
        assert got.dtype == np.float32 and got.flags.writeable
        np.testing.assert_array_equal(got, tensor.numpy())
    assert ckpt.files == [qwen2_tied / SINGLE_FILE]


def test_untied_has_lm_head(qwen2_untied: Path) -> None:
    ckpt = Checkpoint.open(qwen2_untied)
    ckpt.validate()
    assert ckpt.shape("lm_head.weight") == (151936, 64)
    assert "lm_head.weight" in expected_tensors(ckpt.spec)


def test_sharded_bf16_reads_exact_float32(qwen2_yarn_bf16_sharded: Path) -> None:
    ckpt = Checkpoint.open(qwen2_yarn_bf16_sharded)
    ckpt.validate()
    assert len(ckpt.files) > 1
    ref: dict = {}
    for f in ckpt.files:
        ref.update(safetensors.torch.load_file(str(f)))
    assert ckpt.names() == sorted(ref)
    for name, tensor in ref.items():
        assert ckpt.dtype(name) == "BF16"
        got = ckpt.read(name)
        assert got.dtype == np.float32 and got.shape == tuple(tensor.shape)
        np.testing.assert_array_equal(got, tensor.float().numpy())


def test_qwen3_names_and_head_dim(qwen3: Path) -> None:
    ckpt = Checkpoint.open(qwen3)
    ckpt.validate()
    assert ckpt.shape("model.layers.0.self_attn.q_norm.weight") == (32,)
    assert ckpt.shape("model.layers.1.self_attn.q_proj.weight") == (128, 64)  # 4 heads x 32
    assert ckpt.shape("model.layers.1.self_attn.k_proj.weight") == (64, 64)  # 2 kv heads x 32
    assert ckpt.shape("model.layers.1.self_attn.o_proj.weight") == (64, 128)
    assert not any(n.endswith(".bias") for n in ckpt.names())


def test_expect_and_unknown_name(qwen2_tied: Path) -> None:
    ckpt = Checkpoint.open(qwen2_tied)
    assert ckpt.expect("model.norm.weight", (64,)).shape == (64,)
    with pytest.raises(
        CheckpointError,
        match=r"tensor model\.norm\.weight in .*model\.safetensors has shape \[64\], "
        r"expected \[32\]",
    ):
        ckpt.expect("model.norm.weight", (32,))
    with pytest.raises(CheckpointError, match="no tensor nope"):
        ckpt.read("nope")


# ---------------------------------------------------------------------- validation
def test_wrong_shape_in_rewritten_file(qwen2_tied: Path, tmp_path: Path) -> None:
    d = _copy(qwen2_tied, tmp_path)
    _rewrite(d / SINGLE_FILE, lambda t: t.update({"model.layers.1.mlp.up_proj.weight": np.zeros((64, 128), "f4")}))
    ckpt = Checkpoint.open(d)
    with pytest.raises(CheckpointError) as err:
        ckpt.validate()
    msg = str(err.value)
    assert "model.layers.1.mlp.up_proj.weight" in msg and str(d / SINGLE_FILE) in msg
    assert "[64, 128], expected [128, 64]" in msg


def test_missing_and_unexpected_tensors(qwen2_tied: Path, tmp_path: Path) -> None:
    d = _copy(qwen2_tied, tmp_path)

    def edit(t: dict) -> None:
        for name in [n for n in t if n.startswith("model.layers.1.")]:
            del t[name]
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, "f4")  # harmless
        t["model.layers.0.mlp.gate_proj.qweight"] = np.ones(8, "f4")

    _rewrite(d / SINGLE_FILE, edit)
    with pytest.raises(CheckpointError) as err:
        Checkpoint.open(d).validate()
    msg = str(err.value)
    assert "missing 12 expected tensor(s): model.layers.1." in msg and "(12 in all)" in msg
    assert "1 unexpected tensor(s)" in msg and "gate_proj.qweight" in msg and "inv_freq" not in msg


def test_tied_checkpoint_may_store_lm_head(qwen2_tied: Path, tmp_path: Path) -> None:
    d = _copy(qwen2_tied, tmp_path)
    _rewrite(d / SINGLE_FILE, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
    Checkpoint.open(d).validate()
    _rewrite(d / SINGLE_FILE, lambda t: t.update({"lm_head.weight": np.zeros((3, 64), "f4")}))
    with pytest.raises(CheckpointError, match=r"lm_head\.weight .* has shape \[3, 64\], expected \[151936, 64\]"):
        Checkpoint.open(d).validate()


def test_integer_weights_refused(qwen2_tied: Path, tmp_path: Path) -> None:
    d = _copy(qwen2_tied, tmp_path)
    _rewrite(d / SINGLE_FILE, lambda t: t.update({"model.norm.weight": np.ones(64, "i1")}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight .* has dtype I8"):
        Checkpoint.open(d).validate()


# ---------------------------------------------------------------------- corruption
def test_truncated_file(qwen2_tied: Path, tmp_path: Path) -> None:
    d = _copy(qwen2_tied, tmp_path)
    path = d / SINGLE_FILE
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))} is truncated: tensor \S+ ends at byte"):
        Checkpoint.open(d)


def test_header_length_past_end(qwen2_tied: Path, tmp_path: Path) -> None:
    d = _copy(qwen2_tied, tmp_path)
    path = d / SINGLE_FILE
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(data)) + data[8:])
    with pytest.raises(
        CheckpointError, match=rf"{re.escape(str(path))} is truncated or not a safetensors file: header length"
    ):
        Checkpoint.open(d)
    path.write_bytes(b"abc")
    with pytest.raises(
        CheckpointError, match=rf"{re.escape(str(path))} is truncated or not a safetensors file \(3 bytes\)"
    ):
        Checkpoint.open(d)


def test_corrupt_header_json(qwen2_tied: Path, tmp_path: Path) -> None:
    d = _copy(qwen2_tied, tmp_path)
    path = d / SINGLE_FILE
    header = b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}'
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(CheckpointError, match=r"corrupt header entry for tensor a: .* needs 16 bytes"):
        Checkpoint.open(d)
    path.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))} has a corrupt safetensors header"):
        Checkpoint.open(d)


def test_missing_shard(qwen2_yarn_bf16_sharded: Path, tmp_path: Path) -> None:
    d = _copy(qwen2_yarn_bf16_sharded, tmp_path)
    weight_map = json.loads((d / INDEX_FILE).read_text())["weight_map"]
    shard = weight_map["model.norm.weight"]
    (d / shard).unlink()
    with pytest.raises(
        CheckpointError, match=rf"shard {re.escape(str(shard))} named in {re.escape(str(d / INDEX_FILE))} is missing"
    ):
        Checkpoint.open(d)


def test_index_names_absent_tensor(qwen2_yarn_bf16_sharded: Path, tmp_path: Path) -> None:
    d = _copy(qwen2_yarn_bf16_sharded, tmp_path)
    index = json.loads((d / INDEX_FILE).read_text())
    shard = index["weight_map"]["model.norm.weight"]
    index["weight_map"]["model.layers.7.mlp.up_proj.weight"] = shard
    (d / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError, match=rf"maps tensor model\.layers\.7\.mlp\.up_proj\.weight to {re.escape(str(shard))}, but"
    ):
        Checkpoint.open(d)


def test_pickle_only_refused(qwen2_tied: Path, tmp_path: Path) -> None:
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(qwen2_tied / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError) as err:
        Checkpoint.open(d)
    msg = str(err.value)
    assert "pytorch_model.bin" in msg and "pickle" in msg and "refused for safety" in msg
    assert "safe_serialization=True" in msg and "\n" not in msg


def test_no_weights(qwen2_tied: Path, tmp_path: Path) -> None:
    d = tmp_path / "empty"
    d.mkdir()
    shutil.copy(qwen2_tied / "config.json", d)
    with pytest.raises(CheckpointError, match="has no weights: expected model.safetensors"):
        Checkpoint.open(d)
    (d / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="adapter_model.safetensors but neither"):
        Checkpoint.open(d)
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        Checkpoint.open(tmp_path / "absent")
