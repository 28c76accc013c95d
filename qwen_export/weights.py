"""Initializers bound to checkpoint tensors: read (transposed, cast) only when the model is written.

:func:`qwen_export.export.trace.bind_weights` attaches a :class:`CheckpointTensor` to every
initializer of a traced graph; passes read small ones whole and rewrite around big ones, and the
writer streams each in chunks, so peak memory stays a small multiple of the largest tensor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import BinaryIO, Protocol

import numpy as np
import onnx_ir as ir

from qwen_export.errors import CheckpointError


class WeightSource(Protocol):
    """Anything that returns checkpoint tensors by Hugging Face name (e.g. Checkpoint).

    ``read_rows`` lets large tensors be streamed in bounded memory.
    """

    def read(self, name: str) -> np.ndarray: ...

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray: ...

    def shape(self, name: str) -> tuple[int, ...]: ...


@dataclasses.dataclass(frozen=True)
class _Binding:
    hf_name: str | None  # checkpoint tensor, or None for a computed constant
    transpose: bool = False
    computed: Callable[[], np.ndarray] | None = None


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
