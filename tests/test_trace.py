"""Tracing: canonical IO, lazy binding, and layer replication equal to a full trace."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from qwen_export.errors import CheckpointError
from qwen_export.export.checkpoint import Checkpoint
from qwen_export.export.trace import TraceOptions, bind_weights, input_names, output_names, trace
from qwen_export.onnx_writer import write_onnx
from qwen_export.passes.base import op_histogram
from qwen_export.passes.cleanup import CleanupPass
from qwen_export.spec import LayerType, LogitsMode


def _build(checkpoint: Path, out: Path, replicate: bool, prune: bool = True) -> tuple[ort.InferenceSession, dict]:
    ckpt = Checkpoint.open(checkpoint)
    model = trace(ckpt.spec, TraceOptions(replicate_layers=replicate, prune_last_layer=prune))
    bind_weights(model, ckpt.spec, ckpt)
    CleanupPass()(model)
    out.mkdir()
    write_onnx(model, out, "model.onnx", "model.onnx.data")
    return ort.InferenceSession(str(out / "model.onnx")), dict(op_histogram(model))


def _feeds(spec, batch: int = 2, past: int = 9, seq: int = 5, rows: tuple[int, ...] = (-1,)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": rng.integers(0, 151643, (batch, seq)).astype(np.int64),
        "attention_mask": np.ones((batch, past + seq), np.int64),
        "position_ids": np.tile(np.arange(past, past + seq), (batch, 1)).astype(np.int64),
        "logits_indices": np.asarray(rows, np.int64),  # LogitsMode.LAST: the positions given logits
    }
    feeds["attention_mask"][1, :3] = 0  # left padding in row 1
    for i in range(spec.num_hidden_layers):
        for kind in ("key", "value"):
            shape = (batch, spec.num_key_value_heads, past, spec.head_dim)
            feeds[f"past_key_values.{i}.{kind}"] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def test_replicated_layers_equal_a_full_trace(qwen2_sliding: Path, tmp_path: Path) -> None:
    spec = Checkpoint.open(qwen2_sliding).spec
    assert spec.layer_types == (LayerType.FULL, LayerType.SLIDING, LayerType.SLIDING)
    fast, fast_ops = _build(qwen2_sliding, tmp_path / "replicated", replicate=True)
    slow, slow_ops = _build(qwen2_sliding, tmp_path / "full", replicate=False)
    assert fast_ops == slow_ops
    assert [i.name for i in fast.get_inputs()] == input_names(spec)
    assert [o.name for o in fast.get_outputs()] == output_names(spec)
    feeds = _feeds(spec, rows=(1, -1))
    for a, b, name in zip(fast.run(None, feeds), slow.run(None, feeds), output_names(spec), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.parametrize("fixture", ["qwen2_sliding", "qwen2_tied"])
def test_pruned_last_layer_gives_the_same_logits_and_cache(fixture: str, request, tmp_path: Path) -> None:
    """LogitsMode.LAST: the last layer's o_proj/MLP run on the ``logits_indices`` tokens only
    (its hidden state is [B, K, H]), the logits of those rows and every present are unchanged."""
    checkpoint = request.getfixturevalue(fixture)
    spec = Checkpoint.open(checkpoint).spec
    pruned, pruned_ops = _build(checkpoint, tmp_path / "pruned", replicate=True)
    full, full_ops = _build(checkpoint, tmp_path / "full", replicate=True, prune=False)
    assert pruned_ops["MatMul"] == full_ops["MatMul"]
    assert pruned_ops["Gather"] == full_ops["Gather"] + 1  # o_proj input and residual, not the final rows
    for rows in [(-1,), (0, 2, -1)]:
        feeds = _feeds(spec, rows=rows)
        got = pruned.run(None, feeds)
        assert got[0].shape[:2] == (2, len(rows))  # logits [B, K, V]
        for a, b, name in zip(got, full.run(None, feeds), output_names(spec), strict=True):
            assert a.shape == b.shape, name
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)

    model = trace(spec, TraceOptions())
    last = spec.num_hidden_layers - 1
    down = next(
        n
        for n in model.graph
        if n.op_type == "MatMul" and n.inputs[1].name == f"model.layers.{last}.mlp.down_proj.weight_t"
    )
    first = next(
        n for n in model.graph if n.op_type == "MatMul" and n.inputs[1].name == "model.layers.0.mlp.down_proj.weight_t"
    )
    assert down.outputs[0].shape[1] != first.outputs[0].shape[1], (down.outputs[0].shape, first.outputs[0].shape)


def test_wrong_shaped_tensor_is_named_when_written(qwen2_tied: Path, tmp_path: Path) -> None:
    ckpt = Checkpoint.open(qwen2_tied)
    model = trace(ckpt.spec, TraceOptions())

    class Lying:
        def read(self, name):
            return ckpt.read(name)[:-1] if name == "model.norm.weight" else ckpt.read(name)

        def read_rows(self, name, start, stop):
            return ckpt.read_rows(name, start, stop)

        def shape(self, name):
            shape = ckpt.shape(name)
            return (shape[0] - 1, *shape[1:]) if name == "model.layers.1.mlp.up_proj.weight" else shape

    bind_weights(model, ckpt.spec, Lying())
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        model.graph.initializers["model.norm.weight"].const_value.numpy()
    (tmp_path / "o").mkdir()
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        write_onnx(model, tmp_path / "o", "model.onnx", "model.onnx.data")


def test_traced_graph_is_memoised_and_each_call_gets_its_own_copy(qwen2_tied: Path) -> None:
    """The memo returns a clone: a pass rewriting one copy leaves the next call's graph whole."""
    from qwen_export.export import trace as trace_module

    ckpt = Checkpoint.open(qwen2_tied)
    spec = ckpt.spec
    first = trace(spec, TraceOptions())
    assert (spec, TraceOptions()) in trace_module._traced
    before = dict(op_histogram(first))
    bind_weights(first, spec, ckpt)
    CleanupPass()(first)
    assert dict(op_histogram(first)) != before
    second = trace(spec, TraceOptions())
    assert second is not first and dict(op_histogram(second)) == before
    assert [v.name for v in second.graph.inputs] == input_names(spec)


