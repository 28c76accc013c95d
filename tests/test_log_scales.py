"""``--scales log8``: 4-bit block scales stored as a byte on a per-row logarithmic grid
(:mod:`qwen_export.quant.log_scales`), computed back by nodes ONNX Runtime folds at load."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import ModuleScratch
from typer.testing import CliRunner

from qwen_export.artifact import load_manifest
from qwen_export.cli import app
from qwen_export.export import parity
from qwen_export.export.options import export_options
from qwen_export.export.pipeline import ExportOptions
from qwen_export.export.pipeline import export as run_export
from qwen_export.passes import cleanup
from qwen_export.quant import log_scales
from qwen_export.quant.numeric import BlockQuantized, quantize_rtn
from qwen_export.quant.scheme import QuantScheme, ScaleFormat, WeightFormat
from qwen_export.runtime import bandwidth
from qwen_export.runtime.loader import open_artifact
from qwen_export.targets.onnxruntime import lowered
from qwen_export.targets.onnxruntime.prefill_int8 import _Reader, dequantize

TABLE = "model.embed_tokens.weight"
LINEAR = "model.layers.0.mlp.down_proj.weight_t"
H, INTER = 64, 128  # the tiny models' hidden and intermediate sizes
TOKENS = 32


def _bound(step: np.ndarray) -> np.ndarray:
    """The largest relative distance from a scale to its grid point: half a step of the row's grid."""
    return 2.0 ** (step.astype(np.float64) / (2 * log_scales.STEP_UNIT)) - 1 + 2.0**-10  # + float16's top


def test_encoded_scales_are_within_half_a_grid_step() -> None:
    rng = np.random.default_rng(0)
    scales = np.exp(rng.normal(-5.0, 0.7, (300, 48))).astype(np.float32)
    scales[7] *= np.geomspace(1.0, 1e-4, 48, dtype=np.float32)  # a row spanning 13 octaves
    log = log_scales.encode(scales)
    assert log.codes.dtype == np.uint8 and log.top.dtype == np.float16 and log.step.dtype == np.uint8
    decoded = log_scales.decode(log)
    error = np.abs(decoded / scales - 1)
    assert (error <= _bound(log.step)).all()
    assert float(np.sqrt((error[:7] ** 2).mean())) < 0.005  # rows of a few octaves: within half a percent
    assert log.step[7, 0] > log.step[0, 0]  # the wide row took a coarser grid
    assert log_scales.stored_bytes(300, 48) == 300 * 48 + 3 * 300


def test_free_and_zero_blocks_neither_widen_a_row_nor_fail() -> None:
    scales = np.full((3, 4), 0.01, np.float32)
    scales[0, 1] = 1.0  # the quantizer's scale of an all-zero block: free
    scales[1, :] = 0.0
    free = np.zeros((3, 4), bool)
    free[0, 1] = True
    log = log_scales.encode(scales, free)
    decoded = log_scales.decode(log)
    assert np.allclose(decoded[0, [0, 2, 3]], 0.01, rtol=2e-3) and decoded[0, 1] == pytest.approx(0.01, rel=2e-3)
    assert (decoded[1] == 0).all() and np.allclose(decoded[2], 0.01, rtol=2e-3)


@pytest.mark.parametrize("bad", [-0.1, math.inf, 1e6])
def test_negative_infinite_or_huge_scales_are_refused(bad: float) -> None:
    scales = np.full((2, 4), 0.5, np.float32)
    scales[1, 2] = bad
    with pytest.raises(ValueError, match="non-negative|float16"):
        log_scales.encode(scales)


def test_free_blocks_are_those_on_the_zero_point() -> None:
    w = np.random.default_rng(1).normal(size=(64, 8)).astype(np.float32)
    w[32:, 3] = 0.0  # column 3's second block: every code on the zero point
    q = quantize_rtn(w, 4, 32, 0, False)
    free = log_scales.free_blocks(q)
    assert free.shape == q.scales.shape == (2, 8)
    assert free[1, 3] and free.sum() == 1
    signed = BlockQuantized(np.zeros((2, 64), np.int8), np.ones((2, 2), np.float32), None, 4, 32, 1)
    assert log_scales.free_blocks(signed).all()


# --- the ONNX Runtime lowering -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(qwen2_tied: Path, module_scratch: ModuleScratch) -> dict[ScaleFormat, Path]:
    """The tiny tied model at int4 asymmetric (RTN), with float16 and with log8 scales; every
    weight's scales stored compactly (the tiny linears' are under the size that is otherwise kept
    float32)."""
    root = module_scratch.mkdir("log8")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        for module in (lowered, cleanup):  # the export's own folding would fold them back
            mp.setattr(module, "FOLD_SIZE_LIMIT", 16)
        for fmt in ScaleFormat:
            scheme = QuantScheme(WeightFormat.INT4, symmetric=False, embedding_bits=4, scale_format=fmt)
            run_export(qwen2_tied, root / fmt.value, ExportOptions(quant=scheme))
            out[fmt] = root / fmt.value
    return out


def _graph(art: Path) -> ir.Model:
    return ir.load(art / "model.onnx")


