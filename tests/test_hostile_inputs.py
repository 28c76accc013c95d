"""Hostile inputs through the CLI: every one gives exactly one ``error:`` line, exit status 2, and
leaves no output directory and no stray temporary files behind.

Table-driven: each case is a small function that breaks a *copy* of a fixture. Cases already in
tests/test_cli.py (unsupported architecture, kv heads not dividing heads, truncated weights, a wrong
1-D shape, missing tokenizer.json, a renamed ``.bin``, a too-long prompt, top-p / negative
temperature, a tampered ``model.onnx.data``, a removed tokenizer.json) are not repeated here.

Also here: a disk-full export (ENOSPC/EDQUOT) and SIGTERM / SIGINT sent to a running ``qwen-export
export`` subprocess.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from qwen_export import artifact, onnx_writer
from qwen_export.artifact import MANIFEST_NAME, sha256_file, write_artifact
from qwen_export.cli import app
from qwen_export.errors import ArtifactError, GenerationError
from qwen_export.runtime.tokenizer import MAX_TOKENIZER_BYTES

runner = CliRunner()


def invoke(*args: object, input: str | None = None):  # noqa: A002 - CliRunner's name
    return runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)


def assert_one_error(result, *fragments: str, only_line: bool = True) -> str:
    """Exit 2, exactly one ``error:`` line holding every fragment (and, by default, nothing else)."""
    assert result.exit_code == 2, result.output
    lines = [line.removeprefix("> ") for line in result.output.splitlines() if line.strip()]  # chat's prompt
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert "Traceback" not in result.output, result.output
    if only_line:
        assert lines == errors, result.output
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def assert_nothing_left(parent: Path) -> None:
    """No artifact, no ``.X.tmp-*`` / ``.X.old-*`` sibling: the parent is empty (or was never made)."""
    assert not parent.exists() or sorted(p.name for p in parent.iterdir()) == []


# ============================================================================ checkpoint side
WEIGHTS = "model.safetensors"


def _edit_tensors(ckpt: Path, edit: Callable[[dict[str, np.ndarray]], None], file: str = WEIGHTS) -> None:
    tensors = load_file(str(ckpt / file))
    edit(tensors)
    save_file(tensors, str(ckpt / file))


def _edit_config(ckpt: Path, **changes: object) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    config.update(changes)
    (ckpt / "config.json").write_text(json.dumps(config))


def _missing_tensor(ckpt: Path) -> None:
    _edit_tensors(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))


def _extra_tensor(ckpt: Path) -> None:
    _edit_tensors(ckpt, lambda t: t.update({"model.layers.0.mlp.gate_proj.scales": np.ones(128, np.float32)}))


def _renamed_tensor(ckpt: Path) -> None:
    _edit_tensors(ckpt, lambda t: t.update({"model.final_norm.weight": t.pop("model.norm.weight")}))


def _int32_weight(ckpt: Path) -> None:
    name = "model.layers.0.self_attn.q_proj.weight"
    _edit_tensors(ckpt, lambda t: t.update({name: t[name].astype(np.int32)}))


def _transposed_matrix(ckpt: Path) -> None:
    name = "model.layers.1.mlp.down_proj.weight"
    _edit_tensors(ckpt, lambda t: t.update({name: np.ascontiguousarray(t[name].T)}))


def _garbage_header(ckpt: Path) -> None:
    data = (ckpt / WEIGHTS).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    garbage = b'{"model.norm.weight": {"dtype": "F32", "shape": [64], "data_offsets": [0, 2' + b"\x00" * 8
    (ckpt / WEIGHTS).write_bytes(data[:8] + garbage.ljust(n, b" ") + data[8 + n :])


def _header_length_past_eof(ckpt: Path) -> None:
    size = (ckpt / WEIGHTS).stat().st_size
    with open(ckpt / WEIGHTS, "r+b") as f:
        f.write(struct.pack("<Q", size + 4096))


def _tensor_past_eof(ckpt: Path) -> None:
    """A consistent header whose last tensor ends past the end of the file."""
    path = ckpt / WEIGHTS
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    path.write_bytes(data[: len(data) - 256])


def _missing_shard(ckpt: Path) -> None:
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    last = sorted(set(index["weight_map"].values()))[-1]
    (ckpt / last).unlink()


def _shard_path_escape(ckpt: Path) -> None:
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = "../../etc/passwd"
    index_path.write_text(json.dumps(index))


def _config_bytes(content: bytes) -> Callable[[Path], None]:
    return lambda ckpt: (ckpt / "config.json").write_bytes(content)


def _malicious_pickle(ckpt: Path) -> None:
    """A real pickle whose loading would create a marker file: it must never be unpickled."""

    class Payload:
        def __reduce__(self):
            return (open, (str(ckpt / "PWNED"), "w"))

    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    (ckpt / WEIGHTS).unlink()


def _tokenizer_bytes(content: bytes) -> Callable[[Path], None]:
    return lambda ckpt: (ckpt / "tokenizer.json").write_bytes(content)


def _huge_tokenizer(ckpt: Path) -> None:
    with open(ckpt / "tokenizer.json", "r+b") as f:  # sparse: no disk is used for the hole
        f.truncate(MAX_TOKENIZER_BYTES + 1)


CHECKPOINT_CASES = [
    pytest.param(
        "qwen2_tied",
        _missing_tensor,
        ("missing 1 expected tensor", "model.layers.1.mlp.up_proj.weight"),
        id="missing-tensor",
    ),
    pytest.param(
        "qwen2_tied", _extra_tensor, ("unexpected tensor", "model.layers.0.mlp.gate_proj.scales"), id="extra-tensor"
    ),
    pytest.param(
        "qwen2_tied",
        _renamed_tensor,
        ("missing", "model.norm.weight", "unexpected", "model.final_norm"),
        id="renamed-tensor",
    ),
    pytest.param("qwen2_tied", _int32_weight, ("q_proj.weight", "I32", "quantized"), id="int32-weight"),
    pytest.param(
        "qwen2_tied",
        _transposed_matrix,
        ("down_proj.weight", "[128, 64]", "expected [64, 128]"),
        id="wrong-shape-matrix",
    ),
    pytest.param("qwen2_tied", _garbage_header, ("corrupt safetensors header",), id="garbage-header-json"),
    pytest.param(
        "qwen2_tied", _header_length_past_eof, ("header length", "runs past the end"), id="header-length-past-eof"
    ),
    pytest.param("qwen2_tied", _tensor_past_eof, ("truncated", "ends at byte"), id="tensor-past-eof"),
    pytest.param(
        "qwen2_yarn_bf16_sharded",
        _missing_shard,
        ("shard model-0000", ".safetensors named in", "is missing"),
        id="missing-shard",
    ),
    pytest.param(
        "qwen2_yarn_bf16_sharded", _shard_path_escape, ("invalid file name", "../../etc/passwd"), id="shard-path-escape"
    ),
    pytest.param(
        "qwen2_tied",
        lambda c: _edit_config(c, num_attention_heads=6),
        ("hidden_size=64", "heads=6"),
        id="hidden-not-divisible-by-heads",
    ),
    pytest.param(
        "qwen2_tied",
        lambda c: _edit_config(c, intermediate_size=-128),
        ("intermediate_size=-128", "range"),
        id="negative-size",
    ),
    pytest.param(
        "qwen2_tied", lambda c: _edit_config(c, num_hidden_layers=0), ("num_hidden_layers=0", "range"), id="zero-layers"
    ),
    pytest.param(
        "qwen2_tied",
        lambda c: _edit_config(c, vocab_size=10**12),
        ("vocab_size=1000000000000", "range"),
        id="absurd-size",
    ),
    pytest.param(
        "qwen2_tied", lambda c: _edit_config(c, hidden_size="64"), ("hidden_size='64'", "integer"), id="size-as-string"
    ),
    pytest.param(
        "qwen2_tied", lambda c: _edit_config(c, hidden_size=64.5), ("hidden_size=64.5", "integer"), id="size-as-float"
    ),
    pytest.param(
        "qwen2_tied",
        _config_bytes(b'{"model_type": "qwen2\xff\xfe"}'),
        ("config.json", "not UTF-8"),
        id="config-not-utf8",
    ),
    pytest.param(
        "qwen2_tied",
        _config_bytes(b'{"model_type": "qwen2",'),
        ("config.json", "invalid JSON"),
        id="config-garbage-json",
    ),
    pytest.param("qwen2_tied", _config_bytes(b"[1, 2, 3]"), ("config.json", "JSON object"), id="config-not-object"),
    pytest.param("qwen2_tied", _malicious_pickle, ("pickle", "pytorch_model.bin"), id="pickle-only"),
    pytest.param(
        "qwen2_tied",
        _tokenizer_bytes(b'{"version": "1.0", "x": "\xff"}'),
        ("tokenizer.json", "UTF-8"),
        id="tokenizer-not-utf8",
    ),
    pytest.param("qwen2_tied", _tokenizer_bytes(b'{"version": '), ("tokenizer.json",), id="tokenizer-garbage-json"),
    pytest.param("qwen2_tied", _huge_tokenizer, ("tokenizer.json", "limit"), id="tokenizer-over-limit"),
]


@pytest.mark.parametrize(("fixture", "breakage", "fragments"), CHECKPOINT_CASES)
def test_hostile_checkpoint(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fixture: str,
    breakage: Callable[[Path], None],
    fragments: tuple[str, ...],
) -> None:
    from qwen_export.export import trace

    def reached_tracing(*args: object, **kwargs: object) -> None:
        raise AssertionError("the export reached tracing: the hostile input was not caught when loading")

    monkeypatch.setattr(trace, "trace", reached_tracing)  # fail fast instead of exporting
    ckpt = shutil.copytree(request.getfixturevalue(fixture), tmp_path / "ckpt")
    breakage(ckpt)
    parent = tmp_path / "outs"
    assert_one_error(invoke("export", ckpt, "-o", parent / "art"), *fragments)
    assert_nothing_left(parent)
    assert not (ckpt / "PWNED").exists()


# ============================================================================ artifact side
def _rehash(art: Path, *names: str) -> None:
    """Update the manifest's sha256 for ``names``: a consistent artifact with hostile contents."""
    manifest = json.loads((art / MANIFEST_NAME).read_text())
    for name in names:
        manifest["files"][name] = sha256_file(art / name)
    (art / MANIFEST_NAME).write_text(json.dumps(manifest))


