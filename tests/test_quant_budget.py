"""``--budget``: the int4 layout's size estimate, optimum-intel's reference size, and the 8-bit
``down_proj`` promotions that spend the difference (:mod:`qwen_export.quant.budget`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

from qwen_export.cli import app
from qwen_export.errors import OptionError
from qwen_export.export.options import TIED_INT8, export_options
from qwen_export.export.pipeline import export as run_export
from qwen_export.quant import budget
from qwen_export.quant.scheme import QuantAlgorithm, QuantScheme, WeightFormat
from qwen_export.spec import ModelSpec

MIB = 1 << 20


def _qwen25_1p5b(qwen2_tied: Path, tied: bool) -> ModelSpec:
    """Qwen2.5-1.5B's shape (random tiny checkpoint's spec, resized)."""
    spec = ModelSpec.from_config_file(qwen2_tied / "config.json")
    return dataclasses.replace(
        spec,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=tied,
        layer_types=spec.layer_types[:1] * 28,
    )


def _use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's ``use_more_bits`` (src/llama-quant.cpp), which picks Q4_K_M's 6-bit ffn_down layers."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@pytest.mark.parametrize("layers", [1, 2, 8, 24, 28, 36, 48, 64, 80])
def test_down_proj_order_is_q4_k_m_choice(layers: int) -> None:
    order = budget.down_proj_order(layers)
    assert len(order) == len(set(order))
    assert set(order) == {i for i in range(layers) if _use_more_bits(i, layers)}
    eighth = layers // 8
    edges = [i for i in range(layers) if i < eighth or i >= 7 * layers // 8]
    assert order[: len(edges)] == sorted(edges, key=lambda i: (min(i, layers - 1 - i), i))  # the ends first


def test_quantized_bytes() -> None:
    # [10, 64] at 4 bits, blocks of 32: 320 bytes of codes, 20 float16 scales, 20 zero points packed two a byte
    assert budget.quantized_bytes(10, 64, 4, 32, True) == 320 + 40
    assert budget.quantized_bytes(10, 64, 4, 32, False) == 320 + 40 + 10
    assert budget.quantized_bytes(10, 64, 8, 0, False) == 640 + 20 + 10  # one block a row
    assert budget.quantized_bytes(3, 96, 4, 64, False) == 144 + 12 + 3  # a partial last block


def test_reference_size_matches_optimum_intel(qwen2_tied: Path) -> None:
    """optimum-intel's default int4 export of the real Qwen2.5-Coder-1.5B measured 1098 MiB of
    weights untied and 873 MiB made tied (benchmarks/README.md); the estimate leaves out biases and
    norms."""
    untied = budget.reference_bytes(_qwen25_1p5b(qwen2_tied, False)) / MIB
    tied = budget.reference_bytes(_qwen25_1p5b(qwen2_tied, True)) / MIB
    assert 1098 * 0.995 < untied < 1098 and 873 * 0.995 < tied < 873


def test_fill_budget_spends_the_difference(qwen2_tied: Path) -> None:
    spec = _qwen25_1p5b(qwen2_tied, False)
    scheme = export_options(None, weights="int4", int8="model.layers.*.self_attn.*", block="none").quant
    base = budget.scheme_bytes(spec, scheme)
    limit = budget.reference_bytes(spec)
    filled, promoted = budget.fill_budget(spec, scheme, limit)
    order = [f"model.layers.{i}.mlp.down_proj" for i in budget.down_proj_order(28)]
    assert promoted == order[: len(promoted)] and promoted
    size = budget.scheme_bytes(spec, filled)
    assert base < size <= limit
    one_more, _ = budget.fill_budget(spec, filled, limit + 10 * MIB)
    assert budget.scheme_bytes(spec, one_more) > limit  # the next promotion did not fit
    for module in promoted:
        assert filled.linear_bits(module) == 8 and filled.block_for(module) == budget.PROMOTED_BLOCK
    assert filled.linear_bits(order[len(promoted)]) == 4
    # nothing fits: unchanged; a kept layer is passed over
    assert budget.fill_budget(spec, scheme, base - 1) == (scheme, [])
    kept = dataclasses.replace(scheme, keep_layers=frozenset({0}))
    assert "model.layers.0.mlp.down_proj" not in budget.fill_budget(spec, kept, limit * 2)[1]


def _initializer_bytes(artifact: Path) -> int:
    model = onnx.load(str(artifact / "model.onnx"), load_external_data=False)
    total = 0
    for tensor in model.graph.initializer:
        length = [int(e.value) for e in tensor.external_data if e.key == "length"]
        total += length[0] if length else len(tensor.raw_data)
    return total


@pytest.mark.parametrize("case", ["qwen2_tied", "qwen2_untied"])
def test_estimate_matches_the_artifact(case: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The estimate of the int4 default's layout (with its promotions) against the initializers of
    the artifact it exports (ONNX Runtime; biases and norms are the difference)."""
    checkpoint = request.getfixturevalue(case)
    said: list[str] = []
    options = export_options(checkpoint, weights="int4", algorithm="rtn", message=said.append)
    spec = ModelSpec.from_config_file(checkpoint / "config.json")
    assert any(text.startswith("--budget optimum-intel's int4 size") for text in said)
    run_export(checkpoint, tmp_path / "a", options)
    actual = _initializer_bytes(tmp_path / "a")
    estimate = budget.scheme_bytes(spec, options.quant)
    assert estimate <= actual < estimate * 1.01
    assert estimate <= budget.reference_bytes(spec)
    quant = json.loads((tmp_path / "a" / "manifest.json").read_text())["extra"]["quantization"]
    promoted = [p for p in quant["int8_weights"] if p.endswith("mlp.down_proj")]
    assert (
        promoted
        == [f"model.layers.{i}.mlp.down_proj" for i in budget.down_proj_order(spec.num_hidden_layers)][: len(promoted)]
    )


