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
import functools
import hashlib
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qwen_export.spec import CacheIO, DType, LogitsMode, ModelSpec
from qwen_export.weights import CheckpointTensor, WeightSource, _Binding

#: Opset of the traced graph (ONNX Runtime 1.2x supports it; TensorRT wants 21+ later).
OPSET = 21

# Shapes used for tracing: all different and >= 2 so torch.export keeps every dim symbolic
# (fixed-capacity caches: mask width _TRACE_PAST + _TRACE_SEQ, capacity _TRACE_CAPACITY;
# _TRACE_ROWS logits rows with LogitsMode.LAST).
_TRACE_BATCH, _TRACE_SEQ, _TRACE_PAST, _TRACE_CAPACITY, _TRACE_ROWS = 2, 3, 5, 11, 7

#: The graph input of a ``LogitsMode.LAST`` graph that says which new positions get logits: int64
#: [K], positions among the S new tokens (negative: from the end), the same for every batch row;
#: logits [B, K, V]. ``[-1]`` is the last position's (ONNX Runtime artifacts carry it as that
#: default, an overridable initializer: callers that do not know it feed nothing). Speculative
#: decoding asks for the k+1 rows it verifies.
LOGITS_INDICES = "logits_indices"


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
    #: the first input is ``inputs_embeds`` [B, S, hidden] instead of ``input_ids`` (a
    #: vision-language decoder: the runtime merges image features into the embeddings)
    embeds_input: bool = False

    @property
    def pruned(self) -> bool:
        return self.prune_last_layer and self.logits is LogitsMode.LAST


def input_names(
    spec: ModelSpec, cache: CacheIO = CacheIO.CONCAT, logits: LogitsMode = LogitsMode.LAST, embeds: bool = False
) -> list[str]:
    names = ["inputs_embeds" if embeds else "input_ids", "attention_mask", "position_ids"]
    for i in range(spec.num_hidden_layers):
        names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    if cache is CacheIO.SCATTER:
        names.append("cache_position")
    if logits is LogitsMode.LAST:
        names.append(LOGITS_INDICES)
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
        _traced[key] = _cached_trace(spec, options)
        while len(_traced) > TRACE_MEMO_SIZE:
            _traced.popitem(last=False)
    _traced.move_to_end(key)
    return _traced[key].clone()


#: environment variable: a directory where traced graphs persist across processes (graphs only,
#: keyed by the model shape, the trace options and the code and library versions that trace);
#: unset, tracing is memoised per process only
TRACE_CACHE_ENV = "QWEN_EXPORT_TRACE_CACHE"
#: the stand-in data location of a cached graph's initializers: they are bound before anything reads them
_PLACEHOLDER = "qwen-export-trace-placeholder"


def _cached_trace(spec: ModelSpec, options: TraceOptions) -> ir.Model:
    """The traced graph from :data:`TRACE_CACHE_ENV`'s directory when it holds this key's, else
    traced (and stored there, atomically: parallel exports may race to write the same entry)."""
    directory = os.environ.get(TRACE_CACHE_ENV)
    if not directory:
        return _trace_fresh(spec, options)
    path = Path(directory) / f"{trace_key(spec, options)}.onnx"
    if path.is_file():
        try:
            return _read_graph(path)
        except Exception:  # noqa: BLE001 - an unreadable entry is traced again and rewritten
            pass
    model = _trace_fresh(spec, options)
    _write_graph(model, path)
    return model