def _edit_manifest(art: Path, **changes: object) -> None:
    manifest = json.loads((art / MANIFEST_NAME).read_text())
    manifest.update(changes)
    (art / MANIFEST_NAME).write_text(json.dumps(manifest))


def _append(art: Path, name: str, data: bytes = b"\n{# appended #}\n") -> None:
    with open(art / name, "ab") as f:
        f.write(data)


def _swap(art: Path, a: str, b: str) -> None:
    (art / a).rename(art / "swap.tmp")
    (art / b).rename(art / a)
    (art / "swap.tmp").rename(art / b)


def _unsafe_path(art: Path) -> None:
    manifest = json.loads((art / MANIFEST_NAME).read_text())
    manifest["files"]["../../etc/passwd"] = "0" * 64
    (art / MANIFEST_NAME).write_text(json.dumps(manifest))


def _hostile_tokenizer(content: bytes) -> Callable[[Path], None]:
    def run(art: Path) -> None:
        (art / "tokenizer.json").write_bytes(content)
        _rehash(art, "tokenizer.json")

    return run


def _huge_artifact_tokenizer(art: Path) -> None:
    with open(art / "tokenizer.json", "r+b") as f:
        f.truncate(MAX_TOKENIZER_BYTES + 1)
    _rehash(art, "tokenizer.json")


