"""Parity of exported artifacts against Hugging Face transformers (fp32 eager) on the same weights.

Every engine in ``ENGINES`` runs the same tests; an engine that is not installed is a visible skip.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from qwen_export.loader import LoadedArtifact, RuntimeOptions, open_artifact
from qwen_export.runtimes.base import position_ids_from_mask
from qwen_export.spec import Target

FP32_TOL = 1e-4

#: every engine runs every parity test; a missing one is a visible skip
ENGINES = [
    "onnxruntime",
    pytest.param(
        "openvino",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("openvino") is None,
            reason="openvino is not installed: pip install 'qwen-export[openvino]'",
        ),
    ),
    # the same OpenVINO artifact run as saved (the default runs it as PagedAttention over the
    # engine's block cache, except for sliding-window models)
    pytest.param(
        "openvino-stateful",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("openvino") is None,
            reason="openvino is not installed: pip install 'qwen-export[openvino]'",
        ),
    ),
    # the --target tensorrt graph (standard ops, fixed-capacity KV buffers scattered in place) run on
    # ONNX Runtime CPU: TensorRT itself cannot run here (see tests/test_tensorrt_engine.py)
    "tensorrt",
]


@pytest.fixture(params=ENGINES)
def target(request: pytest.FixtureRequest) -> str:
    return request.param


def _open(path: Path, target: str) -> LoadedArtifact:
    """Load an artifact on the engine that verifies it here (TensorRT's graph: ONNX Runtime CPU)."""
    if target == STATEFUL:
        from qwen_export.runtimes.openvino import Attention, OpenVINOOptions

        return open_artifact(path, RuntimeOptions(openvino=OpenVINOOptions(attention=Attention.STATEFUL)))
    engine = Target.ONNXRUNTIME if target == "tensorrt" else None
    return open_artifact(path, RuntimeOptions(engine=engine))


STATEFUL = "openvino-stateful"


def _exported(target: str) -> str:
    """The export target of an engine label (openvino-stateful runs the openvino artifact)."""
    return "openvino" if target == STATEFUL else target


ARCH_CASES = ["qwen2_tied", "qwen2_untied", "qwen2_yarn_bf16_sharded", "qwen3", "qwen2_sliding"]


def _reference(checkpoint: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(checkpoint), dtype=torch.float32, attn_implementation="eager"
    ).eval()


def _prompt(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 151643, n, dtype=np.int64)


def _ref_steps(model: transformers.PreTrainedModel, prompt: np.ndarray, steps: int) -> list[np.ndarray]:
    """Reference logits: prefill (last position) then ``steps`` greedy decode steps with its KV cache."""
    out = []
    with torch.no_grad():
        res = model(torch.tensor(prompt[None]), use_cache=True)
        logits, cache = res.logits[0, -1], res.past_key_values
        out.append(logits.numpy())
        for _ in range(steps):
            token = torch.argmax(logits).view(1, 1)
            res = model(token, past_key_values=cache, use_cache=True)
            logits, cache = res.logits[0, -1], res.past_key_values
            out.append(logits.numpy())
    return out


@pytest.mark.parametrize("case", ARCH_CASES)
def test_prefill_and_32_decode_steps_match_transformers(
    case: str, request: pytest.FixtureRequest, export, target: str
) -> None:
    checkpoint = request.getfixturevalue(case)
    engine = _open(export(case, target=_exported(target)), target).engine
    prompt = _prompt(100 if "yarn" in case else 20)  # YaRN: past original_max_position_embeddings=64
    expected = _ref_steps(_reference(checkpoint), prompt, 32)
    logits = engine.forward(prompt[None])[0, -1]
    np.testing.assert_allclose(logits, expected[0], atol=FP32_TOL, rtol=0, err_msg="prefill")
    for step, ref in enumerate(expected[1:]):
        token = int(np.argmax(logits))
        assert token == int(np.argmax(expected[step])), f"greedy token differs at step {step}"
        logits = engine.forward(np.array([[token]], np.int64))[0, -1]
        np.testing.assert_allclose(logits, ref, atol=FP32_TOL, rtol=0, err_msg=f"decode step {step}")
    assert engine.num_cached_tokens == len(prompt) + 32


def test_batch_of_two_with_left_padding(qwen2_untied: Path, export, target: str) -> None:
    engine = _open(export("qwen2_untied", target=_exported(target)), target).engine
    model = _reference(qwen2_untied)
    long, short = _prompt(12, 1), _prompt(7, 2)
    ids = np.zeros((2, 12), np.int64)
    mask = np.zeros((2, 12), np.int64)
    ids[0], mask[0] = long, 1
    ids[1, 5:], mask[1, 5:] = short, 1
    ids[1, :5] = 151643  # pad token (<|endoftext|>)
    full_mask = mask
    got = engine.forward(ids, mask)[:, -1]
    with torch.no_grad():
        for step in range(4):
            pos = position_ids_from_mask(full_mask)
            ref = (
                model(torch.tensor(ids), attention_mask=torch.tensor(full_mask), position_ids=torch.tensor(pos))
                .logits[:, -1]
                .numpy()
            )
            np.testing.assert_allclose(got, ref, atol=FP32_TOL, rtol=0, err_msg=f"step {step}")
            # each row alone (no padding) must give the same logits as in the batch
            if step == 0:
                alone = model(torch.tensor(short[None])).logits[0, -1].numpy()
                np.testing.assert_allclose(got[1], alone, atol=FP32_TOL, rtol=0)
            nxt = np.argmax(got, axis=-1).astype(np.int64)[:, None]
            ids = np.concatenate([ids, nxt], axis=1)
            full_mask = np.concatenate([full_mask, np.ones((2, 1), np.int64)], axis=1)
            got = engine.forward(nxt)[:, -1]


def test_full_logits_artifact_matches_every_position(qwen2_tied: Path, export, target: str) -> None:
    loaded = _open(export("qwen2_tied", logits="all", target=_exported(target)), target)
    assert loaded.engine.capabilities.full_logits
    prompt = _prompt(16, 3)
    got = loaded.engine.forward(prompt[None])[0]
    with torch.no_grad():
        ref = _reference(qwen2_tied)(torch.tensor(prompt[None])).logits[0].numpy()
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=FP32_TOL, rtol=0)