def trace_key(spec: ModelSpec, options: TraceOptions) -> str:
    """Hex digest of everything a traced graph depends on: the spec, the options, the tracing code
    (this package's export modules and spec) and the versions of torch, onnxscript and onnx-ir."""
    record = {
        "spec": spec.to_dict(),
        "options": {f.name: _plain(getattr(options, f.name)) for f in dataclasses.fields(options)},
        "code": _code_digest(),
        "opset": OPSET,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _plain(value: object) -> object:
    return getattr(value, "value", value)


@functools.cache
def _code_digest() -> str:
    import onnxscript
    import torch

    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(f"{torch.__version__} {onnxscript.__version__} {ir.__version__}".encode())
    for path in sorted([*package.joinpath("export").glob("*.py"), package / "spec.py", package / "moe.py"]):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def _write_graph(model: ir.Model, path: Path) -> None:
    import onnx  # noqa: F401 - the protobuf classes serde fills

    copy = model.clone()
    for value in copy.graph.initializers.values():
        assert value.dtype is not None and value.shape is not None
        value.const_value = ir.ExternalTensor(_PLACEHOLDER, 0, 0, value.dtype, shape=value.shape, name=value.name or "")
    data = ir.serde.serialize_model(copy).SerializeToString()
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(data)
        os.replace(partial, path)
    except OSError:  # a cache that cannot be written: the export goes on without it
        partial.unlink(missing_ok=True)


def _read_graph(path: Path) -> ir.Model:
    import onnx

    model = ir.serde.deserialize_model(onnx.ModelProto.FromString(path.read_bytes()))
    for value in model.graph.initializers.values():
        const = value.const_value
        if not isinstance(const, ir.ExternalTensor) or Path(const.location).name != _PLACEHOLDER:
            raise ValueError(f"{path}: initializer {value.name} is not a placeholder")
    return model


def _trace_fresh(spec: ModelSpec, options: TraceOptions) -> ir.Model:
    if not options.replicate_layers:
        model = _trace(spec, options)
        _name_dims(model, options.cache)
        return model
    from qwen_export.export.replicate import replicate_layers

    # one prototype layer per distinct (layer type, dense or sparse MLP), in order of appearance;
    # a pruned last layer is a prototype of its own, traced last
    every = [(t, spec.is_sparse_layer(i)) for i, t in enumerate(spec.layer_types)]
    body = every[:-1] if options.pruned else every
    kinds = list(dict.fromkeys(body))
    which = [kinds.index(t) for t in body]
    if options.pruned:
        which.append(len(kinds))
        kinds.append(every[-1])
    moe = spec.moe and dataclasses.replace(spec.moe, sparse_layers=tuple(sparse for _, sparse in kinds))
    prototype = dataclasses.replace(spec, num_hidden_layers=len(kinds), layer_types=tuple(t for t, _ in kinds), moe=moe)
    model = _trace(prototype, options)
    replicate_layers(model, which, len(kinds))
    _name_dims(model, options.cache)
    return model


def _trace(spec: ModelSpec, options: TraceOptions) -> ir.Model:
    import torch

    from qwen_export.export.modeling import QwenForExport

    tdtype = torch.float16 if options.dtype is DType.FP16 else torch.float32
    with torch.device("meta"):
        module = QwenForExport(spec, tdtype, options.logits, options.pruned, options.embeds_input).eval()
        b, s, p = _TRACE_BATCH, _TRACE_SEQ, _TRACE_PAST
        scatter = options.cache is CacheIO.SCATTER
        kv_len = _TRACE_CAPACITY if scatter else p
        kv_shape = (b, spec.num_key_value_heads, kv_len, spec.head_dim)
        mrope = spec.mrope_section is not None
        args: tuple = (
            torch.zeros(b, s, spec.hidden_size, dtype=tdtype)
            if options.embeds_input
            else torch.ones(b, s, dtype=torch.int64),
            torch.ones(b, p + s, dtype=torch.int64),
            torch.ones(3, b, s, dtype=torch.int64) if mrope else torch.ones(b, s, dtype=torch.int64),
            [torch.zeros(kv_shape, dtype=tdtype) for _ in range(2 * spec.num_hidden_layers)],
        )
        if scatter:
            args += (torch.arange(p, p + s, dtype=torch.int64),)
        last = options.logits is LogitsMode.LAST
        if last:
            args += (None,) * (not scatter) + (torch.zeros(_TRACE_ROWS, dtype=torch.int64),)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence_length")
    kv_dims = {0: batch, 2: torch.export.Dim("max_sequence_length" if scatter else "past_sequence_length")}
    dynamic_shapes: tuple = (
        {0: batch, 1: seq},
        {0: batch, 1: torch.export.Dim.AUTO},
        {1: batch, 2: seq} if mrope else {0: batch, 1: seq},
        [kv_dims for _ in range(2 * spec.num_hidden_layers)],
    )
    if scatter:
        dynamic_shapes += ({0: seq},)
    if last:
        dynamic_shapes += (None,) * (not scatter) + ({0: torch.export.Dim("logits_rows")},)
    names = input_names(spec, options.cache, options.logits, options.embeds_input)
    return export_module(module, args, names, output_names(spec), dynamic_shapes)


def export_module(
    module: object, args: tuple, inputs: list[str], outputs: list[str], dynamic_shapes: tuple
) -> ir.Model:
    """``torch.onnx.export(dynamo=True)`` of a meta-device module at :data:`OPSET`, unoptimised,
    with the exporter's warnings and optional-dependency log notes silenced."""
    import torch

    logging.disable(logging.WARNING)  # the exporter logs optional-dependency notes (torchvision)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                input_names=inputs,
                output_names=outputs,
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
    caches: ``max_sequence_length`` for the buffers, ``attention_width`` for the mask). Batch and
    sequence are named here too: torch.export keeps its ``Dim`` names only without the ``None``
    argument a ``--logits last`` trace passes for ``cache_position``."""
    batch, seq = ir.SymbolicDim("batch"), ir.SymbolicDim("sequence_length")
    total = ir.SymbolicDim("total_sequence_length")
    width = ir.SymbolicDim("attention_width")
    capacity = ir.SymbolicDim("max_sequence_length")
    past = capacity if cache is CacheIO.SCATTER else ir.SymbolicDim("past_sequence_length")
    rows = any(v.name == LOGITS_INDICES for v in model.graph.inputs)
    for value in list(model.graph.inputs) + list(model.graph.outputs):
        shape = value.shape
        if shape is None:
            continue
        dims = [d if isinstance(d, int) else None for d in shape.dims]
        name = value.name or ""
        if name in (LOGITS_INDICES, "cache_position"):
            dims[0] = ir.SymbolicDim("logits_rows") if name == LOGITS_INDICES else seq
        elif name in ("input_ids", "position_ids") and len(dims) == 2:
            dims = [batch, seq]
        elif name == "position_ids":  # M-RoPE: [3, B, S]
            dims = [3, batch, seq]
        elif name == "inputs_embeds":
            dims = [batch, seq, dims[2]]
        elif name == "attention_mask":
            dims = [batch, width if cache is CacheIO.SCATTER else total]
        elif name.startswith(("past_key_values.", "present.")):
            dims[0] = batch
            dims[2] = past if name.startswith("past_") else capacity if cache is CacheIO.SCATTER else total
        elif name == "logits":
            dims[0] = batch
            if dims[1] is None:
                dims[1] = ir.SymbolicDim("logits_rows") if rows else seq
        value.shape = ir.Shape([d if d is not None else shape.dims[i] for i, d in enumerate(dims)])


def rope_inv_freq_and_scale(spec: ModelSpec) -> tuple[list[float], float]:
    """:meth:`ModelSpec.rope_inv_freq_and_scale` with ``base ** (2i / dim)`` computed by torch in
    float32, as transformers computes it (torch's pow can differ from a correctly rounded one by an
    ulp): the exported inverse frequencies equal transformers' bit for bit."""
    import torch

    dim = spec.head_dim
    pos_freqs = spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float32) / dim)
    return spec.rope_inv_freq_and_scale(pos_freqs.tolist())


def _binding_for(name: str, spec: ModelSpec) -> _Binding:
    if name == "rotary_inv_freq":
        inv, _ = rope_inv_freq_and_scale(spec)
        return _Binding(None, computed=lambda: np.asarray(inv, dtype=np.float32))
    if name.endswith(".weight_t"):
        return _Binding(name[: -len("_t")], transpose=True)
    return _Binding(name)


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
