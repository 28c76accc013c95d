"""The embedded runtime API: qwen_export.load -> LLM (chat, tools, streaming, threads, cancellation)."""

from __future__ import annotations

import doctest
import json
import threading

import pytest

import qwen_export
from qwen_export import GenerationError, OptionError, parse_tool_calls

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


@pytest.fixture(scope="module")
def llm(export) -> qwen_export.LLM:
    return qwen_export.load(export("qwen2_tied"))


def test_load_options(export) -> None:
    art = export("qwen2_tied")
    assert qwen_export.load(art, engine="onnxruntime", device="cpu", threads=1).max_context == 256
    with pytest.raises(OptionError, match="device 'cuda'"):
        qwen_export.load(art, device="cuda")
    with pytest.raises(OptionError, match="unknown engine"):
        qwen_export.load(art, engine="tflite")
    with pytest.raises(OptionError, match="unknown load option"):
        qwen_export.load(art, beams=4)


def test_chat_multi_turn_reuses_cache_and_accepts_tool_results(llm: qwen_export.LLM) -> None:
    messages = [{"role": "user", "content": "What's the weather in Paris?"}]
    first = llm.chat(messages, tools=TOOLS, max_new_tokens=6, temperature=0)
    assert first.completion_tokens <= 6 and first.reused_tokens == 0
    messages.append(first.message())
    messages.append(
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        }
    )
    messages.append({"role": "tool", "name": "get_weather", "content": '{"sky": "sunny"}'})
    second = llm.chat(messages, tools=TOOLS, max_new_tokens=6, temperature=0)
    assert second.reused_tokens >= first.prompt_tokens  # the first turn's prompt came from the cache
    assert "<tool_response>" in llm.tokenizer.apply_chat_template(messages, tools=TOOLS)


