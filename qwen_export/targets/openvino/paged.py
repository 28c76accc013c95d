"""OpenVINO engine on the paged-attention form of an OpenVINO artifact (``attention=paged``).

The artifact stays the stateful IR openvino-genai loads. At load this engine rewrites it with
OpenVINO's SDPAToPagedAttention, the model openvino-genai's default (continuous-batching) backend
runs on CPU, and adds a Gather of the sampled tokens in front of the lm_head MatMul, as
openvino-genai does. The rewritten model's inputs, per call (each batch row is one sequence)::

    input_ids, position_ids [T]            the rows' new tokens, concatenated, padding dropped
    past_lens [R] i32                      tokens each row already has in the cache
    subsequence_begins [R+1] i32           where each row's tokens start in input_ids
    block_indices [N] i32,                 each row's cache blocks in order, and where each row's
    block_indices_begins [R+1] i32         list starts
    max_context_len [] i32                 the longest row after the call
    key_cache.{i}, value_cache.{i}         per layer, [blocks, kv_heads, rows, bytes per row]: the
                                           element type and block shape the compiled model asks
                                           for (u8 keys carry their per-channel scales in extra rows)
    sampled_tokens_indices [n] i64         the tokens whose logits are computed

The engine owns the block pool (it grows by doubling, copying what is cached) and hands each row
whole blocks; ``truncate`` returns the blocks after the kept prefix to the pool. ``openvino`` is
imported lazily, from :mod:`.openvino`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from qwen_export.artifact import Manifest
from qwen_export.errors import ArtifactError, OptionError
from qwen_export.spec import ModelSpec
from qwen_export.targets.base import Truncation, check_last_k, plan_truncate, prepare_step, run_in_chunks
from qwen_export.targets.openvino.blocks import SAMPLED, BlockPool
from qwen_export.targets.openvino.engine import (
    MODEL_XML,
    PREFILL_MIN_TOKENS,
    Attention,
    OpenVINOOptions,
    Precision,
    RuntimeReport,
    _check_precision,
    _first_line,
    _ov,
    capabilities,
    compiled_choices,
    runtime_report,
    unflatten_lm_head,
)

#: the inputs SDPAToPagedAttention gives a decoder (besides the per-layer caches)
PAGED_INPUTS = frozenset(
    {
        "input_ids",
        "position_ids",
        "past_lens",
        "subsequence_begins",
        "block_indices",
        "block_indices_begins",
        "max_context_len",
        SAMPLED,
    }
)
CACHE_PREFIXES = ("key_cache.", "value_cache.")


def paged_model(model: Any) -> None:
    """Rewrite a stateful artifact model in place: PagedAttention, and logits of the sampled tokens
    only (a Gather on the token axis in front of the lm_head MatMul). Raises ArtifactError when
    the result does not have the inputs this engine feeds."""
    from openvino import opset13
    from openvino._offline_transformations import paged_attention_transformation

    unflatten_lm_head(model)  # artifacts exported before the lm_head was a direct MatMul
    paged_attention_transformation(model)
    lm_head = model.output("logits").get_node().input_value(0).get_node()
    if lm_head.get_type_name() != "MatMul":
        raise ArtifactError(f"the logits are not computed by a MatMul (found {lm_head.get_type_name()})")
    indices = opset13.parameter([-1], np.int64, name=SAMPLED)
    indices.output(0).get_tensor().set_names({SAMPLED})
    axis = opset13.constant(np.array([0], dtype=np.int64))
    lm_head.input(0).replace_source_output(opset13.gather(lm_head.input_value(0), indices, axis).output(0))
    model.add_parameters([indices])
    model.validate_nodes_and_infer_types()
    names = {port.get_any_name() for port in model.inputs}
    unknown = sorted(n for n in names - PAGED_INPUTS if not n.startswith(CACHE_PREFIXES))
    if unknown or not PAGED_INPUTS <= names:
        raise ArtifactError(f"OpenVINO's paged-attention rewrite gave inputs {sorted(names)}; this engine feeds "
                            f"{sorted(PAGED_INPUTS)} and the caches")  # fmt: skip


class PagedOpenVINOEngine:
    """Engine over an OpenVINO artifact run as PagedAttention with a block KV cache it owns."""

    def __init__(self, artifact_dir: str | Path, manifest: Manifest, options: OpenVINOOptions) -> None:
        ov = _ov()
        options = options.for_artifact(manifest)
        self.options = options
        self.spec = ModelSpec.from_dict(manifest.spec)
        if self.spec.has_sliding_layers:
            raise OptionError(
                "paged attention does not apply this model's sliding-window layers; use attention=stateful"
            )
        Attention.PAGED.resolve(self.spec, options.precision)  # refuses f16 compute
        path = Path(artifact_dir) / MODEL_XML
        if not path.is_file():
            raise ArtifactError(f"{path}: missing; re-export the artifact with --target openvino")
        core = ov.Core()
        if options.precision is not Precision.F32:
            _check_precision(core, options)
        started = time.perf_counter()
        try:
            model = core.read_model(os.fspath(path))
            paged_model(model)
            # one compiled form per phase (precision split: decode f32, then prefill bf16)
            compiled = [
                core.compile_model(model, options.device, options.properties(p)) for p in options.precision.phases
            ]
        except RuntimeError as exc:  # OpenVINO raises RuntimeError with a multi-line trace
            raise ArtifactError(f"{path}: OpenVINO could not compile its paged form: {_first_line(exc)}") from None
        del model
        self.load_seconds = time.perf_counter() - started
        self.compiled, self._compiled = compiled[0], compiled
        self._layouts = _cache_layouts(self.compiled)
        self.block_size = _block_size(self._layouts)
        self._pool = self.block_pool()
        self.request, self._prefill = self._pool.request, self._pool.prefill
        caps = capabilities(manifest, self.spec, options)
        self.capabilities = dataclasses.replace(caps, last_only=caps.full_logits)  # sampled_tokens_indices
        self.reset()

    def block_pool(self) -> BlockPool:
        """A new, empty block cache with its own infer requests on the compiled forms."""
        requests = [self.compiled.create_infer_request()]
        prefill = _prefill_request(self._compiled[1:], self._layouts)
        return BlockPool(requests + ([prefill] if prefill is not None else []), self._layouts, self.block_size)

    def open_rows(self, max_rows: int) -> Any:
        """A :class:`~qwen_export.targets.base.RowBatch` of ``max_rows`` rows (continuous batching,
        :mod:`.paged_rows`): its own block cache, apart from this engine's sequence."""
        from qwen_export.targets.openvino.paged_rows import PagedRows

        return PagedRows(self, max_rows)

    # ------------------------------------------------------------------------------ state
    @property
    def num_cached_tokens(self) -> int:
        return 0 if self._mask is None else int(self._mask.shape[1])

    def kernel_choices(self) -> dict[str, str]:
        choices = compiled_choices(self.compiled, "paged")
        if self._prefill is not None:
            choices["precision"] = f"split (prefill bf16 from {PREFILL_MIN_TOKENS} tokens, decode f32)"
        return choices

    @property
    def allocated_blocks(self) -> int:
        """Blocks of ``block_size`` tokens the cache tensors hold (used or free)."""
        return self._pool.capacity

    @property
    def kv_bytes(self) -> int:
        """Bytes the block cache tensors hold now (used and free blocks; 0 before the first call)."""
        return self._pool.kv_bytes

    def reset(self) -> None:
        self._pool.reset(0)  # per batch row: its blocks and its cached tokens (padding is not cached)
        self._mask: np.ndarray | None = None

    def truncate(self, num_tokens: int) -> None:
        plan = plan_truncate(num_tokens, self.num_cached_tokens)
        if plan is Truncation.RESET:
            self.reset()
            return
        if plan is Truncation.NOTHING:
            return
        assert self._mask is not None
        self._mask = self._mask[:, :num_tokens]
        for row, kept in enumerate(self._mask.sum(axis=1)):
            self._pool.keep(row, int(kept))

    # ------------------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray | None = None,
        last_only: bool = False,
        last_k: int | None = None,
    ) -> np.ndarray:
        """``last_only`` (a full-logits artifact): compute the last position's logits only;
        ``last_k`` (``capabilities.last_k_logits``): the last k positions'."""
        step = prepare_step(
            input_ids,
            attention_mask,
            self._mask,
            vocab_size=self.spec.vocab_size,
            max_context=self.capabilities.max_context,
        )
        last_k = check_last_k(last_k, step.ids.shape[1], self.capabilities)
        if self._mask is None:
            self._pool.reset(step.ids.shape[0])
        full = self.capabilities.full_logits and not last_only

        def piece(ids: np.ndarray, mask: np.ndarray, position_ids: np.ndarray, keep: int | None = None) -> np.ndarray:
            return self._piece(ids, mask, position_ids, full, keep)

        return run_in_chunks(step, self.options.prefill_chunk, piece, full, last_k)

    def _piece(
        self, ids: np.ndarray, mask: np.ndarray, position_ids: np.ndarray, full: bool, keep: int | None = None
    ) -> np.ndarray:
        """One inference over the real (unpadded) tokens of ``ids``; ``mask`` covers everything
        cached once they are in; ``full``: every position's logits, else the last one's (``keep``:
        the last ``keep`` positions', each token being a row of the paged form)."""
        batch, seq = ids.shape
        real = mask[:, -seq:] == 1
        counts = real.sum(axis=1)
        rows = np.flatnonzero(counts)
        out = np.zeros((batch, keep or (seq if full else 1), self.spec.vocab_size), np.float32)
        if rows.size and keep is not None:
            picked = real & (np.arange(seq) >= seq - keep)  # the real tokens among the last keep
            sampled = (np.cumsum(real.ravel()) - 1)[picked.ravel()]  # their indices among ids[real]
            logits = self._pool.infer(ids[real], position_ids[real], rows, counts[rows], False, sampled)
            out[picked[:, -keep:]] = logits
        elif rows.size:
            logits = self._pool.infer(ids[real], position_ids[real], rows, counts[rows], full)
            if full:
                out[real] = logits
            else:
                out[rows, 0] = logits
        self._pool.lens += counts
        self._mask = mask
        return out

    def runtime_report(self) -> RuntimeReport:
        return runtime_report(self.compiled)


