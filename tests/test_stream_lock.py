"""Class 4 of issue 20: a stream never leaves the LLM locked, whichever way and from whichever
thread it ends."""

from __future__ import annotations

import functools
import gc
import threading
import time
from pathlib import Path

import pytest

import qwen_export
from qwen_export.errors import GenerationError


@pytest.fixture(scope="module")
def llm(export) -> qwen_export.LLM:
    return qwen_export.load(export("qwen2_tied"))


def _lock_free(llm: qwen_export.LLM, timeout: float = 10.0) -> bool:
    if not llm._lock.acquire(timeout=timeout):
        return False
    llm._lock.release()
    return True


class _SlowSteps:
    """Wrap the engine's forward: signal when a step starts, and make it last ``seconds``."""

    def __init__(self, llm: qwen_export.LLM, monkeypatch: pytest.MonkeyPatch, seconds: float = 0.3) -> None:
        self.started = threading.Event()
        real = llm.engine.forward

        def forward(*args, **kwargs):
            self.started.set()
            time.sleep(seconds)
            return real(*args, **kwargs)

        monkeypatch.setattr(llm.engine, "forward", forward)


def test_cancel_without_iterating_again_frees_the_llm(llm: qwen_export.LLM) -> None:
    stream = llm.stream("Once upon a time", max_new_tokens=50, temperature=0)
    next(stream)
    stream.cancel()
    assert _lock_free(llm, timeout=2)
    assert stream.cancelled and list(stream) == []


@pytest.mark.parametrize("how", ["close", "cancel"])
def test_stop_from_another_thread_while_the_consumer_is_inside_a_step(
    llm: qwen_export.LLM, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    stream = llm.stream("Once upon a time", max_new_tokens=50, temperature=0)
    next(stream)  # prefill done
    slow = _SlowSteps(llm, monkeypatch)
    slow.started.clear()
    got: list[str] = []
    consumer = threading.Thread(target=lambda: got.append(next(stream, "<end>")))  # one step, then no more next()
    consumer.start()
    assert slow.started.wait(10)
    started = time.monotonic()
    getattr(stream, how)()  # from this thread, while the consumer is inside forward()
    assert time.monotonic() - started < 0.2  # does not wait for the step, let alone deadlock
    consumer.join(10)
    assert not consumer.is_alive() and len(got) == 1
    assert _lock_free(llm, timeout=5)  # released by the consumer when its step returned
    assert list(stream) == [] and stream.cancelled


def test_close_from_another_thread_while_the_consumer_loops(llm: qwen_export.LLM) -> None:
    stream = llm.stream("Once upon a time", max_new_tokens=200, temperature=0)
    pieces: list[str] = []
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            for piece in stream:
                pieces.append(piece)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    consumer = threading.Thread(target=consume)
    consumer.start()
    while not pieces and consumer.is_alive():
        time.sleep(0.001)
    stream.close()
    consumer.join(10)
    assert not consumer.is_alive() and errors == []
    assert _lock_free(llm)
    assert llm.generate("Hello", max_new_tokens=2, temperature=0) is not None


def test_never_iterated_stream_closed_elsewhere_or_dropped(llm: qwen_export.LLM) -> None:
    stream = llm.stream("Hi", max_new_tokens=5, temperature=0)
    closer = threading.Thread(target=stream.close)
    closer.start()
    closer.join(5)
    assert _lock_free(llm)
    stream = llm.stream("Hi", max_new_tokens=5, temperature=0)
    next(stream)
    del stream
    gc.collect()
    assert _lock_free(llm)


def test_error_inside_the_stream_frees_the_llm(llm: qwen_export.LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    stream = llm.stream("Hi", max_new_tokens=20, temperature=0)
    next(stream)

    def broken(*args, **kwargs):
        raise GenerationError("engine fell over")

    monkeypatch.setattr(llm.engine, "forward", broken)
    with pytest.raises(GenerationError, match="fell over"):
        list(stream)
    assert _lock_free(llm)
    stream.close()  # after the end: a no-op, and no second release
    assert _lock_free(llm)


def _race(barrier: threading.Barrier, failures: list[BaseException], action) -> None:
    try:
        barrier.wait(5)
        action()
    except BaseException as exc:  # noqa: BLE001 - reported by the caller
        failures.append(exc)


def test_racing_stops_release_the_lock_exactly_once(llm: qwen_export.LLM) -> None:
    for round_ in range(20):
        stream = llm.stream("Once upon a time", max_new_tokens=30, temperature=0)
        barrier = threading.Barrier(4)
        failures: list[BaseException] = []
        actions = [functools.partial(list, stream), stream.cancel, stream.close, stream.cancel]
        threads = [threading.Thread(target=_race, args=(barrier, failures, a)) for a in actions]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert not any(t.is_alive() for t in threads), round_
        assert not [f for f in failures if not isinstance(f, qwen_export.OptionError)], failures
        assert _lock_free(llm), round_
        assert not llm._lock.locked()


def test_a_second_thread_waits_and_then_runs(llm: qwen_export.LLM, tmp_path: Path) -> None:
    stream = llm.stream("Once upon a time", max_new_tokens=50, temperature=0)
    next(stream)
    done = threading.Event()
    threading.Thread(target=lambda: (llm.generate("x", max_new_tokens=1, temperature=0), done.set())).start()
    assert not done.wait(0.3)  # serialised: waits for the open stream
    stream.cancel()
    assert done.wait(20)
