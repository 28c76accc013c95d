"""Blocked weight quantization: numpy reference numerics, packing, algorithms, lazy tensors, and
agreement with ONNX Runtime's DequantizeLinear / MatMulNBits / GatherBlockQuantized kernels."""

from __future__ import annotations

import io
import os
import tracemalloc
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as onh

from qwen_export.onnx_writer import write_onnx
from qwen_export.quant import numeric
from qwen_export.quant.algorithms import awq_scales, clip_search, input_importance, quantize
from qwen_export.quant.contrib import (
    gather_block_quantized_initializers,
    matmulnbits_initializers,
    tied_embedding_initializers,
)
from qwen_export.quant.numeric import (
    BlockQuantized,
    dequantize,
    expand_blocks,
    pack_bits_last,
    pack_codes_last,
    pack_gather_block_quantized,
    pack_matmulnbits,
    pack_onnx_int4,
    quantize_rtn,
    transpose_blocks,
    unpack_bits_last,
    unpack_onnx_int4,
    write_onnx_int4,
)
from qwen_export.quant.scheme import QuantAlgorithm
from qwen_export.quant.tensors import QuantizedPartTensor, dequantize_linear_initializers

BITS_SYM = [(4, True), (4, False), (8, True), (8, False)]


def _heavy(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Student-t (3 dof) weights: heavy tails like real LLM weights."""
    return (np.random.default_rng(seed).standard_t(3, shape) * 0.02).astype(np.float32)


def _bounds(w: np.ndarray, q: BlockQuantized) -> np.ndarray:
    """Per-element error bound: |scale|/2, or |scale| for a symmetric element clipped at the top code."""
    scale = np.abs(expand_blocks(q.scales, q))
    bound = scale / 2
    if q.signed:
        top = (1 << (q.bits - 1)) - 1
        clipped = (q.codes == top) & (np.abs(w) > (top + 0.5) * scale)
        bound = np.where(clipped, scale, bound)
    return bound * (1 + 1e-5) + 1e-12


# --- RTN -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,symmetric", BITS_SYM)
@pytest.mark.parametrize("block_size", [32, 64, 128])
@pytest.mark.parametrize("axis", [0, 1])
def test_rtn_error_bound(bits: int, symmetric: bool, block_size: int, axis: int) -> None:
    w = _heavy((256, 256))
    q = quantize_rtn(w, bits, block_size, axis, symmetric)
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if symmetric else (0, (1 << bits) - 1)
    assert q.codes.dtype == (np.int8 if symmetric else np.uint8) and q.codes.shape == w.shape
    assert q.codes.min() >= lo and q.codes.max() <= hi
    expected = (256 // block_size, 256) if axis == 0 else (256, 256 // block_size)
    assert q.scales.shape == expected and q.scales.dtype == np.float32
    assert (q.zero_points is None) == symmetric
    if not symmetric:
        assert q.zero_points.shape == expected and q.zero_points.dtype == np.uint8
        assert q.zero_points.max() <= hi
    error = np.abs(w - dequantize(q))
    assert (error <= _bounds(w, q)).all()
    if symmetric:  # each block's extreme element maps exactly to the lowest code
        view = np.moveaxis(q.codes, axis, 0).reshape(256 // block_size, block_size, -1)
        assert (view.min(axis=1) == lo).all()


def test_int4_symmetric_convention_beats_absmax_over_7() -> None:
    """The signed-extreme / -8 scale has lower error than absmax / 7 on heavy-tailed weights."""
    w = _heavy((1024, 64), seed=1)
    ours = np.mean((dequantize(quantize_rtn(w, 4, 32, 0, True)) - w) ** 2)
    blocks = w.reshape(32, 32, 64)
    scale = np.abs(blocks).max(axis=1, keepdims=True) / 7
    alt = np.mean((np.clip(np.rint(blocks / scale), -7, 7) * scale - blocks) ** 2)
    assert ours < 0.9 * alt


@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_clip_ratio(symmetric: bool) -> None:
    w = _heavy((128, 32), seed=2)
    full = quantize_rtn(w, 4, 32, 0, symmetric)
    clipped = quantize_rtn(w, 4, 32, 0, symmetric, clip=np.full(full.scales.shape, 0.75, np.float32))
    assert (np.abs(clipped.scales) < np.abs(full.scales)).all()
    blocks = w.reshape(4, 32, 32)
    if symmetric:
        inside = np.abs(w) <= 0.75 * 0.99 * np.abs(blocks).max(axis=1).repeat(32, axis=0)
    else:  # the clipped range [0.75 * min(lo, 0), 0.75 * max(hi, 0)]
        lo = np.minimum(blocks.min(axis=1), 0).repeat(32, axis=0)
        hi = np.maximum(blocks.max(axis=1), 0).repeat(32, axis=0)
        inside = (w >= 0.75 * 0.99 * lo) & (w <= 0.75 * 0.99 * hi)
    assert inside.mean() > 0.8
    error = np.abs(w - dequantize(clipped))
    assert (error[inside] <= _bounds(w, clipped)[inside]).all()
    with pytest.raises(ValueError, match="clip has shape"):
        quantize_rtn(w, 4, 32, 0, symmetric, clip=np.ones(3, np.float32))


@pytest.mark.parametrize("bits,symmetric", BITS_SYM)
def test_rtn_zero_block(bits: int, symmetric: bool) -> None:
    w = _heavy((64, 8))
    w[:32, 3] = 0.0
    q = quantize_rtn(w, bits, 32, 0, symmetric)
    assert np.isfinite(q.scales).all() and q.scales[0, 3] == 1.0
    d = dequantize(q)
    assert np.isfinite(d).all() and (d[:32, 3] == 0).all()
    assert (np.abs(w - d) <= _bounds(w, q)).all()


def test_rtn_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="not a positive multiple of block_size 32"):
        quantize_rtn(np.ones((48, 4), np.float32), 4, 32, 0, True)
    with pytest.raises(ValueError, match="NaN"):
        quantize_rtn(np.full((32, 4), np.nan, np.float32), 4, 32, 0, True)
    with pytest.raises(ValueError, match="bits"):
        quantize_rtn(np.ones((32, 4), np.float32), 3, 32, 0, True)


@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_fp16_scales_are_exact(symmetric: bool) -> None:
    w = _heavy((128, 16), seed=3).astype(np.float16)
    q = quantize_rtn(w, 4, 32, 0, symmetric, scale_dtype=np.float16)
    assert (q.scales.astype(np.float16).astype(np.float32) == q.scales).all()
    w32 = w.astype(np.float32)
    assert (np.abs(w32 - dequantize(q)) <= _bounds(w32, q) * 1.002).all()


def test_transpose_blocks_is_the_same_quantization() -> None:
    e = _heavy((40, 64))
    q = quantize_rtn(e, 4, 32, 1, True)
    t = transpose_blocks(q)
    assert t.axis == 0 and t.shape == (64, 40)
    assert np.array_equal(dequantize(t), dequantize(q).T)
    assert np.array_equal(dequantize(quantize_rtn(e.T, 4, 32, 0, True)), dequantize(t))


# --- packing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 7, 33])
@pytest.mark.parametrize("signed", [True, False])
def test_onnx_int4_packing_round_trip(count: int, signed: bool) -> None:
    rng = np.random.default_rng(count)
    codes = rng.integers(-8, 8, count).astype(np.int8) if signed else rng.integers(0, 16, count).astype(np.uint8)
    data = pack_onnx_int4(codes)
    assert len(data) == (count + 1) // 2
    # independent oracle: onnx's own int4 packing
    oracle = onh.from_array(codes.astype(ml_dtypes.int4 if signed else ml_dtypes.uint4)).raw_data
    assert data == oracle
    back = unpack_onnx_int4(data, (count,), signed)
    assert back.dtype == codes.dtype and np.array_equal(back, codes)


def test_onnx_int4_packing_layout() -> None:
    assert pack_onnx_int4(np.array([1, 2, 3], np.uint8)) == bytes([0x21, 0x03])  # first in the low nibble
    assert pack_onnx_int4(np.array([-1, -8], np.int8)) == bytes([0x8F])
    assert np.array_equal(unpack_onnx_int4(bytes([0x8F]), (2,), True), np.array([-1, -8], np.int8))
    assert np.array_equal(unpack_onnx_int4(bytes([0x21, 0x03]), (3,), False), np.array([1, 2, 3], np.uint8))
    with pytest.raises(ValueError, match="bytes cannot hold"):
        unpack_onnx_int4(b"\0\0", (5,), False)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_bits_last_round_trip(bits: int) -> None:
    values = np.random.default_rng(bits).integers(0, 1 << bits, (3, 5, 13)).astype(np.uint8)
    packed = pack_bits_last(values, bits)
    assert packed.shape == (3, 5, -(-13 * bits // 8))
    assert np.array_equal(unpack_bits_last(packed, bits, 13), values)
    if bits == 4:
        assert pack_bits_last(np.array([[1, 2, 3]], np.uint8), 4).tobytes() == bytes([0x21, 0x03])


@pytest.mark.parametrize("bits,symmetric", BITS_SYM)
def test_matmulnbits_layout(bits: int, symmetric: bool) -> None:
    k, n, block = 128, 24, 32
    q = quantize_rtn(_heavy((k, n)), bits, block, 0, symmetric)
    b, scales, zero_points = pack_matmulnbits(q)
    kb = k // block
    assert b.dtype == np.uint8 and b.shape == (n, kb, block * bits // 8)
    assert scales.shape == (n * kb,) and np.array_equal(scales.reshape(n, kb), q.scales.T)
    unsigned = unpack_bits_last(b.reshape(n, -1), bits, k).T.astype(np.int16)
    if symmetric:
        assert zero_points is None
        assert np.array_equal(unsigned - (1 << (bits - 1)), q.codes)
    else:
        assert zero_points.shape == (n * -(-kb * bits // 8),)
        assert np.array_equal(unsigned, q.codes)
        assert np.array_equal(unpack_bits_last(zero_points.reshape(n, -1), bits, kb), q.zero_points.T)


def _pack_rows_reference(values: np.ndarray, bits: int) -> np.ndarray:
    """pack_bits_last one row at a time (the chunked packing must give these bytes)."""
    return np.stack([pack_bits_last(row[None], bits)[0] for row in values.reshape(-1, values.shape[-1])]).reshape(
        *values.shape[:-1], -1
    )


@pytest.mark.parametrize("bits,symmetric", BITS_SYM + [(2, False)])
def test_chunked_packing_equals_whole(bits: int, symmetric: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of a few rows (odd widths, chunk edges inside blocks' columns) give the same bytes."""
    codes_range = (-(1 << (bits - 1)), 1 << (bits - 1)) if symmetric else (0, 1 << bits)
    rng = np.random.default_rng(bits)
    for k, n in ((96, 37), (64, 5)):
        codes = rng.integers(*codes_range, (k, n)).astype(np.int8 if symmetric else np.uint8)
        zp = None if symmetric else rng.integers(0, 1 << bits, (k // 32, n)).astype(np.uint8)
        q = BlockQuantized(codes, np.ones((k // 32, n), np.float32), zp, bits, 32, 0)
        whole_b, _, _ = pack_matmulnbits(q)
        gather = BlockQuantized(
            codes.T.copy(), np.ones((n, k // 32), np.float32), None if zp is None else zp.T, bits, 32, 1
        )
        whole_rows = pack_codes_last(gather)
        monkeypatch.setattr(numeric, "PACK_CHUNK_BYTES", 7)
        assert np.array_equal(pack_matmulnbits(q)[0], whole_b)
        assert np.array_equal(pack_codes_last(gather), whole_rows)
        assert np.array_equal(whole_rows, _pack_rows_reference(gather.unsigned_codes(), bits))
        odd = rng.integers(0, 1 << bits, (5, 3, 13)).astype(np.uint8)
        assert np.array_equal(pack_bits_last(odd, bits), _pack_rows_reference(odd, bits))
        monkeypatch.undo()


@pytest.mark.parametrize("shape", [(6, 10), (5, 3, 4), (7, 5), (9,), (4, 0)])
def test_write_onnx_int4_in_chunks(shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of rows (or the whole tensor when a row holds an odd count) give pack_onnx_int4's bytes."""
    monkeypatch.setattr(numeric, "PACK_CHUNK_BYTES", 12)
    rng = np.random.default_rng(len(shape))
    for codes in (rng.integers(-8, 8, shape).astype(np.int8), rng.integers(0, 16, shape).astype(np.uint8)):
        for view in (codes, codes.T):
            f = io.BytesIO()
            assert write_onnx_int4(view, f) == len(f.getvalue())
            assert f.getvalue() == pack_onnx_int4(view)


def _traced_peak(fn: object, *args: object) -> int:
    tracemalloc.start()
    try:
        fn(*args)  # type: ignore[operator]
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_packing_a_big_table_allocates_little_beyond_its_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 152064 x 8192 lm_head / embedding are packed in chunks: the peak is the packed result
    (half the codes at int4) plus a chunk, not a transposed or int16 copy of all the codes."""
    monkeypatch.setattr(numeric, "PACK_CHUNK_BYTES", 1 << 18)
    k, n = 2048, 4096  # 8 MiB of codes
    rng = np.random.default_rng(0)
    unsigned = BlockQuantized(
        rng.integers(0, 16, (k, n), dtype=np.uint8),
        np.ones((k // 32, n), np.float32),
        rng.integers(0, 16, (k // 32, n), dtype=np.uint8),
        4,
        32,
        0,
    )
    signed = BlockQuantized(
        rng.integers(-8, 8, (n, k), dtype=np.int8), np.ones((n, k // 32), np.float32), None, 4, 32, 1
    )
    codes, chunks = k * n, 8 * (1 << 18)  # a chunk's int16 / uint8 / shifted temporaries
    scales_etc = unsigned.scales.nbytes + unsigned.zero_points.nbytes  # MatMulNBits' N-major copies
    assert _traced_peak(pack_matmulnbits, unsigned) < 0.5 * codes + scales_etc + chunks
    assert _traced_peak(pack_codes_last, signed) < 0.5 * codes + chunks
    assert _traced_peak(pack_bits_last, unsigned.codes, 4) < 0.5 * codes + chunks
    # the portable DequantizeLinear form: int4 codes streamed to the file, nothing full-size
    with open(os.devnull, "wb") as sink:
        assert _traced_peak(write_onnx_int4, signed.codes, sink) < chunks


# --- ONNX Runtime agreement ------------------------------------------------------------------------


def _session(nodes: list, inputs: list, outputs: list, initializers: list) -> ort.InferenceSession:
    graph = oh.make_graph(nodes, "g", inputs, outputs, initializers)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21), oh.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _proto(name: str, tensor: ir.TensorProtocol) -> onnx.TensorProto:
    """An ONNX initializer from a lazy tensor's raw bytes (what the writer stores)."""
    dims = [int(d) for d in tensor.shape.numpy()]
    return oh.make_tensor(name, int(tensor.dtype.value), dims, vals=tensor.tobytes(), raw=True)


@pytest.mark.parametrize("bits,symmetric", BITS_SYM)
@pytest.mark.parametrize("axis", [0, 1])
def test_ort_dequantize_linear_is_bitwise(bits: int, symmetric: bool, axis: int) -> None:
    w = _heavy((128, 64), seed=4)
    inits = dequantize_linear_initializers(w, bits=bits, block_size=32, axis=axis, symmetric=symmetric, name="w")
    q = quantize_rtn(w, bits, 32, axis, symmetric)
    names = ["codes", "scales", "zp"][: len(inits.tensors)]
    node = oh.make_node("DequantizeLinear", names, ["y"], **inits.attributes)
    y_info = oh.make_tensor_value_info("y", TensorProto.FLOAT, [128, 64])
    protos = [_proto(name, t) for name, t in zip(names, inits.tensors, strict=True)]
    (y,) = _session([node], [], [y_info], protos).run(None, {})
    assert np.array_equal(y, dequantize(q))


def test_ort_dequantize_linear_fp16_output() -> None:
    w = _heavy((64, 32), seed=5).astype(np.float16)
    inits = dequantize_linear_initializers(
        w, bits=4, block_size=32, axis=0, symmetric=True, output_dtype=ir.DataType.FLOAT16
    )
    node = oh.make_node("DequantizeLinear", ["c", "s"], ["y"], **inits.attributes)
    y_info = oh.make_tensor_value_info("y", TensorProto.FLOAT16, [64, 32])
    protos = [_proto("c", inits.codes), _proto("s", inits.scales)]
    (y,) = _session([node], [], [y_info], protos).run(None, {})
    q = quantize_rtn(w, 4, 32, 0, True, scale_dtype=np.float16)
    assert np.array_equal(y, dequantize(q).astype(np.float16))


def _matmulnbits_session(inits, k: int, n: int, accuracy_level: int = 0) -> ort.InferenceSession:
    names = ["B", "scales", "zp"][: len(inits.tensors)]
    attributes = dict(inits.attributes, accuracy_level=accuracy_level)
    node = oh.make_node("MatMulNBits", ["x", *names], ["y"], domain="com.microsoft", **attributes)
    x_info = oh.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])
    y_info = oh.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])
    return _session([node], [x_info], [y_info], [_proto(nm, t) for nm, t in zip(names, inits.tensors, strict=True)])


@pytest.mark.parametrize("bits,symmetric", BITS_SYM)
def test_ort_matmulnbits(bits: int, symmetric: bool) -> None:
    k, n = 256, 48
    w = _heavy((k, n), seed=6)
    q = quantize_rtn(w, bits, 32, 0, symmetric)
    x = np.random.default_rng(7).standard_normal((5, k)).astype(np.float32)
    reference = x.astype(np.float64) @ dequantize(q).astype(np.float64)
    inits = matmulnbits_initializers(w, bits=bits, block_size=32, symmetric=symmetric)
    assert inits.attributes == {"K": k, "N": n, "bits": bits, "block_size": 32, "accuracy_level": 0}
    (y,) = _matmulnbits_session(inits, k, n).run(None, {"x": x})
    assert np.abs(y - reference).max() <= 1e-5 * np.abs(reference).max()
    # accuracy_level 4 quantizes x to int8 per block: runs, loosely close
    inits = matmulnbits_initializers(w, bits=bits, block_size=32, symmetric=symmetric)
    (y4,) = _matmulnbits_session(inits, k, n, accuracy_level=4).run(None, {"x": x})
    assert np.abs(y4 - reference).max() <= 3e-2 * np.abs(reference).max()


def test_ort_matmulnbits_from_transposed_source() -> None:
    k, n = 128, 40
    w_hf = _heavy((n, k), seed=8)  # HF layout [out, in]
    inits = matmulnbits_initializers(w_hf, bits=4, block_size=32, symmetric=False, transposed_source=True)
    x = np.random.default_rng(9).standard_normal((3, k)).astype(np.float32)
    reference = x.astype(np.float64) @ dequantize(quantize_rtn(w_hf.T, 4, 32, 0, False)).astype(np.float64)
    (y,) = _matmulnbits_session(inits, k, n).run(None, {"x": x})
    assert np.abs(y - reference).max() <= 1e-5 * np.abs(reference).max()


@pytest.mark.parametrize("symmetric", [True, False])
def test_ort_fp16_matmulnbits_and_gather(symmetric: bool) -> None:
    """fp16 models: fp16 scales (rounded before the codes are computed), fp16 activations/outputs."""
    v, h = 64, 128
    e = _heavy((v, h), seed=21).astype(np.float16)
    gather, head = tied_embedding_initializers(
        e, bits=4, block_size=32, symmetric=symmetric, scale_dtype=ir.DataType.FLOAT16
    )
    assert gather.scales.dtype == head.scales.dtype == ir.DataType.FLOAT16
    q = quantize_rtn(e, 4, 32, 1, symmetric, scale_dtype=np.float16)
    g_names, h_names = ["data", "gs", "gz"][: len(gather.tensors)], ["B", "hs", "hz"][: len(head.tensors)]
    nodes = [
        oh.make_node(
            "GatherBlockQuantized",
            [g_names[0], "ids", *g_names[1:]],
            ["emb"],
            domain="com.microsoft",
            **gather.attributes,
        ),
        oh.make_node("MatMulNBits", ["emb", *h_names], ["logits"], domain="com.microsoft", **head.attributes),
    ]
    protos = [_proto(nm, t) for nm, t in zip(g_names + h_names, [*gather.tensors, *head.tensors], strict=True)]
    ids_info = oh.make_tensor_value_info("ids", TensorProto.INT64, [1, None])
    outputs = [oh.make_tensor_value_info(nm, TensorProto.FLOAT16, None) for nm in ("emb", "logits")]
    ids = np.array([[2, 9, v - 1]], np.int64)
    emb, logits = _session(nodes, [ids_info], outputs, protos).run(None, {"ids": ids})
    assert emb.dtype == np.float16 and np.array_equal(emb, dequantize(q)[ids].astype(np.float16))
    reference = emb.astype(np.float64) @ dequantize(q).T.astype(np.float64)
    assert np.abs(logits - reference).max() <= 1e-2 * np.abs(reference).max()


def _gather_session(inits) -> ort.InferenceSession:
    names = ["data", "scales", "zp"][: len(inits.tensors)]
    inputs = [names[0], "ids", *names[1:]]
    node = oh.make_node("GatherBlockQuantized", inputs, ["y"], domain="com.microsoft", **inits.attributes)
    ids_info = oh.make_tensor_value_info("ids", TensorProto.INT64, [None, None])
    y_info = oh.make_tensor_value_info("y", TensorProto.FLOAT, None)
    protos = [_proto(nm, t) for nm, t in zip(names, inits.tensors, strict=True)]
    return _session([node], [ids_info], [y_info], protos)


@pytest.mark.parametrize("bits,symmetric", BITS_SYM)
def test_ort_gather_block_quantized(bits: int, symmetric: bool) -> None:
    v, h = 50, 128
    e = _heavy((v, h), seed=10)
    q = quantize_rtn(e, bits, 32, 1, symmetric)
    data, scales, zero_points = pack_gather_block_quantized(q)
    assert data.shape == (v, h * bits // 8) and scales.shape == (v, h // 32)
    inits = gather_block_quantized_initializers(e, bits=bits, block_size=32, symmetric=symmetric)
    ids = np.array([[0, 7, v - 1], [3, 3, 1]], np.int64)
    (y,) = _gather_session(inits).run(None, {"ids": ids})
    assert np.array_equal(y, dequantize(q)[ids])


@pytest.mark.parametrize("bits,symmetric", [(4, True), (8, False)])
def test_tied_embedding_reads_once_and_matches_ort(bits: int, symmetric: bool) -> None:
    v, h = 64, 96
    source = _CountingSource(_heavy((v, h), seed=11))
    gather, head = tied_embedding_initializers(source, bits=bits, block_size=32, symmetric=symmetric, name="embed")
    assert head.attributes["K"] == h and head.attributes["N"] == v
    tensors = [*gather.tensors, *head.tensors]
    raw = [_write(t) for t in tensors]
    assert source.reads == 1 and gather.quantization.holding == ()
    # the same codes bytes in both layouts
    assert raw[0] == raw[len(gather.tensors)]
    q = quantize_rtn(source.array, bits, 32, 1, symmetric)
    ids = np.array([[5, 0, v - 1]], np.int64)
    (emb,) = _gather_session(gather).run(None, {"ids": ids})
    assert np.array_equal(emb, dequantize(q)[ids])
    (logits,) = _matmulnbits_session(head, h, v).run(None, {"x": emb[0]})
    reference = emb[0].astype(np.float64) @ dequantize(q).T.astype(np.float64)
    assert np.abs(logits - reference).max() <= 1e-5 * np.abs(reference).max()


# --- algorithms ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,symmetric", BITS_SYM)
def test_clip_search_never_worse_than_rtn(bits: int, symmetric: bool) -> None:
    w = _heavy((512, 64), seed=12)
    rtn = quantize_rtn(w, bits, 32, 0, symmetric)
    best = clip_search(w, bits, 32, 0, symmetric)
    block_err = lambda q: ((dequantize(q) - w) ** 2).reshape(16, 32, 64).sum(axis=1)  # noqa: E731
    assert (block_err(best) <= block_err(rtn)).all()
    if bits == 4:  # heavy tails: clipping pays (measured: 0.94 symmetric, 0.96 asymmetric)
        assert block_err(best).sum() < (0.95 if symmetric else 0.97) * block_err(rtn).sum()
    if symmetric:  # some blocks prefer the flipped (extreme -> top code) grid
        assert (np.sign(best.scales) != np.sign(rtn.scales)).any()


def test_clip_search_rejects_bad_grid() -> None:
    w = _heavy((64, 8))
    with pytest.raises(ValueError, match="clip values"):
        clip_search(w, 4, 32, 0, False, grid=(1.0, -1.0))
    with pytest.raises(ValueError, match="clip values"):
        clip_search(w, 4, 32, 0, True, grid=(1.5,))


@pytest.mark.parametrize("symmetric", [True, False])
def test_ort_matmulnbits_clip_search(symmetric: bool) -> None:
    """Clip-searched weights (negative, flipped scales included) run exactly in MatMulNBits."""
    k, n = 128, 32
    w = _heavy((k, n), seed=19)
    inits = matmulnbits_initializers(w, bits=4, block_size=32, symmetric=symmetric, algorithm=QuantAlgorithm.CLIP)
    x = np.random.default_rng(20).standard_normal((3, k)).astype(np.float32)
    reference = x.astype(np.float64) @ dequantize(clip_search(w, 4, 32, 0, symmetric)).astype(np.float64)
    (y,) = _matmulnbits_session(inits, k, n).run(None, {"x": x})
    assert np.abs(y - reference).max() <= 1e-5 * np.abs(reference).max()


def test_clip_search_chunks_match_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    from qwen_export.quant import numeric

    w = _heavy((128, 96), seed=13)
    whole = clip_search(w, 4, 32, 0, True)
    monkeypatch.setattr(numeric, "CHUNK_ELEMENTS", 1000)
    chunked = clip_search(w, 4, 32, 0, True)
    assert np.array_equal(chunked.codes, whole.codes) and np.array_equal(chunked.scales, whole.scales)


@pytest.mark.parametrize("symmetric", [True, False])
def test_awq_reduces_output_error(symmetric: bool) -> None:
    rng = np.random.default_rng(14)
    k, n, t = 128, 64, 256
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    gain = np.ones(k, np.float32)
    gain[rng.choice(k, 6, replace=False)] = 30.0  # a few channels with large activations
    x = (rng.standard_normal((t, k)) * gain).astype(np.float32)
    s = awq_scales(w, np.abs(x).mean(axis=0), x[:128], bits=4, block_size=32, symmetric=symmetric)
    assert s.shape == (k,) and s.dtype == np.float32 and np.isfinite(s).all() and (s > 0).all()
    assert not np.allclose(s, 1.0)
    held_out, reference = x[128:], x[128:] @ w
    plain = quantize_rtn(w, 4, 32, 0, symmetric)
    scaled = quantize(w, 4, 32, 0, symmetric, QuantAlgorithm.RTN, awq_scale=s)
    plain_err = np.mean((held_out @ dequantize(plain) - reference) ** 2)
    awq_err = np.mean(((held_out / s) @ dequantize(scaled) - reference) ** 2)
    assert awq_err < 0.8 * plain_err  # measured: 0.18 symmetric, 0.22 asymmetric
    # AWQ + activation-weighted clip search (AWQ's auto_clip) improves further
    importance = input_importance(x[:128], s)
    clipped = quantize(w, 4, 32, 0, symmetric, QuantAlgorithm.AWQ, awq_scale=s, importance=importance)
    clip_err = np.mean(((held_out / s) @ dequantize(clipped) - reference) ** 2)
    assert clip_err < awq_err  # measured: 0.12 / 0.18 of plain
    # the lazy MatMulNBits initializers with the same parameters hold the same quantization
    inits = matmulnbits_initializers(
        w, bits=4, block_size=32, symmetric=symmetric, algorithm=QuantAlgorithm.AWQ, awq_scale=s, importance=importance
    )
    b, scales, _ = pack_matmulnbits(clipped)
    assert inits.codes.tobytes() == b.tobytes() and np.array_equal(inits.scales.numpy(), scales)


def test_awq_joint_weights_and_checks() -> None:
    rng = np.random.default_rng(15)
    a, b = (rng.standard_normal((64, 32)).astype(np.float32) for _ in range(2))
    x = rng.standard_normal((16, 64)).astype(np.float32)
    joint = awq_scales([a, b], np.abs(x).mean(0), x, bits=4, block_size=32, symmetric=True, grid=4)
    assert np.array_equal(
        joint,
        awq_scales(np.concatenate([a, b], 1), np.abs(x).mean(0), x, bits=4, block_size=32, symmetric=True, grid=4),
    )
    with pytest.raises(ValueError, match="do not match"):
        awq_scales(a, np.ones(3), x, bits=4, block_size=32, symmetric=True)


# --- lazy tensors ----------------------------------------------------------------------------------


class _CountingSource:
    """A source tensor that counts how often it is read."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.shape, self.reads = array, array.shape, 0

    def numpy(self) -> np.ndarray:
        self.reads += 1
        return self.array


def _write(tensor: QuantizedPartTensor) -> bytes:
    f = io.BytesIO()
    assert tensor.write_to(f) == tensor.nbytes
    return f.getvalue()


@pytest.mark.parametrize("layout", ["dql4", "dql8", "matmulnbits", "gather"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_lazy_parts_quantize_once(layout: str, symmetric: bool) -> None:
    source = _CountingSource(_heavy((96, 64), seed=16))
    make = {
        "dql4": lambda: dequantize_linear_initializers(source, bits=4, block_size=32, axis=0, symmetric=symmetric),
        "dql8": lambda: dequantize_linear_initializers(source, bits=8, block_size=32, axis=1, symmetric=symmetric),
        "matmulnbits": lambda: matmulnbits_initializers(source, bits=4, block_size=32, symmetric=symmetric),
        "gather": lambda: gather_block_quantized_initializers(source, bits=4, block_size=32, symmetric=symmetric),
    }[layout]
    inits = make()
    assert len(inits.tensors) == (2 if symmetric else 3) and source.reads == 0
    written = [_write(t) for t in inits.tensors]  # the writer's order
    assert source.reads == 1 and inits.quantization.holding == ()
    # tobytes() (fresh objects, so each part recomputes) gives the same bytes
    assert [t.tobytes() for t in make().tensors] == written
    # numpy() is the values; for int4 codes one value per element
    codes = make().codes.numpy()
    assert codes.shape == tuple(inits.codes.shape.numpy())


def test_lazy_tensors_through_the_writer(tmp_path: Path) -> None:
    """DequantizeLinear + MatMul written by write_onnx (lazy parts streamed) runs in ORT."""
    k, n = 64, 48
    source = _CountingSource(_heavy((k, n), seed=17))
    inits = dequantize_linear_initializers(source, bits=4, block_size=32, axis=0, symmetric=False, name="w")
    x = ir.Value(name="x", shape=ir.Shape(["T", k]), type=ir.TensorType(ir.DataType.FLOAT))
    values = []
    for suffix, tensor in zip(["codes", "scales", "zp"], inits.tensors, strict=True):
        value = ir.Value(name=f"w.{suffix}", shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
        values.append(value)
    deq = ir.node("DequantizeLinear", values, inits.attributes, name="dq")
    matmul = ir.node("MatMul", [x, deq.outputs[0]], name="mm")
    matmul.outputs[0].name, matmul.outputs[0].dtype = "y", ir.DataType.FLOAT
    graph = ir.Graph([x], [matmul.outputs[0]], nodes=[deq, matmul], initializers=values, opset_imports={"": 21})
    write_onnx(ir.Model(graph, ir_version=10), tmp_path, "model.onnx", "model.data")
    assert source.reads == 1
    xv = np.random.default_rng(18).standard_normal((4, k)).astype(np.float32)
    reference = xv @ dequantize(quantize_rtn(source.array, 4, 32, 0, False))
    # ORT_ENABLE_ALL fuses DequantizeLinear(int4) -> MatMul into MatMulNBits with accuracy_level
    # "session.qdq_matmulnbits_accuracy_level" (default 4: int8 activations, ~1% error); 0 is exact
    for level, tolerance in (("0", 1e-5), (None, 3e-2)):
        options = ort.SessionOptions()
        if level is not None:
            options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", level)
        session = ort.InferenceSession(str(tmp_path / "model.onnx"), options, providers=["CPUExecutionProvider"])
        (y,) = session.run(None, {"x": xv})
        assert np.abs(y - reference).max() <= tolerance * np.abs(reference).max()


def test_lazy_rejects_indivisible_and_bad_awq() -> None:
    with pytest.raises(ValueError, match="block_size"):
        matmulnbits_initializers(np.ones((48, 8), np.float32), bits=4, block_size=32, symmetric=True)
    with pytest.raises(ValueError, match="awq_scale"):
        matmulnbits_initializers(
            np.ones((64, 8), np.float32), bits=4, block_size=32, symmetric=True, awq_scale=np.ones(8)
        )


@pytest.mark.parametrize(
    ("hf_name", "transpose", "axis", "view_transpose"),
    [
        ("lm_head.weight", True, 0, False),  # lm_head.weight_t [K, N] along K: stored rows = output columns
        ("model.embed_tokens.weight", False, 1, False),  # the embedding [V, H] along H
        ("lm_head.weight", False, 0, True),  # a transposed view of an untransposed binding
    ],
)
def test_streamed_quantization_equals_whole(
    hf_name: str, transpose: bool, axis: int, view_transpose: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint tensor is read and quantized in chunks of stored rows (bounded memory): the result
    is the whole tensor's quantization, byte for byte."""
    import onnx_ir as ir

    from qwen_export.quant import tensors
    from qwen_export.weights import CheckpointTensor, _Binding

    rng = np.random.default_rng(3)
    stored = (rng.standard_normal((300, 64)) * 0.05).astype(np.float32)

    class Source:
        def read(self, name: str) -> np.ndarray:
            return stored

        def read_rows(self, name: str, a: int, b: int) -> np.ndarray:
            return stored[a:b]

        def shape(self, name: str) -> tuple[int, ...]:
            return stored.shape

    shape = stored.shape[::-1] if transpose else stored.shape
    source = CheckpointTensor(Source(), _Binding(hf_name, transpose=transpose), shape, ir.DataType.FLOAT, "w")
    kwargs = dict(bits=4, block_size=32, axis=axis, symmetric=True, transpose=view_transpose)
    whole = tensors.SharedQuantization(source, **kwargs)
    assert whole._quantize_streamed() is None  # 300 rows fit one chunk
    expected = whole.quantize()
    monkeypatch.setattr(tensors, "STREAM_BYTES", 64 * 4 * 7)  # 7 rows per chunk
    chunked = tensors.SharedQuantization(source, **kwargs)
    assert chunked._row_reader() is not None
    got = chunked.quantize()
    assert got.axis == expected.axis and got.block_size == expected.block_size
    assert np.array_equal(got.codes, expected.codes) and np.array_equal(got.scales, expected.scales)


def test_awq_output_error_is_the_gram_form() -> None:
    from qwen_export.quant.algorithms import _output_error

    rng = np.random.default_rng(16)
    x = rng.standard_normal((40, 24)).astype(np.float32)
    delta = rng.standard_normal((24, 50)).astype(np.float32)
    direct = float(np.sum((x.astype(np.float64) @ delta) ** 2))
    assert _output_error(x.T @ x, delta, columns=7) == pytest.approx(direct, rel=1e-5)
