"""GPTQ over a whole checkpoint, one decoder layer at a time, its results spilled to disk.

:func:`run_gptq` runs the calibration tokens through the decoder (:class:`~.calibration.LayerRunner`):
for layer ``i`` it

1. runs the layer with its float weights, hooks summing ``x x^T`` of each linear input
   (q/k/v share one Hessian, gate/up another; o_proj and down_proj have their own);
2. quantizes each linear with :func:`~.gptq.gptq_quantize` (output columns in chunks of about
   :data:`COLUMN_BYTES`, so a large weight never needs more than a chunk's working copies) and
   writes the codes, scales and zero points to ``scratch`` (``.npy``, memory-mapped when read);
3. runs the layer again with the *dequantized* weights: the next layer is calibrated on what the
   quantized model will feed it (errors do not compound unseen).

An untied lm_head gets the same treatment on the final norm's outputs (unless kept). The result is
a :class:`GPTQWeights`: the checkpoint, plus ``stored_quantization(name)`` for every quantized
weight, which the ``quantize`` pass takes as it takes a pre-quantized checkpoint's stored values
(:class:`~qwen_export.quant.tensors.StoredQuantization`: nothing is requantized, and the packed
``qkv_proj`` concatenates q, k and v exactly). Peak memory: one layer's float weights, its Hessians
(the largest is ``intermediate_size^2`` float32) and the calibration hidden states.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from qwen_export.export.gptq import Factor, Geometry, GPTQSettings, HessianAccumulator, factorize, gptq_quantize
from qwen_export.quant.numeric import BlockQuantized
from qwen_export.quant.prequant import Decoded, StoredLinear
from qwen_export.quant.scheme import Keep, QuantScheme
from qwen_export.spec import ModelSpec

#: bytes of float32 weight GPTQ handles at once (output columns are independent).
COLUMN_BYTES = 256 << 20

#: linear -> the Hessian group whose input it reads
LINEARS = {
    "self_attn.q_proj": "qkv",
    "self_attn.k_proj": "qkv",
    "self_attn.v_proj": "qkv",
    "self_attn.o_proj": "o",
    "mlp.gate_proj": "gate_up",
    "mlp.up_proj": "gate_up",
    "mlp.down_proj": "down",
}
_HOOKED = {"qkv": "self_attn.q_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_proj", "down": "mlp.down_proj"}


class _Prefix:
    """What :class:`~qwen_export.quant.prequant.StoredLinear` messages name a linear by."""

    def __init__(self, prefix: str) -> None:
        self.prefix, self.qzeros = prefix, f"{prefix} (GPTQ at export)"


class SpilledLinear(StoredLinear):
    """GPTQ's quantization of one linear ``<prefix>.weight``, as ``W^T`` [K, N] blocked along K, kept in
    ``.npy`` files (codes int8/uint8 [K, N], scales float32 [K/B, N], zero points uint8 or none)."""

    def __init__(self, prefix: str, files: dict[str, Path], shape: tuple[int, int], geo: Geometry) -> None:  # noqa: D107
        self.linear = _Prefix(prefix)
        self.files, self.shape = files, shape
        self.bits, self.block_size, self.symmetric = geo.bits, geo.block_size, geo.symmetric

    def describe(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        return f"GPTQ int{self.bits} block {self.block_size} {kind} (computed at export)"

    def zero_problem(self) -> str | None:
        return None

    def decoded(self) -> Decoded:
        codes = np.load(self.files["codes"], mmap_mode="r")
        scales = np.load(self.files["scales"])
        half = 1 << (self.bits - 1)
        if self.symmetric:
            unsigned = (codes.astype(np.int16) + half).astype(np.uint8)
            zeros = np.full(scales.shape, half, np.uint8)
        else:
            unsigned, zeros = np.asarray(codes, np.uint8), np.load(self.files["zeros"])
        return Decoded(unsigned, zeros, scales, self.bits, self.block_size)


class GPTQWeights:
    """A weight source: ``checkpoint``'s tensors, with GPTQ's stored quantization of ``stored``'s
    weights (HF names); every other attribute is the checkpoint's."""

    def __init__(self, checkpoint: Any, stored: dict[str, SpilledLinear]) -> None:
        self.checkpoint, self.stored = checkpoint, stored

    def __getattr__(self, name: str) -> Any:
        return getattr(self.checkpoint, name)

    def read(self, name: str) -> np.ndarray:
        return self.checkpoint.read(name)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return self.checkpoint.read_rows(name, start, stop)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.checkpoint.shape(name)

    def stored_quantization(self, name: str) -> Any:
        found = self.stored.get(name)
        if found is not None:
            return found
        lookup = getattr(self.checkpoint, "stored_quantization", None)
        return None if lookup is None else lookup(name)


