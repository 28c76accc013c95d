"""Continuous batching: one scheduler thread decodes every admitted sequence together.

A :class:`Scheduler` owns a :class:`~qwen_export.targets.base.RowBatch` of ``max_rows`` rows on the
engine (``engine.open_rows``). Between two engine steps it

- retires what has ended (finished, cancelled: the row and its KV are freed at once, the others go on);
- admits waiting sequences into free rows, in arrival order;
- builds one step: every decoding row feeds its last sampled token, and rows still reading their
  prompt feed the next piece of it, at most ``prefill_tokens`` prompt tokens per step in all (so a
  long prompt is read over several steps while the others keep decoding);
- samples each row that has read its whole prompt with that request's own options (temperature,
  top-p, seed, stop, limit, structured-output constraint), through the same code as single-sequence
  generation (:class:`~qwen_export.runtime.generation.Decoding`, :func:`pick_token`).

Each row sits at its own positions (0 .. its length - 1, no padding), so greedy output is what the
sequence gives alone, up to the engine's batch-size rounding (tests/test_batching.py).

Prefix sharing: a new sequence whose prompt starts with at least ``MIN_SHARED_PREFIX`` tokens of a
running row's prompt (the same system prompt, the same conversation) gets a copy of that row's KV
for them (``RowBatch.copy_prefix``) instead of reading them, waiting a step if that row is still
reading them; they count as its reused (``cached``) tokens. Nothing is kept once the rows are gone
(no prefix cache across idle periods), and there is no speculative decoding here.

Consumers read a :class:`BatchStream` (the same surface as ``TextStream``): ``cancel()`` from any
thread frees the row before the next step.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from qwen_export.errors import GenerationError, OptionError
from qwen_export.runtime.generation import (
    Decoding,
    GenerationConfig,
    GenerationEvent,
    GenerationResult,
    checked_prompt,
)
from qwen_export.runtime.sampling import decodable_columns, pick_token
from qwen_export.targets.base import Engine, RowFeed, open_rows

if TYPE_CHECKING:
    from qwen_export.runtime.generation import TextDecoder
    from qwen_export.runtime.llm import LLM, ChatResult, ChatStream, Message
    from qwen_export.runtime.structured import Constraint

__all__ = ["DEFAULT_PREFILL_TOKENS", "BatchStream", "BatchedLLM", "Scheduler"]

#: prompt tokens read per scheduler step, over all the rows reading one
DEFAULT_PREFILL_TOKENS = 256
#: shortest prompt prefix a new row copies from a running row instead of reading it
MIN_SHARED_PREFIX = 8
_CANCELLED = object()


class BatchStream:
    """Text pieces of one batched generation; ``result`` once it has ended (None when cancelled
    first). ``cancel()`` / ``close()`` from any thread: the scheduler frees the row before its next step."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler
        self._events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._cancel = threading.Event()
        self._ended = False
        self.result: GenerationResult | None = None
        self.cancelled = False
        self.logprobs: list[Any] = []  # TokenLogprob of each token consumed so far (GenerationConfig.logprobs)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> str:
        while not self._ended:
            if self._cancel.is_set():  # what was generated meanwhile is dropped, as TextStream does
                self._ended, self.cancelled = True, True
                break
            item = self._events.get()
            if item is _CANCELLED:
                self._ended, self.cancelled = True, True
                break
            if isinstance(item, BaseException):
                self._ended = True
                raise item
            if item.result is not None:
                self.result, self._ended = item.result, True
            if item.logprob is not None:
                self.logprobs.append(item.logprob)
            if item.text:
                return str(item.text)
        raise StopIteration

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        if not self._cancel.is_set():
            self._cancel.set()
            self._scheduler.wake()

    def close(self) -> None:
        self.cancel()

    def __del__(self) -> None:  # an abandoned stream must not keep its row
        try:
            self.cancel()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


@dataclasses.dataclass(eq=False)
class _Sequence:
    prompt: list[int]
    decoding: Decoding
    rng: np.random.Generator
    stream: BatchStream
    row: int | None = None
    read: int = 0  # prompt tokens in the row
    shared: int = 0  # of which copied from another row (a shared prefix)

    @property
    def reading(self) -> bool:
        return self.read < len(self.prompt)

    def push(self, item: Any) -> None:
        self.stream._events.put(item)


