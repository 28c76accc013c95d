"""Artifact directories: atomic write, cleanup on failure, overwrite rules, manifest verification."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_export import __version__
from qwen_export.artifact import (
    MANIFEST_NAME,
    MANIFEST_SCHEMA_VERSION,
    Manifest,
    Terminated,
    check_output_dir,
    load_manifest,
    sha256_file,
    write_artifact,
)
from qwen_export.errors import ArtifactError
from qwen_export.spec import ModelSpec

FIELDS = {
    "target": "onnxruntime",
    "dtype": "fp32",
    "logits": "last",
    "spec": ModelSpec.from_config(
        {
            "architectures": ["Qwen2ForCausalLM"],
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "vocab_size": 100,
        }
    ).to_dict(),
    "io": {"inputs": {"input_ids": {"dtype": "int64", "shape": ["batch", "seq"]}}, "outputs": {}},
    "passes": [{"name": "fuse", "changed": 3}],
    "extra": {"note": "test"},
}


def _export(out: Path, overwrite: bool = False, content: str = "weights") -> Manifest:
    with write_artifact(out, overwrite=overwrite) as w:
        (w.path / "model.onnx").write_text(content)
        (w.path / "sub").mkdir()
        (w.path / "sub" / "data.bin").write_bytes(os.urandom(3 << 20))  # > one hash chunk
        w.manifest_fields.update(FIELDS)
    assert w.manifest is not None and w.path == out
    return w.manifest


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_atomic_write_and_load(tmp_path: Path) -> None:
    out = tmp_path / "art"
    with write_artifact(out) as w:
        assert w.path.parent == tmp_path and w.path.name.startswith(".art.tmp-")
        (w.path / "model.onnx").write_text("x")
        w.manifest_fields.update(FIELDS)
        assert not out.exists()
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx"]
    assert _leftovers(tmp_path) == []
    m = load_manifest(out)
    assert m == w.manifest
    assert m.files == {"model.onnx": sha256_file(out / "model.onnx")}
    assert m.schema_version == MANIFEST_SCHEMA_VERSION and m.qwen_export_version == __version__
    assert m.target == "onnxruntime" and m.io == FIELDS["io"] and m.passes == FIELDS["passes"]
    assert "numpy" in m.packages and m.created.endswith("+00:00")
    assert Manifest.from_json(m.to_json()) == m


def test_nested_files_hashed(tmp_path: Path) -> None:
    m = _export(tmp_path / "art")
    assert set(m.files) == {"model.onnx", "sub/data.bin"}
    assert m.files["sub/data.bin"] == sha256_file(tmp_path / "art" / "sub" / "data.bin")


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_exception_leaves_nothing(tmp_path: Path, exc: type[BaseException]) -> None:
    with pytest.raises(exc):
        with write_artifact(tmp_path / "art") as w:
            (w.path / "model.onnx").write_text("partial")
            raise exc()
    assert list(tmp_path.iterdir()) == []


_SIGTERM_CHILD = """
import signal, sys, time
from pathlib import Path
from qwen_export.artifact import Terminated, write_artifact
out = Path(sys.argv[1])
before = signal.getsignal(signal.SIGTERM)
try:
    with write_artifact(out / "art") as w:
        (w.path / "model.onnx").write_text("partial")
        signal.raise_signal(signal.SIGTERM)
        time.sleep(5)  # interrupted by the handler
    print("not interrupted")
except Terminated:
    print("terminated", sorted(p.name for p in out.iterdir()), signal.getsignal(signal.SIGTERM) == before)
