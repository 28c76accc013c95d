"""Continuous batching (qwen_export/runtime/batching.py, the engines' RowBatch): every sequence of a
batch gives what it gives alone, whatever the other rows hold, when they arrive or leave."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

import qwen_export
from qwen_export.errors import GenerationError, OptionError
from qwen_export.runtime.loader import open_artifact
from qwen_export.targets.base import RowFeed, open_rows

ENGINES = ("onnxruntime", "openvino")
LENGTHS = (5, 17, 17, 3, 40, 9)  # prompt lengths
ARRIVALS = (0, 2, 2, 4, 6, 8)  # the step before which each arrives (two together: one batch of pieces)


@pytest.fixture(scope="module")
def artifacts(export) -> dict[str, Path]:
    return {"onnxruntime": export("qwen2_tied"), "openvino": export("qwen2_tied", target="openvino")}


def solo(engine, prompt: np.ndarray, steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and the logits that chose them, the sequence alone on the engine's own cache."""
    engine.reset()
    tokens, chosen = [], []
    logits = engine.forward(prompt[None, :])[0, -1]
    for _ in range(steps):
        chosen.append(logits)
        tokens.append(int(np.argmax(logits)))
        logits = engine.forward(np.array([[tokens[-1]]]))[0, -1]
    return tokens, chosen


@pytest.mark.parametrize("name", ENGINES)
def test_rows_decode_as_alone_with_staggered_arrivals_and_departures(artifacts, name) -> None:
    engine = open_artifact(artifacts[name]).engine
    vocab = engine.capabilities.vocab_size
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, vocab, n) for n in LENGTHS]
    limits = [8, 3, 5, 8, 6, 8]  # rows 1 and 2 leave early; rows 4 and 5 then take their places
    rows = open_rows(engine, 4)
    assigned: dict[int, int] = {}
    active: set[int] = set()
    got: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    seen: dict[int, list[np.ndarray]] = {i: [] for i in range(len(prompts))}
    for step in range(40):
        feeds = []
        for i, prompt in enumerate(prompts):
            if i not in assigned and step >= ARRIVALS[i] and len(active) < 4:
                assigned[i] = rows.add_row()
                active.add(i)
                feeds.append((i, RowFeed(assigned[i], prompt)))
            elif i in assigned and 0 < len(got[i]) < limits[i]:
                feeds.append((i, RowFeed(assigned[i], np.array([got[i][-1]]))))
        if not feeds:
            break
        for (i, _), logits in zip(feeds, rows.step([f for _, f in feeds]), strict=True):
            seen[i].append(logits)
            got[i].append(int(np.argmax(logits)))
            if len(got[i]) == limits[i]:
                assert rows.row_tokens(assigned[i]) == len(prompts[i]) + limits[i] - 1
                rows.drop_row(assigned[i])
                active.discard(i)
    assert sorted(assigned.values()) == [0, 0, 1, 1, 2, 3]  # freed rows are reused
    for i, prompt in enumerate(prompts):
        want, logits = solo(engine, prompt, limits[i])
        assert got[i] == want, i
        scale = max(float(np.abs(w).max()) for w in logits)
        assert max(float(np.abs(a - b).max()) for a, b in zip(seen[i], logits, strict=True)) <= 1e-4 * scale


def test_row_errors_are_one_line(artifacts) -> None:
    engine = open_artifact(artifacts["onnxruntime"]).engine
    rows = open_rows(engine, 2)
    a, b = rows.add_row(), rows.add_row()
    with pytest.raises(GenerationError, match="all 2 rows are taken"):
        rows.add_row()
    with pytest.raises(GenerationError, match="fed twice"):
        rows.step([RowFeed(a, np.array([1])), RowFeed(a, np.array([2]))])
    with pytest.raises(GenerationError, match="out of range"):
        rows.step([RowFeed(b, np.array([engine.capabilities.vocab_size]))])
    rows.drop_row(b)
    with pytest.raises(GenerationError, match="row 1 is not taken"):
        rows.row_tokens(b)
    with pytest.raises(OptionError, match="max_rows"):
        open_rows(engine, 0)
    stateful = open_artifact(artifacts["openvino"], qwen_export.runtime.llm.runtime_options(attention="stateful"))
    with pytest.raises(OptionError, match="attention=paged"):
        open_rows(stateful.engine, 2)


def test_unfused_and_tensorrt_engines_refuse_batching_clearly(export) -> None:
    engine = open_artifact(export("qwen2_tied", fuse=False)).engine
    with pytest.raises(OptionError, match="concat"):
        open_rows(engine, 2)
    from qwen_export.targets.tensorrt.engine import TensorRTEngine

    with pytest.raises(OptionError, match="TensorRT engine does not batch"):
        TensorRTEngine.open_rows(object(), 2)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ENGINES)
