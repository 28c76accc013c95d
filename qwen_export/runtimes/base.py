"""The Engine protocol every target implements (DESIGN.md §6).

An engine owns its KV cache. ``forward`` appends the given tokens to it and returns logits;
generation, chat templates and tool calls sit above and never know which engine runs.

Batching: ``forward`` takes ``input_ids`` of shape [batch, seq]. For left-padded batches pass the
``attention_mask`` of the *new* tokens ([batch, seq], 1 = real token, 0 = padding); the engine keeps
the mask of everything cached and derives ``position_ids`` from it (cumsum of the mask minus one,
padding positions set to 1, as transformers does).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable

import numpy as np


@dataclasses.dataclass(frozen=True)
class EngineCapabilities:
    name: str  # e.g. "onnxruntime"
    max_context: int  # tokens the engine can hold (prompt + generated)
    max_batch: int  # 0 = no fixed limit
    devices: tuple[str, ...]  # e.g. ("cpu",)
    full_logits: bool  # True when forward returns logits for every position, not only the last
    vocab_size: int


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
        artifact was exported with full logits, then seq_out = seq.
        """
        ...

    def reset(self) -> None:
        """Forget the KV cache (start a new conversation)."""
        ...

    def truncate(self, num_tokens: int) -> None:
        """Keep only the first ``num_tokens`` cached tokens (reuse a common prefix across turns)."""
        ...
