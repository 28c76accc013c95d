"""Continuous batching on ONNX Runtime: a :class:`~qwen_export.targets.base.RowBatch` over the
shared-KV (fused, GroupQueryAttention) form of an artifact.

The artifact's graph gives every row of a call the same cache length (``seqlens_k`` = the mask's
width - 1; left padding stays in the cache). For rows that come and go that would never compact, so
this module opens a second session on the same ``model.onnx`` with one change: ``seqlens_k`` =
``ReduceSum(attention_mask) - 1`` per row, as onnxruntime-genai feeds GQA. Each row then keeps its
tokens at cache columns 0 .. n-1 (positions 0 .. n-1, as when it runs alone) in one buffer per layer
and kind, [max_rows, kv_heads, capacity, head_dim], grown like the engine's own:

- a decode step (every fed row takes one token) runs the rows 0 .. the highest taken one as one
  batch on a view of the buffers: row r's mask is ones over its n_r + 1 columns, zeros after
  (free rows in between get a dummy token on their own empty row);
- prompt pieces of the same length for several rows run as one batch the same way (rows between
  them not fed run that many dummy tokens at their next columns); a piece of its own length runs
  alone on a one-row view of the buffers (its row's columns only), in pieces of the engine's
  ``prefill_chunk``.

With the int8 prompt graph (``export --prefill int8``, opened by the engine) the rows get its
per-row form too, and prompt pieces of ``prefill_int8.MIN_TOKENS`` tokens or more run on it.

``onnxruntime`` and ``onnx`` are imported lazily.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qwen_export.errors import ArtifactError, GenerationError, OptionError
from qwen_export.targets.base import RowFeed, RowTable, grown_capacity

if TYPE_CHECKING:
    from qwen_export.targets.onnxruntime.engine import OnnxRuntimeEngine

PER_ROW_SEQLENS = "rows.seqlens_k"


def per_row_model(model_bytes: bytes) -> bytes:
    """``model.onnx`` with GroupQueryAttention's ``seqlens_k`` taken per row from the mask."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load_model_from_string(model_bytes)
    graph = model.graph
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    if not gqa or "attention_mask" not in {i.name for i in graph.input}:
        raise ArtifactError("continuous batching needs a fused artifact (GroupQueryAttention, attention_mask)")
    for node in gqa:
        node.input[5] = PER_ROW_SEQLENS
    graph.initializer.extend(
        [
            helper.make_tensor("rows.axis1", TensorProto.INT64, [1], [1]),
            helper.make_tensor("rows.one", TensorProto.INT64, [], [1]),
        ]
    )
    nodes = [
        helper.make_node("ReduceSum", ["attention_mask", "rows.axis1"], ["rows.length"], keepdims=0),
        helper.make_node("Sub", ["rows.length", "rows.one"], ["rows.last"]),
        helper.make_node("Cast", ["rows.last"], [PER_ROW_SEQLENS], to=TensorProto.INT32),
    ]
    for i, node in enumerate(nodes):
        graph.node.insert(i, node)
    return model.SerializeToString()


