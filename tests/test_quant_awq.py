"""AWQ: calibration statistics, the scaling pass (function-preserving folds) and the AWQ export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ModuleScratch
from typer.testing import CliRunner

from qwen_export.cli import app
from qwen_export.errors import OptionError
from qwen_export.export import calibration as calib
from qwen_export.export import parity
from qwen_export.export.checkpoint import Checkpoint
from qwen_export.export.pipeline import ExportOptions
from qwen_export.export.pipeline import export as run_export
from qwen_export.passes import awq as awq_pass
from qwen_export.passes.quantize import QuantizeWeights
from qwen_export.quant.scheme import QuantAlgorithm, QuantScheme, WeightFormat
from qwen_export.runtime.loader import open_artifact
from qwen_export.runtime.tokenizer import Tokenizer
from qwen_export.targets.onnxruntime.matmulnbits import MatMulNBitsLowering

TOKENS = 96  # the whole parity text (77 tokens): on 48 the tiny model's noise favours RTN


def _stats(checkpoint: Path, max_rows: int = 512) -> tuple[list[int], dict[str, calib.Stats]]:
    ckpt = Checkpoint.open(checkpoint)
    # the built-in text's first ~1,200 characters: one sequence, fewer tokens than max_rows
    ids = calib.calibration_tokens(Tokenizer.from_dir(checkpoint), calib.DEFAULT_TEXT[:1200], "built-in")
    return ids, calib.collect_activation_stats(ckpt, ckpt.spec, ids, max_rows=max_rows)


def _logits(art: Path, ids: list[int]) -> np.ndarray:
    return parity.artifact_logits(open_artifact(art).engine, ids)


def _ids(art: Path) -> list[int]:
    return open_artifact(art).tokenizer.encode(parity.DEFAULT_TEXT)[:TOKENS]


def _metrics(ref: np.ndarray, art: np.ndarray, ids: list[int]) -> dict[str, float]:
    return parity.compare_logits(ref[:-1], art[:-1], np.asarray(ids[1:]))


def test_calibration_stats(qwen2_untied: Path, export: Any) -> None:
    ids, stats = _stats(qwen2_untied, max_rows=1024)
    assert 200 <= len(ids) <= 512  # one sequence
    expected = {"qkv": 64, "o": 64, "gate_up": 64, "down": 128}
    assert set(stats) == {f"layers.{i}.{g}" for i in range(2) for g in expected} | {"lm_head"}
    for name, st in stats.items():
        k = 64 if name == "lm_head" else expected[name.split(".")[-1]]
        assert st.mean_abs.shape == (k,) and st.mean_abs.dtype == np.float64
        assert st.sample.shape == (len(ids), k) and st.sample.dtype == np.float32
        assert np.allclose(st.mean_abs, np.abs(st.sample.astype(np.float64)).mean(axis=0))
    # the lm_head inputs times the head are the fp32 artifact's logits at every position
    head = Checkpoint.open(qwen2_untied).read("lm_head.weight").T
    ref = _logits(export("qwen2_untied"), ids[:TOKENS])
    assert np.abs(stats["lm_head"].sample[:TOKENS] @ head - ref).max() < 1e-3
    _, sub = _stats(qwen2_untied, max_rows=16)
    assert sub["layers.1.down"].sample.shape == (16, 128)
    assert np.array_equal(sub["layers.1.down"].mean_abs, stats["layers.1.down"].mean_abs)


def _no_quantization(mp: pytest.MonkeyPatch) -> None:
    for cls in (QuantizeWeights, MatMulNBitsLowering):
        mp.setattr(cls, "rewrite", lambda self, model: {})


@pytest.mark.parametrize(("case", "fuse"), [("qwen2_untied", True), ("qwen3", False)])
def test_scaling_preserves_the_function(
    case: str, fuse: bool, request: pytest.FixtureRequest, export: Any, tmp_path: Path
) -> None:
    """With quantization disabled the scaled model (random scales, every fold) equals the fp32 one:
    fused (packed QKV, fused RMSNorms) and unfused (q/k/v apart, RMSNorm as Mul, Qwen3 q/k norms)."""
    rng = np.random.default_rng(0)
    used: list[np.ndarray] = []

    def random_scales(w: Any, *args: Any, **kwargs: Any) -> np.ndarray:
        k = (w[0] if isinstance(w, list) else w).shape[0]
        used.append(np.exp(rng.normal(0.0, 0.7, k)).astype(np.float32))
        return used[-1]

    out = tmp_path / "scaled"
    with pytest.MonkeyPatch.context() as mp:
        _no_quantization(mp)
        mp.setattr(awq_pass, "awq_scales", random_scales)
        options = ExportOptions(quant=QuantScheme(WeightFormat.INT4, algorithm=QuantAlgorithm.AWQ), fuse=fuse)
        run_export(request.getfixturevalue(case), out, options)
    manifest = json.loads((out / "manifest.json").read_text())
    fired = next(p["fired"] for p in manifest["passes"] if p["name"] == "awq")
    assert fired == {"qkv": 2, "gate_up": 2, "down": 2, "lm_head": 1, "skipped": 0}
    assert len(used) == 7
    assert manifest["extra"]["quantization"]["calibration"]["source"] == "built-in"
    ids = _ids(out)
    ref, got = _logits(export(case, fuse=fuse), ids), _logits(out, ids)
    assert np.abs(ref - got).max() < 1e-4 * max(1.0, np.abs(ref).max())


def test_scaled_tensor_merges_factors() -> None:
    import onnx_ir as ir

    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    rows, cols = np.array([1, 2, 4], np.float32), np.array([1, 0.5, 0.25, 2], np.float32)
    t = awq_pass.ScaledTensor(awq_pass.ScaledTensor(ir.tensor(w), {0: rows}), {1: cols})
    assert not isinstance(t.source, awq_pass.ScaledTensor)
    assert np.allclose(t.numpy(), w * rows[:, None] * cols[None, :])


@pytest.fixture(scope="module")
def int4(qwen2_untied: Path, module_scratch: ModuleScratch) -> dict[str, Path]:
    root = module_scratch.mkdir("awq")
    out = {}
    for algo in (QuantAlgorithm.RTN, QuantAlgorithm.AWQ):
        out[algo.value] = root / algo.value
        run_export(qwen2_untied, out[algo.value], ExportOptions(quant=QuantScheme(WeightFormat.INT4, algorithm=algo)))
    return out


def test_awq_int4_not_worse_than_rtn(int4: dict[str, Path], export: Any, capsys: Any) -> None:
    ids = _ids(int4["awq"])
    ref = _logits(export("qwen2_untied"), ids)
    m = {algo: _metrics(ref, _logits(art, ids), ids) for algo, art in int4.items()}
    with capsys.disabled():
        print(f"\nint4 vs fp32 (qwen2_untied, {len(ids)} tokens): " + json.dumps(m))
    assert m["awq"]["mean_kl"] <= m["rtn"]["mean_kl"], m
    quant = json.loads((int4["awq"] / "manifest.json").read_text())["extra"]["quantization"]
    assert quant["algorithm"] == "awq" and quant["calibration"]["source"] == "built-in"
    assert quant["calibration"]["tokens"] > 200


runner = CliRunner()


def test_cli_calibration_errors(qwen2_untied: Path, tmp_path: Path) -> None:
    base = ["export", str(qwen2_untied), "-o", str(tmp_path / "x"), "--weights", "int4"]
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ".encode("latin-1") * 50)
    short = tmp_path / "short.txt"
    short.write_text("hello world", encoding="utf-8")
    cases = [
        (["--algorithm", "awq", "--calibration", str(tmp_path / "missing.txt")], "file not found"),
        (["--algorithm", "awq", "--calibration", str(bad)], "not UTF-8"),
        (["--algorithm", "awq", "--calibration", str(short)], "at least"),
        (["--algorithm", "rtn", "--calibration", str(short)], "only applies to --algorithm awq or gptq"),
    ]
    for args, fragment in cases:
        result = runner.invoke(app, base + args, catch_exceptions=False)
        assert result.exit_code == 2, result.output
        text = " ".join(result.output.split())
        assert fragment in text and text.count("Error") <= 1, result.output
        assert not (tmp_path / "x").exists()


def test_calibration_file_is_used(tmp_path: Path) -> None:
    f = tmp_path / "calib.txt"
    f.write_text("print('hello')\n" * 40, encoding="utf-8")
    assert calib.calibration_text(f) == (f.read_text(encoding="utf-8"), "calib.txt")
    with pytest.raises(OptionError, match="only applies"):
        ExportOptions(calibration=f)


def test_calibration_directory_reads_its_text_files(tmp_path: Path) -> None:
    """``--calibration DIR``: its UTF-8 files in path order, joined; binary, hidden and linked files
    passed over and counted; a directory without text is a one-line OptionError."""
    from qwen_export.errors import OptionError
    from qwen_export.export.calibration import calibration_text

    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "b.py").write_text("def b():\n    return 2\n")
    (corpus / "sub" / "a.md").write_text("# Über\n\nText.")
    (corpus / "c.bin").write_bytes(b"\xff\xfe\x00binary")
    (corpus / ".hidden").write_text("secret")
    (corpus / "link.txt").symlink_to(corpus / "b.py")
    text, source = calibration_text(corpus)
    assert text == "def b():\n    return 2\n\n\n# Über\n\nText."
    assert source == "corpus/ (2 files, 3 passed over)"
    (tmp_path / "empty").mkdir()
    with pytest.raises(OptionError, match="no UTF-8 text file"):
        calibration_text(tmp_path / "empty")