class _Spiller:
    """Writes each linear's quantization to ``scratch`` and returns its :class:`SpilledLinear`."""

    def __init__(self, scratch: Path, geo: Geometry) -> None:
        self.scratch, self.geo = scratch, geo
        self.count = 0

    def quantize(self, checkpoint: Any, prefix: str, factor: Factor, settings: GPTQSettings) -> SpilledLinear:
        """GPTQ of ``<prefix>.weight`` ([N, K] in the checkpoint) in column chunks, spilled to disk."""
        name = f"{prefix}.weight"
        n, k = checkpoint.shape(name)
        geo = self.geo
        base = self.scratch / f"{self.count:04d}"
        self.count += 1
        files = {"codes": base.with_suffix(".codes.npy"), "scales": base.with_suffix(".scales.npy")}
        if not geo.symmetric:
            files["zeros"] = base.with_suffix(".zeros.npy")
        codes = np.lib.format.open_memmap(files["codes"], "w+", np.int8 if geo.symmetric else np.uint8, (k, n))
        scales = np.empty((k // geo.block_size, n), np.float32)
        zeros = None if geo.symmetric else np.empty((k // geo.block_size, n), np.uint8)
        step = max(1, COLUMN_BYTES // (4 * k))
        for start in range(0, n, step):
            stop = min(n, start + step)
            w = np.ascontiguousarray(checkpoint.read_rows(name, start, stop).T, dtype=np.float32)
            q = gptq_quantize(w, factor, geo, settings)
            codes[:, start:stop] = q.codes
            scales[:, start:stop] = q.scales
            if zeros is not None:
                zeros[:, start:stop] = q.zero_points
        codes.flush()
        del codes
        np.save(files["scales"], scales)
        if zeros is not None:
            np.save(files["zeros"], zeros)
        return SpilledLinear(prefix, files, (k, n), geo)


def _dequantized(stored: SpilledLinear) -> np.ndarray:
    """``W^T`` [K, N] float32 as the quantized model computes it."""
    from qwen_export.quant.numeric import dequantize

    q = stored.block_quantized(stored.symmetric, np.float32)
    assert isinstance(q, BlockQuantized)
    return dequantize(q).astype(np.float32)


def _layer_hessians(runner: Any, layer: Any, i: int) -> dict[str, HessianAccumulator]:
    """Run layer ``i`` with its float weights; the Hessian of each input group."""
    hessians = {
        group: HessianAccumulator(layer.get_submodule(path).weight_t.shape[0]) for group, path in _HOOKED.items()
    }
    handles = [
        layer.get_submodule(path).register_forward_pre_hook(lambda _m, args, acc=hessians[group]: acc.add(args[0]))
        for group, path in _HOOKED.items()
    ]
    try:
        runner.run(layer, i, advance=False)
    finally:
        for handle in handles:
            handle.remove()
    return hessians


def run_gptq(
    checkpoint: Any,
    spec: ModelSpec,
    token_ids: list[int],
    scheme: QuantScheme,
    scratch: Path,
    *,
    settings: GPTQSettings | None = None,
    scale_dtype: type = np.float32,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> GPTQWeights:
    """GPTQ of every linear weight outside ``scheme.keep_layers`` (see the module docstring)."""
    import torch

    from qwen_export.export.calibration import LayerRunner

    settings = settings or GPTQSettings()
    geo = Geometry(scheme.bits, scheme.block_size, scheme.symmetric, scheme.positive_scales, scale_dtype)
    spill = _Spiller(Path(scratch), geo)
    runner = LayerRunner(checkpoint, spec, token_ids)
    stored: dict[str, SpilledLinear] = {}
    total = spec.num_hidden_layers + 1
    for i in range(spec.num_hidden_layers):
        progress(i, total)
        layer = runner.layer(i)
        if i not in scheme.keep_layers:
            hessians = _layer_hessians(runner, layer, i)
            for group in _HOOKED:
                factor = factorize(hessians.pop(group).h, settings)  # consumes the Hessian
                for path in (p for p, g in LINEARS.items() if g == group):
                    prefix = f"model.layers.{i}.{path}"
                    result = spill.quantize(checkpoint, prefix, factor, settings)
                    stored[f"{prefix}.weight"] = result
                    layer.get_submodule(path).weight_t.data = torch.from_numpy(_dequantized(result))
                del factor
        runner.run(layer, i, advance=True)
        del layer
    if not spec.tie_word_embeddings and Keep.LM_HEAD not in scheme.keep and "lm_head.weight" in checkpoint:
        acc = HessianAccumulator(spec.hidden_size)
        for x in runner.final_norm():
            acc.add(x)
        stored["lm_head.weight"] = spill.quantize(checkpoint, "lm_head", factorize(acc.h, settings), settings)
    progress(total, total)
    return GPTQWeights(checkpoint, stored)
