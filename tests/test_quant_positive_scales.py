"""Strictly positive symmetric scales (``QuantScheme.positive_scales``) and per-channel quantization
(``QuantScheme.block_size = 0``): the numerics, the clip search, the DequantizeLinear per-axis form
on ONNX Runtime, the quantize pass, and the default scheme left exactly as it was."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from qwen_export.errors import OptionError
from qwen_export.passes.base import op_histogram
from qwen_export.passes.quantize import QuantizeWeights
from qwen_export.quant.algorithms import awq_scales, clip_search, default_clip_grid, quantize
from qwen_export.quant.contrib import matmulnbits_initializers, tied_embedding_initializers
from qwen_export.quant.numeric import BlockQuantized, dequantize, expand_blocks, quantize_rtn
from qwen_export.quant.scheme import QuantAlgorithm, QuantScheme, WeightFormat
from qwen_export.quant.tensors import StoredQuantization, dequantize_linear_initializers
from qwen_export.targets.onnxruntime.matmulnbits import MatMulNBitsLowering


def _heavy(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Student-t (3 dof) weights: heavy tails like real LLM weights."""
    return (np.random.default_rng(seed).standard_t(3, shape) * 0.02).astype(np.float32)


def _gauss(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * 0.02).astype(np.float32)


WEIGHTS = {"gauss": _gauss, "t3": _heavy}


def _bounds(w: np.ndarray, q: BlockQuantized) -> np.ndarray:
    """Per-element error bound: |scale|/2, or |scale| for an element clipped at the top code."""
    scale = np.abs(expand_blocks(q.scales, q))
    top = (1 << (q.bits - 1)) - 1
    clipped = (q.codes == top) & (np.abs(w) > (top + 0.5) * scale)
    return np.where(clipped, scale, scale / 2) * (1 + 1e-5) + 1e-12


def _mse(w: np.ndarray, q: BlockQuantized) -> float:
    return float(np.mean((dequantize(q) - w).astype(np.float64) ** 2))


