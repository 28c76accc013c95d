"""export_options(): the one export option policy, shared by the library and ``qwen-export export``.

On a pre-quantized AWQ checkpoint (asymmetric int4, group 32; built by test_prequant's fixture) the
library call and the CLI choose the same ExportOptions, say the same thing about how the target
adapted them, and write the same quantization record into the manifest.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from test_cli import invoke
from test_prequant import KINDS, prequantized  # noqa: F401 - the AWQ checkpoint fixture

from qwen_export import targets
from qwen_export.artifact import Manifest, load_manifest
from qwen_export.errors import OptionError
from qwen_export.export import export as library_export
from qwen_export.export import pipeline
from qwen_export.export.options import (
    ATTENTION_INT8,
    TIED_INT8,
    UNTIED_BLOCKS,
    UNTIED_INT8,
    ExportOptions,
    Int4Defaults,
    export_options,
    untied_blocks,
)
from qwen_export.quant.scheme import PER_CHANNEL, Keep, QuantScheme, ScaleFormat, WeightFormat
from qwen_export.spec import ModelSpec, Target

_, GROUP, BITS, SYM, _ = KINDS["awq"]
REQUANTIZED_SYMMETRIC = "the checkpoint's asymmetric quantization is requantized symmetric"


def _capture(monkeypatch: pytest.MonkeyPatch) -> list[ExportOptions]:
    """Replace pipeline.export by a stand-in that records the options the CLI hands it."""
    calls: list[ExportOptions] = []

    def run(checkpoint, out, options, hooks=None):
        calls.append(options)
        Path(out).mkdir()
        return Manifest(target=options.target.value, dtype=options.dtype.value, logits="last", spec={}, extra={})

    monkeypatch.setattr(pipeline, "export", run)
    return calls


@pytest.mark.parametrize(
    ("target", "flags", "keywords"),
    [
        ("onnxruntime", [], {}),
        ("openvino", [], {}),
        ("tensorrt", [], {}),
        ("onnxruntime", ["--weights", "int4", "--block-size", "64"], {"weights": "int4", "block_size": 64}),
        ("onnxruntime", ["--weights", "int8"], {"weights": "int8"}),
        ("onnxruntime", ["--weights", "fp16"], {"weights": "fp16"}),
        ("tensorrt", ["--weights", "int4", "--max-batch", "2"], {"weights": "int4", "max_batch": 2}),
    ],
)
def test_library_and_cli_choose_the_same_options(
    prequantized,  # noqa: F811 - the fixture
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    target: str,
    flags: list[str],
    keywords: dict,
) -> None:
    directory, _ = prequantized("awq")
    said: list[str] = []
    library = export_options(directory, target=target, message=said.append, **keywords)
    calls = _capture(monkeypatch)
    result = invoke("export", directory, "-o", tmp_path / "art", "--target", target, *flags)
    assert result.exit_code == 0, result.output
    assert calls == [library]
    for text in said:  # what the target changed, printed by the CLI as the library reported it
        assert text in result.output.replace("\n", " ")
    if target == "tensorrt" and not keywords:
        assert len(said) >= 1 and REQUANTIZED_SYMMETRIC in said[0]


def test_a_prequantized_checkpoint_keeps_its_quantization_by_default(prequantized) -> None:  # noqa: F811
    directory, _ = prequantized("awq")
    own = export_options(directory).quant
    assert own is not None and (own.bits, own.block_size, own.symmetric) == (BITS, GROUP, SYM)
    assert Keep.EMBEDDING in own.keep
    same_bits = export_options(directory, weights=f"int{BITS}").quant  # its group size and symmetry
    assert same_bits is not None and (same_bits.block_size, same_bits.symmetric) == (GROUP, SYM)
    given = export_options(directory, weights=f"int{BITS}", block_size=128, symmetric=True).quant
    assert given is not None and (given.block_size, given.symmetric) == (128, True)
    assert export_options(directory, weights="fp16").quant is None  # a float export of the dequantized weights
    said: list[str] = []
    trt = export_options(directory, target="tensorrt", message=said.append)
    assert trt.quant is not None and trt.quant.symmetric and REQUANTIZED_SYMMETRIC in said[0]
    with pytest.raises(OptionError, match="drop --asymmetric"):  # asked for: refused, not adapted
        export_options(directory, target="tensorrt", weights=f"int{BITS}", symmetric=False)


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_library_and_cli_write_the_same_quantization_record(
    prequantized,  # noqa: F811 - the fixture
    tmp_path: Path,
    target: str,
) -> None:
    """The library's one call (qwen_export.export.export) against the CLI: TensorRT needs zero points
    of zero, so there the stored asymmetric weights are requantized symmetric, and both say so."""
    directory, _ = prequantized("awq")
    result = invoke("export", directory, "-o", tmp_path / "cli", "--target", target)
    assert result.exit_code == 0, result.output
    messages: list[str] = []
    manifest = library_export(directory, tmp_path / "library", target=target, message=messages.append)
    from_cli = load_manifest(tmp_path / "cli").extra["quantization"]
    from_library = manifest.extra["quantization"]
    assert from_cli == from_library
    assert from_cli["prequantized"]["method"] == "awq"
    assert (from_cli["weights"], from_cli["block_size"]) == (f"int{BITS}", GROUP)
    requantized = target == "tensorrt"
    assert from_cli["symmetric"] is (True if requantized else SYM)
    assert bool(from_cli["requantized"]) is requantized  # onnxruntime keeps the stored values
    assert (REQUANTIZED_SYMMETRIC in result.output.replace("\n", " ")) is requantized
    assert any(REQUANTIZED_SYMMETRIC in text for text in messages) is requantized


def test_plain_values_and_lists(qwen2_tied: Path) -> None:
    options = export_options(
        qwen2_tied, weights="int4", keep=["embedding"], keep_layers=[0, 1], dtype="fp16", logits="all", max_length=64
    )
    assert options == export_options(
        qwen2_tied, weights="int4", keep="embedding", keep_layers="0,1", dtype="fp16", logits="all", max_length=64
    )
    d = Int4Defaults()
    assert options.quant == QuantScheme(
        WeightFormat.INT4,
        keep=frozenset({Keep.EMBEDDING}),
        keep_layers=frozenset({0, 1}),
        algorithm=d.algorithm,
        symmetric=d.symmetric,
        int8_weights=TIED_INT8,  # a tied model: every weight at 4 bits but v_proj
        scale_format=ScaleFormat.LOG8,  # ONNX Runtime's one-byte scales (asymmetric)
    )
    assert export_options() == ExportOptions()  # no flags: the defaults


def test_target_policy_comes_from_the_registry(qwen2_tied: Path) -> None:
    """Options only some targets take name those targets (from the registry); the TensorRT backend
    refuses what it cannot honour and adapts int8 to per-channel when the export runs."""
    owners = [b.target.value for b in targets.registered() if "max_batch" in b.own_options]
    assert owners == [Target.TENSORRT.value]
    with pytest.raises(OptionError, match="--max-batch applies to --target tensorrt only"):
        export_options(qwen2_tied, max_batch=2)
    assert export_options(qwen2_tied, target="tensorrt", max_batch=2).max_batch == 2
    with pytest.raises(OptionError, match="keeps the embedding"):
        export_options(qwen2_tied, target="tensorrt", weights="int4", embedding_bits=4)
    with pytest.raises(OptionError, match="MatMulNBits"):
        export_options(qwen2_tied, target="tensorrt", weights="int4", accuracy_level=1)
    said: list[str] = []
    options = export_options(qwen2_tied, target="tensorrt", weights="int8")
    adapted = options.backend.adapt_options(options, said.append)
    assert adapted.quant.block_size == PER_CHANNEL and any("per output channel" in s for s in said)


def test_int4_defaults(qwen2_tied: Path, qwen2_untied: Path, prequantized) -> None:  # noqa: F811
    """``--weights int4`` alone: GPTQ, asymmetric where the target takes zero points, a 4-bit
    embedding (a tied model's shared table too, except on TensorRT), 8-bit attention for untied
    models; every given flag wins; int8 and pre-quantized checkpoints are untouched."""
    from qwen_export.quant.scheme import QuantAlgorithm

    tied = export_options(qwen2_tied, weights="int4").quant
    untied = export_options(qwen2_untied, weights="int4").quant
    default = Int4Defaults()
    assert (tied.algorithm, tied.symmetric, tied.embedding_bits) == (default.algorithm, default.symmetric, 4)
    assert (untied.algorithm, untied.embedding_bits) == (default.algorithm, 4)
    # a tied model: 4 bits but v_proj, the shared table too, and down_proj layers at 8 bits within
    # optimum-intel's size (--budget: tests/test_quant_budget.py)
    assert tied.int8_weights[: len(TIED_INT8)] == TIED_INT8
    assert tied.int8_weights[len(TIED_INT8)] == "model.layers.*.self_attn.k_proj"  # k first: q/k/v are three anyway
    assert all(p.endswith(".mlp.down_proj") for p in tied.int8_weights[len(TIED_INT8) + 1 :])
    assert export_options(qwen2_tied, weights="int4", target="openvino").quant.int8_weights == tied.int8_weights
    assert export_options(qwen2_tied, weights="int4", budget="none").quant.int8_weights == TIED_INT8
    assert export_options(qwen2_tied, weights="int4", int8=["none"]).quant.int8_weights == ()
    tied_trt = export_options(qwen2_tied, weights="int4", target="tensorrt").quant
    assert tied_trt.embedding_bits == 8  # TensorRT: no 4-bit table; kept as before
    unbudgeted = export_options(qwen2_untied, weights="int4", budget="none").quant
    assert unbudgeted.int8_weights == ATTENTION_INT8 + UNTIED_INT8 == ATTENTION_INT8  # the lm_head: GPTQ at 4 bits
    assert untied.int8_weights[: len(ATTENTION_INT8)] == ATTENTION_INT8
    assert export_options(qwen2_untied, weights="int4", target="openvino").quant.int8_weights == untied.int8_weights
    assert export_options(qwen2_untied, weights="int4", int8=["none"]).quant.int8_weights == ()
    assert export_options(qwen2_untied, weights="int4", int8="lm_head").quant.int8_weights == ("lm_head",)
    with pytest.raises(OptionError, match="give it alone"):
        export_options(qwen2_untied, weights="int4", int8=["none", "lm_head"])
    trt = export_options(qwen2_untied, weights="int4", target="tensorrt").quant
    assert trt.symmetric and trt.algorithm is default.algorithm  # TensorRT takes no zero points
    assert trt.int8_weights == ()  # nor 8-bit tensors in an int4 engine
    # 128 (the 8-bit attention, the embedding) does not divide this tiny hidden size (64)
    assert unbudgeted.block_overrides == () and trt.block_overrides == ()
    assert export_options(qwen2_untied, weights="int4", target="openvino", budget="none").quant.block_overrides == ()
    spec = ModelSpec.from_config_file(qwen2_untied / "config.json")
    real = dataclasses.replace(spec, hidden_size=1536, num_attention_heads=12, head_dim=128, intermediate_size=8960)
    assert untied_blocks(real) == UNTIED_BLOCKS == (("model.layers.*.self_attn.*", 128), ("model.embed_tokens", 128))
    # o_proj reads heads x head_dim channels (Qwen3: not the hidden size): 96 is no multiple of 128
    assert untied_blocks(dataclasses.replace(real, num_attention_heads=3, head_dim=32)) == UNTIED_BLOCKS[1:]
    # the embedding's blocks (and q/k/v's) run along the hidden size: 960 is no multiple of 128
    assert untied_blocks(dataclasses.replace(real, hidden_size=960, num_attention_heads=15, head_dim=64)) == ()
    assert export_options(qwen2_untied, weights="int4", block="none").quant.block_overrides == ()
    given_blocks = export_options(qwen2_tied, weights="int4", block=["lm_head=64", " model.embed_tokens = 128"])
    assert given_blocks.quant.block_overrides == (("lm_head", 64), ("model.embed_tokens", 128))
    for bad, match in (
        ("lm_head", "PATTERN=SIZE"),
        ("lm_head=48", "must be one of 16, 32, 64, 128"),
        ("=16", "PATTERN"),
    ):
        with pytest.raises(OptionError, match=match):
            export_options(qwen2_untied, weights="int4", block=bad)
    with pytest.raises(OptionError, match="needs a blocked scheme"):
        export_options(qwen2_untied, weights="int8", block_size=0, block="lm_head=16")
    given = export_options(qwen2_untied, weights="int4", algorithm="rtn", symmetric=True, embedding_bits=8).quant
    assert (given.algorithm, given.symmetric, given.embedding_bits) == (QuantAlgorithm.RTN, True, 8)
    kept = export_options(qwen2_untied, weights="int4", keep="embedding").quant
    assert Keep.EMBEDDING in kept.keep and kept.embedding_bits == 8
    assert export_options(qwen2_untied, weights="int8").quant.algorithm is QuantAlgorithm.RTN
    directory, _ = prequantized("awq")
    own = export_options(directory, weights=f"int{BITS}").quant
    assert own.algorithm is QuantAlgorithm.RTN  # its stored values are kept, nothing is recalibrated
