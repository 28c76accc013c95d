"""Class 6 of issue 20: no data loss and no atomicity window when artifacts are written.

- ``--overwrite`` never deletes an input that lies inside the output;
- a writer killed with SIGKILL leaves a temporary directory that the next writer removes;
- replacing an artifact has no moment without an artifact (an exchange rename; where the OS lacks
  one, a swap interrupted between its two renames is undone by the next writer);
- two writers to one path without ``--overwrite``: one wins, the other gets a one-line error.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from qwen_export import atomic_dir
from qwen_export.artifact import MANIFEST_NAME, load_manifest, write_artifact
from qwen_export.errors import ArtifactError
from qwen_export.spec import ModelSpec

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and flock")

SPEC = ModelSpec.from_config(
    {
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "vocab_size": 100,
    }
).to_dict()
FIELDS = {"target": "onnxruntime", "dtype": "fp32", "logits": "last", "spec": SPEC}


def _write(out: Path, content: str, overwrite: bool = False, hold: threading.Barrier | None = None) -> None:
    with write_artifact(out, overwrite=overwrite) as w:
        (w.path / "model.onnx").write_text(content)
        w.manifest_fields.update(FIELDS)
        if hold is not None:
            hold.wait(10)


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


# ---------------------------------------------------------------- inputs inside the output
def test_overwrite_refuses_an_output_that_holds_an_input(tmp_path: Path) -> None:
    out = tmp_path / "art"
    _write(out, "old")
    ckpt = out / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    with pytest.raises(ArtifactError, match="is inside .*would delete it"):
        with write_artifact(out, overwrite=True, keep=[ckpt]):
            pass
    assert (ckpt / "config.json").is_file()


def test_cli_export_overwrite_never_deletes_the_checkpoint(qwen2_tied: Path, tmp_path: Path) -> None:
    from test_artifact_files import assert_cli_error, run_cli

    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST_NAME).write_text("{}")  # looks like an artifact, so --overwrite would replace it
    ckpt = shutil.copytree(qwen2_tied, out / "ckpt")
    assert_cli_error(run_cli("export", ckpt, "-o", out, "--overwrite", timeout=120), "inside", "choose another output")
    assert (ckpt / "config.json").is_file() and (ckpt / "model.safetensors").is_file()


# ---------------------------------------------------------------- SIGKILL mid-write
_KILLED_WRITER = """
import sys, time
from qwen_export.artifact import write_artifact
with write_artifact(sys.argv[1]) as w:
    (w.path / "model.onnx").write_text("partial")
    print("ready", flush=True)
    time.sleep(120)
"""


def test_sigkill_leftovers_are_cleaned_by_the_next_writer(tmp_path: Path) -> None:
    out = tmp_path / "art"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        live = _siblings(out)
        assert len(live) == 1 and ".tmp-" in live[0]
        assert atomic_dir.clean_stale(out) == []  # its writer is alive: left alone
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _siblings(out) == live  # SIGKILL ran no cleanup
    _write(out, "whole")
    assert _siblings(out) == [] and (out / "model.onnx").read_text() == "whole"


# ---------------------------------------------------------------- no window without an artifact
def test_overwrite_always_leaves_an_artifact_in_place(tmp_path: Path) -> None:
    out = tmp_path / "art"
    _write(out, "v0")
    stop, missing = threading.Event(), []

    def watch() -> None:
        while not stop.is_set():
            if not (out / MANIFEST_NAME).is_file():
                missing.append(1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for i in range(30):
            _write(out, f"v{i + 1}", overwrite=True)
    finally:
        stop.set()
        watcher.join()
    assert missing == [] and (out / "model.onnx").read_text() == "v30"
    assert _siblings(out) == []


def test_interrupted_two_rename_swap_is_undone_by_the_next_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without renameat2 (other OSes), a kill between the two renames leaves the old artifact under
    a ``.old-`` name; the next writer puts it back before anything else."""
    out = tmp_path / "art"
    _write(out, "old")
    monkeypatch.setattr(atomic_dir, "renameat2", lambda *args: False)
    real_rename, calls = os.rename, []

    def rename_then_die(src, dst):  # the process "dies" right after the first rename
        calls.append(dst)
        real_rename(src, dst)
        if len(calls) == 1:
            raise SystemExit("killed")

    monkeypatch.setattr(atomic_dir.os, "rename", rename_then_die)
    monkeypatch.setattr(atomic_dir, "release_temp_dir", lambda tmp: None)  # a killed process cleans nothing
    with pytest.raises(SystemExit):
        _write(out, "new", overwrite=True)
    monkeypatch.undo()
    assert not out.exists() and any(".old-" in name for name in _siblings(out))
    for fd in atomic_dir._held.values():  # the "dead" writer's locks go with it
        os.close(fd)
    atomic_dir._held.clear()
    atomic_dir.clean_stale(out)
    assert (out / "model.onnx").read_text() == "old"
    load_manifest(out)
    assert _siblings(out) == []