def test_budget_option(qwen2_tied: Path, qwen2_untied: Path) -> None:
    tied = export_options(qwen2_tied, weights="int4").quant
    assert tied.int8_weights[: len(TIED_INT8)] == TIED_INT8
    assert export_options(qwen2_tied, weights="int4", budget="none").quant.int8_weights == TIED_INT8
    assert export_options(qwen2_tied, weights="int4", budget="optimum-intel").quant == tied
    # given --int8 or --block: no default promotions; --budget given as well: on top of them
    assert export_options(qwen2_tied, weights="int4", int8="lm_head").quant.int8_weights == ("lm_head",)
    both = export_options(qwen2_tied, weights="int4", int8="lm_head", budget="optimum-intel").quant
    assert both.int8_weights[0] == "lm_head" and len(both.int8_weights) > 1
    spec = ModelSpec.from_config_file(qwen2_untied / "config.json")
    small = export_options(qwen2_untied, weights="int4", budget=budget.scheme_bytes(spec, tied) / MIB / 10).quant
    assert not any(p.endswith("down_proj") for p in small.int8_weights)  # under the layout's size: none
    for kwargs, match in (
        (dict(weights="int4", budget="big"), "optimum-intel, none or a size in MiB"),
        (dict(weights="int4", budget="-3"), "positive size"),
        (dict(weights="int8", budget="100"), "use it with --weights int4"),
        (dict(weights="int4", target="tensorrt", budget="100"), "one bit width"),
    ):
        with pytest.raises(OptionError, match=match):
            export_options(qwen2_untied, **kwargs)
    assert export_options(qwen2_untied, weights="int4", target="tensorrt").quant.int8_weights == ()
    scheme = QuantScheme(WeightFormat.INT4, algorithm=QuantAlgorithm.RTN)
    assert budget.SizeBudget.parse(None) == budget.SizeBudget() and budget.SizeBudget.parse("none") is None
    assert budget.SizeBudget.parse("12.5").bytes_for(spec) == int(12.5 * MIB)
    assert budget.scheme_bytes(spec, scheme) > 0


def test_cli_budget_error_leaves_nothing(qwen2_untied: Path, tmp_path: Path) -> None:
    out = tmp_path / "art"
    args = ["export", str(qwen2_untied), "-o", str(out), "--weights", "int4", "--budget", "x"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and "--budget takes optimum-intel" in result.output
    assert not out.exists()


@pytest.mark.parametrize("layers", [2, 24, 28, 80])
def test_shrink_order_reverses_the_promotion_order(layers: int) -> None:
    order = budget.shrink_order(layers)
    preferred = budget.down_proj_order(layers)
    assert sorted(order) == list(range(layers))
    assert order[len(order) - len(preferred) :] == preferred[::-1]  # Q4_K_M's layers give bytes back last


def _untied_default(spec: ModelSpec) -> QuantScheme:
    return export_options(
        None,
        weights="int4",
        int8="model.layers.*.self_attn.*",
        block="model.layers.*.self_attn.*=128",
        embedding_bits=4,
    ).quant


@pytest.mark.parametrize(
    ("hidden", "inter", "layers", "heads", "kv", "wanted"),
    [
        (3584, 18944, 28, 28, 4, {"MLP b64": 19}),  # Qwen2.5-7B (log8 scales: float16's needed 28 + 19 b128)
        (8192, 29568, 80, 64, 8, {"MLP b64": 80, "MLP b128": 80, "8-bit tensors back at 4 bits": 59}),  # 72B
    ],
)
def test_larger_models_shrink_into_the_budget(
    qwen2_tied: Path, hidden: int, inter: int, layers: int, heads: int, kv: int, wanted: dict[str, int]
) -> None:
    """Where the 8-bit attention and the MLP's blocks of 32 outgrow what the 4-bit table saves, the
    layout gives bytes back layer by layer until it is within optimum-intel's size."""
    spec = dataclasses.replace(
        _qwen25_1p5b(qwen2_tied, False),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        layer_types=_qwen25_1p5b(qwen2_tied, False).layer_types[:1] * layers,
    )
    scheme = _untied_default(spec)  # the embedding at --block-size here (the default: 128)
    limit = budget.reference_bytes(spec)
    assert budget.scheme_bytes(spec, scheme) > limit
    fitted, changes = budget.shrink_to_budget(spec, scheme, limit)
    assert changes == wanted
    assert budget.scheme_bytes(spec, fitted) <= limit
    undone = dataclasses.replace(fitted, block_overrides=fitted.block_overrides[1:])  # its last MLP step
    assert "8-bit tensors back at 4 bits" in wanted or budget.scheme_bytes(spec, undone) > limit
    first = budget.shrink_order(layers)[0]
    assert fitted.block_for(f"model.layers.{first}.mlp.down_proj") >= 64
    if "8-bit tensors back at 4 bits" in wanted:
        assert fitted.linear_bits(f"model.layers.{first}.self_attn.q_proj") == 4
        assert fitted.linear_bits("model.layers.0.self_attn.q_proj") == 8  # an end layer keeps its 8 bits


def test_a_budget_too_small_is_said(qwen2_untied: Path) -> None:
    said: list[str] = []
    quant = export_options(qwen2_untied, weights="int4", budget="1", message=said.append).quant
    assert any("MiB over it: --budget sets another" in text and "MLP b64" in text for text in said), said
    assert not any(p.startswith("model.layers.") for p in quant.int8_weights)
