"""Continuous batching on OpenVINO: a :class:`~qwen_export.targets.base.RowBatch` over the paged
engine's compiled model. PagedAttention takes sequences of different lengths in one call (each
with its own past length and blocks), so a step runs every feed, prompt pieces and decode tokens
together, in one inference; ``drop_row`` returns the row's blocks to the pool at once. Prompt
pieces longer than the engine's ``prefill_chunk`` are split over several inferences (the decode
tokens run with the first)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from qwen_export.targets.base import RowFeed, RowTable

if TYPE_CHECKING:
    from qwen_export.targets.openvino.paged import PagedOpenVINOEngine


class PagedRows:
    """Rows of independent sequences in a block cache of their own."""

    def __init__(self, engine: PagedOpenVINOEngine, max_rows: int) -> None:
        self.engine, self.max_rows = engine, max_rows
        caps = engine.capabilities
        self.table = RowTable(max_rows, caps.max_context, caps.vocab_size)
        self.pool = engine.block_pool()
        self.pool.reset(max_rows)

    def add_row(self) -> int:
        return self.table.add()

    def drop_row(self, row: int) -> None:
        """Free ``row`` and return its blocks to the pool (which keeps its size, as the engine's)."""
        self.table.drop(row)
        self.pool.keep(row, 0)

    def row_tokens(self, row: int) -> int:
        return self.table.tokens(row)

    def copy_prefix(self, source: int, target: int, tokens: int) -> None:
        self.table.check_copy(source, target, tokens)
        self.pool.copy_prefix(source, target, tokens)
        self.table.lengths[target] = tokens

    @property
    def kv_bytes(self) -> int:
        return self.pool.kv_bytes

    def step(self, feeds: Sequence[RowFeed]) -> np.ndarray:
        checked = self.table.check(feeds)
        out = np.empty((len(checked), self.table.vocab_size), np.float32)
        chunk = self.engine.options.prefill_chunk
        done = [0] * len(checked)  # tokens of each feed run so far
        while True:
            todo = [i for i, (_, ids) in enumerate(checked) if done[i] < ids.size]
            if not todo:
                return out
            left = [checked[i][1].size - done[i] for i in todo]
            take = [min(chunk, n) if chunk else n for n in left]
            rows = np.array([checked[i][0] for i in todo], np.int64)
            counts = np.array(take, np.int64)
            past = self.pool.lens[rows]
            ids = np.concatenate([checked[i][1][done[i] : done[i] + n] for i, n in zip(todo, take, strict=True)])
            positions = np.concatenate([np.arange(p, p + n) for p, n in zip(past, take, strict=True)])
            logits = self.pool.infer(ids, positions.astype(np.int64), rows, counts, full=False)
            self.pool.lens[rows] += counts
            self.table.lengths[rows] += counts
            for j, (i, n) in enumerate(zip(todo, take, strict=True)):
                done[i] += n
                if done[i] == checked[i][1].size:
                    out[i] = logits[j]
