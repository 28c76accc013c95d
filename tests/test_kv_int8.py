"""``export --kv-cache int8``: ONNX Runtime's GroupQueryAttention with an int8 cache and static
per-channel scales calibrated at export (qwen_export/targets/onnxruntime/kv_quant.py).

The reference for the int8 artifact is the unfused fp32 artifact of the same checkpoint with every
new key (after the rotary embedding) and value fake-quantized the way the kernel stores them,
``clip(round(x / scale), -128, 127) * scale`` with the int8 artifact's own scales: the int8
artifact must match it to a small fraction of the quantization's own effect on the logits (what is
left is fp32 reordering, and the rare value whose rounding flips under it), while its distance from
the fp32 logits is that effect.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import ModuleScratch
from noise import Noise, check_logits
from onnx import helper, numpy_helper
from reference import prompt

from qwen_export.artifact import load_manifest
from qwen_export.errors import ArtifactError, OptionError
from qwen_export.export.options import export_options
from qwen_export.export.pipeline import export as run_export
from qwen_export.export.tiny import make_checkpoint
from qwen_export.quant.kv_cache import HEADROOM, QMAX, kv_scales
from qwen_export.runtime.bench_run import kernel_choices
from qwen_export.runtime.loader import open_artifact
from qwen_export.targets.base import RowFeed
from qwen_export.targets.onnxruntime import kv_quant
from qwen_export.targets.onnxruntime.engine import OnnxRuntimeEngine, OrtOptions

PREFILL, DECODE = 30, 10


@pytest.fixture(scope="module")
def artifacts(tiny_root: Path, module_scratch: ModuleScratch) -> dict[str, Path]:
    """A tiny Qwen2 with a 1024-token context: its int8-KV exports (logits all; fp32 and fp16
    activations) and its unfused fp32 export (the reference graph)."""
    ckpt = tiny_root / "qwen2_ctx1024"
    if not ckpt.exists():
        make_checkpoint(ckpt, "qwen2", tied=True, max_positions=1024)
    root = module_scratch.mkdir("kv_int8")
    out = {"ckpt": ckpt}
    cases = {"int8": {"kv_cache": "int8"}, "fp16_int8": {"kv_cache": "int8", "dtype": "fp16"}}
    for name, kw in {**cases, "fp32_unfused": {"fuse": False}}.items():
        out[name] = root / name
        run_export(ckpt, out[name], export_options(ckpt, logits="all", **kw))
    return out


def _scales(art: Path) -> dict[str, np.ndarray]:
    model = onnx.load(art / "model.onnx")
    return {
        t.name: numpy_helper.to_array(t, base_dir=str(art)) for t in model.graph.initializer if "kv_quant" in t.name
    }


def _fake_quant_graph(unfused: Path, scales: dict[str, np.ndarray] | None) -> bytes:
    """The unfused graph (weights inlined: a tiny model) with each layer's new keys/values (the
    present Concats' second input) fake-quantized by ``scales`` (None: unchanged)."""
    model = onnx.load(unfused / "model.onnx")
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    for i in range(len(scales or {}) // 2):
        for kind, short in (("key", "k"), ("value", "v")):
            concat = producers[f"present.{i}.{kind}"]
            assert concat.op_type == "Concat"
            x, s = concat.input[1], f"kv_quant.{i}.{short}_scale"
            graph.initializer.append(numpy_helper.from_array(scales[s], s))
            graph.initializer.append(numpy_helper.from_array(np.array(-128, np.float32), f"{s}.lo"))
            graph.initializer.append(numpy_helper.from_array(np.array(127, np.float32), f"{s}.hi"))
            graph.node.extend(
                [
                    helper.make_node("Div", [x, s], [f"{s}.div"]),
                    helper.make_node("Round", [f"{s}.div"], [f"{s}.round"]),  # half to even, as rint
                    helper.make_node("Clip", [f"{s}.round", f"{s}.lo", f"{s}.hi"], [f"{s}.q"]),
                    helper.make_node("Mul", [f"{s}.q", s], [f"{s}.dq"]),
                ]
            )
            concat.input[1] = f"{s}.dq"
    model.graph.CopyFrom(helper.make_graph(_sorted(graph), graph.name, graph.input, graph.output, graph.initializer))
    return model.SerializeToString()


def _sorted(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes in a topological order (the fake-quant nodes were appended at the end)."""
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    todo, done = list(graph.node), []
    while todo:
        ready = [n for n in todo if all(i in known for i in n.input)]
        assert ready, "graph has a cycle"
        for n in ready:
            known.update(n.output)
            done.append(n)
        todo = [n for n in todo if n not in ready]
    return done


def _run_concat(model: bytes, spec: dict, ids: np.ndarray) -> np.ndarray:
    """Logits of every position: prefill ids[:PREFILL], then one token at a time (concat KV)."""
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    kv, dim, layers = spec["num_key_value_heads"], spec["head_dim"], spec["num_hidden_layers"]
    past = {
        f"past_key_values.{i}.{k}": np.zeros((1, kv, 0, dim), np.float32)
        for i in range(layers)
        for k in ("key", "value")
    }
    names = [o.name for o in session.get_outputs()]
    logits, pos = [], 0
    for piece in [ids[:PREFILL]] + [ids[t : t + 1] for t in range(PREFILL, ids.size)]:
        n = piece.size
        feed = {
            "input_ids": piece[None],
            "attention_mask": np.ones((1, pos + n), np.int64),
            "position_ids": np.arange(pos, pos + n, dtype=np.int64)[None],
            **past,
        }
        out = dict(zip(names, session.run(None, feed), strict=True))
        logits.append(out["logits"][0])
        past = {name.replace("present", "past_key_values"): v for name, v in out.items() if name.startswith("present")}
        pos += n
    return np.concatenate(logits)


def _run_engine(engine: OnnxRuntimeEngine, ids: np.ndarray) -> np.ndarray:
    logits = [engine.forward(ids[None, :PREFILL])[0]]
    logits += [engine.forward(ids[None, t : t + 1])[0] for t in range(PREFILL, ids.size)]
    return np.concatenate(logits)


def test_int8_kv_logits_are_the_quantized_cache_s(artifacts: dict[str, Path]) -> None:
    """Prefill + decode on the int8 artifact = the fp32 graph with the kernel's quantization of the
    new keys/values, to within 2% of that quantization's own effect on the logits."""
    spec = load_manifest(artifacts["int8"]).spec
    ids = prompt(PREFILL + DECODE, 5)
    scales = _scales(artifacts["int8"])
    assert len(scales) == 2 * spec["num_hidden_layers"]
    fp32 = _run_concat(_fake_quant_graph(artifacts["fp32_unfused"], None), spec, ids)
    fake = _run_concat(_fake_quant_graph(artifacts["fp32_unfused"], scales), spec, ids)
    engine = OnnxRuntimeEngine(artifacts["int8"], load_manifest(artifacts["int8"]))
    got = _run_engine(engine, ids)
    effect = np.abs(fake - fp32).max(axis=-1)  # per position: what int8 rounding does to the logits
    assert effect.min() > 0  # the cache is quantized at every position (prefill included)
    error = np.abs(got - fake).max(axis=-1)
    assert (error <= 0.02 * effect + Noise.CROSS.value.tolerance(fake).max()).all(), (error / effect).max()
    assert np.abs(got - fp32).max() <= 1.5 * effect.max()
    assert (got.argmax(-1) == fp32.argmax(-1)).mean() >= 0.9
    # fp16 activations over the same int8 cache: fp16's own noise, and the codes it flips, stay
    # within the int8 rounding's effect
    half = OnnxRuntimeEngine(artifacts["fp16_int8"], load_manifest(artifacts["fp16_int8"]))
    got16 = _run_engine(half, ids).astype(np.float32)
    assert half.kv_dtype == np.int8 and half.kv_bytes == engine.kv_bytes
    assert np.abs(got16 - got).max() <= effect.max()
    assert (got16.argmax(-1) == got.argmax(-1)).mean() >= 0.9


def test_int8_kv_bytes_growth_and_rows(artifacts: dict[str, Path]) -> None:
    """A quarter of fp32's bytes; buffers start at 256 tokens and grow with their int8 columns copied
    exactly; continuous batching rows hold the same int8 cache."""
    manifest = load_manifest(artifacts["int8"])
    kv = manifest.extra["kv_cache"]
    spec = manifest.spec
    fp32_per_token = 2 * spec["num_hidden_layers"] * spec["num_key_value_heads"] * spec["head_dim"] * 4
    assert kv["dtype"] == "int8" and kv["bytes_per_token"] * 4 == fp32_per_token
    ids = prompt(300, 6)
    grown = OnnxRuntimeEngine(artifacts["int8"], manifest, OrtOptions(prefill_chunk=0))
    grown.forward(ids[None, :200])
    assert grown.kv_capacity == 256 and grown.kv_bytes == 256 * kv["bytes_per_token"]
    assert all(array.dtype == np.int8 for array, _ in grown._buffers)
    full = OnnxRuntimeEngine(artifacts["int8"], manifest, OrtOptions(prefill_chunk=0, kv_step=1024))
    full.forward(ids[None, :200])
    a, b = grown.forward(ids[None, 200:]), full.forward(ids[None, 200:])
    assert grown.kv_capacity == 512 and full.kv_capacity == 1024
    check_logits(a[0, -1], b[0, -1], Noise.REORDERED, "grown vs preallocated int8 cache")
    rows = full.open_rows(2)
    row = rows.add_row()
    out = rows.step([RowFeed(row, ids[:40])])
    full.reset()
    check_logits(out[0], full.forward(ids[None, :40])[0, -1], Noise.REORDERED, "batching row")
    assert rows.kv_bytes == 2 * 1024 * kv["bytes_per_token"]  # 2 rows, the engine's kv_step
    assert all(buffer.dtype == np.int8 for buffer in rows._buffers)


def test_manifest_inspect_and_bench_show_int8(artifacts: dict[str, Path]) -> None:
    from typer.testing import CliRunner

    from qwen_export.cli import app
    from qwen_export.runtime import bench

    manifest = load_manifest(artifacts["int8"])
    quant = manifest.extra["kv_cache"]["quantization"]
    assert quant["headroom"] == HEADROOM and quant["calibration"]["source"] == "built-in"
    assert any(p["name"] == "int8_kv_cache" and p["fired"] == {"int8_kv_cache": 2} for p in manifest.passes)
    result = CliRunner().invoke(app, ["inspect", str(artifacts["int8"])])
    assert result.exit_code == 0, result.output
    assert "in int8 (static per-channel scales calibrated at export)" in result.output
    engine = open_artifact(artifacts["int8"]).engine
    assert kernel_choices(engine)["kv cache"].startswith("int8")
    per_token = bench.kv_bytes_per_token(manifest.spec, manifest.dtype, "int8")
    assert per_token == manifest.extra["kv_cache"]["bytes_per_token"]


def test_key_scales_cover_every_rotation() -> None:
    """A key scale covers its channel pair's length: any rotation of a calibration key stays within
    127 x scale / HEADROOM; a channel the calibration never moved still gets a positive scale."""
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(2, 50, 8)) * np.array([1, 5, 0.1, 0, 3, 1, 2, 0])
    pair = np.sqrt(keys[..., :4] ** 2 + keys[..., 4:] ** 2).max(axis=1)
    k_scale, v_scale = kv_scales(np.concatenate([pair, pair], -1), np.abs(keys).max(axis=1))
    assert k_scale.shape == (1, 2, 1, 8) and (v_scale > 0).all() and (k_scale > 0).all()
    angle = rng.uniform(0, 2 * np.pi, size=(1, 50, 1))
    x, y = keys[..., :4], keys[..., 4:]
    rotated = np.concatenate([x * np.cos(angle) - y * np.sin(angle), x * np.sin(angle) + y * np.cos(angle)], -1)
    assert (np.abs(rotated) <= k_scale[0, :, 0][:, None] * QMAX / HEADROOM * (1 + 1e-6)).all()


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"target": "openvino"}, "--kv-cache applies to --target onnxruntime only"),
        ({"target": "tensorrt"}, "--kv-cache applies to --target onnxruntime only"),
        ({"fuse": False}, "--kv-cache int8 is GroupQueryAttention's cache: drop --no-fuse"),
        ({"kv_cache": "fp16"}, "--kv-cache fp16 with --dtype fp32"),
        ({"kv_cache": "int4"}, "unknown --kv-cache 'int4'; valid values: fp32, fp16, int8"),
    ],
)
def test_bad_combinations_are_one_line_errors(kw: dict, message: str) -> None:
    with pytest.raises(OptionError) as err:
        export_options(None, **{"kv_cache": "int8", **kw})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_without_the_kernel_export_and_load_refuse(artifacts: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    assert kv_quant.int8_kv_unavailable() == ""  # the installed onnxruntime has it
    monkeypatch.setattr(kv_quant, "int8_kv_unavailable", lambda: "onnxruntime 1.0: no such type")
    with pytest.raises(OptionError, match="upgrade onnxruntime or export without --kv-cache") as err:
        export_options(None, kv_cache="int8")
    assert "(onnxruntime 1.0: no such type)" in str(err.value)
    with pytest.raises(ArtifactError, match="re-export without --kv-cache int8"):
        open_artifact(artifacts["int8"])
    assert export_options(None, kv_cache="fp32").kv_cache.value == "fp32"  # the default needs no kernel


def test_calibration_file_is_accepted_for_the_kv_cache(tmp_path: Path) -> None:
    assert export_options(None, kv_cache="int8", dtype="fp16").kv_cache.value == "int8"
    text = tmp_path / "calib.txt"
    text.write_text("def f(x):\n    return x * 2\n" * 20, encoding="utf-8")
    assert export_options(None, kv_cache="int8", calibration=text).calibration == text
    with pytest.raises(OptionError, match="or --kv-cache int8"):
        export_options(None, calibration=text)


def test_onnxruntime_genai_runs_the_int8_cache(artifacts: dict[str, Path]) -> None:
    """onnxruntime-genai reads the cache's type from the graph: it allocates int8 buffers and
    generates our greedy tokens."""
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    from test_genai_config import _greedy_both

    ours, theirs, _ = _greedy_both(artifacts["int8"], new_tokens=12)
    assert len(ours) >= 2 and theirs == ours


def test_cli_export_flag(artifacts: dict[str, Path], tmp_path: Path) -> None:
    """``export --kv-cache``: parsed by the CLI, refused in one line where it does not apply."""
    from typer.testing import CliRunner

    from qwen_export.cli import app

    args = ["export", str(artifacts["ckpt"]), "-o", str(tmp_path / "out"), "--target", "openvino", "--kv-cache", "int8"]
    result = CliRunner().invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and lines == ["error: --kv-cache applies to --target onnxruntime only"], result.output
    assert not (tmp_path / "out").exists()


def test_check_thresholds_for_an_int8_cache() -> None:
    """``qwen-export check`` judges an int8 cache by int8 weights' limits (the loosest applies)."""
    from qwen_export.export.parity import QUANT_THRESHOLDS, THRESHOLDS, thresholds_for
    from qwen_export.spec import DType

    assert thresholds_for(DType.FP32) == THRESHOLDS[DType.FP32]
    assert thresholds_for(DType.FP32, None, "int8") == QUANT_THRESHOLDS["int8"]
    assert thresholds_for(DType.FP32, {"weights": "int4"}, "int8").max_mean_kl == QUANT_THRESHOLDS["int4"].max_mean_kl
