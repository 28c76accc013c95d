"""Rotary, attention (GroupQueryAttention) and shared-KV-buffer passes on traced tiny Qwen graphs.

Structural: N layers fuse exactly N attentions, 2N rotaries and 2N+1 (+2N q/k) norms. Numeric: the
fused graph, run on ONNX Runtime CPU with its own graph optimizations disabled, equals the unfused
graph within 1e-4 (fp32) through a left-padded batch, a multi-token chunk after a past and decode
steps, the fused one with one preallocated buffer per layer bound as past and present. Negative: a
non-causal mask or a mismatched rotary table does not fuse (and strict mode says so).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import ModuleScratch

from qwen_export.export.checkpoint import Checkpoint
from qwen_export.export.trace import TraceOptions, bind_weights, trace
from qwen_export.onnx_writer import write_onnx
from qwen_export.passes import attention as attention_pass
from qwen_export.passes.attention import AttentionFusion, analyse_mask
from qwen_export.passes.base import FusionError, op_histogram
from qwen_export.passes.cleanup import CleanupPass
from qwen_export.passes.rmsnorm import RMSNormFusion
from qwen_export.passes.rotary import RotaryFusion
from qwen_export.spec import DType, LogitsMode
from qwen_export.targets.onnxruntime.kv_io import SharedKVBuffer

CAPACITY = 64


def _traced(request: pytest.FixtureRequest, case: str, dtype: DType) -> tuple[Any, ir.Model]:
    ckpt = Checkpoint.open(request.getfixturevalue(case))
    model = trace(ckpt.spec, TraceOptions(dtype=dtype, logits=LogitsMode.ALL))
    bind_weights(model, ckpt.spec, ckpt)
    CleanupPass()(model)
    return ckpt.spec, model


def _fuse(model: ir.Model, spec: Any, explain: Any = None) -> dict[str, Any]:
    inv, scale = spec.rope_inv_freq_and_scale()
    return {
        "rmsnorm": RMSNormFusion()(model),
        "rotary": RotaryFusion(inv, scale, CAPACITY, explain=explain)(model),
        "attention": AttentionFusion(explain=explain)(model),
        "cleanup": CleanupPass()(model),
        "kv_io": SharedKVBuffer(spec.num_hidden_layers)(model),
    }


def _built(request: pytest.FixtureRequest, scratch: ModuleScratch, case: str, dtype: DType):
    key = (case, dtype)
    if key not in scratch.cache:
        spec, model = _traced(request, case, dtype)
        root = scratch.mkdir(f"attention_{case}_{dtype.value}")
        (root / "unfused").mkdir()
        write_onnx(model, root / "unfused", "model.onnx", "model.onnx.data")
        results = _fuse(model, spec)
        (root / "fused").mkdir()
        write_onnx(model, root / "fused", "model.onnx", "model.onnx.data")
        scratch.cache[key] = {"spec": spec, "results": results, "ops": op_histogram(model), "root": root}
    return scratch.cache[key]


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _positions(mask: np.ndarray) -> np.ndarray:
    pos = np.cumsum(mask, axis=1) - 1
    pos[mask == 0] = 1
    return pos


def _run_both(built: dict[str, Any], np_dtype: type) -> float:
    """Feed both graphs: 5-token left-padded prompt, a 12-token chunk, then 4 decode steps; return
    the largest |logit| difference over non-padding positions."""
    spec = built["spec"]
    unfused = _session(built["root"] / "unfused" / "model.onnx")
    fused = _session(built["root"] / "fused" / "model.onnx")
    fused_inputs = {i.name for i in fused.get_inputs()}
    assert "position_ids" not in fused_inputs
    rng = np.random.default_rng(0)
    batch, layers = 2, spec.num_hidden_layers
    ids = rng.integers(0, spec.vocab_size, (batch, 21)).astype(np.int64)
    mask = np.ones((batch, 21), np.int64)
    mask[1, :3] = 0  # left padding on row 1
    kv = (batch, spec.num_key_value_heads)
    past = [np.zeros((*kv, 0, spec.head_dim), np_dtype) for _ in range(2 * layers)]
    shared = [np.zeros((*kv, CAPACITY, spec.head_dim), np_dtype) for _ in range(2 * layers)]
    names = [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    worst = 0.0
    for start, end in [(0, 5), (5, 17), (17, 18), (18, 19), (19, 20), (20, 21)]:
        feeds = {"input_ids": ids[:, start:end], "attention_mask": mask[:, :end]}
        a = unfused.run(
            None, {**feeds, "position_ids": _positions(mask[:, :end])[:, start:], **dict(zip(names, past, strict=True))}
        )
        b = fused.run(None, {**feeds, **dict(zip(names, shared, strict=True))})
        valid = mask[:, start:end] > 0
        assert not np.isnan(b[0]).any()
        worst = max(worst, float(np.abs(a[0].astype(np.float32) - b[0].astype(np.float32))[valid].max()))
        past, shared = a[1:], b[1:]
        assert all(p.shape[2] == CAPACITY for p in shared)
    return worst


@pytest.mark.parametrize(
    ("case", "layers", "qk_norm"), [("qwen2_tied", 2, False), ("qwen2_sliding", 3, False), ("qwen3", 2, True)]
)
def test_every_attention_rotary_and_norm_fuses(request, module_scratch, case: str, layers: int, qk_norm: bool):
    built = _built(request, module_scratch, case, DType.FP32)
    results, ops = built["results"], built["ops"]
    assert results["rotary"].fired["rotary"] == 2 * layers
    assert results["attention"].fired["group_query_attention"] == layers
    assert results["rmsnorm"].fired["rms_norm"] == 2 * layers + 1 + (2 * layers if qk_norm else 0)
    assert results["kv_io"].fired["shared_kv_buffer"] == layers
    assert ops["com.microsoft::GroupQueryAttention"] == layers
    for gone in ("Softmax", "com.microsoft::RotaryEmbedding", "Cos", "Sin", "Neg", "LessOrEqual", "Range", "Transpose"):
        assert gone not in ops, gone


def test_sliding_layers_get_their_window(request, module_scratch) -> None:
    built = _built(request, module_scratch, "qwen2_sliding", DType.FP32)
    model = ir.load(built["root"] / "fused" / "model.onnx")
    windows = [n.attributes.get_int("local_window_size", -1) for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert windows == [-1, 8, 8]  # layer 0 full attention, then two sliding layers (window 8)


@pytest.mark.parametrize("case", ["qwen2_tied", "qwen2_sliding", "qwen3"])
def test_fused_graph_matches_unfused_with_left_padding_chunks_and_decode(request, module_scratch, case: str):
    built = _built(request, module_scratch, case, DType.FP32)
    assert _run_both(built, np.float32) <= 1e-4


def test_fp16_graph_fuses_and_stays_close(request, module_scratch) -> None:
    built = _built(request, module_scratch, "qwen2_tied", DType.FP16)
    assert built["results"]["attention"].fired["group_query_attention"] == 2
    assert _run_both(built, np.float16) <= 0.15  # fp16 logits of magnitude ~20: a few fp16 ulps


# --- near misses ----------------------------------------------------------------------------------


def test_mismatched_rotary_table_does_not_fuse(request) -> None:
    spec, model = _traced(request, "qwen2_tied", DType.FP32)
    inv, scale = spec.rope_inv_freq_and_scale()
    wrong = np.asarray(inv) * 1.01  # e.g. a config whose rope_theta differs from the traced graph's
    explain = io.StringIO()
    assert RotaryFusion(wrong, scale, CAPACITY, explain=explain)(model).fired["rotary"] == 0
    assert "inverse frequencies differ" in explain.getvalue()
    with pytest.raises(FusionError, match="fused 0 rotary embeddings, expected 4"):
        RotaryFusion(wrong, scale, CAPACITY, strict_expected=4)(model)
    assert RotaryFusion(inv, scale * 2, CAPACITY)(model).fired["rotary"] == 0  # YaRN factor mismatch
    assert RotaryFusion(inv, scale, CAPACITY)(model).fired["rotary"] == 4


def _drop_causal_term(model: ir.Model) -> None:
    """Make the mask padding-only (bidirectional attention): Where(And(causal, pad)) -> Where(pad)."""
    where = next(n for n in model.graph if n.op_type == "Where" and n.outputs[0].uses())
    both = where.inputs[0].producer()
    assert both.op_type == "And"
    padding = next(v for v in both.inputs if v.producer().op_type == "Greater")
    where.replace_input_with(0, padding)


def test_non_causal_attention_does_not_fuse(request) -> None:
    spec, model = _traced(request, "qwen2_tied", DType.FP32)
    _drop_causal_term(model)
    inv, scale = spec.rope_inv_freq_and_scale()
    RMSNormFusion()(model)
    assert RotaryFusion(inv, scale, CAPACITY)(model).fired["rotary"] == 4  # rotary alone still fuses
    explain = io.StringIO()
    assert AttentionFusion(explain=explain)(model).fired["group_query_attention"] == 0
    assert "mask is not causal" in explain.getvalue()
    with pytest.raises(FusionError, match="fused 0 attentions, expected 2"):
        AttentionFusion(strict_expected=2)(model)
    with pytest.raises(FusionError, match="kv_io pass needs com.microsoft::GroupQueryAttention in the graph"):
        SharedKVBuffer(2)(model)  # its precondition: an earlier pass fused attention
    with pytest.raises(FusionError, match="cannot share the KV buffers"):
        SharedKVBuffer(2).call(model)  # the pass body alone (no pre/postconditions)
    assert SharedKVBuffer(2, strict=False)(model).changed is False


def test_mask_analysis_reports_what_it_found(request) -> None:
    _, model = _traced(request, "qwen2_sliding", DType.FP32)
    masks = [n.outputs[0] for n in model.graph if n.op_type == "Where"]
    infos = [analyse_mask(m) for m in masks]
    assert [i.window for i in infos if not isinstance(i, str)] == [None, 8]
    assert all(i.attention_mask.name == "attention_mask" for i in infos if not isinstance(i, str))
    assert analyse_mask(model.graph.inputs[0]) == "mask is not Where(condition, 0, -big)"


def test_gqa_helper_inputs_are_built_once(request, module_scratch) -> None:
    built = _built(request, module_scratch, "qwen2_sliding", DType.FP32)
    model = ir.load(built["root"] / "fused" / "model.onnx")
    gqa = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    for slot in (5, 6, 10, 16):  # seqlens_k, total_sequence_length, attention_bias, query_seqlens
        assert len({id(n.inputs[slot]) for n in gqa}) == 1, slot
    assert attention_pass.RULE in built["results"]["attention"].fired
