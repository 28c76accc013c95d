"""Mixture-of-experts (Qwen2-MoE, Qwen3-MoE): the config fields as transformers reads them, the
graph form (only routed tokens reach an expert), int4/int8 experts with the router kept in float,
the calibrated algorithms refused, and ``inspect``'s MoE line. Parity of every engine against
transformers (prefill + 32 decode steps, a left-padded batch) is in test_parity.py."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import pytest
from conftest import QWEN3_MOE, ModuleScratch
from typer.testing import CliRunner

from qwen_export.cli import app
from qwen_export.errors import ConfigError, OptionError
from qwen_export.export import parity
from qwen_export.export.pipeline import ExportOptions
from qwen_export.export.pipeline import export as run_export
from qwen_export.passes.base import op_histogram
from qwen_export.passes.cleanup import FOLD_SIZE_LIMIT
from qwen_export.quant.numeric import dequantize, quantize_rtn
from qwen_export.quant.scheme import QuantAlgorithm, QuantScheme, WeightFormat
from qwen_export.runtime.inspection import moe_summary
from qwen_export.runtime.loader import open_artifact
from qwen_export.spec import ModelSpec

MNB = "com.microsoft::MatMulNBits"
TOKENS = 32


def _config(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text())


# ----------------------------------------------------------------------------- config fields
def test_sparse_layers_follow_mlp_only_layers_and_decoder_sparse_step(qwen2_moe: Path, qwen3_moe: Path) -> None:
    q2 = ModelSpec.from_config_file(qwen2_moe)
    assert q2.moe is not None and q2.moe.sparse_layers == (True, False, True)  # mlp_only_layers=[1]
    assert (q2.moe.num_experts, q2.moe.top_k, q2.moe.norm_topk_prob) == (4, 2, False)
    assert q2.moe.shared_expert_intermediate_size == 48 and q2.qkv_bias and not q2.qk_norm
    q3 = ModelSpec.from_config_file(qwen3_moe)
    assert q3.moe is not None and q3.moe.sparse_layers == (False, True, False)  # decoder_sparse_step=2
    assert (q3.moe.num_experts, q3.moe.norm_topk_prob, q3.moe.has_shared_expert) == (8, True, False)
    assert q3.qk_norm
    # transformers 5 writes Qwen3-MoE's num_experts as num_local_experts; released configs say num_experts
    assert "num_local_experts" in _config(qwen3_moe)
    assert ModelSpec.from_dict(q3.to_dict()) == q3 and ModelSpec.from_dict(q2.to_dict()) == q2


@pytest.mark.parametrize(
    "change, field",
    [
        ({"use_sliding_window": True, "sliding_window": 8}, "use_sliding_window"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"mlp_only_layers": ["1"]}, "mlp_only_layers"),
        ({"decoder_sparse_step": 0}, "decoder_sparse_step"),
        ({"norm_topk_prob": "yes"}, "norm_topk_prob"),
        ({"moe_intermediate_size": -4}, "moe_intermediate_size"),
    ],
)
def test_bad_moe_fields_are_one_line_errors_naming_them(qwen3_moe: Path, change: dict[str, Any], field: str) -> None:
    raw = _config(qwen3_moe) | change
    with pytest.raises(ConfigError) as info:
        ModelSpec.from_config(raw)
    assert field in str(info.value) and "\n" not in str(info.value)


def test_active_parameters_of_the_real_qwen3_30b_a3b_shape() -> None:
    raw = dict(
        architectures=["Qwen3MoeForCausalLM"],
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        norm_topk_prob=True,
    )
    summary = moe_summary(ModelSpec.from_config(raw).to_dict())
    assert summary is not None
    # the model card: 30.5B parameters, 3.3B activated
    assert round(summary["total_params"] / 1e9, 1) == 30.5
    assert round(summary["active_params_per_token"] / 1e9, 1) == 3.4  # 3.35B: the card rounds down


# ----------------------------------------------------------------------------- graph form
def test_onnxruntime_runs_each_sparse_layer_as_one_moe_node(export) -> None:
    model = ir.load(export("qwen2_moe") / "model.onnx")
    ops = op_histogram(model)
    assert ops["com.microsoft::MoE"] == 2 and "NonZero" not in ops and "ScatterND" not in ops
    moe = model.graph.initializers["model.layers.0.mlp.experts.fc1"]
    assert moe.shape is not None and tuple(moe.shape.dims) == (4, 2 * 32, 64)  # gate/up interleaved
    assert not [name for name in model.graph.initializers if ".experts.0." in name]  # stacked, once


def test_graph_runs_each_expert_on_its_routed_tokens_only(export) -> None:
    model = ir.load(export("qwen2_moe", fuse=False) / "model.onnx")
    ops = op_histogram(model)
    experts = 2 * 4  # two sparse layers x four experts
    assert ops["NonZero"] == experts and ops["TopK"] == 2 and ops["ScatterND"] == experts
    # router, 3 per expert, the shared expert's 3 and its gate per sparse layer; dense layer 1's MLP
    matmul_weights = [v for v in model.graph.initializers if ".mlp." in v]
    assert len(matmul_weights) == 2 * (1 + 3 * 4 + 3 + 1) + 3


# ----------------------------------------------------------------------------- quantization
CASES: dict[str, tuple[str, ExportOptions]] = {
    # accuracy_level 0: float activations, so only the weights differ from transformers
    "qwen3_int4_exact": ("qwen3_moe", ExportOptions(quant=QuantScheme(WeightFormat.INT4), accuracy_level=0)),
    "qwen2_int4_exact": ("qwen2_moe", ExportOptions(quant=QuantScheme(WeightFormat.INT4), accuracy_level=0)),
    "qwen2_int4_unfused": (
        "qwen2_moe",
        ExportOptions(quant=QuantScheme(WeightFormat.INT4), accuracy_level=0, fuse=False),
    ),
    "qwen3_int8": ("qwen3_moe", ExportOptions(quant=QuantScheme(WeightFormat.INT8))),
}


@pytest.fixture(scope="module")
def quantized(request: pytest.FixtureRequest, module_scratch: ModuleScratch) -> Callable[[str], Path]:
    cache: dict[str, Path] = {}
    root = module_scratch.mkdir("moe-quantized")

    def run(case: str) -> Path:
        if case not in cache:
            fixture, options = CASES[case]
            cache[case] = root / case
            run_export(request.getfixturevalue(fixture), cache[case], options)
        return cache[case]

    return run


def _dequantized_reference(checkpoint: Path, scheme: QuantScheme, ids: list[int]) -> np.ndarray:
    """transformers' logits with every quantized weight dequantized; transformers stacks the experts
    ([E, N, K]): blocks run along K per row, as in the per-expert weights we export. The router
    and shared-expert gate stay as they are, so does a weight whose K is not a multiple of the block
    (Qwen2-MoE's shared expert down_proj, K = 48)."""
    import torch

    ref = parity.Reference(checkpoint)
    with torch.no_grad():
        for name, param in ref.model.named_parameters():
            if param.ndim < 2 or name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
                continue
            if param.shape[-1] % scheme.block_size:  # kept in float, as the quantize pass keeps it
                continue
            bits = scheme.embedding_bits if "embed_tokens" in name else scheme.bits
            rows = param.reshape(-1, param.shape[-1]).numpy()
            q = quantize_rtn(rows, bits, scheme.block_size, 1, scheme.symmetric)
            if param.shape[-2] * param.shape[-1] // scheme.block_size > FOLD_SIZE_LIMIT:  # compact scales (float16)
                q = dataclasses.replace(q, scales=q.scales.astype(np.float16).astype(q.scales.dtype))
            param.copy_(torch.from_numpy(dequantize(q)).reshape(param.shape))
    return ref.logits(ids)


def _ids(art: Path) -> list[int]:
    return open_artifact(art).tokenizer.encode(parity.DEFAULT_TEXT)[:TOKENS]


def _metrics(ref: np.ndarray, got: np.ndarray, ids: list[int]) -> dict[str, float]:
    return parity.compare_logits(ref[:-1], got[:-1], np.asarray(ids[1:]))


def test_every_expert_is_quantized_and_the_router_kept(quantized) -> None:
    art = quantized("qwen3_int8")
    ops = op_histogram(ir.load(art / "model.onnx"))
    layers, sparse = 3, 1
    # the sparse layer's 8 experts x 3 projections in one QMoE; per layer packed qkv + o, the dense
    # layers' gate/up/down and the lm_head as MatMulNBits
    assert ops["com.microsoft::QMoE"] == sparse
    assert ops[MNB] == 2 * layers + 3 * (layers - sparse) + 1
    manifest = json.loads((art / "manifest.json").read_text())
    fired = {p["name"]: p["fired"] for p in manifest["passes"]}
    assert fired["quantize"]["linear"] == 2 * layers + 3 * (layers - sparse) + 8 * 3 * sparse
    assert fired["quantize"]["kept"] == 1  # the router of the one sparse layer
    assert fired["moe"] == {"moe": 0, "qmoe": 1, "kept": 0}
    assert "model.layers.1.mlp.gate.weight_t" in json.dumps(manifest)


@pytest.mark.parametrize("case", ["qwen3_int4_exact", "qwen2_int4_exact", "qwen2_int4_unfused"])
def test_int4_experts_equal_their_dequantized_weights(quantized, request: pytest.FixtureRequest, case: str) -> None:
    """QMoE (fused; Qwen2-MoE: no renormalisation, its output rescaled) and the per-expert
    MatMulNBits of the traced form (unfused) both equal transformers on the dequantized weights."""
    art = quantized(case)
    fixture, options = CASES[case]
    ops = op_histogram(ir.load(art / "model.onnx"))
    assert ("com.microsoft::QMoE" in ops) is options.fuse
    ids = _ids(art)
    reference = _dequantized_reference(request.getfixturevalue(fixture), options.quant, ids)  # type: ignore[arg-type]
    m = _metrics(reference, parity.artifact_logits(open_artifact(art).engine, ids), ids)
    assert m["max_abs"] < 2e-3 and m["top1"] == 1.0 and m["mean_kl"] < 1e-6, m


def test_compact_scales_reach_qmoe(quantized, qwen3_moe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Experts whose MatMulNBits scales are compact (float16 read through a Cast, as real-size experts'
    are; forced here on the tiny model) still become one QMoE, with the same logits up to float16's
    rounding of the scales."""
    from qwen_export.targets.onnxruntime import lowered

    monkeypatch.setattr(lowered, "FOLD_SIZE_LIMIT", 0)
    _, options = CASES["qwen3_int4_exact"]
    run_export(qwen3_moe, tmp_path / "compact", options)
    manifest = json.loads((tmp_path / "compact" / "manifest.json").read_text())
    fired = {p["name"]: p["fired"] for p in manifest["passes"]}
    assert fired["moe"]["qmoe"] == 1 and fired["matmulnbits"]["compact_scale_values"] > 0
    ids = _ids(tmp_path / "compact")
    plain = parity.artifact_logits(open_artifact(quantized("qwen3_int4_exact")).engine, ids)
    m = _metrics(plain, parity.artifact_logits(open_artifact(tmp_path / "compact").engine, ids), ids)
    assert m["top1"] == 1.0 and m["mean_kl"] < 1e-4, m


def test_int8_close_to_fp32(quantized, export) -> None:
    art = quantized("qwen3_int8")
    ids = _ids(art)
    fp32 = parity.artifact_logits(open_artifact(export("qwen3_moe")).engine, ids)
    m = _metrics(fp32, parity.artifact_logits(open_artifact(art).engine, ids), ids)
    # the dense tiny models' bound (test_pass_quantize): a 64-wide random model with int8 activations
    assert m["mean_kl"] < 0.03 and m["top1"] >= 0.8, m


@pytest.mark.parametrize("algorithm", ["gptq", "awq"])
def test_calibrated_algorithms_are_refused(qwen3_moe: Path, tmp_path: Path, algorithm: str) -> None:
    options = ExportOptions(quant=QuantScheme(WeightFormat.INT4, algorithm=QuantAlgorithm(algorithm)))
    with pytest.raises(OptionError, match="not built for mixture-of-experts"):
        run_export(qwen3_moe, tmp_path / "out", options)
    assert not (tmp_path / "out").exists()


def test_int4_default_is_rtn_for_moe(qwen3_moe: Path) -> None:
    from qwen_export.export.options import export_options

    options = export_options(qwen3_moe, weights="int4")
    assert options.quant is not None and options.quant.algorithm is QuantAlgorithm.RTN
    assert QWEN3_MOE["num_experts"] == 8


# ----------------------------------------------------------------------------- inspect
def test_inspect_shows_experts_top_k_and_active_parameters(export) -> None:
    result = CliRunner().invoke(app, ["inspect", str(export("qwen2_moe"))])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("mixture of experts"))
    assert "4 experts" in line and "top-2" in line and "shared expert 48" in line
    assert "2 sparse + 1 dense layers" in line and "active per token" in line
