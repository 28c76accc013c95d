"""Steering a constrained JSON document to a short valid closing when the token budget runs out.

A constrained generation that reaches ``max_new_tokens`` (or the context) mid-document returns a
prefix that does not parse. Near the end of the budget, :class:`Closer` plans a closing path from the
grammar state: it simulates, on a copy of the matcher, the tokens that finish the document soonest
(forced tokens first; otherwise what the JSON position calls for: ``"`` inside a string, ``:`` after a
key, ``0`` for a value, ``}`` / ``]`` after one; otherwise the allowed token of lowest id, a short
ASCII piece in byte-level vocabularies). When that path needs about every token left, generation
follows it instead of sampling. The path is short, not provably shortest: it is a greedy plan, and
a document that cannot close in the tokens left stays incomplete (``complete`` False).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["Closer", "json_position"]

#: Steering is considered only within this many tokens of the end of the budget.
WINDOW = 64
#: The plan is followed once it needs this many tokens fewer than are left, or more.
MARGIN = 2

#: What each JSON position prefers, best first (single tokens of the vocabulary).
_PREFERENCES = {
    "string": ('"',),
    "colon": (":",),
    "value": ("0", '"', "null", "false", "true", "[", "{"),
    "value_or_close": ("]", "0", '"', "null", "false", "true"),
    "key": ('"',),
    "key_or_close": ("}", '"'),
    "after_object_value": ("}", ","),
    "after_array_value": ("]", ","),
    "done": (),
}


def json_position(text: str) -> str:
    """Where a JSON document prefix stands (a key of ``_PREFERENCES``); text before its first
    ``{`` or ``[`` (a tool-call tag) is skipped."""
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    if not starts:
        return "value"
    stack: list[str] = []
    in_string = escaped = is_key = False
    expect = "value"
    for ch in text[min(starts) :]:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string, expect = False, "colon" if is_key else "after"
            continue
        if ch == '"':
            in_string, is_key = True, expect in ("key", "key_or_close")
        elif ch in "{[":
            stack.append(ch)
            expect = "key_or_close" if ch == "{" else "value_or_close"
        elif ch in "}]":
            if stack:
                stack.pop()
            expect = "after"
        elif ch == ":":
            expect = "value"
        elif ch == ",":
            expect = "key" if stack and stack[-1] == "{" else "value"
        elif not ch.isspace():
            expect = "after"  # a number or literal in progress, or just ended
    if in_string:
        return "string"
    if expect == "after":
        if not stack:
            return "done"
        return "after_object_value" if stack[-1] == "{" else "after_array_value"
    return expect


class Closer:
    """Plans and follows the closing path of one constrained generation (see the module docstring)."""

    def __init__(self, lltokenizer: Any, preferences: dict[str, tuple[int, ...]], eos_token_id: int) -> None:
        self._tok = lltokenizer
        self._preferences = preferences
        self._eos = eos_token_id
        self._plan: list[int] | None = None  # committed: the tokens still to emit
        self._last_length: int | None = None  # the last plan's length, to plan again only when near

    @staticmethod
    def preference_ids(token_id: Any) -> dict[str, tuple[int, ...]]:
        """Each position's preferred tokens as ids, through ``token_id(text) -> id or None``."""
        out = {}
        for position, texts in _PREFERENCES.items():
            out[position] = tuple(i for i in (token_id(t) for t in texts) if i is not None)
        return out

    def next_token(self, matcher: Any, consumed: Sequence[int], left: int, accepting: bool) -> int | None:
        """The next token of the committed plan, or of a plan committed now; None: sample as usual."""
        if self._plan is not None:
            return self._plan.pop(0) if self._plan else (self._eos if accepting else None)
        if left > WINDOW or accepting:
            return None
        if self._last_length is not None and left > self._last_length + MARGIN + 4:
            return None  # far from needing the plan yet: skip the search
        plan = self._search(matcher, consumed, left)
        self._last_length = None if plan is None else len(plan)
        if plan is None or len(plan) + MARGIN < left:
            return None
        self._plan = plan
        return self._plan.pop(0) if self._plan else None

    def _search(self, matcher: Any, consumed: Sequence[int], limit: int) -> list[int] | None:
        """A path of at most ``limit`` tokens from the matcher's state to a complete document."""
        m = matcher.deep_copy()
        path: list[int] = []
        while len(path) < limit + MARGIN:
            if m.is_error():
                return None
            if m.is_stopped() or m.is_accepting():
                return path
            forced = [t for t in m.compute_ff_tokens() if t != self._eos]
            if forced:
                for token in forced:
                    if not m.consume_token(token):
                        return None
                    path.append(token)
                continue
            allowed = _allowed(m, self._eos)
            if not allowed.any():
                return None
            position = json_position(self._tok.decode_str([*consumed, *path]))
            token = next((t for t in self._preferences.get(position, ()) if allowed[t]), None)
            if token is None:
                token = int(np.flatnonzero(allowed)[0])
            if not m.consume_token(token):
                return None
            path.append(token)
        return None


def _allowed(matcher: Any, eos: int) -> np.ndarray:
    """bool[vocab] of the tokens the matcher allows next, eos left out."""
    mask = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
    allowed = np.unpackbits(mask, bitorder="little").view(bool).copy()
    if eos < allowed.shape[0]:
        allowed[eos] = False
    return allowed