# --- numerics ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(WEIGHTS))
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block_size", [32, 128, 0])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("scale_dtype", [np.float32, np.float16])
def test_positive_scales_and_error_bounds(kind: str, bits: int, block_size: int, axis: int, scale_dtype: type) -> None:
    w = WEIGHTS[kind]((256, 128), seed=bits + block_size)
    w[:32, :4] = 0.0  # an all-zero block (or channel) gets scale 1
    q = quantize_rtn(w, bits, block_size, axis, True, scale_dtype=scale_dtype, positive_scales=True)
    assert (q.scales > 0).all()
    assert np.array_equal(q.scales, q.scales.astype(scale_dtype).astype(np.float32))
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    assert q.codes.min() >= lo and q.codes.max() <= hi
    assert (np.abs(w - dequantize(q)) <= _bounds(w, q)).all()
    length = w.shape[axis] if block_size == 0 else block_size
    assert q.block_size == length
    # each block's extreme maps exactly to qmin (negative extreme) or qmax (positive extreme)
    blocks = np.moveaxis(w, axis, 0).reshape(w.shape[axis] // length, length, -1)
    codes = np.moveaxis(q.codes, axis, 0).reshape(blocks.shape)
    where = np.abs(blocks).argmax(axis=1)[:, None, :]
    extreme = np.take_along_axis(blocks, where, axis=1)[:, 0, :]
    top = np.take_along_axis(codes, where, axis=1)[:, 0, :]
    nonzero = extreme != 0
    assert (top[nonzero & (extreme < 0)] == lo).all() and (top[nonzero & (extreme > 0)] == hi).all()


@pytest.mark.parametrize("kind", sorted(WEIGHTS))
def test_positive_mode_int4_error_between_signed_and_absmax_over_7(kind: str) -> None:
    w = WEIGHTS[kind]((1024, 64), seed=1)
    signed = _mse(w, quantize_rtn(w, 4, 32, 0, True))
    positive = _mse(w, quantize_rtn(w, 4, 32, 0, True, positive_scales=True))
    blocks = w.reshape(32, 32, 64)
    scale = np.abs(blocks).max(axis=1, keepdims=True) / 7
    absmax = float(np.mean((np.clip(np.rint(blocks / scale), -7, 7) * scale - blocks).astype(np.float64) ** 2))
    assert signed < positive < absmax
    assert positive < 0.95 * absmax  # the blocks with a negative extreme still use code -8


def test_positive_mode_equals_signed_mode_on_negative_extremes() -> None:
    w = _heavy((512, 64), seed=3)
    signed = quantize_rtn(w, 4, 32, 0, True)
    positive = quantize_rtn(w, 4, 32, 0, True, positive_scales=True)
    negative = signed.scales > 0  # the signed convention's scale is positive exactly when the extreme is negative
    assert negative.any() and (~negative).any()
    assert np.array_equal(positive.scales[negative], signed.scales[negative])
    same = np.repeat(negative, 32, axis=0)
    assert np.array_equal(positive.codes[same], signed.codes[same])
    assert np.allclose(positive.scales[~negative], -signed.scales[~negative] * 8 / 7, rtol=1e-6)


def test_positive_mode_asymmetric_is_unchanged() -> None:
    w = _heavy((128, 32), seed=4)
    a, b = quantize_rtn(w, 4, 32, 0, False), quantize_rtn(w, 4, 32, 0, False, positive_scales=True)
    assert np.array_equal(a.codes, b.codes) and np.array_equal(a.scales, b.scales)
    assert np.array_equal(a.zero_points, b.zero_points) and (a.scales > 0).all()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kind", sorted(WEIGHTS))
def test_clip_search_positive_mode(bits: int, kind: str) -> None:
    grid = default_clip_grid(bits, True, positive_scales=True)
    assert grid and all(0 < r <= 1 for r in grid) and grid[0] == 1.0
    assert any(r < 0 for r in default_clip_grid(bits, True))  # the signed grid still flips
    w = WEIGHTS[kind]((256, 64), seed=5)
    rtn = quantize_rtn(w, bits, 32, 0, True, positive_scales=True)
    for block_size in (32, 0):
        q = clip_search(w, bits, block_size, 0, True, positive_scales=True)
        assert (q.scales > 0).all()
    q = clip_search(w, bits, 32, 0, True, positive_scales=True)
    assert _mse(w, q) <= _mse(w, rtn) * (1 + 1e-6)
    importance = np.random.default_rng(0).uniform(0, 2, 256).astype(np.float32)
    weighted = quantize(w, bits, 32, 0, True, algorithm=QuantAlgorithm.AWQ, importance=importance, positive_scales=True)
    assert (weighted.scales > 0).all()


def test_positive_mode_rejects_negative_clip() -> None:
    w = _heavy((64, 8))
    with pytest.raises(ValueError, match="positive_scales"):
        clip_search(w, 4, 32, 0, True, grid=[1.0, -1.0], positive_scales=True)
    with pytest.raises(ValueError, match="positive"):
        quantize_rtn(w, 4, 32, 0, True, clip=np.full((2, 8), -1.0, np.float32), positive_scales=True)
    clip_search(w, 4, 32, 0, True, grid=[1.0, -1.0])  # the signed mode still takes flipped ratios


def test_per_channel_is_one_block_spanning_the_axis() -> None:
    w = _heavy((96, 40), seed=6)
    for axis, shape in ((0, (1, 40)), (1, (96, 1))):
        q = quantize_rtn(w, 8, 0, axis, True, positive_scales=True)
        same = quantize_rtn(w, 8, w.shape[axis], axis, True, positive_scales=True)
        assert q.scales.shape == shape and q.block_size == w.shape[axis]
        assert np.array_equal(q.codes, same.codes) and np.array_equal(q.scales, same.scales)
    x = np.random.default_rng(0).standard_normal((64, 96)).astype(np.float32)
    s = awq_scales(w, np.abs(x).mean(0), x, bits=8, block_size=0, symmetric=True, grid=4, positive_scales=True)
    assert s.shape == (96,) and (s > 0).all()


def test_stored_negative_scales_are_requantized_positive() -> None:
    w = _heavy((64, 16), seed=7)

    class Stored:  # a pre-quantized checkpoint's values, one block with a negative scale
        shape, bits, block_size = (64, 16), 4, 32

        def block_quantized(self, symmetric: bool, scale_dtype: type) -> BlockQuantized:
            return quantize_rtn(w, 4, 32, 0, symmetric, scale_dtype=scale_dtype)

    kept = StoredQuantization(w, Stored(), symmetric=True, scale_dtype=ir.DataType.FLOAT)
    assert (kept.quantize().scales < 0).any()  # default: the stored values as they are
    strict = StoredQuantization(w, Stored(), symmetric=True, scale_dtype=ir.DataType.FLOAT, positive_scales=True)
    with pytest.warns(UserWarning, match="requantized"):
        q = strict.quantize()
    assert (q.scales > 0).all() and strict.reads == 1
    assert np.array_equal(q.codes, quantize_rtn(w, 4, 32, 0, True, positive_scales=True).codes)
    assert strict.fresh("x").positive_scales


# --- ONNX Runtime: the per-axis DequantizeLinear ----------------------------------------------------------


def _run_dq(init) -> np.ndarray:  # noqa: ANN001
    values = [
        ir.Value(name=t.name, shape=ir.Shape(list(t.shape)), type=ir.TensorType(t.dtype), const_value=t)
        for t in init.tensors
    ]
    node = ir.node("DequantizeLinear", values, init.attributes)
    out = node.outputs[0]
    out.name, out.dtype = "y", ir.DataType.FLOAT
    graph = ir.Graph([], [out], nodes=[node], initializers=values, opset_imports={"": 21})
    proto = ir.to_proto(ir.Model(graph, ir_version=10)).SerializeToString()
    return ort.InferenceSession(proto, providers=["CPUExecutionProvider"]).run(None, {})[0]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("axis", [0, 1])
def test_ort_per_channel_dequantize_linear(bits: int, axis: int) -> None:
    w = _heavy((128, 48), seed=8)
    init = dequantize_linear_initializers(
        w, bits=bits, block_size=0, axis=axis, symmetric=True, name="w", positive_scales=True
    )
    channels = w.shape[1 - axis]
    assert init.attributes == {"axis": 1 - axis}  # no block_size attribute: the per-axis form
    assert tuple(init.scales.shape) == (channels,) and init.zero_points is None
    q = quantize_rtn(w, bits, 0, axis, True, positive_scales=True)
    scales = init.scales.numpy()
    assert scales.shape == (channels,) and (scales > 0).all()
    got = _run_dq(init)
    np.testing.assert_array_equal(got, dequantize(q))
    assert (np.abs(got - w) <= _bounds(w, q)).all()


def test_per_channel_has_no_com_microsoft_layout() -> None:
    w = _heavy((64, 32))
    with pytest.raises(ValueError, match="per-channel"):
        matmulnbits_initializers(w, bits=8, block_size=0, symmetric=True)
    with pytest.raises(ValueError, match="per-channel"):
        tied_embedding_initializers(w, bits=8, block_size=0, symmetric=True)
    with pytest.raises(ValueError, match="2-D"):
        dequantize_linear_initializers(np.ones((4, 8, 8), np.float32), bits=8, block_size=0, axis=1, symmetric=True)


# --- the scheme and the quantize pass ------------------------------------------------------------------

OLD_KEYS = ["weights", "bits", "block_size", "symmetric", "algorithm", "keep", "embedding_bits", "keep_layers"]


def test_scheme_fields() -> None:
    default = QuantScheme(WeightFormat.INT4)
    assert not default.positive_scales and not default.per_channel
    assert list(default.to_dict()) == OLD_KEYS
    strict = QuantScheme(WeightFormat.INT8, block_size=0, positive_scales=True)
    assert strict.per_channel and strict.to_dict()["positive_scales"] is True and strict.to_dict()["block_size"] == 0
    assert list(strict.to_dict()) == [*OLD_KEYS, "positive_scales"]
    with pytest.raises(OptionError, match="--block-size must be 32, 64 or 128"):
        QuantScheme(WeightFormat.INT4, block_size=48)
    with pytest.raises(OptionError, match="per-channel"):
        strict.require_blocks("onnxruntime")
    default.require_blocks("onnxruntime")


def test_default_quantization_unchanged() -> None:
    """Fixed-seed codes and scales are what the signed convention (``extreme / qmin``) gives, bit
    for bit, as before positive_scales existed."""
    w = (np.random.default_rng(1234).standard_t(3, (256, 96)) * 0.02).astype(np.float32)
    digests = {
        (4, "rtn"): "9c07aff2edfa68424e43b7b8d8693dd8c38a150ca00ae2cc998aae83032516aa",
        (4, "clip"): "cc89f4f67265d59b83dd38a1b66ac87829c48e93566926ea6798533cdc5e24b9",
        (8, "rtn"): "b7f8548c7d0f979019a586bb016c5817b40e0ab8ea65090d4a7218e13764b9f8",
        (8, "clip"): "f34ecfe17042aed6a974d00864e9083aefbd734c978cd91e82ca39962ede2a1a",
    }
    for (bits, how), digest in digests.items():
        q = quantize_rtn(w, bits, 32, 0, True) if how == "rtn" else clip_search(w, bits, 32, 0, True)
        h = hashlib.sha256(q.codes.tobytes() + q.scales.astype(np.float32).tobytes())
        assert h.hexdigest() == digest, (bits, how)
    blocks = w.reshape(8, 32, 96)
    where = np.abs(blocks).argmax(axis=1)[:, None, :]
    expected = np.take_along_axis(blocks, where, axis=1)[:, 0, :] / np.float32(-8)
    q = quantize_rtn(w, 4, 32, 0, True)
    np.testing.assert_array_equal(q.scales, expected)
    assert (q.scales < 0).any()


def _small_model(seed: int = 0) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """x [2, 64] -> MatMul(x, up [64, 96]) -> MatMul(., down [96, 64]); emb = Gather(E [50, 64], ids);
    logits = Gemm(x, E, transB=1) (the tied head)."""
    rng = np.random.default_rng(seed)
    arrays = {
        "model.layers.0.mlp.up_proj.weight_t": rng.standard_normal((64, 96)).astype(np.float32),
        "model.layers.0.mlp.down_proj.weight_t": rng.standard_normal((96, 64)).astype(np.float32),
        "model.embed_tokens.weight": rng.standard_normal((50, 64)).astype(np.float32),
    }
    inits = {
        name: ir.Value(
            name=name, shape=ir.Shape(a.shape), type=ir.TensorType(ir.DataType.FLOAT), const_value=ir.tensor(a)
        )
        for name, a in arrays.items()
    }
    x = ir.Value(name="x", shape=ir.Shape([2, 64]), type=ir.TensorType(ir.DataType.FLOAT))
    ids = ir.Value(name="ids", shape=ir.Shape([1, 3]), type=ir.TensorType(ir.DataType.INT64))
    up = ir.node("MatMul", [x, inits["model.layers.0.mlp.up_proj.weight_t"]])
    down = ir.node("MatMul", [up.outputs[0], inits["model.layers.0.mlp.down_proj.weight_t"]])
    gather = ir.node("Gather", [inits["model.embed_tokens.weight"], ids], {"axis": 0})
    head = ir.node("Gemm", [x, inits["model.embed_tokens.weight"]], {"transB": 1})
    outs = [down.outputs[0], gather.outputs[0], head.outputs[0]]
    for value, name, shape in zip(outs, ("y", "emb", "logits"), ([2, 64], [1, 3, 64], [2, 50]), strict=True):
        value.name, value.dtype, value.shape = name, ir.DataType.FLOAT, ir.Shape(shape)
    graph = ir.Graph(
        [x, ids], outs, nodes=[up, down, gather, head], initializers=list(inits.values()), opset_imports={"": 21}
    )
    return ir.Model(graph, ir_version=10), arrays


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    proto = ir.to_proto(model).SerializeToString()
    return ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("algorithm", [QuantAlgorithm.RTN, QuantAlgorithm.CLIP])
def test_quantize_pass_per_channel_int8_positive(algorithm: QuantAlgorithm) -> None:
    scheme = QuantScheme(WeightFormat.INT8, block_size=0, positive_scales=True, algorithm=algorithm)
    model, arrays = _small_model()
    result = QuantizeWeights(scheme)(model)
    assert result.fired == {"linear": 2, "lm_head": 0, "embedding": 1, "tied_lm_head": 1, "kept": 0}
    dqs = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 3
    for node in dqs:
        codes, scales = node.inputs[0], node.inputs[1]
        assert len(node.inputs) == 2  # symmetric: no zero points
        assert "block_size" not in node.attributes
        assert codes.dtype == ir.DataType.INT8 and len(scales.shape) == 1
        axis = node.attributes["axis"].value
        assert scales.shape[0] == codes.shape[axis]
        embedding = codes.name == "model.embed_tokens.weight"
        assert axis == (0 if embedding else 1)  # W [K, N]: scales [N]; E [V, H]: scales [V]
        assert (scales.const_value.numpy() > 0).all()

    def deq(name: str, axis: int) -> np.ndarray:
        return dequantize(quantize(arrays[name], 8, 0, axis, True, algorithm=algorithm, positive_scales=True))

    up = deq("model.layers.0.mlp.up_proj.weight_t", 0)
    down = deq("model.layers.0.mlp.down_proj.weight_t", 0)
    table = deq("model.embed_tokens.weight", 1)
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((2, 64)).astype(np.float32), "ids": np.array([[0, 7, 49]], np.int64)}
    expected = [feeds["x"] @ up @ down, table[feeds["ids"]], feeds["x"] @ table.T]
    portable = _run(model, feeds)
    for got, want in zip(portable, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    exact = [
        feeds["x"] @ arrays["model.layers.0.mlp.up_proj.weight_t"] @ arrays["model.layers.0.mlp.down_proj.weight_t"]
    ]
    assert np.abs(portable[0] - exact[0]).max() < 0.05 * np.abs(exact[0]).max()  # int8: close to the float model

    # the ONNX Runtime lowering leaves per-channel DequantizeLinear alone (MatMulNBits needs blocks)
    lowering = MatMulNBitsLowering(accuracy_level=0)(model)
    assert not any(lowering.fired.values()) and op_histogram(model)["DequantizeLinear"] == 3
    for got, want in zip(_run(model, feeds), portable, strict=True):
        np.testing.assert_array_equal(got, want)


def test_quantize_pass_positive_int4_blocks() -> None:
    """Blocked int4 with positive scales: the usual blocked form, every scale > 0, and the ONNX
    Runtime lowering still applies."""
    scheme = QuantScheme(WeightFormat.INT4, positive_scales=True, embedding_bits=4)
    model, _ = _small_model(seed=2)
    QuantizeWeights(scheme)(model)
    dqs = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 3
    for node in dqs:
        assert node.attributes["block_size"].value == 32
        assert (node.inputs[1].const_value.numpy() > 0).all()
    feeds = {"x": np.ones((2, 64), np.float32), "ids": np.array([[1, 2, 3]], np.int64)}
    portable = _run(model, feeds)
    lowering = MatMulNBitsLowering(accuracy_level=0)(model)
    assert lowering.fired["matmulnbits"] == 2 and lowering.fired["gather_block_quantized"] == 1
    for got, want in zip(_run(model, feeds), portable, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
