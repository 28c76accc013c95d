"""The Engine protocol every target implements (docs/architecture.md, "Engines").

An engine owns its KV cache. ``forward`` appends the given tokens to it and returns logits;
generation, chat templates and tool calls sit above and never know which engine runs.

Batching: ``forward`` takes ``input_ids`` of shape [batch, seq]. For left-padded batches pass the
``attention_mask`` of the *new* tokens ([batch, seq], 1 = real token, 0 = padding); the engine keeps
the mask of everything cached and derives ``position_ids`` from it (cumsum of the mask minus one,
padding positions set to 1, as transformers does).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from qwen_export.errors import GenerationError, OptionError


@dataclasses.dataclass(frozen=True)
class EngineCapabilities:
    name: str  # e.g. "onnxruntime"
    max_context: int  # tokens the engine can hold (prompt + generated)
    max_batch: int  # 0 = no fixed limit
    devices: tuple[str, ...]  # e.g. ("cpu",)
    full_logits: bool  # True when forward returns logits for every position, not only the last
    vocab_size: int
    #: a full-logits engine that can skip the other positions' logits: ``forward(..., last_only=True)``
    #: returns the last position's only (a prompt's prefill when speculating: no full-vocabulary rows)
    last_only: bool = False
    #: a last-position engine that can return more rows: ``forward(..., last_k=k)`` returns the last
    #: k positions' logits (1 <= k <= seq; a ``--logits last`` artifact with the ``logits_indices``
    #: input): speculative decoding verifies k drafts in one forward without full logits
    last_k_logits: bool = False


@runtime_checkable
class Engine(Protocol):
    capabilities: EngineCapabilities

    @property
    def num_cached_tokens(self) -> int:
        """Tokens held in the KV cache (per row, padding included)."""
        ...

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Run ``input_ids`` ([batch, seq] int64) after the cached tokens; append them to the cache.

        Returns float32 logits [batch, seq_out, vocab], seq_out = 1 (last position) unless the
        artifact was exported with full logits, then seq_out = seq. An engine whose
        ``capabilities.last_only`` is true also takes ``last_only=True``: seq_out = 1 even then;
        one whose ``capabilities.last_k_logits`` is true takes ``last_k=k``: seq_out = k.
        """
        ...

    def reset(self) -> None:
        """Forget the KV cache (start a new conversation)."""
        ...

    def truncate(self, num_tokens: int) -> None:
        """Keep only the first ``num_tokens`` cached tokens (reuse a common prefix across turns)."""
        ...


@dataclasses.dataclass(frozen=True)
class Step:
    """One ``forward`` call, checked: the new tokens, the mask of everything cached after the step
    and the new tokens' positions."""

    ids: np.ndarray  # [batch, seq] int64
    mask: np.ndarray  # [batch, cached + seq] int64
    position_ids: np.ndarray  # [batch, seq] int64


