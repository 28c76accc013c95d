"""Pre-quantized checkpoints (AutoAWQ GEMM, GPTQ): the stored codes, scales and zero points are
read byte-exact, seen as float weights, and exported without requantization.

The AWQ / GPTQ files are written here from the tiny float fixture by a packer that follows the
reference code, independently of :mod:`qwen_export.quant.prequant`'s unpacker: AutoAWQ's
``WQLinear_GEMM.from_linear`` (qweight int32 [K, N/8] with the nibble order 0, 2, 4, 6, 1, 3, 5, 7;
qzeros the same along N; fp16 scales [K/G, N]) and AutoGPTQ's ``QuantLinear.pack`` (qweight int32
[K*b/32, N] packed along the input dim, qzeros [K/G, N*b/32] along N storing ``zero - 1`` in the v1
format, g_idx [K]).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import safetensors.numpy
from conftest import ModuleScratch
from noise import Noise, check_logits

from qwen_export.artifact import load_manifest
from qwen_export.errors import CheckpointError
from qwen_export.export import parity
from qwen_export.export.checkpoint import SINGLE_FILE, Checkpoint
from qwen_export.export.pipeline import ExportOptions
from qwen_export.export.pipeline import export as run_export
from qwen_export.passes.awq import ScaledTensor
from qwen_export.passes.packed_qkv import ConcatTensor
from qwen_export.passes.quantize import QuantizeWeights, stored_quantization
from qwen_export.quant import prequant
from qwen_export.quant import tensors as quant_tensors
from qwen_export.quant.numeric import unpack_bits_last
from qwen_export.quant.scheme import Keep, QuantScheme, WeightFormat
from qwen_export.runtime.loader import open_artifact
from qwen_export.targets.onnxruntime.matmulnbits import MatMulNBitsLowering
from qwen_export.weights import CheckpointTensor, _Binding

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # awq/modules/linear/gemm.py: order_map
PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
Q = "model.layers.0.self_attn.q_proj.weight"
DOWN = "model.layers.1.mlp.down_proj.weight"
FLOAT = ir.DataType.FLOAT
Stored = dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]  # weight -> (codes [K, N], zeros [G, N], scales)


# ----------------------------------------------------------------------------- reference packers
def _quantize_groups(w: np.ndarray, group: int, bits: int, sym: bool) -> tuple[np.ndarray, ...]:
    """HF weight [N, K] -> (codes [K, N], zero points [K/G, N], fp16 scales [K/G, N]), GPTQ/AWQ style."""
    n, k = w.shape
    blocks = w.T.reshape(k // group, group, n).astype(np.float32)
    maxq = (1 << bits) - 1
    if sym:  # GPTQ sym: zero point (maxq + 1) / 2
        scale = (2 * np.abs(blocks).max(axis=1) / maxq).astype(np.float16)
        zero = np.full(scale.shape, (maxq + 1) // 2, np.int64)
    else:
        lo, hi = np.minimum(blocks.min(axis=1), 0), np.maximum(blocks.max(axis=1), 0)
        scale = ((hi - lo) / maxq).astype(np.float16)
        zero = np.clip(np.rint(-lo / scale.astype(np.float32)), 0, maxq).astype(np.int64)
    q = np.rint(blocks / scale.astype(np.float32)[:, None, :]) + zero[:, None, :]
    return np.clip(q, 0, maxq).astype(np.int64).reshape(k, n), zero, scale


def _pack_awq(values: np.ndarray) -> np.ndarray:
    """WQLinear_GEMM.from_linear: qweight[:, col] |= intweight[:, col * 8 + order_map[i]] << (i * 4)."""
    rows, cols = values.shape
    out = np.zeros((rows, cols // 8), np.uint32)
    v = values.astype(np.uint32)
    for col in range(cols // 8):
        for i in range(8):
            out[:, col] |= v[:, col * 8 + AWQ_PACK_ORDER[i]] << np.uint32(i * 4)
    return out.view(np.int32)


def _pack_gptq_rows(intweight: np.ndarray, bits: int) -> np.ndarray:
    """QuantLinear.pack: qweight[row] |= intweight[j] << (bits * (j - i)), 32/bits input rows per word."""
    per = 32 // bits
    k, n = intweight.shape
    out = np.zeros((k // per, n), np.uint32)
    v = intweight.astype(np.uint32)
    for row in range(k // per):
        for j in range(per):
            out[row] |= v[row * per + j] << np.uint32(bits * j)
    return out.view(np.int32)


def _pack_gptq_zeros(zeros: np.ndarray, bits: int, v1: bool) -> np.ndarray:
    """QuantLinear.pack: ``zeros -= 1`` (v1), then qzeros[:, col] |= zeros[:, j] << (bits * (j - i))."""
    per = 32 // bits
    z = (zeros - 1 if v1 else zeros).astype(np.int64).astype(np.uint32)  # -1 wraps, as in AutoGPTQ
    g, n = z.shape
    out = np.zeros((g, n // per), np.uint32)
    for col in range(n // per):
        for j in range(per):
            out[:, col] |= z[:, col * per + j] << np.uint32(bits * j)
    return out.view(np.int32)


def _write_prequantized(
    src: Path, dst: Path, method: str, group: int, *, bits: int = 4, sym: bool = False, v1: bool = True
) -> Stored:
    """``src`` with every layer projection stored AWQ- or GPTQ-packed in ``dst`` (the rest fp16, as the
    published checkpoints); returns what was packed."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in ("config.json", SINGLE_FILE):
            shutil.copyfile(f, dst / f.name)
    out: dict[str, np.ndarray] = {}
    stored: Stored = {}
    for name, array in safetensors.numpy.load_file(str(src / SINGLE_FILE)).items():
        prefix = name.removesuffix(".weight")
        if not prefix.endswith(PROJECTIONS) or prefix == name:
            out[name] = array.astype(np.float16)
            continue
        q, z, s = _quantize_groups(array, group, bits, sym)
        stored[name] = (q, z, s)
        if method == "awq":
            out[f"{prefix}.qweight"], out[f"{prefix}.qzeros"] = _pack_awq(q), _pack_awq(z)
        else:
            out[f"{prefix}.qweight"] = _pack_gptq_rows(q, bits)
            out[f"{prefix}.qzeros"] = _pack_gptq_zeros(z, bits, v1)
            out[f"{prefix}.g_idx"] = (np.arange(array.shape[1]) // group).astype(np.int32)
        out[f"{prefix}.scales"] = s
    # safetensors.numpy writes an array's memory as it is: make every one C-contiguous
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in out.items()}, str(dst / SINGLE_FILE))
    config = json.loads((src / "config.json").read_text())
    if method == "awq":
        qc: dict[str, Any] = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True}
        qc.update(version="gemm", modules_to_not_convert=None)
    else:
        qc = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": False, "sym": sym}
        qc.update(damp_percent=0.01, true_sequential=True, checkpoint_format="gptq" if v1 else "gptq_v2")
    config.update(quantization_config=qc, torch_dtype="float16")
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return stored