def test_trace_cache_directory_is_shared_across_processes(
    qwen2_tied: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``QWEN_EXPORT_TRACE_CACHE`` set, a traced graph is stored there (initializers as
    placeholders, no data) and a process without it in memory reads it back instead of tracing:
    written out, the two give byte-identical models. A damaged entry is traced again."""
    from qwen_export.export import trace as trace_module

    ckpt = Checkpoint.open(qwen2_tied)
    spec, options = ckpt.spec, TraceOptions(logits=LogitsMode.ALL)
    monkeypatch.setenv(trace_module.TRACE_CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(trace_module, "_traced", trace_module.collections.OrderedDict())
    fresh = trace(spec, options)
    (entry,) = (tmp_path / "cache").iterdir()
    assert entry.name == f"{trace_module.trace_key(spec, options)}.onnx" and entry.stat().st_size < 2 << 20
    trace_module._traced.clear()

    def no_tracing(*_: object) -> None:
        raise AssertionError("traced again although the cache holds the graph")

    monkeypatch.setattr(trace_module, "_trace_fresh", no_tracing)
    cached = trace(spec, options)
    for name, model in (("fresh", fresh), ("cached", cached)):
        bind_weights(model, spec, ckpt)
        (tmp_path / name).mkdir()
        write_onnx(model, tmp_path / name, "model.onnx", "model.onnx.data")
    for file in ("model.onnx", "model.onnx.data"):
        assert (tmp_path / "fresh" / file).read_bytes() == (tmp_path / "cached" / file).read_bytes()
    entry.write_bytes(b"damaged")
    trace_module._traced.clear()
    monkeypatch.setattr(trace_module, "_trace_fresh", lambda s, o: fresh)
    assert trace(spec, options) is not fresh and entry.stat().st_size > 100  # traced (cloned) and rewritten
    assert trace_module.trace_key(spec, options) != trace_module.trace_key(spec, TraceOptions())
