"""Prompt processing on int8 GEMMs: a second ONNX Runtime session for prompt-shaped steps.

Why: on a prompt of a few hundred tokens the decoder's ``MatMulNBits`` runs at float32 GEMM speed
(MLAS dequantizes the block-quantized weights and calls SGEMM), while MLAS's u8 x s8 GEMM (behind
``com.microsoft.MatMulIntegerToFloat``) is about 5x faster on a VNNI CPU (benchmarks/README.md).
Decoding (one token per step) stays on ``MatMulNBits``, whose kernels read 4-bit weights.

What: ``export --prefill int8`` writes ``prefill.onnx`` (+ ``prefill.onnx.data``) next to the decode
graph, built from the emitted graph and weights (:func:`write`); its other tensors are read from
``model.onnx.data``. The engine opens it as a second session (:func:`open_session`):

- every projection's ``MatMulNBits`` (``q/k/v``, ``o``, ``gate``, ``up`` and ``down``) becomes an
  int8 GEMM on per-column symmetric int8 weights made from the dequantized int4/int8 weights (so
  both sessions compute with the same weights, up to int8 rounding): ``MatMulIntegerToFloat``,
  MLAS's u8 x s8 GEMM (VNNI);
- **activations are quantized token by token** at run time (:func:`_row_quantizer`: one scale per
  token, ``max |row| / 127``, uint8 codes with zero point 128), once per input shared by the
  projections that read it. One scale for the whole step (``DynamicQuantizeMatMul``, this graph's
  first form) lost the other tokens' precision to the few tokens (a text's first, some
  delimiters) whose SwiGLU output is hundreds of times larger, so ``down_proj`` had to stay on
  ``MatMulNBits`` and held two thirds of the prompt's GEMM time (benchmarks/README.md);
- **rotation** of ``down_proj``'s input by 64-wide Hadamard blocks (:func:`_rotation`), its
  weight rows by the inverse at export (:func:`rotate_columns`): measured on the real
  Qwen2.5-Coder-1.5B, it took ``down_proj``'s per-token output error from 7.7% to 1.1% and the
  prompt's mean KL from 0.0253 to 0.0207 (the decode graph's: 0.0193);
- **two exact rewrites for speed**: a row's peak is ``max(max row, -min row)`` (no ``|x|``
  tensor written), and up_proj's product skips its multiply by the rows' scales, which down_proj's
  step takes instead (:func:`scale_folds`);
- **smoothing** (SmoothQuant, alpha 0.5): a few input channels of a decoder layer carry values
  many times the others' in every token. For each RMSNorm that feeds the projections the export
  measures each channel's largest magnitude over the calibration text
  (:func:`~qwen_export.export.calibration.collect_norm_peaks`); the prefill graph's copy of the
  norm's weight is divided by ``s = peak ** 0.5 / max|W row| ** 0.5`` and the weight rows
  multiplied by it (an exact rewrite before quantization).

Cost: a byte per weight of the projections, on disk and in memory (measured on the real
Qwen2.5-Coder-1.5B: benchmarks/README.md). Both sessions bind the engine's same KV buffers.
CPUs without VNNI do not open it (MLAS's u8 x s8 kernel would saturate there: :mod:`.dynamic_int8`).
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PREFILL_FILE = "prefill.onnx"
PREFILL_DATA = "prefill.onnx.data"
#: SmoothQuant's migration strength
ALPHA = 0.5
#: a step of at least this many tokens runs on the int8 prefill session (shorter ones, e.g. a
#: speculative verification, stay on the decode session so that they see its exact logits)
MIN_TOKENS = 32
MODEL_FILE = "model.onnx"  # the decode graph (engine.MODEL_FILE; the engine imports this module)
WEIGHT_LEVELS = 127
_ROWS = 128
_LINEAR = re.compile(r"layers\.(\d+)\.(self_attn\.(q|k|v|qkv|kv|o)_proj|mlp\.(gate|up|gate_up|down)_proj)\b")
_NORM = re.compile(r"layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight$")
_ALIGN = 64  # byte alignment of each tensor in prefill.onnx.data


@dataclass(frozen=True)
class PrefillPlan:
    """What :func:`build` made: the prefill graph (its new tensors added by the sink), how many
    linears were rewritten, norms smoothed and linears' inputs rotated."""

    proto: Any
    linears: int
    smoothed: int
    rotated: int