class Scheduler:
    """Continuous batching over ``engine`` with ``max_rows`` rows (thread-safe ``submit``)."""

    def __init__(
        self, engine: Engine, tokenizer: TextDecoder, max_rows: int, prefill_tokens: int = DEFAULT_PREFILL_TOKENS
    ) -> None:
        if isinstance(prefill_tokens, bool) or not isinstance(prefill_tokens, int) or prefill_tokens < 1:
            raise OptionError(f"prefill_tokens must be an integer >= 1, got {prefill_tokens!r}")
        self.rows = open_rows(engine, max_rows)
        self.engine, self.tokenizer, self.max_rows = engine, tokenizer, max_rows
        self.prefill_tokens = prefill_tokens
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._running: list[_Sequence] = []
        self._cond = threading.Condition()
        self._closing = False
        self._decodable: np.ndarray | None = None
        self.steps = 0  # engine steps run (for tests and figures)
        self._thread = threading.Thread(target=self._loop, name="qwen-export-batching", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public, any thread
    def submit(
        self, prompt_ids: Sequence[int], config: GenerationConfig, constraint: Constraint | None = None
    ) -> BatchStream:
        """Queue one generation; its options and prompt are checked here (OptionError, GenerationError)."""
        config.validate()
        caps = self.engine.capabilities
        prompt = checked_prompt(prompt_ids, caps)
        stream = BatchStream(self)
        decoding = Decoding(self.tokenizer, prompt, config, constraint, caps.max_context, time.perf_counter())
        sequence = _Sequence(prompt, decoding, np.random.default_rng(config.seed), stream)
        with self._cond:
            if self._closing:
                raise GenerationError("the batching scheduler is closed")
            self._waiting.append(sequence)
            self._cond.notify()
        return stream

    @property
    def load(self) -> tuple[int, int]:
        """(waiting, running) sequences."""
        with self._cond:
            return len(self._waiting), len(self._running)

    @property
    def closed(self) -> bool:
        return self._closing

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def close(self, timeout: float = 10.0) -> None:
        """Cancel everything and stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the scheduler thread
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closing and not self._waiting and not self._running:
                    self._cond.wait()
                if self._closing:
                    break
                self._retire_cancelled()
                self._admit()
            if self._running:
                self._step()
        with self._cond:
            for sequence in [*self._waiting, *self._running]:
                self._end(sequence, _CANCELLED)
            self._waiting.clear()

    def _retire_cancelled(self) -> None:  # self._cond held
        for sequence in [s for s in self._waiting if s.stream.cancel_requested]:
            self._waiting.remove(sequence)
            sequence.push(_CANCELLED)
        for sequence in [s for s in self._running if s.stream.cancel_requested]:
            self._end(sequence, _CANCELLED)

    def _admit(self) -> None:  # self._cond held
        while self._waiting and len(self._running) < self.max_rows:
            sequence = self._waiting.popleft()
            sequence.row = self.rows.add_row()
            self._running.append(sequence)

    def _end(self, sequence: _Sequence, last: Any) -> None:
        """Free ``sequence``'s row and hand its stream ``last`` (cancelled, or an error)."""
        if sequence.row is not None:
            self.rows.drop_row(sequence.row)
            sequence.row = None
        if sequence in self._running:
            self._running.remove(sequence)
        if last is not None:
            sequence.push(last)

    def _feeds(self) -> list[tuple[_Sequence, RowFeed]]:
        """This step's feeds: every decoding row's last token; the reading rows' next prompt pieces,
        the budget split evenly between them (equal pieces run as one batch on some engines)."""
        feeds, budget = [], self.prefill_tokens
        ready = []
        for i, sequence in enumerate(self._running):
            assert sequence.row is not None
            if not sequence.reading:
                feeds.append((sequence, RowFeed(sequence.row, np.array(sequence.decoding.generated[-1:]))))
            elif sequence.read > 0 or self._share(sequence, self._running[:i]):
                ready.append(sequence)  # else an earlier row is reading the prefix it shares: it waits
        share = max(1, budget // max(1, len(ready)))
        for sequence in ready:
            assert sequence.row is not None
            if budget > 0:
                piece = sequence.prompt[sequence.read : sequence.read + min(budget, share)]
                budget -= len(piece)
                feeds.append((sequence, RowFeed(sequence.row, np.array(piece))))
        return feeds

    def _share(self, sequence: _Sequence, earlier: list[_Sequence]) -> bool:
        """Start ``sequence`` (nothing read yet) with a copy of the longest prompt prefix (at least
        MIN_SHARED_PREFIX tokens, never the whole prompt) it shares with an earlier row, once that
        row has read it; False when it should wait for that row to read it."""
        best, donor = 0, None
        for other in earlier:
            limit = min(len(other.prompt), len(sequence.prompt) - 1)
            same = np.flatnonzero(np.asarray(other.prompt[:limit]) != np.asarray(sequence.prompt[:limit]))
            common = int(same[0]) if same.size else limit
            if common > best:
                best, donor = common, other
        if donor is None or best < MIN_SHARED_PREFIX:
            return True
        if donor.read < best:
            return False
        assert donor.row is not None and sequence.row is not None
        self.rows.copy_prefix(donor.row, sequence.row, best)
        sequence.read = sequence.shared = best
        return True

    def _step(self) -> None:
        feeds = self._feeds()
        try:
            logits = self.rows.step([feed for _, feed in feeds])
        except Exception as exc:  # noqa: BLE001 - the engine failed: every fed sequence gets the error
            with self._cond:
                for sequence, _ in feeds:
                    self._end(sequence, exc)
            return
        self.steps += 1
        for (sequence, feed), row_logits in zip(feeds, logits, strict=True):
            if sequence.reading:
                sequence.read += feed.ids.size
                if sequence.reading:
                    continue
                sequence.decoding.prefilled(sequence.shared)
            self._sample(sequence, row_logits)

    def _sample(self, sequence: _Sequence, logits: np.ndarray) -> None:
        decoding = sequence.decoding
        try:
            token = pick_token(
                logits,
                decoding.config,
                [*sequence.prompt, *decoding.generated],
                sequence.rng,
                decoding.constraint,
                decoding.left,
                self._decodable_mask(logits.shape[-1]),
            )
            events: list[GenerationEvent] = decoding.accept(token, None, logits)
        except Exception as exc:  # noqa: BLE001 - e.g. a grammar with no allowed token: this request's error
            with self._cond:
                self._end(sequence, exc)
            return
        for event in events:
            sequence.push(event)
        if decoding.finished:
            with self._cond:
                self._end(sequence, None)

    def _decodable_mask(self, width: int) -> np.ndarray | None:
        if self._decodable is None or self._decodable.shape[0] != width:
            self._decodable = decodable_columns(self.tokenizer, width)
        return self._decodable


class BatchedLLM:
    """:class:`~qwen_export.runtime.llm.LLM`'s generation calls, thread-safe, run by a
    :class:`Scheduler` (build with ``llm.batched(max_batch)``). The requests go through the same
    translation as the single-sequence API (chat template, OpenAI shapes, tool-call and
    response-format constraints, per-request sampling options)."""

    def __init__(self, llm: LLM, max_batch: int, prefill_tokens: int = DEFAULT_PREFILL_TOKENS) -> None:
        self.llm, self.max_batch = llm, max_batch
        self.artifact, self.tokenizer, self.engine = llm.artifact, llm.tokenizer, llm.engine
        self.scheduler = Scheduler(llm.engine, llm.tokenizer, max_batch, prefill_tokens)

    @property
    def max_context(self) -> int:
        return self.llm.max_context

    def stream(
        self,
        prompt: str | Sequence[Message],
        *,
        response_format: Any = None,
        enable_thinking: bool | None = None,
        **sampling: Any,
    ) -> BatchStream:
        """As ``LLM.stream``."""
        ids = self.llm._prompt_ids(prompt, enable_thinking)
        config, constraint = self.llm._plan(response_format, sampling, None)
        return self.scheduler.submit(ids, config, constraint)

    def generate(self, prompt: str, *, response_format: Any = None, **sampling: Any) -> str:
        return "".join(self.stream(prompt, response_format=response_format, **sampling))

    def chat_stream(
        self,
        messages: Sequence[Message],
        tools: Any = None,
        response_format: Any = None,
        *,
        tool_choice: Any = None,
        enable_thinking: bool | None = None,
        **options: Any,
    ) -> ChatStream:
        """As ``LLM.chat_stream``."""
        from qwen_export.runtime.llm import ChatStream
        from qwen_export.runtime.reasoning import ReasoningSplitter

        plan = self.llm._chat_plan(messages, tools, response_format, tool_choice, enable_thinking, options)
        config, constraint = self.llm._plan(plan.response_format, plan.options, plan.constraint)
        stream = self.scheduler.submit(plan.ids, config, constraint)
        return ChatStream(stream, ReasoningSplitter(plan.opened), plan.parse_tool_calls)  # type: ignore[arg-type]

    def chat(
        self, messages: Sequence[Message], tools: Any = None, response_format: Any = None, **options: Any
    ) -> ChatResult:
        stream = self.chat_stream(messages, tools, response_format, **options)
        for _ in stream:
            pass
        if stream.result is None:
            raise GenerationError("the generation was cancelled")
        return stream.result

    @property
    def closed(self) -> bool:
        return self.scheduler.closed

    def close(self) -> None:
        """Cancel every request and stop the scheduler thread (``llm.batched()`` then builds a new one)."""
        self.scheduler.close()
