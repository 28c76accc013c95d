"""Trace the export-oriented decoder to an ONNX IR model with the canonical IO
(docs/architecture.md, "Canonical IO").

The module is built on the ``meta`` device and traced with ``torch.onnx.export(dynamo=True)``: the
tracer sees shapes and dtypes only, so tracing a 72B model costs no more memory than a 0.5B one.
Every initializer of the traced graph is then bound to an ``onnx_ir.LazyTensor`` that reads its
tensor from the checkpoint (and transposes / casts it) only when the model is written, one tensor
at a time: peak memory of an export is a small multiple of the largest tensor.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import warnings
from collections.abc import Callable
from typing import BinaryIO, Protocol

import numpy as np
import onnx_ir as ir

from qwen_export.errors import CheckpointError
from qwen_export.spec import CacheIO, DType, LogitsMode, ModelSpec

#: Opset of the traced graph (ONNX Runtime 1.2x supports it; TensorRT wants 21+ later).
OPSET = 21

# Shapes used for tracing: all different and >= 2 so torch.export keeps every dim symbolic
# (fixed-capacity caches: mask width _TRACE_PAST + _TRACE_SEQ, capacity _TRACE_CAPACITY).
_TRACE_BATCH, _TRACE_SEQ, _TRACE_PAST, _TRACE_CAPACITY = 2, 3, 5, 11


class WeightSource(Protocol):
    """Anything that returns checkpoint tensors by Hugging Face name (e.g. Checkpoint).

    ``read_rows`` lets large tensors be streamed in bounded memory.
    """

    def read(self, name: str) -> np.ndarray: ...

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray: ...

    def shape(self, name: str) -> tuple[int, ...]: ...


@dataclasses.dataclass(frozen=True)
class TraceOptions:
    dtype: DType = DType.FP32
    logits: LogitsMode = LogitsMode.LAST
    #: Trace one layer per distinct layer type and clone it (see :mod:`qwen_export.export.replicate`);
    #: False traces every layer (slow; used to test that both give the same graph semantics).
    replicate_layers: bool = True
    #: ``scatter``: fixed-capacity KV buffers written at ``cache_position`` (the TensorRT graph)
    cache: CacheIO = CacheIO.CONCAT
    #: With ``LogitsMode.LAST``: the last layer runs its output projection and MLP on the last
    #: token only (its keys/values still cover every token). False keeps the full last layer.
    prune_last_layer: bool = True

    @property
    def pruned(self) -> bool:
        return self.prune_last_layer and self.logits is LogitsMode.LAST


def input_names(spec: ModelSpec, cache: CacheIO = CacheIO.CONCAT) -> list[str]:
    names = ["input_ids", "attention_mask", "position_ids"]
    for i in range(spec.num_hidden_layers):
        names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    if cache is CacheIO.SCATTER:
        names.append("cache_position")
    return names


def output_names(spec: ModelSpec) -> list[str]:
    names = ["logits"]
    for i in range(spec.num_hidden_layers):
        names += [f"present.{i}.key", f"present.{i}.value"]
    return names


#: traced graphs kept per process (the graph only: initializers carry no data until bound)
TRACE_MEMO_SIZE = 16
_traced: collections.OrderedDict[tuple[ModelSpec, TraceOptions], ir.Model] = collections.OrderedDict()


def trace(spec: ModelSpec, options: TraceOptions) -> ir.Model:
    """Trace the decoder for ``spec``; initializers carry no data yet (see :func:`bind_weights`).

    Tracing is deterministic in ``(spec, options)``, so the graph is memoised per process and each
    call returns a fresh clone (passes rewrite it in place): a second export of the same model (a
    benchmark sweep, several targets) skips the seconds torch.export takes."""
    key = (spec, options)
    if key not in _traced:
        _traced[key] = _trace_fresh(spec, options)
        while len(_traced) > TRACE_MEMO_SIZE:
            _traced.popitem(last=False)
    _traced.move_to_end(key)
    return _traced[key].clone()


def _trace_fresh(spec: ModelSpec, options: TraceOptions) -> ir.Model:
    if not options.replicate_layers:
        model = _trace(spec, options)
        _name_dims(model, options.cache)
        return model
    from qwen_export.export.replicate import replicate_layers

    # one prototype layer per distinct layer type, in order of appearance; a pruned last layer is
    # a prototype of its own, traced last
    body = spec.layer_types[:-1] if options.pruned else spec.layer_types
    kinds = list(dict.fromkeys(body))
    which = [kinds.index(t) for t in body]
    if options.pruned:
        which.append(len(kinds))
        kinds.append(spec.layer_types[-1])
    prototype = dataclasses.replace(spec, num_hidden_layers=len(kinds), layer_types=tuple(kinds))
    model = _trace(prototype, options)
    replicate_layers(model, which, len(kinds))
    _name_dims(model, options.cache)
    return model


def _trace(spec: ModelSpec, options: TraceOptions) -> ir.Model:
    import torch

    from qwen_export.export.modeling import QwenForExport

    tdtype = torch.float16 if options.dtype is DType.FP16 else torch.float32
    with torch.device("meta"):
        module = QwenForExport(spec, tdtype, options.logits, options.pruned).eval()
        b, s, p = _TRACE_BATCH, _TRACE_SEQ, _TRACE_PAST
        scatter = options.cache is CacheIO.SCATTER
        kv_len = _TRACE_CAPACITY if scatter else p
        kv_shape = (b, spec.num_key_value_heads, kv_len, spec.head_dim)
        args: tuple = (
            torch.ones(b, s, dtype=torch.int64),
            torch.ones(b, p + s, dtype=torch.int64),
            torch.ones(b, s, dtype=torch.int64),
            [torch.zeros(kv_shape, dtype=tdtype) for _ in range(2 * spec.num_hidden_layers)],
        )
        if scatter:
            args += (torch.arange(p, p + s, dtype=torch.int64),)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence_length")
    kv_dims = {0: batch, 2: torch.export.Dim("max_sequence_length" if scatter else "past_sequence_length")}
    dynamic_shapes: tuple = (
        {0: batch, 1: seq},
        {0: batch, 1: torch.export.Dim.AUTO},
        {0: batch, 1: seq},
        [kv_dims for _ in range(2 * spec.num_hidden_layers)],
    )
    if scatter:
        dynamic_shapes += ({0: seq},)
    logging.disable(logging.WARNING)  # the exporter logs optional-dependency notes (torchvision)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                input_names=input_names(spec, options.cache),
                output_names=output_names(spec),
                dynamic_shapes=dynamic_shapes,
                opset_version=OPSET,
                optimize=False,
                verbose=False,
            )
    finally:
        logging.disable(logging.NOTSET)
    return program.model


def _name_dims(model: ir.Model, cache: CacheIO) -> None:
    """Give the symbolic dims the canonical names optimum / onnxruntime-genai use (fixed-capacity
    caches: ``max_sequence_length`` for the buffers, ``attention_width`` for the mask)."""
    total = ir.SymbolicDim("total_sequence_length")
    width = ir.SymbolicDim("attention_width")
    capacity = ir.SymbolicDim("max_sequence_length")
    for value in list(model.graph.inputs) + list(model.graph.outputs):
        shape = value.shape
        if shape is None:
            continue
        dims = list(shape.dims)
        if value.name == "attention_mask":
            dims[1] = width if cache is CacheIO.SCATTER else total
        if value.name.startswith("present."):
            dims[-2] = capacity if cache is CacheIO.SCATTER else total
        if value.name == "logits":
            dims[1] = ir.SymbolicDim("sequence_length") if not isinstance(dims[1], int) else dims[1]
        value.shape = ir.Shape(dims)


@dataclasses.dataclass(frozen=True)
class _Binding:
    hf_name: str | None  # checkpoint tensor, or None for a computed constant
    transpose: bool = False
    computed: Callable[[], np.ndarray] | None = None


def _binding_for(name: str, spec: ModelSpec) -> _Binding:
    if name == "rotary_inv_freq":
        inv, _ = spec.rope_inv_freq_and_scale()
        return _Binding(None, computed=lambda: np.asarray(inv, dtype=np.float32))
    if name.endswith(".weight_t"):
        return _Binding(name[: -len("_t")], transpose=True)
    return _Binding(name)


#: Bytes converted at a time when a tensor is streamed to disk.
CHUNK_BYTES = 32 << 20


class CheckpointTensor(ir.LazyTensor):
    """An initializer whose data is a checkpoint tensor (maybe transposed, cast), read on demand.

    ``numpy()``/``tobytes()`` read it whole (what generic passes use, for small tensors);
    :meth:`write_to` streams it to a file in chunks of about ``CHUNK_BYTES``, so writing the
    largest tensor costs one chunk of memory (one converted copy when it is transposed).
    """

    def __init__(
        self, source: WeightSource, binding: _Binding, shape: tuple[int, ...], dtype: ir.DataType, name: str
    ) -> None:
        self.source, self.binding, self.target_shape = source, binding, shape
        super().__init__(self._load, dtype=dtype, shape=ir.Shape(shape), name=name)

    def _np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype.numpy())

    def _check_shape(self, found: tuple[int, ...]) -> None:
        expected = self.target_shape[::-1] if self.binding.transpose else self.target_shape
        if tuple(found) != expected:
            raise CheckpointError(
                f"tensor {self.binding.hf_name or self.name} has shape {tuple(found)}, expected {expected} "
                "for this config"
            )

    def _load(self) -> ir.TensorProtocol:
        if self.binding.computed is not None:
            array = self.binding.computed()
            self._check_shape(array.shape)
        else:
            assert self.binding.hf_name is not None
            array = self.source.read(self.binding.hf_name)
            self._check_shape(array.shape)
            if self.binding.transpose:
                array = array.T
        return ir.tensor(np.ascontiguousarray(array, dtype=self._np_dtype()), name=self.name)

    def write_to(self, f: BinaryIO) -> int:
        """Write the tensor's raw little-endian bytes to ``f``; return the byte count."""
        name = self.binding.hf_name
        if name is None or len(self.target_shape) < 2:
            data = self._load().numpy()
            data.tofile(f)
            return int(data.nbytes)
        self._check_shape(self.source.shape(name))
        dtype = self._np_dtype()
        src_rows = self.source.shape(name)[0]
        row_bytes = max(1, self.nbytes // src_rows)
        step = max(1, CHUNK_BYTES // row_bytes)
        if not self.binding.transpose:
            for start in range(0, src_rows, step):
                np.ascontiguousarray(self.source.read_rows(name, start, start + step), dtype=dtype).tofile(f)
            return self.nbytes
        out = np.empty(self.target_shape, dtype)  # transposed: source rows are target columns
        for start in range(0, src_rows, step):
            out[:, start : start + step] = self.source.read_rows(name, start, start + step).T
        out.tofile(f)
        return self.nbytes


def bind_weights(model: ir.Model, spec: ModelSpec, source: WeightSource) -> None:
    """Attach a :class:`CheckpointTensor` to every initializer.

    Nothing is read here. Each tensor is cast to its initializer's traced dtype (fp32 or fp16, fixed
    at trace time). Shapes are checked against the traced ones when a tensor is read, so a
    wrong-shaped tensor is reported with its name even if validation missed it.
    """
    for name, value in model.graph.initializers.items():
        shape = tuple(int(d) for d in value.shape.dims)  # type: ignore[union-attr]
        ir_dtype = value.dtype
        assert ir_dtype is not None
        value.const_value = CheckpointTensor(source, _binding_for(name, spec), shape, ir_dtype, name)
