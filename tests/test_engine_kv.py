"""The ONNX Runtime engine's two KV layouts: shared in-place buffer (fused) and concat (unfused)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from conftest import ModuleScratch
from noise import Noise, check_logits

from qwen_export.errors import GenerationError
from qwen_export.export.pipeline import ExportOptions
from qwen_export.export.pipeline import export as run_export
from qwen_export.runtime.loader import open_artifact


def _left_padded(vocab: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    ids = rng.integers(0, min(vocab, 151643), (2, 9)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    ids[1, :4] = 151643
    return ids, mask


def test_fused_artifact_decodes_in_place(export) -> None:
    loaded = open_artifact(export("qwen2_tied"))
    engine = loaded.engine
    assert loaded.manifest.extra["kv_cache"]["layout"] == "shared" and engine.shared_kv
    engine.forward(np.array([[1, 2, 3, 4]], np.int64))
    buffers = [value.data_ptr() for _, value in engine._buffers]
    for token in (5, 6, 7):
        engine.forward(np.array([[token]], np.int64))
        # the present outputs ORT returns are the very buffers bound as the pasts: no cache copy
        presents = engine._binding.get_outputs()[1:]
        assert [p.data_ptr() for p in presents] == buffers
    assert [value.data_ptr() for _, value in engine._buffers] == buffers
    assert engine.num_cached_tokens == 7
    engine.reset()
    engine.forward(np.array([[1]], np.int64))
    assert [value.data_ptr() for _, value in engine._buffers] == buffers  # reused after reset


def test_unfused_artifact_matches_fused(export) -> None:
    fused = open_artifact(export("qwen2_tied")).engine
    unfused_loaded = open_artifact(export("qwen2_tied", fuse=False))
    unfused = unfused_loaded.engine
    assert unfused_loaded.manifest.extra["kv_cache"]["layout"] == "concat" and not unfused.shared_kv
    assert [p["name"] for p in unfused_loaded.manifest.passes] == ["cleanup"]
    ids, mask = _left_padded(fused.spec.vocab_size)
    a, b = fused.forward(ids, mask), unfused.forward(ids, mask)
    check_logits(a[:, -1], b[:, -1], Noise.CROSS)
    for _ in range(6):
        token = a[:, -1].argmax(-1)[:, None].astype(np.int64)
        a, b = fused.forward(token), unfused.forward(token)
        check_logits(a[:, -1], b[:, -1], Noise.CROSS)
    # truncate in the shared layout forgets columns; refeeding gives the same logits again
    fused.truncate(9)
    unfused.truncate(9)
    token = np.array([[11], [12]], np.int64)
    check_logits(fused.forward(token)[:, -1], unfused.forward(token)[:, -1], Noise.CROSS)


@pytest.fixture(scope="module")
def small_capacity(qwen2_tied: Path, module_scratch: ModuleScratch) -> Path:
    out = module_scratch.mkdir("capacity") / "artifact"
    run_export(qwen2_tied, out, ExportOptions(max_length=16))
    return out


def test_capacity_overflow_is_refused(small_capacity: Path) -> None:
    loaded = open_artifact(small_capacity)
    engine = loaded.engine
    assert loaded.manifest.extra["kv_cache"] == {"layout": "shared", "capacity": 16, "bytes_per_token": 512}
    engine.forward(np.arange(1, 11, dtype=np.int64)[None])
    with pytest.raises(
        GenerationError,
        match=r"17 tokens exceed the artifact.s context of 16; re-export with a larger --max-length",
    ):
        engine.forward(np.arange(1, 8, dtype=np.int64)[None])
    assert engine.num_cached_tokens == 10  # the refused step changed nothing
    engine.forward(np.arange(1, 7, dtype=np.int64)[None])  # exactly full is fine
    assert engine.num_cached_tokens == 16


def test_batch_size_change_reallocates(small_capacity: Path) -> None:
    engine = open_artifact(small_capacity).engine
    engine.forward(np.array([[1, 2]], np.int64))
    with pytest.raises(GenerationError, match="batch size changed"):
        engine.forward(np.array([[1], [2]], np.int64))
    engine.reset()
    out = engine.forward(np.array([[1, 2], [3, 4]], np.int64))
    assert out.shape[0] == 2 and engine._buffers[0][0].shape == (2, 2, 16, 16)


def test_decode_steps_keep_the_kv_bound_across_growth(export) -> None:
    """A decode step re-binds its few inputs, not the 2 x layers shared buffers, until the buffers
    grow; the logits stay those of an engine whose buffers never grew."""
    path = export("qwen2_tied")
    engine = open_artifact(path).engine
    engine.options = dataclasses.replace(engine.options, kv_step=4)
    reference = open_artifact(path).engine
    bound: list[str] = []
    binding = engine._binding
    bind = binding.bind_ortvalue_input
    binding.bind_ortvalue_input = lambda name, value: (bound.append(name), bind(name, value))[1]
    prompt = np.array([[1, 2, 3]], np.int64)
    a, b = engine.forward(prompt), reference.forward(prompt)
    pasts = 2 * engine.spec.num_hidden_layers
    assert engine.kv_capacity == 4 and sum(n.startswith("past_key_values.") for n in bound) == pasts
    for step in range(6):
        bound.clear()
        capacity = engine.kv_capacity
        token = a[:, -1].argmax(-1)[:, None].astype(np.int64)
        a, b = engine.forward(token), reference.forward(token)
        check_logits(a[:, -1], b[:, -1], Noise.REORDERED)
        rebound = sum(n.startswith("past_key_values.") for n in bound)
        assert rebound == (pasts if engine.kv_capacity > capacity else 0), (step, capacity, rebound)
    assert engine.kv_capacity == 16  # grew twice: 4 -> 8 -> 16
