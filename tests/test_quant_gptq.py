"""GPTQ: the algorithm (against RTN on the same scales, column independence, act-order layout) and
the export path (layer-by-layer calibration, stored codes used as they are, scratch cleaned up)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from qwen_export.cli import app
from qwen_export.errors import OptionError
from qwen_export.export import calibration as calib
from qwen_export.export import parity
from qwen_export.export.gptq import (
    DiagonalAccumulator,
    Geometry,
    GPTQSettings,
    HessianAccumulator,
    factorize,
    gptq_quantize,
    output_error,
    weighted_quantize,
)
from qwen_export.export.gptq_clip import clip_quantize
from qwen_export.export.options import export_options
from qwen_export.export.pipeline import ExportOptions
from qwen_export.export.pipeline import export as run_export
from qwen_export.quant.algorithms import clip_search, default_clip_grid, quantize
from qwen_export.quant.numeric import dequantize
from qwen_export.quant.scheme import QuantAlgorithm, QuantScheme, WeightFormat
from qwen_export.runtime.loader import open_artifact

K, N, T = 256, 96, 1024


def _problem(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A weight and the Hessian of correlated inputs with a few outlier channels (as real LLM
    activations have): where error compensation pays."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(5, size=(K, N)) * 0.02).astype(np.float32)
    mix = rng.standard_normal((K, K)) / np.sqrt(K) + np.eye(K)
    x = (rng.standard_normal((T, K)) @ mix * np.exp(rng.normal(0, 1, K))).astype(np.float32)
    x[:, :4] *= 10
    return w, (x.T.astype(np.float64) @ x).astype(np.float32)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_lowers_the_output_error(symmetric: bool, act_order: bool) -> None:
    w, h = _problem()
    rtn = quantize(w, 4, 32, 0, symmetric)
    settings = GPTQSettings(act_order=act_order)
    grid = default_clip_grid(4, symmetric, base_4bit=settings.clip_grid_4bit)  # the scales GPTQ may choose
    clip = clip_search(w, 4, 32, 0, symmetric, grid=grid, importance=np.diag(h))
    q = gptq_quantize(w, h, Geometry(4, 32, symmetric), settings)
    lo, hi = (-8, 7) if symmetric else (0, 15)
    assert q.codes.dtype == (np.int8 if symmetric else np.uint8)
    assert q.codes.min() >= lo and q.codes.max() <= hi and q.codes.shape == (K, N)
    assert q.scales.shape == (K // 32, N) and (q.zero_points is None) == symmetric
    errors = {name: output_error(w, x, h) for name, x in (("rtn", rtn), ("clip", clip), ("gptq", q))}
    assert errors["gptq"] < 0.8 * errors["clip"] < 0.8 * errors["rtn"], errors


def test_gptq_with_a_diagonal_hessian_is_rtn() -> None:
    """No correlation between inputs: nothing to compensate, so GPTQ (in order, range scales) rounds
    every weight to nearest with RTN's scales."""
    w, _ = _problem()
    h = np.diag(np.linspace(1.0, 3.0, K)).astype(np.float32)
    q = gptq_quantize(w, h, Geometry(4, 32, True), GPTQSettings(act_order=False, scales=QuantAlgorithm.RTN))
    rtn = quantize(w, 4, 32, 0, True)
    assert np.array_equal(q.codes, rtn.codes) and np.array_equal(q.scales, rtn.scales)


def test_gptq_columns_are_independent() -> None:
    """q/k/v (or gate/up) quantized apart equal their concatenation quantized at once: the packed
    qkv_proj may concatenate stored results."""
    w, h = _problem(1)
    whole = gptq_quantize(w, h, Geometry(4, 32, True))
    left = gptq_quantize(w[:, :40], h, Geometry(4, 32, True))
    right = gptq_quantize(w[:, 40:], h, Geometry(4, 32, True))
    assert np.array_equal(whole.codes, np.concatenate([left.codes, right.codes], axis=1))
    assert np.array_equal(whole.scales, np.concatenate([left.scales, right.scales], axis=1))


def test_gptq_dead_inputs_and_positive_scales() -> None:
    w, h = _problem(2)
    h[5, :] = h[:, 5] = 0.0  # an input never active in calibration
    q = gptq_quantize(w, h, Geometry(4, 32, True, positive_scales=True))
    assert (q.codes[5] == 0).all() and (q.scales > 0).all()
    assert np.isfinite(dequantize(q)).all()


