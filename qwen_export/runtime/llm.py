"""The embedded runtime: ``qwen_export.load(path) -> LLM``; generate, stream and chat over any engine.

Thread safety: an ``LLM`` runs one generation at a time. Calls from several threads are
serialised by a lock (a second caller waits); a stream holds the lock until it is exhausted,
cancelled or closed. For concurrent requests use ``llm.batched(max_batch)``: the same calls,
thread-safe, decoded together by a continuous-batching scheduler (the server's entry point).

Example (``ARTIFACT`` is an exported artifact directory)::

    >>> import qwen_export
    >>> llm = qwen_export.load(ARTIFACT)
    >>> result = llm.chat([{"role": "user", "content": "Hi!"}], max_new_tokens=8, temperature=0)
    >>> result.finish_reason in ("stop_token", "length"), result.completion_tokens <= 8
    (True, True)
    >>> reply = llm.chat(
    ...     [{"role": "user", "content": "Give me a number"}],
    ...     response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": {
    ...         "type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
    ...         "required": ["n"], "additionalProperties": False}}},
    ...     max_new_tokens=32, temperature=0)
    >>> import json; sorted(json.loads(reply.text))
    ['n']
    >>> stream = llm.stream("Once upon a time", max_new_tokens=4, temperature=0)
    >>> pieces = list(stream)
    >>> stream.result.completion_tokens
    4
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwen_export import targets
from qwen_export.errors import OptionError
from qwen_export.runtime.chat import ToolCall, parse_tool_calls
from qwen_export.runtime.generation import (
    GenerationConfig,
    GenerationEvent,
    GenerationResult,
    GenerationTimings,
    Generator,
)
from qwen_export.runtime.loader import LoadedArtifact, RuntimeOptions, open_artifact
from qwen_export.runtime.openai_shapes import ToolChoiceMode, generation_options, prepare_chat
from qwen_export.runtime.reasoning import ChatDelta, ReasoningSplitter
from qwen_export.runtime.sampling import TokenLogprob
from qwen_export.runtime.speculative import Speculation, Speculator, make_speculator
from qwen_export.spec import Target

if TYPE_CHECKING:
    from qwen_export.runtime.batching import BatchedLLM
    from qwen_export.runtime.structured import Constraint, ResponseFormat

Message = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class ChatResult:
    """A chat turn: the reply text (tool-call blocks removed), its parsed tool calls and accounting."""

    text: str
    tool_calls: tuple[ToolCall, ...]
    finish_reason: str  # stop_token | stop_string | length | context | cancelled
    prompt_tokens: int
    completion_tokens: int
    reused_tokens: int  # prompt tokens served from the KV cache of earlier turns
    timings: GenerationTimings
    raw_text: str  # the reply as generated, tool-call blocks and the <think> part included
    reasoning: str | None = None  # the <think> part (Qwen3), tags removed; None when there was none
    # False when a response_format document was cut off (finish_reason length/context/stop_string/
    # cancelled): ``text`` is then not valid JSON. True otherwise (and always without response_format).
    complete: bool = True
    logprobs: tuple[TokenLogprob, ...] = ()  # with the logprobs option: one per generated token

    def message(self) -> dict[str, Any]:
        """The assistant message to append to the conversation for the next turn, in OpenAI's shape
        (tool-call ``arguments`` as a JSON string). The reasoning goes in ``reasoning_content``,
        where the chat template decides whether the model sees it again (Qwen3's keeps it only
        within the current tool-calling exchange, never once a new user message follows)."""
        out: dict[str, Any] = {"role": "assistant", "content": self.text}
        if self.reasoning:
            out["reasoning_content"] = self.reasoning
        good = [c for c in self.tool_calls if c.error is None]
        if good:
            out["tool_calls"] = [c.to_openai() for c in good]
        return out


@dataclasses.dataclass(frozen=True)
class ChatPlan:
    """A chat turn ready to generate: prompt ids, the response format and options left to apply,
    the tool-call constraint, whether the prompt opens a ``<think>`` block, whether to parse calls."""

    ids: list[int]
    response_format: Any
    options: dict[str, Any]
    constraint: Any
    opened: bool
    parse_tool_calls: bool


class TextStream:
    """Iterator of text pieces from one generation; ``result`` is set once it has finished.

    ``cancel()`` and ``close()`` may be called from any thread, at any time: the stream stops after
    the current token. The LLM's lock is released exactly once whenever the stream ends, by any
    route: exhausted, an error, ``cancel()``/``close()`` (at once when no thread is inside a step,
    otherwise by the consuming thread as soon as its step returns, without another ``next()``), or
    the stream being garbage-collected.
    """

    def __init__(self, llm: LLM, events: Iterator[GenerationEvent]) -> None:
        self._llm, self._events = llm, events
        self._cancel = threading.Event()
        self._state = threading.Lock()  # guards _running / _finished
        self._running = False  # a thread is inside next(self._events)
        self._finished = False
        self.result: GenerationResult | None = None
        self.cancelled = False
        self.logprobs: list[TokenLogprob] = []  # of each token consumed so far (the logprobs option)

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        while True:
            with self._state:
                if self._finished:
                    raise StopIteration
                if self._cancel.is_set():
                    self._finish(cancelled=True)
                    raise StopIteration
                if self._running:
                    raise OptionError("a stream is consumed by one thread at a time")
                self._running = True
            try:
                event = next(self._events)
            except BaseException as exc:  # StopIteration, or e.g. GenerationError past the context
                with self._state:
                    self._finish(cancelled=False)
                if isinstance(exc, StopIteration):
                    raise StopIteration from None
                raise
            with self._state:
                self._running = False
                if event.result is not None:
                    self.result = event.result
                if event.logprob is not None:
                    self.logprobs.append(event.logprob)
                if self._cancel.is_set():  # cancelled or closed while this step ran: end now
                    self._finish(cancelled=True)
            if event.text:
                return event.text

    def cancel(self) -> None:
        """Stop after the current token (from any thread); the LLM is free again once it has stopped."""
        self._stop(cancelled=True)

    def close(self) -> None:
        """Like :meth:`cancel`; a no-op on a finished stream."""
        self._stop(cancelled=True)

    def _stop(self, cancelled: bool) -> None:
        self._cancel.set()
        with self._state:
            if not self._finished and not self._running:  # else the consuming thread finishes it
                self._finish(cancelled)

    def _finish(self, cancelled: bool) -> None:
        """End the stream (``self._state`` held): close the generation, release the LLM, once."""
        if self._finished:
            return
        self._finished, self._running = True, False
        self.cancelled = self.cancelled or (cancelled and self.result is None)
        try:
            close = getattr(self._events, "close", None)
            if close is not None:
                close()
        finally:
            self._llm._lock.release()

    def __del__(self) -> None:  # an abandoned stream must not keep the LLM locked
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class ChatStream:
    """Iterator of :class:`ChatDelta` pieces of one chat turn: ``reasoning`` (inside Qwen3's
    ``<think>``) or ``content`` (the reply, tool-call blocks included as text); ``result`` is the
    :class:`ChatResult` once it has finished (None when cancelled or closed before its end: the
    deltas received are the partial reply). ``cancel()`` / ``close()`` as :class:`TextStream`."""

    def __init__(self, stream: TextStream, splitter: ReasoningSplitter, tools: bool) -> None:
        self._stream, self._splitter, self._tools = stream, splitter, tools
        self._pending: list[ChatDelta] = []
        self._raw: list[str] = []
        self._done = False
        self.result: ChatResult | None = None

    def __iter__(self) -> ChatStream:
        return self

    def __next__(self) -> ChatDelta:
        while not self._pending:
            if self._done:
                raise StopIteration
            try:
                piece = next(self._stream)
            except StopIteration:
                self._done = True
                self._pending += self._splitter.finish()
                self._finish()
                continue
            self._raw.append(piece)
            self._pending += self._splitter.push(piece)
        return self._pending.pop(0)

    @property
    def logprobs(self) -> list[TokenLogprob]:
        """:class:`TokenLogprob` of each token generated so far (the ``logprobs`` option)."""
        return self._stream.logprobs

    def cancel(self) -> None:
        self._stream.cancel()

    def close(self) -> None:
        self._stream.close()

    def _finish(self) -> None:
        result, raw = self._stream.result, "".join(self._raw)
        if result is None:  # cancelled before the first token finished
            return
        content = "".join(self._splitter.content)
        reasoning = "".join(self._splitter.reasoning) if self._splitter.saw_reasoning else None
        content, calls = parse_tool_calls(content) if self._tools else (content, ())
        cancelled = self._stream.cancelled
        self.result = ChatResult(
            text=content,
            tool_calls=calls,
            finish_reason="cancelled" if cancelled else result.finish_reason.value,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            reused_tokens=result.reused_tokens,
            timings=result.timings,
            raw_text=raw,
            reasoning=reasoning,
            complete=result.complete and not cancelled,
            logprobs=result.logprobs,
        )


class LLM:
    """A loaded artifact with its tokenizer and generation defaults. Build with :func:`load`."""

    def __init__(self, loaded: LoadedArtifact, speculator: Speculator | None = None) -> None:
        self.artifact = loaded
        self.tokenizer = loaded.tokenizer
        self.engine = loaded.engine
        self._generator = Generator(loaded.engine, loaded.tokenizer, speculator)
        self._lock = threading.Lock()  # the single-sequence API: one generation at a time
        self._batch_lock = threading.Lock()
        self._batched: BatchedLLM | None = None
        #: a vision-language artifact's inputs (:mod:`qwen_export.runtime.multimodal`), else None
        self.multimodal = getattr(loaded.engine, "multimodal", None)

    @property
    def max_context(self) -> int:
        return self.engine.capabilities.max_context

    # ------------------------------------------------------------------ text in, text out
    def generate(self, prompt: str, *, response_format: Mapping[str, Any] | None = None, **sampling: Any) -> str:
        """Complete raw ``prompt`` (no chat template); return the text."""
        stream = self.stream(prompt, response_format=response_format, **sampling)
        return "".join(stream)

    def stream(
        self,
        prompt: str | Sequence[Message],
        *,
        response_format: Mapping[str, Any] | None = None,
        enable_thinking: bool | None = None,
        **sampling: Any,
    ) -> TextStream:
        """Stream the completion of ``prompt`` (a string, fed as is) or of chat ``messages``
        (``enable_thinking``, Qwen3, is passed to their chat template; the text pieces include the
        ``<think>`` part: :meth:`chat_stream` separates it)."""
        prompt, images = self._images(prompt)
        ids = self._prompt_ids(prompt, enable_thinking)
        return self._start(ids, response_format, sampling, images=images)

    def chat(
        self,
        messages: Sequence[Message],
        tools: Sequence[Mapping[str, Any]] | None = None,
        response_format: Mapping[str, Any] | None = None,
        *,
        tool_choice: Any = None,
        enable_thinking: bool | None = None,
        **options: Any,
    ) -> ChatResult:
        """One assistant turn for OpenAI-style ``messages`` (roles system/developer/user/assistant/tool;
        content a string or a list of text parts).

        ``tools`` are JSON-schema function specs rendered by the model's own chat template; the
        reply's ``<tool_call>`` blocks come back parsed in ``tool_calls`` (malformed ones with
        ``error`` set). ``tool_choice``: ``"auto"``, ``"none"``, ``"required"`` or a named function
        (the last two enforced by constrained decoding); ``tools`` and ``response_format`` together
        let the reply be tool calls or the document. ``enable_thinking`` (Qwen3) is passed to the
        chat template; the ``<think>`` part comes back in ``reasoning``. ``options``: generation
        options, OpenAI's ``max_tokens`` / ``stop`` accepted (:mod:`qwen_export.runtime.openai_shapes`).
        Earlier turns are served from the KV cache when the prompt extends them.
        """
        stream = self.chat_stream(
            messages, tools, response_format, tool_choice=tool_choice, enable_thinking=enable_thinking, **options
        )
        for _ in stream:
            pass
        assert stream.result is not None
        return stream.result

    def chat_stream(
        self,
        messages: Sequence[Message],
        tools: Sequence[Mapping[str, Any]] | None = None,
        response_format: Mapping[str, Any] | None = None,
        *,
        tool_choice: Any = None,
        enable_thinking: bool | None = None,
        **options: Any,
    ) -> ChatStream:
        """:meth:`chat`, streamed: an iterator of :class:`ChatDelta` (kind ``reasoning`` or
        ``content``); ``result`` (a :class:`ChatResult`) is set once it has finished."""
        messages, images = self._images(messages)
        plan = self._chat_plan(messages, tools, response_format, tool_choice, enable_thinking, options)
        stream = self._start(plan.ids, plan.response_format, plan.options, plan.constraint, images)
        return ChatStream(stream, ReasoningSplitter(plan.opened), plan.parse_tool_calls)

    def batched(self, max_batch: int = 8, prefill_tokens: int | None = None) -> BatchedLLM:
        """The thread-safe batched entry point (continuous batching, :mod:`qwen_export.runtime.batching`):
        ``chat_stream`` / ``stream`` / ``chat`` / ``generate`` from any number of threads at once; up
        to ``max_batch`` sequences decode together, the others wait their turn. Built on the first
        call (its own KV memory; OptionError for an engine that cannot batch), then the same object
        until it is closed (a call with another ``max_batch`` meanwhile is refused). No prefix
        cache, no speculation."""
        from qwen_export.runtime.batching import DEFAULT_PREFILL_TOKENS, BatchedLLM

        with self._batch_lock:
            if self._batched is None or self._batched.closed:
                self._batched = BatchedLLM(self, max_batch, prefill_tokens or DEFAULT_PREFILL_TOKENS)
            elif self._batched.max_batch != max_batch:
                raise OptionError(f"this LLM already batches {self._batched.max_batch} sequences, not {max_batch}")
            return self._batched

    def reset(self) -> None:
        """Forget the cached conversation."""
        with self._lock:
            self._generator.reset()
            if self.multimodal is not None:  # encoded images too
                self.multimodal.reset()

    # ------------------------------------------------------------------ internals
    def _config(self, sampling: dict[str, Any]) -> GenerationConfig:
        known = {f.name for f in dataclasses.fields(GenerationConfig)}
        unknown = sorted(set(sampling) - known)
        if unknown:
            raise OptionError(f"unknown generation option(s) {unknown}; valid: {sorted(known)}")
        return self.artifact.generation_config(**sampling)

    def _images(self, prompt: Any) -> tuple[Any, list[Any]]:
        """A VL artifact: messages with their image parts replaced by the vision placeholder, and
        the images loaded and preprocessed (a text artifact: as given, no images)."""
        if self.multimodal is None or isinstance(prompt, str):
            return prompt, []
        from qwen_export.runtime.multimodal import image_sources

        messages, sources = image_sources(prompt)
        return messages, self.multimodal.prepare_images(sources)

    def _register(self, ids: list[int], images: list[Any]) -> list[int]:
        """Under the lock: a VL prompt's pad tokens expanded per image, the prompt registered with
        the engine, and the cache cut back to before the first cached image it does not repeat."""
        ids = self.multimodal.expand(ids, images)
        valid = self.multimodal.set_prompt(ids, images)
        cached = self.engine.num_cached_tokens
        if cached > valid:
            self._generator.rollback(cached - valid)
        return ids

    def _prompt_ids(self, prompt: str | Sequence[Message], enable_thinking: bool | None) -> list[int]:
        """The token ids of a raw prompt (fed as is) or of chat messages (through their template)."""
        if isinstance(prompt, str):
            if enable_thinking is not None:
                raise OptionError("enable_thinking applies to chat messages, not to a raw prompt")
            return self.tokenizer.encode(prompt, max_tokens=self.max_context)
        request = prepare_chat(list(prompt), enable_thinking=enable_thinking)
        return self.tokenizer.apply_chat_template_ids(
            request.messages, max_tokens=self.max_context, **request.template_variables
        )

    def _chat_plan(
        self,
        messages: Sequence[Message],
        tools: Sequence[Mapping[str, Any]] | None,
        response_format: Mapping[str, Any] | None,
        tool_choice: Any,
        enable_thinking: bool | None,
        options: dict[str, Any],
    ) -> ChatPlan:
        """One chat turn translated: prompt ids, options, the tool-call constraint (shared by the
        single-sequence and the batched entry points)."""
        request = prepare_chat(messages, tools, response_format, tool_choice, enable_thinking, options)
        text = self.tokenizer.apply_chat_template(request.messages, tools=request.tools, **request.template_variables)
        ids = self.tokenizer.encode(text, max_tokens=self.max_context)
        constraint = None
        if request.constrain_calls:
            from qwen_export.runtime.structured import make_tool_constraint

            constraint = make_tool_constraint(
                list(request.tool_functions),
                single=request.tool_choice.mode is ToolChoiceMode.FUNCTION,
                answer=request.response_format if request.tool_choice.mode is ToolChoiceMode.AUTO else None,
                tokenizer=self.tokenizer,
            )
        return ChatPlan(
            ids,
            None if constraint else request.response_format,
            request.options,
            constraint,
            text.rstrip().endswith("<think>"),
            request.parse_tool_calls,
        )

    def _plan(
        self,
        response_format: Mapping[str, Any] | ResponseFormat | None,
        sampling: dict[str, Any],
        constraint: Constraint | None,
    ) -> tuple[GenerationConfig, Constraint | None]:
        """The generation config and the constraint (``response_format``'s, else ``constraint``)."""
        config = self._config(generation_options(sampling))
        if response_format is not None:
            from qwen_export.runtime.structured import ResponseFormat, make_constraint

            constraint = make_constraint(ResponseFormat.parse(response_format), self.tokenizer)
        return config, constraint

    def _start(
        self,
        ids: list[int],
        response_format: Mapping[str, Any] | ResponseFormat | None,
        sampling: dict[str, Any],
        constraint: Constraint | None = None,
        images: list[Any] | None = None,
    ) -> TextStream:
        config, constraint = self._plan(response_format, sampling, constraint)
        self._lock.acquire()
        try:
            if self.multimodal is not None:
                ids = self._register(ids, images or [])
            events = (
                self._generator.generate(ids, config, constraint=constraint)
                if constraint is not None
                else self._generator.generate(ids, config)
            )
        except BaseException:
            self._lock.release()
            raise
        return TextStream(self, events)


def load(
    path: str | Path,
    engine: str | None = None,
    device: str | None = None,
    speculate: Speculation | None = None,
    **options: Any,
) -> LLM:
    """Open an exported artifact (manifest and checksums verified) and return an :class:`LLM`.

    ``engine`` defaults to the artifact's target (the manifest says which); a ``tensorrt``
    artifact also runs on ``"onnxruntime"`` (its standard-ONNX graph on the CPU: verification
    without a GPU). ``device``: ``"cpu"`` (ONNX Runtime, OpenVINO) or ``"cuda"`` / ``"cuda:N"``
    (TensorRT; default device 0). ``options``: ``threads`` (engine threads, 0 = default); for
    OpenVINO artifacts ``precision`` (f32 | bf16 | f16 | split | auto), ``kv_cache`` (f32 | f16 | bf16 | u8 |
    auto), ``cache_dir`` (OpenVINO's model cache: the second load is fast) and ``attention``
    (auto | paged | stateful; auto, the default, is paged, PagedAttention over a block cache as
    openvino-genai runs, unless the model has sliding-window layers); for TensorRT
    ``cuda_graphs`` (replay decode steps as CUDA graphs). ``prefill_chunk``: the longest piece of
    a prompt run at once (ONNX Runtime, OpenVINO; default 2048, 0 = the whole prompt): bounds a
    long prompt's activation memory. ``prefill_int8``: False leaves an ``export --prefill int8``
    artifact's int8 prompt graph unopened (ONNX Runtime; saves its memory, prompts run slower).

    ``speculate`` (:class:`~qwen_export.runtime.speculative.Speculation`): speculative decoding by
    prompt lookup or with a draft artifact (same tokenizer, opened on its own target's engine with
    ``threads``); the artifact is asked for the logits of the k+1 positions each step verifies (a
    default ``--logits last`` export of this version, or ``--logits all``). Greedy output is plain
    decoding's; sampled output keeps the target's distribution.
    """
    valid = [
        "threads",
        "prefill_chunk",
        "prefill_int8",
        *(name for backend in targets.registered() for name in backend.load_options),
    ]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise OptionError(f"unknown load option(s) {unknown}; valid: {valid}")
    if speculate is not None and not isinstance(speculate, Speculation):
        raise OptionError(f"speculate must be a Speculation or None, got {type(speculate).__name__}")
    loaded = open_artifact(path, runtime_options(engine=engine, device=device, **options))
    return LLM(loaded, speculator(loaded, speculate, options.get("threads", 0)))


def speculator(loaded: LoadedArtifact, speculation: Speculation | None, threads: int = 0) -> Speculator | None:
    """The speculator ``speculation`` asks for over ``loaded`` (a draft artifact is opened here and
    must have the same tokenizer); None for plain decoding."""

    def open_draft(path: Path) -> Any:
        draft = open_artifact(path, RuntimeOptions(threads=threads))
        if not draft.tokenizer.same_vocabulary(loaded.tokenizer):
            raise OptionError(f"the draft artifact {path} has a different tokenizer than {loaded.path}")
        return draft.engine

    return make_speculator(speculation, loaded.engine, open_draft)


def runtime_options(
    threads: int = 0,
    precision: str | None = None,
    kv_cache: str | None = None,
    cache_dir: str | Path | None = None,
    *,
    attention: str | None = None,
    engine: str | None = None,
    device: str | None = None,
    cuda_graphs: bool | None = None,
    prefill_chunk: int | None = None,
    prefill_int8: bool = True,
) -> RuntimeOptions:
    """RuntimeOptions from plain values (CLI and :func:`load`). Each engine builds its own options
    from the ones it owns (the registry's ``engine_options``: OpenVINO's are checked against their
    enums, the device against the engines that run on it); :func:`open_artifact` refuses them for
    artifacts of other targets."""
    check_threads(threads)
    chosen = Target.parse(engine, "engine") if engine is not None else None
    given = {
        "precision": precision,
        "kv_cache": kv_cache,
        "cache_dir": cache_dir,
        "attention": attention,
        "device": device,
        "cuda_graphs": cuda_graphs,
    }
    fields = {
        backend.options_field: backend.engine_options(threads, given, chosen)
        for backend in targets.registered()
        if backend.options_field is not None
    }
    chunk_ok = isinstance(prefill_chunk, int) and not isinstance(prefill_chunk, bool) and prefill_chunk >= 0
    if prefill_chunk is not None and not chunk_ok:
        raise OptionError(f"prefill_chunk must be an integer >= 0 (0: the whole prompt), got {prefill_chunk!r}")
    if not isinstance(prefill_int8, bool):
        raise OptionError(f"prefill_int8 must be True or False, got {prefill_int8!r}")
    return RuntimeOptions(
        threads=threads, engine=chosen, prefill_chunk=prefill_chunk, prefill_int8=prefill_int8, **fields
    )


def check_threads(threads: Any) -> None:
    """``threads``: 0 (the engine's default) up to 4 per core of this machine; OptionError otherwise."""
    cores = os.cpu_count() or 1
    limit = max(4 * cores, 8)
    if not isinstance(threads, int) or isinstance(threads, bool) or not 0 <= threads <= limit:
        raise OptionError(
            f"threads must be 0 (the engine's default) to {limit} (4 per core; this machine has {cores}), "
            f"got {threads!r}"
        )
