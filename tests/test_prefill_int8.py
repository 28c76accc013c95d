"""``export --prefill int8``: the int8 prompt graph (qwen_export/targets/onnxruntime/prefill_int8.py).

The prefill graph computes the decode graph's function with two approximations: the weights of
q/k/v, o, gate, up and down rounded once more (int4/int8 blocks -> per-column int8, after smoothing,
down_proj's after a Hadamard rotation of its input) and the activations quantized token by token to
uint8 at run time. Its integer GEMM is exact, so its
distance from the decode graph is the same on every CPU up to rounding flips of single activation
codes. The checks:

- the pieces exactly: ``dequantize`` returns what ONNX Runtime's own MatMulNBits multiplies by,
  smoothing and the rotation are exact rewrites before rounding, the int8 codes are within half a
  step; one token's outliers do not cost the other tokens their precision, and the rotation
  spreads a token's peak channels;
- end to end, on tiny seeded Qwen2 (biased q/k/v) and Qwen3 (q/k norms): the prompt's logits on the
  prefill graph stay within a tenth of int4's own distance from the float32 export (mean KL;
  measured 0.02-0.025 of it), the decode steps that follow read the KV cache the prefill graph
  wrote (same bound), and steps shorter than ``MIN_TOKENS`` run the decode graph (repeat noise);
- the options refuse what it cannot apply to, and an engine without VNNI or with it turned off
  says so in ``kernel_choices``.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import ModuleScratch
from noise import Noise, check_logits
from onnx import helper
from reference import prompt

from qwen_export import cpuinfo
from qwen_export.errors import OptionError
from qwen_export.export.options import export_options
from qwen_export.export.pipeline import export as run_export
from qwen_export.export.tiny import make_checkpoint
from qwen_export.runtime.loader import RuntimeOptions, open_artifact
from qwen_export.targets.onnxruntime import prefill_int8

pytestmark = pytest.mark.xdist_group("prefill_int8")
PROMPT = 48  # >= prefill_int8.MIN_TOKENS: runs on the prefill graph
RATIO = 0.1  # bound: KL(decode graph || prefill graph) < RATIO * KL(float32 || int4 decode graph)


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def arts(request: pytest.FixtureRequest, tiny_root: Path, module_scratch: ModuleScratch) -> dict[str, Path]:
    """A tiny untied checkpoint's int4 (RTN) export with the prefill graph and its float32 export,
    both with every position's logits."""
    arch = request.param
    ckpt = tiny_root / f"{arch}_prefill"
    if not ckpt.exists():
        make_checkpoint(ckpt, arch, tied=False, **({"head_dim": 32} if arch == "qwen3" else {}))
    root = module_scratch.mkdir(f"prefill_{arch}")
    out = {"int4": root / "int4", "fp32": root / "fp32"}
    run_export(ckpt, out["int4"], export_options(ckpt, weights="int4", algorithm="rtn", prefill="int8", logits="all"))
    run_export(ckpt, out["fp32"], export_options(ckpt, logits="all"))
    return out