@pytest.mark.parametrize(
    ("k", "block", "symmetric", "scale_dtype", "positive"),
    [(256, 32, False, np.float32, False), (256, 16, True, np.float16, False), (384, 128, True, np.float32, True)],
)
def test_torch_clip_search_makes_the_numpy_search_choice(
    k: int, block: int, symmetric: bool, scale_dtype: type, positive: bool
) -> None:
    """GPTQ's clip search (PyTorch) against ``clip_search`` (numpy) on weights with outliers: the
    same scales and codes except where two clip values' errors tie to float32 rounding (then the
    error of its choice is the numpy choice's within that rounding)."""
    rng = np.random.default_rng(k + block)
    w = (rng.standard_normal((k, 200)) * 0.02).astype(np.float32)
    w[rng.integers(0, k, 40), rng.integers(0, 200, 40)] *= 25.0
    importance = rng.uniform(0.0, 4.0, k).astype(np.float32)
    ours = clip_quantize(w, importance, 4, block, symmetric, scale_dtype, positive_scales=positive)
    ref = clip_search(
        w, 4, block, 0, symmetric, scale_dtype=scale_dtype, importance=importance, positive_scales=positive
    )
    same = ours.scales == ref.scales
    assert same.mean() >= 0.999, same.mean()

    def block_error(q: Any) -> np.ndarray:
        diff = (dequantize(q) - w) ** 2 * importance[:, None]
        return diff.reshape(k // block, block, -1).sum(axis=1)

    np.testing.assert_allclose(block_error(ours), block_error(ref), rtol=1e-5, atol=1e-12)
    rows = np.repeat(same, block, axis=0)
    assert np.array_equal(ours.codes[rows], ref.codes[rows])


def test_gptq_refuses_bad_geometry() -> None:
    w, h = _problem()
    with pytest.raises(ValueError, match="block size"):
        gptq_quantize(w, h, Geometry(4, 48, True))
    with pytest.raises(ValueError, match="Hessian"):
        gptq_quantize(w, h[:10, :10], Geometry(4, 32, True))


def test_hessian_accumulator() -> None:
    import torch

    acc = HessianAccumulator(8)
    x = torch.randn(2, 5, 8)
    acc.add(x[:1])
    acc.add(x[1:])
    flat = x.reshape(-1, 8)
    assert acc.rows == 10 and torch.allclose(acc.h, flat.T @ flat, atol=1e-5)
    diag = DiagonalAccumulator(8)
    diag.add(x)
    assert diag.rows == 10 and np.allclose(diag.diagonal(), acc.diagonal(), rtol=1e-5)
    factor = torch.rand(8) + 0.5
    acc.scale_inputs(factor)
    diag.scale_inputs(factor)
    scaled = flat * factor
    assert torch.allclose(acc.h, scaled.T @ scaled, atol=1e-4) and np.allclose(
        diag.diagonal(), acc.diagonal(), rtol=1e-4
    )


@pytest.mark.parametrize("k", [3, 8, 13])
def test_hessian_accumulator_block_triangle_is_the_full_product(k: int) -> None:
    """The accumulator multiplies only the blocks on and above the diagonal: what it returns is the
    whole symmetric ``x^T x``, also when adds follow a read and a rescaling."""
    import torch

    torch.manual_seed(k)
    acc = HessianAccumulator(k)
    first, second = torch.randn(7, k), torch.randn(5, k)
    acc.add(first)
    assert torch.allclose(acc.h, first.T @ first, atol=1e-5)
    factor = torch.rand(k) + 0.5
    acc.scale_inputs(factor)
    acc.add(second)
    expected = (first * factor).T @ (first * factor) + second.T @ second
    assert torch.allclose(acc.h, expected, atol=1e-4)


def test_inputs_too_wide_for_the_calibration_get_the_weighted_clip_search(qwen2_untied: Path, tmp_path: Path) -> None:
    """With fewer calibration rows than input channels (``min_rows_per_input``), GPTQ would fit the
    calibration text: those weights get the diag(H)-weighted clip search alone, exactly
    :func:`weighted_quantize` of the weight given that diagonal; the others keep GPTQ."""
    import torch

    from qwen_export.export import calibration as calib
    from qwen_export.export.checkpoint import Checkpoint
    from qwen_export.export.gptq import weighted_quantize
    from qwen_export.export.gptq_layers import LINEARS, _dequantized, run_gptq
    from qwen_export.runtime.tokenizer import Tokenizer

    ckpt = Checkpoint.open(qwen2_untied)
    ids = calib.calibration_tokens(Tokenizer.from_dir(qwen2_untied), calib.DEFAULT_TEXT[:2000], "built-in")
    scheme = QuantScheme(WeightFormat.INT4, symmetric=False, algorithm=QuantAlgorithm.GPTQ)
    # down_proj reads 128 channels, the rest 64: a ratio between the two splits them
    settings = GPTQSettings(min_rows_per_input=len(ids) / 100, bf16_forward=False)  # the float32 reference below
    weights = run_gptq(ckpt, ckpt.spec, ids, scheme, tmp_path, settings=settings)
    stored = weights.stored
    assert (
        not stored["model.layers.0.mlp.down_proj.weight"].gptq
        and "weighted clip" in stored["model.layers.0.mlp.down_proj.weight"].describe()
    )
    assert all(v.gptq for k, v in stored.items() if "down_proj" not in k)
    runner = calib.LayerRunner(ckpt, ckpt.spec, ids)
    layer = runner.layer(0)
    # down_proj's input is what the layer computes with its other linears already quantized
    for path in (p for p in LINEARS if p != "mlp.down_proj"):
        linear = layer.get_submodule(path)
        linear.weight_t.data = torch.from_numpy(_dequantized(stored[f"model.layers.0.{path}.weight"]))
    seen = []
    layer.mlp.down_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, 128)))
    runner.run(layer, 0, advance=False)
    x = torch.cat(seen)
    w = np.ascontiguousarray(ckpt.read("model.layers.0.mlp.down_proj.weight").T, dtype=np.float32)
    geo = Geometry(4, 32, False)
    expected = weighted_quantize(w, (x * x).sum(0).numpy(), geo, settings)
    got = stored["model.layers.0.mlp.down_proj.weight"].block_quantized(False)
    assert np.array_equal(got.codes, expected.codes) and np.allclose(got.scales, expected.scales, rtol=1e-5)