def test_batched_llm_serves_concurrent_requests_as_alone(artifacts, name) -> None:
    """Threads arriving at different times with their own options (greedy, seeded sampling, stop
    strings, limits, a JSON schema) get the single-sequence API's exact output."""
    llm = qwen_export.load(artifacts[name])
    document = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    schema = {"type": "json_schema", "json_schema": {"name": "n", "schema": document | {"additionalProperties": False}}}
    asks = [
        ("Once upon a time", {"max_tokens": 12, "temperature": 0}),
        ("The sea " * 30, {"max_tokens": 7, "temperature": 0.8, "top_p": 0.9, "seed": 3}),
        ("Hello", {"max_tokens": 10, "temperature": 1.2, "seed": 11}),
        ("Why? " * 4, {"max_tokens": 9, "temperature": 0, "repetition_penalty": 1.3}),
        ("A list:", {"max_tokens": 40, "temperature": 0, "response_format": schema}),
    ]
    want = [llm.generate(prompt, **options) for prompt, options in asks]
    cut = want[0][3:6]
    asks.append(("Once upon a time", {"max_tokens": 12, "temperature": 0, "stop": [cut]}))
    want.append(want[0][: want[0].index(cut)])
    batched = llm.batched(3, prefill_tokens=16)  # fewer rows than requests: some wait; long prompts read in pieces
    got: list[str | None] = [None] * len(asks)

    def ask(i: int) -> None:
        time.sleep(0.01 * i)
        prompt, options = asks[i]
        got[i] = batched.generate(prompt, **options)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert got == want
    assert batched.scheduler.load == (0, 0)
    reply = batched.chat([{"role": "user", "content": "hi"}], max_tokens=6, temperature=0)
    assert reply.text == llm.chat([{"role": "user", "content": "hi"}], max_tokens=6, temperature=0).text
    assert llm.batched(3) is batched
    with pytest.raises(OptionError, match="already batches 3"):
        llm.batched(4)


def test_long_prompt_does_not_stall_the_others_and_cancel_frees_the_row(artifacts) -> None:
    llm = qwen_export.load(artifacts["onnxruntime"])
    batched = llm.batched(2, prefill_tokens=8)
    scheduler = batched.scheduler
    short = batched.stream("Once upon a time", max_tokens=30, temperature=0)
    next(short)
    before = scheduler.steps
    long = batched.stream("word " * 120, max_tokens=2, temperature=0)  # 120+ tokens: 15+ steps to read
    pieces = [next(short) for _ in range(10)]  # the short one keeps decoding while the long one reads
    assert len(pieces) == 10 and scheduler.steps - before < 16 and long.result is None
    long_text = "".join(long)
    assert long_text == llm.generate("word " * 120, max_tokens=2, temperature=0)
    short.cancel()
    assert list(short) == [] and short.cancelled and short.result is None
    deadline = time.monotonic() + 5
    while scheduler.load != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert scheduler.load == (0, 0) and not scheduler.rows.table.taken.any()
    assert scheduler.rows.kv_bytes == 0  # idle: the KV buffers are released
    waiting = [batched.stream("Hi", max_tokens=50, temperature=0) for _ in range(3)]
    waiting[2].cancel()  # cancelled before it got a row: never runs
    assert list(waiting[2]) == [] and waiting[2].cancelled
    assert all("".join(s) for s in waiting[:2])
    batched.close()
    with pytest.raises(GenerationError, match="closed"):
        batched.stream("Hi", max_tokens=2)


@pytest.mark.parametrize("name", ENGINES)
def test_rows_share_a_common_prompt_prefix(artifacts, name) -> None:
    """Requests arriving together with the same long system prompt: the later ones copy its KV from
    the first row (reported as reused tokens) and still give what they give alone."""
    llm = qwen_export.load(artifacts[name])
    system = "You are a careful assistant who answers in one short sentence. " * 3
    prompts = [system + ending for ending in ("Why is the sky blue?", "Name a prime.", "Hi")]
    want = [llm.generate(prompt, max_tokens=8, temperature=0) for prompt in prompts]
    batched = llm.batched(4, prefill_tokens=16)
    streams = [batched.stream(prompt, max_tokens=8, temperature=0) for prompt in prompts]
    assert ["".join(stream) for stream in streams] == want
    reused = [stream.result.reused_tokens for stream in streams]
    shared = len(llm.tokenizer.encode(system)) - 2  # the prefix's last token may merge with what follows
    assert reused[0] == 0 and all(r >= shared for r in reused[1:]), reused
    batched.close()
