"""OpenVINO target: compressed MatMul weights are stored [N, K] (transpose_b), NNCF's layout.

``convert_model`` gives each weight as blocks along K, ``Reshape(Multiply(Convert(w [K/G, G, N])
[- zp], s [K/G, 1, N]), [K, N])``; :func:`transpose_compressed_weights` re-stores the constants as
[N, K/G, G] / [N, K/G, 1] and sets ``transpose_b``. The logits must not change (bit for bit), the
weights must stay compressed in the compiled model, and anything else must be left alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ModuleScratch

from qwen_export.artifact import load_manifest
from qwen_export.loader import open_artifact
from qwen_export.pipeline import ExportHooks, ExportOptions
from qwen_export.pipeline import export as run_export
from qwen_export.quant.scheme import QuantScheme, WeightFormat
from qwen_export.spec import ModelSpec, Target

ov = pytest.importorskip("openvino", reason="openvino is not installed: pip install 'qwen-export[openvino]'")
from openvino import opset13 as ops  # noqa: E402

from qwen_export.runtimes import openvino as ov_target  # noqa: E402

CASES = {
    "int4-sym": (QuantScheme(WeightFormat.INT4, symmetric=True), "i4"),
    "int4-asym": (QuantScheme(WeightFormat.INT4, symmetric=False), "u4"),
    "int8-sym": (QuantScheme(WeightFormat.INT8, symmetric=True), "i8"),
}
COMPRESSED = {"i4", "u4", "i8", "u8"}
CHAIN_OPS = {"Reshape", "Multiply", "Subtract", "Convert", "Constant"}


@pytest.fixture(scope="module")
def exported(request: pytest.FixtureRequest, module_scratch: ModuleScratch):
    """``exported(case) -> (artifact, reference, messages)`` for qwen2_untied, exported once per case.

    ``reference`` holds the same converted model made stateful *without* the transpose (saved from
    inside the export, just before the step runs), ``messages`` what the export said."""

    def run(case: str) -> tuple[Path, Path, list[str]]:
        if case not in module_scratch.cache:
            root = module_scratch.mkdir(case)
            reference = root / "reference"
            reference.mkdir()
            step = ov_target.transpose_compressed_weights

            def save_reference_then_transpose(ov_model: Any) -> int:
                untouched = ov_model.clone()
                ov_target.make_stateful(untouched)
                ov.save_model(untouched, str(reference / ov_target.MODEL_XML), compress_to_fp16=False)
                return step(ov_model)

            messages: list[str] = []
            options = ExportOptions(target=Target.OPENVINO, quant=CASES[case][0])
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(ov_target, "transpose_compressed_weights", save_reference_then_transpose)
                run_export(
                    request.getfixturevalue("qwen2_untied"),
                    root / "artifact",
                    options,
                    ExportHooks(message=messages.append),
                )
            module_scratch.cache[case] = (root / "artifact", reference, messages)
        return module_scratch.cache[case]

    return run


def _weight_matmuls(model: Any) -> list[tuple[Any, Any]]:
    """(MatMul, its compressed weight Constant) for every MatMul whose weight is a decompression chain."""
    found = []
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul":
            continue
        stack, constants = [op.input(1).get_source_output().get_node()], []
        while stack:
            node = stack.pop()
            if node.get_type_name() not in CHAIN_OPS:
                break
            if node.get_type_name() == "Constant":
                if ov_target._short_type(node.get_output_element_type(0)) in COMPRESSED:
                    constants.append(node)
            else:
                stack.extend(i.get_source_output().get_node() for i in node.inputs())
        else:
            weights = [c for c in constants if c.get_output_partial_shape(0).rank.get_length() >= 2]
            weights.sort(key=lambda c: -int(np.prod(c.get_output_shape(0))))  # the weight, not its zero point
            if weights:
                found.append((op, weights[0]))
    return found


def _layers(artifact: Path) -> int:
    return ModelSpec.from_dict(load_manifest(artifact).spec).num_hidden_layers


@pytest.mark.parametrize("case", list(CASES))
def test_every_weight_matmul_reads_an_n_k_weight(case: str, exported) -> None:
    artifact, reference, messages = exported(case)
    expected = 7 * _layers(artifact) + 1  # q, k, v, o, gate, up, down per layer, and the untied lm_head
    model = ov.Core().read_model(str(artifact / ov_target.MODEL_XML))
    matmuls = _weight_matmuls(model)
    assert len(matmuls) == expected
    for matmul, weight in matmuls:
        assert matmul.get_attributes()["transpose_b"], matmul.get_friendly_name()
        k = matmul.input(0).get_partial_shape()[-1].get_length()
        n = matmul.output(0).get_partial_shape()[-1].get_length()
        shape = list(weight.get_output_shape(0))
        assert shape[0] == n and int(np.prod(shape[1:])) == k, (matmul.get_friendly_name(), shape)
        if len(shape) == 3:  # blocks along K: [N, K/G, G]
            assert shape[2] == CASES[case][0].block_size
    untouched = _weight_matmuls(ov.Core().read_model(str(reference / ov_target.MODEL_XML)))
    assert len(untouched) == expected and not any(m.get_attributes()["transpose_b"] for m, _ in untouched)
    said = f"weights stored as [N, K] (transpose_b) for OpenVINO's CPU plugin: {expected} MatMuls"
    assert said in messages, messages


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_the_untransposed_lowering(case: str, exported) -> None:
    artifact, reference, _ = exported(case)
    manifest = load_manifest(artifact)
    ours = open_artifact(artifact).engine
    theirs = ov_target.OpenVINOEngine(reference, manifest, ov_target.EXACT)
    ids = np.random.default_rng(3).integers(0, 151643, (1, 14))
    for chunk in (ids[:, :12], ids[:, 12:13], ids[:, 13:14]):  # prefill, then two decode steps
        got, want = ours.forward(chunk), theirs.forward(chunk)
        assert float(np.abs(got - want).max()) <= 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_model_still_has_compressed_weights(case: str, exported) -> None:
    artifact, reference, _ = exported(case)
    manifest = load_manifest(artifact)
    ours = open_artifact(artifact).engine.runtime_report()
    theirs = ov_target.OpenVINOEngine(reference, manifest, ov_target.EXACT).runtime_report()
    assert ours.weight_precisions.get(CASES[case][1], 0) >= 7 * _layers(artifact), ours.weight_precisions
    assert ours.weight_precisions == theirs.weight_precisions
    assert ours.stateful_attention == _layers(artifact)


# ------------------------------------------------------------------------------ hand-made graphs
def _pack(codes: np.ndarray) -> np.ndarray:
    """Reference packing, one element at a time: element 2i in byte i's low nibble, 2i+1 in its high."""
    flat = [int(c) & 0x0F for c in np.asarray(codes).reshape(-1)]
    return np.array(
        [flat[i] | ((flat[i + 1] if i + 1 < len(flat) else 0) << 4) for i in range(0, len(flat), 2)], np.uint8
    )


