"""Class 3 of issue 20: a tokenizer file with a catastrophic-backtracking regex is one error line,
and tokenization cost is bounded before the length checks run."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from test_artifact_files import _rehash, assert_cli_error, run_cli

import qwen_export
from qwen_export.errors import ConfigError, GenerationError
from qwen_export.runtime.tokenizer import Tokenizer
from qwen_export.runtime.tokenizer_guard import _problem

SAFE = [
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
    r"\p{N}{1,3}",
    r"(ab){2,}",
    r"[(]+x",
    r"(a)*",
]
PATHOLOGICAL = [r"(a+)+b", r"(a|a)*c", r"(\s*x?)*y", r"(?:\p{L}+){2}", r"(?=a+)+", r"(a)\1", r"(?:a|b)+$"]


@pytest.mark.parametrize("pattern", SAFE)
def test_patterns_of_real_tokenizers_pass(pattern: str) -> None:
    assert _problem(pattern) is None


@pytest.mark.parametrize("pattern", PATHOLOGICAL)
def test_pathological_patterns_are_found(pattern: str) -> None:
    assert _problem(pattern) is not None


def _tokenizer_dir(src: Path, dst: Path, pattern: str | None = None, where: str = "pre_tokenizer") -> Path:
    dst.mkdir()
    shutil.copy(src / "tokenizer_config.json", dst)
    data = json.loads((src / "tokenizer.json").read_text())
    if pattern is not None:
        if where == "pre_tokenizer":
            data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = pattern
        else:
            data["normalizer"] = {"type": "Replace", "pattern": {"Regex": pattern}, "content": "-"}
    (dst / "tokenizer.json").write_text(json.dumps(data))
    return dst


@pytest.mark.parametrize(
    ("pattern", "where", "fragment"),
    [
        (r"(a+)+b", "pre_tokenizer", "nested quantifiers"),
        (r"(?:\s|\s)+x", "pre_tokenizer", "repeated group of alternatives"),
        (r"(a+)+b", "normalizer", "nested quantifiers"),
        (r"\s*\s*\s*\s*x", "pre_tokenizer", "pathological"),  # polynomial: passes the scan, caught by the probe
        (r"\s+\s+\s+\s+\s+x", "pre_tokenizer", "pathological"),
    ],
)
def test_hostile_tokenizer_regex_is_one_line(
    export, tmp_path: Path, capfd: pytest.CaptureFixture[str], pattern: str, where: str, fragment: str
) -> None:
    directory = _tokenizer_dir(export("qwen2_tied"), tmp_path / "tok", pattern, where)
    started = time.monotonic()
    with pytest.raises(ConfigError, match=fragment) as info:
        Tokenizer.from_dir(directory)
    assert "\n" not in str(info.value) and time.monotonic() - started < 10
    assert "panicked" not in capfd.readouterr().err  # the probe's Rust panic stays off the terminal


def test_hostile_tokenizer_through_the_cli(export, tmp_path: Path) -> None:
    art = shutil.copytree(export("qwen2_tied"), tmp_path / "art")
    data = json.loads((art / "tokenizer.json").read_text())
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s*\s*\s*\s*x"
    (art / "tokenizer.json").write_text(json.dumps(data))
    _rehash(art)
    proc = run_cli("generate", art, "   x", "--max-new-tokens", "1", timeout=60)
    assert_cli_error(proc, "tokenizer.json", "pathological")
    assert b"panicked" not in proc.stderr and b"PanicException" not in proc.stderr


class _NoEncode:
    """Stands in for the Rust tokenizer: any encode is a test failure."""

    def __init__(self, real) -> None:
        self.real = real

    def encode(self, *args, **kwargs):
        raise AssertionError("tokenized a text that could not fit the context")

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_text_too_long_for_the_context_is_refused_before_tokenizing(export) -> None:
    llm = qwen_export.load(export("qwen2_tied"))
    limit = llm.max_context * llm.tokenizer.max_token_chars
    llm.tokenizer._backend = _NoEncode(llm.tokenizer._backend)
    with pytest.raises(GenerationError, match="shorten it"):
        llm.generate("a" * (limit + 1), max_new_tokens=1)
    with pytest.raises(GenerationError, match="shorten it"):
        llm.chat([{"role": "user", "content": "a" * (limit + 1)}], max_new_tokens=1)


class PanicException(BaseException):  # the name pyo3 gives Rust panics
    pass


class _Panics:
    def __init__(self, real) -> None:
        self.real = real

    def encode(self, *args, **kwargs):
        raise PanicException("Onig: Regex search error: retry-limit-in-match over")

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_a_panic_while_encoding_is_one_line(export) -> None:
    tokenizer = Tokenizer.from_dir(export("qwen2_tied"))
    tokenizer._backend = _Panics(tokenizer._backend)
    with pytest.raises(ConfigError, match="the tokenizer failed on this text: Onig"):
        tokenizer.encode("hello")