def _engine(path: Path, prefill: bool = True) -> Any:
    return open_artifact(path, RuntimeOptions(threads=2, prefill_int8=prefill)).engine


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean over positions of KL(softmax(p) || softmax(q))."""

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def _needs_vnni() -> None:
    if cpuinfo.int8_gemm_saturates(platform.machine(), cpuinfo.cpu_model_and_flags()[1]):
        pytest.skip("this CPU has no VNNI: engines run prompts on the decode graph (tested below)")


# ----------------------------------------------------------------------------- the pieces
def test_dequantize_matches_matmulnbits(arts: dict[str, Path]) -> None:
    """For each kind of MatMulNBits in the artifact (4-bit, 8-bit; zero points), ``dequantize``
    equals what ONNX Runtime multiplies by: the node run on the identity matrix."""
    root = arts["int4"]
    proto = onnx.load(root / "model.onnx", load_external_data=False)
    reader = prefill_int8._Reader(proto, root)
    seen: set[tuple[int, bool]] = set()
    for node in proto.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = prefill_int8._attributes(node)
        kind = (attrs["bits"], len(node.input) > 3 and bool(node.input[3]))
        if kind in seen:
            continue
        seen.add(kind)
        k = attrs["K"]
        inputs = [node.input[0]] + [reader.array(name) if name else None for name in node.input[1:]]
        names = ["A"] + [f"in{i}" if a is not None else "" for i, a in enumerate(inputs[1:])]
        inits = [
            onnx.numpy_helper.from_array(a, n) for n, a in zip(names[1:], inputs[1:], strict=True) if a is not None
        ]
        single = helper.make_node("MatMulNBits", names, ["Y"], domain="com.microsoft", **attrs, accuracy_level=1)
        graph = helper.make_graph(
            [single],
            "g",
            [helper.make_tensor_value_info("A", onnx.TensorProto.FLOAT, [k, k])],
            [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)],
            inits,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
        )
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        product = session.run(None, {"A": np.eye(k, dtype=np.float32)})[0]  # [K, N]: the weight, transposed
        if len(node.input) > 5 and node.input[5]:
            product -= reader.array(node.input[5])
        np.testing.assert_allclose(prefill_int8.dequantize(node, reader).T, product, rtol=0, atol=1e-6)
    assert {bits for bits, _ in seen} == {4, 8}, seen  # the default int4 layout: 8-bit attention


def test_smoothing_is_exact_and_codes_round_to_half_a_step() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 64)).astype(np.float32)
    x[:, 3] *= 40  # an outlier channel
    w = rng.standard_normal((96, 64)).astype(np.float32)  # [N, K]
    factor = prefill_int8.smoothing(np.abs(x).max(axis=0), [w])
    np.testing.assert_allclose((x / factor) @ (w * factor).T, x @ w.T, rtol=1e-5, atol=1e-4)
    assert factor[3] > 4 * np.median(factor)  # the outlier channel is scaled down in x
    codes, scales = prefill_int8.column_int8(w.copy(), factor)
    assert codes.dtype == np.int8 and codes.shape == (64, 96) and np.abs(codes).max() == prefill_int8.WEIGHT_LEVELS
    step_error = np.abs(codes.T * scales[:, None] - w * factor) / scales[:, None]
    assert step_error.max() <= 0.5 + 1e-4


def _one_linear(root: Path, k: int = 64, n: int = 32) -> None:
    """A graph of one 4-bit ``down_proj`` MatMulNBits (block 32, random codes) at ``root``."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (n, k // 32, 16), dtype=np.uint8)
    scales = (rng.random(n * k // 32) * 0.1 + 0.01).astype(np.float32)
    node = helper.make_node(
        "MatMulNBits", ["x", "w", "s"], ["y"], name="model.layers.0.mlp.down_proj/MatMulNBits",
        domain="com.microsoft", K=k, N=n, bits=4, block_size=32,
    )  # fmt: skip
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, None, k])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(codes, "w"), onnx.numpy_helper.from_array(scales, "s")],
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), root / prefill_int8.MODEL_FILE)


def test_activations_are_quantized_token_by_token(tmp_path: Path) -> None:
    """A token whose activations are 1000x the others' (as the SwiGLU output of a text's first token
    is) leaves the other tokens' outputs within int8 rounding: each token has its own scale. One
    scale for the whole step (DynamicQuantizeMatMul) would round them to about nothing."""
    _one_linear(tmp_path)
    prefill_int8.write(tmp_path, {})
    x = np.random.default_rng(1).standard_normal((1, 40, 64)).astype(np.float32)
    x[0, 0] *= 1000
    run = {f: ort.InferenceSession(str(tmp_path / f)).run(None, {"x": x})[0][0] for f in ("model.onnx", "prefill.onnx")}
    ref, got = run["model.onnx"], run["prefill.onnx"]
    err = np.abs(got - ref).max(axis=1) / np.abs(ref).max(axis=1)
    assert err.max() < 0.05, err  # measured 0.021: two int8 roundings
    # the same input rounded with one scale for all tokens: the other tokens' outputs are lost
    step = np.abs(x).max() / 127
    one_scale = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, {"x": np.rint(x / step) * step})[0][0]
    assert (np.abs(one_scale - ref).max(axis=1) / np.abs(ref).max(axis=1))[1:].min() > 0.5