@pytest.mark.parametrize(("shape", "perm"), [((3, 1, 5), (2, 0, 1)), ((3, 3, 5), (2, 0, 1)), ((7, 3), (1, 0))])
def test_transpose_nibbles_matches_numpy(shape: tuple[int, ...], perm: tuple[int, ...]) -> None:
    codes = np.random.default_rng(sum(shape)).integers(0, 16, shape, dtype=np.uint8)
    got = ov_target.transpose_nibbles(_pack(codes), list(shape), perm)
    np.testing.assert_array_equal(got, _pack(codes.transpose(perm)))
    with pytest.raises(ValueError, match="do not hold"):
        ov_target.transpose_nibbles(_pack(codes)[:-1], list(shape), perm)


def _constant(values: np.ndarray, element_type: str) -> Any:
    kind = getattr(ov.Type, element_type)
    tensor = ov.Tensor(kind, list(values.shape))
    raw = tensor.data.view(np.uint8).reshape(-1)
    raw[:] = _pack(values) if kind.bitwidth == 4 else values.astype(tensor.data.dtype).view(np.uint8).reshape(-1)
    return ops.constant(tensor)


def _dequantized(
    codes: np.ndarray, element_type: str, scale: np.ndarray, zero_point: Any = None, blocks: bool = False
) -> tuple[Any, np.ndarray]:
    """The decompression chain convert_model emits, and the numpy value of the weight [K, N]."""
    node = ops.convert(_constant(codes, element_type), ov.Type.f32)
    value = codes.astype(np.float32)
    if zero_point is not None:
        zp_codes, zp_type = zero_point
        zp = ops.convert(_constant(zp_codes, zp_type), ov.Type.f32) if zp_type else ops.constant(zp_codes)
        node, value = ops.subtract(node, zp), value - zp_codes.astype(np.float32)
    node, value = ops.multiply(node, ops.constant(scale)), value * scale
    if blocks:
        k, n = codes.shape[0] * codes.shape[1], codes.shape[2]
        node, value = ops.reshape(node, ops.constant(np.array([k, n], np.int64)), False), value.reshape(k, n)
    return node, value


def _compiled_outputs(model: Any, x: np.ndarray) -> list[np.ndarray]:
    compiled = ov.Core().compile_model(model, "CPU", ov_target.EXACT.properties())
    result = compiled.create_infer_request().infer({0: x})
    return [np.array(result[out]) for out in compiled.outputs]


def _signed(codes: np.ndarray) -> np.ndarray:
    return np.where(codes >= 8, codes.astype(np.int16) - 16, codes).astype(np.int8)


