"""Bounding what a hostile ``tokenizer.json`` can cost (torch-free).

The ``tokenizers`` library runs pre-tokenizer and normalizer regexes on Oniguruma, a backtracking
engine: a pattern such as ``(a+)+b`` takes exponential time, and when Oniguruma's retry limit stops
it the Rust side panics (``PanicException``, a ``BaseException``, plus a backtrace on stderr). Three
layers keep that from reaching users:

1. :func:`check_patterns` refuses, when the file is loaded, every regex whose matching can blow up
   on a backtracking engine: a quantified group that contains an unbounded quantifier (star height
   above one, ``(a+)+``, ``(\\s*x?)*``) or an alternation (``(a|a)*``), and backreferences. The
   patterns of real tokenizers (GPT-2, Qwen, Llama 3) have none of these.
2. :func:`probe_cost` then times the tokenizer on adversarial inputs (runs of one character class,
   alternations of two) with stderr silenced; one that panics or is slow is refused.
3. At run time :meth:`Tokenizer.encode` refuses a text too long to fit the context before
   tokenizing it (a token covers at most :func:`max_token_chars` characters), and turns a panic
   into one line.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from qwen_export.errors import ConfigError

__all__ = ["check_patterns", "probe_cost", "max_token_chars", "PROBE_SECONDS", "rust_failure"]

PROBE_SECONDS = 5.0  # CPU seconds for all probes together; a real tokenizer needs under 0.1 s
_PROBE_CHARS = 4096
_PROBES = ("a", " ", "1", "\n", "a ", "a1", "!", "\u00e9", "\u4e2d", "'s", "a!", " \n", "\t", "\u200b")


def _patterns(node: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """Every ``{"Regex": ...}`` pattern in a tokenizer.json tree, with where it is."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "Regex" and isinstance(value, str):
                yield where or "pattern", value
            else:
                yield from _patterns(value, f"{where}.{key}" if where else key)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _patterns(value, f"{where}[{i}]")


def _problem(pattern: str) -> str | None:
    """Why ``pattern`` can backtrack catastrophically, or None. A small scanner: escapes, classes
    and groups are tracked; each group records whether it holds an unbounded quantifier or ``|``."""
    stack: list[dict[str, bool]] = [{"unbounded": False, "alternation": False}]
    i, n = 0, len(pattern)
    last_group: dict[str, bool] | None = None
    while i < n:
        c = pattern[i]
        closed: dict[str, bool] | None = None
        if c == "\\":
            if i + 1 < n and (pattern[i + 1].isdigit() and pattern[i + 1] != "0" or pattern[i + 1] == "k"):
                return "a backreference"
            i += 2 if i + 1 < n and pattern[i + 1] not in "pPx" else _escape_end(pattern, i)
            last_group = None
            continue
        if c == "[":
            i = _class_end(pattern, i)
            last_group = None
            continue
        if c == "(":
            stack.append({"unbounded": False, "alternation": False})
            i += 1
            if pattern.startswith("?", i) and not pattern.startswith("?:", i) and not pattern.startswith("?i", i):
                i += 1  # lookaround and the like: their content is scanned as a group
            continue
        if c == ")":
            closed = stack.pop() if len(stack) > 1 else {"unbounded": False, "alternation": False}
            i += 1
        elif c == "|":
            stack[-1]["alternation"] = True
            i += 1
        elif c in "*+" or c == "{" and _repeat_end(pattern, i) is not None:
            end = i + 1 if c in "*+" else _repeat_end(pattern, i) or i + 1
            unbounded = c in "*+" or "," in pattern[i:end] and pattern[end - 2] == ","
            repeats = c in "*+" or _max_repeat(pattern[i:end]) > 1
            if last_group is not None and repeats:
                if last_group["unbounded"]:
                    return "a repeated group that itself repeats without bound (nested quantifiers)"
                if last_group["alternation"]:
                    return "a repeated group of alternatives"
            if unbounded:
                stack[-1]["unbounded"] = True
            i = end
            if i < n and pattern[i] in "?+":  # lazy or possessive
                i += 1
            last_group = None
            continue
        else:
            i += 1
        if closed is not None:
            stack[-1]["unbounded"] |= closed["unbounded"]
            last_group = closed
        else:
            last_group = None
    return None


