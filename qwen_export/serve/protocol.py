"""OpenAI request bodies -> the runtime's calls, and the runtime's results -> OpenAI response bodies.

The chat translation itself (content parts, ``developer``, ``tool_choice``, ``max_tokens``, ``stop``)
is :mod:`qwen_export.runtime.openai_shapes`, shared with ``LLM.chat``; this module checks the
request's top level (types, what is refused) and builds the ``chat.completion`` /
``text_completion`` objects and their streamed chunks.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Mapping
from typing import Any

from qwen_export.runtime.chat import ToolCall
from qwen_export.runtime.openai_shapes import prepare_chat
from qwen_export.runtime.sampling import MAX_TOP_LOGPROBS
from qwen_export.serve.errors import APIError
from qwen_export.serve.images import ImagePolicy, checked_image_parts

__all__ = ["ChatCall", "CompletionCall", "finish_reason", "parse_chat", "parse_completion", "usage"]

#: sampling options passed to the runtime as given (top_k, min_p, repetition_penalty: as vLLM's extensions)
SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop")
#: accepted and ignored (they do not change what one model generates here)
IGNORED = ("user", "metadata", "store", "service_tier", "parallel_tool_calls")
#: accepted only at their neutral value (None or this)
NEUTRAL = {
    "n": 1,
    "logprobs": False,
    "top_logprobs": 0,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": None,
    "echo": False,
    "best_of": 1,
    "suffix": None,
}
CHAT_FIELDS = {
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "tools",
    "tool_choice",
    "response_format",
    "chat_template_kwargs",
    *SAMPLING,
    *IGNORED,
    *(k for k in NEUTRAL if k not in ("echo", "best_of", "suffix")),
}
#: chat fields taken at any value, unlike /v1/completions (whose logprobs has another shape)
CHAT_LOGPROBS = ("logprobs", "top_logprobs")
COMPLETION_FIELDS = {"model", "prompt", "stream", "stream_options", "max_tokens", *SAMPLING, *IGNORED, *NEUTRAL}
#: OpenAI's default max_tokens of /v1/completions
COMPLETION_MAX_TOKENS = 16


@dataclasses.dataclass(frozen=True)
class Streaming:
    on: bool
    include_usage: bool


@dataclasses.dataclass(frozen=True)
class ChatCall:
    """The arguments of ``LLM.chat_stream`` for one request."""

    messages: list[Any]
    tools: list[Any] | None
    response_format: Any
    tool_choice: Any
    enable_thinking: bool | None
    options: dict[str, Any]
    streaming: Streaming

    prompt_param = "messages"  # the field a prompt over the context is blamed on

    @property
    def parses_tool_calls(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    def start(self, llm: Any) -> Any:
        return llm.chat_stream(
            self.messages,
            self.tools,
            self.response_format,
            tool_choice=self.tool_choice,
            enable_thinking=self.enable_thinking,
            **self.options,
        )


@dataclasses.dataclass(frozen=True)
class CompletionCall:
    """The arguments of ``LLM.stream`` (a raw prompt, no chat template) for one request."""

    prompt: str
    options: dict[str, Any]
    streaming: Streaming
    prompt_param = "prompt"

    def start(self, llm: Any) -> Any:
        return llm.stream(self.prompt, **self.options)


def _check_fields(body: Any, known: set[str], free: tuple[str, ...] = ()) -> dict[str, Any]:
    if not isinstance(body, Mapping):
        raise APIError.bad_request("the request body must be a JSON object")
    unknown = sorted(set(body) - known)
    if unknown:
        raise APIError.bad_request(f"unrecognized request argument {unknown[0]!r}", unknown[0])
    for key, neutral in NEUTRAL.items():
        if key in free:
            continue
        value = body.get(key)
        if value is not None and value != neutral and value != {}:  # logit_bias {} is neutral too
            what = "only n=1 is supported" if key == "n" else f"{key}={value!r} is not supported (only {neutral!r})"
            raise APIError.bad_request(what, key)
    return dict(body)


def _streaming(body: Mapping[str, Any]) -> Streaming:
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise APIError.bad_request(f"stream must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options")
    if options is None:
        return Streaming(stream, False)
    if not stream:
        raise APIError.bad_request("stream_options needs stream: true", "stream_options")
    if not isinstance(options, Mapping) or set(options) - {"include_usage"}:
        raise APIError.bad_request("stream_options takes only include_usage", "stream_options")
    include = options.get("include_usage") or False
    if not isinstance(include, bool):
        raise APIError.bad_request("stream_options.include_usage must be true or false", "stream_options")
    return Streaming(True, include)


def _sampling(body: Mapping[str, Any], limit_keys: tuple[str, ...], default_limit: int) -> dict[str, Any]:
    options = {key: body[key] for key in (*SAMPLING, *limit_keys) if body.get(key) is not None}
    stop = options.get("stop")
    if stop is not None and not isinstance(stop, str | list):
        raise APIError.bad_request("stop must be a string or a list of strings", "stop")
    if not any(key in options for key in limit_keys):
        options["max_new_tokens"] = default_limit
    return options


def _logprobs(body: Mapping[str, Any]) -> dict[str, Any]:
    """``logprobs`` / ``top_logprobs`` of a chat request as the runtime's ``logprobs`` option."""
    wanted, top = body.get("logprobs"), body.get("top_logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise APIError.bad_request(f"logprobs must be true or false, got {wanted!r}", "logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS):
        raise APIError.bad_request(
            f"top_logprobs must be an integer 0..{MAX_TOP_LOGPROBS}, got {top!r}", "top_logprobs"
        )
    if top and not wanted:
        raise APIError.bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    return {"logprobs": top or 0} if wanted else {}