GENERATE = ("generate", "{art}", "hi", "--max-new-tokens", "2")
INSPECT = ("inspect", "{art}")

ARTIFACT_CASES = [
    pytest.param(
        INSPECT, lambda a: _append(a, "chat_template.jinja"), ("chat_template.jinja", "modified"), id="file-modified"
    ),
    pytest.param(GENERATE, lambda a: (a / "model.onnx").unlink(), ("model.onnx", "missing"), id="file-removed"),
    pytest.param(
        GENERATE,
        lambda a: _swap(a, "tokenizer_config.json", "generation_config.json"),
        ("modified",),
        id="files-swapped",
    ),
    pytest.param(INSPECT, lambda a: _swap(a, "model.onnx", "model.onnx.data"), ("modified",), id="weights-swapped"),
    pytest.param(
        GENERATE,
        lambda a: _edit_manifest(a, schema_version=99),
        ("schema 99", "upgrade qwen-export"),
        id="newer-schema",
    ),
    pytest.param(INSPECT, lambda a: _edit_manifest(a, schema_version="1"), ("schema_version",), id="schema-as-string"),
    pytest.param(
        GENERATE,
        lambda a: (a / MANIFEST_NAME).write_text('{"schema_version": 1, "files": '),
        ("manifest.json", "not valid JSON"),
        id="garbage-manifest",
    ),
    pytest.param(
        INSPECT,
        lambda a: (a / MANIFEST_NAME).write_bytes(b"\xff\xfe\x00garbage"),
        ("manifest.json", "cannot be read"),
        id="binary-manifest",
    ),
    pytest.param(GENERATE, lambda a: _edit_manifest(a, files=["model.onnx"]), ("'files'",), id="manifest-wrong-type"),
    pytest.param(INSPECT, lambda a: (a / MANIFEST_NAME).unlink(), ("no manifest.json",), id="manifest-missing"),
    pytest.param(INSPECT, _unsafe_path, ("unsafe file path",), id="manifest-path-escape"),
    pytest.param(
        GENERATE,
        _hostile_tokenizer(b'{"x": "\xff"}'),
        ("tokenizer.json", "not UTF-8"),
        id="tokenizer-not-utf8-rehashed",
    ),
    pytest.param(GENERATE, _huge_artifact_tokenizer, ("tokenizer.json", "limit"), id="tokenizer-over-limit-rehashed"),
]


