"""The initializers a lowered quantized weight's ``com.microsoft`` ops read (:class:`LoweredWeight`):
``MatMulNBits``' ``B``, scales and zero points, ``GatherBlockQuantized``'s, and a tied table's, each
made once, lazily, from the ``DequantizeLinear``'s one quantization (:mod:`.matmulnbits`, whose
docstring describes the compact float16 and the ``log8`` scales made here).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from qwen_export.errors import QwenExportError
from qwen_export.passes.cleanup import FOLD_SIZE_LIMIT
from qwen_export.quant.log_scales import EXPONENT as LOG_EXPONENT
from qwen_export.quant.log_scales import LogScales, free_blocks
from qwen_export.quant.log_scales import encode as log_encode
from qwen_export.quant.numeric import BlockQuantized, pack_bits_last, pack_codes_last, pack_matmulnbits
from qwen_export.quant.tensors import QuantizedPartTensor

if TYPE_CHECKING:
    from qwen_export.targets.onnxruntime.matmulnbits import DequantizeMatch


def unique_name(graph: ir.Graph, name: str) -> str:
    taken, candidate, n = graph.initializers, name, 1
    while candidate in taken:
        candidate, n = f"{name}_{n}", n + 1
    return candidate


def _packed_len(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


@dataclasses.dataclass
class LoweredWeight:
    """The initializers the ops read, made on first use (each once per DequantizeLinear), all parts
    of the DequantizeLinear's one :class:`SharedQuantization`."""

    graph: ir.Graph
    dq: DequantizeMatch
    compact_scales: bool = False
    log_scales: bool = False
    cache: dict[str, ir.Value] = dataclasses.field(default_factory=dict)
    initializers: dict[str, ir.Value] = dataclasses.field(default_factory=dict)
    compact_values: int = 0  # scale values stored as float16 (float32 in memory once ORT folds the Cast)
    log8_values: int = 0  # scale values stored as log8 bytes (float32 in memory once ORT folds the nodes)
    #: scales key -> (id of the quantization, its log8 scales, parts still to derive from them)
    log_memo: dict[str, tuple[int, LogScales, int]] = dataclasses.field(default_factory=dict)

    def _get(
        self, key: str, make: Callable[[BlockQuantized], np.ndarray], dtype: ir.DataType, shape: tuple[int, ...]
    ) -> ir.Value:
        if key not in self.cache:
            self.dq.quant.add_part(key, make)
            name = unique_name(self.graph, f"{self.dq.name}.{key}")  # maybe taken by a DQ input: see finalize
            tensor = QuantizedPartTensor(self.dq.quant, key, dtype, shape, name=name)
            value = ir.Value(name=name, shape=ir.Shape(list(shape)), type=ir.TensorType(dtype), const_value=tensor)
            self.graph.register_initializer(value)
            self.cache[key] = self.initializers[key] = value
        return self.cache[key]

    def _get_scales(
        self, key: str, make: Callable[[BlockQuantized], np.ndarray], shape: tuple[int, ...], rows: int
    ) -> ir.Value:
        """Scales in the model's float type; with ``compact_scales`` a float32 model's are stored as
        float16 and cast back, with ``log_scales`` a 4-bit weight's in ``log8`` (see the module
        docstring). ``rows``: the scales' rows (output channels; the table's rows)."""
        dtype, size = self.dq.float_type, int(np.prod(shape))
        if self.log_scales and self.dq.bits == 4 and size > FOLD_SIZE_LIMIT:
            return self._log_scales(key, make, shape, rows)
        if not self.compact_scales or dtype != ir.DataType.FLOAT or size <= FOLD_SIZE_LIMIT:
            return self._get(key, make, dtype, shape)  # small: nothing to save, and the cleanup would fold it
        if key not in self.cache:
            label = self.dq.name
            stored = self._get(key, lambda q: _as_half(make(q), label), ir.DataType.FLOAT16, shape)
            cast = ir.node("Cast", [stored], {"to": ir.DataType.FLOAT}, name=f"{label}/{key}/Cast")
            self._computed(key, [cast], shape)
            self.compact_values += size
        return self.cache[key]

    def _computed(self, key: str, nodes: list[ir.Node], shape: tuple[int, ...]) -> None:
        """``nodes`` (in order, ahead of the graph's first) compute the scales ``key``: the last one's output."""
        out = nodes[-1].outputs[0]
        out.name = unique_name(self.graph, f"{self.dq.name}.{key}_f32")
        out.dtype, out.shape = self.dq.float_type, ir.Shape(list(shape))
        self.graph.insert_before(next(iter(self.graph)), nodes)
        self.cache[key] = out

    def _encoded(
        self, key: str, q: BlockQuantized, make: Callable[[BlockQuantized], np.ndarray], rows: int
    ) -> LogScales:
        """``make(q)``'s scales as ``log8``, once per quantization: its three parts are derived in
        turn, and the encoding is dropped after the third (nothing here holds the quantization)."""
        held = self.log_memo.pop(key, None)
        if held is None or held[0] != id(q):
            free = free_blocks(q)
            free = free.T if self.dq.axis == 0 else free
            try:
                encoded = log_encode(make(q).reshape(rows, -1), np.ascontiguousarray(free).reshape(rows, -1))
            except ValueError as err:
                raise QwenExportError(f"{self.dq.name}: {err}; export with --scales float16") from None
            held = (id(q), encoded, 3)
        if held[2] > 1:
            self.log_memo[key] = (held[0], held[1], held[2] - 1)
        return held[1]

    def _log_scales(
        self, key: str, make: Callable[[BlockQuantized], np.ndarray], shape: tuple[int, ...], rows: int
    ) -> ir.Value:
        """``log8`` scales: uint8 codes in ``shape`` (rows first; a flat shape becomes [rows, blocks]),
        float16 ``top`` and uint8 ``step`` [rows, 1, ...], and the nodes computing ``top *
        exp(codes * (step * EXPONENT))`` (:mod:`qwen_export.quant.log_scales`): four over the whole
        tensor, each a folded copy at session creation."""
        if key in self.cache:
            return self.cache[key]
        size, label = int(np.prod(shape)), f"{self.dq.name}/{key}"
        shape = (rows, size // rows) if len(shape) == 1 else shape
        per_row = (rows,) + (1,) * (len(shape) - 1)
        parts = {
            "log8": (lambda q: self._encoded(key, q, make, rows).codes.reshape(shape), ir.DataType.UINT8, shape),
            "top": (lambda q: self._encoded(key, q, make, rows).top.reshape(per_row), ir.DataType.FLOAT16, per_row),
            "step": (lambda q: self._encoded(key, q, make, rows).step.reshape(per_row), ir.DataType.UINT8, per_row),
        }
        stored = {part: self._get(f"{key}.{part}", *spec) for part, spec in parts.items()}
        factor = self._constant(f"{key}.exponent", np.array(LOG_EXPONENT, np.float32))
        f32 = {"to": ir.DataType.FLOAT}
        codes = ir.node("Cast", [stored["log8"]], f32, name=f"{label}/codes")
        step = ir.node("Cast", [stored["step"]], f32, name=f"{label}/step")
        top = ir.node("Cast", [stored["top"]], f32, name=f"{label}/top")
        rate = ir.node("Mul", [step.outputs[0], factor], name=f"{label}/rate")
        scaled = ir.node("Mul", [codes.outputs[0], rate.outputs[0]], name=f"{label}/exponent")
        power = ir.node("Exp", [scaled.outputs[0]], name=f"{label}/Exp")
        value = ir.node("Mul", [power.outputs[0], top.outputs[0]], name=f"{label}/scales")
        nodes = [codes, step, top, rate, scaled, power, value]
        if self.dq.float_type != ir.DataType.FLOAT:
            nodes.append(ir.node("Cast", [value.outputs[0]], {"to": self.dq.float_type}, name=f"{label}/Cast"))
        self._computed(key, nodes, shape)
        self.log8_values += size
        return self.cache[key]

    def _constant(self, key: str, array: np.ndarray) -> ir.Value:
        name = unique_name(self.graph, f"{self.dq.name}.{key}")
        value = ir.Value(
            name=name,
            shape=ir.Shape(list(array.shape)),
            type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
            const_value=ir.tensor(array, name=name),
        )
        self.graph.register_initializer(value)
        return value

    def finalize(self) -> None:
        """Once the DequantizeLinear's inputs are gone: give each new initializer ``<weight>.<key>``."""
        for key, value in self.initializers.items():
            preferred = f"{self.dq.name}.{key}"
            if value.name != preferred and preferred not in self.graph.initializers:
                value.name = preferred
                if value.const_value is not None:
                    value.const_value.name = preferred

    def _scales(self, q: BlockQuantized, transposed: bool) -> np.ndarray:
        scales = q.scales.T if transposed else q.scales
        return np.ascontiguousarray(scales, dtype=self.dq.float_type.numpy())

    # MatMulNBits over a [K, N] weight quantized along K (axis 0)
    def matmul_inputs(self) -> tuple[list[ir.Value | None], int, int]:
        dq, kb = self.dq, self.dq.blocks
        k, n = dq.rows, dq.cols
        blob = dq.block_size * dq.bits // 8
        b = self._get("B", lambda q: pack_matmulnbits(q)[0], ir.DataType.UINT8, (n, kb, blob))
        s = self._get_scales("scales", lambda q: self._scales(q, True).reshape(-1), (n * kb,), n)
        z = None
        if not dq.symmetric:
            z = self._get(
                "zero_points",
                lambda q: pack_bits_last(np.ascontiguousarray(q.zero_points.T), q.bits).reshape(-1),
                ir.DataType.UINT8,
                (n * _packed_len(kb, dq.bits),),
            )
        return [b, s, z], k, n

    # the embedding [V, H] quantized along H (axis 1)
    def table_data(self) -> ir.Value:
        """[V, H/B, B*bits/8]: GatherBlockQuantized's data (quantize_axis 2) and the tied head's B."""
        dq, kb = self.dq, self.dq.blocks
        blob = dq.block_size * dq.bits // 8
        return self._get(
            "data",
            lambda q: pack_codes_last(q).reshape(dq.rows, kb, blob),
            ir.DataType.UINT8,
            (dq.rows, kb, blob),
        )

    def _gather_scales(self) -> ir.Value:
        dq, kb = self.dq, self.dq.blocks
        return self._get_scales(
            "gather_scales", lambda q: self._scales(q, False)[:, :, None], (dq.rows, kb, 1), dq.rows
        )

    def gather_inputs(self) -> list[ir.Value | None]:
        dq, kb = self.dq, self.dq.blocks
        s = self._gather_scales()
        z = None
        if not dq.symmetric:  # one zero point per (row, block), each in its own byte (packed along a dim of 1)
            z = self._get(
                "gather_zero_points", lambda q: q.zero_points[:, :, None], ir.DataType.UINT8, (dq.rows, kb, 1)
            )
        return [s, z]

    def _head_scales(self) -> ir.Value:
        """The tied head's scales [V * H/B]: the gather's [V, H/B, 1] reshaped (the same values in
        the same order), so the file holds one copy of them, not two."""
        if "head_scales" in self.cache:
            return self.cache["head_scales"]
        dq, kb = self.dq, self.dq.blocks
        gather = self._gather_scales()
        flat = ir.Value(
            name=unique_name(self.graph, f"{dq.name}.head_scales_shape"),
            shape=ir.Shape([1]),
            type=ir.TensorType(ir.DataType.INT64),
            const_value=ir.tensor(np.array([-1], np.int64)),
        )
        self.graph.register_initializer(flat)
        reshape = ir.node("Reshape", [gather, flat], name=f"{dq.name}/head_scales/Reshape")
        out = reshape.outputs[0]
        out.name = unique_name(self.graph, f"{dq.name}.head_scales")
        out.dtype, out.shape = gather.dtype, ir.Shape([dq.rows * kb])
        producer = gather.producer()
        if producer is not None:  # the float16 copy's Cast
            self.graph.insert_after(producer, reshape)
        else:
            self.graph.insert_before(next(iter(self.graph)), reshape)
        self.cache["head_scales"] = out
        return out

    def tied_inputs(self) -> list[ir.Value | None]:
        dq, kb = self.dq, self.dq.blocks
        s = self._head_scales()
        z = None
        if not dq.symmetric:
            z = self._get(
                "head_zero_points",
                lambda q: pack_bits_last(q.zero_points, q.bits).reshape(-1),
                ir.DataType.UINT8,
                (dq.rows * _packed_len(kb, dq.bits),),
            )
        return [s, z]


def _as_half(scales: np.ndarray, label: str) -> np.ndarray:
    """``scales`` as float16; an error when one is beyond float16's range."""
    big = float(np.abs(scales).max(initial=0.0))
    if not np.isfinite(big) or big > float(np.finfo(np.float16).max):
        raise QwenExportError(
            f"{label}: a quantization scale of {big:g} is beyond float16's range (65504); this weight cannot be "
            "stored with compact scales"
        )
    return scales.astype(np.float16)