class OrtRows:
    """Rows of independent sequences over an :class:`OnnxRuntimeEngine` (shared KV layout)."""

    def __init__(
        self,
        engine: OnnxRuntimeEngine,
        max_rows: int,
        artifact_dir: Path,
        model_bytes: bytes,
        prefill_bytes: bytes | None = None,
    ) -> None:
        if not engine.shared_kv or engine._fixed_kv:
            layout = "fixed (a TensorRT graph)" if engine._fixed_kv else "concat (exported unfused)"
            raise OptionError(
                f"this artifact's KV layout is {layout}; continuous batching needs the fused ONNX Runtime "
                "export (shared KV buffers); run requests one at a time"
            )
        self._ort, self.engine, self.max_rows = engine._ort, engine, max_rows
        self.session = self._open(model_bytes, artifact_dir, "the batching form")
        #: the int8 prompt graph's batching form (``export --prefill int8``, when the engine opened
        #: it) and its binding, for pieces of prefill_int8.MIN_TOKENS tokens or more; else None.
        #: Its activations are quantized token by token, so a row's logits do not depend on the
        #: rows batched with it.
        self._prefill: tuple[Any, Any] | None = None
        if prefill_bytes is not None:
            session = self._open(prefill_bytes, artifact_dir, "the batching form of the prompt graph", spin=False)
            self._prefill = (session, session.io_binding())
        caps = engine.capabilities
        self.table = RowTable(max_rows, caps.max_context, caps.vocab_size)
        self._buffers: list[np.ndarray] = []
        self._binding = self.session.io_binding()

    def _open(self, model_bytes: bytes, artifact_dir: Path, what: str, spin: bool = True) -> Any:
        """A session on the per-row form of ``model_bytes`` (``spin``: False for the prompt graph,
        whose idle threads would take the decode session's cores)."""
        ort = self._ort
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.engine.options.threads:
            so.intra_op_num_threads = self.engine.options.threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", os.fspath(artifact_dir))
        if not spin:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            return ort.InferenceSession(per_row_model(model_bytes), so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own types; report one line
            raise ArtifactError(f"ONNX Runtime could not load {what}: {str(exc).splitlines()[0]}") from None

    def add_row(self) -> int:
        return self.table.add()

    def drop_row(self, row: int) -> None:
        """Free ``row``; once no row is taken the buffers are released too (their capacity is every
        row's longest: one long prompt would otherwise keep it for all rows)."""
        self.table.drop(row)
        if not self.table.taken.any():
            self._buffers = []

    def row_tokens(self, row: int) -> int:
        return self.table.tokens(row)

    def copy_prefix(self, source: int, target: int, tokens: int) -> None:
        self.table.check_copy(source, target, tokens)
        for buffer in self._buffers:
            buffer[target, :, :tokens] = buffer[source, :, :tokens]
        self.table.lengths[target] = tokens

    @property
    def kv_bytes(self) -> int:
        return sum(b.nbytes for b in self._buffers)

    def step(self, feeds: Sequence[RowFeed]) -> np.ndarray:
        checked = self.table.check(feeds)
        out = np.empty((len(checked), self.table.vocab_size), np.float32)
        lengths, taken = self.table.lengths, self.table.taken
        # every taken row may run a dummy token at its next column in a decode step
        self._reserve(max([int(lengths[taken].max()) + 1, *(int(lengths[r]) + ids.size for r, ids in checked)]))
        decode = [(i, r, ids) for i, (r, ids) in enumerate(checked) if ids.size == 1]
        if decode:
            self._decode(decode, out)
        chunk = self.engine.options.prefill_chunk
        pieces: dict[int, list[tuple[int, int, np.ndarray]]] = {}  # prompt pieces by length
        for i, (row, ids) in enumerate(checked):
            if ids.size > 1:
                pieces.setdefault(ids.size, []).append((i, row, ids))
        for size, group in pieces.items():
            if len(group) > 1 and (not chunk or size <= chunk) and self._room_for(group, size):
                self._pieces_together(group, size, out)
                continue
            for i, row, ids in group:
                step = chunk or ids.size
                for a in range(0, ids.size, step):
                    out[i] = self._prompt_piece(row, ids[a : a + step])
        return out

    def _room_for(self, group: list[tuple[int, int, np.ndarray]], size: int) -> bool:
        """Whether every row between the group's first and last can take ``size`` more columns
        (the rows not in it run dummy tokens at their next columns)."""
        rows = [row for _, row, _ in group]
        span = self.table.lengths[min(rows) : max(rows) + 1]
        return int(span.max()) + size <= self.table.max_context

    def _pieces_together(self, group: list[tuple[int, int, np.ndarray]], size: int, out: np.ndarray) -> None:
        """Prompt pieces of the same length for several rows, in one batch over the rows from the
        group's first to its last; the others run dummy tokens at their next columns (overwritten
        by their next feed) and keep their lengths."""
        first, last = min(row for _, row, _ in group), max(row for _, row, _ in group)
        lengths = self.table.lengths[first : last + 1]
        self._reserve(int(lengths.max()) + size)
        ids = np.zeros((last + 1 - first, size), np.int64)
        for _, row, tokens in group:
            ids[row - first] = tokens
        width = int(lengths.max()) + size
        mask = (np.arange(width)[None, :] < (lengths + size)[:, None]).astype(np.int64)
        logits = self._run(ids, mask, slice(first, last + 1))
        for i, row, _ in group:
            out[i] = logits[row - first, -1]
            self.table.lengths[row] += size

    def _decode(self, decode: list[tuple[int, int, np.ndarray]], out: np.ndarray) -> None:
        span = self.table.span()
        lengths = self.table.lengths[:span]
        # rows not fed (free, or being prefilled) run a dummy token at their next column, which
        # their next feed overwrites; a full row cannot
        full = np.flatnonzero(lengths >= self.table.max_context)
        fed = {row for _, row, _ in decode}
        if any(int(r) not in fed for r in full):
            raise GenerationError(f"row {int(full[0])} holds a full context; drop it before the next step")
        ids = np.zeros((span, 1), np.int64)
        for _, row, token in decode:
            ids[row, 0] = token[0]
        new = lengths.copy()
        width = int(new.max()) + 1
        mask = (np.arange(width)[None, :] <= new[:, None]).astype(np.int64)
        logits = self._run(ids, mask, slice(0, span))
        for i, row, _ in decode:
            out[i] = logits[row, -1]
            self.table.lengths[row] += 1

    def _prompt_piece(self, row: int, ids: np.ndarray) -> np.ndarray:
        cached = int(self.table.lengths[row])
        mask = np.ones((1, cached + ids.size), np.int64)
        logits = self._run(ids[None, :], mask, slice(row, row + 1))
        self.table.lengths[row] += ids.size
        return logits[0, -1]

    def _run(self, ids: np.ndarray, mask: np.ndarray, rows: slice) -> np.ndarray:
        from qwen_export.targets.onnxruntime.prefill_int8 import MIN_TOKENS

        session, b = self.session, self._binding
        if self._prefill is not None and ids.shape[1] >= MIN_TOKENS:
            session, b = self._prefill
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        b.bind_cpu_input("input_ids", np.ascontiguousarray(ids))
        b.bind_cpu_input("attention_mask", mask)
        b.bind_output("logits", "cpu")
        views = []  # the OrtValues share the buffers' memory; keep the views alive for the run
        for name, buffer in zip(self.engine._kv_names(), self._buffers, strict=True):
            view = buffer[rows]
            value = self._ort.OrtValue.ortvalue_from_numpy(view)
            views.append((view, value))
            b.bind_ortvalue_input(f"past_key_values.{name}", value)
            b.bind_ortvalue_output(f"present.{name}", value)
        session.run_with_iobinding(b)
        return b.get_outputs()[0].numpy()

    def _reserve(self, needed: int) -> None:
        """Buffers holding at least ``needed`` tokens per row (grown, columns kept)."""
        current = self._buffers[0].shape[2] if self._buffers else 0
        if needed <= current:
            return
        engine = self.engine
        capacity = grown_capacity(needed, current, engine.options.kv_step, engine.capabilities.max_context)
        spec = engine.spec
        shape = (self.max_rows, spec.num_key_value_heads, capacity, spec.head_dim)
        buffers = self._buffers or [None] * (2 * spec.num_hidden_layers)
        self._buffers = []
        for i, old in enumerate(buffers):
            array = np.zeros(shape, engine.kv_dtype)
            if old is not None:
                array[:, :, :current] = old
            buffers[i] = array
            del old
        self._buffers = buffers  # type: ignore[assignment]
