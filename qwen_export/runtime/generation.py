"""Engine-agnostic text generation (batch 1) over any :class:`~qwen_export.targets.base.Engine`.

Sampling follows transformers' default logits-processor order: repetition penalty, temperature,
top-k, top-p, min-p; then a draw from numpy's ``default_rng(seed)``. Streaming uses an incremental
detokenizer (as vLLM / transformers' TextStreamer) that never splits a multi-byte UTF-8 character,
and holds back text that could still turn into a stop string, so nothing streamed is later cut.

The :class:`Generator` remembers which token ids sit in the engine's KV cache and, on the next call,
reuses the longest common prefix with the new prompt (multi-turn chat re-feeds only the new turn).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import sys
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from qwen_export.errors import ContextLengthError, GenerationError, OptionError
from qwen_export.runtime.sampling import (
    MAX_TOP_LOGPROBS,
    TokenLogprob,
    decodable_columns,
    pick_token,
    process_logits,
    sample_token,
    token_logprob,
)
from qwen_export.targets.base import Engine, EngineCapabilities

if TYPE_CHECKING:
    from qwen_export.runtime.speculative import SpeculationStats, Speculator
    from qwen_export.runtime.structured import Constraint

__all__ = [
    "Decoding",
    "FinishReason",
    "GenerationConfig",
    "GenerationEvent",
    "GenerationResult",
    "GenerationTimings",
    "Generator",
    "TextDecoder",
    "pick_token",
    "process_logits",
    "sample_token",
]


class TextDecoder(Protocol):
    """What generation needs from a tokenizer (:class:`qwen_export.runtime.tokenizer.Tokenizer` fits)."""

    @property
    def eos_token_id(self) -> int | None: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...


class FinishReason(str, enum.Enum):
    STOP_TOKEN = "stop_token"  # a stop token id (or the tokenizer's eos) was sampled
    STOP_STRING = "stop_string"  # the decoded text contains one of the stop strings
    LENGTH = "length"  # max_new_tokens reached
    CONTEXT = "context"  # the engine's context (prompt + generated) is full


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Sampling and stopping options; neutral values turn a step off."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy (argmax); top_k/top_p/min_p then have no effect
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; over prompt + generated ids, as transformers
    seed: int | None = None  # None = fresh entropy
    stop_token_ids: tuple[int, ...] = ()  # in addition to the tokenizer's eos token
    stop_strings: tuple[str, ...] = ()
    skip_special_tokens: bool = True  # leave special tokens out of the returned/streamed text
    # None: off; k >= 0: each sampled token's log-probability and its k likeliest alternatives
    # (GenerationEvent.logprob, GenerationResult.logprobs); not with speculative decoding
    logprobs: int | None = None

    def __post_init__(self) -> None:
        # Accept lists for the tuple fields (frozen: set through object.__setattr__).
        for name in ("stop_token_ids", "stop_strings"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))

    def validate(self) -> None:
        """Raise OptionError (one line) for the first invalid value."""
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise OptionError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        t = self.temperature
        if not _is_real(t) or not math.isfinite(t) or t < 0 or 0 < t < sys.float_info.min:
            raise OptionError(
                f"temperature must be 0 (greedy) or a finite number >= {sys.float_info.min:.3g}, got {t!r}"
            )
        if not _is_int(self.top_k) or self.top_k < 0:
            raise OptionError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise OptionError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if not _is_real(self.min_p) or not 0 <= self.min_p <= 1:
            raise OptionError(f"min_p must be in [0, 1] (0 = off), got {self.min_p!r}")
        rp = self.repetition_penalty
        if not _is_real(rp) or not math.isfinite(rp) or rp <= 0:
            raise OptionError(f"repetition_penalty must be a finite number > 0 (1 = off), got {rp!r}")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise OptionError(f"seed must be None or an integer >= 0, got {self.seed!r}")
        if not isinstance(self.stop_token_ids, tuple) or not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise OptionError(f"stop_token_ids must be a tuple of integers >= 0, got {self.stop_token_ids!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise OptionError(f"logprobs must be None or 0..{MAX_TOP_LOGPROBS} alternatives, got {self.logprobs!r}")
        if not isinstance(self.stop_strings, tuple) or not all(isinstance(s, str) and s for s in self.stop_strings):
            raise OptionError(f"stop_strings must be a tuple of non-empty strings, got {self.stop_strings!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclasses.dataclass(frozen=True)
class GenerationTimings:
    time_to_first_token_s: float  # from the call to the first sampled token (prefill included)
    prefill_s: float  # the forward pass over the (non-reused) prompt
    decode_s: float  # from the first token to the end


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    text: str  # decoded completion, cut before a stop string; stop tokens left out
    token_ids: tuple[int, ...]  # every sampled id, the stop token included
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    reused_tokens: int  # prompt tokens served from the engine's cache instead of recomputed
    timings: GenerationTimings
    speculation: SpeculationStats | None = None  # drafts and acceptance, when decoding speculated
    # Constrained (response_format, tool_choice) generations: True when ``text`` is a complete, valid
    # document (always after STOP_TOKEN; after LENGTH/CONTEXT only if it happened to end one); False
    # when it is only a prefix of one (cut by the limit, the context or a stop string).
    # Always True without a constraint.
    complete: bool = True
    # with GenerationConfig.logprobs: one per sampled token, stop tokens left out
    logprobs: tuple[TokenLogprob, ...] = ()

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Decode throughput (tokens after the first, per second); None when not measurable."""
        if self.completion_tokens < 2 or self.timings.decode_s <= 0:
            return None
        return (self.completion_tokens - 1) / self.timings.decode_s