@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_clip_grid_is_the_searched_grid(symmetric: bool) -> None:
    """GPTQ's shorter 4-bit grid (:data:`GPTQ_CLIP_GRID_4BIT`): its choice is the numpy search's on
    that grid (flipped ratios added for symmetric), and every chosen value comes from it."""
    from qwen_export.export.gptq import GPTQ_CLIP_GRID_4BIT
    from qwen_export.export.gptq_clip import clip_choice
    from qwen_export.quant.algorithms import default_clip_grid

    rng = np.random.default_rng(7)
    w = (rng.standard_normal((256, 160)) * 0.02).astype(np.float32)
    w[rng.integers(0, 256, 30), rng.integers(0, 160, 30)] *= 20.0
    importance = rng.uniform(0.0, 4.0, 256).astype(np.float32)
    grid = default_clip_grid(4, symmetric, base_4bit=GPTQ_CLIP_GRID_4BIT)
    assert len(grid) == len(GPTQ_CLIP_GRID_4BIT) + (4 if symmetric else 0)
    chosen = clip_choice(w, importance, 4, 32, symmetric, base_4bit=GPTQ_CLIP_GRID_4BIT)
    assert set(np.unique(chosen)) <= {float(np.float32(g)) for g in grid}
    assert len(np.unique(chosen)) > 2  # the search chose, not a constant
    ours = clip_quantize(w, importance, 4, 32, symmetric, base_4bit=GPTQ_CLIP_GRID_4BIT)
    ref = clip_search(w, 4, 32, 0, symmetric, grid=grid, importance=importance)
    assert (ours.scales == ref.scales).mean() >= 0.999
    assert GPTQSettings().describe().count(f"({len(GPTQ_CLIP_GRID_4BIT)} ratios at 4 bits)") == 1


@pytest.mark.parametrize("symmetric", [False, True])
def test_dequantized_spill_equals_the_engines_dequantize(tmp_path: Path, symmetric: bool) -> None:
    """The weights the calibration forward continues with (PyTorch) are exactly what
    :func:`~qwen_export.quant.numeric.dequantize` (ONNX DequantizeLinear's semantics) gives."""
    from qwen_export.export.gptq_layers import SpilledLinear, _dequantized

    w, _ = _problem(3)
    q = quantize(w, 4, 32, 0, symmetric)
    files = {"codes": tmp_path / "c.npy", "scales": tmp_path / "s.npy", "zeros": tmp_path / "z.npy"}
    np.save(files["codes"], q.codes)
    np.save(files["scales"], q.scales)
    if not symmetric:
        np.save(files["zeros"], q.zero_points)
    stored = SpilledLinear("model.layers.0.mlp.up_proj", files, w.shape, Geometry(4, 32, symmetric))
    got = _dequantized(stored)
    assert got.dtype == np.float32 and np.array_equal(got, dequantize(q))


# --- the export path --------------------------------------------------------------------------------


def _export(checkpoint: Path, out: Path, algorithm: QuantAlgorithm, target: str = "onnxruntime") -> Path:
    options = export_options(checkpoint, target=target, weights="int4", algorithm=algorithm.value, int8="none")
    run_export(checkpoint, out, options)
    return out