def logprob_content(logprobs: Any) -> list[dict[str, Any]]:
    """OpenAI's ``logprobs.content`` entries for TokenLogprob s."""

    def entry(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return [
        {**entry(item.token, item.logprob), "top_logprobs": [entry(text, lp) for _, text, lp in item.top]}
        for item in logprobs
    ]


def _model(body: Mapping[str, Any], served: str) -> None:
    model = body.get("model")
    if model is not None and model != served:
        raise APIError.bad_request(
            f"the model {model!r} does not exist; this server serves {served!r}", "model", "model_not_found"
        )


def parse_chat(body: Any, served: str, max_context: int, images: ImagePolicy | None = None) -> ChatCall:
    """A ``/v1/chat/completions`` body; :class:`APIError` (400) on a bad one. ``images``: a
    vision-language model's image policy (its image parts checked and resolved by it); None for a
    text model (image parts refused)."""
    body = _check_fields(body, CHAT_FIELDS, CHAT_LOGPROBS)
    _model(body, served)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError.bad_request("messages must be a non-empty list of messages", "messages")
    text_view = messages
    if images is not None:
        from qwen_export.runtime.multimodal import image_sources

        messages = checked_image_parts(messages, images)
        try:
            text_view = image_sources(messages)[0]  # the messages prepare_chat checks below
        except Exception as exc:  # noqa: BLE001 - OptionError (too many images, bad parts): the client's
            raise APIError.from_exception(exc) from exc
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, Mapping) or set(kwargs) - {"enable_thinking"}:
        raise APIError.bad_request("chat_template_kwargs takes only enable_thinking", "chat_template_kwargs")
    # the default limit is the rest of the context (finish_reason "length" when it is full)
    options = _sampling(body, ("max_tokens", "max_completion_tokens"), max_context)
    options |= _logprobs(body)
    call = ChatCall(
        messages=messages,
        tools=body.get("tools"),
        response_format=body.get("response_format"),
        tool_choice=body.get("tool_choice"),
        enable_thinking=kwargs.get("enable_thinking"),
        options=options,
        streaming=_streaming(body),
    )
    try:  # the runtime's own checks of the OpenAI shapes, before the request takes a queue slot
        prepare_chat(text_view, call.tools, call.response_format, call.tool_choice, call.enable_thinking, options)
    except Exception as exc:  # noqa: BLE001 - OptionError: the client's; anything else: 500
        raise APIError.from_exception(exc) from exc
    return call


def parse_completion(body: Any, served: str) -> CompletionCall:
    """A ``/v1/completions`` body (one string prompt); :class:`APIError` (400) on a bad one."""
    body = _check_fields(body, COMPLETION_FIELDS)
    _model(body, served)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise APIError.bad_request("prompt must be a non-empty string (or a list of one)", "prompt")
    return CompletionCall(prompt, _sampling(body, ("max_tokens",), COMPLETION_MAX_TOKENS), _streaming(body))


# ------------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(result: Any) -> dict[str, Any]:
    """OpenAI's ``usage`` of a ChatResult or GenerationResult; cached tokens: prompt tokens reused
    from the KV cache (the previous request's common prefix)."""
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": result.reused_tokens},
    }


_FINISH = {"stop_token": "stop", "stop_string": "stop", "length": "length", "context": "length"}


def finish_reason(reason: Any, tool_calls: bool = False) -> str:
    """OpenAI's finish_reason for the runtime's (a FinishReason or its value)."""
    if tool_calls:
        return "tool_calls"
    return _FINISH[getattr(reason, "value", reason)]


def good_calls(calls: tuple[ToolCall, ...]) -> list[dict[str, Any]]:
    """The well-formed tool calls in OpenAI's shape (a malformed block has no OpenAI form: dropped)."""
    return [call.to_openai() for call in calls if call.error is None]


def chat_message(result: Any) -> tuple[dict[str, Any], str]:
    """The assistant ``message`` of a ChatResult and its finish_reason."""
    calls = good_calls(result.tool_calls)
    message: dict[str, Any] = {"role": "assistant", "content": result.text or (None if calls else "")}
    if result.reasoning is not None:
        message["reasoning_content"] = result.reasoning
    if calls:
        message["tool_calls"] = calls
    return message, finish_reason(result.finish_reason, bool(calls))


def chat_response(result: Any, model: str) -> dict[str, Any]:
    message, reason = chat_message(result)
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": reason, "logprobs": chat_logprobs(result)}],
        "usage": usage(result),
    }


def chat_logprobs(result: Any) -> dict[str, Any] | None:
    """A chat choice's ``logprobs`` (None unless they were asked for and there are tokens)."""
    logprobs = getattr(result, "logprobs", ())
    return {"content": logprob_content(logprobs)} if logprobs else None


def completion_response(result: Any, model: str) -> dict[str, Any]:
    return {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": now(),
        "model": model,
        "choices": [
            {"index": 0, "text": result.text, "finish_reason": finish_reason(result.finish_reason), "logprobs": None}
        ],
        "usage": usage(result),
    }
