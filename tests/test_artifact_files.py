"""Class 1 of issue 20: an artifact cannot make the loader read outside itself.

Every hostile tree here is *consistent*: the manifest's hashes are recomputed after the change,
as an attacker shipping the whole artifact would do. Each case is checked through the installed
CLI in a subprocess (one ``error:`` line, exit status 2, within a timeout: a FIFO or ``/dev/zero``
must not hang it) and the unit-level helpers (:mod:`qwen_export.safefs`,
:func:`qwen_export.manifest_schema.validate_manifest`) directly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest

from qwen_export.artifact import MANIFEST_NAME, load_manifest, sha256_file
from qwen_export.errors import ArtifactError, ConfigError
from qwen_export.safefs import check_relative, read_inside, read_regular, scan_tree

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX links, FIFOs and devices")


def _manifest(art: Path) -> dict:
    return json.loads((art / MANIFEST_NAME).read_text())


def _write_manifest(art: Path, data: dict) -> None:
    (art / MANIFEST_NAME).write_text(json.dumps(data))


def _rehash(art: Path) -> None:
    """Recompute ``files`` as an attacker would: every regular file reachable (links followed)."""
    data = _manifest(art)
    files = {}
    for path in sorted(art.rglob("*")):
        rel = path.relative_to(art).as_posix()
        if rel != MANIFEST_NAME and path.is_file() and not path.is_fifo():
            files[rel] = sha256_file(path) if not rel.startswith("dev") else "0" * 64
    data["files"] = files
    _write_manifest(art, data)


def _link_out(name: str) -> Callable[[Path, Path], None]:
    """``name`` becomes a link to an identical copy outside the artifact (the hash still matches)."""

    def run(art: Path, outside: Path) -> None:
        shutil.move(art / name, outside / name)
        (art / name).symlink_to(outside / name)
        _rehash(art)

    return run


def _linked_directory(art: Path, outside: Path) -> None:
    (outside / "sub").mkdir()
    (outside / "sub" / "notes.txt").write_text("outside")
    (art / "sub").symlink_to(outside / "sub", target_is_directory=True)
    _rehash(art)
    data = _manifest(art)
    data["files"]["sub/notes.txt"] = sha256_file(outside / "sub" / "notes.txt")
    _write_manifest(art, data)


def _dev_zero_tokenizer(art: Path, outside: Path) -> None:
    (art / "tokenizer.json").unlink()
    (art / "tokenizer.json").symlink_to("/dev/zero")
    _rehash(art)
    data = _manifest(art)
    data["files"]["tokenizer.json"] = "0" * 64
    _write_manifest(art, data)


def _fifo_template(art: Path, outside: Path) -> None:
    (art / "chat_template.jinja").unlink()
    os.mkfifo(art / "chat_template.jinja")
    data = _manifest(art)
    data["files"]["chat_template.jinja"] = "0" * 64
    _write_manifest(art, data)


def _files_empty(art: Path, outside: Path) -> None:
    data = _manifest(art)
    data["files"] = {}
    _write_manifest(art, data)


def _omits(name: str) -> Callable[[Path, Path], None]:
    def run(art: Path, outside: Path) -> None:
        data = _manifest(art)
        del data["files"][name]
        _write_manifest(art, data)

    return run


def _unlisted_extra(art: Path, outside: Path) -> None:
    (art / "model2.onnx").write_bytes((art / "model.onnx").read_bytes())


def _external_data_escape(art: Path, outside: Path) -> None:
    import onnx

    shutil.move(art / "model.onnx.data", outside / "model.onnx.data")
    model = onnx.load(str(art / "model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../outside/model.onnx.data"
    onnx.save(model, str(art / "model.onnx"))
    _rehash(art)


FILE_CASES = [
    pytest.param(_link_out("chat_template.jinja"), ("chat_template.jinja", "symbolic link"), id="template-link"),
    pytest.param(_link_out("model.onnx.data"), ("model.onnx.data", "symbolic link"), id="weights-link"),
    pytest.param(_link_out("tokenizer.json"), ("tokenizer.json", "symbolic link"), id="tokenizer-link"),
    pytest.param(_linked_directory, ("sub", "symbolic link"), id="directory-link"),
    pytest.param(_dev_zero_tokenizer, ("tokenizer.json", "symbolic link"), id="tokenizer-dev-zero"),
    pytest.param(_fifo_template, ("chat_template.jinja", "FIFO"), id="template-fifo"),
    pytest.param(_files_empty, ("files", "non-empty"), id="files-empty"),
    pytest.param(_omits("model.onnx.data"), ("model.onnx.data", "not listed"), id="omits-weights"),
    pytest.param(_omits("chat_template.jinja"), ("chat_template.jinja", "not listed"), id="omits-template"),
    pytest.param(_unlisted_extra, ("model2.onnx", "not listed"), id="unlisted-file"),
    pytest.param(_external_data_escape, ("external data", "not a file of this artifact"), id="external-data-escape"),
]


def _cli() -> list[str]:
    exe = Path(sys.executable).parent / "qwen-export"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "qwen_export.cli"]


def run_cli(
    *args: object, timeout: float = 120, stdin: bytes | None = None, isolate: bool = False
) -> subprocess.CompletedProcess:
    """The CLI on ``args``: in this process (typer's CliRunner: an uncaught exception becomes a
    traceback on stderr, as the real process would print), or with ``isolate`` in a subprocess of
    the installed ``qwen-export`` within ``timeout`` (for what only a real process shows: argv bytes,
    stdin bytes, and inputs that would block a broken reader forever: FIFOs, devices)."""
    if isolate:
        return subprocess.run(
            [*_cli(), *map(str, args)], capture_output=True, timeout=timeout, input=stdin, env={**os.environ}
        )
    from typer.testing import CliRunner

    from qwen_export.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args], input=stdin, catch_exceptions=True)
    stderr = result.stderr_bytes or b""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        trace = "".join(traceback.format_exception(result.exception))
        stderr += f"Traceback (in-process run)\n{trace}".encode()
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout_bytes, stderr)


def assert_cli_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    stderr = proc.stderr.decode("utf-8", "replace")
    lines = [line for line in (proc.stdout.decode("utf-8", "replace") + stderr).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in stderr, (proc.returncode, lines)
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


@pytest.mark.parametrize(("breakage", "fragments"), FILE_CASES)
@pytest.mark.parametrize("command", ["generate", "inspect"])
def test_hostile_artifact_tree_through_the_cli(
    export, tmp_path: Path, breakage: Callable[[Path, Path], None], fragments: tuple[str, ...], command: str
) -> None:
    art = shutil.copytree(export("qwen2_tied"), tmp_path / "art")
    outside = tmp_path / "outside"
    outside.mkdir()
    breakage(art, outside)
    if command == "inspect" and breakage is _external_data_escape:
        pytest.skip("inspect reads the graph only, never the external data")
    args = ("generate", art, "hi", "--max-new-tokens", "2") if command == "generate" else ("inspect", art)
    blocking = breakage in (_dev_zero_tokenizer, _fifo_template)  # a broken reader would wait forever
    assert_cli_error(run_cli(*args, timeout=60, isolate=blocking), *fragments)


# ------------------------------------------------------------------ the helpers themselves
def test_read_inside_refuses_links_specials_and_escapes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f.txt").write_text("ok")
    (tmp_path / "secret").write_text("secret")
    (root / "link").symlink_to(tmp_path / "secret")
    (root / "dlink").symlink_to(root / "d", target_is_directory=True)
    os.mkfifo(root / "fifo")
    assert read_inside(root, "d/f.txt", 10) == b"ok"
    for rel, message in [
        ("link", "symbolic link"),
        ("dlink/f.txt", "symbolic link"),
        ("fifo", "FIFO"),
        ("d", "directory"),
        ("../secret", "unsafe"),
        ("/etc/passwd", "unsafe"),
        ("d/./f.txt", "unsafe"),
        ("d\\f.txt", "unsafe"),
        ("nope", "missing"),
    ]:
        with pytest.raises(ArtifactError, match=message):
            read_inside(root, rel, 10)
    with pytest.raises(ArtifactError, match="over the 1 byte limit"):
        read_inside(root, "d/f.txt", 1)
    with pytest.raises(ArtifactError, match="symbolic link"):
        scan_tree(root)


def test_scan_tree_lists_regular_files_only(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x").write_text("1")
    (tmp_path / "y").write_text("2")
    assert scan_tree(tmp_path) == ["a/b/x", "y"]
    os.mkfifo(tmp_path / "a" / "pipe")
    with pytest.raises(ArtifactError, match="a/pipe is a FIFO"):
        scan_tree(tmp_path)


def test_checkpoint_reads_follow_links_but_refuse_devices_and_fifos(tmp_path: Path) -> None:
    """Checkpoints (Hugging Face caches link into a blob store) may link; a device or FIFO is refused
    at once (no endless read of /dev/zero, no hang on a FIFO) and reads stop at the limit."""
    (tmp_path / "blob").write_text("{}")
    (tmp_path / "tokenizer.json").symlink_to(tmp_path / "blob")
    assert read_regular(tmp_path / "tokenizer.json", 10, ConfigError) == b"{}"
    assert read_regular(tmp_path / "absent", 10, ConfigError) is None
    with pytest.raises(ConfigError, match="character device"):
        read_regular(Path("/dev/zero"), 1 << 20, ConfigError)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ConfigError, match="FIFO"):
        read_regular(tmp_path / "fifo", 10, ConfigError)
    with pytest.raises(ConfigError, match="limit"):
        read_regular(tmp_path / "blob", 1, ConfigError)


@pytest.mark.parametrize("rel", ["", ".", "a/../b", "a//b", "/abs", "a\\b", "a/\0b", "./a"])
def test_unsafe_relative_paths(rel: str) -> None:
    with pytest.raises(ArtifactError, match="unsafe file path"):
        check_relative(rel, "manifest.json")


def test_checkpoint_tokenizer_dev_zero_is_refused_by_export(qwen2_tied: Path, tmp_path: Path) -> None:
    ckpt = shutil.copytree(qwen2_tied, tmp_path / "ckpt")
    (ckpt / "tokenizer.json").unlink()
    (ckpt / "tokenizer.json").symlink_to("/dev/zero")
    assert_cli_error(
        run_cli("export", ckpt, "-o", tmp_path / "out", timeout=120, isolate=True), "tokenizer.json", "device"
    )
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ manifest fields
def _set(path: str, value: object) -> Callable[[dict], None]:
    def run(data: dict) -> None:
        *parents, last = path.split(".")
        node = data
        for key in parents:
            node = node[key]
        node[last] = value

    return run


MANIFEST_FIELD_CASES = [
    ("spec", "x", "'spec'"),
    ("spec.vocab_size", "151936", "spec.vocab_size"),
    ("spec.vocab_size", 10**40, "spec.vocab_size"),
    ("spec.num_hidden_layers", True, "spec.num_hidden_layers"),
    ("spec.rms_norm_eps", float("nan"), "spec.rms_norm_eps"),
    ("spec.layer_types", ["full_attention"], "spec.layer_types"),
    ("spec.architecture", "llama", "spec.architecture"),
    ("spec.rope_scaling", {"rope_type": "yarn", "factor": "4"}, "spec.rope_scaling.factor"),
    ("spec.rope_scaling", [1], "spec.rope_scaling must be"),
    ("spec.surprise", 1, "unknown fields"),
    ("io", [], "'io'"),
    ("io.inputs", {"input_ids": {"dtype": 3, "shape": []}}, "dtype"),
    ("io.inputs", {"input_ids": {"dtype": "int64", "shape": [-1]}}, "shape"),
    ("io.inputs", {"input_ids": {"dtype": "int64", "shape": "batch"}}, "shape"),
    ("io.sideways", {}, "unknown key"),
    ("dtype", "int3", "dtype"),
    ("dtype", ["fp32"], "dtype"),
    ("logits", None, "logits"),
    ("target", "cuda", "target"),
    ("extra", "x", "'extra'"),
    ("extra.max_length", "256", "extra.max_length"),
    ("extra.max_length", 0, "extra.max_length"),
    ("extra.kv_cache", "shared", "extra.kv_cache must be"),
    ("extra.kv_cache.layout", "paged", "extra.kv_cache.layout"),
    ("extra.kv_cache.capacity", -5, "extra.kv_cache.capacity"),
    ("extra.quantization", {"weights": 4}, "extra.quantization.weights"),
    ("passes", [1, 2], "passes"),
    ("files", {"model.onnx": "abc"}, "sha256"),
    ("packages", {"numpy": 2}, "packages"),
]


@pytest.mark.parametrize(("path", "value", "fragment"), MANIFEST_FIELD_CASES)
def test_manifest_fields_are_validated(export, tmp_path: Path, path: str, value: object, fragment: str) -> None:
    art = shutil.copytree(export("qwen2_tied"), tmp_path / "art")
    data = _manifest(art)
    _set(path, value)(data)
    _write_manifest(art, data)
    with pytest.raises(ArtifactError, match="manifest.json") as info:
        load_manifest(art)
    assert fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("path", "value", "fragment"), MANIFEST_FIELD_CASES[::5])
def test_manifest_fields_through_the_cli(export, tmp_path: Path, path: str, value: object, fragment: str) -> None:
    art = shutil.copytree(export("qwen2_tied"), tmp_path / "art")
    data = _manifest(art)
    _set(path, value)(data)
    _write_manifest(art, data)
    assert_cli_error(run_cli("generate", art, "hi", "--max-new-tokens", "1", timeout=60), fragment)


@pytest.mark.parametrize("name", ["openvino_model.bin", "openvino_model.xml"])
def test_openvino_weights_linking_out_are_refused(export, tmp_path: Path, name: str) -> None:
    """OpenVINO opens ``openvino_model.bin`` itself, next to the XML: it must never be handed a link."""
    art = shutil.copytree(export("qwen2_tied", target="openvino"), tmp_path / "art")
    outside = tmp_path / "outside"
    outside.mkdir()
    _link_out(name)(art, outside)
    with pytest.raises(ArtifactError, match=f"{name} is a symbolic link"):
        load_manifest(art)
    assert_cli_error(run_cli("generate", art, "hi", "--max-new-tokens", "1", timeout=120), name, "symbolic link")