def _float_view(q: np.ndarray, z: np.ndarray, s: np.ndarray) -> np.ndarray:
    """(codes - zero) * scale, HF layout [N, K]."""
    g = q.shape[0] // z.shape[0]
    w = (q - np.repeat(z, g, axis=0)).astype(np.float32) * np.repeat(s.astype(np.float32), g, axis=0)
    return w.T


def _edit(directory: Path, tensors: Callable[[dict[str, np.ndarray]], None] | None = None, **qc: Any) -> None:
    if tensors is not None:
        path = str(directory / SINGLE_FILE)
        arrays = safetensors.numpy.load_file(path)
        tensors(arrays)
        safetensors.numpy.save_file(arrays, path)
    if qc:
        config = json.loads((directory / "config.json").read_text())
        config["quantization_config"].update(qc)
        (directory / "config.json").write_text(json.dumps(config))


# ----------------------------------------------------------------------------- fixtures
#: name -> (method, group size, bits, sym, v1)
KINDS = {
    "awq": ("awq", 32, 4, False, True),  # AutoAWQ GEMM, zero points
    "gptq": ("gptq", 64, 4, True, True),  # Qwen's GPTQ-Int4 layout: sym, v1 (zero - 1 stored)
    "gptq8_v2": ("gptq", 32, 8, False, False),  # 8-bit, asymmetric, gptqmodel's v2 format
}


