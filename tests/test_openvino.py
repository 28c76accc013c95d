"""OpenVINO target: the stateful IR, what OpenVINO's CPU plugin makes of it, the engine, openvino-genai.

Parity against transformers runs in tests/test_parity.py for every engine (OpenVINO included).
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest
import reference
import torch
from conftest import ModuleScratch
from noise import Noise, check_logits
from typer.testing import CliRunner

from qwen_export.artifact import load_manifest
from qwen_export.cli import app
from qwen_export.errors import OptionError
from qwen_export.export import parity
from qwen_export.export.pipeline import ExportOptions
from qwen_export.export.pipeline import export as run_export
from qwen_export.quant.scheme import QuantScheme, WeightFormat
from qwen_export.runtime.llm import LLM, load
from qwen_export.runtime.loader import RuntimeOptions, open_artifact
from qwen_export.spec import DType, ModelSpec, Target

ov = pytest.importorskip("openvino", reason="openvino is not installed: pip install 'qwen-export[openvino]'")
from qwen_export.targets.openvino.engine import (  # noqa: E402
    EXACT,
    Attention,
    KVCachePrecision,
    OpenVINOOptions,
    Precision,
    _short_type,
)

CANONICAL_INPUTS = {"input_ids", "attention_mask", "position_ids", "beam_idx"}


def _engine(path: Path, attention: Attention, **options):
    return open_artifact(path, RuntimeOptions(openvino=OpenVINOOptions(attention=attention, **options))).engine


def _layers(artifact: Path) -> int:
    return ModelSpec.from_dict(load_manifest(artifact).spec).num_hidden_layers


def test_artifact_has_the_stateful_openvino_genai_signature(export) -> None:
    out = export("qwen2_tied", target="openvino")
    names = {p.name for p in out.iterdir()}
    for f in ("openvino_model.xml", "openvino_model.bin", "openvino_tokenizer.xml", "openvino_detokenizer.xml"):
        assert f in names
    assert not any(n.endswith(".onnx") or n.startswith(".onnx") for n in names)  # the scratch ONNX is gone
    manifest = load_manifest(out)
    assert manifest.target == "openvino"
    assert manifest.extra["kv_cache"]["layout"] == "stateful"
    assert manifest.extra["openvino"] == {"tokenizer_ir": True}
    assert set(manifest.io["inputs"]) == CANONICAL_INPUTS
    assert list(manifest.io["outputs"]) == ["logits"]
    model = ov.Core().read_model(str(out / "openvino_model.xml"))
    kinds = [op.get_type_name() for op in model.get_ops()]
    n = _layers(out)
    assert kinds.count("ReadValue") == kinds.count("Assign") == 2 * n
    assert kinds.count("ScaledDotProductAttention") == n  # the converter already sees the attention


@pytest.mark.parametrize("case", ["qwen2_tied", "qwen2_untied"])
def test_logits_come_straight_from_the_lm_head_matmul(case: str, export) -> None:
    """openvino-genai finds the lm_head as the MatMul feeding the logits Result and, on its default
    paged-attention backend, gathers the sampled tokens in front of it; with any other node there
    (the tied lm_head's Reshapes) it computes every prompt token's full-vocabulary logits."""
    out = export(case, target="openvino")
    model = ov.Core().read_model(str(out / "openvino_model.xml"))
    lm_head = model.output("logits").get_node().input_value(0).get_node()
    vocab = ModelSpec.from_dict(load_manifest(out).spec).vocab_size
    assert lm_head.get_type_name() == "MatMul"
    assert lm_head.get_input_partial_shape(0).rank.get_length() == 3  # [batch, tokens, hidden]
    assert lm_head.get_output_partial_shape(0)[2].get_length() == vocab


@pytest.mark.parametrize("case", ["qwen2_tied", "qwen3", "qwen2_sliding", "qwen2_yarn_bf16_sharded"])
def test_compiled_model_uses_fused_attention_with_its_internal_kv_cache(case: str, export) -> None:
    """The CPU plugin's runtime model: every attention is one SDPA node reading the KV cache from
    the state and writing it back (no Concat of the cache, no MatMul/Softmax fallback), RMSNorm
    and RoPE fused."""
    out = export(case, target="openvino")
    report = _engine(out, Attention.STATEFUL).runtime_report()
    n = _layers(out)
    assert report.stateful_attention == n, report
    assert report.decomposed_attention == 0
    assert "Softmax" not in report.layer_types and "MatMul" not in report.layer_types
    assert report.layer_types.get("RoPE") == 2 * n
    assert report.layer_types.get("RMS", 0) >= 2 * n + 1
    assert report.layer_types.get("MemoryInput") == 2 * n


QUANT_CASES = {
    "int4-sym": (QuantScheme(WeightFormat.INT4, symmetric=True), "i4"),
    "int4-asym": (QuantScheme(WeightFormat.INT4, symmetric=False), "u4"),
    "int8-sym": (QuantScheme(WeightFormat.INT8, symmetric=True), "i8"),
    "int8-channel-asym": (QuantScheme(WeightFormat.INT8, block_size=0, symmetric=False), "u8"),
}


@pytest.fixture(scope="module")
def quantized(request: pytest.FixtureRequest, module_scratch: ModuleScratch):
    """``quantized(case, target) -> artifact`` of qwen2_untied, exported once per module."""

    def run(case: str, target: str) -> Path:
        key = (case, target)
        if key not in module_scratch.cache:
            out = module_scratch.mkdir(f"{case}-{target}") / "artifact"
            scheme = QUANT_CASES[case][0]
            run_export(request.getfixturevalue("qwen2_untied"), out, ExportOptions(target=Target(target), quant=scheme))
            module_scratch.cache[key] = out
        return module_scratch.cache[key]

    return run


@pytest.mark.parametrize("case", list(QUANT_CASES))
def test_quantized_weights_stay_compressed_in_the_compiled_model(case: str, quantized) -> None:
    """Under the default attention (paged for this model) and under stateful."""
    out = quantized(case, "openvino")
    n = _layers(out)
    expected = QUANT_CASES[case][1]
    default, stateful = open_artifact(out).engine.runtime_report(), _engine(out, Attention.STATEFUL).runtime_report()
    # 7 projections per layer (q, k, v, o, gate, up, down) are quantized; the untied lm_head too
    for report in (default, stateful):
        assert report.weight_precisions.get(expected, 0) >= 7 * n, report.weight_precisions
    assert default.paged_attention == n and default.stateful_attention == 0
    assert stateful.stateful_attention == n and stateful.paged_attention == 0


@pytest.mark.parametrize("case", list(QUANT_CASES))
def test_weights_decompress_in_f16_with_f16_scales(case: str, quantized) -> None:
    """NNCF's form: Convert(codes -> f16) [- zp] * f16 scales -> Convert(f32); no f32 chain left."""
    from qwen_export.targets.openvino.engine import MODEL_XML
    from qwen_export.targets.openvino.lowering import _decompression_chain

    model = ov.Core().read_model(quantized(case, "openvino") / MODEL_XML)
    halves = 0
    for op in model.get_ordered_ops():
        assert _decompression_chain(op) is None, op.get_friendly_name()
        if op.get_type_name() != "Multiply":
            continue
        data, scale = (port.get_source_output().get_node() for port in op.inputs())
        if data.get_type_name() == "Subtract":
            data = data.input(0).get_source_output().get_node()
        codes = data.input(0).get_source_output().get_node() if data.get_type_name() == "Convert" else None
        if codes is not None and codes.get_type_name() == "Constant" and scale.get_type_name() == "Constant":
            assert data.get_output_element_type(0).get_type_name() == "f16"
            assert scale.get_output_element_type(0).get_type_name() == "f16"
            halves += 1
    assert halves >= 7 * _layers(quantized(case, "openvino")) + 1  # projections, embedding/lm_head


@pytest.mark.parametrize("case", ["int4-sym", "int8-sym"])
def test_quantized_accuracy_matches_onnxruntime_of_the_same_weights(case: str, quantized, qwen2_untied: Path) -> None:
    """`qwen-export check`'s figures: the OpenVINO artifact is at least as accurate as the ONNX
    Runtime one quantized with the same scheme. (OpenVINO computes the dequantized weights exactly
    here; ORT's MatMulNBits at accuracy level 4 quantizes the activations to int8.)"""
    reference = parity.Reference(qwen2_untied)
    reports = {}
    for target in ("onnxruntime", "openvino"):  # f32 compute: the weights' accuracy, not split's
        loaded = open_artifact(
            quantized(case, target), RuntimeOptions(openvino=EXACT) if target == "openvino" else None
        )
        ids = loaded.tokenizer.encode(parity.DEFAULT_TEXT)[:96]
        reports[target] = parity.check(
            loaded.engine,
            reference,
            ids,
            DType.parse(loaded.manifest.dtype),
            8,
            quantization=loaded.manifest.extra["quantization"],
        )
    ours, theirs = reports["openvino"], reports["onnxruntime"]
    # int4 on a 64-wide random model is far from exact (KL ~1 for both); the claim is relative
    assert ours.mean_kl <= theirs.mean_kl * 1.1 + 1e-5, (ours.mean_kl, theirs.mean_kl)
    assert ours.top1_agreement >= theirs.top1_agreement - 0.05


def test_paged_engine_runs_paged_attention_on_compressed_weights(quantized) -> None:
    """attention=paged: every attention is one PagedAttention node over the engine's block cache
    (no SDPA left), the weights stay compressed, and u8 caches get the plugin's block layout."""
    out = quantized("int4-sym", "openvino")
    n = _layers(out)
    engine = _engine(out, Attention.PAGED, kv_cache=KVCachePrecision.U8)
    report = engine.runtime_report()
    assert report.paged_attention == n, report.layer_types
    assert report.stateful_attention == report.decomposed_attention == 0
    assert report.weight_precisions.get("i4", 0) >= 7 * n, report.weight_precisions
    caches = {p.get_any_name(): p for p in engine.compiled.inputs if "_cache." in p.get_any_name()}
    assert len(caches) == 2 * n and {_short_type(p.get_element_type()) for p in caches.values()} == {"u8"}
    assert engine.block_size == 32


def test_paged_engine_grows_its_block_pool_and_truncates_like_the_stateful_one(export) -> None:
    """Two rows (one left-padded) of 100 tokens fill the first pool of 8 blocks; 60 more tokens
    each make it grow, keeping what is cached; then decode steps and a truncated turn. The logits
    equal the stateful engine's at every step (fp32 parity tolerance: the kernels sum differently)."""
    path = export("qwen2_tied", target="openvino")
    stateful, paged = _engine(path, Attention.STATEFUL), _engine(path, Attention.PAGED)
    rng = np.random.default_rng(11)
    prompt, mask = rng.integers(0, 151643, (2, 100)), np.ones((2, 100), np.int64)
    mask[1, :30] = 0
    check_logits(paged.forward(prompt, mask), stateful.forward(prompt, mask), Noise.CROSS)
    assert paged.allocated_blocks == 8
    more = rng.integers(0, 151643, (2, 60))
    check_logits(paged.forward(more), stateful.forward(more), Noise.CROSS)
    assert paged.allocated_blocks > 8 and paged.num_cached_tokens == 160
    token = np.array([[7], [8]])
    for _ in range(3):
        expected = stateful.forward(token)
        check_logits(paged.forward(token), expected, Noise.CROSS)
        token = expected[:, -1].argmax(-1)[:, None]
    for engine in (stateful, paged):
        engine.truncate(120)
    again = rng.integers(0, 151643, (2, 40))
    check_logits(paged.forward(again), stateful.forward(again), Noise.CROSS)
    paged.reset()
    assert paged.num_cached_tokens == 0 and paged.allocated_blocks > 8  # the pool is kept for reuse
    fresh = _engine(path, Attention.STATEFUL).forward(prompt[:1])
    check_logits(paged.forward(prompt[:1]), fresh, Noise.CROSS)


def test_reset_state_starts_a_new_conversation(export) -> None:
    engine = open_artifact(export("qwen2_tied", target="openvino")).engine
    prompt = np.random.default_rng(7).integers(0, 151643, (1, 12))
    first = engine.forward(prompt)
    engine.forward(np.array([[5, 6, 7]]))
    engine.reset()
    assert engine.num_cached_tokens == 0
    check_logits(engine.forward(prompt), first, Noise.REPEAT)


def test_chat_turns_reuse_the_cached_prefix(export) -> None:
    path = export("qwen2_tied", target="openvino")
    llm = load(path)
    turn1 = [{"role": "user", "content": "Name a prime number."}]
    reply = llm.chat(turn1, max_new_tokens=4, temperature=0.0)
    turn2 = [*turn1, {"role": "assistant", "content": reply.text}, {"role": "user", "content": "And another?"}]
    second = llm.chat(turn2, max_new_tokens=4, temperature=0.0)
    assert second.reused_tokens > 0  # the first turn's KV cache was kept, only the new tokens ran
    fresh = LLM(open_artifact(path)).chat(turn2, max_new_tokens=4, temperature=0.0)
    assert fresh.reused_tokens == 0
    assert second.text == fresh.text


def test_cache_dir_is_filled_and_reused(export, tmp_path: Path) -> None:
    path = export("qwen2_tied", target="openvino")
    options = RuntimeOptions(openvino=OpenVINOOptions(cache_dir=tmp_path / "cache"))
    t0 = time.perf_counter()
    first = open_artifact(path, options).engine
    cold = time.perf_counter() - t0
    assert any((tmp_path / "cache").iterdir()), "OpenVINO wrote nothing into CACHE_DIR"
    t0 = time.perf_counter()
    second = open_artifact(path, options).engine
    warm = time.perf_counter() - t0
    print(f"load: {cold:.2f} s cold, {warm:.2f} s from the cache")
    ids = np.arange(1, 9)[None]
    check_logits(second.forward(ids), first.forward(ids), Noise.REPEAT)


CPU_HAS_BF16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@pytest.mark.skipif(CPU_HAS_BF16, reason="this CPU runs bf16: test_bf16_inference_within_its_tolerance runs instead")
def test_unsupported_inference_precision_is_a_clear_error(export) -> None:
    with pytest.raises(OptionError, match=r"inference precision bf16 is not supported by this CPU .*; use f32"):
        open_artifact(
            export("qwen2_tied", target="openvino"), RuntimeOptions(openvino=OpenVINOOptions(precision=Precision.BF16))
        )


@pytest.mark.skipif(not CPU_HAS_BF16, reason="this CPU has no bf16: the refusal test runs instead")
@pytest.mark.parametrize("attention", [Attention.STATEFUL, Attention.PAGED])
def test_bf16_inference_within_its_tolerance(qwen2_tied: Path, export, attention: Attention) -> None:
    """bf16 compute (``--precision bf16``) along the fp32 reference's greedy path: the logit error
    stays within 2x (+0.05) of transformers' own error in bf16 on the same path (the README's
    bound), and the greedy token agrees except at a near-tie. The default f32 KV cache is held in
    bf16 (the paged engine's PagedAttention refuses an f32 cache with bf16 compute)."""
    options = OpenVINOOptions(precision=Precision.BF16, attention=attention)
    assert options.effective_kv_cache is KVCachePrecision.BF16
    engine = _engine(export("qwen2_tied", target="openvino"), attention, precision=Precision.BF16)
    prompt = reference.prompt(20, 4)
    expected = reference.greedy_steps(qwen2_tied, prompt, 8)
    path = [int(np.argmax(e)) for e in expected[:-1]]
    theirs = [
        np.abs(a - b).max()
        for a, b in zip(reference.steps_following(qwen2_tied, torch.bfloat16, prompt, path), expected, strict=True)
    ]
    logits, ours = engine.forward(prompt[None])[0, -1], []
    for step, ref in enumerate(expected):
        if step:
            logits = engine.forward(np.array([[path[step - 1]]], np.int64))[0, -1]
        ours.append(np.abs(logits - ref).max())
        assert int(np.argmax(logits)) == int(np.argmax(ref)) or np.sort(ref)[-2] > ref.max() - 2 * ours[-1]
    print(f"bf16 max logit error: ours {max(ours):.3f}, transformers bf16 {max(theirs):.3f}")
    assert max(ours) <= 2 * max(theirs) + 0.05, f"ours {ours} vs transformers bf16 {theirs}"


def test_paged_attention_refuses_f16_compute(export) -> None:
    with pytest.raises(OptionError, match="paged attention with f16 compute .* use attention=stateful"):
        _engine(export("qwen2_tied", target="openvino"), Attention.PAGED, precision=Precision.F16)


def test_openvino_options_on_an_onnxruntime_artifact_are_refused(export) -> None:
    with pytest.raises(OptionError, match="apply to --target openvino artifacts only"):
        load(export("qwen2_tied"), kv_cache="u8")


@pytest.mark.skipif(
    importlib.util.find_spec("openvino_genai") is None,
    reason="openvino-genai is not installed: pip install 'qwen-export[openvino]'",
)
def test_openvino_genai_runs_our_artifact(export) -> None:
    """openvino_genai.LLMPipeline loads the artifact as is; its tokenizer IR tokenizes as ours does
    and its greedy tokens equal our engine's, on several prompts."""
    import openvino_genai

    path = export("qwen2_tied", target="openvino")
    pipe = openvino_genai.LLMPipeline(str(path), "CPU", INFERENCE_PRECISION_HINT="f32", KV_CACHE_PRECISION="f32")
    loaded = open_artifact(path)
    config = openvino_genai.GenerationConfig()
    config.max_new_tokens, config.do_sample = 6, False
    seen = set()
    for text in ("def fibonacci(n):", "The capital of France is", "Write a haiku about compilers."):
        ids = np.asarray([loaded.tokenizer.encode(text)], dtype=np.int64)
        np.testing.assert_array_equal(pipe.get_tokenizer().encode(text).input_ids.data, ids)
        result = pipe.generate(openvino_genai.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids))), config)
        theirs = list(result.tokens[0])
        loaded.engine.reset()
        logits, ours = loaded.engine.forward(ids)[0, -1], []
        for _ in range(6):
            ours.append(int(np.argmax(logits)))
            logits = loaded.engine.forward(np.array([[ours[-1]]]))[0, -1]
        assert theirs == ours, text
        seen.add(ours[0])
    assert len(seen) > 1  # the prompts lead to different continuations: the comparison can fail


