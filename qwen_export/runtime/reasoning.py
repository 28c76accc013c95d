"""Reasoning (Qwen3 ``<think>...</think>``) split from the reply, whole or while it streams.

A Qwen3 reply in thinking mode starts with ``<think>\\n``, reasons, closes with ``\\n</think>\\n\\n``
and then answers. :class:`ReasoningSplitter` turns the streamed text into :class:`ChatDelta`
pieces of kind ``reasoning`` or ``content``; the tags and the newlines Qwen's template puts around
them are dropped (the template strips them the same way when it reads ``reasoning_content`` back).
A reply that does not start with ``<think>`` is all content; a reasoning cut off before
``</think>`` (the token limit) is all reasoning. When the prompt itself opened the block (templates
that end the generation prompt with ``<think>\\n``), pass ``opened=True``.
"""

from __future__ import annotations

import dataclasses
import enum

__all__ = ["ChatDelta", "DeltaKind", "ReasoningSplitter", "split_reasoning"]

OPEN, CLOSE = "<think>", "</think>"


class DeltaKind(str, enum.Enum):
    REASONING = "reasoning"
    CONTENT = "content"


@dataclasses.dataclass(frozen=True)
class ChatDelta:
    kind: DeltaKind
    text: str


class _State(enum.Enum):
    START = 0  # nothing but whitespace seen: an opening tag may still come
    REASONING = 1
    CONTENT = 2


def _partial_tail(text: str, tag: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningSplitter:
    """Feed text pieces with :meth:`push`, then call :meth:`finish`; both return deltas."""

    def __init__(self, opened: bool = False) -> None:
        self._state = _State.REASONING if opened else _State.START
        self._buffer = ""  # text not yet classified (a possible tag prefix, trailing newlines)
        self._fresh = True  # at the start of the current part: leading newlines are dropped
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.saw_reasoning = opened

    def push(self, piece: str) -> list[ChatDelta]:
        self._buffer += piece
        out: list[ChatDelta] = []
        while True:
            before = (self._state, len(self._buffer))
            out += self._step(final=False)
            if (self._state, len(self._buffer)) == before:
                return out

    def finish(self) -> list[ChatDelta]:
        out = self._step(final=True)
        return out + self._step(final=True)  # START resolved first, then what it held is emitted

    def _emit(self, kind: DeltaKind, text: str) -> list[ChatDelta]:
        if self._fresh:
            text = text.lstrip("\n")
            self._fresh = not text
        if not text:
            return []
        (self.reasoning if kind is DeltaKind.REASONING else self.content).append(text)
        return [ChatDelta(kind, text)]

    def _step(self, final: bool) -> list[ChatDelta]:
        buffer = self._buffer
        if self._state is _State.START:
            stripped = buffer.lstrip()
            if stripped.startswith(OPEN):
                self._state, self._buffer, self.saw_reasoning = _State.REASONING, stripped[len(OPEN) :], True
            elif final or not OPEN.startswith(stripped):
                self._state = _State.CONTENT
            return []
        if self._state is _State.CONTENT:
            self._buffer = ""
            return self._emit(DeltaKind.CONTENT, buffer)
        end = buffer.find(CLOSE)
        if end >= 0:
            out = self._emit(DeltaKind.REASONING, buffer[:end].rstrip("\n"))
            self._state, self._buffer, self._fresh = _State.CONTENT, buffer[end + len(CLOSE) :], True
            return out
        text = buffer
        if not final:  # hold back a possible "</think>" start and the newlines before it
            text = buffer[: len(buffer) - _partial_tail(buffer, CLOSE)].rstrip("\n")
        self._buffer = buffer[len(text) :]
        return self._emit(DeltaKind.REASONING, text.rstrip("\n") if final else text)


def split_reasoning(text: str, opened: bool = False) -> tuple[str | None, str]:
    """``(reasoning, content)`` of a whole reply; reasoning is None when there was no ``<think>``.

    >>> split_reasoning("<think>\\nHmm, 2+2.\\n</think>\\n\\nIt is 4.")
    ('Hmm, 2+2.', 'It is 4.')
    >>> split_reasoning("It is 4.")
    (None, 'It is 4.')
    """
    splitter = ReasoningSplitter(opened)
    splitter.push(text)
    splitter.finish()
    reasoning = "".join(splitter.reasoning) if splitter.saw_reasoning else None
    return reasoning, "".join(splitter.content)