@pytest.mark.parametrize(("command", "breakage", "fragments"), ARTIFACT_CASES)
def test_hostile_artifact(
    export, tmp_path: Path, command: tuple[str, ...], breakage: Callable[[Path], None], fragments: tuple[str, ...]
) -> None:
    art = shutil.copytree(export("qwen2_tied"), tmp_path / "art")
    breakage(art)
    before = sorted(p.name for p in art.iterdir())
    assert_one_error(invoke(*[arg.format(art=art) for arg in command]), *fragments)
    assert sorted(p.name for p in art.iterdir()) == before  # nothing written into it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


# ============================================================================ runtime side
SAMPLING_CASES = [
    (("--temperature", "nan"), "temperature"),
    (("--temperature", "inf"), "temperature"),
    (("--top-k", "-1"), "top_k"),
    (("--top-p", "0"), "top_p"),
    (("--top-p", "-0.5"), "top_p"),
    (("--min-p", "1.5"), "min_p"),
    (("--min-p", "-0.1"), "min_p"),
    (("--repetition-penalty", "0"), "repetition_penalty"),
    (("--repetition-penalty", "-1.2"), "repetition_penalty"),
    (("--repetition-penalty", "nan"), "repetition_penalty"),
    (("--max-new-tokens", "0"), "max_new_tokens"),
    (("--max-new-tokens", "-5"), "max_new_tokens"),
    (("--seed", "-1"), "seed"),
]