def test_hadamard_rotation_is_exact() -> None:
    h = prefill_int8.hadamard(128)
    assert np.abs(h @ h - np.eye(128)).max() < 1e-6  # orthonormal and symmetric: its own inverse
    assert [prefill_int8.rotation_block(k) for k in (4864, 8960, 18944, 29568, 96, 100)] == [64, 64, 64, 64, 32, 4]
    rng = np.random.default_rng(0)
    weight, x = rng.standard_normal((48, 256)).astype(np.float32), rng.standard_normal((5, 256)).astype(np.float32)
    rotated = weight.copy()
    prefill_int8.rotate_columns(rotated, 128)
    x_rotated = (x.reshape(5, 2, 128) @ h).reshape(5, 256)
    np.testing.assert_allclose(x_rotated @ rotated.T, x @ weight.T, atol=1e-4)


def test_rotation_spreads_a_tokens_peak_channels(tmp_path: Path) -> None:
    """Each token with a few channels 40x the others' (a SwiGLU output's shape: the channels vary
    by token): the rotated down_proj's outputs stay within 2.5% per token; the same rows rounded
    without the rotation are off by several times that (so this test fails without it)."""
    _one_linear(tmp_path, k=256)
    prefill_int8.write(tmp_path, {})
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 40, 256)).astype(np.float32)
    for t in range(40):
        x[0, t, rng.choice(256, 3, replace=False)] *= 40
    run = {f: ort.InferenceSession(str(tmp_path / f)).run(None, {"x": x})[0][0] for f in ("model.onnx", "prefill.onnx")}
    ref = run["model.onnx"]
    rel = np.abs(run["prefill.onnx"] - ref).max(axis=1) / np.abs(ref).max(axis=1)
    step = np.abs(x).max(axis=-1, keepdims=True) / 127
    unrotated = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, {"x": np.rint(x / step) * step})[0][0]
    rel_unrotated = np.abs(unrotated - ref).max(axis=1) / np.abs(ref).max(axis=1)
    assert rel.max() < 0.025, rel.max()  # measured 0.016
    # measured medians 0.009 (rotated) and 0.028 (not)
    assert np.median(rel_unrotated) > 2 * np.median(rel), (np.median(rel_unrotated), np.median(rel))