@dataclasses.dataclass(frozen=True)
class GenerationEvent:
    """One sampled token. ``text`` is the newly decodable, safe-to-show text (may be empty);
    the last event has ``finish_reason`` and ``result`` set."""

    token_id: int
    text: str
    finish_reason: FinishReason | None = None
    result: GenerationResult | None = None
    logprob: TokenLogprob | None = None  # with GenerationConfig.logprobs (None for a stop token)


# -- streaming text -----------------------------------------------------------------------------


class _IncrementalText:
    """Decode a growing id list into text pieces that never split a UTF-8 character, and hold back
    any tail that could be the start of a stop string."""

    def __init__(self, decoder: TextDecoder, stop_strings: tuple[str, ...], skip_special_tokens: bool) -> None:
        self._decoder = decoder
        self._stop_strings = stop_strings
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # ids[prefix_offset:read_offset] decode to text already taken
        self._read_offset = 0
        self.text = ""  # all complete text decoded so far (may extend past a stop string)
        self._emitted = 0  # chars of ``text`` handed out
        self.stop_at: int | None = None  # index in ``text`` where a stop string starts

    def _decode(self, ids: list[int]) -> str:
        return self._decoder.decode(ids, skip_special_tokens=self._skip)

    def _take_complete(self, final: bool) -> None:
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            before = len(self.text)
            self.text += full[len(prefix) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            self._find_stop(before)

    def _find_stop(self, before: int) -> None:
        if self.stop_at is not None:
            return
        hits = [pos for s in self._stop_strings if (pos := self.text.find(s, max(0, before - len(s) + 1))) >= 0]
        if hits:
            self.stop_at = min(hits)

    def _held_back(self) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        longest = 0
        for s in self._stop_strings:
            for n in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def push(self, token_id: int) -> str:
        """Add one id; return the newly safe text."""
        self._ids.append(token_id)
        self._take_complete(final=False)
        end = self.stop_at if self.stop_at is not None else len(self.text) - self._held_back()
        return self._emit(max(end, self._emitted))

    def finish(self) -> str:
        """No more ids: return everything not yet handed out (up to a stop string)."""
        self._take_complete(final=True)
        return self._emit(self.stop_at if self.stop_at is not None else len(self.text))

    def _emit(self, end: int) -> str:
        piece = self.text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return piece


# -- the generation loop -------------------------------------------------------------------------

#: prompt tokens per forward on an engine that returns every position's logits (``--logits all``):
#: bounds the logits a prefill returns (256 x vocab floats: 155 MB for Qwen's 151,936)
PREFILL_CHUNK = 256


class Decoding:
    """One generation past the engine: the sampled ids, their text (stop strings held back), the
    constraint's progress, and when and why it ends. :class:`Generator` and the batching scheduler
    (:mod:`qwen_export.runtime.batching`) feed it one sampled token at a time."""

    def __init__(
        self,
        tokenizer: TextDecoder,
        prompt: list[int],
        config: GenerationConfig,
        constraint: Constraint | None,
        max_context: int,
        start: float,
    ) -> None:
        self.prompt, self.config, self.constraint, self.max_context = prompt, config, constraint, max_context
        self.start, self.tokenizer = start, tokenizer
        self.logprobs: list[TokenLogprob] = []
        self.stop_ids = set(config.stop_token_ids)
        if tokenizer.eos_token_id is not None:
            self.stop_ids.add(tokenizer.eos_token_id)
        self.text = _IncrementalText(tokenizer, config.stop_strings, config.skip_special_tokens)
        self.generated: list[int] = []
        self.pieces: list[str] = []
        self.first_token_at: float | None = None
        self.prefill_s = 0.0
        self.reused = 0
        self.finished = False

    def prefilled(self, reused: int) -> None:
        """The prompt is in the cache (``reused`` of its tokens were already there)."""
        self.prefill_s, self.reused = time.perf_counter() - self.start, reused

    @property
    def left(self) -> int:
        """Tokens this generation may still sample (its limit or the context, whichever is nearer)."""
        return min(self.config.max_new_tokens, self.max_context - len(self.prompt)) - len(self.generated)

    def accept(
        self, token: int, speculation: SpeculationStats | None = None, logits: np.ndarray | None = None
    ) -> list[GenerationEvent]:
        """Take the next sampled ``token`` (``logits``: those it was drawn from, for ``logprobs``):
        its event (two when it completes a constrained document: the eos follows), the last one with
        the result once the generation has ended."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        constraint, out = self.constraint, []
        self.generated.append(token)
        reason: FinishReason | None = None
        piece, logprob = "", None
        if token in self.stop_ids:
            reason = FinishReason.STOP_TOKEN
        else:
            if self.config.logprobs is not None and logits is not None:
                logprob = token_logprob(logits, token, self.config.logprobs, self.tokenizer.decode)
                self.logprobs.append(logprob)
            if constraint is not None:
                constraint.advance(token)
            piece = self.text.push(token)
            if self.text.stop_at is not None:
                reason = FinishReason.STOP_STRING
            elif constraint is not None and constraint.done:
                # the document is complete: only eos may follow, so end with it now
                self.pieces.append(piece)
                out.append(GenerationEvent(token, piece, logprob=logprob))
                logprob = None
                token = constraint.eos_token_id
                self.generated.append(token)
                reason, piece = FinishReason.STOP_TOKEN, ""
            elif len(self.generated) >= self.config.max_new_tokens:
                reason = FinishReason.LENGTH
            elif len(self.prompt) + len(self.generated) >= self.max_context:
                reason = FinishReason.CONTEXT
        if reason is None:
            self.pieces.append(piece)
            return [*out, GenerationEvent(token, piece, logprob=logprob)]
        piece += self.text.finish()
        self.pieces.append(piece)
        self.finished = True
        return [*out, GenerationEvent(token, piece, reason, self._result(reason, speculation), logprob)]

    def _result(self, reason: FinishReason, speculation: SpeculationStats | None) -> GenerationResult:
        end = time.perf_counter()
        assert self.first_token_at is not None
        constraint = self.constraint
        return GenerationResult(
            text="".join(self.pieces),
            token_ids=tuple(self.generated),
            finish_reason=reason,
            prompt_tokens=len(self.prompt),
            completion_tokens=len(self.generated),
            reused_tokens=self.reused,
            timings=GenerationTimings(self.first_token_at - self.start, self.prefill_s, end - self.first_token_at),
            speculation=speculation,
            complete=constraint is None or (reason is not FinishReason.STOP_STRING and constraint.accepting),
            logprobs=tuple(self.logprobs),
        )


def checked_prompt(prompt_ids: Sequence[int], caps: EngineCapabilities) -> list[int]:
    """``prompt_ids`` as ints, or GenerationError / ContextLengthError: empty, an id outside the
    vocabulary, or no room left in the context (``caps``: the engine's capabilities)."""
    prompt = [int(i) for i in prompt_ids]
    if not prompt:
        raise GenerationError("the prompt is empty; at least one token is needed")
    bad = next((i for i in prompt if not 0 <= i < caps.vocab_size), None)
    if bad is not None:
        raise GenerationError(f"prompt token id {bad} is outside the vocabulary [0, {caps.vocab_size})")
    if len(prompt) >= caps.max_context:
        raise ContextLengthError(
            f"prompt has {len(prompt)} tokens; the artifact's context is {caps.max_context}"
            " (it must leave room for at least one new token)"
        )
    return prompt


class Generator:
    """Generate from one engine (batch 1), reusing the cached prompt prefix across calls."""

    def __init__(self, engine: Engine, tokenizer: TextDecoder, speculator: Speculator | None = None) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.speculator = speculator  # None: plain decoding (also used for constrained generation)
        self._rows = np.zeros((0, 0), np.float32)  # every row of the last forward's logits
        self._cached: list[int] | None = []  # ids in the engine's cache; None = unknown, reset next time
        self._decodable: np.ndarray | None = None  # per logit column: can the tokenizer decode it?

    def decodable(self, width: int) -> np.ndarray | None:
        """Which of ``width`` logit columns are token ids the tokenizer knows (the embedding is often
        padded past the vocabulary): never sampled otherwise. None when the tokenizer cannot say."""
        if self._decodable is None or self._decodable.shape[0] != width:
            self._decodable = decodable_columns(self.tokenizer, width)
        return self._decodable

    def reset(self) -> None:
        """Forget the conversation (and the engine's cache)."""
        self.engine.reset()
        self._cached = []

    def _forward(self, ids: Sequence[int], last_only: bool = False, last_k: int | None = None) -> np.ndarray:
        """Feed ``ids`` after the cache; return the last position's logits (1-D). ``last_only``:
        ask the engine for no other position's logits (``capabilities.last_only`` engines);
        ``last_k``: for the last k positions' (``capabilities.last_k_logits`` engines)."""
        cached = self._cached
        self._cached = None  # unknown until the engine returns
        batch = np.asarray([list(ids)], dtype=np.int64)
        if last_k is not None:
            logits = self.engine.forward(batch, last_k=last_k)
        else:
            logits = self.engine.forward(batch, last_only=True) if last_only else self.engine.forward(batch)
        if logits.ndim != 3 or logits.shape[0] != 1 or logits.shape[1] < 1:
            raise GenerationError(f"engine returned logits of shape {logits.shape}; expected [1, seq, vocab]")
        self._cached = [*(cached or []), *ids]
        self._rows = logits[0]
        return logits[0, -1]

    def _prefill(self, ids: Sequence[int]) -> np.ndarray:
        """Feed the prompt (the last position's logits only where the engine can skip the others,
        else in chunks of PREFILL_CHUNK when it returns full logits); return the last logits."""
        caps = self.engine.capabilities
        if caps.last_only:
            return self._forward(ids, last_only=True)
        step = PREFILL_CHUNK if caps.full_logits else len(ids)
        for start in range(0, len(ids), step):
            logits = self._forward(ids[start : start + step])
        return logits

    def forward_rows(self, ids: Sequence[int]) -> np.ndarray:
        """Feed ``ids`` after the cache in one forward; return the logits of every fed position
        ([len(ids), vocab]; the engine must return full logits, or the last k on request)."""
        caps = self.engine.capabilities
        self._forward(ids, last_k=len(ids) if caps.last_k_logits and not caps.full_logits else None)
        if self._rows.shape[0] != len(ids):
            raise GenerationError(f"the engine returned {self._rows.shape[0]} logit rows for {len(ids)} tokens")
        return self._rows

    def rollback(self, num_tokens: int) -> None:
        """Drop the last ``num_tokens`` fed ids from the engine's cache (rejected drafts)."""
        cached, kept = self._cached, self.engine.num_cached_tokens - num_tokens
        self._cached = None  # unknown until the engine has truncated
        self.engine.truncate(kept)
        self._cached = None if cached is None else cached[:kept]

    def _prepare_cache(self, prompt: list[int]) -> int:
        """Truncate/reset the engine so it holds a prefix of ``prompt``; return how many ids it keeps."""
        cached = self._cached
        if cached is None or self.engine.num_cached_tokens != len(cached):
            cached = None  # someone else used the engine, or a forward failed
        common = 0
        if cached:
            limit = min(len(cached), len(prompt) - 1)  # always feed at least one token
            while common < limit and cached[common] == prompt[common]:
                common += 1
        if common == 0:
            self.engine.reset()
            self._cached = []
        elif common < len(cached or ()):
            self.engine.truncate(common)
            self._cached = (cached or [])[:common]
        return common

    def generate(
        self,
        prompt_ids: Sequence[int],
        config: GenerationConfig | None = None,
        constraint: Constraint | None = None,
    ) -> Iterator[GenerationEvent]:
        """Yield one :class:`GenerationEvent` per sampled token; the last one carries the result.

        Options and the prompt are checked here (OptionError / GenerationError at call time); the
        engine runs as the iterator is consumed. Stopping early leaves the cache reusable.

        ``constraint`` (:func:`qwen_export.runtime.structured.make_constraint`, single use) restricts every
        token to what its grammar allows; once the document is complete the generation ends with
        the eos token (appended without another forward pass, finish reason STOP_TOKEN). Any
        other ending (LENGTH, CONTEXT, STOP_STRING) leaves the document incomplete: the result's
        ``complete`` is False.
        """
        config = config or GenerationConfig()
        config.validate()
        caps = self.engine.capabilities
        prompt = checked_prompt(prompt_ids, caps)
        if config.logprobs is not None and self.speculator is not None and constraint is None:
            raise OptionError("logprobs are not reported with speculative decoding; load without speculate=")
        return self._run(prompt, config, constraint)

    def _pick(
        self,
        logits: np.ndarray,
        config: GenerationConfig,
        context: list[int],
        rng: np.random.Generator,
        constraint: Constraint | None,
        left: int,
    ) -> int:
        decodable = self.decodable(logits.shape[-1])
        return pick_token(logits, config, context, rng, constraint, left, decodable)

    def _run(
        self, prompt: list[int], config: GenerationConfig, constraint: Constraint | None = None
    ) -> Iterator[GenerationEvent]:
        start = time.perf_counter()
        reused = self._prepare_cache(prompt)
        logits = self._prefill(prompt[reused:])
        decoding = Decoding(self.tokenizer, prompt, config, constraint, self.engine.capabilities.max_context, start)
        decoding.prefilled(reused)
        rng = np.random.default_rng(config.seed)
        speculate = self.speculator is not None and constraint is None
        if speculate:
            assert self.speculator is not None
            tokens = self.speculator.tokens(self, prompt, decoding.generated, logits, config, rng)
        else:
            tokens = self._plain_tokens(prompt, decoding.generated, logits, config, rng, constraint)
        while True:
            token = next(tokens)  # the speculator's stats of this generation exist from here
            stats = self.speculator.stats if speculate and self.speculator is not None else None
            # plain decoding: the last forward's last row is what the token was drawn from
            yield from decoding.accept(token, stats, None if speculate else self._rows[-1])
            if decoding.finished:
                return

    def _plain_tokens(
        self,
        prompt: list[int],
        generated: list[int],
        logits: np.ndarray,
        config: GenerationConfig,
        rng: np.random.Generator,
        constraint: Constraint | None,
    ) -> Iterator[int]:
        """One forward per token; the consumer appends each token to ``generated`` (and advances
        ``constraint``) before asking for the next."""
        room = self.engine.capabilities.max_context - len(prompt)
        while True:
            left = min(config.max_new_tokens, room) - len(generated)
            yield self._pick(logits, config, prompt + generated, rng, constraint, left)
            logits = self._forward([generated[-1]])

    def generate_text(
        self, prompt_ids: Sequence[int], config: GenerationConfig | None = None, constraint: Constraint | None = None
    ) -> GenerationResult:
        """Run :meth:`generate` to the end and return its result."""
        for event in self.generate(prompt_ids, config, constraint):
            if event.result is not None:
                return event.result
        raise GenerationError("generation ended without a result")  # unreachable: the loop always finishes