class _DataFile:
    """``prefill.onnx.data``, written tensor by tensor as they are made (the export's memory holds
    a layer's weights at a time); :attr:`tensors` are their external-data TensorProtos."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "wb")  # noqa: SIM115 - closed by write()
        self.offset = 0
        self.tensors: list[Any] = []

    def add(self, name: str, array: np.ndarray) -> None:
        import onnx
        from onnx import helper

        pad = -self.offset % _ALIGN
        self.file.write(b"\0" * pad)
        self.offset += pad
        self.file.write(np.ascontiguousarray(array).tobytes())
        tensor = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
        tensor.dims.extend(array.shape)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", PREFILL_DATA), ("offset", str(self.offset)), ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.tensors.append(tensor)
        self.offset += array.nbytes


def range_key(norm_weight: str) -> str | None:
    """``model.layers.3.input_layernorm.weight`` -> ``layers.3.input_layernorm`` (the ranges file's
    key), None for another name."""
    found = _NORM.search(norm_weight)
    return f"layers.{found.group(1)}.{found.group(2)}" if found else None


class _Reader:
    """Initializers of the artifact's graph as numpy arrays (external data read on demand), and the
    values computed from them by the nodes the lowering puts ahead of the graph (a ``Cast`` of
    float16 scales, the ``Cast``/``Mul``/``Exp``/``Reshape`` of ``log8`` scales), computed as ONNX
    Runtime's constant folding does, in float32."""

    def __init__(self, proto: Any, root: Path) -> None:
        self.root = root
        self.inits = {init.name: init for init in proto.graph.initializer}
        self.producers = {n.output[0]: n for n in proto.graph.node if n.op_type in _FOLDED}

    def array(self, name: str) -> np.ndarray:
        from onnx import helper, numpy_helper

        if name not in self.inits and name in self.producers:
            node = self.producers[name]
            inputs = [self.array(i) for i in node.input]
            if node.op_type == "Cast":
                to = next(a.i for a in node.attribute if a.name == "to")
                return inputs[0].astype(helper.tensor_dtype_to_np_dtype(to))
            return _FOLDED[node.op_type](*inputs)
        return numpy_helper.to_array(self.inits[name], base_dir=os.fspath(self.root))


#: the constant nodes :class:`_Reader` computes (``Cast`` by its ``to``)
_FOLDED: dict[str, Any] = {
    "Cast": None,
    "Mul": lambda a, b: np.multiply(a, b, dtype=np.result_type(a, b)),
    "Exp": np.exp,
    "Reshape": lambda a, shape: a.reshape([int(d) for d in shape]),
}


def _attributes(node: Any) -> dict[str, int]:
    return {a.name: int(a.i) for a in node.attribute if a.name in ("K", "N", "bits", "block_size")}


def dequantize(node: Any, reader: _Reader) -> np.ndarray:
    """A ``MatMulNBits`` node's weight as float32 [N, K] (the node's own layout: one row per output
    column; 4 or 8 bits, with or without zero points)."""
    a = _attributes(node)
    k, n, bits, block = a["K"], a["N"], a["bits"], a["block_size"]
    packed = reader.array(node.input[1])
    blocks = packed.shape[1]
    if bits not in (4, 8):
        raise ValueError(f"{node.name}: {bits}-bit MatMulNBits")
    if bits == 4:
        codes = np.empty((*packed.shape, 2), np.uint8)
        np.bitwise_and(packed, 15, out=codes[..., 0])
        np.right_shift(packed, 4, out=codes[..., 1])
        packed = codes
    weight = packed.reshape(n, blocks, block).astype(np.float32)
    if len(node.input) > 3 and node.input[3]:
        zero = reader.array(node.input[3])
        if bits == 4:
            zero = np.stack([zero & 15, zero >> 4], axis=-1).reshape(n, -1)
        weight -= zero.reshape(n, -1)[:, :blocks, None].astype(np.float32)
    else:
        weight -= np.float32(2 ** (bits - 1))
    weight *= reader.array(node.input[2]).astype(np.float32).reshape(n, blocks, 1)
    return weight.reshape(n, blocks * block)[:, :k]


