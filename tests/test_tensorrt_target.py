"""The --target tensorrt export: graph structure, quantization form, parity of its int4/int8 graph
on ONNX Runtime CPU, and the CLI around it. (fp32/fp16 parity: tests/test_parity.py runs every
engine's tests on it; the engine and build: tests/test_tensorrt_engine.py.)"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from typer.testing import CliRunner

from qwen_export.cli import app
from qwen_export.errors import OptionError
from qwen_export.export import parity
from qwen_export.export.pipeline import ExportOptions
from qwen_export.export.pipeline import export as run_export
from qwen_export.quant.scheme import QuantScheme, WeightFormat
from qwen_export.runtime.loader import RuntimeOptions, open_artifact
from qwen_export.spec import Target
from qwen_export.targets.tensorrt.check import check_tensorrt_graph

ON_CPU = RuntimeOptions(engine=Target.ONNXRUNTIME)


def _model(art: Path) -> ir.Model:
    return ir.load(art / "model.onnx")


def _ops(model: ir.Model) -> Counter[str]:
    return Counter(f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in model.graph)


@pytest.fixture(scope="module")
def quantized(module_scratch, qwen2_untied: Path):
    """``quantized(fmt) -> artifact``: qwen2_untied exported for TensorRT with int4/int8 weights (fp32
    activations)."""

    def build(fmt: str) -> Path:
        key = ("trt-quant", fmt)
        if key not in module_scratch.cache:
            out = module_scratch.mkdir(f"trt-{fmt}") / "art"
            options = ExportOptions(target=Target.TENSORRT, quant=QuantScheme(fmt=WeightFormat(fmt)))
            run_export(qwen2_untied, out, options)
            module_scratch.cache[key] = out
        return module_scratch.cache[key]

    return build


def test_fp16_graph_is_standard_onnx_with_fp32_statistics(export) -> None:
    art = export("qwen2_tied", dtype="fp16", target="tensorrt")
    model = _model(art)
    ops = _ops(model)
    layers = 2
    assert model.opset_imports[""] >= 21
    assert all("::" not in op for op in ops), ops  # no contrib (com.microsoft) op
    assert ops["TensorScatter"] == 2 * layers and ops["ScatterElements"] == 0
    assert check_tensorrt_graph(model) == []
    # RMSNorm statistics and the softmax run in float32 inside the fp16 graph
    for node in model.graph:
        if node.op_type in ("Softmax", "ReduceMean"):
            assert node.inputs[0].dtype == ir.DataType.FLOAT, node.name
    kv = [v for v in model.graph.inputs if v.name.startswith("past_key_values.")]
    assert {v.dtype for v in kv} == {ir.DataType.FLOAT16}
    assert {str(v.shape[2]) for v in kv} == {"max_sequence_length"}
    # every present output is the TensorScatter over its own past input (the engine aliases them)
    for out in model.graph.outputs[1:]:
        node = out.producer()
        assert node.op_type == "TensorScatter" and node.inputs[0].name == out.name.replace("present", "past_key_values")


def test_manifest_records_the_fixed_layout_and_build_recipe(export) -> None:
    art = export("qwen2_tied", target="tensorrt")
    loaded = open_artifact(art, ON_CPU)
    m = loaded.manifest
    assert m.target == "tensorrt"
    assert m.extra["kv_cache"]["layout"] == "fixed"
    assert "cache_position" in m.io["inputs"]
    recipe = m.extra["tensorrt"]
    assert [p["name"] for p in recipe["profiles"]] == ["prefill", "decode"]
    assert recipe["capacity"] == m.extra["max_length"] and recipe["strongly_typed"] is True
    assert [r["name"] for r in m.passes] == ["cleanup", "kv_tensor_scatter", "tensorrt_compatibility"]


def test_kv_buffer_is_written_in_place(export) -> None:
    """The ONNX Runtime adapter binds one buffer as past and present: a step writes its columns
    there (no copy comes back), and later columns stay untouched."""
    engine = open_artifact(export("qwen2_tied", target="tensorrt"), ON_CPU).engine
    engine.forward(np.array([[5, 6, 7]], np.int64))
    buffers = [array for array, _ in engine._buffers]
    assert all(np.abs(b[:, :, :3]).sum() > 0 for b in buffers)
    assert all(np.abs(b[:, :, 3:]).sum() == 0 for b in buffers)
    engine.forward(np.array([[8]], np.int64))
    assert [array for array, _ in engine._buffers][0] is buffers[0]
    assert all(np.abs(b[:, :, 3]).sum() > 0 for b in buffers)


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_quantized_weights_have_the_form_tensorrt_accepts(quantized, fmt: str) -> None:
    art = quantized(fmt)
    model = _model(art)
    assert check_tensorrt_graph(model) == []
    dq = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    assert len(dq) == 7 * 2 + 1  # q, k, v, o, gate, up, down per layer + the untied lm_head
    for node in dq:
        codes, scales = node.inputs[0], node.inputs[1]
        assert len(node.inputs) < 3 or node.inputs[2] is None  # no zero point
        assert codes.dtype == (ir.DataType.INT4 if fmt == "int4" else ir.DataType.INT8)
        assert (scales.const_value.numpy() > 0).all()
        if fmt == "int8":  # per output channel: 1-D scales on axis 1
            assert len(scales.shape) == 1 and node.attributes.get_int("axis") == 1
            assert node.attributes.get_int("block_size", 0) == 0
        else:
            assert node.attributes.get_int("block_size") == 32
    gather = next(n for n in model.graph if n.op_type == "Gather")
    assert gather.inputs[0].is_initializer()  # the embedding stays in the model dtype
    kept = {k["tensor"] for k in open_artifact(art, ON_CPU).manifest.extra["quantization"]["kept"]}
    assert "model.embed_tokens.weight" in kept


def _dequantized_reference(checkpoint: Path, bits: int, ids: list[int]) -> np.ndarray:
    """transformers' logits with every linear weight replaced by its dequantized TensorRT-form value
    (symmetric, positive scales; int4 in blocks of 32, int8 per output channel; the embedding kept)."""
    import torch

    from qwen_export.quant.numeric import dequantize, quantize_rtn

    ref = parity.Reference(checkpoint)
    with torch.no_grad():
        for name, param in ref.model.named_parameters():
            if param.ndim != 2 or "embed_tokens" in name:
                continue
            block = 32 if bits == 4 else param.shape[1]  # HF weights are [out, in]: blocks along "in"
            q = quantize_rtn(param.numpy(), bits, block, 1, True, positive_scales=True)
            param.copy_(torch.from_numpy(dequantize(q)))
    return ref.logits(ids)


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_quantized_graph_equals_transformers_on_the_dequantized_weights(
    quantized, qwen2_untied: Path, fmt: str
) -> None:
    """The quantized TensorRT graph (run on ONNX Runtime CPU) computes exactly what transformers
    computes with the same dequantized weights: what TensorRT's weight-only DequantizeLinear means.
    (Whether int4 itself is accurate enough is a property of the weights, measured on a real model
    with qwen-export check; a tiny random model is far more sensitive than a trained one.)"""
    loaded = open_artifact(quantized(fmt), ON_CPU)
    ids = loaded.tokenizer.encode(parity.DEFAULT_TEXT)[:24]
    reference = _dequantized_reference(qwen2_untied, int(fmt[3:]), ids)
    ours = parity.artifact_logits(loaded.engine, ids)
    m = parity.compare_logits(reference[:-1], ours[:-1], np.asarray(ids[1:]))
    assert m["max_abs"] < 2e-3 and m["top1"] == 1.0 and m["mean_kl"] < 1e-6, m


def test_option_errors(qwen2_tied: Path, tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="--no-fuse"):
        ExportOptions(target=Target.TENSORRT, fuse=False)
    with pytest.raises(OptionError, match="zero points"):
        ExportOptions(target=Target.TENSORRT, quant=QuantScheme(fmt=WeightFormat.INT4, symmetric=False))
    runner = CliRunner()
    out = tmp_path / "o"
    for args, fragment in (
        (["--max-batch", "2"], "--max-batch applies to --target tensorrt"),
        (["--target", "tensorrt", "--weights", "int4", "--embedding-bits", "4"], "keeps the embedding"),
        (["--target", "tensorrt", "--weights", "int4", "--accuracy-level", "1"], "MatMulNBits"),
    ):
        result = runner.invoke(app, ["export", str(qwen2_tied), "-o", str(out), *args])
        assert result.exit_code == 2, result.output
        assert fragment in result.output
        assert not out.exists()


def test_cli_without_tensorrt_names_what_to_install(export) -> None:
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorrt is installed here: this test checks the message without it")
    art = export("qwen2_tied", target="tensorrt")
    runner = CliRunner()
    result = runner.invoke(app, ["build-engine", str(art)])
    assert result.exit_code == 2
    assert "pip install tensorrt" in result.output and len(result.output.strip().splitlines()) == 1
    result = runner.invoke(app, ["generate", str(art), "hi", "--raw", "--max-new-tokens", "2"])
    assert result.exit_code == 2 and "--engine onnxruntime" in result.output
    result = runner.invoke(
        app, ["generate", str(art), "hi", "--raw", "--max-new-tokens", "2", "--engine", "onnxruntime"]
    )
    assert result.exit_code == 0, result.output
    assert not (art / "engines").exists()  # nothing half-built left behind


def test_engine_choice_is_checked(export) -> None:
    art = export("qwen2_tied")
    with pytest.raises(OptionError, match="runs on --engine onnxruntime"):
        open_artifact(art, RuntimeOptions(engine=Target.TENSORRT))


def test_library_load_on_the_cpu_adapter(export) -> None:
    import qwen_export

    art = export("qwen2_tied", target="tensorrt")
    llm = qwen_export.load(art, engine="onnxruntime")
    assert isinstance(llm.generate("hi", max_new_tokens=3), str)
    with pytest.raises(OptionError, match="TensorRT engine runs on cuda"):
        qwen_export.load(art, engine="tensorrt", device="cpu")
    with pytest.raises(OptionError, match="unknown device"):
        qwen_export.load(art, device="tpu")


def test_per_channel_is_refused_where_kernels_need_blocks(qwen2_tied: Path, tmp_path: Path) -> None:
    per_channel = QuantScheme(fmt=WeightFormat.INT4, block_size=0)
    for target, fragment in ((Target.ONNXRUNTIME, "per-channel"), (Target.TENSORRT, "int4 weights need blocks")):
        with pytest.raises(OptionError, match=fragment):
            run_export(qwen2_tied, tmp_path / "o", ExportOptions(target=target, quant=per_channel))
        assert not (tmp_path / "o").exists()