def _escape_end(pattern: str, i: int) -> int:
    """``\\p{L}``, ``\\x{41}``: skip the braces."""
    j = i + 2
    if j < len(pattern) and pattern[j] == "{":
        close = pattern.find("}", j)
        return (close + 1 if close != -1 else len(pattern)) - i
    return 2


def _class_end(pattern: str, i: int) -> int:
    j = i + 1
    if j < len(pattern) and pattern[j] == "^":
        j += 1
    if j < len(pattern) and pattern[j] == "]":
        j += 1
    depth = 1
    while j < len(pattern) and depth:
        if pattern[j] == "\\":
            j += 2
            continue
        if pattern[j] == "[":
            depth += 1
        elif pattern[j] == "]":
            depth -= 1
        j += 1
    return j


def _repeat_end(pattern: str, i: int) -> int | None:
    close = pattern.find("}", i)
    body = pattern[i + 1 : close] if close != -1 else ""
    if body and all(ch.isdigit() or ch == "," for ch in body) and body[0] != ",":
        return close + 1
    return None


def _max_repeat(quantifier: str) -> int:
    body = quantifier.strip("{}")
    high = body.split(",")[-1]
    return int(high) if high.isdigit() else 1 << 30


def check_patterns(data: Any, source: str) -> None:
    """ConfigError naming the first regex of a parsed tokenizer.json that can backtrack without bound
    (the parts that hold regexes: normalizer, pre-tokenizer, post-processor, decoder)."""
    parts = {k: v for k, v in data.items() if k != "model" and k != "added_tokens"} if isinstance(data, dict) else data
    for where, pattern in _patterns(parts):
        problem = _problem(pattern)
        if problem is not None:
            shown = pattern if len(pattern) <= 60 else pattern[:57] + "..."
            raise ConfigError(
                f"{source}: the regex {shown!r} at {where} has {problem}, which can take exponential time; "
                "use the checkpoint's original tokenizer.json"
            )


def rust_failure(exc: BaseException) -> bool:
    """True for the ``tokenizers`` library's Rust panics (``pyo3_runtime.PanicException``)."""
    return type(exc).__name__ == "PanicException" or type(exc).__module__ == "pyo3_runtime"


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Rust panics print to file descriptor 2 before Python sees them: silence it for the probe."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _literals(data: Any) -> str:
    """Characters the patterns require literally: a run of one class followed by a blocker and these
    is the near-miss that makes polynomial patterns such as ``\\s*\\s*\\s*x`` backtrack."""
    found: dict[str, None] = {}
    for _, pattern in _patterns(data):
        i = 0
        while i < len(pattern) and len(found) < 32:
            if pattern[i] == "\\":
                i += 2
                continue
            if pattern[i] not in "()[]{}|*+?.^$-,:=!<>" and not pattern[i].isspace():
                found[pattern[i]] = None
            i += 1
    return "".join(found)


def probe_cost(encode: Any, source: str, data: Any = None) -> None:
    """Time ``encode`` on adversarial texts; ConfigError when it panics or needs over PROBE_SECONDS of
    this thread's CPU time (CPU, not wall-clock, time: a busy machine does not make a tokenizer fail)."""
    started = time.thread_time()
    parts = {k: v for k, v in data.items() if k not in ("model", "added_tokens")} if isinstance(data, dict) else {}
    tails = ("", "\x01", "\x01" + _literals(parts))
    with _stderr_silenced():
        for unit, tail in ((u, t) for u in _PROBES for t in tails):
            text = unit * (_PROBE_CHARS // len(unit)) + tail
            try:
                encode(text)
            except BaseException as exc:
                if isinstance(exc, (KeyboardInterrupt, SystemExit)) or not rust_failure(exc):
                    raise
                raise ConfigError(
                    f"{source}: the tokenizer fails on a {len(text)}-character input ({str(exc)[:80]}); "
                    "its pre-tokenizer regex is pathological: use the checkpoint's original tokenizer.json"
                ) from None
            if time.thread_time() - started > PROBE_SECONDS:
                raise ConfigError(
                    f"{source}: the tokenizer needs over {PROBE_SECONDS:g} CPU s for {_PROBE_CHARS}-character inputs; "
                    "its pre-tokenizer regex is pathological: use the checkpoint's original tokenizer.json"
                )


def max_token_chars(vocab: dict[str, int]) -> int:
    """The longest token string: no token covers more characters of a text (byte-level BPE maps each
    byte to one character, and a character is at least one byte)."""
    return max((len(token) for token in vocab), default=1) or 1
