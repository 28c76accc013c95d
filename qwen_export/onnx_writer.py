"""Write an ONNX IR model with its weights as external data, streaming one tensor at a time.

Every target that hands an ONNX file to its engine (ONNX Runtime now; OpenVINO and TensorRT
later) writes it through here. Checkpoint-backed tensors are streamed in chunks
(:meth:`CheckpointTensor.write_to`), so the whole model is never in memory; other tensors
(constants made by passes) are written from their bytes. Tensors are aligned to 64 bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx_ir as ir

#: Tensors smaller than this stay inside model.onnx.
INLINE_LIMIT = 1024
ALIGNMENT = 64


def write_onnx(
    model: ir.Model,
    out_dir: Path,
    model_file: str,
    data_file: str,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Write ``out_dir/model_file`` and ``out_dir/data_file``; report ``progress(done, total)`` bytes."""
    values = [v for v in model.graph.initializers.values() if v.const_value is not None]
    external = [v for v in values if v.const_value.nbytes >= INLINE_LIMIT]  # type: ignore[union-attr]
    total = sum(v.const_value.nbytes for v in external)  # type: ignore[union-attr]
    done = 0
    with open(out_dir / data_file, "wb") as f:
        for value in external:
            tensor = value.const_value
            assert tensor is not None
            pad = -f.tell() % ALIGNMENT
            f.write(b"\0" * pad)
            offset = f.tell()
            if hasattr(tensor, "write_to"):
                length = tensor.write_to(f)
            else:
                length = f.write(tensor.tobytes())
            if length != tensor.nbytes:
                raise RuntimeError(f"wrote {length} bytes for {value.name}, expected {tensor.nbytes}")
            value.const_value = ir.ExternalTensor(
                data_file, offset, length, tensor.dtype, shape=tensor.shape, name=value.name, base_dir=out_dir
            )
            done += length
            if progress is not None:
                progress(done, total)
    ir.save(model, out_dir / model_file)


def io_signature(model: ir.Model) -> dict[str, dict[str, Any]]:
    """The graph's inputs and outputs as ``{"inputs": {name: {dtype, shape}}, "outputs": ...}``."""

    def describe(values: Any) -> dict[str, Any]:
        return {
            v.name: {
                "dtype": str(v.dtype).lower() if v.dtype is not None else None,
                "shape": [d if isinstance(d, int) else str(d) for d in v.shape.dims] if v.shape else None,
            }
            for v in values
        }

    return {"inputs": describe(model.graph.inputs), "outputs": describe(model.graph.outputs)}


def qualified_op(domain: str, op_type: str) -> str:
    """``op_type``, or ``domain::op_type`` outside the default domain (how op histograms name ops)."""
    return op_type if domain in ("", "ai.onnx") else f"{domain}::{op_type}"
