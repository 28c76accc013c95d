"""Trace the export-oriented decoder to an ONNX IR model with the canonical IO (DESIGN.md §4).

The module is built on the ``meta`` device and traced with ``torch.onnx.export(dynamo=True)``: the
tracer sees shapes and dtypes only, so tracing a 72B model costs no more memory than a 0.5B one.
Every initializer of the traced graph is then bound to an ``onnx_ir.LazyTensor`` that reads its
tensor from the checkpoint (and transposes / casts it) only when the model is written, one tensor
at a time: peak memory of an export is a small multiple of the largest tensor.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable
from typing import Protocol

import numpy as np
import onnx_ir as ir

from .errors import CheckpointError
from .spec import DType, LogitsMode, ModelSpec

#: Opset of the traced graph (ONNX Runtime 1.2x supports it; TensorRT wants 21+ later).
OPSET = 21

# Shapes used for tracing: all different and >= 2 so torch.export keeps every dim symbolic.
_TRACE_BATCH, _TRACE_SEQ, _TRACE_PAST = 2, 3, 5


class WeightSource(Protocol):
    """Anything that returns one checkpoint tensor by its Hugging Face name (e.g. Checkpoint)."""

    def read(self, name: str) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class TraceOptions:
    dtype: DType = DType.FP32
    logits: LogitsMode = LogitsMode.LAST


def input_names(spec: ModelSpec) -> list[str]:
    names = ["input_ids", "attention_mask", "position_ids"]
    for i in range(spec.num_hidden_layers):
        names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    return names


def output_names(spec: ModelSpec) -> list[str]:
    names = ["logits"]
    for i in range(spec.num_hidden_layers):
        names += [f"present.{i}.key", f"present.{i}.value"]
    return names


def _np_dtype(dtype: DType) -> type:
    return np.float16 if dtype is DType.FP16 else np.float32


def trace(spec: ModelSpec, options: TraceOptions) -> ir.Model:
    """Trace the decoder for ``spec``; initializers carry no data yet (see :func:`bind_weights`)."""
    import torch

    from .modeling import QwenForExport

    tdtype = torch.float16 if options.dtype is DType.FP16 else torch.float32
    with torch.device("meta"):
        module = QwenForExport(spec, tdtype, options.logits).eval()
        b, s, p = _TRACE_BATCH, _TRACE_SEQ, _TRACE_PAST
        kv_shape = (b, spec.num_key_value_heads, p, spec.head_dim)
        args = (
            torch.ones(b, s, dtype=torch.int64),
            torch.ones(b, p + s, dtype=torch.int64),
            torch.ones(b, s, dtype=torch.int64),
            [torch.zeros(kv_shape, dtype=tdtype) for _ in range(2 * spec.num_hidden_layers)],
        )
    batch, seq, past = (
        torch.export.Dim("batch"),
        torch.export.Dim("sequence_length"),
        torch.export.Dim("past_sequence_length"),
    )
    kv_dims = {0: batch, 2: past}
    dynamic_shapes = (
        {0: batch, 1: seq},
        {0: batch, 1: torch.export.Dim.AUTO},
        {0: batch, 1: seq},
        [kv_dims for _ in range(2 * spec.num_hidden_layers)],
    )
    logging.disable(logging.WARNING)  # the exporter logs optional-dependency notes (torchvision)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                input_names=input_names(spec),
                output_names=output_names(spec),
                dynamic_shapes=dynamic_shapes,
                opset_version=OPSET,
                optimize=False,
                verbose=False,
            )
    finally:
        logging.disable(logging.NOTSET)
    model = program.model
    _name_dims(model, spec)
    return model


def _name_dims(model: ir.Model, spec: ModelSpec) -> None:
    """Give the symbolic dims the canonical names optimum / onnxruntime-genai use."""
    total = ir.SymbolicDim("total_sequence_length")
    for value in list(model.graph.inputs) + list(model.graph.outputs):
        shape = value.shape
        if shape is None:
            continue
        dims = list(shape.dims)
        if value.name == "attention_mask" or value.name.startswith("present."):
            dims[-2 if value.name.startswith("present.") else 1] = total
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


def bind_weights(model: ir.Model, spec: ModelSpec, source: WeightSource, dtype: DType) -> list[str]:
    """Attach a lazy checkpoint reader to every initializer; return the checkpoint names used.

    Nothing is read here. Each ``LazyTensor`` checks the tensor's shape against the traced one when
    it is evaluated, so a wrong-shaped tensor is reported with its name even if validation missed it.
    """
    used: list[str] = []
    target = _np_dtype(dtype)
    for name, value in model.graph.initializers.items():
        binding = _binding_for(name, spec)
        shape = tuple(int(d) for d in value.shape.dims)  # type: ignore[union-attr]
        ir_dtype = value.dtype
        assert ir_dtype is not None
        np_dtype = ir_dtype.numpy()
        if binding.hf_name is not None:
            used.append(binding.hf_name)
        value.const_value = ir.LazyTensor(
            _loader(source, binding, shape, np_dtype if binding.computed else target, name),
            dtype=ir_dtype,
            shape=ir.Shape(shape),
            name=name,
        )
    return used


def _loader(
    source: WeightSource, binding: _Binding, shape: tuple[int, ...], dtype: type, name: str
) -> Callable[[], ir.TensorProtocol]:
    def load() -> ir.TensorProtocol:
        if binding.computed is not None:
            array = binding.computed()
        else:
            assert binding.hf_name is not None
            array = source.read(binding.hf_name)
            if binding.transpose:
                array = array.T
        if array.shape != shape:
            raise CheckpointError(
                f"tensor {binding.hf_name or name} has shape {tuple(array.shape)}, expected "
                f"{shape[::-1] if binding.transpose else shape} for this config"
            )
        return ir.tensor(np.ascontiguousarray(array, dtype=dtype), name=name)

    return load
