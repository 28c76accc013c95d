"""Speculative decoding: cheap draft tokens verified by the target model in one forward.

A step: the target's KV cache holds the context except the last sampled token ``t``; a proposer
guesses ``d1..dk`` after it; the engine runs ``[t, d1..dk]`` in ONE forward (an artifact exported
with ``--logits last``, the default, is asked for its last k+1 rows (``last_k``; one exported with
``--logits all`` returns them anyway); row i decides the token after ``d_i`` (row 0: after ``t``).
Drafts are accepted left to right; at the first rejection the target's own token replaces the
draft, and the KV cache of the rejected drafts is rolled back with ``Engine.truncate``. When every
draft is accepted, row k gives one more token for free. Each step yields at least one token.

Acceptance (Leviathan et al. 2023, Chen et al. 2023): greedy accepts ``d_i`` iff it is the argmax of
row i-1 after the same logits processing as plain decoding (repetition penalty over the same
context), so the output is plain greedy decoding's; sampling accepts ``d ~ q`` with probability
``min(1, p(d)/q(d))`` and otherwise draws from ``norm(max(0, p - q))``, which leaves every emitted
token distributed as ``p``, the target's processed distribution. Prompt lookup's draft is
deterministic: ``q`` is one-hot, so ``d`` is accepted with probability ``p(d)`` and a rejection
draws from ``p`` without ``d``.

Proposers: :class:`PromptLookup` (the continuation of the latest earlier occurrence of the
context's last n-gram, n from ``ngram`` down to ``min_ngram``) and :class:`DraftModel` (a smaller
artifact with the same tokenizer, its own KV cache kept in step by common prefix). The number of
drafts adapts: doubled after a step that accepted all, cut to one more than were accepted after one
that did not (bad guesses then cost little); after a step that accepted none, the next steps do not
draft at all (1, 2, 4 ... up to ``MAX_BACKOFF`` after consecutive such steps), so a proposer that
keeps guessing wrong costs plain decoding little more than its own time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from qwen_export.errors import OptionError
from qwen_export.runtime.generation import GenerationConfig, process_logits, sample_token
from qwen_export.spec import _ChoiceEnum
from qwen_export.targets.base import Engine

if TYPE_CHECKING:
    from qwen_export.runtime.generation import Generator

__all__ = [
    "DraftModel",
    "PromptLookup",
    "Speculation",
    "SpeculationKind",
    "SpeculationStats",
    "Speculator",
    "accept_draft",
    "lookup_draft",
]

MAX_DRAFT_TOKENS = 64
#: After a step whose drafts were all rejected, the next steps decode plainly, 1, 2, 4 ... up to
#: this many after consecutive failures (reset by any accepted draft): where the proposer keeps
#: guessing wrong (prompt lookup on free text), verification's extra rows cost little.
MAX_BACKOFF = 8


class SpeculationKind(_ChoiceEnum):
    PROMPT_LOOKUP = "prompt-lookup"  # n-gram match in the prompt and the text generated so far
    DRAFT = "draft"  # a smaller artifact with the same tokenizer


@dataclasses.dataclass(frozen=True)
class Speculation:
    """How to speculate: ``Speculation(SpeculationKind.PROMPT_LOOKUP)`` or
    ``Speculation(SpeculationKind.DRAFT, draft="qwen-0.5b-artifact/")``; ``max_draft_tokens``: the
    most drafts verified per forward; ``ngram`` / ``min_ngram``: prompt lookup's match lengths."""

    kind: SpeculationKind = SpeculationKind.PROMPT_LOOKUP
    max_draft_tokens: int = 8
    draft: Path | None = None
    ngram: int = 3
    min_ngram: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", SpeculationKind.parse(self.kind, "speculation kind"))
        if self.draft is not None:
            object.__setattr__(self, "draft", Path(self.draft))
        k = self.max_draft_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_DRAFT_TOKENS:
            raise OptionError(f"max_draft_tokens must be an integer from 1 to {MAX_DRAFT_TOKENS}, got {k!r}")
        n, m = self.ngram, self.min_ngram
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, m)) or not 1 <= m <= n <= 16:
            raise OptionError(f"ngram sizes must satisfy 1 <= min_ngram <= ngram <= 16, got {m!r} and {n!r}")
        if (self.kind is SpeculationKind.DRAFT) != (self.draft is not None):
            raise OptionError("a draft artifact directory is needed for draft speculation, and only for it")

    @classmethod
    def parse(cls, text: str, max_draft_tokens: int = 8) -> Speculation:
        """The CLI's ``--speculate``: ``prompt-lookup`` or ``draft:DIR``."""
        value = text.strip()
        if value.lower().startswith("draft:"):
            path = value[len("draft:") :]
            if not path:
                raise OptionError("--speculate draft:DIR needs the draft artifact's directory after 'draft:'")
            return cls(SpeculationKind.DRAFT, max_draft_tokens, Path(path))
        if value.lower() == "draft":
            raise OptionError("--speculate draft needs the draft artifact's directory: draft:DIR")
        return cls(SpeculationKind.parse(value, "--speculate value"), max_draft_tokens)