def column_int8(weight: np.ndarray, factor: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-column symmetric int8 codes [K, N] and float32 scales [N] of ``weight`` [N, K] (a row per
    output column) with its input channels multiplied by ``factor`` [K] first (in place)."""
    if factor is not None:
        weight *= factor
    scales = _peak(weight, axis=1) / WEIGHT_LEVELS
    scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
    n, k = weight.shape
    codes = np.empty((k, n), np.int8)
    for start in range(0, n, _ROWS):  # a few hundred rows at a time: the transpose stays in cache
        rows = weight[start : start + _ROWS]
        rows *= (1.0 / scales[start : start + _ROWS])[:, None]
        np.rint(rows, out=rows)
        np.clip(rows, -WEIGHT_LEVELS, WEIGHT_LEVELS, out=rows)
        codes[:, start : start + _ROWS] = rows.T
    return codes, scales


def _peak(array: np.ndarray, axis: int) -> np.ndarray:
    """max |array| along ``axis`` without an absolute-value copy."""
    return np.maximum(array.max(axis=axis), -array.min(axis=axis))


def smoothing(peak: np.ndarray, weights: list[np.ndarray]) -> np.ndarray:
    """SmoothQuant's per-input-channel factor for the linears ``weights`` ([N, K] each) that read
    one norm's output: ``peak ** alpha / max|W row| ** (1 - alpha)``."""
    row_peak = np.max([_peak(w, axis=0) for w in weights], axis=0)
    s = np.maximum(peak, 1e-5) ** ALPHA / np.maximum(row_peak, 1e-5) ** (1 - ALPHA)
    return s.astype(np.float32)


def build(root: Path, model_file: str, ranges: dict[str, np.ndarray], sink: Any, threads: int = 2) -> PrefillPlan:
    """The prefill graph of the artifact at ``root`` (see the module docstring); each new tensor
    goes to ``sink.add(name, array)`` as soon as it is made; the weights are converted on
    ``threads`` threads (numpy releases the GIL)."""
    import onnx

    proto = onnx.load(os.fspath(root / model_file), load_external_data=False)
    reader = _Reader(proto, root)
    producers = {out: node for node in proto.graph.node for out in node.output}
    linears = [n for n in proto.graph.node if n.op_type == "MatMulNBits" and _LINEAR.search(n.name)]
    by_input: dict[str, list[Any]] = {}
    for node in linears:
        by_input.setdefault(node.input[0], []).append(node)

    def convert(item: tuple[str, list[Any]]) -> tuple[_Smoothed | None, list[tuple[np.ndarray, np.ndarray]]]:
        weights = [dequantize(node, reader) for node in item[1]]
        for node, weight in zip(item[1], weights, strict=True):
            if _rotated(node):
                rotate_columns(weight, rotation_block(weight.shape[1]))
        smoothed = _smoothed(producers.get(item[0]), weights, ranges, reader)
        return smoothed, [column_int8(w, smoothed.factor if smoothed else None) for w in weights]

    from onnx import numpy_helper

    # small constants stay in the graph (shape inference reads ReduceMax's axes)
    proto.graph.initializer.extend(numpy_helper.from_array(array, name) for name, array in _CONSTANTS.items())
    replaced: dict[str, list[Any]] = {}
    smoothed_norms = 0
    folds = scale_folds(proto.graph.node, linears)  # up_proj -> down_proj whose row scale takes up's
    row_scales: dict[str, str] = {}  # a linear's name -> its input's row scales
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for group, (smoothed, quantized) in zip(by_input.values(), pool.map(convert, by_input.items()), strict=True):
            if smoothed is not None:
                name = smoothed.norm.input[smoothed.slot] + "/prefill_smoothed"
                sink.add(name, smoothed.weight)
                smoothed.norm.input[smoothed.slot] = name
                smoothed_norms += 1
            rotation = _rotation(group[0])
            rows, row_scale, row_nodes = _row_quantizer(rotation[-1].output[0] if rotation else group[0].input[0])
            row_nodes = rotation + row_nodes
            carried = [up for up, down in folds.items() if down == group[0].name]
            if carried:  # the up_proj product reached this input without its rows' scales: apply them here
                row_scale, row_nodes = _carry_scale(row_scale, row_scales[carried[0]], row_nodes)
            for i, (node, (codes, scales)) in enumerate(zip(group, quantized, strict=True)):
                row_scales[node.name] = row_scale
                new = _rewrite(node, codes, scales, sink, rows, None if node.name in folds else row_scale)
                replaced[node.name] = (row_nodes if i == 0 else []) + new
    nodes = [new for node in proto.graph.node for new in replaced.get(node.name, [node])]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    used = {name for node in proto.graph.node for name in node.input}
    kept = [init for init in proto.graph.initializer if init.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    rotated = sum(1 for node in linears if _rotated(node) and rotation_block(_attributes(node)["K"]) > 1)
    return PrefillPlan(proto, len(linears), smoothed_norms, rotated)


def write(root: Path, ranges: dict[str, np.ndarray], threads: int = 2) -> dict[str, Any]:
    """Write :data:`PREFILL_FILE` and :data:`PREFILL_DATA` into the artifact directory ``root``
    (which holds the emitted decode graph); return the manifest's ``extra.prefill`` record."""
    data = _DataFile(root / PREFILL_DATA)
    try:
        plan = build(root, MODEL_FILE, ranges, data, threads)
    finally:
        data.file.close()
    plan.proto.graph.initializer.extend(data.tensors)
    (root / PREFILL_FILE).write_bytes(plan.proto.SerializeToString())
    return {
        "weights": "int8",
        "model": PREFILL_FILE,
        "linears": plan.linears,
        "smoothed_norms": plan.smoothed,
        "alpha": ALPHA,
        "activations": "int8 per token",
        "rotated": plan.rotated,
        "min_tokens": MIN_TOKENS,
    }


@dataclass(frozen=True)
class _Smoothed:
    norm: Any  # the RMSNorm node
    slot: int  # its weight's input index
    factor: np.ndarray  # [K]: the linears' weight rows are multiplied by it
    weight: np.ndarray  # the norm's new weight: old / factor


def _smoothed(norm: Any, weights: list[np.ndarray], ranges: dict[str, np.ndarray], reader: _Reader) -> _Smoothed | None:
    """When ``norm`` is an RMSNorm with recorded peaks: its smoothing; else None."""
    if norm is None or norm.op_type not in ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"):
        return None
    slot = 2 if norm.op_type.startswith("Skip") else 1
    key = range_key(norm.input[slot])
    if key is None or key not in ranges:
        return None
    factor = smoothing(np.asarray(ranges[key], np.float32), weights)
    gamma = (reader.array(norm.input[slot]).astype(np.float32) / factor).astype(np.float32)
    return _Smoothed(norm, slot, factor, gamma)


#: the inputs of these projections are rotated (:func:`_rotation`)
ROTATED = ("down_proj",)
#: the largest Hadamard block of the rotation. 64, not 128: the same accuracy on the real
#: Qwen2.5-Coder-1.5B (mean KL over 2,050 tokens of two texts: 0.0322 at 64, 0.0319 at 128, 0.0325
#: at 32) and the rotation's float32 MatMul at half the cost (a 1024-token prompt: 3% faster;
#: benchmarks/README.md, 2026-12-04)
ROTATION_BLOCK = 64


def rotation_block(k: int) -> int:
    """The Hadamard block for an input of ``k`` channels: the largest power of two <= 128 that
    divides it (64 for every Qwen2/2.5/3 intermediate size; 1: no rotation)."""
    block = ROTATION_BLOCK
    while k % block:
        block //= 2
    return block


def hadamard(n: int) -> np.ndarray:
    """The orthonormal (Sylvester) Hadamard matrix of order ``n`` (a power of two): symmetric,
    its own inverse."""
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(np.float32(n))).astype(np.float32)


def rotate_columns(weight: np.ndarray, block: int) -> None:
    """``weight`` [N, K] (a row per output column) times the block-diagonal Hadamard rotation of
    its K input channels, in place: ``x @ W.T == (x B) @ (W B).T`` for the orthonormal ``B``."""
    if block > 1:
        n, k = weight.shape
        h = hadamard(block)
        for start in range(0, n, _ROWS):
            rows = weight[start : start + _ROWS]
            rows[...] = (rows.reshape(-1, k // block, block) @ h).reshape(rows.shape)


def _rotated(node: Any) -> bool:
    return any(f".{name}" in node.name for name in ROTATED)


def _rotation(node: Any) -> list[Any]:
    """Nodes that rotate the input of ``node`` (a :data:`ROTATED` projection, else none) by
    blocks of Hadamard: [batch, tokens, K] -> [batch, tokens, K / block, block] @ H -> back.

    Why: a token's SwiGLU output (down_proj's input) has a few channels 20-50x its root mean
    square, so one int8 scale per token rounds the rest coarsely (7.7% output error per token,
    measured on the real Qwen2.5-Coder-1.5B). The rotation spreads each block's peak over the
    block (peak / rms 5) and the error falls to 1.1%; the weight rows take the inverse rotation
    at export (:func:`rotate_columns`), so the product is unchanged (QuaRot's online Hadamard)."""
    from onnx import helper

    k = _attributes(node)["K"]
    block = rotation_block(k)
    if not _rotated(node) or block == 1:
        return []
    x, p = node.input[0], node.input[0] + "/rotated"
    return [
        helper.make_node("Reshape", [x, f"prefill/blocks{block}"], [p + "/blocks"], name=p + "/blocks"),
        helper.make_node("MatMul", [p + "/blocks", f"prefill/hadamard{block}"], [p + "/product"], name=p + "/product"),
        helper.make_node("Reshape", [p + "/product", _FLAT], [p], name=p),
    ]


_ONE, _ZERO_POINT, _AXES, _LEVEL, _TINY = (f"prefill/{n}" for n in ("one", "zero_point", "axes", "level", "tiny"))
_CONSTANTS = {
    _ONE: np.array(1.0, np.float32),
    _ZERO_POINT: np.full((1, 1, 1), 128, np.uint8),
    _AXES: np.array([-1], np.int64),
    _LEVEL: np.array(1.0 / WEIGHT_LEVELS, np.float32),
    _TINY: np.array(1e-30, np.float32),
}
_ZERO_POINT_SCALAR = "prefill/zero_point_scalar"
_FLAT = "prefill/flat"
_CONSTANTS[_FLAT] = np.array([0, 0, -1], np.int64)
for _b in (2**i for i in range(1, 8)):
    _CONSTANTS[f"prefill/blocks{_b}"] = np.array([0, 0, -1, _b], np.int64)
    _CONSTANTS[f"prefill/hadamard{_b}"] = hadamard(_b)
_CONSTANTS[_ZERO_POINT_SCALAR] = np.array(128, np.uint8)


def _row_quantizer(x: str) -> tuple[str, str, list[Any]]:
    """Nodes that quantize the activation ``x`` [batch, tokens, K] row by row (one scale per token:
    ``max |row| / 127``) to uint8 codes with zero point 128; returns (codes, row scales, nodes).

    Per token, not per tensor: a few tokens (the first of a text, some delimiters) carry values
    hundreds of times the others' at the SwiGLU output, which one scale for the whole step would
    round the other tokens' values to zero (measured: benchmarks/README.md). uint8 codes with a
    zero point, not int8: MLAS has a fast kernel for u8 x s8 only."""
    from onnx import TensorProto, helper

    p = x + "/rows"
    nodes = [  # max |row| as max(max row, -min row): two reads, no [tokens, K] |x| written
        helper.make_node("ReduceMax", [x, _AXES], [p + "/high"], name=p + "/high", keepdims=1),
        helper.make_node("ReduceMin", [x, _AXES], [p + "/low"], name=p + "/low", keepdims=1),
        helper.make_node("Neg", [p + "/low"], [p + "/negated"], name=p + "/negated"),
        helper.make_node("Max", [p + "/high", p + "/negated"], [p + "/peak"], name=p + "/peak"),
        helper.make_node("Mul", [p + "/peak", _LEVEL], [p + "/step"], name=p + "/step"),
        helper.make_node("Max", [p + "/step", _TINY], [p + "/scale"], name=p + "/scale"),
        helper.make_node("Shape", [p + "/scale"], [p + "/shape"], name=p + "/shape"),
        helper.make_node("Expand", [_ZERO_POINT, p + "/shape"], [p + "/zero_point"], name=p + "/zero_point"),
        helper.make_node(
            "QuantizeLinear",
            [x, p + "/scale", p + "/zero_point"],
            [p + "/codes"],
            name=p + "/codes",
            axis=-1,
            block_size=1 << 30,  # one block per row
            output_dtype=TensorProto.UINT8,
        ),
    ]
    return p + "/codes", p + "/scale", nodes


def scale_folds(nodes: Any, linears: list[Any]) -> dict[str, str]:
    """``{up_proj: down_proj}`` for each SwiGLU ``down(act(gate(x)) * up(x))`` whose up_proj (no
    bias) feeds only that product: up's int8 product can skip its multiply by the rows' scales
    ``s`` (a [tokens, intermediate] pass), because down's input row quantizer is invariant to a
    row's scale: ``q(x / s) = q(x)`` with the step divided by ``s``. Down's step is multiplied by
    ``s`` instead, a [tokens, 1] product (:func:`_carry_scale`); the Hadamard rotation between is
    linear, so the same holds through it."""
    consumers: dict[str, list[Any]] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producers = {out: node for node in nodes for out in node.output}
    by_name = {node.name: node for node in linears}
    folds = {}
    for down in linears:
        if ".down_proj" not in down.name:
            continue
        product = producers.get(down.input[0])
        if product is None or product.op_type != "Mul" or len(consumers.get(down.input[0], [])) != 1:
            continue
        for name in product.input:
            up = producers.get(name)
            if up is not None and up.name in by_name and ".up_proj" in up.name and len(consumers[name]) == 1:
                if len(up.input) <= 5 or not up.input[5]:
                    folds[up.name] = down.name
    return folds


def _carry_scale(row_scale: str, carried: str, row_nodes: list[Any]) -> tuple[str, list[Any]]:
    """The rows' scales of an input whose rows arrive divided by ``carried`` (:func:`scale_folds`)."""
    from onnx import helper

    name = row_scale + "/carried"
    return name, [*row_nodes, helper.make_node("Mul", [row_scale, carried], [name], name=name)]


def _rewrite(
    node: Any, codes: np.ndarray, scales: np.ndarray, sink: Any, rows: str, row_scale: str | None
) -> list[Any]:
    """``node`` (MatMulNBits) -> u8 x s8 ``MatMulIntegerToFloat`` on the row-quantized input
    ``rows`` and ``codes`` / ``scales``, times the rows' scales (bias added after; ``row_scale``
    None: not multiplied, :func:`scale_folds`)."""
    from onnx import helper

    base = node.name.split("/")[0]
    bias = node.input[5] if len(node.input) > 5 else ""
    for suffix, array in (("/prefill_int8", codes), ("/prefill_int8_scale", scales)):
        sink.add(base + suffix, array)
    product, scaled = base + "/prefill_product", base + "/prefill_scaled"
    out = node.output[0]
    nodes = [
        helper.make_node(
            "MatMulIntegerToFloat",
            [rows, base + "/prefill_int8", _ONE, base + "/prefill_int8_scale", _ZERO_POINT_SCALAR],
            [out if row_scale is None else product],
            name=base + "/prefill",
            domain="com.microsoft",
        ),
    ]
    if row_scale is None:
        return nodes
    nodes.append(helper.make_node("Mul", [product, row_scale], [scaled if bias else out], name=base + "/prefill_rows"))
    if bias:
        nodes.append(helper.make_node("Add", [scaled, bias], [out], name=base + "/prefill_bias"))
    return nodes


def open_session(ort: Any, root: Path, options: Any) -> Any:
    """The prefill session of the artifact at ``root`` (its files checked by the caller)."""
    return ort.InferenceSession(os.fspath(root / PREFILL_FILE), options, providers=["CPUExecutionProvider"])


def check_options(options: Any) -> None:
    """OptionError naming the fix when ``export --prefill int8`` cannot apply to ``options``."""
    from qwen_export.errors import OptionError
    from qwen_export.quant.scheme import PrefillWeights
    from qwen_export.spec import DType

    if options.prefill is not PrefillWeights.INT8:
        return
    if options.quant is None or options.quant.bits not in (4, 8):
        raise OptionError(
            "--prefill int8 rewrites the int4/int8 weights of the decode graph: add --weights int4 or int8"
        )
    if options.graph_dtype is not DType.FP32:
        raise OptionError("--prefill int8 runs float32 activations (DynamicQuantizeMatMul): drop --dtype fp16")
    if not options.fuse:
        raise OptionError("--prefill int8 rewrites the fused graph's MatMulNBits: drop --no-fuse")