"""


def test_sigterm_cleans_up_and_restores_handler(tmp_path: Path) -> None:
    """In a process of its own, as the CLI runs: a SIGTERM inside the block raises Terminated, leaves
    nothing behind and restores the handler. (In a pytest-xdist worker late in the full suite the
    signal once killed the worker instead, which xdist then waited on forever.)"""
    proc = subprocess.run(
        [sys.executable, "-c", _SIGTERM_CHILD, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "terminated [] True", (
        proc.returncode,
        proc.stdout,
        proc.stderr,
    )
    assert issubclass(Terminated, KeyboardInterrupt)


def test_unknown_manifest_field_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="unknown manifest field"):
        with write_artifact(tmp_path / "art") as w:
            w.manifest_fields.update(FIELDS, files={})
    assert list(tmp_path.iterdir()) == []


def test_existing_without_overwrite_fails_before_work(tmp_path: Path) -> None:
    out = tmp_path / "art"
    out.mkdir()
    with pytest.raises(ArtifactError, match=r"art exists; pass --overwrite to replace it"):
        check_output_dir(out, overwrite=False)
    ran = False
    with pytest.raises(ArtifactError, match="--overwrite"):
        with write_artifact(out):
            ran = True
    assert not ran
    assert _leftovers(tmp_path) == []
    check_output_dir(tmp_path / "new", overwrite=False)  # absent is fine


def test_overwrite_replaces(tmp_path: Path) -> None:
    out = tmp_path / "art"
    _export(out, content="old")
    (out / "stale.txt").write_text("from the old export")
    _export(out, overwrite=True, content="new")
    assert (out / "model.onnx").read_text() == "new"
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    load_manifest(out)


def test_failed_overwrite_keeps_old(tmp_path: Path) -> None:
    out = tmp_path / "art"
    _export(out, content="old")
    with pytest.raises(RuntimeError):
        with write_artifact(out, overwrite=True) as w:
            (w.path / "model.onnx").write_text("new")
            raise RuntimeError("boom")
    assert (out / "model.onnx").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_overwrite_refuses_unrelated_directory(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("precious")
    with pytest.raises(ArtifactError, match="not a qwen-export artifact"):
        check_output_dir(home, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="not a directory"):
        check_output_dir(tmp_path / "file", overwrite=True)
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", overwrite=True)


def test_tamper_detected(tmp_path: Path) -> None:
    out = tmp_path / "art"
    _export(out)
    (out / "sub" / "data.bin").write_bytes(b"changed")
    with pytest.raises(ArtifactError, match=r"sub/data\.bin was modified after export \(sha256 mismatch\)"):
        load_manifest(out)
    load_manifest(out, verify=False)  # hashing skipped on request


def test_missing_file(tmp_path: Path) -> None:
    out = tmp_path / "art"
    _export(out)
    (out / "model.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"model\.onnx is missing \(listed in manifest\.json\)"):
        load_manifest(out, verify=False)


def test_unlisted_files_are_refused_except_built_engines(tmp_path: Path) -> None:
    """An engine could pick up a file the manifest does not hash (a second .onnx, an OpenVINO
    cache blob): only the locally built ``engines/`` directory may hold unlisted files."""
    out = tmp_path / "art"
    _export(out)
    (out / "engines").mkdir()
    (out / "engines" / "gpu.plan").write_text("built by build-engine later")
    load_manifest(out)
    (out / "engine.cache").write_text("written later")
    with pytest.raises(ArtifactError, match=r"engine\.cache is not listed in manifest\.json"):
        load_manifest(out)


def test_newer_schema(tmp_path: Path) -> None:
    out = tmp_path / "art"
    _export(out)
    data = json.loads((out / MANIFEST_NAME).read_text())
    data["schema_version"] = MANIFEST_SCHEMA_VERSION + 1
    (out / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"written by a newer qwen-export \(schema 2 > 1\); upgrade"):
        load_manifest(out)


def test_bad_manifests(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="artifact directory not found"):
        load_manifest(tmp_path / "absent")
    out = tmp_path / "art"
    out.mkdir()
    with pytest.raises(ArtifactError, match="has no manifest.json"):
        load_manifest(out)
    (out / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ArtifactError, match=r"is not valid JSON \(line 1 column 2"):
        load_manifest(out)
    (out / MANIFEST_NAME).write_text(json.dumps({"schema_version": 1, "target": "onnxruntime"}))
    with pytest.raises(ArtifactError, match="field 'dtype' is missing"):
        load_manifest(out)
    good = json.loads(Manifest(**FIELDS, files={"../etc/passwd": "0" * 64}).to_json())
    (out / MANIFEST_NAME).write_text(json.dumps(good))
    with pytest.raises(ArtifactError, match="unsafe file path"):
        load_manifest(out)
