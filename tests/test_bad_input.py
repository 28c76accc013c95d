"""Class 5 of issue 20: bad input is one ``error:`` line with exit status 2, never a traceback.

Through the CLI (the installed one in a subprocess where real argv bytes, stdin bytes or a blocking
file matter; in-process otherwise), and through the library.
Manifest fields are in tests/test_artifact_files.py; output paths in tests/test_atomic_output.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from test_artifact_files import _rehash, assert_cli_error, run_cli

import qwen_export
from qwen_export.errors import ArtifactError, OptionError
from qwen_export.runtime.jsonsafe import MAX_JSON_DEPTH, check_json, check_text, load_json_text
from qwen_export.runtime.llm import check_threads


@pytest.fixture(scope="module")
def art(export) -> Path:
    return export("qwen2_tied")


# ------------------------------------------------------------------ command line and stdin
@pytest.mark.parametrize("raw", [False, True])
def test_non_utf8_prompt_on_the_command_line(art: Path, raw: bool) -> None:
    args = [os.fsencode(art), b"caf\xe9 \xff", b"--max-new-tokens", b"1"] + ([b"--raw"] if raw else [])
    assert_cli_error(run_cli("generate", *[os.fsdecode(a) for a in args], timeout=60, isolate=True), "not valid UTF-8")


def test_non_utf8_system_prompt(art: Path) -> None:
    proc = run_cli(
        "generate", art, "hi", "--system", os.fsdecode(b"\xc3\x28"), "--max-new-tokens", "1", timeout=60, isolate=True
    )
    assert_cli_error(proc, "not valid UTF-8")


@pytest.mark.parametrize("encoding", ["utf-8:strict", "utf-8:surrogateescape"])
def test_non_utf8_chat_stdin(art: Path, encoding: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONIOENCODING", encoding)
    proc = run_cli("chat", art, "--max-new-tokens", "1", stdin=b"hello \xff\xfe\n", timeout=60, isolate=True)
    assert_cli_error(proc, "UTF-8")


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (_deep(100_000), "nests deeper"),
        (_deep(MAX_JSON_DEPTH + 5), "nests deeper"),
        ('{"type": "integer", "maximum": ' + "9" * 5000 + "}", "4300 digits"),
        ('{"type": "integer", "maximum": ' + "9" * 200 + "}", "integer of"),
        ('{"type": "number", "maximum": NaN}', "NaN"),
        (b'{"type": "string", "pattern": "\xff"}', "not UTF-8"),
        ("{", "not valid JSON"),
    ],
)
@pytest.mark.parametrize("flag", ["--json-schema", "--tools"])
def test_hostile_json_files(art: Path, tmp_path: Path, content: str | bytes, fragment: str, flag: str) -> None:
    path = tmp_path / "input.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    if flag == "--tools" and fragment not in ("nests deeper", "4300 digits"):
        load_json_text_or_error = pytest.raises(OptionError, match=fragment.replace("(", r"\("))
        with load_json_text_or_error:
            from qwen_export.cli.common import read_json

            read_json(path, "tools")
        return
    if flag == "--tools":
        proc = run_cli("chat", art, "--tools", path, stdin=b"", timeout=60)
    else:
        proc = run_cli("generate", art, "hi", "--json-schema", path, "--max-new-tokens", "1", timeout=60)
    assert_cli_error(proc, fragment)


def test_json_file_that_is_a_fifo_or_device(art: Path, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.json")
    for path in (tmp_path / "fifo.json", Path("/dev/zero")):
        proc = run_cli("generate", art, "hi", "--json-schema", path, "--max-new-tokens", "1", timeout=30, isolate=True)
        assert_cli_error(proc, "not a regular file")


@pytest.mark.parametrize("threads", ["100000", "-1", str(4 * (os.cpu_count() or 1) + 9)])
def test_threads_far_past_the_core_count(art: Path, threads: str) -> None:
    # in a subprocess: a broken check would start that many threads
    assert_cli_error(run_cli("generate", art, "hi", "--threads", threads, timeout=60, isolate=True), "threads must be")


# ------------------------------------------------------------------ generation_config.json
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", "hot"),
        ("top_k", "5"),
        ("top_k", 1.5),
        ("top_p", [1]),
        ("repetition_penalty", {"x": 1}),
        ("do_sample", "yes"),
        ("eos_token_id", "x"),
        ("eos_token_id", [1, "2"]),
        ("temperature", 1e400),
    ],
)
def test_non_numeric_generation_config(art: Path, tmp_path: Path, field: str, value: object) -> None:
    copy = shutil.copytree(art, tmp_path / "art")
    path = copy / "generation_config.json"
    data = json.loads(path.read_text())
    data[field] = value
    path.write_text(json.dumps(data))
    _rehash(copy)
    with pytest.raises(ArtifactError, match=field):
        qwen_export.load(copy)
    if value in ("hot", "x"):  # and through the CLI (a subprocess each: two are enough)
        assert_cli_error(run_cli("generate", copy, "hi", "--max-new-tokens", "1", timeout=60), field)


# ------------------------------------------------------------------ the helpers and the library
def test_check_text_and_json_helpers() -> None:
    check_text("héllo 中", "x")
    with pytest.raises(OptionError, match="character 2"):
        check_text("ab\udcff", "x")
    check_json({"a": [1, 2.5, None, True, "s"]}, "x")
    for bad, fragment in [
        ([[[[]]]] * 1, None),
        (json.loads(_deep(MAX_JSON_DEPTH + 1)), "nests deeper"),
        ({"k": 2**300}, "integer"),
        ({"k": float("inf")}, "non-finite"),
        ({"\udcff": 1}, "UTF-8"),
    ]:
        if fragment is None:
            check_json(bad, "x")
            continue
        with pytest.raises(OptionError, match=fragment):
            check_json(bad, "x")
    with pytest.raises(OptionError, match="Infinity"):
        load_json_text("[Infinity]", "x")


def test_check_threads() -> None:
    check_threads(0)
    check_threads(os.cpu_count() or 1)
    for bad in (-1, True, 1.5, "2", 10**9):
        with pytest.raises(OptionError, match="threads must be"):
            check_threads(bad)


def test_library_refuses_deep_structures_and_bad_text(art: Path) -> None:
    llm = qwen_export.load(art)
    deep: dict = {}
    node = deep
    for _ in range(5000):
        node["items"] = {}
        node = node["items"]
    with pytest.raises(OptionError, match="nests deeper"):
        llm.chat(
            [{"role": "user", "content": "hi"}],
            response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": deep}},
        )
    tool = {"type": "function", "function": {"name": "f", "parameters": deep}}
    with pytest.raises(OptionError, match="nests deeper"):
        llm.chat([{"role": "user", "content": "hi"}], tools=[tool])
    with pytest.raises(OptionError, match="not valid UTF-8"):
        llm.generate("x\udcff", max_new_tokens=1)
