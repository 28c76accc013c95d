"""The block KV cache of the paged OpenVINO engine (:mod:`.paged`) and of its rows (:mod:`.paged_rows`).

A :class:`BlockPool` owns one infer request per compiled form (precision split: decode, then
prefill; they share the cache tensors) and the cache tensors set on them: per layer and kind,
[blocks, kv_heads, rows, bytes per row]. It grows by doubling (what is cached is copied), hands
each sequence whole blocks and takes them back. ``infer`` runs one PagedAttention call over the
new tokens of some sequences, each after its own cached tokens. ``openvino`` is imported lazily.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qwen_export.targets.openvino.engine import PREFILL_MIN_TOKENS, _ov

SAMPLED = "sampled_tokens_indices"


class BlockPool:
    """Cache blocks and their owners. ``blocks[s]``: sequence s's blocks in order; ``lens[s]``: its
    cached tokens (the caller advances it after ``infer``)."""

    def __init__(self, requests: list[Any], layouts: dict[str, tuple[Any, list[int]]], block_size: int) -> None:
        self.request = requests[0]
        self.prefill = requests[1] if len(requests) > 1 else None
        self.layouts, self.block_size = layouts, block_size
        self.capacity = 0  # blocks allocated per cache tensor
        self.free: list[int] = []
        self.reset(0)

    def reset(self, sequences: int) -> None:
        """Every block free; ``sequences`` empty sequences."""
        self.free = list(range(self.capacity - 1, -1, -1))
        self.blocks: list[list[int]] = [[] for _ in range(sequences)]
        self.lens = np.zeros(sequences, np.int64)

    def keep(self, seq: int, tokens: int) -> None:
        """Keep ``tokens`` of sequence ``seq``: its blocks after them go back to the pool."""
        blocks = self.blocks[seq]
        needed = -(-int(tokens) // self.block_size)
        self.free.extend(reversed(blocks[needed:]))
        del blocks[needed:]
        self.lens[seq] = tokens

    def copy_prefix(self, source: int, target: int, tokens: int) -> None:
        """Give the empty sequence ``target`` copies of the blocks holding ``source``'s first
        ``tokens`` (whole blocks: the rest of the last one is overwritten as ``target`` grows)."""
        ov = _ov()
        needed = -(-tokens // self.block_size)
        self._reserve(np.array([target]), np.array([needed]))
        for name, (_, block_shape) in self.layouts.items():
            tensor = self.request.get_tensor(name)
            zeros = [0] * len(block_shape)
            for src, dst in zip(self.blocks[source][:needed], self.blocks[target], strict=False):
                piece = ov.Tensor(tensor, [src, *zeros], [src + 1, *block_shape])
                piece.copy_to(ov.Tensor(tensor, [dst, *zeros], [dst + 1, *block_shape]))
        self.lens[target] = tokens

    @property
    def kv_bytes(self) -> int:
        return sum(int(self.request.get_tensor(name).byte_size) for name in self.layouts) if self.capacity else 0

    def infer(
        self,
        ids: np.ndarray,
        positions: np.ndarray,
        seqs: np.ndarray,
        counts: np.ndarray,
        full: bool,
        sampled: np.ndarray | None = None,
    ) -> np.ndarray:
        """One inference over the new tokens of ``seqs`` (``counts[i]`` each, concatenated in ``ids``,
        at ``positions``); the sampled tokens' logits [n, vocab] (``full``: every token's, else each
        sequence's last; ``sampled``: those of these indices into ``ids``)."""
        past = self.lens[seqs]
        totals = past + counts
        needed = -(-totals // self.block_size)
        self._reserve(seqs, needed)
        blocks = [self.blocks[s][:n] for s, n in zip(seqs, needed, strict=True)]
        ends = np.cumsum(counts)
        if sampled is None:
            sampled = np.arange(ends[-1]) if full else ends - 1
        request = self.prefill if self.prefill is not None and ends[-1] >= PREFILL_MIN_TOKENS else self.request
        request.infer(
            {
                "input_ids": ids,
                "position_ids": positions,
                "past_lens": past.astype(np.int32),
                "subsequence_begins": np.concatenate([[0], ends]).astype(np.int32),
                "block_indices": np.concatenate(blocks).astype(np.int32),
                "block_indices_begins": np.concatenate([[0], np.cumsum(needed)]).astype(np.int32),
                "max_context_len": np.array(totals.max(), np.int32),
                SAMPLED: sampled.astype(np.int64),
            },
            share_inputs=True,
        )
        logits = request.get_tensor("logits").data
        return np.array(logits.reshape(len(sampled), -1), dtype=np.float32)

    def _reserve(self, seqs: np.ndarray, needed: np.ndarray) -> None:
        """Give each sequence ``needed`` blocks, growing the pool when it runs out."""
        missing = sum(max(0, int(n) - len(self.blocks[s])) for s, n in zip(seqs, needed, strict=True))
        if missing > len(self.free):
            self._grow(self.capacity + missing - len(self.free))
        for s, n in zip(seqs, needed, strict=True):
            while len(self.blocks[s]) < n:
                self.blocks[s].append(self.free.pop())

    def _grow(self, at_least: int) -> None:
        """Reallocate every cache tensor with room for ``at_least`` blocks (doubling), keeping the
        blocks already written; the new blocks join the free list."""
        ov = _ov()
        capacity = max(at_least, 2 * self.capacity, 8)
        for name, (element_type, block_shape) in self.layouts.items():
            tensor = ov.Tensor(element_type, [capacity, *block_shape])
            # zeroed: PagedAttention reads whole blocks, and uninitialised f16 bits can be NaN
            np.asarray(tensor.data).fill(0)
            if self.capacity:
                old = self.request.get_tensor(name)
                old.copy_to(ov.Tensor(tensor, [0] * (1 + len(block_shape)), [self.capacity, *block_shape]))
            self.request.set_tensor(name, tensor)
            if self.prefill is not None:  # the same cache memory: both forms read and write it
                self.prefill.set_tensor(name, tensor)
        self.free = list(range(capacity - 1, self.capacity - 1, -1)) + self.free
        self.capacity = capacity