runner = CliRunner()


def test_cli_exports_openvino_and_refuses_no_fuse(qwen2_tied: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["export", str(qwen2_tied), "-o", str(tmp_path / "ov"), "--target", "openvino", "--no-fuse"]
    )
    assert result.exit_code == 2 and "--no-fuse applies to --target onnxruntime only" in result.output
    assert not (tmp_path / "ov").exists()
    result = runner.invoke(app, ["export", str(qwen2_tied), "-o", str(tmp_path / "ov"), "--target", "openvino"])
    assert result.exit_code == 0, result.output
    assert "layout" not in result.output or "OpenVINO's state" in result.output
    result = runner.invoke(app, ["inspect", str(tmp_path / "ov"), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["manifest"]["target"] == "openvino"
    assert info["ops"]["ReadValue"] == info["ops"]["Assign"] == 2 * _layers(tmp_path / "ov")


def test_default_attention_is_paged_except_for_sliding_window_models(export) -> None:
    from qwen_export.targets.openvino.engine import OpenVINOEngine
    from qwen_export.targets.openvino.paged import PagedOpenVINOEngine

    assert isinstance(open_artifact(export("qwen2_tied", target="openvino")).engine, PagedOpenVINOEngine)
    sliding = export("qwen2_sliding", target="openvino")
    assert isinstance(open_artifact(sliding).engine, OpenVINOEngine)
    with pytest.raises(OptionError, match="sliding-window layers; use attention=stateful"):
        _engine(sliding, Attention.PAGED)


def test_cli_runs_paged_attention_and_names_the_valid_choices(export) -> None:
    path = str(export("qwen2_tied", target="openvino"))
    args = ["generate", path, "def f(x):", "--raw", "--max-new-tokens", "4", "--temperature", "0"]
    stateful = runner.invoke(app, [*args, "--attention", "stateful"])
    paged = runner.invoke(app, [*args, "--attention", "paged"])
    assert stateful.exit_code == paged.exit_code == 0, paged.output
    assert paged.stdout == stateful.stdout  # the same greedy completion
    bad = runner.invoke(app, [*args, "--attention", "flash"])
    assert bad.exit_code != 0 and "unknown attention 'flash'; valid values: auto, stateful, paged" in bad.output


def test_auto_precision_follows_the_cpu_and_the_weights() -> None:
    from qwen_export.targets.openvino.engine import Precision

    assert Precision.AUTO.resolve(True, frozenset({"amx_bf16", "amx_int8"})) is Precision.SPLIT
    assert Precision.AUTO.resolve(True, frozenset({"avx512_bf16"})) is Precision.SPLIT
    assert Precision.AUTO.resolve(True, frozenset({"avx512_bf16"}), paged=False) is Precision.F32
    assert Precision.AUTO.resolve(True, frozenset({"avx2", "avx512f"})) is Precision.F32
    assert Precision.AUTO.resolve(False, frozenset({"amx_bf16"})) is Precision.F32  # fp32/fp16 artifacts stay exact
    assert (
        Precision.BF16.resolve(False, frozenset()) is Precision.BF16 and Precision.parse("auto", "p") is Precision.AUTO
    )
    assert Precision.SPLIT.phases == (Precision.F32, Precision.BF16) and Precision.F32.phases == (Precision.F32,)


@pytest.mark.skipif(not CPU_HAS_BF16, reason="this CPU has no bf16: precision split needs it")
def test_precision_split_prefills_in_bf16_and_decodes_in_f32_on_one_cache(quantized, export) -> None:
    """Split: a prompt runs in the bf16 form (the same logits as a bf16 engine's), a decode step in
    the f32 form (not the bf16 engine's logits) reading the cache the bf16 form wrote (no farther
    from an f32 engine than a bf16 engine is: an unshared cache would give garbage)."""
    from qwen_export.targets.openvino.engine import PREFILL_MIN_TOKENS

    art = quantized("int4-asym", "openvino")
    split = _engine(art, Attention.PAGED, precision=Precision.SPLIT)
    bf16 = _engine(art, Attention.PAGED, precision=Precision.BF16, kv_cache=KVCachePrecision.U8)
    f32 = _engine(art, Attention.PAGED, precision=Precision.F32, kv_cache=KVCachePrecision.U8)
    choices = split.kernel_choices()
    assert choices["precision"].startswith("split") and choices["kv cache"] == "u8", choices
    prompt = np.arange(1, 5 + PREFILL_MIN_TOKENS)[None]
    first = split.forward(prompt)
    assert np.array_equal(first, bf16.forward(prompt))
    f32.forward(prompt)
    token = np.array([[int(np.argmax(first[0, -1]))]], np.int64)
    step, bf16_step, f32_step = (engine.forward(token) for engine in (split, bf16, f32))
    assert not np.array_equal(step, bf16_step)
    assert np.abs(step - f32_step).max() <= 2 * np.abs(bf16_step - f32_step).max() + 0.05
    assert split.num_cached_tokens == prompt.shape[1] + 1
    with pytest.raises(OptionError, match="precision split .* needs the paged attention"):
        _engine(art, Attention.STATEFUL, precision=Precision.SPLIT)


def test_moe_experts_stay_sparse_in_the_compiled_cpu_model(export) -> None:
    """The CPU plugin keeps each expert on its routed tokens (NonZero, GatherND, its projections as
    FullyConnected, ScatterNDUpdate): nothing densifies the experts. OpenVINO's MOE fusion is the GPU
    plugin's (benchmarks/moe_openvino_probe.py: its vectorized pattern stays dense on the CPU)."""
    out = export("qwen2_moe", target="openvino")
    compiled = ov.Core().compile_model(str(out / "openvino_model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    kinds = [op.get_rt_info()["layerType"].astype(str) for op in compiled.get_runtime_model().get_ops()]
    sparse_layers, experts = 2, 4
    assert kinds.count("NonZero") == sparse_layers * experts
    assert kinds.count("ScatterNDUpdate") == sparse_layers * experts
    assert "MOE" not in kinds
    # per sparse layer: router, 3 per expert, shared expert 3 + gate; dense layer 1: 3; per layer 4
    # attention projections (q, k, v, o); the lm_head
    projections = sparse_layers * (1 + 3 * experts + 4) + 3 + 3 * 4 + 1
    assert kinds.count("FullyConnected") == projections