# ---------------------------------------------------------------- concurrent writers
def test_concurrent_writers_without_overwrite_one_wins(tmp_path: Path) -> None:
    out = tmp_path / "art"
    barrier = threading.Barrier(2)
    errors: dict[str, BaseException] = {}

    def writer(name: str) -> None:
        try:
            _write(out, name, hold=barrier)
        except BaseException as exc:  # noqa: BLE001 - checked below
            errors[name] = exc

    threads = [threading.Thread(target=writer, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(errors) == 1, errors
    loser, error = next(iter(errors.items()))
    assert isinstance(error, ArtifactError) and "exists" in str(error) and "--overwrite" in str(error)
    winner = "b" if loser == "a" else "a"
    assert (out / "model.onnx").read_text() == winner
    assert json.loads((out / MANIFEST_NAME).read_text())["target"] == "onnxruntime"
    assert _siblings(out) == []


@pytest.mark.skipif(atomic_dir._renameat2 is None, reason="no renameat2 in this libc")
def test_renameat2_flags(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (a / "x").write_text("a")
    b.mkdir()
    (b / "x").write_text("b")
    with pytest.raises(FileExistsError):
        atomic_dir.renameat2(a, b, atomic_dir.RENAME_NOREPLACE)
    assert atomic_dir.renameat2(a, b, atomic_dir.RENAME_EXCHANGE)
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


# ---------------------------------------------------------------- output paths checked first
def test_output_under_a_regular_file_or_unwritable_place_fails_before_any_work(
    qwen2_tied: Path, tmp_path: Path
) -> None:
    from test_artifact_files import assert_cli_error, run_cli

    (tmp_path / "file").write_text("x")
    for out, fragment in [(tmp_path / "file" / "out", "not a directory"), (Path("/proc/qwen/out"), "cannot write")]:
        proc = run_cli("export", qwen2_tied, "-o", out, timeout=60)
        assert_cli_error(proc, fragment)
        assert b"trace" not in proc.stdout.lower()  # refused before tracing


def test_sigkill_during_a_cli_export_is_cleaned_by_the_next_export(qwen2_tied: Path, tmp_path: Path) -> None:
    """The real scenario: ``qwen-export export`` killed with SIGKILL while writing, then run again."""
    import time

    from test_artifact_files import run_cli
    from test_hostile_inputs import _SLOW_WRITER, _temp_dirs

    parent = tmp_path / "outs"
    out = parent / "art"
    script = tmp_path / "slow_export.py"
    script.write_text(_SLOW_WRITER)
    proc = subprocess.Popen(
        [sys.executable, str(script), "export", str(qwen2_tied), "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while not any((d / "model.onnx.data").is_file() for d in _temp_dirs(parent, out.name)):
            assert proc.poll() is None and time.monotonic() < deadline, "the export never reached writing"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(_temp_dirs(parent, out.name)) == 1 and not out.exists()
    done = run_cli("export", qwen2_tied, "-o", out, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _temp_dirs(parent, out.name) == [] and sorted(p.name for p in parent.iterdir()) == ["art"]
    load_manifest(out)


def test_a_new_temp_dir_is_never_cleaned_as_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer's temporary directory between its mkdir and its lock is not taken for a dead writer's
    by another writer's clean-up (the race behind a flaky concurrent-writers run): both run under
    the parent's lock."""
    out = tmp_path / "art"
    made, cleaned = threading.Event(), threading.Event()
    real = atomic_dir._try_lock

    def slow_lock(fd: int) -> bool:
        if threading.current_thread().name == "maker":  # made, not locked yet: let a clean-up try now
            made.set()
            cleaned.wait(1.0)
        return real(fd)

    monkeypatch.setattr(atomic_dir, "_try_lock", slow_lock)
    result: dict[str, Path] = {}
    maker = threading.Thread(target=lambda: result.setdefault("tmp", atomic_dir.make_temp_dir(out)), name="maker")
    maker.start()
    assert made.wait(5)
    removed = atomic_dir.clean_stale(out)  # waits for the parent's lock until the maker holds its own
    cleaned.set()
    maker.join(5)
    assert removed == [] and result["tmp"].is_dir()
    atomic_dir.release_temp_dir(result["tmp"])