@pytest.mark.parametrize(("options", "fragment"), SAMPLING_CASES, ids=[" ".join(o) for o, _ in SAMPLING_CASES])
def test_invalid_sampling_options(export, options: tuple[str, ...], fragment: str) -> None:
    assert_one_error(invoke("generate", export("qwen2_tied"), "hi", *options), fragment)


def test_empty_raw_prompt(export) -> None:
    assert_one_error(invoke("generate", export("qwen2_tied"), "", "--raw"), "prompt is empty")


def test_chat_turn_over_the_context(export) -> None:
    # the chat banner goes to stderr first, so only the error-line count is checked
    result = invoke("chat", export("qwen2_tied"), "--max-new-tokens", "2", input="word " * 400 + "\n")
    assert_one_error(result, "context is 256", only_line=False)


def test_token_ids_out_of_range_are_refused_and_leave_the_cache_intact(export) -> None:
    from qwen_export.runtime.generation import GenerationConfig, Generator
    from qwen_export.runtime.loader import open_artifact

    art = open_artifact(export("qwen2_tied"))
    engine, vocab = art.engine, art.engine.capabilities.vocab_size
    engine.forward(np.array([[1, 2, 3]], np.int64))
    before = engine.forward(np.array([[4]], np.int64)).copy()
    engine.truncate(3)
    for bad in ([[vocab]], [[5, vocab + 1000]], [[-1]], [[2**62]]):
        with pytest.raises(GenerationError, match="out of range"):
            engine.forward(np.array(bad, np.int64))
        assert engine.num_cached_tokens == 3
    with pytest.raises(GenerationError, match="exceed the artifact's context"):
        engine.forward(np.zeros((1, 254), np.int64))
    assert engine.num_cached_tokens == 3
    np.testing.assert_array_equal(engine.forward(np.array([[4]], np.int64)), before)

    generator = Generator(engine, art.tokenizer)
    for prompt in ([1, vocab], [-3]):
        with pytest.raises(GenerationError, match="outside the vocabulary"):
            generator.generate(prompt, GenerationConfig(max_new_tokens=2))
    with pytest.raises(GenerationError, match="context is 256"):
        generator.generate(list(range(256)), GenerationConfig(max_new_tokens=2))


# ============================================================================ disk full
def _write_then_fail(code: int) -> Callable[..., None]:
    def fake_write_onnx(model, out_dir: Path, model_file: str, data_file: str, progress=None) -> None:
        with open(out_dir / data_file, "wb") as f:
            f.write(b"\0" * (3 << 20))  # some bytes made it to disk first
        raise OSError(code, os.strerror(code))

    return fake_write_onnx


def test_disk_full_during_export(qwen2_tied: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx_writer, "write_onnx", _write_then_fail(errno.ENOSPC))
    parent = tmp_path / "outs"
    out = parent / "art"
    line = assert_one_error(
        invoke("export", qwen2_tied, "-o", out), "disk full while writing", str(out), "MiB free", "--output"
    )
    # how much was written before space ran out: the tokenizer files (copied first) + the 3 MiB of weights
    written = re.search(r"after ([0-9.]+) MiB", line)
    assert written is not None and float(written.group(1)) >= 3.0, line
    assert_nothing_left(parent)


@pytest.mark.parametrize("code", [errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)])
def test_disk_full_in_write_artifact(tmp_path: Path, code: int) -> None:
    out = tmp_path / "art"
    with pytest.raises(ArtifactError, match=r"disk full while writing .*art: .* MiB free on that filesystem") as info:
        with write_artifact(out) as w:
            (w.path / "model.onnx").write_bytes(b"x" * 1000)
            try:
                raise OSError(code, os.strerror(code))
            except OSError as exc:  # wrapped, as libraries sometimes do
                raise RuntimeError("could not save the model") from exc
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_other_os_errors_are_not_called_disk_full(tmp_path: Path) -> None:
    with pytest.raises(PermissionError):
        with write_artifact(tmp_path / "art"):
            raise PermissionError(errno.EACCES, "Permission denied")
    assert list(tmp_path.iterdir()) == []


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def terminal_sigint() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt, as in a terminal, even when the test run was started in the
    background (`cmd &`), which leaves SIGINT ignored."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