@pytest.fixture(scope="module")
def gptq_artifacts(qwen2_untied: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gptq")
    scratch = root / "tmp"
    scratch.mkdir()
    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(scratch)
    import tempfile

    tempfile.tempdir = None
    try:
        arts = {algo.value: _export(qwen2_untied, root / algo.value, algo) for algo in (QuantAlgorithm.GPTQ,)}
    finally:
        if old is None:
            os.environ.pop("TMPDIR")
        else:
            os.environ["TMPDIR"] = old
        tempfile.tempdir = None
    arts["scratch"] = scratch
    arts["rtn"] = _export(qwen2_untied, root / "rtn", QuantAlgorithm.RTN)
    return arts


MIXED = ("model.layers.*.mlp.down_proj", "*.v_proj", "lm_head")  # --int8: every down_proj, v_proj, lm_head


def _mixed(checkpoint: Path, out: Path, algorithm: QuantAlgorithm, target: str = "onnxruntime") -> Path:
    """``MIXED`` at 8 bits, and ONNX Runtime's default finer blocks on every target (the same weights)."""
    blocks = ["lm_head=16", "model.layers.*.mlp.down_proj=16"]
    options = export_options(
        checkpoint, target=target, weights="int4", algorithm=algorithm.value, int8=list(MIXED), block=blocks
    )
    run_export(checkpoint, out, options)
    return out


def _nbits(artifact: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(artifact / "model.onnx", load_external_data=False)
    return {
        n.input[1].removesuffix(".weight_t.B"): next(a.i for a in n.attribute if a.name == "bits")
        for n in model.graph.node
        if n.op_type == "MatMulNBits"
    }


def test_int8_mixed_precision(gptq_artifacts: dict[str, Path], export: Any, qwen2_untied: Path, tmp_path: Path) -> None:
    """``--int8``: the selected linears (GPTQ's own 8-bit codes, used as computed) are 8-bit
    MatMulNBits, the rest 4-bit; recorded and shown; the result is closer to fp32 than plain GPTQ on
    held-out text, and OpenVINO runs the same weights to the same logits."""
    mixed = _mixed(qwen2_untied, tmp_path / "gptq", QuantAlgorithm.GPTQ)
    bits = _nbits(mixed)
    eight = {m for m, b in bits.items() if b == 8}
    # v at 8 bits and q/k at 4: the three stay separate MatMuls (one packed weight has one bit width)
    assert eight == {"lm_head"} | {
        f"model.layers.{i}.{m}" for i in (0, 1) for m in ("mlp.down_proj", "self_attn.v_proj")
    }
    assert bits["model.layers.0.self_attn.q_proj"] == bits["model.layers.1.self_attn.k_proj"] == 4
    assert not any(m.endswith("qkv_proj") for m in bits)
    manifest = json.loads((mixed / "manifest.json").read_text())
    assert manifest["extra"]["quantization"]["int8_weights"] == list(MIXED)
    fired = next(p["fired"] for p in manifest["passes"] if p["name"] == "quantize")
    assert fired.get("prequantized") == 15 and not fired.get("requantized"), fired  # GPTQ's 8-bit codes used
    loaded = open_artifact(mixed)
    ids = loaded.tokenizer.encode(parity.DEFAULT_TEXT)[:96]
    ref = parity.artifact_logits(open_artifact(export("qwen2_untied")).engine, ids)

    def kl(artifact: Path) -> float:
        logits = parity.artifact_logits(open_artifact(artifact).engine, ids)
        return parity.compare_logits(ref[:-1], logits[:-1], np.asarray(ids[1:]))["mean_kl"]

    assert kl(mixed) < kl(gptq_artifacts["gptq"])
    ov = _mixed(qwen2_untied, tmp_path / "ov", QuantAlgorithm.RTN, target="openvino")
    ort_rtn = _mixed(qwen2_untied, tmp_path / "ort", QuantAlgorithm.RTN)
    assert kl(ov) == pytest.approx(kl(ort_rtn), rel=0.05, abs=1e-3)


def test_gptq_export_records_and_cleans_up(gptq_artifacts: dict[str, Path]) -> None:
    manifest = json.loads((gptq_artifacts["gptq"] / "manifest.json").read_text())
    quant = manifest["extra"]["quantization"]
    assert quant["algorithm"] == "gptq"
    assert quant["calibration"]["source"] == "built-in" and quant["calibration"]["tokens"] > 1000
    assert "act-order" in quant["calibration"]["gptq"]
    fired = next(p["fired"] for p in manifest["passes"] if p["name"] == "quantize")
    # 2 layers x (packed qkv, o, gate, up, down) + the untied lm_head: every one the stored GPTQ codes
    assert fired.get("prequantized") == 11 and not fired.get("requantized"), fired
    assert list(gptq_artifacts["scratch"].iterdir()) == []  # the spilled codes are gone


def test_gptq_more_accurate_than_rtn(gptq_artifacts: dict[str, Path], export: Any, capsys: Any) -> None:
    """On a stretch of the calibration text (the error GPTQ minimises, layer by layer) the GPTQ
    artifact is closer to fp32 than RTN's: same size, same graph. This checks the export path (GPTQ's
    codes are what the engine computes with). Held-out text is no test on a random 64-wide model
    (there GPTQ and RTN are within a few percent either way, as the block sizes change); GPTQ's gain
    on held-out text is measured on the real 1.5B (benchmarks/README.md)."""
    ids = _calibration_ids(gptq_artifacts["gptq"])
    ref = parity.artifact_logits(open_artifact(export("qwen2_untied")).engine, ids)
    metrics = {
        algo: parity.compare_logits(
            ref[:-1], parity.artifact_logits(open_artifact(gptq_artifacts[algo]).engine, ids)[:-1], np.asarray(ids[1:])
        )
        for algo in ("rtn", "gptq")
    }
    with capsys.disabled():
        print("\nint4 gptq vs rtn (qwen2_untied): " + json.dumps(metrics))
    assert metrics["gptq"]["mean_kl"] < metrics["rtn"]["mean_kl"], metrics
    sizes = {a: (gptq_artifacts[a] / "model.onnx.data").stat().st_size for a in ("rtn", "gptq")}
    assert sizes["rtn"] == sizes["gptq"]


def _calibration_ids(artifact: Path) -> list[int]:
    """96 tokens of the built-in calibration text (past its start), as the export tokenized it."""
    text, source = calib.calibration_text(None)
    return calib.calibration_tokens(open_artifact(artifact).tokenizer, text, source)[200:296]


def test_check_against_another_artifact_and_perplexity_without_transformers(
    gptq_artifacts: dict[str, Path], export: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The int4 artifact checked against the fp32 one, and perplexity, with transformers unimportable."""
    import sys

    from qwen_export.runtime.perplexity import perplexity

    fp32 = export("qwen2_untied")
    text = tmp_path / "t.txt"
    text.write_text(parity.DEFAULT_TEXT * 2, encoding="utf-8")
    runner = CliRunner()
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "transformers", None)
        args = ["check", str(gptq_artifacts["gptq"]), "--reference", str(fp32), "--max-tokens", "24"]
        checked = runner.invoke(app, [*args, "--greedy-tokens", "4", "--json"], catch_exceptions=False)
        ppl = runner.invoke(
            app, ["perplexity", str(fp32), "--text", str(text), "--window", "16", "--max-tokens", "40", "--json"]
        )
    assert checked.exit_code in (0, 1), checked.output  # 1: past the int4 thresholds (a random tiny model)
    if checked.exit_code == 1:
        assert "note: this is a 64-wide model" in checked.stderr
    report = json.loads(checked.stdout)
    ids = open_artifact(fp32).tokenizer.encode(text.read_text(encoding="utf-8"))
    ref = parity.artifact_logits(open_artifact(fp32).engine, ids[:24])
    art = parity.artifact_logits(open_artifact(gptq_artifacts["gptq"]).engine, ids[:24])
    expected = parity.compare_logits(ref[:-1], art[:-1], np.asarray(ids[1:24]))
    assert report["tokens"] == 23 and report["mean_kl"] == pytest.approx(expected["mean_kl"], rel=1e-6)
    assert report["ppl_reference"] == pytest.approx(expected["ppl_ref"], rel=1e-6)
    assert ppl.exit_code == 0, ppl.output
    measured = json.loads(ppl.stdout)
    assert (measured["tokens"], measured["windows"]) == (15 + 15 + 7, 3)  # 40 tokens in windows of 16
    engine = open_artifact(fp32).engine
    one_window = perplexity(engine, ids[:16], 16)  # one window: the parity metric's perplexity
    assert one_window.perplexity == pytest.approx(
        parity.compare_logits(ref[:15], ref[:15], np.asarray(ids[1:16]))["ppl_art"]
    )
    assert 0 < measured["perplexity_stderr"] < measured["perplexity"]
    with pytest.raises(OptionError, match="window must be 2"):
        perplexity(engine, ids, 1)


@pytest.mark.parametrize("target", ["openvino", "tensorrt"])
def test_gptq_other_targets(target: str, qwen2_tied: Path, tmp_path: Path) -> None:
    out = _export(qwen2_tied, tmp_path / target, QuantAlgorithm.GPTQ, target)
    manifest = json.loads((out / "manifest.json").read_text())
    fired = next(p["fired"] for p in manifest["passes"] if p["name"] == "quantize")
    # q, k and v apart (these targets do not pack them): 2 layers x 7 linears, and on OpenVINO the
    # table (the tied head shares the embedding; TensorRT keeps it in the model dtype: not GPTQ's)
    tables = 0 if target == "tensorrt" else 1
    assert fired.get("prequantized") == 14 + tables and not fired.get("requantized"), fired


def _fired(artifact: Path) -> dict[str, int]:
    """The quantize pass's counts, from the artifact's manifest."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    return next(p["fired"] for p in manifest["passes"] if p["name"] == "quantize")


def test_stored_quantization_seen_transposed() -> None:
    """A stored W^T [K, N] along K read as W [N, K] along axis 1 (a tied table stored as its
    lm_head): the same codes, scales and zero points transposed, and the same dequantized values."""
    import onnx_ir as ir

    from qwen_export.quant.tensors import StoredQuantization

    w_t = np.random.default_rng(3).standard_normal((64, 24)).astype(np.float32)
    stored_q = quantize(w_t, 4, 32, 0, False)

    class Stored:
        shape, bits, block_size = (64, 24), 4, 32

        def block_quantized(self, symmetric: bool, scale_dtype: type) -> Any:
            return stored_q

    seen = StoredQuantization(w_t.T, Stored(), symmetric=False, scale_dtype=ir.DataType.FLOAT, transposed=True)
    q = seen.quantize()
    assert q.axis == 1 and q.codes.shape == (24, 64) and q.scales.shape == (24, 2)
    assert np.array_equal(dequantize(q), dequantize(stored_q).T)
    assert seen.fresh("x").quantize().axis == 1
    with pytest.raises(ValueError, match="shape"):
        StoredQuantization(w_t, Stored(), symmetric=False, scale_dtype=ir.DataType.FLOAT, transposed=True)


def test_tied_table_is_quantized_as_the_lm_head(qwen2_tied: Path, tmp_path: Path, monkeypatch: Any) -> None:
    """GPTQ quantizes a tied model's 4-bit table last, as the lm_head it also is: exactly GPTQ of W^T
    on the Hessian of the final norm's outputs of the quantized model, with a lower output error there
    than RTN's. The export uses those codes for the embedding and the head (one more stored weight
    than with the table left to RTN, the same size)."""
    import torch

    from qwen_export.export.checkpoint import Checkpoint
    from qwen_export.export.gptq_layers import LINEARS, _dequantized, run_gptq
    from qwen_export.quant.numeric import quantize_rtn
    from qwen_export.runtime.tokenizer import Tokenizer

    ckpt = Checkpoint.open(qwen2_tied)
    ids = calib.calibration_tokens(Tokenizer.from_dir(qwen2_tied), calib.DEFAULT_TEXT[:2000], "built-in")
    scheme = QuantScheme(WeightFormat.INT4, symmetric=False, algorithm=QuantAlgorithm.GPTQ, embedding_bits=4)
    # the float32 reference below; GPTQ on every column (the default: the first HEAD_GPTQ_COLUMNS)
    settings = GPTQSettings(bf16_forward=False, head_gptq_columns=None)
    (tmp_path / "scratch").mkdir()
    stored = run_gptq(ckpt, ckpt.spec, ids, scheme, tmp_path / "scratch", settings=settings).stored
    table = stored["model.embed_tokens.weight"]
    hidden = ckpt.spec.hidden_size
    assert table.gptq and table.shape == (hidden, ckpt.spec.vocab_size)
    runner = calib.LayerRunner(ckpt, ckpt.spec, ids)
    for i in range(ckpt.spec.num_hidden_layers):  # the quantized model's forward, as GPTQ ran it
        layer = runner.layer(i)
        for path in LINEARS:
            weight = torch.from_numpy(_dequantized(stored[f"model.layers.{i}.{path}.weight"]))
            layer.get_submodule(path).weight_t.data = weight
        runner.run(layer, i, advance=True)
    acc = HessianAccumulator(hidden)
    for x in runner.final_norm():
        acc.add(x)
    w = np.ascontiguousarray(ckpt.read("model.embed_tokens.weight").T, dtype=np.float32)
    expected = gptq_quantize(w, acc.h.clone(), Geometry(4, 32, False), settings)
    got = table.block_quantized(False)
    assert np.array_equal(got.codes, expected.codes) and np.allclose(got.scales, expected.scales, rtol=1e-5)
    rtn = quantize_rtn(w, 4, 32, 0, False)
    assert output_error(w, got, acc.h) < 0.8 * output_error(w, rtn, acc.h)

    # GPTQ on the first token ids only: those columns as above, the weighted clip search for the rest
    first = ckpt.spec.vocab_size // 3
    (tmp_path / "scratch-first").mkdir()
    part = dataclasses.replace(settings, head_gptq_columns=first)
    split = run_gptq(ckpt, ckpt.spec, ids, scheme, tmp_path / "scratch-first", settings=part).stored
    head = split["model.embed_tokens.weight"]
    assert head.gptq and head.gptq_columns == first and f"first {first} output columns" in head.describe()
    codes = head.block_quantized(False).codes
    assert np.array_equal(codes[:, :first], expected.codes[:, :first])
    rest = weighted_quantize(np.ascontiguousarray(w[:, first:]), acc.diagonal(), Geometry(4, 32, False), part)
    assert np.array_equal(codes[:, first:], rest.codes)
    assert not np.array_equal(codes[:, first:], expected.codes[:, first:])

    from qwen_export.export import gptq_layers

    gptq = _export(qwen2_tied, tmp_path / "gptq", QuantAlgorithm.GPTQ)
    manifest = json.loads((gptq / "manifest.json").read_text())
    # 2 layers x (packed qkv, o, gate, up, down) + the table, every one the stored GPTQ codes
    fired = _fired(gptq)
    assert fired.get("prequantized") == 11 and fired["tied_lm_head"] == 1 and not fired.get("requantized"), fired
    assert "tied table as the lm_head" in manifest["extra"]["quantization"]["calibration"]["gptq"]
    with monkeypatch.context() as patch:
        patch.setattr(gptq_layers, "_head_weight", lambda *args: None)
        rtn_table = _export(qwen2_tied, tmp_path / "rtn-table", QuantAlgorithm.GPTQ)
    assert _fired(rtn_table).get("prequantized") == 10
    assert (gptq / "model.onnx.data").stat().st_size == (rtn_table / "model.onnx.data").stat().st_size
    assert (gptq / "model.onnx.data").read_bytes() != (rtn_table / "model.onnx.data").read_bytes()


def test_head_gptq_columns_must_be_positive() -> None:
    with pytest.raises(ValueError, match="head_gptq_columns"):
        GPTQSettings(head_gptq_columns=0)
    assert (
        "token ids < 32768" in GPTQSettings().describe()
        and "token ids" not in GPTQSettings(head_gptq_columns=None).describe()
    )


def test_gptq_options() -> None:
    with pytest.raises(OptionError, match="block"):
        export_options(target="openvino", weights="int4", block_size=0, algorithm="gptq")
    ExportOptions(quant=QuantScheme(WeightFormat.INT4, algorithm=QuantAlgorithm.GPTQ), calibration=Path("x.txt"))


def test_cli_gptq_calibration_error(qwen2_tied: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "export",
            str(qwen2_tied),
            "-o",
            str(tmp_path / "x"),
            "--weights",
            "int4",
            "--algorithm",
            "gptq",
            "--calibration",
            str(tmp_path / "missing.txt"),
        ],
    )
    assert result.exit_code == 2 and "file not found" in result.output
    assert not (tmp_path / "x").exists()


def test_awq_folds_before_gptq_preserve_the_function(qwen2_untied: Path) -> None:
    """AWQ inside the GPTQ loop: the scaled linears and the folded norms / up_proj rows, read back
    through the weight source, compute what the original layer computes (before quantization)."""
    import torch

    from qwen_export.export import calibration as calib
    from qwen_export.export.checkpoint import Checkpoint
    from qwen_export.export.gptq_layers import GPTQWeights, _awq_layer, _layer_hessians
    from qwen_export.runtime.tokenizer import Tokenizer

    ckpt = Checkpoint.open(qwen2_untied)
    ids = calib.calibration_tokens(Tokenizer.from_dir(qwen2_untied), calib.DEFAULT_TEXT[:2000], "built-in")
    runner = calib.LayerRunner(ckpt, ckpt.spec, ids)
    layer = runner.layer(0)
    hessians, stats = _layer_hessians(runner, layer, 0, True, lambda k: k < 100)  # down_proj (K 128): diagonal
    assert isinstance(hessians["down"], DiagonalAccumulator) and not isinstance(hessians["qkv"], DiagonalAccumulator)
    before = {g: h.h.clone() for g, h in hessians.items()}
    weights = GPTQWeights(ckpt)
    scheme = QuantScheme(WeightFormat.INT4, algorithm=QuantAlgorithm.AWQ_GPTQ)
    _awq_layer(weights, layer, 0, stats, hessians, scheme, grid=20)
    assert set(weights.factors) >= {"model.layers.0.input_layernorm.weight", "model.layers.0.mlp.up_proj.weight"}
    assert any(not np.allclose(f, 1.0) for fs in weights.factors.values() for f in fs.values())
    scaled = calib.LayerRunner(weights, ckpt.spec, ids).layer(0)
    x = runner.hidden[0]
    cos, sin, masks = runner.extras[0]
    with torch.no_grad():
        args = (cos, sin, masks[ckpt.spec.layer_types[0]], runner.empty_kv, runner.empty_kv)
        ref, got = runner.layer(0)(x, *args)[0], scaled(x, *args)[0]  # a fresh original layer
    assert torch.allclose(ref, got, atol=1e-4 * float(ref.abs().max())), float((ref - got).abs().max())
    # each Hessian became that of the scaled inputs x / s: H[a, b] / (s_a s_b)
    s = weights.factors["model.layers.0.self_attn.q_proj.weight"][1]
    expected = before["qkv"] / torch.from_numpy(np.outer(s, s))
    assert torch.allclose(hessians["qkv"].h, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    assert torch.equal(hessians["o"].h, before["o"])  # o_proj is not scaled (GQA)
    s = weights.factors["model.layers.0.mlp.down_proj.weight"][1]
    assert torch.allclose(hessians["down"].h, before["down"] / torch.from_numpy(s * s), rtol=1e-4)


# --- the layer-by-layer run: one batched pass, int8 parts, bf16 products -------------------------------


def _gptq_run(checkpoint: Path, tmp_path: Path, scheme: QuantScheme, **settings: Any) -> Any:
    from qwen_export.export import calibration as calib
    from qwen_export.export.checkpoint import Checkpoint
    from qwen_export.export.gptq_layers import run_gptq
    from qwen_export.runtime.tokenizer import Tokenizer

    ckpt = Checkpoint.open(checkpoint)
    ids = calib.calibration_tokens(Tokenizer.from_dir(checkpoint), calib.DEFAULT_TEXT[:3000], "built-in")
    return ckpt, ids, run_gptq(ckpt, ckpt.spec, ids, scheme, tmp_path, settings=GPTQSettings(**settings))


def test_calibration_sequences_have_one_length_so_a_layer_runs_as_one_batch(qwen2_untied: Path) -> None:
    """The tokens are split into sequences of one length (at most SEQUENCE_LENGTH, fewer than one
    token per sequence dropped), and the batched run equals the sequence-by-sequence one."""
    from qwen_export.export import calibration as calib
    from qwen_export.export.checkpoint import Checkpoint

    ckpt = Checkpoint.open(qwen2_untied)
    ids = list(range(5, 5 + calib.SEQUENCE_LENGTH + 301))
    runner = calib.LayerRunner(ckpt, ckpt.spec, ids)
    assert [x.shape[1] for x in runner.hidden] == [406, 406]
    batched = calib.LayerRunner(ckpt, ckpt.spec, ids)
    layer = runner.layer(0)
    runner.run(layer, 0, advance=True)
    batched.run_batched(layer, 0)
    for a, b in zip(runner.hidden, batched.hidden, strict=True):
        assert a.shape == b.shape and float((a - b).abs().max()) <= 1e-5 * float(a.abs().max())


def test_int8_parts_of_a_mixed_layout_get_the_weighted_clip_search(
    qwen2_untied: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    """With ``--int8`` parts, GPTQ runs on the int4 weights only (``max_bits``); the int8 ones get
    the diag(H)-weighted clip search, and say so. An input whose linears are all 8-bit sums only
    the Hessian's diagonal."""
    scheme = QuantScheme(
        WeightFormat.INT4,
        symmetric=False,
        algorithm=QuantAlgorithm.GPTQ,
        int8_weights=("model.layers.*.self_attn.*", "lm_head"),
    )
    from qwen_export.export import gptq_layers

    factorized = []
    monkeypatch.setattr(gptq_layers, "factorize", lambda h, s: factorized.append(h.shape) or factorize(h, s))
    ckpt, _, weights = _gptq_run(qwen2_untied, tmp_path, scheme, bf16_forward=False)
    # the attention's inputs and the lm_head's feed 8-bit weights only: their diagonals, no [K, K]
    # Hessian (gate/up's and down_proj's are factorized)
    assert len(factorized) == 2 * ckpt.spec.num_hidden_layers
    stored = weights.stored
    eight = {k for k in stored if "self_attn" in k or k == "lm_head.weight"}
    assert eight and all(stored[k].bits == 8 and not stored[k].gptq for k in eight)
    assert all("weights wider than GPTQ's bits" in stored[k].describe() for k in eight)
    assert all(v.gptq and v.bits == 4 for k, v in stored.items() if k not in eight)


def test_bf16_products_keep_gptq_s_output_error(qwen2_untied: Path, tmp_path: Path) -> None:
    """The calibration forward in bfloat16 (autocast: the default on CPUs with native bf16). GPTQ's
    codes are not a smooth function of the Hessian (one flipped rounding changes the error fed to
    every later row), so the check is GPTQ's objective: layer 0's gate/up, whose input depends on
    the attention computed in bf16, measured on the float32 run's Hessian of that input. The bf16
    run's output error stays close to the float32 run's (which minimised exactly that) and well
    under the weighted clip search's (no error compensation)."""
    import torch

    from qwen_export.export import calibration as calib
    from qwen_export.export.gptq_layers import _dequantized

    scheme = QuantScheme(WeightFormat.INT4, symmetric=False, algorithm=QuantAlgorithm.GPTQ)
    runs = {}
    for name, settings in {
        "f32": {"bf16_forward": False},
        "bf16": {"bf16_forward": True},
        "clip": {"bf16_forward": False, "min_rows_per_input": 1e9},
    }.items():
        (tmp_path / name).mkdir()
        ckpt, ids, weights = _gptq_run(qwen2_untied, tmp_path / name, scheme, **settings)
        runs[name] = weights.stored
    runner = calib.LayerRunner(ckpt, ckpt.spec, ids)
    layer = runner.layer(0)
    for path in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"):
        layer.get_submodule(path).weight_t.data = torch.from_numpy(
            _dequantized(runs["f32"][f"model.layers.0.{path}.weight"])
        )
    seen = []
    layer.mlp.gate_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    runner.run(layer, 0, advance=False)
    x = torch.cat(seen)
    hessian = (x.T @ x).numpy()
    for proj in ("gate_proj", "up_proj"):
        name = f"model.layers.0.mlp.{proj}.weight"
        w = np.ascontiguousarray(ckpt.read(name).T, dtype=np.float32)
        err = {r: output_error(w, runs[r][name].block_quantized(False), hessian) for r in runs}
        assert err["bf16"] <= 1.1 * err["f32"] and err["bf16"] < 0.9 * err["clip"], (proj, err)


def test_wide_models_get_enough_calibration_rows(qwen2_untied: Path, tmp_path: Path) -> None:
    """GPTQ runs on :data:`GPTQ_MAX_TOKENS` tokens unless the hidden size needs more rows (7B:
    3,584 channels): then on enough for one row per channel, as the runner cuts them; a text too
    short for that is said, and those inputs get the weighted clip search."""
    import dataclasses

    from qwen_export.export import calibration as calib
    from qwen_export.export.gptq import GPTQ_MAX_TOKENS, gptq_width
    from qwen_export.export.options import export_options
    from qwen_export.export.pipeline import ExportHooks
    from qwen_export.export.pipeline import export as run_export
    from qwen_export.spec import ModelSpec

    settings = GPTQSettings()
    spec = ModelSpec.from_config_file(qwen2_untied / "config.json")
    assert settings.tokens_for(gptq_width(spec), calib.SEQUENCE_LENGTH) == GPTQ_MAX_TOKENS
    for hidden, heads in ((1536, 12), (3584, 28), (5120, 40), (8192, 64)):
        wide = dataclasses.replace(spec, hidden_size=hidden, num_attention_heads=heads, head_dim=128)
        n = settings.tokens_for(gptq_width(wide), calib.SEQUENCE_LENGTH)
        sequences = -(-n // calib.SEQUENCE_LENGTH)
        rows = sequences * (n // sequences)  # LayerRunner's equal lengths
        assert settings.uses_gptq(hidden, rows) and n <= max(GPTQ_MAX_TOKENS, hidden + hidden // 256 + 1)
    assert len(calib.calibration_tokens(_Tokens(), "x" * 9000, "t", limit=5000)) == 5000
    short = tmp_path / "short.txt"
    short.write_text(
        "def add(a, b):\n    return a + b\n\nprint(add(2, 3), add(4, 5))  # five, nine\n", encoding="utf-8"
    )
    said: list[str] = []
    options = export_options(qwen2_untied, weights="int4", calibration=short)
    run_export(qwen2_untied, tmp_path / "a", options, ExportHooks(message=said.append))
    assert any("get the weighted clip search instead" in text for text in said), said


class _Tokens:
    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


def test_packed_k_and_v_give_the_unpacked_logits(qwen2_tied: Path, tmp_path: Path, monkeypatch: Any) -> None:
    """q 4-bit, k and v 8-bit alike: ONNX Runtime packs k and v into one ``kv_proj`` (GPTQ's stored
    codes concatenated), and the logits are those of the three separate projections, bit for bit."""
    import onnx

    import qwen_export.targets.onnxruntime as ort_target
    from qwen_export.export import export as library_export

    options = dict(
        weights="int4", int8=["model.layers.*.self_attn.k_proj", "model.layers.*.self_attn.v_proj"], logits="all"
    )
    library_export(qwen2_tied, tmp_path / "packed", **options)
    monkeypatch.setattr(ort_target, "packed_kv", lambda *args: frozenset())
    library_export(qwen2_tied, tmp_path / "unpacked", **options)
    names = {}
    for kind in ("packed", "unpacked"):
        graph = onnx.load(tmp_path / kind / "model.onnx", load_external_data=False).graph
        names[kind] = {n.name.split("/")[0].split(".")[-2] for n in graph.node if n.op_type == "MatMulNBits"}
    assert "kv_proj" in names["packed"] and not {"k_proj", "v_proj"} & names["packed"]
    assert {"k_proj", "v_proj"} <= names["unpacked"] and "kv_proj" not in names["unpacked"]
    ids = np.random.default_rng(0).integers(0, 200, size=(1, 20))
    packed, unpacked = (open_artifact(tmp_path / kind).engine.forward(ids) for kind in ("packed", "unpacked"))
    np.testing.assert_array_equal(packed, unpacked)


def test_layers_read_a_large_layer_only_after_the_previous_one_is_gone() -> None:
    """GPTQ's layer loop holds one layer larger than the read-ahead limit at a time: the next is read
    once the caller dropped the previous one (a 72B layer is 3.5 GB of float32). ``enumerate`` around
    the generator keeps the previous item in its cached result tuple during the next read: the loop
    must not use it (this checks both)."""
    import gc
    import weakref

    from qwen_export.export import gptq_layers

    class Layer:
        pass

    class Runner:
        def __init__(self) -> None:
            self.made: list[weakref.ref] = []
            self.alive_at_read: list[int] = []

        def layer(self, i: int) -> Layer:
            gc.collect()
            self.alive_at_read.append(sum(ref() is not None for ref in self.made))
            made = Layer()
            self.made.append(weakref.ref(made))
            return made

    big = [gptq_layers.PREFETCH_BYTES + 1] * 4
    runner = Runner()
    for i, layer in gptq_layers._layers(runner, big):
        assert isinstance(layer, Layer) and i == len(runner.made) - 1
        del layer
    assert runner.alive_at_read == [0, 0, 0, 0]

    runner = Runner()
    for _i, layer in enumerate(gptq_layers._layers(runner, big)):
        del layer
    assert runner.alive_at_read == [0, 1, 1, 1]  # what the loop avoids

    small = [1] * 4  # read ahead: the next layer is read while the current one is in use
    runner = Runner()
    for _i, layer in gptq_layers._layers(runner, small):
        del layer
    assert max(runner.alive_at_read) <= 1