@pytest.mark.parametrize("case", ["qwen2_tied", "qwen3"])
def test_fp16_export_within_documented_tolerance(
    case: str, request: pytest.FixtureRequest, export, target: str
) -> None:
    """fp16 artifact vs the fp32 reference: its error must stay within 2x (+0.01) of the error of
    transformers itself run in fp16 on the same path, and the greedy choice must agree."""
    checkpoint = request.getfixturevalue(case)
    loaded = _open(export(case, dtype="fp16", target=_exported(target)), target)
    assert loaded.manifest.dtype == "fp16"
    prompt = _prompt(20, 4)
    reference = _reference(checkpoint)
    expected = _ref_steps(reference, prompt, 8)
    expected16 = _ref_steps_following(reference.half(), prompt, [int(np.argmax(e)) for e in expected[:-1]])
    logits = loaded.engine.forward(prompt[None])[0, -1]
    assert logits.dtype == np.float32
    ours, theirs = [np.abs(logits - expected[0]).max()], [np.abs(expected16[0] - expected[0]).max()]
    for step, ref in enumerate(expected[1:]):
        token = int(np.argmax(expected[step]))  # follow the reference's greedy path
        logits = loaded.engine.forward(np.array([[token]], np.int64))[0, -1]
        ours.append(np.abs(logits - ref).max())
        theirs.append(np.abs(expected16[step + 1] - ref).max())
        assert int(np.argmax(logits)) == int(np.argmax(ref)) or np.sort(ref)[-2] > ref.max() - 2 * ours[-1]
    assert max(ours) <= 2 * max(theirs) + 0.01, f"ours {ours} vs transformers fp16 {theirs}"


def _ref_steps_following(
    model: transformers.PreTrainedModel, prompt: np.ndarray, tokens: list[int]
) -> list[np.ndarray]:
    """Reference logits (as float32) along a given token path."""
    out = []
    with torch.no_grad():
        res = model(torch.tensor(prompt[None]), use_cache=True)
        out.append(res.logits[0, -1].float().numpy())
        cache = res.past_key_values
        for token in tokens:
            res = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            out.append(res.logits[0, -1].float().numpy())
            cache = res.past_key_values
    return out


def test_truncate_then_refeed_equals_fresh_run(qwen2_tied: Path, export, target: str) -> None:
    engine = _open(export("qwen2_tied", target=_exported(target)), target).engine
    prompt = _prompt(10, 5)
    first = engine.forward(prompt[None])[0, -1]
    engine.forward(np.array([[1, 2, 3]], np.int64))
    engine.truncate(6)
    assert engine.num_cached_tokens == 6
    again = engine.forward(prompt[None, 6:])[0, -1]
    np.testing.assert_allclose(again, first, atol=1e-5, rtol=0)
