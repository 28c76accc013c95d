"""Long context: the context an export chooses, YaRN set by flags, KV memory that follows use and
chunked prefill, each against transformers on tiny seeded checkpoints.

The YaRN parity tests reuse the session's exports of ``qwen2_yarn_bf16_sharded`` (YaRN factor 4
over original_max_position_embeddings 64, context 256), which the parity suite makes anyway: with
``-n 2 --dist loadgroup`` each engine's tests run in that engine's group (conftest.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import reference
from noise import Noise, check_logits
from typer.testing import CliRunner

from qwen_export.artifact import load_manifest
from qwen_export.cli import app
from qwen_export.errors import OptionError
from qwen_export.export import parity
from qwen_export.export.checkpoint import Checkpoint
from qwen_export.export.options import ExportOptions, export_options
from qwen_export.export.pipeline import export as run_export
from qwen_export.runtime.loader import RuntimeOptions, open_artifact
from qwen_export.spec import ModelSpec, RopeOverride, RopeScalingChoice, RopeType
from qwen_export.targets.base import grown_capacity, prepare_step, run_in_chunks
from qwen_export.targets.onnxruntime.engine import OnnxRuntimeEngine, OrtOptions

PREFILL, DECODE = 210, 16  # past original_max_position_embeddings=64, within the context of 256
ABS_TOLERANCE = 1e-4


def _check(got: np.ndarray, ref: np.ndarray, what: str) -> None:
    check_logits(got, ref, Noise.CROSS, what)
    assert float(np.abs(got - ref).max()) < ABS_TOLERANCE, what


def _follow_reference(engine, checkpoint: Path, prompt: np.ndarray, steps: int) -> None:
    """Prefill ``prompt`` then ``steps`` greedy decode steps, each against transformers."""
    expected = reference.greedy_steps(checkpoint, prompt, steps)
    logits = engine.forward(prompt[None])[0, -1]
    _check(logits, expected[0], "prefill")
    for step, ref in enumerate(expected[1:]):
        token = int(np.argmax(logits))
        assert token == int(np.argmax(expected[step])), f"greedy token differs at step {step}"
        logits = engine.forward(np.array([[token]], np.int64))[0, -1]
        _check(logits, ref, f"decode step {step} (position {len(prompt) + step})")


# ------------------------------------------------------------------ YaRN past the original length
@pytest.mark.parametrize("chunk", [0, 64], ids=["whole", "chunked64"])
@pytest.mark.parametrize("target", ["onnxruntime", "openvino"])
def test_yarn_far_past_original_length_matches_transformers(
    target: str, chunk: int, qwen2_yarn_bf16_sharded: Path, export
) -> None:
    """Prefill 210 tokens (original length 64), then decode, with and without chunks. ONNX Runtime
    grows its KV buffers in steps of 32 on the way (prefill 210 -> 224, decode past it -> 256)."""
    pytest.importorskip(target)
    out = export("qwen2_yarn_bf16_sharded", target=target)
    if target == "onnxruntime":
        engine = OnnxRuntimeEngine(out, load_manifest(out), OrtOptions(prefill_chunk=chunk, kv_step=32))
    else:
        engine = open_artifact(out, RuntimeOptions(prefill_chunk=chunk)).engine
    _follow_reference(engine, qwen2_yarn_bf16_sharded, reference.prompt(PREFILL, 7), DECODE)
    if target == "onnxruntime":
        assert engine.kv_capacity == 256  # 32-token steps, doubled, capped at the context


# ------------------------------------------------------------------ sliding window + YaRN, 16K artifact
@pytest.fixture(scope="module")
def sliding_yarn(qwen2_sliding: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(artifact, reference checkpoint): qwen2_sliding exported with ``--rope-scaling yarn
    --rope-factor 64`` (context 256 x 64 = 16384, the default --max-length), and the same
    checkpoint with that YaRN written into its config.json, for transformers."""
    root = tmp_path_factory.mktemp("sliding_yarn")
    out = root / "artifact"
    run_export(qwen2_sliding, out, export_options(qwen2_sliding, rope_scaling="yarn", rope_factor=64))
    ref = root / "checkpoint"
    ref.mkdir()
    for item in qwen2_sliding.iterdir():
        if item.name != "config.json":
            (ref / item.name).symlink_to(item)
    config = json.loads((qwen2_sliding / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 64.0, "original_max_position_embeddings": 256}
    (ref / "config.json").write_text(json.dumps(config))
    return out, ref


def test_large_context_artifact_allocates_what_is_used_and_stays_exact(
    sliding_yarn: tuple[Path, Path], qwen2_sliding: Path
) -> None:
    """A 16K-token artifact: a short prompt allocates one 256-token step of KV, growth (in 64-token
    prefill chunks) keeps the zero-copy shared buffers exact against transformers (sliding window
    and YaRN together) and against the same artifact with its full context preallocated."""
    out, ref = sliding_yarn
    manifest = load_manifest(out)
    per_token = manifest.extra["kv_cache"]["bytes_per_token"]
    assert manifest.extra["max_length"] == 16384
    assert manifest.extra["context"] == {
        "max_length": 16384,
        "trained": 16384,
        "chosen_by": "model",
        "rope_override": "yarn factor 64",
    }
    assert manifest.spec["rope_scaling"]["rope_type"] == "yarn"
    prompt = reference.prompt(300, 11)
    grown = OnnxRuntimeEngine(out, manifest, OrtOptions(prefill_chunk=64))
    grown.forward(prompt[None, :10])
    assert grown.kv_capacity == 256 and grown.kv_bytes == 256 * per_token  # not 16384 tokens' worth
    full = OnnxRuntimeEngine(out, manifest, OrtOptions(prefill_chunk=0, kv_step=16384))
    full.forward(prompt[None, :10])
    assert full.kv_bytes == 16384 * per_token
    expected = reference.greedy_steps(ref, prompt, 2)
    logits = grown.forward(prompt[None, 10:])[0, -1]
    assert grown.kv_capacity == 512
    check_logits(logits, full.forward(prompt[None, 10:])[0, -1], Noise.REORDERED, "grown vs preallocated")
    _check(logits, expected[0], "prefill of 300 after growth")
    for step, ref_logits in enumerate(expected[1:]):
        logits = grown.forward(np.array([[int(np.argmax(logits))]], np.int64))[0, -1]
        _check(logits, ref_logits, f"decode step {step}")
    # `qwen-export check` runs transformers with the RoPE the artifact was exported with
    spec = ModelSpec.from_dict(manifest.spec)
    check_logits(parity.Reference(qwen2_sliding, rope=spec).logits(list(prompt))[-1], expected[0], Noise.REORDERED)


@pytest.mark.slow  # one more OpenVINO export (~10 s); OpenVINO's YaRN is covered by the parity test above
def test_sliding_yarn_on_openvino_matches_transformers(sliding_yarn: tuple[Path, Path], qwen2_sliding: Path) -> None:
    """The same YaRN flags on OpenVINO (sliding-window layers: the stateful engine), chunked."""
    pytest.importorskip("openvino")
    root = sliding_yarn[0].parent / "openvino"
    run_export(
        qwen2_sliding, root, export_options(qwen2_sliding, target="openvino", rope_scaling="yarn", rope_factor=64)
    )
    engine = open_artifact(root, RuntimeOptions(prefill_chunk=64)).engine
    _follow_reference(engine, sliding_yarn[1], reference.prompt(150, 12), 4)


# ------------------------------------------------------------------ options, errors, growth policy
def test_rope_flags_give_the_yarn_of_a_config(qwen2_yarn_bf16_sharded: Path) -> None:
    """--rope-scaling yarn --rope-factor 4 --rope-original-max 64 on a config without scaling gives
    the spec (and RoPE tables) of the same config with that YaRN in config.json."""
    raw = json.loads((qwen2_yarn_bf16_sharded / "config.json").read_text())
    with_yarn = ModelSpec.from_config(raw)
    plain = ModelSpec.from_config({k: v for k, v in raw.items() if k not in ("rope_scaling", "rope_parameters")})
    assert plain.rope_scaling is None and plain.trained_context == 256
    options = ExportOptions(rope=RopeOverride(factor=4.0, original_max=64))
    assert options.model_spec(plain) == with_yarn
    assert options.model_spec(plain).rope_inv_freq_and_scale() == with_yarn.rope_inv_freq_and_scale()
    assert options.resolved_max_length(plain) == 256
    big = ExportOptions(rope=RopeOverride(factor=16.0, original_max=64))
    assert big.resolved_max_length(plain) == 1024  # 64 x 16
    assert ExportOptions(rope=RopeOverride(factor=8.0)).model_spec(with_yarn).rope_scaling.factor == 8.0
    assert ExportOptions(rope=RopeOverride(RopeScalingChoice.NONE)).model_spec(with_yarn) == plain


def test_context_errors_name_the_flag(qwen2_tied: Path, qwen2_yarn_bf16_sharded: Path) -> None:
    spec = Checkpoint.open(qwen2_tied).spec
    assert ExportOptions().resolved_max_length(spec) == 256  # the config's, no 4096 cap (or floor)
    with pytest.raises(OptionError, match=r"--max-length 100000 exceeds the 256 positions .* --rope-factor 391"):
        ExportOptions(max_length=100000).resolved_max_length(spec)
    yarn = Checkpoint.open(qwen2_yarn_bf16_sharded).spec
    assert yarn.rope_scaling.rope_type is RopeType.YARN and yarn.trained_context == 256
    with pytest.raises(OptionError, match=r"YaRN context of 256 .* raise --rope-factor to 8"):
        ExportOptions(max_length=512).resolved_max_length(yarn)
    with pytest.raises(OptionError, match="--rope-scaling yarn needs --rope-factor"):
        ExportOptions(rope=RopeOverride()).model_spec(spec)
    for bad in (
        dict(rope_factor=4.0),
        dict(rope_scaling="yarn", rope_factor=0.5),
        dict(rope_scaling="ntk", rope_factor=4.0),
        dict(rope_scaling="none", rope_factor=4.0),
        dict(rope_scaling="yarn", rope_factor=4.0, rope_original_max=0),
    ):
        with pytest.raises(OptionError, match="--rope"):
            export_options(qwen2_tied, **bad)


def test_cli_refuses_a_context_past_training_and_writes_nothing(qwen2_tied: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["export", str(qwen2_tied), "-o", str(out), "--max-length", "100000"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--rope-scaling yarn" in result.output.replace("\n", " ")
    assert not out.exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_cli_prints_context_and_kv_bytes_per_token() -> None:
    from qwen_export.cli.common import context_line, kv_cache_line

    context = {"max_length": 131072, "trained": 131072, "chosen_by": "model", "rope_override": "yarn factor 4"}
    kv = {"layout": "shared", "capacity": 131072, "bytes_per_token": 12 * 1024}
    line = context_line(context, kv)
    assert line == (
        "context: 131072 tokens (the model's context; RoPE set at export: yarn factor 4), KV cache 12.0 KiB per token"
    )
    assert "allocated as tokens arrive" in (kv_cache_line(kv) or "")


def test_growth_policy_and_chunk_bounds() -> None:
    assert grown_capacity(10, 0, 256, 131072) == 256
    assert grown_capacity(257, 256, 256, 131072) == 512
    assert grown_capacity(1300, 512, 256, 131072) == 1536
    assert grown_capacity(131000, 100000, 256, 131072) == 131072
    # left padding: the first piece reaches every row's first real token
    ids = np.arange(20, dtype=np.int64).reshape(2, 10)
    mask = np.array([[0] * 7 + [1] * 3, [1] * 10])
    step = prepare_step(ids, mask, None, vocab_size=100, max_context=64)
    pieces: list[tuple[int, int]] = []

    def run(piece_ids: np.ndarray, piece_mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        pieces.append((piece_ids.shape[1], piece_mask.shape[1]))
        assert (piece_mask == mask[:, : piece_mask.shape[1]]).all()
        return piece_ids[:, -1:, None].astype(np.float32)

    out = run_in_chunks(step, 3, run, full_logits=False)
    assert pieces == [(8, 8), (2, 10)] and out[0, 0, 0] == 9
    pieces.clear()
    assert run_in_chunks(step, 0, run, full_logits=False).shape == (2, 1, 1) and pieces == [(10, 10)]


def test_cli_prefill_chunk(export) -> None:
    """``--prefill-chunk`` reaches the engine: a prompt in 3-token pieces generates what the whole
    prompt does; a negative chunk is one error line."""
    art = str(export("qwen2_tied"))
    runner = CliRunner()
    args = ["generate", art, "Write a haiku", "--max-new-tokens", "4", "--temperature", "0"]
    whole = runner.invoke(app, [*args, "--prefill-chunk", "0"])
    pieces = runner.invoke(app, [*args, "--prefill-chunk", "3"])
    assert whole.exit_code == pieces.exit_code == 0, whole.output + pieces.output
    assert whole.stdout == pieces.stdout
    bad = runner.invoke(app, [*args, "--prefill-chunk", "-1"])
    assert bad.exit_code == 2 and "prefill_chunk must be an integer >= 0" in bad.output