def test_log8_scales_are_bytes_in_the_file(pair: dict[ScaleFormat, Path]) -> None:
    model = _graph(pair[ScaleFormat.LOG8])
    inits = model.graph.initializers
    v, kb = inits[f"{TABLE}.data"].shape[0], inits[f"{TABLE}.data"].shape[1]
    codes, top, step = (inits[f"{TABLE}.gather_scales.{p}"] for p in ("log8", "top", "step"))
    assert (codes.dtype, list(codes.shape)) == (ir.DataType.UINT8, [v, kb, 1])  # GatherBlockQuantized's scales
    assert (top.dtype, list(top.shape)) == (ir.DataType.FLOAT16, [v, 1, 1])
    assert (step.dtype, list(step.shape)) == (ir.DataType.UINT8, [v, 1, 1])
    assert f"{TABLE}.gather_scales" not in inits
    down = inits[f"{LINEAR}.scales.log8"]  # MatMulNBits' scales [N, K / block]
    assert (down.dtype, list(down.shape)) == (ir.DataType.UINT8, [H, INTER // 32])
    assert sum(n.op_type == "Exp" for n in model.graph) == 2 * 5 + 1  # every linear and the table
    manifest = load_manifest(pair[ScaleFormat.LOG8])
    fired = next(p["fired"] for p in manifest.passes if p["name"] == "matmulnbits")
    values = fired["log8_scale_values"]
    assert values > v * kb and "compact_scale_values" not in fired
    assert manifest.extra["quantization"]["scale_format"] == "log8"
    assert bandwidth.compact_scale_bytes(manifest) == 3 * values  # float32 once loaded


def _table_scales(art: Path) -> np.ndarray:
    proto = onnx.load(art / "model.onnx", load_external_data=False)
    gather = next(n for n in proto.graph.node if n.op_type == "GatherBlockQuantized")
    return _Reader(proto, art).array(gather.input[2])


def test_log8_scales_are_the_float16_ones_on_the_grid(pair: dict[ScaleFormat, Path]) -> None:
    """The graph's computed scales (as constant folding computes them) are :func:`decode` of the
    stored bytes, within half a grid step of the float16 export's; the codes are the same."""
    half, log8 = (_table_scales(pair[f]).reshape(-1, 2) for f in (ScaleFormat.FLOAT16, ScaleFormat.LOG8))
    inits = _graph(pair[ScaleFormat.LOG8]).graph.initializers
    stored = log_scales.LogScales(
        *(inits[f"{TABLE}.gather_scales.{p}"].const_value.numpy() for p in ("log8", "top", "step"))
    )
    assert np.array_equal(log8, log_scales.decode(stored).reshape(-1, 2))
    assert (np.abs(log8 / half.astype(np.float32) - 1) <= _bound(stored.step.reshape(-1, 1))).all()
    data = [_graph(pair[f]).graph.initializers[f"{TABLE}.data"].const_value.numpy() for f in ScaleFormat]
    assert np.array_equal(*data)


def test_log8_linear_dequantizes_within_the_grid(pair: dict[ScaleFormat, Path]) -> None:
    """A MatMulNBits weight read back through the folded nodes (as ``--prefill int8`` reads it)
    differs from the float16 export's by at most the grid's rounding of its scales."""
    weights = []
    for fmt in ScaleFormat:
        proto = onnx.load(pair[fmt] / "model.onnx", load_external_data=False)
        node = next(n for n in proto.graph.node if n.op_type == "MatMulNBits" and n.input[1].startswith(LINEAR))
        weights.append(dequantize(node, _Reader(proto, pair[fmt])))
    half, log8 = weights
    step = _graph(pair[ScaleFormat.LOG8]).graph.initializers[f"{LINEAR}.scales.step"].const_value.numpy()
    assert np.abs(log8 - half).max() > 0
    assert (np.abs(log8 - half) <= np.abs(half) * _bound(step.reshape(-1, 1)) + 1e-7).all()


def test_log8_artifact_runs_like_the_float16_one(pair: dict[ScaleFormat, Path]) -> None:
    """ONNX Runtime folds the scale nodes and runs the same weights within the grid's rounding."""
    ids = open_artifact(pair[ScaleFormat.FLOAT16]).tokenizer.encode(parity.DEFAULT_TEXT)[:TOKENS]
    half, log8 = (parity.artifact_logits(open_artifact(pair[f]).engine, ids) for f in ScaleFormat)
    assert (half.argmax(-1) == log8.argmax(-1)).mean() >= 0.9
    assert float(np.abs(half - log8).max()) < 0.05 * float(np.abs(half).max())


# --- options --------------------------------------------------------------------------------------------


def test_log8_is_the_onnxruntime_int4_default() -> None:
    assert export_options(None, weights="int4").quant.scale_format is ScaleFormat.LOG8
    assert export_options(None, weights="int4", scales="float16").quant.scale_format is ScaleFormat.FLOAT16
    assert export_options(None, weights="int4", symmetric=True).quant.scale_format is ScaleFormat.FLOAT16
    assert export_options(None, weights="int8").quant.scale_format is ScaleFormat.FLOAT16
    assert export_options(None, target="openvino", weights="int4").quant.scale_format is ScaleFormat.FLOAT16


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--weights", "int4", "--target", "openvino", "--scales", "log8"], "ONNX Runtime format"),
        (["--weights", "int8", "--scales", "log8"], "use it with --weights int4"),
        (["--weights", "int4", "--symmetric", "--scales", "log8"], "drop --symmetric"),
        (["--weights", "int4", "--scales", "log4"], "--scales"),
    ],
)
def test_cli_scales_errors_leave_nothing(qwen2_tied: Path, tmp_path: Path, args: list[str], said: str) -> None:
    out = tmp_path / "art"
    result = CliRunner().invoke(app, ["export", str(qwen2_tied), "-o", str(out), *args])
    assert result.exit_code != 0 and said in result.output
    assert not out.exists()
