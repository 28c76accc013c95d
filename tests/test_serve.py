"""The OpenAI-compatible server (qwen_export/serve/) through FastAPI's TestClient, over the tiny Qwen2."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import qwen_export
from qwen_export.errors import OptionError
from qwen_export.runtime.generation import GenerationTimings
from qwen_export.runtime.llm import ChatResult
from qwen_export.runtime.reasoning import ChatDelta, DeltaKind
from qwen_export.serve import protocol
from qwen_export.serve.app import create_app
from qwen_export.serve.streaming import ChatChunks, safe_end
from qwen_export.serve.worker import EventKind, Job

MODEL = "tiny"
ASK = [{"role": "user", "content": [{"type": "text", "text": "Weather"}, {"type": "text", "text": "in Paris?"}]}]
TOOLS = [
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
    }
]


@pytest.fixture(scope="module")
def llm(export) -> qwen_export.LLM:
    return qwen_export.load(export("qwen2_tied"))


@pytest.fixture(scope="module")
def client(llm: qwen_export.LLM):
    with TestClient(create_app(llm, max_queue=1, model_name=MODEL)) as test_client:
        yield test_client


def chat(client: TestClient, **body: Any) -> Any:
    return client.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, **body})


def events(response: Any) -> list[Any]:
    """The SSE ``data:`` payloads of a streamed response, decoded (``[DONE]`` kept as the string)."""
    lines = [line for line in response.text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines), lines
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines]


def assert_error(response: Any, status: int, param: str | None = None, code: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert (error["param"], error["code"]) == (param, code) or (param is None and code is None), error
    return error["message"]


def test_chat_completion_matches_the_library_and_reports_cached_tokens(client, llm) -> None:
    first = chat(client, max_tokens=5, temperature=0)
    assert first.status_code == 200, first.text
    body = first.json()
    assert (body["object"], body["model"]) == ("chat.completion", MODEL) and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    want = llm.chat(ASK, max_tokens=5, temperature=0)
    assert choice["message"] == {"role": "assistant", "content": want.text}
    assert choice["finish_reason"] == ("length" if want.finish_reason == "length" else "stop")
    usage = body["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (want.prompt_tokens, want.completion_tokens)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # the same prompt again: its prefix comes from the KV cache
    again = chat(client, max_completion_tokens=5, temperature=0).json()
    assert again["choices"][0]["message"] == choice["message"]
    assert 0 < again["usage"]["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]


def test_chat_stream_chunks_usage_and_done(client) -> None:
    whole = chat(client, max_tokens=6, temperature=0).json()
    streamed = chat(client, max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True})
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    payloads = events(streamed)
    assert payloads[-1] == "[DONE]" and "[DONE]" not in payloads[:-1]
    chunks, usage_chunk = payloads[:-2], payloads[-2]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == whole["choices"][0]["finish_reason"]
    assert all(c["usage"] is None for c in chunks)
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 6


def test_completions_plain_and_streamed(client, llm) -> None:
    want = llm.generate("Once upon a time", max_tokens=6, temperature=0)
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}
    plain = client.post("/v1/completions", json=body).json()
    assert plain["object"] == "text_completion" and plain["choices"][0]["text"] == want
    assert plain["choices"][0]["finish_reason"] == "length" and plain["usage"]["completion_tokens"] == 6
    payloads = events(client.post("/v1/completions", json={**body, "stream": True}))
    assert payloads[-1] == "[DONE]"
    assert "".join(p["choices"][0]["text"] for p in payloads[:-1]) == want
    cut = client.post("/v1/completions", json={**body, "stop": [want[2:4]], "seed": 1}).json()["choices"][0]
    assert (cut["text"], cut["finish_reason"]) == (want[: want.index(want[2:4])], "stop")
    default = client.post("/v1/completions", json={"prompt": ["Once upon a time"], "temperature": 0}).json()
    assert default["usage"]["completion_tokens"] <= protocol.COMPLETION_MAX_TOKENS  # OpenAI's default of 16


def test_models_health_and_metrics(client, llm) -> None:
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
    assert models["data"][0]["max_model_len"] == llm.max_context
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    chat(client, max_tokens=3, temperature=0)
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.text.splitlines()
        if line and not line.startswith("#")
    }
    assert values['qwen_export_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 1
    assert values["qwen_export_completion_tokens_total"] >= 3 and values["qwen_export_queue_depth"] == 0
    assert values["qwen_export_time_to_first_token_seconds_count"] >= 1
    assert (
        values['qwen_export_time_to_first_token_seconds_bucket{le="+Inf"}']
        == (values["qwen_export_time_to_first_token_seconds_count"])
    )
    assert values["qwen_export_time_per_output_token_seconds_count"] >= 1


def test_bad_requests_are_openai_errors(client, llm) -> None:
    assert "does not exist" in assert_error(chat(client, model="gpt-4"), 400, "model", "model_not_found")
    assert "n=1" in assert_error(chat(client, n=2), 400, "n")
    long = [{"role": "user", "content": "hello " * llm.max_context}]
    too_long = client.post("/v1/chat/completions", json={"model": MODEL, "messages": long})
    assert_error(too_long, 400, "messages", "context_length_exceeded")
    long_prompt = client.post("/v1/completions", json={"prompt": "hello " * llm.max_context})
    assert_error(long_prompt, 400, "prompt", "context_length_exceeded")
    assert "temperature" in assert_error(chat(client, temperature=-1), 400)
    assert_error(chat(client, max_tokens=4, max_completion_tokens=4), 400)
    assert "logprobs" in assert_error(chat(client, logprobs="yes"), 400, "logprobs")
    assert "needs logprobs" in assert_error(chat(client, top_logprobs=2), 400, "top_logprobs")
    assert "0..20" in assert_error(chat(client, logprobs=True, top_logprobs=21), 400, "top_logprobs")
    body = {"model": MODEL, "prompt": "Hi", "logprobs": 2}
    assert "logprobs" in assert_error(client.post("/v1/completions", json=body), 400, "logprobs")
    assert "frobnicate" in assert_error(chat(client, frobnicate=1), 400, "frobnicate")
    assert "image_url" in assert_error(
        chat(client, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400
    )
    assert "tool_choice" in assert_error(chat(client, tool_choice="required"), 400)
    not_json = client.post("/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert "not valid JSON" in assert_error(not_json, 400)
    assert_error(client.get("/v1/nothing"), 404)
    big = client.post("/v1/completions", content=b"x" * (9 << 20), headers={"content-type": "application/json"})
    assert_error(big, 413)
    neutral = chat(client, max_tokens=1, logit_bias={}, top_logprobs=0, n=1, user="u", presence_penalty=0)
    assert neutral.status_code == 200, neutral.text  # neutral values of unsupported options are accepted
    assert chat(client, max_tokens=2).status_code == 200  # the server is still fine


def test_api_key(llm) -> None:
    with TestClient(create_app(llm, api_key="sekret", model_name=MODEL)) as keyed:
        assert "API key" in assert_error(keyed.get("/v1/models"), 401, None, "invalid_api_key")
        wrong = keyed.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert_error(wrong, 401, None, "invalid_api_key")
        assert_error(keyed.post("/v1/chat/completions", json={"messages": ASK}), 401, None, "invalid_api_key")
        assert keyed.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert keyed.get("/health").status_code == 200  # health and metrics stay open to probes
    with pytest.raises(OptionError, match="api_key"):
        create_app(llm, api_key="")


def test_full_queue_is_429(client) -> None:
    worker = client.app.state.server.worker
    release, started = threading.Event(), threading.Event()

    def blocked(_: Any) -> Any:
        started.set()
        release.wait(10)
        raise OptionError("released")

    seen: list[Any] = []
    jobs = [Job(blocked, seen.append), Job(blocked, seen.append)]  # one runs, one waits (--max-queue 1)
    for job in jobs:
        worker.submit(job)
    try:
        assert started.wait(10)
        assert "qwen_export_queue_depth 1" in client.get("/metrics").text
        assert "--max-queue 1" in assert_error(chat(client, max_tokens=2), 429, None, "queue_full")
    finally:
        release.set()
    deadline = time.monotonic() + 10
    while len(seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [event.kind for event in seen] == [EventKind.ERROR, EventKind.ERROR]
    assert chat(client, max_tokens=2).status_code == 200


def test_cancelled_job_stops_its_generation(client, llm) -> None:
    worker = client.app.state.server.worker
    seen: list[Any] = []
    done = threading.Event()

    def sink(event: Any) -> None:
        seen.append(event)
        if event.kind is EventKind.PIECE and len(seen) == 3:  # STARTED, then two pieces
            job.cancel()
        if event.kind in (EventKind.DONE, EventKind.ERROR):
            done.set()

    job = Job(lambda model: model.stream("Once upon a time", max_tokens=200, temperature=0), sink)
    worker.submit(job)
    assert done.wait(30)
    assert seen[-1].kind is EventKind.DONE and seen[-1].value is None  # no result: cancelled
    assert len(seen) <= 5
    assert "qwen_export_cancelled_total 1" in client.get("/metrics").text


def test_tool_calls_and_json_object(client) -> None:
    called = chat(client, tools=TOOLS, tool_choice="required", max_tokens=60, temperature=0).json()
    choice = called["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    calls = choice["message"]["tool_calls"]
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"])["city"] in ("Paris", "Rome")
    named = {"type": "function", "function": {"name": "get_weather"}}
    payloads = events(chat(client, tools=TOOLS, tool_choice=named, max_tokens=60, temperature=0, stream=True))
    deltas = [p["choices"][0]["delta"] for p in payloads[:-1]]
    streamed = [call for d in deltas for call in d.get("tool_calls", [])]
    assert [c["index"] for c in streamed] == [0] and streamed[0]["function"]["name"] == "get_weather"
    assert streamed[0]["id"] != calls[0]["id"]  # ids are unique
    assert "<tool_call>" not in "".join(d.get("content") or "" for d in deltas)
    assert payloads[-2]["choices"][0]["finish_reason"] == "tool_calls"
    document = chat(client, response_format={"type": "json_object"}, max_tokens=60, temperature=0).json()
    choice = document["choices"][0]
    assert choice["finish_reason"] == "stop" and isinstance(json.loads(choice["message"]["content"]), dict)


def test_reasoning_and_tool_text_shapes() -> None:
    timings = GenerationTimings(0.1, 0.1, 0.1)
    result = ChatResult("Hi.", (), "stop_token", 5, 4, 2, timings, "<think>why</think>Hi.", reasoning="why")
    message, reason = protocol.chat_message(result)
    assert message == {"role": "assistant", "content": "Hi.", "reasoning_content": "why"} and reason == "stop"
    chunks = ChatChunks(MODEL, include_usage=False, tools=False)
    first = json.loads(chunks.piece(ChatDelta(DeltaKind.REASONING, "why"))[0][6:])
    assert first["choices"][0]["delta"] == {"reasoning_content": "why"}
    call = protocol.parse_chat(
        {"messages": ASK, "chat_template_kwargs": {"enable_thinking": False}}, MODEL, max_context=64
    )
    assert call.enable_thinking is False and call.options == {"max_new_tokens": 64}
    assert [safe_end(t) for t in ("abc", "abc<", "abc<tool_c", "ab<tool_call>{", "a<b")] == [3, 3, 3, 2, 3]


def test_503_while_loading_then_ready(export, llm, monkeypatch) -> None:
    import qwen_export.runtime.llm as runtime_llm

    release = threading.Event()

    def slow_load(path: Any, **options: Any) -> Any:
        release.wait(10)
        return llm

    monkeypatch.setattr(runtime_llm, "load", slow_load)
    with TestClient(create_app(export("qwen2_tied"))) as loading:
        health = loading.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        assert_error(loading.post("/v1/chat/completions", json={"messages": ASK}), 503, None, "model_loading")
        release.set()
        deadline = time.monotonic() + 10
        while loading.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        served = loading.get("/v1/models").json()["data"][0]["id"]
        assert served == "qwen2_tied-fp32-last-onnxruntime"  # the artifact directory's name
        assert loading.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 2}).status_code == 200

    def failing_load(path: Any, **options: Any) -> Any:
        raise OptionError("no such engine")

    monkeypatch.setattr(runtime_llm, "load", failing_load)
    with TestClient(create_app(export("qwen2_tied"))) as broken:
        deadline = time.monotonic() + 10
        while broken.get("/health").json()["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "no such engine" in broken.get("/health").json()["error"]
        assert "no such engine" in assert_error(broken.post("/v1/completions", json={"prompt": "x"}), 503)


def test_cli_serve_errors(tmp_path, monkeypatch) -> None:
    from qwen_export.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["serve", str(tmp_path)])
    assert result.exit_code == 2 and "not an exported artifact" in result.output
    (tmp_path / "manifest.json").write_text("{}")
    result = runner.invoke(app, ["serve", str(tmp_path), "--image-root", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "--image-root" in result.output and "not a directory" in result.output
    (tmp_path / "manifest.json").unlink()
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    result = runner.invoke(app, ["serve", str(tmp_path)])
    assert result.exit_code == 2 and 'serving needs uvicorn: pip install "qwen-export[serve]"' in result.output


class _SlowStream:
    """A runtime stream that takes 20 ms a piece: long enough to disconnect in the middle."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def __iter__(self) -> _SlowStream:
        return self

    def __next__(self) -> Any:
        time.sleep(0.02)
        return next(self._stream)

    def cancel(self) -> None:
        self._stream.cancel()

    close = cancel

    @property
    def result(self) -> Any:
        return self._stream.result


