"""OpenAI chat-completions shapes -> what the runtime takes, in one place (the library's ``chat()``
and any server built on it share this translation).

- messages: ``content`` given as a list of parts (``[{"type": "text", "text": ...}]``) becomes one
  string (text parts joined with newlines, as vLLM does; other part types are refused: the models
  are text-only); the ``developer`` role is ``system``; an assistant ``tool_calls`` entry whose
  ``function.arguments`` is a JSON string (as OpenAI sends it) is handed to the chat template as the
  object it encodes (templates such as Qwen2.5's ``tojson`` it, which would quote a string twice).
- options: ``max_tokens`` / ``max_completion_tokens`` are ``max_new_tokens``; ``stop`` (a string or
  a list) is ``stop_strings``.
- ``tool_choice``: ``"auto"`` (the default with tools), ``"none"`` (the tools are not shown to the
  model and no call is parsed), ``"required"`` (one or more calls, enforced by constrained decoding,
  each call's arguments validating against its tool's ``parameters``), or
  ``{"type": "function", "function": {"name": ...}}`` (exactly one call to that tool). With
  ``"auto"`` and a ``response_format``, the reply is either tool calls or the JSON document.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Mapping, Sequence
from typing import Any

from qwen_export.errors import OptionError
from qwen_export.runtime.structured import ResponseFormat

__all__ = ["ChatRequest", "ToolChoice", "ToolChoiceMode", "generation_options", "normalize_messages", "prepare_chat"]

#: OpenAI option names -> GenerationConfig fields
_ALIASES = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens", "stop": "stop_strings"}


class ToolChoiceMode(str, enum.Enum):
    AUTO = "auto"
    NONE = "none"
    REQUIRED = "required"
    FUNCTION = "function"  # one call to the named function


@dataclasses.dataclass(frozen=True)
class ToolChoice:
    mode: ToolChoiceMode
    name: str | None = None  # FUNCTION only

    @classmethod
    def parse(cls, value: Any, tool_names: Sequence[str]) -> ToolChoice:
        """From OpenAI's ``tool_choice`` (None: auto with tools, none without); OptionError when invalid."""
        if value is None:
            return cls(ToolChoiceMode.AUTO if tool_names else ToolChoiceMode.NONE)
        if isinstance(value, str) and value in ("auto", "none", "required"):
            mode = ToolChoiceMode(value)
            if mode is not ToolChoiceMode.NONE and not tool_names:
                raise OptionError(f"tool_choice {value!r} needs tools")
            return cls(mode)
        function = value.get("function") if isinstance(value, Mapping) and value.get("type") == "function" else None
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str):
            raise OptionError(
                "tool_choice must be 'auto', 'none', 'required' or "
                f"{{'type': 'function', 'function': {{'name': ...}}}}, got {value!r}"
            )
        if name not in tool_names:
            raise OptionError(f"tool_choice names {name!r}, which is not among the tools {list(tool_names)}")
        return cls(ToolChoiceMode.FUNCTION, name)


def _text_content(content: Any, where: str) -> Any:
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            shown = kind if kind is not None else type(part).__name__
            raise OptionError(
                f"{where}: content part {shown!r} is not supported (text parts only: the model is text-only)"
            )
        texts.append(part["text"])
    return "\n".join(texts)


def _template_tool_call(call: Any) -> Any:
    """An assistant tool call with JSON-string arguments decoded (a non-JSON string is left as is)."""
    function = call.get("function") if isinstance(call, Mapping) else None
    arguments = function.get("arguments") if isinstance(function, Mapping) else None
    if not isinstance(arguments, str):
        return call
    try:
        decoded = json.loads(arguments)
    except (json.JSONDecodeError, RecursionError):
        return call
    return {**call, "function": {**function, "arguments": decoded}}