def _transposable_chains() -> tuple[Any, Any, list[np.ndarray]]:
    """x [2, K]: five MatMuls covering int4/int8, blocks/per-channel, zero points (packed, float,
    scalar), either Multiply operand order, odd 4-bit element counts. Returns (model, x, reference
    outputs)."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 9)).astype(np.float32)
    param = ops.parameter([2, 9], ov.Type.f32, name="x")
    chains = [
        # i4 symmetric, blocks of 3 along K = 9: [3, 3, 5], 45 nibbles
        _dequantized(_signed(rng.integers(0, 16, (3, 3, 5))), "i4", rng.random((3, 1, 5), np.float32), blocks=True),
        # u4 asymmetric with a packed u4 zero point [3, 1, 7] (21 nibbles)
        _dequantized(
            rng.integers(0, 16, (3, 3, 7)).astype(np.uint8),
            "u4",
            rng.random((3, 1, 7), np.float32),
            (rng.integers(0, 16, (3, 1, 7)).astype(np.uint8), "u4"),
            blocks=True,
        ),
        # u8 per-channel [9, 5], scale [1, 5], float zero point [1, 5] (no Convert in front)
        _dequantized(
            rng.integers(0, 256, (9, 5)).astype(np.uint8),
            "u8",
            rng.random((1, 5), np.float32),
            (rng.integers(0, 256, (1, 5)).astype(np.float32), None),
        ),
        # u4 per-channel [9, 3] (27 nibbles) with a scalar u4 zero point: kept as it is
        _dequantized(
            rng.integers(0, 16, (9, 3)).astype(np.uint8),
            "u4",
            rng.random((1, 3), np.float32),
            (np.array(8, np.uint8), "u4"),
        ),
    ]
    # i8 blocks [3, 3, 4] with the scale first in the Multiply, stored f16 behind its own Convert
    codes, scale = _signed(rng.integers(0, 16, (3, 3, 4))) * 9, rng.random((3, 1, 4)).astype(np.float16)
    node = ops.multiply(ops.convert(ops.constant(scale), ov.Type.f32), ops.convert(_constant(codes, "i8"), ov.Type.f32))
    node = ops.reshape(node, ops.constant(np.array([9, 4], np.int64)), False)
    chains.append((node, (scale.astype(np.float32) * codes).reshape(9, 4)))
    results = [ops.result(ops.matmul(param, node, False, False)) for node, _ in chains]
    return ov.Model(results, [param]), x, [x @ value for _, value in chains]


def test_hand_made_chains_are_transposed_exactly() -> None:
    model, x, expected = _transposable_chains()
    before = _compiled_outputs(model.clone(), x)
    assert ov_target.transpose_compressed_weights(model) == 5
    after = _compiled_outputs(model, x)
    for got, old, want in zip(after, before, expected, strict=True):
        np.testing.assert_array_equal(got, old)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    shapes = sorted(list(w.get_output_shape(0)) for _, w in _weight_matmuls(model))
    assert shapes == [[3, 9], [4, 3, 3], [5, 3, 3], [5, 9], [7, 3, 3]]
    assert all(m.get_attributes()["transpose_b"] for m, _ in _weight_matmuls(model))
    assert ov_target.transpose_compressed_weights(model) == 0  # already [N, K]


def test_shared_chains_are_left_alone() -> None:
    """A tied lm_head (the embedding's dequantized table also feeds a Gather), a weight Constant
    used by two chains, a float weight: nothing is rewritten."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 6)).astype(np.float32)
    param = ops.parameter([2, 6], ov.Type.f32, name="x")
    table, _ = _dequantized(
        _signed(rng.integers(0, 16, (2, 3, 4))), "i4", rng.random((2, 1, 4), np.float32), blocks=True
    )
    gathered = ops.gather(table, ops.constant(np.array([1, 0], np.int64)), ops.constant(0))
    shared = _constant(rng.integers(0, 256, (6, 4)).astype(np.uint8), "u8")
    twice = [
        ops.multiply(ops.convert(shared, ov.Type.f32), ops.constant(rng.random((1, 4), np.float32))) for _ in range(2)
    ]
    float_weight = ops.constant(rng.standard_normal((6, 4)).astype(np.float32))
    outputs = [ops.matmul(param, table, False, False), gathered]
    outputs += [ops.matmul(param, w, False, False) for w in [*twice, float_weight]]
    model = ov.Model([ops.result(o) for o in outputs], [param])
    before = _compiled_outputs(model.clone(), x)
    assert ov_target.transpose_compressed_weights(model) == 0
    assert not any(op.get_attributes().get("transpose_b") for op in model.get_ops() if op.get_type_name() == "MatMul")
    for got, old in zip(_compiled_outputs(model, x), before, strict=True):
        np.testing.assert_array_equal(got, old)
