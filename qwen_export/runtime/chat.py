"""Chat-template rendering (torch-free).

Chat templates ship with checkpoints and are untrusted code, so they run in Jinja's
``ImmutableSandboxedEnvironment`` configured exactly as transformers configures it
(``transformers/utils/chat_template_utils.py``): ``trim_blocks``/``lstrip_blocks``, the
``loopcontrols`` extension, a ``tojson`` filter that does not HTML-escape, and the
``raise_exception``/``strftime_now``/``dict``/``namespace`` globals. Inputs are rebuilt out of plain
JSON types before the template sees them, and every template failure (syntax, sandbox violation,
``raise_exception``, type errors) becomes a one-line :class:`~qwen_export.errors.ConfigError`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.exceptions

from qwen_export.errors import ConfigError, OptionError, QwenExportError
from qwen_export.runtime import sandbox
from qwen_export.runtime.jsonsafe import check_json

__all__ = ["ChatTemplate", "REASONING_FIELDS", "ToolCall", "parse_tool_calls"]

# Names a message's reasoning is passed under; the first is the one chat templates read (as transformers).
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _plain(value: Any) -> Any:
    """Rebuild ``value`` out of plain JSON types; anything else becomes an inert ``"<TypeName>"``."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    item = getattr(value, "item", None)  # numpy scalars, without importing numpy here
    if callable(item) and type(value).__module__ == "numpy":
        return _plain(item())
    return f"<{type(value).__name__}>"


def _prepare_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Drop ``None`` values, make plain data and alias reasoning fields, as transformers does."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise OptionError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    prepared: list[dict[str, Any]] = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise OptionError(f"chat messages must be dicts, got {type(message).__name__}")
        plain = _plain({k: v for k, v in message.items() if v is not None})
        reasoning = next((plain[k] for k in REASONING_FIELDS if plain.get(k) is not None), None)
        if reasoning is not None:
            plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
        prepared.append(plain)
    return prepared


class ChatTemplate:
    """A compiled, sandboxed chat template.

    ``source_name`` names where the template came from (a file) for error messages.
    """

    def __init__(self, source: str, source_name: str = "<chat template>") -> None:
        self.source = source
        self.source_name = source_name
        try:
            self._template = sandbox.environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ConfigError(f"{source_name}: chat template syntax error (line {e.lineno}): {e.message}") from None
        except (RecursionError, SyntaxError, MemoryError) as e:  # nesting too deep for the parser/compiler
            raise ConfigError(f"{source_name}: chat template cannot be compiled: {type(e).__name__}") from None

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        special_tokens: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> str:
        """Render ``messages`` (OpenAI-style dicts) with ``tools`` (JSON-schema dicts).

        ``special_tokens`` (``bos_token``, ``eos_token``, ...) and ``extra`` (e.g. ``enable_thinking``)
        become template variables; ``extra`` wins over ``special_tokens``, as in transformers.
        """
        check_json(messages, "chat messages")
        if tools is not None:
            check_json(tools, "tools")
        check_json(extra, "chat template variables")
        chat = _prepare_messages(messages)
        tool_schemas: list[Any] | None = None
        if tools is not None:
            if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
                raise OptionError("tools must be a list of JSON-schema dicts")
            for tool in tools:
                if not isinstance(tool, Mapping):
                    raise OptionError(f"each tool must be a JSON-schema dict, got {type(tool).__name__}")
            tool_schemas = _plain(list(tools))
        variables = _plain({**(special_tokens or {}), **extra})
        try:
            with sandbox.budgeted():
                pieces, size = [], 0
                for piece in self._template.generate(
                    messages=chat,
                    tools=tool_schemas,
                    documents=None,
                    add_generation_prompt=add_generation_prompt,
                    **{**variables, "range": sandbox.RangeBudget()},
                ):
                    size += len(piece)
                    if size > sandbox.MAX_OUTPUT_CHARS:
                        raise jinja2.exceptions.SecurityError(f"output exceeds {sandbox.MAX_OUTPUT_CHARS:,} characters")
                    pieces.append(piece)
                return "".join(pieces)
        except QwenExportError:
            raise
        except jinja2.exceptions.SecurityError as e:
            raise ConfigError(f"{self.source_name}: the chat template tried an unsafe operation: {e}") from None
        except Exception as e:  # any template bug: undefined names, type errors, recursion, ...
            raise ConfigError(f"{self.source_name}: the chat template failed: {type(e).__name__}: {e}") from None


# -- tool calls -------------------------------------------------------------------------------------

# A block ends at </tool_call>, at the next <tool_call> (unterminated) or at the end of the text.
_TOOL_CALL = re.compile(r"<tool_call>((?:(?!<tool_call>).)*?)(</tool_call>|(?=<tool_call>)|$)", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` block of a reply.

    A malformed block is kept with ``error`` set (and ``name``/``arguments`` as far as they could be
    read) instead of raising: the model's output is data, not a program error.
    """

    id: str
    name: str | None
    arguments: dict[str, Any] | None
    raw: str
    error: str | None = None

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI-style ``tool_calls`` entry (arguments as a JSON string), for the next turn."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name or "", "arguments": json.dumps(self.arguments or {}, ensure_ascii=False)},
        }


def parse_tool_calls(text: str) -> tuple[str, tuple[ToolCall, ...]]:
    """Split a reply into its plain content and its tool calls (Qwen/Hermes ``<tool_call>`` format).

    >>> content, calls = parse_tool_calls('Sure.<tool_call>\\n{"name": "f", "arguments": {"x": 1}}\\n</tool_call>')
    >>> content, calls[0].name, calls[0].arguments, calls[0].error
    ('Sure.', 'f', {'x': 1}, None)
    >>> parse_tool_calls('<tool_call>{"name": "f", "arguments": {"x": </tool_call>')[1][0].error[:19]
    'invalid JSON at cha'
    """
    calls: list[ToolCall] = []
    for match in _TOOL_CALL.finditer(text):  # ids unique across turns and conversations, as OpenAI's
        calls.append(_tool_call(f"call_{uuid.uuid4().hex[:24]}", match.group(1).strip(), closed=bool(match.group(2))))
    content = _TOOL_CALL.sub("", text).strip()
    return content, tuple(calls)


def _tool_call(call_id: str, raw: str, closed: bool) -> ToolCall:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        return ToolCall(call_id, None, None, raw, f"invalid JSON at character {exc.pos}: {exc.msg}")
    except RecursionError:
        return ToolCall(call_id, None, None, raw, "invalid JSON: nested too deeply")
    if not isinstance(data, dict):
        return ToolCall(call_id, None, None, raw, f"expected a JSON object, got {type(data).__name__}")
    name, arguments = data.get("name"), data.get("arguments", {})
    if isinstance(arguments, str):  # some models emit the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except (json.JSONDecodeError, RecursionError):
            return ToolCall(call_id, name if isinstance(name, str) else None, None, raw, "arguments are not JSON")
    errors = []
    if not isinstance(name, str) or not name:
        errors.append("missing function name")
    if not isinstance(arguments, dict):
        errors.append("arguments must be a JSON object")
    if not closed:
        errors.append("unterminated <tool_call> block")
    return ToolCall(
        call_id,
        name if isinstance(name, str) else None,
        arguments if isinstance(arguments, dict) else None,
        raw,
        "; ".join(errors) or None,
    )