def prepare_step(
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None,
    cached_mask: np.ndarray | None,
    *,
    vocab_size: int,
    max_context: int,
    capacity_note: str = "",
) -> Step:
    """Check a ``forward`` call against the engine's state (shapes, token range, batch size, the
    artifact's context) and derive the full mask and the positions. Raises GenerationError."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise GenerationError(f"input_ids must be [batch, seq] with seq >= 1, got shape {ids.shape}")
    ids = ids.astype(np.int64, copy=False)
    if ids.min() < 0 or ids.max() >= vocab_size:
        bad = int(ids.max() if ids.max() >= vocab_size else ids.min())
        raise GenerationError(f"token id {bad} is out of range for a vocabulary of {vocab_size}")
    batch, seq = ids.shape
    new_mask = np.ones((batch, seq), np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
    if new_mask.shape != ids.shape:
        raise GenerationError(f"attention_mask shape {new_mask.shape} does not match input_ids {ids.shape}")
    if cached_mask is not None and cached_mask.shape[0] != batch:
        raise GenerationError(f"batch size changed from {cached_mask.shape[0]} to {batch}; call reset() first")
    cached = 0 if cached_mask is None else cached_mask.shape[1]
    if cached + seq > max_context:
        raise GenerationError(
            f"{cached + seq} tokens exceed the artifact's context of {max_context}{capacity_note}; "
            "re-export with a larger --max-length"
        )
    mask = new_mask if cached_mask is None else np.concatenate([cached_mask, new_mask], axis=1)
    return Step(ids, mask, position_ids_from_mask(mask)[:, -seq:])


#: Granularity of a KV buffer's capacity in tokens (ONNX Runtime's shared buffers, TensorRT's
#: fixed-shape ones): the first allocation and every growth are rounded up to a multiple of it.
DEFAULT_KV_STEP = 256


def grown_capacity(needed: int, current: int, step: int, limit: int) -> int:
    """KV capacity for ``needed`` tokens when ``current`` is too small (0: none yet): at least
    twice ``current`` (amortised O(1) copies per token), rounded up to a multiple of ``step``, at
    most ``limit`` (the artifact's context)."""
    want = max(needed, 2 * current)
    return min(limit, -(-want // step) * step)


#: Longest piece of a prompt run in one inference (``prefill_chunk`` of the engines' options): a
#: long prompt is prefilled in pieces, each attending to everything cached before it, so activation
#: memory stays that of a 2048-token prompt however long the prompt is (attention work is the same:
#: each piece's queries against the cache so far). 0 runs a prompt in one piece.
DEFAULT_PREFILL_CHUNK = 2048


def check_prefill_chunk(chunk: int) -> int:
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
        raise GenerationError(f"prefill_chunk must be an integer >= 0 (0: no chunks), got {chunk!r}")
    return chunk


def run_in_chunks(
    step: Step,
    chunk: int,
    run: Callable[..., np.ndarray],
    full_logits: bool,
    last_k: int | None = None,
) -> np.ndarray:
    """Run a checked ``step`` as pieces of at most ``chunk`` new tokens (0: one piece).

    ``run(ids, mask, position_ids)`` gets a piece's tokens, the mask of everything cached once the
    piece is in, and its positions, and returns its logits. The last piece's logits are returned
    (every piece's, concatenated, for a full-logits artifact). The first piece reaches every row's
    first real token, so no row of a left-padded batch runs a piece of padding only.

    ``last_k`` (a ``last_k_logits`` engine; :func:`check_last_k` first): the step's last k
    positions' logits; ``run`` then takes a fourth argument, the rows a piece returns (its last
    ones: those among the step's last k, at least 1), and the rows of the last k are concatenated.
    """
    seq = step.ids.shape[1]
    cached = step.mask.shape[1] - seq
    bounds = [(0, seq)]
    if 0 < chunk < seq:
        first_real = int((step.mask > 0).argmax(axis=1).max())  # leading padding of the longest-padded row
        first = min(seq, max(chunk, first_real - cached + 1))
        bounds = [(0, first)] + [(a, min(seq, a + chunk)) for a in range(first, seq, chunk)]
    if last_k is not None:
        kept = [(a, b, b - max(a, seq - last_k)) for a, b in bounds]
        out = [
            run(step.ids[:, a:b], step.mask[:, : cached + b], step.position_ids[:, a:b], max(1, rows))
            for a, b, rows in kept
        ]
        out = [logits for logits, (_, _, rows) in zip(out, kept, strict=True) if rows > 0]
        return np.concatenate(out, axis=1) if len(out) > 1 else out[0]
    out = [run(step.ids[:, a:b], step.mask[:, : cached + b], step.position_ids[:, a:b]) for a, b in bounds]
    return np.concatenate(out, axis=1) if full_logits and len(out) > 1 else out[-1]


def check_last_k(last_k: int | None, seq: int, capabilities: EngineCapabilities) -> int | None:
    """A ``forward(..., last_k=k)`` request checked against the step's ``seq`` new tokens and the
    engine (GenerationError, one line); None stays None (the artifact's own rows)."""
    if last_k is None:
        return None
    if not capabilities.last_k_logits:
        raise GenerationError(
            f"this {capabilities.name} artifact returns every position's logits; last_k is for --logits last"
            if capabilities.full_logits
            else f"this {capabilities.name} artifact returns the last position's logits only (no logits_indices "
            "input); re-export it with this version for last_k"
        )
    if isinstance(last_k, bool) or not isinstance(last_k, int | np.integer) or not 1 <= last_k <= seq:
        raise GenerationError(f"last_k must be an integer from 1 to the {seq} new tokens, got {last_k!r}")
    return int(last_k)


def position_ids_from_mask(mask: np.ndarray) -> np.ndarray:
    """cumsum(mask) - 1 with padding positions set to 1 (what transformers' generate feeds)."""
    pos = np.cumsum(mask, axis=1) - 1
    pos[mask == 0] = 1
    return pos.astype(np.int64)


class Truncation(enum.Enum):
    """What ``Engine.truncate(n)`` has to do to a cache of ``cached`` tokens."""

    RESET = "reset"  # n == 0: forget everything
    NOTHING = "nothing"  # n == cached
    CUT = "cut"  # 0 < n < cached: drop the columns after n


def plan_truncate(num_tokens: int, cached: int) -> Truncation:
    """Check a ``truncate`` request (GenerationError outside 0..cached) and say what it needs."""
    if num_tokens < 0 or num_tokens > cached:
        raise GenerationError(f"cannot keep {num_tokens} tokens; the cache holds {cached}")
    if num_tokens == 0:
        return Truncation.RESET
    return Truncation.NOTHING if num_tokens == cached else Truncation.CUT


# -- continuous batching: rows -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RowFeed:
    """New tokens for one row of a :class:`RowBatch` step: a prompt piece or the one sampled token."""

    row: int
    ids: np.ndarray  # 1-D int64, at least one token


@runtime_checkable
class RowBatch(Protocol):
    """Independent sequences ("rows") in one KV store, run together: continuous batching.

    Rows are added and dropped between steps (``add_row`` takes a free row, ``drop_row`` frees it
    and its KV at once). A ``step`` feeds any subset of the rows any number of new tokens each (a
    prompt piece for a row being prefilled, the one sampled token for a decoding row), each row at
    its own position (0 .. its length - 1: no padding, whatever the other rows hold), and returns
    the logits of each feed's last token. ``engine.open_rows(max_rows)`` builds one; it owns its
    KV memory, apart from the engine's single-sequence cache.
    """

    max_rows: int

    def add_row(self) -> int:
        """A free row, empty; GenerationError when all ``max_rows`` are taken."""
        ...

    def drop_row(self, row: int) -> None:
        """Forget ``row``'s tokens and free it."""
        ...

    def row_tokens(self, row: int) -> int:
        """Tokens cached for ``row``."""
        ...

    def step(self, feeds: Sequence[RowFeed]) -> np.ndarray:
        """Run every feed (distinct rows) after its row's cached tokens; float32 [len(feeds), vocab]:
        the logits of each feed's last token, in order."""
        ...

    def copy_prefix(self, source: int, target: int, tokens: int) -> None:
        """Start the empty row ``target`` with a copy of the first ``tokens`` cached tokens of row
        ``source`` (a prompt prefix they share: it is not computed again)."""
        ...


def open_rows(engine: Engine, max_rows: int) -> RowBatch:
    """``engine.open_rows(max_rows)``, or OptionError (one line) for an engine that cannot batch."""
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise OptionError(f"max_rows must be an integer >= 1, got {max_rows!r}")
    opener = getattr(engine, "open_rows", None)
    if opener is None:
        raise OptionError(f"the {engine.capabilities.name} engine does not batch sequences; run them one at a time")
    return opener(max_rows)


class RowTable:
    """Which rows of a :class:`RowBatch` are taken and how many tokens each holds; checks feeds."""

    def __init__(self, max_rows: int, max_context: int, vocab_size: int) -> None:
        self.max_rows, self.max_context, self.vocab_size = max_rows, max_context, vocab_size
        self.lengths = np.zeros(max_rows, np.int64)
        self.taken = np.zeros(max_rows, bool)

    def add(self) -> int:
        free = np.flatnonzero(~self.taken)
        if not free.size:
            raise GenerationError(f"all {self.max_rows} rows are taken; drop one first")
        row = int(free[0])  # the lowest: taken rows stay packed at the front
        self.taken[row], self.lengths[row] = True, 0
        return row

    def drop(self, row: int) -> None:
        self._check_row(row)
        self.taken[row], self.lengths[row] = False, 0

    def tokens(self, row: int) -> int:
        self._check_row(row)
        return int(self.lengths[row])

    def check_copy(self, source: int, target: int, tokens: int) -> None:
        """A valid ``copy_prefix``: two taken rows, ``target`` empty, ``source`` holding ``tokens``."""
        self._check_row(source)
        self._check_row(target)
        if source == target or self.lengths[target] != 0:
            raise GenerationError(f"row {target} must be another, empty row to copy a prefix into")
        if isinstance(tokens, bool) or not isinstance(tokens, int) or not 0 < tokens <= self.lengths[source]:
            raise GenerationError(f"cannot copy {tokens!r} tokens of row {source}, which holds {self.lengths[source]}")

    def span(self) -> int:
        """1 + the highest taken row (0 when none is)."""
        taken = np.flatnonzero(self.taken)
        return int(taken[-1]) + 1 if taken.size else 0

    def check(self, feeds: Sequence[RowFeed]) -> list[tuple[int, np.ndarray]]:
        """(row, ids) per feed, checked: distinct taken rows, 1-D ids in the vocabulary, room in the
        context. Raises GenerationError."""
        out, seen = [], set()
        for feed in feeds:
            self._check_row(feed.row)
            if feed.row in seen:
                raise GenerationError(f"row {feed.row} is fed twice in one step")
            seen.add(feed.row)
            ids = np.asarray(feed.ids, np.int64).reshape(-1)
            if ids.size == 0:
                raise GenerationError(f"row {feed.row}: a feed needs at least one token")
            if ids.min() < 0 or ids.max() >= self.vocab_size:
                raise GenerationError(
                    f"row {feed.row}: a token id is out of range for a vocabulary of {self.vocab_size}"
                )
            if self.lengths[feed.row] + ids.size > self.max_context:
                raise GenerationError(
                    f"row {feed.row}: {self.lengths[feed.row] + ids.size} tokens exceed the artifact's context "
                    f"of {self.max_context}"
                )
            out.append((feed.row, ids))
        return out

    def _check_row(self, row: int) -> None:
        if isinstance(row, bool) or not isinstance(row, int | np.integer) or not 0 <= row < self.max_rows:
            raise GenerationError(f"row {row!r} is not a row of this batch (0..{self.max_rows - 1})")
        if not self.taken[row]:
            raise GenerationError(f"row {row} is not taken")
