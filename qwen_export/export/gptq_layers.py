"""GPTQ over a whole checkpoint, one decoder layer at a time, its results spilled to disk.

:func:`run_gptq` runs the calibration tokens through the decoder (:class:`~.calibration.LayerRunner`),
every sequence of a layer in one batch. In layer ``i``, the first linear of each input group to run
(q/k/v share one input, gate/up another; o_proj and down_proj have their own):

1. sums ``x x^T`` over the group's input (every calibration row at once: a forward pre-hook);
2. quantizes each linear of the group with :func:`~.gptq.gptq_quantize` (output columns in chunks
   of about :data:`COLUMN_BYTES`, so a large weight never needs more than a chunk's working copies)
   and writes the codes, scales and zero points to ``scratch`` (``.npy``, memory-mapped when read);
3. puts the *dequantized* weights in the layer before the forward goes on: every later input in
   the layer, and the next layer's, is what the quantized model computes (GPTQ's "true
   sequential" order; errors do not compound unseen), and each layer runs once.

With AWQ scales first (``--algorithm awq-gptq``) a layer runs twice instead: with its float weights
(every group's statistics and Hessian, for the scale search), then with the dequantized weights.

An untied lm_head gets the same treatment on the final norm's outputs (unless kept), and so does a
tied embedding's table (stored as the lm_head's ``W^T`` [hidden, vocab]; the quantize pass reads it
transposed for the embedding). The result is
a :class:`GPTQWeights`: the checkpoint, plus ``stored_quantization(name)`` for every quantized
weight, which the ``quantize`` pass takes as it takes a pre-quantized checkpoint's stored values
(:class:`~qwen_export.quant.tensors.StoredQuantization`: nothing is requantized, and the packed
``qkv_proj`` concatenates q, k and v exactly). Peak memory: one layer's float weights, its Hessians
(the largest is ``intermediate_size^2`` float32) and the calibration hidden states.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from qwen_export.export.gptq import (
    DiagonalAccumulator,
    Factor,
    Geometry,
    GPTQSettings,
    HessianAccumulator,
    factorize,
    gptq_quantize,
    gptq_width,
    weighted_quantize,
)
from qwen_export.quant.prequant import Decoded, StoredLinear
from qwen_export.quant.scheme import Keep, QuantScheme
from qwen_export.spec import ModelSpec

#: the embedding's module and weight (a tied table is quantized as the lm_head: :func:`_head_weight`)
TABLE_MODULE = "model.embed_tokens"
TABLE_WEIGHT = f"{TABLE_MODULE}.weight"
#: bytes of float32 weight GPTQ handles at once (output columns are independent).
COLUMN_BYTES = 64 << 20

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
#: float32 bytes of a decoder layer's linears up to which the next layer's weights are read (and
#: widened) on a second thread while the current layer is calibrated and quantized: one more layer
#: in memory (187 MB at 1.5B, 0.9 GB at 7B; a 72B layer's 3.5 GB would raise the export's peak by
#: half, so it is not read ahead)
PREFETCH_BYTES = 1 << 30
#: AWQ before GPTQ (``--algorithm awq-gptq``): the linears scaled by each group's ``s`` (their input
#: channels) and the tensors ``1 / s`` folds into (HF name, axis), as the ``awq`` pass folds them.
#: o_proj is left alone (GQA: see :mod:`qwen_export.quant.algorithms`).
AWQ_FOLDS = {
    "qkv": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), (("input_layernorm.weight", 0),)),
    "gate_up": (("mlp.gate_proj", "mlp.up_proj"), (("post_attention_layernorm.weight", 0),)),
    "down": (("mlp.down_proj",), (("mlp.up_proj.weight", 0), ("mlp.up_proj.bias", 0))),
}
#: calibration rows AWQ's scale search measures the output error on (evenly spaced)
AWQ_SAMPLE_ROWS = 512


class _Prefix:
    """What :class:`~qwen_export.quant.prequant.StoredLinear` messages name a linear by."""

    def __init__(self, prefix: str) -> None:
        self.prefix, self.qzeros = prefix, f"{prefix} (GPTQ at export)"


class SpilledLinear(StoredLinear):
    """GPTQ's quantization of one linear ``<prefix>.weight``, as ``W^T`` [K, N] blocked along K, kept in
    ``.npy`` files (codes int8/uint8 [K, N], scales float32 [K/B, N], zero points uint8 or none)."""

    def __init__(  # noqa: D107
        self,
        prefix: str,
        files: dict[str, Path],
        shape: tuple[int, int],
        geo: Geometry,
        gptq: bool = True,
        gptq_columns: int | None = None,
    ) -> None:
        self.linear = _Prefix(prefix)
        self.files, self.shape, self.gptq, self.gptq_columns = files, shape, gptq, gptq_columns
        self.bits, self.block_size, self.symmetric = geo.bits, geo.block_size, geo.symmetric

    def describe(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        wide = "weights wider than GPTQ's bits" if self.bits > 4 else "input too wide for GPTQ"
        how = "GPTQ" if self.gptq else f"weighted clip ({wide})"
        if self.gptq_columns is not None:
            how = f"GPTQ on the first {self.gptq_columns} output columns, weighted clip on the rest,"
        return f"{how} int{self.bits} block {self.block_size} {kind} (computed at export)"

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
    weights (HF names) and, with AWQ, the tensors AWQ rescaled (``factors``: HF name -> {axis:
    vector}, applied when read); every other attribute is the checkpoint's."""

    def __init__(self, checkpoint: Any, stored: dict[str, SpilledLinear] | None = None) -> None:
        self.checkpoint = checkpoint
        self.stored: dict[str, SpilledLinear] = {} if stored is None else stored
        self.factors: dict[str, dict[int, np.ndarray]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.checkpoint, name)

    def scale(self, name: str, axis: int, factor: np.ndarray) -> None:
        """Multiply slice ``i`` of tensor ``name`` along ``axis`` by ``factor[i]`` when it is read."""
        known = self.factors.setdefault(name, {})
        factor = np.asarray(factor, np.float32)
        known[axis] = known[axis] * factor if axis in known else factor

    def _scaled(self, name: str, array: np.ndarray, rows: slice) -> np.ndarray:
        factors = self.factors.get(name)
        if not factors:
            return array
        out = np.asarray(array, dtype=np.float32)
        for axis, factor in factors.items():
            view = [1] * out.ndim
            view[axis] = -1
            out = out * (factor[rows] if axis == 0 else factor).reshape(view)
        return out

    def read(self, name: str) -> np.ndarray:
        return self._scaled(name, self.checkpoint.read(name), slice(None))

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return self._scaled(name, self.checkpoint.read_rows(name, start, stop), slice(start, stop))

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

    def quantize(  # noqa: D102
        self,
        checkpoint: Any,
        prefix: str,
        factor: Factor | np.ndarray,
        settings: GPTQSettings,
        scheme: QuantScheme,
        weight_t: np.ndarray | None = None,
        bits: int | None = None,
        gptq_columns: int | None = None,
    ) -> SpilledLinear:
        """GPTQ of ``<prefix>.weight`` ([N, K] in the checkpoint) in column chunks, spilled to disk,
        at this weight's bits (``bits``, or ``--int8`` mixed precision) and block size (``--block``
        overrides); ``factor`` an array: diag(H) of an input too wide for GPTQ, the weighted clip
        search instead. ``weight_t``: the weight as [K, N] float32 already in memory (not read again).
        ``gptq_columns``: GPTQ for the first so many output columns only, the weighted clip search
        (on the same diag(H)) for the rest (:attr:`GPTQSettings.head_gptq_columns`)."""
        name = f"{prefix}.weight"
        n, k = checkpoint.shape(name)
        bits = scheme.linear_bits(prefix) if bits is None else bits
        geo = dataclasses.replace(self.geo, bits=bits, block_size=scheme.block_for(prefix))
        base = self.scratch / f"{self.count:04d}"
        self.count += 1
        files = {"codes": base.with_suffix(".codes.npy"), "scales": base.with_suffix(".scales.npy")}
        if not geo.symmetric:
            files["zeros"] = base.with_suffix(".zeros.npy")
        codes = np.lib.format.open_memmap(files["codes"], "w+", np.int8 if geo.symmetric else np.uint8, (k, n))
        scales = np.empty((k // geo.block_size, n), np.float32)
        zeros = None if geo.symmetric else np.empty((k // geo.block_size, n), np.uint8)
        step = max(1, COLUMN_BYTES // (4 * k))
        gptq = isinstance(factor, Factor) and geo.bits <= settings.max_bits
        limit = n if gptq_columns is None or not gptq else min(n, gptq_columns)
        bounds = sorted({*range(0, n, step), limit} - {n})
        for start, stop in zip(bounds, [*bounds[1:], n], strict=True):
            if start == limit and isinstance(factor, Factor):
                factor = factor.importance  # the columns after the first gptq_columns: weighted clip
            if weight_t is None:
                w = np.ascontiguousarray(checkpoint.read_rows(name, start, stop).T, dtype=np.float32)
            else:
                w = np.ascontiguousarray(weight_t[:, start:stop])
            if not isinstance(factor, Factor):
                q = weighted_quantize(w, factor, geo, settings)
            elif geo.bits > settings.max_bits:
                q = weighted_quantize(w, factor.importance, geo, settings)
            else:
                q = gptq_quantize(w, factor, geo, settings)
            codes[:, start:stop] = q.codes
            scales[:, start:stop] = q.scales
            if zeros is not None:
                zeros[:, start:stop] = q.zero_points
        del codes  # no flush: the pages reach the file in time, and this process reads them back
        np.save(files["scales"], scales)
        if zeros is not None:
            np.save(files["zeros"], zeros)
        return SpilledLinear(prefix, files, (k, n), geo, gptq=gptq, gptq_columns=limit if gptq and limit < n else None)


def _dequantized(stored: SpilledLinear) -> np.ndarray:
    """``W^T`` [K, N] float32 as the quantized model computes it: ``(code - zero) * scale`` per
    block, in PyTorch (every thread; the same float32 operations as
    :func:`~qwen_export.quant.numeric.dequantize`, so the same values)."""
    import torch

    k, n = stored.shape
    blocks = k // stored.block_size
    w = torch.from_numpy(np.load(stored.files["codes"])).view(blocks, stored.block_size, n).to(torch.float32)
    if not stored.symmetric:
        w.sub_(torch.from_numpy(np.load(stored.files["zeros"])).to(torch.float32)[:, None, :])
    w.mul_(torch.from_numpy(np.load(stored.files["scales"]))[:, None, :])
    return w.view(k, n).numpy()


def _layer_bytes(checkpoint: Any, i: int) -> int:
    """float32 bytes of layer ``i``'s linear weights (what the progress bar counts)."""
    return sum(4 * int(np.prod(checkpoint.shape(f"model.layers.{i}.{path}.weight"))) for path in LINEARS)


def _layer_hessians(
    runner: Any, layer: Any, i: int, record: bool, gptq: Callable[[int], bool]
) -> tuple[dict[str, HessianAccumulator], dict]:
    """Run layer ``i`` with its float weights: the Hessian of each input group (its diagonal only
    for an input ``gptq(K)`` rejects) and, with ``record``, the inputs themselves (AWQ's
    statistics, :class:`~.calibration.Stats` per group)."""
    from qwen_export.export.calibration import _Recorder

    hessians = {}
    for group, path in _HOOKED.items():
        k = layer.get_submodule(path).weight_t.shape[0]
        hessians[group] = HessianAccumulator(k) if gptq(k) else DiagonalAccumulator(k)
    recorders = {group: _Recorder() for group in AWQ_FOLDS} if record else {}

    def hook(group: str) -> Callable[..., None]:
        def add(_module: Any, args: tuple[Any, ...]) -> None:
            hessians[group].add(args[0])
            if group in recorders:
                recorders[group].add(args[0])

        return add

    handles = [layer.get_submodule(path).register_forward_pre_hook(hook(group)) for group, path in _HOOKED.items()]
    try:
        runner.run(layer, i, advance=False)
    finally:
        for handle in handles:
            handle.remove()
    return hessians, {group: rec.stats(AWQ_SAMPLE_ROWS) for group, rec in recorders.items()}


def _quantize_on_first_input(
    layer: Any, i: int, weights: GPTQWeights, spill: _Spiller, settings: GPTQSettings, scheme: QuantScheme,
    gptq: Callable[[int], bool],
) -> list[Any]:  # fmt: skip
    """Forward pre-hooks on layer ``i``'s linears for its one batched calibration run: the first
    linear of an input group to run quantizes the whole group from that input (every calibration
    row in one call): its Hessian (the diagonal alone for an input ``gptq(K)`` rejects, or where
    every linear of the group is wider than GPTQ's bits: the weighted clip search reads no more), GPTQ of each
    linear from the float weight in the layer, the weight then replaced by its dequantized form. So
    each later input in the layer is what the quantized model computes (GPTQ's "true sequential"
    order), and the layer runs once instead of twice (float, then quantized)."""
    import torch

    done: set[str] = set()

    def hook(group: str) -> Callable[..., None]:
        def quantize(_module: Any, args: tuple[Any, ...]) -> None:
            if group in done:
                return
            done.add(group)
            k = args[0].shape[-1]
            prefixes = [f"model.layers.{i}.{p}" for p, g in LINEARS.items() if g == group]
            full = gptq(k) and any(scheme.linear_bits(prefix) <= settings.max_bits for prefix in prefixes)
            acc = HessianAccumulator(k) if full else DiagonalAccumulator(k)
            acc.add(args[0])
            factor = acc.diagonal() if isinstance(acc, DiagonalAccumulator) else factorize(acc.h, settings)
            del acc
            for path in (p for p, g in LINEARS.items() if g == group):
                linear, prefix = layer.get_submodule(path), f"model.layers.{i}.{path}"
                result = spill.quantize(weights, prefix, factor, settings, scheme, weight_t=linear.weight_t.numpy())
                weights.stored[f"{prefix}.weight"] = result
                linear.weight_t.data = torch.from_numpy(_dequantized(result))

        return quantize

    return [layer.get_submodule(path).register_forward_pre_hook(hook(group)) for path, group in LINEARS.items()]


def _awq_layer(
    weights: GPTQWeights, layer: Any, i: int, stats: dict, hessians: dict, scheme: QuantScheme, grid: int
) -> None:
    """AWQ before GPTQ: per group (:data:`AWQ_FOLDS`), search the scales ``s`` on the float weights,
    record ``W * s`` and the folds ``/ s`` in ``weights`` (read later), apply them to ``layer``'s
    norms (the quantized re-run), and make each Hessian that of the scaled inputs ``x / s``."""
    import torch

    from qwen_export.quant.algorithms import awq_scales

    p = f"model.layers.{i}."
    for group, (linears, folds) in AWQ_FOLDS.items():
        arrays = [np.ascontiguousarray(weights.read(p + name + ".weight").T) for name in linears]
        stat = stats[group]
        s = awq_scales(
            arrays, stat.mean_abs, stat.sample, scheme.bits, scheme.block_size, scheme.symmetric, grid=grid,
            positive_scales=scheme.positive_scales,
        )  # fmt: skip
        del arrays
        inverse = (1.0 / s.astype(np.float64)).astype(np.float32)
        for name in linears:
            weights.scale(p + name + ".weight", 1, s)
        for name, axis in folds:
            if p + name in weights.checkpoint:
                weights.scale(p + name, axis, inverse)
                if name.endswith("norm.weight"):
                    param = layer.get_submodule(name.rsplit(".", 1)[0]).weight
                    param.data = torch.from_numpy(weights.read(p + name).astype(np.float32))
        hessians[group].scale_inputs(torch.from_numpy(inverse))


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

    from qwen_export.export.calibration import SEQUENCE_LENGTH, LayerRunner

    settings = settings or GPTQSettings()
    geo = Geometry(scheme.bits, scheme.block_size, scheme.symmetric, scheme.positive_scales, scale_dtype)
    spill = _Spiller(Path(scratch), geo)
    runner = LayerRunner(checkpoint, spec, token_ids[: settings.tokens_for(gptq_width(spec), SEQUENCE_LENGTH)])
    rows = sum(int(x.shape[1]) for x in runner.hidden)

    def gptq_for(k: int) -> bool:
        return settings.uses_gptq(k, rows)

    weights = GPTQWeights(checkpoint)
    stored = weights.stored
    head = _head_weight(spec, scheme, settings, checkpoint)
    sizes = [_layer_bytes(checkpoint, i) for i in range(spec.num_hidden_layers)]
    head_bytes = 0 if head is None else 4 * int(np.prod(checkpoint.shape(f"{head[0]}.weight")))
    total, done = sum(sizes) + head_bytes, 0
    for i, layer in _layers(runner, sizes):
        progress(done, total)
        done += sizes[i]
        if i not in scheme.keep_layers and settings.awq_grid == 0:
            handles = _quantize_on_first_input(layer, i, weights, spill, settings, scheme, gptq_for)
            try:
                runner.run_batched(layer, i, bf16=settings.forward_in_bf16())
            finally:
                for handle in handles:
                    handle.remove()
            del layer
            continue
        if i not in scheme.keep_layers:
            hessians, stats = _layer_hessians(runner, layer, i, settings.awq_grid > 0, gptq_for)
            if settings.awq_grid > 0:
                _awq_layer(weights, layer, i, stats, hessians, scheme, settings.awq_grid)
            del stats
            for group in _HOOKED:
                acc = hessians.pop(group)
                factor = acc.diagonal() if isinstance(acc, DiagonalAccumulator) else factorize(acc.h, settings)
                for path in (p for p, g in LINEARS.items() if g == group):
                    prefix = f"model.layers.{i}.{path}"
                    result = spill.quantize(weights, prefix, factor, settings, scheme)
                    stored[f"{prefix}.weight"] = result
                    layer.get_submodule(path).weight_t.data = torch.from_numpy(_dequantized(result))
                del factor
        runner.run(layer, i, advance=True)
        del layer
    if head is not None:
        progress(done, total)
        prefix, bits = head
        factor = _head_factor(runner, spec.hidden_size, settings, lambda k: gptq_for(k) and bits <= settings.max_bits)
        stored[f"{prefix}.weight"] = spill.quantize(
            weights, prefix, factor, settings, scheme, bits=bits, gptq_columns=settings.head_gptq_columns
        )
    progress(total, total)
    return weights


def _layers(runner: Any, sizes: list[int]) -> Iterator[tuple[int, Any]]:
    """``(i, layer)``: ``runner``'s decoder layers in order, each with its checkpoint weights; the
    next one read on a second thread while the caller works on the current one, where it is at most
    :data:`PREFETCH_BYTES` (the read and bfloat16 widening overlap GPTQ's single-threaded row loop).

    A larger layer is read only once the caller has let go of the previous one (``del layer``): a
    fresh tuple per item, never ``enumerate(...)`` around this generator, whose cached result tuple
    would keep the previous layer alive while the next one is read (a 72B layer: 3.5 GB more peak)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gptq-read") as pool:
        ahead = pool.submit(runner.layer, 0) if sizes and sizes[0] <= PREFETCH_BYTES else None
        for i in range(len(sizes)):
            layer = ahead.result() if ahead is not None else runner.layer(i)
            ahead = None
            if i + 1 < len(sizes) and sizes[i + 1] <= PREFETCH_BYTES:
                ahead = pool.submit(runner.layer, i + 1)
            yield i, layer
            del layer


def _head_weight(
    spec: ModelSpec, scheme: QuantScheme, settings: GPTQSettings, checkpoint: Any
) -> tuple[str, int] | None:
    """``(prefix, bits)`` of the lm_head weight GPTQ quantizes on the final norm's outputs: an untied
    ``lm_head`` (unless kept), or with :attr:`GPTQSettings.tied_table` the tied embedding's table
    (unless kept; at ``embedding_bits``), which the graph reads both as the embedding and as the
    lm_head: its logits error is what the calibration can measure. None: neither."""
    if not spec.tie_word_embeddings:
        found = Keep.LM_HEAD not in scheme.keep and "lm_head.weight" in checkpoint
        return ("lm_head", scheme.linear_bits("lm_head")) if found else None
    if not settings.tied_table or Keep.EMBEDDING in scheme.keep or TABLE_WEIGHT not in checkpoint:
        return None
    if spec.hidden_size % scheme.block_for(TABLE_MODULE):
        return None  # the quantize pass keeps it (and says why)
    return TABLE_MODULE, scheme.embedding_bits


def _head_factor(runner: Any, k: int, settings: GPTQSettings, gptq_for: Callable[[int], bool]) -> Factor | np.ndarray:
    """The final norm's Hessian over the calibration rows, factorized (its diagonal where
    ``gptq_for(k)`` rejects the input)."""
    acc = HessianAccumulator(k) if gptq_for(k) else DiagonalAccumulator(k)
    for x in runner.final_norm():
        acc.add(x)
    return acc.diagonal() if isinstance(acc, DiagonalAccumulator) else factorize(acc.h, settings)