@dataclasses.dataclass(frozen=True)
class SpeculationStats:
    """One generation's speculation: drafts proposed and accepted, verifying forwards."""

    drafted: int = 0
    accepted: int = 0
    steps: int = 0  # target forwards after the prefill

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None


# -- acceptance ------------------------------------------------------------------------------------


def _draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(cdf) - 1))


def accept_draft(p: np.ndarray, q: np.ndarray | None, token: int, rng: np.random.Generator) -> int | None:
    """The standard speculative acceptance of draft ``token`` (drawn from ``q``; None: a
    deterministic draft, q one-hot) under target probabilities ``p``: None when it is accepted
    (probability min(1, p/q)), otherwise the replacement drawn from norm(max(0, p - q))."""
    q_token = 1.0 if q is None else float(q[token])
    if rng.random() * q_token < p[token]:
        return None
    if q is None:
        residual = p.copy()
        residual[token] = 0.0
    else:
        residual = np.maximum(p - q, 0.0)
    if residual.sum() <= 0:  # p == q where it matters: a rejection had probability 0
        residual = p
    return _draw(residual, rng)


def _probs(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max())
    return shifted / shifted.sum()


# -- proposers -------------------------------------------------------------------------------------


def lookup_draft(context: Sequence[int], k: int, ngram: int = 3, min_ngram: int = 2) -> list[int]:
    """Prompt lookup: the up to ``k`` tokens that followed the latest earlier occurrence of the
    context's last n-gram (the longest n from ``ngram`` down to ``min_ngram`` that has one)."""
    ids = np.asarray(context, dtype=np.int64)
    for n in range(min(ngram, len(ids) - 1), min_ngram - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)  # every n-gram but the last
        hits = np.flatnonzero((windows == ids[-n:]).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return ids[start : start + k].tolist()
    return []


class Proposer(Protocol):
    def propose(
        self, context: list[int], k: int, config: GenerationConfig, rng: np.random.Generator, allowed: np.ndarray | None
    ) -> tuple[list[int], list[np.ndarray] | None]:
        """Up to ``k`` draft tokens after ``context`` and, for sampled drafts, the distribution
        each was drawn from (None: deterministic drafts)."""
        ...


@dataclasses.dataclass
class PromptLookup:
    ngram: int = 3
    min_ngram: int = 2

    def propose(
        self, context: list[int], k: int, config: GenerationConfig, rng: np.random.Generator, allowed: np.ndarray | None
    ) -> tuple[list[int], list[np.ndarray] | None]:
        return lookup_draft(context, k, self.ngram, self.min_ngram), None


class DraftModel:
    """A smaller model's engine proposing tokens with the generation's own sampling options. Its KV
    cache follows the context by common prefix (truncated after rejections)."""

    def __init__(self, engine: Engine, width: int) -> None:
        self.engine = engine
        self.width = width  # the target's logit width: drafts past it are never proposed
        self._cached: list[int] = []

    def _sync(self, context: list[int]) -> np.ndarray:
        """Bring the draft's cache to ``context``; return the logits after it."""
        cached = self._cached if self.engine.num_cached_tokens == len(self._cached) else []
        common, limit = 0, min(len(cached), len(context) - 1)
        while common < limit and cached[common] == context[common]:
            common += 1
        if common == 0:
            self.engine.reset()
        elif common < self.engine.num_cached_tokens:
            self.engine.truncate(common)
        self._cached = []  # unknown until the forward returns
        logits = self.engine.forward(np.asarray([context[common:]], dtype=np.int64))[0, -1]
        self._cached = list(context)
        return logits

    def _fit(self, logits: np.ndarray) -> np.ndarray:
        if logits.shape[0] >= self.width:
            return logits[: self.width]
        return np.concatenate([logits, np.full(self.width - logits.shape[0], -np.inf, logits.dtype)])

    def propose(
        self, context: list[int], k: int, config: GenerationConfig, rng: np.random.Generator, allowed: np.ndarray | None
    ) -> tuple[list[int], list[np.ndarray] | None]:
        k = min(k, self.engine.capabilities.max_context - len(context))
        if k <= 0:
            return [], None
        logits = self._sync(context)
        drafts: list[int] = []
        dists: list[np.ndarray] = []
        for i in range(k):
            scores = process_logits(self._fit(logits), config, context + drafts, allowed)
            if not np.isfinite(scores).any():
                break
            if config.greedy:
                drafts.append(int(np.argmax(scores)))
            else:
                dists.append(_probs(scores))
                drafts.append(_draw(dists[-1], rng))
            if i + 1 < k:
                logits = self.engine.forward(np.asarray([[drafts[-1]]], dtype=np.int64))[0, -1]
                self._cached.append(drafts[-1])
        return drafts, None if config.greedy else dists


# -- the speculative loop --------------------------------------------------------------------------


class Speculator:
    """Runs a :class:`~qwen_export.runtime.generation.Generator`'s decode loop speculatively."""

    def __init__(self, speculation: Speculation, engine: Engine, proposer: Proposer) -> None:
        caps = engine.capabilities
        if not (caps.full_logits or caps.last_k_logits):
            raise OptionError(
                "speculative decoding verifies several tokens in one forward and needs their logits: this "
                "artifact returns the last position's only; re-export it with this version (or --logits all)"
            )
        self.speculation = speculation
        self.proposer = proposer
        self._k = speculation.max_draft_tokens
        self._counts = [0, 0, 0]  # drafted, accepted, steps
        self._skip = self._backoff = 0  # plain steps left; the current back-off length

    @property
    def stats(self) -> SpeculationStats:
        return SpeculationStats(*self._counts)

    def tokens(
        self,
        gen: Generator,
        prompt: list[int],
        generated: list[int],
        logits: np.ndarray,
        config: GenerationConfig,
        rng: np.random.Generator,
    ) -> Iterator[int]:
        """The generation's tokens, one at a time; the consumer appends each to ``generated``
        before asking for the next (and stops asking when the generation ends)."""
        self._k, self._counts = self.speculation.max_draft_tokens, [0, 0, 0]
        self._skip = self._backoff = 0
        caps = gen.engine.capabilities
        allowed = gen.decodable(logits.shape[-1])
        token = sample_token(logits, config, prompt + generated, rng, allowed)
        while True:
            yield token
            context = prompt + generated
            room = min(self._k, config.max_new_tokens - len(generated), caps.max_context - len(context))
            if self._skip:  # backing off after rejected drafts: a plain step
                self._skip, room = self._skip - 1, 0
            drafts, dists = self.proposer.propose(context, room, config, rng, allowed) if room > 0 else ([], None)
            rows = gen.forward_rows([token, *drafts])
            accepted, token = self._verify(rows, drafts, dists, context, config, rng, allowed)
            if accepted < len(drafts):
                gen.rollback(len(drafts) - accepted)
            self._adapt(accepted, len(drafts))
            yield from drafts[:accepted]

    def _adapt(self, accepted: int, drafted: int) -> None:
        self._counts[0] += drafted
        self._counts[1] += accepted
        self._counts[2] += 1
        if drafted:
            limit = self.speculation.max_draft_tokens
            self._k = min(limit, 2 * self._k) if accepted == drafted else max(1, accepted + 1)
            self._backoff = 0 if accepted else min(MAX_BACKOFF, max(1, 2 * self._backoff))
            self._skip = self._backoff

    def _verify(
        self,
        rows: np.ndarray,
        drafts: list[int],
        dists: list[np.ndarray] | None,
        context: list[int],
        config: GenerationConfig,
        rng: np.random.Generator,
        allowed: np.ndarray | None,
    ) -> tuple[int, int]:
        """How many drafts are accepted, and the token that follows them."""
        if config.greedy and config.repetition_penalty == 1.0:
            fast = _greedy_verify(rows, drafts, allowed)
            if fast is not None:
                return fast
        for i, draft in enumerate(drafts):
            seen = context + drafts[:i]
            scores = process_logits(rows[i], config, seen, allowed)
            if not np.isfinite(scores).any():
                return i, sample_token(rows[i], config, seen, rng, allowed)  # raises plain decoding's error
            if config.greedy:
                best = int(np.argmax(scores))
                if best != draft:
                    return i, best
                continue
            replacement = accept_draft(_probs(scores), None if dists is None else dists[i], draft, rng)
            if replacement is not None:
                return i, replacement
        n = len(drafts)
        return n, sample_token(rows[n], config, context + drafts, rng, allowed)


def _greedy_verify(rows: np.ndarray, drafts: list[int], allowed: np.ndarray | None) -> tuple[int, int] | None:
    """Greedy verification without repetition penalty, every row at once: what ``process_logits``
    + argmax decide (float32 -> float64 is exact, so the argmax and its ties are the same). None
    when the deciding row has no finite score (the per-row path raises plain decoding's error)."""
    scores = rows[: len(drafts) + 1].astype(np.float32, copy=True)
    scores[np.isnan(scores)] = -np.inf
    if allowed is not None:
        scores[:, ~allowed] = -np.inf
    best = scores.argmax(axis=1)
    wrong = np.flatnonzero(best[: len(drafts)] != np.asarray(drafts, dtype=np.int64))
    n = int(wrong[0]) if len(wrong) else len(drafts)
    if not np.isfinite(scores[n]).any():
        return None
    return n, int(best[n])


def make_speculator(
    speculation: Speculation | None, engine: Engine, open_draft: Callable[[Path], Engine] | None = None
) -> Speculator | None:
    """The speculator for ``engine`` (None: plain decoding); ``open_draft`` opens a draft artifact."""
    if speculation is None:
        return None
    if speculation.kind is SpeculationKind.PROMPT_LOOKUP:
        return Speculator(speculation, engine, PromptLookup(speculation.ngram, speculation.min_ngram))
    if open_draft is None or speculation.draft is None:
        raise OptionError("draft speculation needs a way to open the draft artifact")
    return Speculator(speculation, engine, DraftModel(open_draft(speculation.draft), engine.capabilities.vocab_size))
