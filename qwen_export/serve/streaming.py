"""Server-sent events of a streamed request: OpenAI's ``chat.completion.chunk`` / ``text_completion``
chunks, one ``data: {json}`` event each, ending with ``data: [DONE]``.

Chat with tools: content streams as it comes until a ``<tool_call>`` tag may be starting; from there
it is held back, and once the generation has ended the rest of the reply's content (tool-call blocks
removed) and the parsed calls (``delta.tool_calls`` with ``index``, unique ``id``, ``function.name``
and ``function.arguments`` as one JSON string) follow in whole. Reasoning (Qwen3's ``<think>``
part) streams as ``delta.reasoning_content``.
"""

from __future__ import annotations

import json
from typing import Any

from qwen_export.runtime.reasoning import ChatDelta, DeltaKind
from qwen_export.serve.protocol import finish_reason, good_calls, logprob_content, new_id, now, usage

__all__ = ["ChatChunks", "CompletionChunks", "DONE", "sse"]

DONE = "data: [DONE]\n\n"
TOOL_TAG = "<tool_call>"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def safe_end(text: str) -> int:
    """How much of ``text`` can be shown: up to a ``<tool_call>`` tag or a tail that may start one."""
    found = text.find(TOOL_TAG)
    if found >= 0:
        return found
    for k in range(min(len(TOOL_TAG) - 1, len(text)), 0, -1):
        if text.endswith(TOOL_TAG[:k]):
            return len(text) - k
    return len(text)


class _Chunks:
    def __init__(self, model: str, include_usage: bool, prefix: str, kind: str) -> None:
        self.id, self.created, self.model = new_id(prefix), now(), model
        self.include_usage, self.object = include_usage, kind

    def _chunk(self, choices: list[dict[str, Any]]) -> str:
        payload: dict[str, Any] = {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            payload["usage"] = None
        return sse(payload)

    def usage_chunk(self, result: Any) -> list[str]:
        if not self.include_usage:
            return []
        payload = {"id": self.id, "object": self.object, "created": self.created, "model": self.model}
        return [sse({**payload, "choices": [], "usage": usage(result)})]


class ChatChunks(_Chunks):
    def __init__(self, model: str, include_usage: bool, tools: bool) -> None:
        super().__init__(model, include_usage, "chatcmpl", "chat.completion.chunk")
        self.tools = tools
        self._content = ""  # the content so far (tools only)
        self._shown = 0  # how much of it was sent
        self._logprobs: list[Any] = []  # TokenLogprob s not sent yet (they ride on the next chunk)

    def _delta(self, delta: dict[str, Any], reason: str | None = None) -> str:
        logprobs = {"content": logprob_content(self._logprobs)} if self._logprobs else None
        self._logprobs = []
        return self._chunk([{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": logprobs}])

    def first(self) -> list[str]:
        return [self._delta({"role": "assistant", "content": ""})]

    def piece(self, delta: ChatDelta, logprobs: tuple[Any, ...] = ()) -> list[str]:
        self._logprobs += logprobs
        if delta.kind is DeltaKind.REASONING:
            return [self._delta({"reasoning_content": delta.text})]
        if not self.tools:
            return [self._delta({"content": delta.text})]
        self._content += delta.text
        end = max(self._shown, safe_end(self._content))
        shown, self._shown = self._content[self._shown : end], end
        return [self._delta({"content": shown})] if shown else []

    def finish(self, result: Any) -> list[str]:
        out = []
        calls = good_calls(result.tool_calls) if self.tools else []
        if self.tools:
            sent = self._content[: self._shown]
            rest = result.text[len(sent) :] if result.text.startswith(sent) else ""
            if rest:
                out.append(self._delta({"content": rest}))
            if calls:
                out.append(self._delta({"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}))
        out.append(self._delta({}, finish_reason(result.finish_reason, bool(calls))))
        return out + self.usage_chunk(result)


class CompletionChunks(_Chunks):
    def __init__(self, model: str, include_usage: bool) -> None:
        super().__init__(model, include_usage, "cmpl", "text_completion")

    def _text(self, text: str, reason: str | None = None) -> str:
        return self._chunk([{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}])

    def first(self) -> list[str]:
        return []

    def piece(self, text: str, logprobs: tuple[Any, ...] = ()) -> list[str]:
        return [self._text(text)]

    def finish(self, result: Any) -> list[str]:
        return [self._text("", finish_reason(result.finish_reason)), *self.usage_chunk(result)]