@pytest.fixture(scope="module")
def prequantized(qwen2_tied: Path, module_scratch: ModuleScratch) -> Callable[[str], tuple[Path, Stored]]:
    cache: dict[str, tuple[Path, Stored]] = {}
    root = module_scratch.mkdir("prequant")

    def make(kind: str) -> tuple[Path, Stored]:
        if kind not in cache:
            method, group, bits, sym, v1 = KINDS[kind]
            stored = _write_prequantized(qwen2_tied, root / kind, method, group, bits=bits, sym=sym, v1=v1)
            cache[kind] = (root / kind, stored)
        return cache[kind]

    return make


def _variant(prequantized: Callable[[str], tuple[Path, Stored]], kind: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(prequantized(kind)[0], tmp_path / kind))


# ----------------------------------------------------------------------------- reading
@pytest.mark.parametrize("kind", list(KINDS))
def test_stored_values_round_trip_byte_exact(prequantized, kind: str) -> None:
    directory, stored = prequantized(kind)
    ckpt = Checkpoint.open(directory)
    ckpt.validate()
    method, group, bits, sym, _ = KINDS[kind]
    assert ckpt.prequantized is not None and ckpt.prequantized.config.method.value == method
    for name, (q, z, s) in stored.items():
        found = ckpt.stored_quantization(name)
        assert found is not None and (found.shape, found.bits, found.block_size) == (q.shape, bits, group)
        asym = found.block_quantized(symmetric=False)
        assert asym.codes.dtype == np.uint8 and np.array_equal(asym.codes, q)
        assert np.array_equal(asym.zero_points, z) and np.array_equal(asym.scales, s.astype(np.float32))
        if sym:  # signed codes q - 8, no zero points: MatMulNBits' default zero point stores the same nibbles
            signed = found.block_quantized(symmetric=True, scale_dtype=np.float16)
            assert signed.zero_points is None and np.array_equal(signed.codes, q - 8)
    assert ckpt.stored_quantization("model.norm.weight") is None
    assert ckpt.stored_quantization("model.embed_tokens.weight") is None


@pytest.mark.parametrize("kind", list(KINDS))
def test_float_view_is_the_dequantized_weight(prequantized, kind: str) -> None:
    directory, stored = prequantized(kind)
    ckpt = Checkpoint.open(directory)
    names = ckpt.names()
    assert Q in names and not [n for n in names if n.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))]
    assert ckpt.info(Q).dtype == "F32" and ckpt.shape(Q) == (64, 64) and ckpt.shape(DOWN) == (64, 128)
    for name in (Q, DOWN):
        want = _float_view(*stored[name])
        got = ckpt.read(name)
        assert got.dtype == np.float32 and np.array_equal(got, want)
        rows = [ckpt.read_rows(name, start, start + 5) for start in range(0, want.shape[0], 5)]  # odd chunks
        assert np.array_equal(np.concatenate(rows), want)
    assert ckpt.read(f"{Q.removesuffix('.weight')}.qweight").dtype == np.int32  # parts stay readable by name


def test_config_detection_and_default_scheme(prequantized, qwen2_tied: Path) -> None:
    awq = Checkpoint.open(prequantized("awq")[0])
    assert prequant.default_scheme(awq) == QuantScheme(
        WeightFormat.INT4, block_size=32, symmetric=False, keep=frozenset({Keep.EMBEDDING, Keep.LM_HEAD})
    )
    gptq = prequant.default_scheme(prequantized("gptq")[0])  # a directory works too
    assert gptq is not None and (gptq.fmt, gptq.block_size, gptq.symmetric) == (WeightFormat.INT4, 64, True)
    gptq8 = prequant.default_scheme(Checkpoint.open(prequantized("gptq8_v2")[0]))
    assert gptq8 is not None and (gptq8.fmt, gptq8.symmetric) == (WeightFormat.INT8, False)
    assert prequant.default_scheme(qwen2_tied) is None and prequant.default_scheme(Checkpoint.open(qwen2_tied)) is None
    assert prequant.record(awq) == {
        "method": "awq",
        "bits": 4,
        "group_size": 32,
        "symmetric": False,
        "desc_act": False,
        "linears": 14,
    }
    whole = prequant.detect({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": -1}})
    assert whole is not None and whole.group(4096) == 4096
    with pytest.raises(CheckpointError, match=r"group -1.*--block-size 128"):
        prequant.default_scheme(prequant.Prequantized(whole, {}))


@pytest.mark.parametrize(
    ("qc", "match"),
    [
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "AWQ version 'gemv'"),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "exllama"}, "'exllama'"),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": False}, "zero_point=False"),
        ({"quant_method": "awq", "bits": 8, "group_size": 128}, "AWQ bits=8"),
        ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "GPTQ bits=3"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"}, "'marlin'"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 128, "pack_dtype": "int16"}, "pack_dtype 'int16'"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes' is not supported"),
    ],
)
def test_unsupported_configs_are_one_line_errors(qc: dict[str, Any], match: str) -> None:
    with pytest.raises(CheckpointError, match=match) as info:
        prequant.detect({"quantization_config": qc})
    assert "\n" not in str(info.value) and "re-quantize from the float checkpoint" in str(info.value)