class _SlowLLM:
    def __init__(self, llm: qwen_export.LLM) -> None:
        self.artifact, self.max_context, self._llm = llm.artifact, llm.max_context, llm

    def stream(self, *args: Any, **options: Any) -> _SlowStream:
        return _SlowStream(self._llm.stream(*args, **options))

    def chat_stream(self, *args: Any, **options: Any) -> Any:
        raise RuntimeError("engine on fire")


@contextlib.contextmanager
def real_server(app: Any) -> Iterator[int]:
    """``app`` under uvicorn on a free loopback port (yielded), in a thread; stopped on exit."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.started
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)


def test_official_openai_client(llm) -> None:
    """The official ``openai`` client against the real server: plain, streamed, tools, json_schema, errors."""
    import openai

    with real_server(create_app(llm, api_key="sekret", model_name=MODEL)) as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sekret", max_retries=0)
        reply = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, temperature=0)
        want = llm.chat(ASK, max_tokens=5, temperature=0)
        assert reply.choices[0].message.content == want.text and reply.usage.completion_tokens == 5
        stream = client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=5, temperature=0, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
        assert chunks[-1].usage.completion_tokens == 5
        called = client.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=60, temperature=0
        )
        call = called.choices[0].message.tool_calls[0]
        assert called.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
        assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
        schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
        fmt = {"type": "json_schema", "json_schema": {"name": "ok", "schema": schema}}
        document = client.chat.completions.create(
            model=MODEL, messages=ASK, response_format=fmt, max_tokens=40, temperature=0
        )
        assert isinstance(json.loads(document.choices[0].message.content)["ok"], bool)
        text = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4, temperature=0)
        assert text.choices[0].text == llm.generate("Once upon a time", max_tokens=4, temperature=0)
        assert [m.id for m in client.models.list()] == [MODEL]
        with pytest.raises(openai.BadRequestError, match="only n=1"):
            client.chat.completions.create(model=MODEL, messages=ASK, n=2)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=client.base_url, api_key="nope", max_retries=0).models.list()


def test_real_server_batches_concurrent_requests(llm) -> None:
    """``max_batch=4``: concurrent clients (the official ``openai`` client) decode together and get
    the replies they get alone; a client that hangs up frees its row; the server ends idle."""
    import openai

    asks = [[{"role": "user", "content": f"Question {i}: " + "why? " * (3 * i)}] for i in range(5)]
    want = [llm.chat(messages, max_tokens=12, temperature=0).text for messages in asks]
    got: list[Any] = [None] * len(asks)
    with real_server(create_app(llm, model_name=MODEL, max_batch=4)) as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        start = threading.Barrier(len(asks) + 1)

        def ask(i: int) -> None:
            start.wait()
            reply = client.chat.completions.create(model=MODEL, messages=asks[i], max_tokens=12, temperature=0)
            got[i] = reply.choices[0].message.content

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
        for thread in threads:
            thread.start()
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        body = json.dumps({"prompt": "Once upon a time", "max_tokens": 200, "stream": True})
        start.wait()
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")
        conn.sock.shutdown(socket.SHUT_RDWR)  # abandoned while the others run
        conn.close()
        for thread in threads:
            thread.join(60)
        assert got == want
        batched = llm.batched(4)
        assert batched.scheduler.steps < 5 * 12  # decoded together: fewer steps than tokens
        deadline = time.monotonic() + 5
        while batched.scheduler.load != (0, 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert batched.scheduler.load == (0, 0) and not batched.scheduler.rows.table.taken.any()
    assert batched.closed  # the server's shutdown stopped the scheduler


@pytest.mark.parametrize("max_batch", [1, 2])
def test_logprobs_through_the_openai_client(llm, max_batch) -> None:
    """``logprobs`` / ``top_logprobs``: the library's figures, plain and streamed (one at a time and
    batched): each sampled token with its log-probability under the model and the likeliest
    alternatives, best first (greedy: the token is the first of them)."""
    import openai

    want = llm.chat(ASK, max_tokens=5, temperature=0, logprobs=3).logprobs
    assert len(want) == 5 and all(len(item.top) == 3 and item.top[0][0] == item.token_id for item in want)
    with real_server(create_app(llm, model_name=MODEL, max_batch=max_batch)) as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        ask = {"model": MODEL, "messages": ASK, "max_tokens": 5, "temperature": 0, "logprobs": True}
        reply = client.chat.completions.create(**ask, top_logprobs=3)
        content = reply.choices[0].logprobs.content
        assert [(c.token, c.bytes) for c in content] == [(w.token, list(w.token.encode())) for w in want]
        for got, expected in zip(content, want, strict=True):
            assert got.logprob == pytest.approx(expected.logprob, abs=1e-4) and got.logprob <= 0
            assert [t.token for t in got.top_logprobs] == [text for _, text, _ in expected.top]
            assert [t.logprob for t in got.top_logprobs] == sorted((t.logprob for t in got.top_logprobs), reverse=True)
        streamed = [
            c for c in client.chat.completions.create(**ask, stream=True) if c.choices and c.choices[0].logprobs
        ]
        tokens = [entry for chunk in streamed for entry in chunk.choices[0].logprobs.content]
        assert [t.token for t in tokens] == [w.token for w in want] and all(t.top_logprobs == [] for t in tokens)
        plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2)
        assert plain.choices[0].logprobs is None


def test_real_server_cancels_on_disconnect(llm) -> None:
    """uvicorn on a free loopback port: a client that hangs up, streamed or not, frees the worker."""
    import http.client

    body = {"prompt": "Once upon a time", "max_tokens": 200, "temperature": 0}

    def cancelled() -> float:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        return float(
            next(line for line in text.splitlines() if line.startswith("qwen_export_cancelled_total ")).split()[1]
        )

    def wait_for(count: float) -> None:
        deadline = time.monotonic() + 5
        while cancelled() < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cancelled() == count

    with real_server(create_app(_SlowLLM(llm), model_name=MODEL)) as port:
        for stream, count in ((True, 1), (False, 2)):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request(
                "POST", "/v1/completions", json.dumps({**body, "stream": stream}), {"Content-Type": "application/json"}
            )
            if stream:
                response = conn.getresponse()
                assert response.status == 200 and response.readline().startswith(b"data: ")
            else:
                time.sleep(0.3)
            conn.sock.shutdown(socket.SHUT_RDWR)
            conn.close()
            wait_for(count)  # long before the 200 tokens' 4 s
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request(
            "POST", "/v1/chat/completions", json.dumps({"messages": ASK}), {"Content-Type": "application/json"}
        )
        response = conn.getresponse()
        error = json.loads(response.read())["error"]
        assert response.status == 500 and error["type"] == "server_error" and "engine on fire" in error["message"]
        conn.close()


def _post(port: int, path: str, payload: bytes) -> tuple[int, bytes]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, payload, {"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


def _traffic_round(port: int, valid: bytes) -> tuple[list[Any], list[int]]:
    """4 clients sending 2 valid requests each while another sends bad JSON, an oversized body, a
    10,000-token prompt and streams it abandons after their first event."""
    import http.client

    replies: list[Any] = []
    bad: list[int] = []

    def good_client() -> None:
        for _ in range(2):
            status, data = _post(port, "/v1/chat/completions", valid)
            replies.append((status, json.loads(data)["choices"][0]["message"]["content"] if status == 200 else data))

    def bad_client() -> None:
        bad.append(_post(port, "/v1/chat/completions", b'{"messages": [')[0])
        bad.append(_post(port, "/v1/completions", b"x" * (9 << 20))[0])
        huge = json.dumps({"messages": [{"role": "user", "content": "hello " * 10_000}]}).encode()
        bad.append(_post(port, "/v1/chat/completions", huge)[0])
        for _ in range(2):  # a stream abandoned after its first event
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            body = json.dumps({"prompt": "Once upon a time", "max_tokens": 100, "stream": True})
            conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            bad.append(response.status)
            response.readline()
            conn.sock.shutdown(socket.SHUT_RDWR)
            conn.close()

    threads = [threading.Thread(target=good_client) for _ in range(4)] + [threading.Thread(target=bad_client)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return replies, bad


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("max_batch", [1, 4])
def test_real_server_under_concurrent_and_bad_traffic(llm, max_batch) -> None:
    """Valid requests from 4 clients at once, while another sends bad JSON, an oversized body, a
    10,000-token prompt and streams it abandons: every valid reply is right, every bad one a clean
    error, the server ends idle and healthy, and three rounds leave the memory where the first did
    (one at a time, and batched)."""
    valid = json.dumps({"model": MODEL, "messages": ASK, "max_tokens": 8, "temperature": 0}).encode()
    want = llm.chat(ASK, max_tokens=8, temperature=0).text
    with real_server(create_app(llm, model_name=MODEL, max_queue=8, max_batch=max_batch)) as port:

        def idle() -> bool:  # the abandoned streams' cancellation may still be on its way
            import http.client

            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
            conn.close()
            return "qwen_export_queue_depth 0\n" in text and "qwen_export_running_requests 0\n" in text

        rss = []
        for _ in range(3):
            replies, bad = _traffic_round(port, valid)
            assert replies == [(200, want)] * 8
            assert bad == [400, 413, 400, 200, 200]
            deadline = time.monotonic() + 5
            while not idle() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert idle()
            gc.collect()
            rss.append(_rss_bytes())
        assert rss[2] - rss[0] < 48 << 20, [r >> 20 for r in rss]  # MiB: no growth per round
        status, data = _post(port, "/v1/chat/completions", valid)
        assert status == 200 and json.loads(data)["choices"][0]["message"]["content"] == want


# ------------------------------------------------------------------ image parts (a VL model's server)
_PNG_URL = "data:image/png;base64,iVBORw0KGgo="


def _image_message(url: str) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]}
    ]


def test_image_policy_reads_data_urls_and_only_files_under_its_root(tmp_path) -> None:
    from qwen_export.serve.errors import APIError
    from qwen_export.serve.images import ImagePolicy, checked_image_parts

    root, outside = tmp_path / "images", tmp_path / "secret.png"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(b"x")
    outside.write_bytes(b"x")
    (root / "link.png").symlink_to(outside)
    given = _image_message(_PNG_URL)
    assert checked_image_parts(given, ImagePolicy())[0]["content"][0] == {
        "type": "image_url",
        "image_url": {"url": _PNG_URL},
    }
    assert given == _image_message(_PNG_URL)  # the request's own objects are untouched
    rooted = ImagePolicy(root)
    for name in ("sub/a.png", str(root / "sub" / "a.png"), "sub/../sub/a.png"):
        part = checked_image_parts(_image_message(name), rooted)[0]["content"][0]
        assert part["image_url"]["url"] == str((root / "sub" / "a.png").resolve())
    image_part = [{"role": "user", "content": [{"type": "image", "image": "sub/a.png"}]}]
    assert checked_image_parts(image_part, rooted)[0]["content"][0]["image_url"]["url"].endswith("a.png")
    refusals = [
        (ImagePolicy(), "http://example.com/cat.png", "does not fetch images"),
        (rooted, "file:///etc/passwd", "does not fetch images"),
        (ImagePolicy(), str(root / "sub" / "a.png"), "reads no local image files .*--image-root DIR"),
        (rooted, str(outside), "no image file .* under the server's --image-root"),
        (rooted, "../secret.png", "no image file .* under the server's --image-root"),
        (rooted, "link.png", "no image file .* under the server's --image-root"),  # a link out of the root
        (rooted, "missing.png", "no image file .* under the server's --image-root"),
        (rooted, "a\x00.png", "no image file .* under the server's --image-root"),
        (rooted, "~nosuchuser/a.png", "no image file .* under the server's --image-root"),
        (rooted, "sub", "no image file .* under the server's --image-root"),  # a directory
        (rooted, "data:text/plain;base64,eA==", "data:image/<type>;base64"),
        (rooted, "", "must be a data URL"),
    ]
    for policy, url, message in refusals:
        with pytest.raises(APIError, match=message) as caught:
            checked_image_parts(_image_message(url), policy)
        assert caught.value.status == 400, url
    with pytest.raises(OptionError, match="--image-root .*: not a directory"):
        ImagePolicy(root / "sub" / "a.png")


def test_parse_chat_takes_image_parts_only_for_a_vision_language_model(tmp_path) -> None:
    from qwen_export.serve.errors import APIError
    from qwen_export.serve.images import ImagePolicy

    body = {"model": MODEL, "messages": _image_message(_PNG_URL)}
    with pytest.raises(APIError, match="text parts only: the model is text-only"):
        protocol.parse_chat(body, MODEL, 64)
    call = protocol.parse_chat(body, MODEL, 64, ImagePolicy())
    assert call.messages[0]["content"][0]["image_url"]["url"] == _PNG_URL
    audio = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]
    with pytest.raises(APIError, match="'input_audio' is not supported"):
        protocol.parse_chat({"model": MODEL, "messages": audio}, MODEL, 64, ImagePolicy())


def test_text_model_server_refuses_images(client: TestClient) -> None:
    reply = client.post("/v1/chat/completions", json={"model": MODEL, "messages": _image_message(_PNG_URL)})
    assert reply.status_code == 400 and "text-only" in reply.json()["error"]["message"]