def test_tool_call_parsing_on_crafted_outputs() -> None:
    text = (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": "{\\"tz\\": \\"CET\\"}"}\n</tool_call>\n'
        '<tool_call>\n{"name": "broken", "arguments": {"x": }\n</tool_call>\n'
        "<tool_call>\n[1, 2]\n</tool_call>\n"
        '<tool_call>\n{"arguments": {}}\n</tool_call>\n'
        '<tool_call>\n{"name": "cut", "arguments": {"a": 1}}'
    )
    content, calls = parse_tool_calls(text)
    assert content == "Let me check."
    assert [c.name for c in calls] == ["get_weather", "get_time", None, None, None, "cut"]
    assert calls[0].arguments == {"city": "Paris"} and calls[0].error is None
    assert calls[1].arguments == {"tz": "CET"} and calls[1].error is None  # arguments given as a JSON string
    assert calls[2].error.startswith("invalid JSON")
    assert calls[3].error == "expected a JSON object, got list"
    assert calls[4].error == "missing function name"
    assert calls[5].error == "unterminated <tool_call> block"
    assert calls[0].to_openai()["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


def test_stream_cancel_releases_the_llm(llm: qwen_export.LLM) -> None:
    stream = llm.stream("Once upon a time", max_new_tokens=50, temperature=0)
    next(stream)
    stream.cancel()
    rest = list(stream)
    assert stream.cancelled and len(rest) <= 1
    assert llm.generate("Hello", max_new_tokens=2, temperature=0) is not None  # not deadlocked


def test_concurrent_calls_are_serialised(llm: qwen_export.LLM) -> None:
    prompts = [[{"role": "user", "content": f"Count to {i}"}] for i in range(4)]
    expected = [llm.chat(p, max_new_tokens=5, temperature=0).text for p in prompts]
    got: dict[int, str] = {}

    def worker(i: int) -> None:
        got[i] = llm.chat(prompts[i], max_new_tokens=5, temperature=0).text

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [got[i] for i in range(4)] == expected


def test_conversation_outgrowing_the_context_is_a_clear_error(llm: qwen_export.LLM) -> None:
    messages = [{"role": "user", "content": "word " * 300}]
    with pytest.raises(GenerationError, match="context is 256"):
        llm.chat(messages, max_new_tokens=4)
    assert llm.generate("ok", max_new_tokens=1, temperature=0) is not None


def test_cut_off_json_reply_says_it_is_incomplete(llm: qwen_export.LLM) -> None:
    messages = [{"role": "user", "content": "JSON please"}]
    schema = {"type": "object", "properties": {"word": {"enum": ["supercalifragilistic"]}}, "required": ["word"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": schema}}
    cut = llm.chat(messages, response_format=fmt, max_new_tokens=2, temperature=0)
    assert cut.finish_reason == "length" and cut.complete is False
    assert llm.chat(messages, max_new_tokens=2, temperature=0).complete  # no document: nothing to complete


def test_invalid_options(llm: qwen_export.LLM) -> None:
    with pytest.raises(OptionError, match="unknown generation option"):
        llm.generate("hi", beam_width=3)
    with pytest.raises(OptionError, match="top_p"):
        llm.generate("hi", top_p=2.0)
    with pytest.raises(OptionError, match="'max_tokens' and 'max_new_tokens' both set"):
        llm.chat([{"role": "user", "content": "hi"}], max_tokens=2, max_new_tokens=3)
    with pytest.raises(OptionError, match="not among the tools"):
        llm.chat(
            [{"role": "user", "content": "hi"}],
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "x"}},
        )
    with pytest.raises(OptionError, match="'image_url' is not supported"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


# -- OpenAI shapes (runtime/openai_shapes.py) and Qwen3 thinking (runtime/reasoning.py) ----------------
CITY_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"enum": ["Paris", "Rome"]}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def test_openai_content_parts_and_option_aliases(llm: qwen_export.LLM) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Weather"}, {"type": "text", "text": "in Paris?"}]}]
    plain = [{"role": "user", "content": "Weather\nin Paris?"}]
    a = llm.chat(parts, max_tokens=3, temperature=0)
    b = llm.chat(plain, max_new_tokens=3, temperature=0)
    assert (a.prompt_tokens, a.raw_text, a.completion_tokens) == (b.prompt_tokens, b.raw_text, 3)
    developer = llm.chat([{"role": "developer", "content": "Be brief."}, *plain], max_tokens=1, temperature=0)
    system = llm.chat([{"role": "system", "content": "Be brief."}, *plain], max_tokens=1, temperature=0)
    assert developer.prompt_tokens == system.prompt_tokens
    free = llm.generate("Once upon a time", max_tokens=8, temperature=0)
    cut = llm.stream("Once upon a time", max_tokens=8, temperature=0, stop=free[2:4])
    assert "".join(cut) == free[: free.index(free[2:4])] and cut.result.finish_reason.value == "stop_string"


def test_tool_choice_required_and_named_are_enforced(llm: qwen_export.LLM) -> None:
    import jsonschema

    required = llm.chat(ASK, tools=CITY_TOOLS, tool_choice="required", max_tokens=60, temperature=0)
    # the random model keeps calling (one or more calls are allowed) until the limit cuts the last one
    assert required.tool_calls and required.tool_calls[0].error is None, required
    assert {c.name for c in required.tool_calls} <= {"get_weather", "get_time"}
    named = llm.chat(
        ASK,
        tools=CITY_TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=60,
        temperature=0.8,
        seed=3,
    )
    assert [c.name for c in named.tool_calls] == ["get_weather"] and named.tool_calls[0].error is None
    jsonschema.validate(named.tool_calls[0].arguments, CITY_TOOLS[0]["function"]["parameters"])
    # the next turn takes the OpenAI-shaped message back: arguments as a JSON string, ids unique
    message = named.message()
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == named.tool_calls[0].arguments
    history = [*ASK, message, {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": "sunny"}]
    again = llm.chat(history, tools=CITY_TOOLS, tool_choice="required", max_tokens=60, temperature=0)
    assert again.reused_tokens > named.prompt_tokens  # the re-rendered call matched what was generated
    ids = [c.id for c in (*required.tool_calls, *named.tool_calls, *again.tool_calls)]
    assert len(set(ids)) == len(ids)


def test_tools_with_response_format_and_tool_choice_none(llm: qwen_export.LLM) -> None:
    import jsonschema

    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "ok", "schema": schema}}
    for seed in (1, 2):
        reply = llm.chat(ASK, tools=CITY_TOOLS, response_format=fmt, max_tokens=60, temperature=1.0, seed=seed)
        if reply.tool_calls:  # calls only, nothing else (the limit may cut the last of a long series)
            assert reply.tool_calls[0].error is None and reply.text == "", reply
        else:
            assert reply.complete, reply
            jsonschema.validate(json.loads(reply.text), schema)
    hidden = llm.chat(ASK, tools=CITY_TOOLS, tool_choice="none", response_format=fmt, max_tokens=20, temperature=0)
    no_tools = llm.chat(ASK, response_format=fmt, max_tokens=20, temperature=0)
    assert (hidden.prompt_tokens, hidden.text, hidden.tool_calls) == (no_tools.prompt_tokens, no_tools.text, ())


def test_docstring_examples_run(export) -> None:
    import qwen_export.runtime.llm as module

    result = doctest.testmod(module, extraglobs={"ARTIFACT": str(export("qwen2_tied"))}, verbose=False)
    assert result.attempted >= 5 and result.failed == 0