@pytest.mark.usefixtures("terminal_sigint")
def test_pending_signal_is_delivered_after_the_rename(tmp_path: Path) -> None:
    """SIGINT during the final renames waits until they are done (the artifact is whole, then Ctrl-C)."""
    out = tmp_path / "art"
    real_move = artifact.move_into_place

    def move_with_interrupt(tmp: Path, dst: Path, *args: object, **kwargs: object) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)  # not interrupted: SIGINT is blocked here
        real_move(tmp, dst, *args, **kwargs)

    artifact.move_into_place = move_with_interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            with write_artifact(out) as w:
                (w.path / "model.onnx").write_text("whole")
                w.manifest_fields.update(target="onnxruntime", dtype="fp32", logits="last", spec={})
    finally:
        artifact.move_into_place = real_move
    assert (out / "model.onnx").read_text() == "whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


# ============================================================================ interrupted export (subprocess)
_SLOW_WRITER = """
import sys, time
import qwen_export.onnx_writer as writer
real = writer.write_onnx
def slow(*args, **kwargs):
    real(*args, **kwargs)
    time.sleep(120)  # hold the export inside write_artifact until the test signals it
writer.write_onnx = slow
from qwen_export.cli import main
sys.argv[0] = "qwen-export"
main()
"""


def _temp_dirs(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.")] if parent.exists() else []


def _torch_loaded(pid: int) -> bool:
    """True once the export has imported torch, i.e. it is tracing (Linux: the mapped libraries)."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _wait_for(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(
                f"the export ended (status {proc.returncode}) before it could be interrupted: {proc.communicate()[1]}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the export did not reach the phase to interrupt within {timeout} s")
        time.sleep(0.02)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize(
    ("phase", "sig"),
    [("tracing", signal.SIGTERM), ("tracing", signal.SIGINT), ("writing", signal.SIGTERM)],
    ids=["tracing-SIGTERM", "tracing-SIGINT", "writing-SIGTERM"],  # SIGINT while writing: test_cli (in-process)
)
def test_signal_during_export_leaves_nothing(qwen2_tied: Path, tmp_path: Path, phase: str, sig: int) -> None:
    parent = tmp_path / "outs"
    out = parent / "art"
    if phase == "tracing":  # the installed entry point, signalled once torch is loaded (before any write)
        exe = Path(sys.executable).parent / "qwen-export"
        if not exe.is_file():
            pytest.skip(f"qwen-export is not installed next to {sys.executable} (pip install -e .)")
        command = [str(exe)]
        linux = Path("/proc/self/maps").exists()
        ready = (lambda: _torch_loaded(proc.pid)) if linux else (lambda: time.monotonic() - started > 4)
    else:  # same CLI, with the weight writer held open so the signal lands inside write_artifact
        script = tmp_path / "slow_export.py"
        script.write_text(_SLOW_WRITER)
        command = [sys.executable, str(script)]
        ready = lambda: any((d / "model.onnx.data").is_file() for d in _temp_dirs(parent, out.name))  # noqa: E731
    started = time.monotonic()
    proc = subprocess.Popen(
        [*command, "export", str(qwen2_tied), "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a signal for it alone, not for pytest's process group
        # a test run started in the background (`cmd &`) inherits SIGINT ignored, and Python then
        # installs no KeyboardInterrupt handler: give the export the terminal default a user has
        preexec_fn=_default_sigint,
    )
    try:
        _wait_for(ready, proc, timeout=120)
        if phase == "tracing":
            assert _temp_dirs(parent, out.name) == []  # not yet writing
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode > 0, (proc.returncode, stderr)  # exited on its own, not killed by the signal
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert not out.exists()
    assert _temp_dirs(parent, out.name) == []
    assert_nothing_left(parent)