def _prefill_request(compiled: list[Any], layouts: dict[str, tuple[Any, list[int]]]) -> Any:
    """The prefill form's infer request (precision split), None without one. Its cache inputs must
    have the decode form's element types and block shapes: the two share the cache tensors."""
    if not compiled:
        return None
    if _cache_layouts(compiled[0]) != layouts:
        raise ArtifactError("precision split: the prefill and decode forms want different KV-cache layouts")
    return compiled[0].create_infer_request()


def _cache_layouts(compiled: Any) -> dict[str, tuple[Any, list[int]]]:
    """Each cache input's element type and block shape (all but the block axis), as compiled."""
    layouts = {}
    for port in compiled.inputs:
        name = port.get_any_name()
        if not name.startswith(CACHE_PREFIXES):
            continue
        dims = list(port.get_partial_shape())[1:]
        if len(dims) != 3 or not all(d.is_static for d in dims):
            raise ArtifactError(f"cache input {name} has shape {port.get_partial_shape()}; expected [?, H, rows, D]")
        layouts[name] = (port.get_element_type(), [d.get_length() for d in dims])
    if not layouts:
        raise ArtifactError("the paged model has no key_cache/value_cache inputs")
    return layouts


def _block_size(layouts: dict[str, tuple[Any, list[int]]]) -> int:
    """Tokens per block: the row count of the value caches (key caches may carry scale rows)."""
    sizes = {shape[1] for name, (_, shape) in layouts.items() if name.startswith("value_cache.")}
    if len(sizes) != 1:
        raise ArtifactError(f"value caches disagree on the block size: {sorted(sizes)}")
    return sizes.pop()