def _rebuilt(source: Path, target: Path, folds: bool, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the artifact ``source`` with its prompt graph rebuilt (no smoothing), with or
    without :func:`prefill_int8.scale_folds`."""
    import json

    from qwen_export.artifact import sha256_file

    target.mkdir()
    for file in source.iterdir():
        if not file.name.startswith("prefill.onnx"):
            target.joinpath(file.name).write_bytes(file.read_bytes())
    with monkeypatch.context() as patch:
        if not folds:
            patch.setattr(prefill_int8, "scale_folds", lambda nodes, linears: {})
        record = prefill_int8.write(target, {})
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["extra"]["prefill"] = record
    for name in (prefill_int8.PREFILL_FILE, prefill_int8.PREFILL_DATA):
        manifest["files"][name] = sha256_file(target / name)
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def test_up_proj_scale_fold_is_exact(arts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """up_proj's product without its rows' scales, down_proj's step multiplied by them instead:
    one fold per layer, and the prompt's logits those of the graph without it up to float rounding
    (a code may flip where a value sits on a rounding boundary: under 1% of int4's own KL)."""
    _needs_vnni()
    folded = _rebuilt(arts["int4"], tmp_path / "folded", True, monkeypatch)
    plain = _rebuilt(arts["int4"], tmp_path / "plain", False, monkeypatch)
    proto = onnx.load(folded / prefill_int8.PREFILL_FILE, load_external_data=False)
    names = [node.name for node in proto.graph.node]
    layers = sum(1 for name in names if name.endswith("mlp.down_proj.weight_t/prefill"))
    assert layers > 0 and sum(name.endswith("/carried") for name in names) == layers
    assert not any("up_proj" in name and name.endswith("/prefill_rows") for name in names)
    assert not any(node.op_type == "Abs" for node in proto.graph.node)
    ids = prompt(PROMPT, seed=3)[None]
    logits = {name: _engine(path).forward(ids)[0] for name, path in (("folded", folded), ("plain", plain))}
    budget = _kl(_engine(arts["fp32"]).forward(ids)[0], _engine(arts["int4"], prefill=False).forward(ids)[0])
    assert _kl(logits["plain"], logits["folded"]) < 0.01 * budget


# ----------------------------------------------------------------------------- end to end
def test_prompt_on_the_prefill_graph(arts: dict[str, Path]) -> None:
    _needs_vnni()
    ids = prompt(PROMPT)[None]
    engine = _engine(arts["int4"])
    assert engine.kernel_choices()["prefill"].startswith("int8 GEMMs")
    on_prefill = engine.forward(ids)[0]
    on_decode = _engine(arts["int4"], prefill=False).forward(ids)[0]
    fp32 = _engine(arts["fp32"]).forward(ids)[0]
    budget = _kl(fp32, on_decode)
    error = _kl(on_decode, on_prefill)
    assert 0 < error < RATIO * budget, (error, budget)


def test_decode_reads_the_cache_the_prefill_graph_wrote(arts: dict[str, Path]) -> None:
    """Steps after a prompt on the prefill graph: each within the same bound of the decode graph's
    steps after the same prompt on the decode graph (a cache left unwritten or misplaced would be
    as far off as random logits)."""
    _needs_vnni()
    ids = prompt(PROMPT, seed=1)[None]
    engines = {name: _engine(arts["int4"], prefill=name == "prefill") for name in ("prefill", "decode")}
    fp32 = _engine(arts["fp32"])
    fp32.forward(ids)
    for engine in engines.values():
        engine.forward(ids)
    token = np.array([[17]])
    errors, budgets = [], []
    for _ in range(6):
        steps = {name: e.forward(token)[0] for name, e in engines.items()}
        reference = fp32.forward(token)[0]
        errors.append(_kl(steps["decode"], steps["prefill"]))
        budgets.append(_kl(reference, steps["decode"]))
        token = steps["decode"][-1:].argmax(-1)[None]
    assert np.mean(errors) < RATIO * np.mean(budgets), (errors, budgets)


def test_short_steps_run_the_decode_graph(arts: dict[str, Path]) -> None:
    ids = prompt(prefill_int8.MIN_TOKENS - 1, seed=2)[None]
    with_prefill = _engine(arts["int4"]).forward(ids)
    without = _engine(arts["int4"], prefill=False).forward(ids)
    check_logits(with_prefill, without, Noise.REPEAT)


def test_batched_rows_prefill_on_the_prompt_graph(arts: dict[str, Path]) -> None:
    """``LLM.batched`` / ``serve``: two rows' prompts batched together run on the prompt graph's
    per-row form and give what one sequence gets on the engine (activations are quantized token by
    token, so a row does not depend on the rows batched with it); short pieces stay on the decode
    graph; turned off, the rows have no prompt graph."""
    from qwen_export.targets.base import RowFeed

    engine = _engine(arts["int4"])
    rows = engine.open_rows(3)
    assert rows._prefill is not None
    a, b = rows.add_row(), rows.add_row()
    ids = [prompt(PROMPT, seed=s) for s in (3, 4)]
    out = rows.step([RowFeed(a, ids[0]), RowFeed(b, ids[1])])
    for i, tokens in enumerate(ids):
        engine.reset()
        check_logits(out[i], engine.forward(tokens[None])[0, -1], Noise.REORDERED, f"row {i}")
    assert _engine(arts["int4"], prefill=False).open_rows(2)._prefill is None


def test_turned_off_or_without_vnni(arts: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    assert "turned off" in _engine(arts["int4"], prefill=False).kernel_choices()["prefill"]
    assert "export --prefill int8" in _engine(arts["fp32"]).kernel_choices().get("prefill", "export --prefill int8")
    monkeypatch.setattr(cpuinfo, "int8_gemm_saturates", lambda machine, flags: True)
    engine = _engine(arts["int4"])
    assert "needs a CPU with VNNI" in engine.kernel_choices()["prefill"]
    assert engine._prefill is None


def test_load_option(arts: dict[str, Path]) -> None:
    import qwen_export

    assert (
        "turned off" in qwen_export.load(arts["int4"], threads=2, prefill_int8=False).engine.kernel_choices()["prefill"]
    )
    with pytest.raises(OptionError, match="prefill_int8 must be True or False"):
        qwen_export.load(arts["int4"], prefill_int8="no")


def test_cli_bench_reports_and_turns_off(arts: dict[str, Path]) -> None:
    """``bench`` says what prompts ran on; ``--no-int8-prefill`` leaves the graph closed."""
    from typer.testing import CliRunner

    from qwen_export.cli import app

    runner = CliRunner()
    args = ["bench", str(arts["int4"]), "--prompt-lengths", "40", "--new-tokens", "2", "--repeats", "1"]
    args += ["--warmup", "0", "--threads", "2"]
    on = runner.invoke(app, args, catch_exceptions=False)
    off = runner.invoke(app, [*args, "--no-int8-prefill"], catch_exceptions=False)
    assert on.exit_code == 0 and off.exit_code == 0, (on.output, off.output)
    assert "turned off" in off.output and "turned off" not in on.output
    assert "prefill=" in on.output


def test_decode_bandwidth_does_not_count_the_prompt_graph(arts: dict[str, Path]) -> None:
    from qwen_export.artifact import load_manifest
    from qwen_export.runtime import bandwidth

    root = arts["int4"]
    decode_files = sum((root / name).stat().st_size for name in ("model.onnx", "model.onnx.data"))
    assert bandwidth.weight_files_bytes(root, load_manifest(root)) == decode_files


def test_manifest_record(arts: dict[str, Path]) -> None:
    from qwen_export.artifact import load_manifest

    manifest = load_manifest(arts["int4"])
    record = manifest.extra["prefill"]
    assert record["weights"] == "int8" and record["model"] == "prefill.onnx"
    assert record["linears"] == 2 * 5  # 2 layers: qkv, o, gate, up, down
    assert record["rotated"] == 2  # down_proj
    assert record["activations"] == "int8 per token"
    assert record["smoothed_norms"] == 2 * 2
    assert {"prefill.onnx", "prefill.onnx.data"} <= set(manifest.files)


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({}, "add --weights int4 or int8"),
        ({"weights": "int4", "dtype": "fp16"}, "drop --dtype fp16"),
        ({"weights": "int4", "fuse": False}, "drop --no-fuse"),
        ({"weights": "int4", "target": "openvino"}, "--prefill applies to --target onnxruntime only"),
    ],
)
def test_option_errors(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(OptionError, match=message.replace("-", r"\-")):
        export_options(None, prefill="int8", **kw)


def test_option_parse() -> None:
    with pytest.raises(OptionError, match="--prefill"):
        export_options(None, weights="int4", prefill="int4")
    assert export_options(None, weights="int4", prefill="none").prefill.value == "none"