def normalize_messages(messages: Any) -> Any:
    """OpenAI-style messages as chat templates take them (see the module docstring); anything that
    is not a list of dicts is returned as is for the template layer to refuse."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        return messages
    out: list[Any] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            out.append(message)
            continue
        fixed = dict(message)
        if fixed.get("role") == "developer":
            fixed["role"] = "system"
        if "content" in fixed:
            fixed["content"] = _text_content(fixed["content"], f"messages[{i}]")
        if isinstance(fixed.get("tool_calls"), list):
            fixed["tool_calls"] = [_template_tool_call(call) for call in fixed["tool_calls"]]
        out.append(fixed)
    return out


def generation_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with OpenAI's names translated (``max_tokens``, ``max_completion_tokens``, ``stop``)."""
    out: dict[str, Any] = {}
    given: dict[str, str] = {}
    for key, value in options.items():
        field = _ALIASES.get(key, key)
        if field in given:
            raise OptionError(f"{given[field]!r} and {key!r} both set {field!r}; pass one")
        given[field] = key
        if key == "stop":
            value = () if value is None else (value,) if isinstance(value, str) else value
            if isinstance(value, list):
                value = tuple(value)
        out[field] = value
    return out


def _tool_functions(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """``{"name", "parameters"}`` of each OpenAI tool spec (``{"type": "function", "function": {...}}``)."""
    functions = []
    for tool in tools:
        spec = tool.get("function", tool) if isinstance(tool, Mapping) else None
        name = spec.get("name") if isinstance(spec, Mapping) else None
        if not isinstance(name, str) or not name:
            raise OptionError(
                f"each tool needs a function name: {{'type': 'function', 'function': {{'name': ...}}}}, got {tool!r}"
            )
        parameters = spec.get("parameters")
        if parameters is not None and not isinstance(parameters, Mapping):
            raise OptionError(f"tool {name!r}: parameters must be a JSON Schema object")
        functions.append({"name": name, "parameters": dict(parameters) if parameters else None})
    return functions


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    """One chat call, translated: what to render, what to constrain, what to parse."""

    messages: Any  # for the chat template
    tools: Any  # for the chat template (None: not shown)
    template_variables: dict[str, Any]  # e.g. enable_thinking
    response_format: ResponseFormat | None  # the reply's document format; None for free text
    tool_functions: tuple[dict[str, Any], ...]  # the functions a constrained call may name
    tool_choice: ToolChoice
    options: dict[str, Any]  # generation options, OpenAI names translated

    @property
    def parse_tool_calls(self) -> bool:
        return self.tool_choice.mode is not ToolChoiceMode.NONE

    @property
    def constrain_calls(self) -> bool:
        """A grammar over tool calls: a call is required, or the reply is calls or a JSON document."""
        mode = self.tool_choice.mode
        return mode in (ToolChoiceMode.REQUIRED, ToolChoiceMode.FUNCTION) or (
            mode is ToolChoiceMode.AUTO and self.response_format is not None
        )


def prepare_chat(
    messages: Any,
    tools: Any = None,
    response_format: Any = None,
    tool_choice: Any = None,
    enable_thinking: bool | None = None,
    options: Mapping[str, Any] | None = None,
) -> ChatRequest:
    """Translate one OpenAI-shaped chat call (see the module docstring)."""
    if tools is not None and (isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence)):
        raise OptionError("tools must be a list of {'type': 'function', 'function': {...}} dicts")
    functions = _tool_functions(tools or [])
    fmt = ResponseFormat.parse(response_format)
    choice = ToolChoice.parse(tool_choice, [f["name"] for f in functions])
    if enable_thinking is not None and not isinstance(enable_thinking, bool):
        raise OptionError(f"enable_thinking must be true, false or None, got {enable_thinking!r}")
    if choice.mode is ToolChoiceMode.FUNCTION:
        functions = [f for f in functions if f["name"] == choice.name]
    shown = list(tools) if tools and choice.mode is not ToolChoiceMode.NONE else None
    return ChatRequest(
        messages=normalize_messages(messages),
        tools=shown,
        template_variables={} if enable_thinking is None else {"enable_thinking": enable_thinking},
        response_format=fmt if fmt.constrained else None,
        tool_functions=tuple(functions),
        tool_choice=choice,
        options=generation_options(options or {}),
    )
