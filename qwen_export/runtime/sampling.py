"""Sampling: transformers' default logits-processor order (repetition penalty, temperature, top-k,
top-p, min-p), then a draw from numpy's ``default_rng(seed)``; shared by single-sequence generation
(:mod:`.generation`), speculative decoding and the batching scheduler (:mod:`.batching`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from qwen_export.errors import GenerationError

if TYPE_CHECKING:
    from qwen_export.runtime.generation import GenerationConfig
    from qwen_export.runtime.structured import Constraint

__all__ = [
    "MAX_TOP_LOGPROBS",
    "TokenLogprob",
    "decodable_columns",
    "pick_token",
    "process_logits",
    "sample_token",
    "token_logprob",
]

#: the most alternatives ``logprobs`` reports per token (OpenAI's limit)
MAX_TOP_LOGPROBS = 20


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability under the model (log-softmax of the raw logits: before
    temperature, top-k/p and constraints, as vLLM reports by default) and the likeliest
    alternatives, best first, each (id, text, logprob)."""

    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()


def token_logprob(logits: np.ndarray, token: int, top: int, decode: Any) -> TokenLogprob:
    """``token``'s :class:`TokenLogprob` from a 1-D logits vector, with ``top`` alternatives;
    ``decode(ids) -> str`` gives the tokens' text."""
    scores = np.asarray(logits, np.float64)
    finite = np.where(np.isfinite(scores), scores, -np.inf)
    peak = finite.max()
    logprobs = finite - (peak + np.log(np.exp(finite - peak).sum()))
    best: tuple[tuple[int, str, float], ...] = ()
    if top:
        ids = np.argpartition(-logprobs, top - 1)[:top]
        ids = ids[np.argsort(-logprobs[ids], kind="stable")]
        best = tuple((int(i), decode([int(i)]), float(logprobs[i])) for i in ids)
    return TokenLogprob(int(token), decode([int(token)]), float(logprobs[token]), best)


def decodable_columns(tokenizer: Any, width: int) -> np.ndarray | None:
    """Which of ``width`` logit columns are token ids ``tokenizer`` knows (the embedding is often
    padded past the vocabulary); None when the tokenizer cannot say."""
    size = getattr(tokenizer, "vocab_size", None)
    if not isinstance(size, int):
        return None
    mask = np.arange(width) < size
    id_to_token = getattr(tokenizer, "id_to_token", None)
    if id_to_token is not None:  # added tokens past the counted size, if any
        for i in range(min(size, width), width):
            mask[i] = id_to_token(i) is not None
    return mask


def process_logits(
    logits: np.ndarray, config: GenerationConfig, context_ids: Sequence[int], allowed: np.ndarray | None = None
) -> np.ndarray:
    """Apply repetition penalty, temperature, top-k, top-p and min-p to a 1-D logits vector.

    ``allowed`` (bool, same width; from a structured-output constraint) sets every other token to
    -inf right after the repetition penalty, so greedy, top-k/top-p/min-p and sampling all pick
    among allowed tokens only. Returns float64 scores with removed tokens set to -inf (a copy;
    ``logits`` is untouched).
    """
    scores = np.array(logits, dtype=np.float64, copy=True)
    scores[np.isnan(scores)] = -np.inf
    if config.repetition_penalty != 1.0 and len(context_ids):
        ids = np.unique(np.asarray(context_ids, dtype=np.int64))
        ids = ids[(ids >= 0) & (ids < scores.shape[0])]
        picked = scores[ids]
        scores[ids] = np.where(picked < 0, picked * config.repetition_penalty, picked / config.repetition_penalty)
    if allowed is not None:
        scores[~allowed] = -np.inf
    if config.greedy:
        return scores
    scores = _scale(scores, float(config.temperature))
    if config.top_k > 0 and config.top_k < scores.shape[0]:
        kth = np.partition(scores, -config.top_k)[-config.top_k]
        scores[scores < kth] = -np.inf  # ties with the k-th score are kept, as transformers
    if config.top_p < 1.0:
        order = np.argsort(scores, kind="stable")  # ascending, as transformers' TopPLogitsWarper
        probs = _softmax(scores[order])
        remove = np.cumsum(probs) <= 1 - config.top_p
        remove[-1] = False  # keep at least the most likely token
        scores[order[remove]] = -np.inf
    if config.min_p > 0.0:
        probs = _softmax(scores)
        scores[probs < config.min_p * probs.max()] = -np.inf
    return scores


def _scale(scores: np.ndarray, temperature: float) -> np.ndarray:
    """``scores / temperature``; when a tiny temperature overflows that, the scores are shifted by
    their maximum first (the same distribution: the best tokens stay finite, the rest become -inf)."""
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = scores / temperature
        if np.isposinf(scaled).any() or np.isnan(scaled).any():
            finite = np.isfinite(scores)
            if finite.any():
                scaled = (scores - scores[finite].max()) / temperature
                scaled[np.isnan(scaled)] = -np.inf
    return scaled


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max())
    return shifted / shifted.sum()


def sample_token(
    logits: np.ndarray,
    config: GenerationConfig,
    context_ids: Sequence[int],
    rng: np.random.Generator,
    allowed: np.ndarray | None = None,
) -> int:
    """Pick the next token id from a 1-D logits vector (argmax when ``temperature == 0``), among
    the ``allowed`` tokens when given."""
    scores = process_logits(logits, config, context_ids, allowed)
    if not np.isfinite(scores).any():
        if allowed is not None and not allowed.any():
            raise GenerationError("the response_format grammar allows no token here")
        raise GenerationError("the engine returned logits with no finite value (NaN/inf); the artifact is broken")
    if config.greedy:
        return int(np.argmax(scores))
    probs = _softmax(scores)
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(cdf) - 1))


def pick_token(
    logits: np.ndarray,
    config: GenerationConfig,
    context: Sequence[int],
    rng: np.random.Generator,
    constraint: Constraint | None,
    left: int,
    decodable: np.ndarray | None,
) -> int:
    """The next token: sampled among the ``decodable`` ones the constraint allows or, once a
    constrained document needs about every token ``left`` to close, the next token of its closing path."""
    allowed = decodable
    if constraint is not None:
        closing = constraint.closing_token(left)
        if closing is not None:
            return closing
        grammar = constraint.allowed(logits.shape[-1])
        allowed = grammar if allowed is None else grammar & allowed
    return sample_token(logits, config, context, rng, allowed)