def test_unsupported_checkpoints_fail_at_open_or_validate(prequantized, tmp_path: Path) -> None:
    bad_bits = _variant(prequantized, "gptq", tmp_path / "bits")
    _edit(bad_bits, bits=3)
    with pytest.raises(CheckpointError, match="GPTQ bits=3"):
        Checkpoint.open(bad_bits)

    no_zeros = _variant(prequantized, "awq", tmp_path / "zeros")
    _edit(no_zeros, lambda t: t.pop("model.layers.1.mlp.up_proj.qzeros"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\).*: model\.layers\.1\.mlp\.up_proj\.qzeros") as e:
        Checkpoint.open(no_zeros)
    assert "\n" not in str(e.value)

    act_order = _variant(prequantized, "gptq", tmp_path / "desc_act")
    permuted = np.random.default_rng(0).permutation(np.arange(128) // 64).astype(np.int32)
    _edit(act_order, lambda t: t.update({"model.layers.1.mlp.down_proj.g_idx": permuted}), desc_act=True)
    ckpt = Checkpoint.open(act_order)
    with pytest.raises(CheckpointError, match=r"down_proj\.g_idx .*desc_act.*desc_act=false") as e:
        ckpt.validate()
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="desc_act"):  # never read wrongly either
        ckpt.read(DOWN)

    wrong_shape = _variant(prequantized, "awq", tmp_path / "shape")
    _edit(wrong_shape, lambda t: t.update({"model.layers.0.self_attn.q_proj.scales": np.ones((1, 64), np.float16)}))
    with pytest.raises(CheckpointError, match=r"q_proj\.scales is F16 \[1, 64\], expected F16/BF16/F32 \[2, 64\]"):
        Checkpoint.open(wrong_shape)


# ----------------------------------------------------------------------------- the passes on a small graph
def _graph(ckpt: Checkpoint, dtype: ir.DataType = ir.DataType.FLOAT) -> ir.Model:
    """y1 = x @ concat(q, k, v)^T (the packed qkv_proj weight), y2 = h @ down^T, the weights bound to
    the checkpoint as the exporter binds them."""

    def weight_t(hf: str) -> CheckpointTensor:
        n, k = ckpt.shape(hf)
        return CheckpointTensor(ckpt, _Binding(hf, transpose=True), (k, n), dtype, hf + "_t")

    prefix = "model.layers.0.self_attn."
    qkv = ConcatTensor([weight_t(f"{prefix}{p}_proj.weight") for p in "qkv"], axis=1, name=f"{prefix}qkv_proj.weight_t")
    down = weight_t(DOWN)
    inits = [ir.Value(name=t.name, shape=t.shape, type=ir.TensorType(dtype), const_value=t) for t in (qkv, down)]
    x = ir.Value(name="x", shape=ir.Shape([3, 64]), type=ir.TensorType(dtype))
    h = ir.Value(name="h", shape=ir.Shape([3, 128]), type=ir.TensorType(dtype))
    nodes = [ir.node("MatMul", [x, inits[0]]), ir.node("MatMul", [h, inits[1]])]
    for node, name, n in zip(nodes, ("y1", "y2"), (128, 64), strict=True):
        node.outputs[0].name, node.outputs[0].dtype, node.outputs[0].shape = name, dtype, ir.Shape([3, n])
    graph = ir.Graph([x, h], [n.outputs[0] for n in nodes], nodes=nodes, initializers=inits, opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _qkv(stored: Stored, layer: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The packed qkv_proj's stored values: q, k, v concatenated along N."""
    names = [f"model.layers.{layer}.self_attn.{p}_proj.weight" for p in "qkv"]
    return tuple(np.concatenate([stored[n][i] for n in names], axis=1) for i in range(3))  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("kind", "symmetric"),
    [("awq", False), ("gptq", True), ("gptq", False), ("gptq8_v2", False)],
)
def test_pass_keeps_stored_values_exactly(prequantized, kind: str, symmetric: bool, monkeypatch) -> None:
    """DequantizeLinear and MatMulNBits initializers hold the stored values; nothing is quantized."""
    monkeypatch.setattr(quant_tensors, "quantize", lambda *a, **k: pytest.fail("requantized"))
    directory, stored = prequantized(kind)
    _, group, bits, _, _ = KINDS[kind]
    ckpt = Checkpoint.open(directory)
    model = _graph(ckpt)
    fmt = WeightFormat.INT4 if bits == 4 else WeightFormat.INT8
    requantized: dict[str, str] = {}
    result = QuantizeWeights(QuantScheme(fmt, block_size=group, symmetric=symmetric), requantized=requantized)(model)
    assert result.fired["prequantized"] == 2 and result.fired["requantized"] == 0 and not requantized
    expected = {"model.layers.0.self_attn.qkv_proj.weight_t": _qkv(stored), DOWN + "_t": stored[DOWN]}
    inits = model.graph.initializers
    for name, (q, z, s) in expected.items():
        codes = np.asarray(inits[name].const_value.numpy()).astype(np.int16)
        np.testing.assert_array_equal(codes, q - (1 << (bits - 1)) if symmetric else q)
        np.testing.assert_array_equal(inits[name + ".scales"].const_value.numpy(), s.astype(np.float32))
        if symmetric:
            assert name + ".zero_points" not in inits and inits[name].dtype == ir.DataType.INT4
        else:
            np.testing.assert_array_equal(np.asarray(inits[name + ".zero_points"].const_value.numpy()).astype(int), z)
    rng = np.random.default_rng(0)
    feeds = {
        "x": rng.standard_normal((3, 64)).astype(np.float32),
        "h": rng.standard_normal((3, 128)).astype(np.float32),
    }
    want = [feeds["x"] @ _float_view(*_qkv(stored)).T, feeds["h"] @ _float_view(*stored[DOWN]).T]
    for got, ref in zip(_run(model, feeds), want, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)

    assert MatMulNBitsLowering(accuracy_level=0)(model).fired["matmulnbits"] == 2
    for name, (q, z, s) in expected.items():
        k, n = q.shape
        blob = np.asarray(inits[name + ".B"].const_value.numpy())
        np.testing.assert_array_equal(unpack_bits_last(blob.reshape(n, -1), bits, k).T, q)  # unsigned: q as stored
        scales = np.asarray(inits[name + ".scales"].const_value.numpy()).reshape(n, k // group)
        np.testing.assert_array_equal(scales.T, s.astype(np.float32))
        if symmetric:
            assert name + ".zero_points" not in inits  # MatMulNBits' default zero point 2^(bits-1)
        else:
            packed = np.asarray(inits[name + ".zero_points"].const_value.numpy()).reshape(n, -1)
            np.testing.assert_array_equal(unpack_bits_last(packed, bits, k // group).T, z)
    for got, ref in zip(_run(model, feeds), want, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_stored_quantization_is_found_through_the_lazy_tensors(prequantized) -> None:
    ckpt = Checkpoint.open(prequantized("awq")[0])
    k_proj = CheckpointTensor(ckpt, _Binding(Q.replace("q_proj", "k_proj"), transpose=True), (64, 32), FLOAT, "k")
    found = stored_quantization(k_proj)
    assert isinstance(found, prequant.StoredLinear) and found.shape == (64, 32)
    scaled = ScaledTensor(k_proj, {0: np.ones(64, np.float32)})
    assert stored_quantization(scaled) == "rescaled by the awq pass (--algorithm awq)"
    mixed = ConcatTensor([k_proj, ir.tensor(np.zeros((64, 32), np.float32))], axis=1)
    assert stored_quantization(mixed) == "the packed projections mix stored and float weights"
    norm = CheckpointTensor(ckpt, _Binding("model.norm.weight"), (64,), FLOAT, "norm")
    assert stored_quantization(norm) is None and stored_quantization(ir.tensor(np.zeros(3, np.float32))) is None


def test_fp16_graph_gets_the_stored_fp16_scales_unrounded(prequantized) -> None:
    directory, stored = prequantized("awq")
    model = _graph(Checkpoint.open(directory), ir.DataType.FLOAT16)
    result = QuantizeWeights(QuantScheme(WeightFormat.INT4, block_size=32, symmetric=False))(model)
    assert result.fired["prequantized"] == 2
    q, z, s = stored[DOWN]
    inits = model.graph.initializers
    scales = inits[DOWN + "_t.scales"]
    assert scales.dtype == ir.DataType.FLOAT16 and np.array_equal(scales.const_value.numpy(), s)
    np.testing.assert_array_equal(np.asarray(inits[DOWN + "_t"].const_value.numpy()).astype(int), q)
    np.testing.assert_array_equal(np.asarray(inits[DOWN + "_t.zero_points"].const_value.numpy()).astype(int), z)


@pytest.mark.parametrize(
    ("scheme", "why"),
    [
        (QuantScheme(WeightFormat.INT8, block_size=32, symmetric=False), "differs from the requested int8 block 32"),
        (QuantScheme(WeightFormat.INT4, block_size=64, symmetric=False), "differs from the requested int4 block 64"),
        (QuantScheme(WeightFormat.INT4, block_size=32, symmetric=True), "needs zero points; .*(use --asymmetric)"),
    ],
)
def test_incompatible_scheme_requantizes_and_says_why(prequantized, scheme: QuantScheme, why: str) -> None:
    ckpt = Checkpoint.open(prequantized("awq")[0])
    model = _graph(ckpt)
    explain: list[str] = []
    quantize = QuantizeWeights(scheme, explain=type("S", (), {"write": lambda self, t: explain.append(t)})())
    result = quantize(model)
    assert result.fired["linear"] == 2 and result.fired["requantized"] == 2 and result.fired["prequantized"] == 0
    assert set(quantize.requantized) == {"model.layers.0.self_attn.qkv_proj.weight_t", DOWN + "_t"}
    assert all(re.search(why, reason) for reason in quantize.requantized.values())
    assert "requantized (stored AWQ int4 (group 32, zero points)" in explain[0]


def test_gptq_v1_zero_point_that_wrapped_is_requantized(prequantized, tmp_path: Path) -> None:
    """AutoGPTQ v1 stores zero - 1: a zero point of 0 wraps to all ones and reads back as 16, which
    uint4 cannot hold. The float view keeps AutoGPTQ's arithmetic; the pass requantizes, saying why."""
    directory = _variant(prequantized, "gptq", tmp_path)
    _edit(directory, sym=False)
    qzeros = "model.layers.1.mlp.down_proj.qzeros"
    _edit(directory, lambda t: t[qzeros].__setitem__((0, 0), -1))
    ckpt = Checkpoint.open(directory)
    q, _, s = prequantized("gptq")[1][DOWN]
    z = np.full((2, 64), 8)
    z[0, :8] = 16
    assert np.array_equal(ckpt.read(DOWN), _float_view(q, z, s))
    quantize = QuantizeWeights(QuantScheme(WeightFormat.INT4, block_size=64, symmetric=False))
    result = quantize(_graph(ckpt))
    assert result.fired["prequantized"] == 1 and result.fired["requantized"] == 1
    assert quantize.requantized == {DOWN + "_t": f"{qzeros}: " + prequant._zero_overflow(4)}


# ----------------------------------------------------------------------------- whole exports
def _reference_checkpoint(ckpt: Checkpoint, out: Path) -> Path:
    """A float32 checkpoint of the dequantized weights (what transformers runs as the reference)."""
    out.mkdir()
    tensors = {name: np.ascontiguousarray(ckpt.read(name), dtype=np.float32) for name in ckpt.names()}
    safetensors.numpy.save_file(tensors, str(out / SINGLE_FILE))
    config = json.loads((ckpt.directory / "config.json").read_text())
    del config["quantization_config"]
    config["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(ckpt.directory / name, out / name)
    return out


@pytest.mark.parametrize("kind", ["awq", "gptq"])
def test_export_keeps_stored_int4_and_matches_the_dequantized_reference(
    prequantized, kind: str, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(quant_tensors, "quantize", lambda *a, **k: pytest.fail("requantized"))
    directory, stored = prequantized(kind)
    _, group, bits, sym, _ = KINDS[kind]
    ckpt = Checkpoint.open(directory)
    scheme = prequant.default_scheme(ckpt)
    art = tmp_path / "artifact"
    manifest = run_export(directory, art, ExportOptions(quant=scheme, accuracy_level=0))
    fired = next(p["fired"] for p in manifest.passes if p["name"] == "quantize")
    assert fired["linear"] == 10 and fired["prequantized"] == 10 and fired["requantized"] == 0

    model = ir.load(art / "model.onnx")
    nodes = [n for n in model.graph if n.op_type == "MatMulNBits"]
    assert len(nodes) == 10 and not [n for n in model.graph if n.op_type == "GatherBlockQuantized"]
    for node in nodes:
        weight = node.name.removesuffix("/MatMulNBits").removesuffix("_t")
        layer = int(weight.split(".")[2])
        q, z, s = _qkv(stored, layer) if "qkv_proj" in weight else stored[weight]
        k, n = q.shape
        attrs = {a: node.attributes[a].value for a in ("K", "N", "bits", "block_size")}
        assert attrs == {"K": k, "N": n, "bits": bits, "block_size": group}
        blob = node.inputs[1].const_value.numpy()
        np.testing.assert_array_equal(unpack_bits_last(blob.reshape(n, -1), bits, k).T, q)
        np.testing.assert_array_equal(node.inputs[2].const_value.numpy().reshape(n, -1).T, s.astype(np.float32))
        zp = node.inputs[3] if len(node.inputs) > 3 else None
        if sym:
            assert zp is None
        else:
            assert zp is not None
            np.testing.assert_array_equal(
                unpack_bits_last(zp.const_value.numpy().reshape(n, -1), bits, k // group).T, z
            )

    loaded = open_artifact(art)
    ids = loaded.tokenizer.encode(parity.DEFAULT_TEXT)[:24]
    logits = parity.artifact_logits(loaded.engine, ids)
    reference = parity.Reference(_reference_checkpoint(ckpt, tmp_path / "reference")).logits(ids)
    check_logits(logits, reference, Noise.CROSS)
    if kind == "awq":  # the parity reference of a pre-quantized checkpoint runs the same float view
        check_logits(parity.Reference(directory).logits(ids), reference, Noise.REORDERED)


def test_cli_export_without_weights_keeps_the_checkpoint_quantization(prequantized, tmp_path: Path) -> None:
    """No --weights: the CLI keeps an AWQ checkpoint's int4 at its group size (nothing requantized),
    and the manifest records the source quantization."""
    from typer.testing import CliRunner

    from qwen_export.cli import app

    directory, _ = prequantized("awq")
    out = tmp_path / "awq-art"
    result = CliRunner().invoke(app, ["export", str(directory), "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    manifest = load_manifest(out)
    quant = manifest.extra["quantization"]
    assert (quant["weights"], quant["block_size"], quant["symmetric"]) == ("int4", KINDS["awq"][1], False)
    assert quant["prequantized"]["method"] == "awq" and quant["requantized"] == []
    fired = next(p["fired"] for p in manifest.passes if p["name"] == "quantize")
    assert fired["prequantized"] == fired["linear"] and fired["requantized"] == 0
    # --weights fp32: the dequantized float weights, and the manifest says where they came from
    out32 = tmp_path / "awq-fp32"
    result = CliRunner().invoke(app, ["export", str(directory), "-o", str(out32), "--weights", "fp32"])
    assert result.exit_code == 0, result.output
    assert load_manifest(out32).extra["dequantized_from"]["method"] == "awq"
