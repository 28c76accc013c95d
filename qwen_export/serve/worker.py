"""The generation worker: ``max_batch`` threads take the requests from a bounded queue in arrival
order. With ``max_batch`` 1 one thread runs them one at a time on the ``LLM`` (its single-sequence
API, with its prefix cache across turns); with more, each thread drives one request's stream on
``llm.batched(max_batch)``, whose scheduler decodes them together (continuous batching). The event
loop hands a :class:`Job` to :meth:`Worker.submit` and reads its :class:`Event` s; cancelling a job
(its client went away) stops its generation after the current token (its batch row is freed before
the next step), or drops it from the queue before it starts."""

from __future__ import annotations

import dataclasses
import enum
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from qwen_export.serve.errors import APIError, ErrorType
from qwen_export.serve.metrics import Metrics

__all__ = ["Event", "EventKind", "Job", "QueueFull", "Worker"]


class QueueFull(Exception):
    """Every queue slot is taken: the request is refused (HTTP 429)."""


class EventKind(enum.Enum):
    STARTED = "started"  # the request was accepted by the runtime (its options and prompt are valid)
    PIECE = "piece"  # a piece of the reply (a ChatDelta for chat, a str for completions)
    DONE = "done"  # the generation ended: value is its result (None when cancelled before the end)
    ERROR = "error"  # value is the exception; nothing follows


@dataclasses.dataclass(frozen=True)
class Event:
    kind: EventKind
    value: Any = None
    logprobs: tuple[Any, ...] = ()  # PIECE: TokenLogprob of the tokens generated since the last piece


class Job:
    """One generation: ``start(llm)`` opens its stream (``LLM.chat_stream`` or ``LLM.stream``) on the
    worker thread; each :class:`Event` goes to ``sink`` (called on the worker thread)."""

    def __init__(self, start: Callable[[Any], Any], sink: Callable[[Event], None]) -> None:
        self.start, self._sink = start, sink
        self.arrived = time.perf_counter()
        self._cancel = threading.Event()
        self._stream: Any = None

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Stop this job (from any thread): dropped if it has not started, else stopped after the
        current token (the runtime's stream cancel is thread-safe)."""
        self._cancel.set()
        stream = self._stream
        if stream is not None:
            stream.cancel()

    def attach(self, stream: Any) -> None:
        self._stream = stream
        if self.cancelled:  # cancelled while it was starting
            stream.cancel()

    def emit(self, kind: EventKind, value: Any = None, logprobs: tuple[Any, ...] = ()) -> None:
        try:
            self._sink(Event(kind, value, logprobs))
        except RuntimeError:  # the client's event loop is gone
            self.cancel()


class Worker:
    """Runs up to ``max_batch`` jobs at once (``llm.batched(max_batch)`` when more than one); at
    most ``max_queue`` wait."""

    def __init__(self, llm: Any, metrics: Metrics, max_queue: int, max_batch: int = 1) -> None:
        self.llm = llm if max_batch == 1 else llm.batched(max_batch)
        self.metrics, self.max_queue, self.max_batch = metrics, max_queue, max_batch
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending: list[Job] = []  # waiting or running, in order
        self._running: set[Job] = set()
        self._closing = False
        self._threads = [
            threading.Thread(target=self._loop, name=f"qwen-export-serve-worker-{i}", daemon=True)
            for i in range(max_batch)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._closing:
                raise APIError(503, "the server is shutting down", ErrorType.UNAVAILABLE)
            if len(self._pending) >= self.max_queue + self.max_batch:
                waiting = len(self._pending) - len(self._running)
                raise QueueFull(f"{waiting} requests are waiting (--max-queue {self.max_queue})")
            self._pending.append(job)
            self._publish()
        self._jobs.put(job)

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel every job, let the thread end (within ``timeout`` seconds)."""
        with self._lock:
            self._closing = True
            pending = list(self._pending)
        for job in pending:
            job.cancel()
        for _ in self._threads:
            self._jobs.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))
        close = getattr(self.llm, "close", None)  # the batching scheduler's thread
        if close is not None and self.max_batch > 1:
            close()

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._pending) - len(self._running)

    def _publish(self) -> None:  # self._lock held
        running = len(self._running)
        self.metrics.set_queue(len(self._pending) - running, running)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            with self._lock:
                self._running.add(job)
                self._publish()
            try:
                self._run(job)
            finally:
                with self._lock:
                    self._running.discard(job)
                    self._pending.remove(job)
                    self._publish()

    def _run(self, job: Job) -> None:
        if job.cancelled:  # its client went away (or the server is stopping) while it waited
            self._account(job, None, time.perf_counter())
            job.emit(
                EventKind.ERROR, APIError(503, "the request was cancelled before it started", ErrorType.UNAVAILABLE)
            )
            return
        try:
            stream = job.start(self.llm)
        except Exception as exc:  # noqa: BLE001 - bad options or prompt: the client's error
            job.emit(EventKind.ERROR, exc)
            return
        job.attach(stream)
        job.emit(EventKind.STARTED)
        started = time.perf_counter()
        logprobs, sent = getattr(stream, "logprobs", []), 0  # it grows as the stream is consumed
        try:
            for piece in stream:
                seen = len(logprobs)
                job.emit(EventKind.PIECE, piece, tuple(logprobs[sent:seen]))
                sent = seen
        except Exception as exc:  # noqa: BLE001 - a failure mid-generation
            job.emit(EventKind.ERROR, exc)
            return
        finally:
            stream.close()
        result = stream.result
        self._account(job, result, started)
        job.emit(EventKind.DONE, result)

    def _account(self, job: Job, result: Any, started: float) -> None:
        now = time.perf_counter()
        if result is None:  # cancelled before the end
            self.metrics.finished(0, 0, 0, 0.0, now - job.arrived, cancelled=True)
            return
        timings = result.timings
        self.metrics.first_token(started - job.arrived + timings.time_to_first_token_s)
        self.metrics.finished(
            result.prompt_tokens,
            result.completion_tokens,
            result.reused_tokens,
            timings.decode_s,
            now - job.arrived,
            cancelled=False,
        )
