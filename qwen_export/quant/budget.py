"""The int4 layout's size budget (``--budget``): the bytes an artifact's weights may take, and the
8-bit promotions that spend what the layout leaves of it.

The default budget is what optimum-intel's default int4 export of the same checkpoint takes
(:func:`reference_bytes`): every decoder linear at 4 bits, asymmetric, in blocks of 128, and the
embedding and the lm_head (NNCF's backup precision) at 8 bits, asymmetric, one scale per row. Our
int4 default is smaller than that at 0.5B-1.5B (blocks of 32 where they pay, a 4-bit table and
lm_head), and :func:`fill_budget` spends the difference on the tensors that gain most from 8 bits
(:func:`promotions`: every ``k_proj`` where ``v_proj`` is 8-bit, then the MLP's ``down_proj``, one
layer at a time, in :func:`down_proj_order`). From 3B up it is larger, and :func:`shrink_to_budget`
gives bytes back, one layer at a time, in :func:`shrink_order`.

Sizes are estimates from the shapes alone (:func:`scheme_bytes`): codes, float16 scales (or 4-bit
weights' ``log8`` scales: one byte a block and 3 a row), packed zero points, as the ONNX Runtime
target stores them (OpenVINO's files come out slightly smaller); biases
and norms are left out (under 0.1% of a Qwen2.5). They match the artifacts' initializers to within
0.3% on the real Qwen2.5-Coder-1.5B (benchmarks/README.md, "the size budget").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

from qwen_export.errors import OptionError
from qwen_export.quant import log_scales
from qwen_export.quant.scheme import Keep, QuantScheme
from qwen_export.spec import ModelSpec

#: the reference layout's block (optimum-intel's default ``group_size``)
REFERENCE_BLOCK = 128
#: the block of an 8-bit promotion (its error is far below the 4-bit tensors' at any block)
PROMOTED_BLOCK = 128
#: bytes of a stored scale (float16 in the files)
SCALE_BYTES = 2
TABLE = "model.embed_tokens"
#: the MLP's blocks, one step at a time, where the layout is over the budget (:func:`shrink_to_budget`)
WIDER_BLOCKS = (64, 128)
LAYER_GLOB = "model.layers.*."
MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class SizeBudget:
    """``--budget``: ``mib`` MiB of weights, or (``mib`` None) optimum-intel's int4 size for the
    checkpoint (:func:`reference_bytes`)."""

    mib: float | None = None

    @classmethod
    def parse(cls, value: str | float | SizeBudget | None) -> SizeBudget | None:
        """``optimum-intel`` (the default), ``none`` (None: no promotions), or a number of MiB."""
        if value is None or isinstance(value, SizeBudget):
            return value if value is not None else cls()
        text = str(value).strip().lower()
        if text == "none":
            return None
        if text in ("optimum-intel", "auto"):
            return cls()
        try:
            mib = float(text)
        except ValueError:
            raise OptionError(f"--budget takes optimum-intel, none or a size in MiB; got {value!r}") from None
        if not math.isfinite(mib) or mib <= 0:
            raise OptionError(f"--budget must be a positive size in MiB, got {value!r}")
        return cls(mib)

    def bytes_for(self, spec: ModelSpec) -> int:
        return reference_bytes(spec) if self.mib is None else int(self.mib * MIB)

    def describe(self) -> str:
        return "optimum-intel's int4 size" if self.mib is None else f"{self.mib:g} MiB"


def quantized_bytes(
    rows: int, length: int, bits: int, block: int, symmetric: bool, scale_bytes: int = SCALE_BYTES, log8: bool = False
) -> int:
    """Bytes of a [rows, length] weight in blocks of ``block`` along ``length`` (0: one block a
    row): packed codes, one scale per block, and (asymmetric) one packed zero point per block;
    ``log8``: a 4-bit weight's scales in :attr:`~qwen_export.quant.scheme.ScaleFormat.LOG8`."""
    blocks = 1 if block == 0 else -(-length // block)
    zeros = 0 if symmetric else rows * -(-blocks * bits // 8)
    scales = log_scales.stored_bytes(rows, blocks) if log8 and bits == 4 else rows * blocks * scale_bytes
    return -(-rows * length * bits // 8) + scales + zeros


def linears(spec: ModelSpec) -> Iterator[tuple[str, int, int]]:
    """``(module, out features, in features)`` of every decoder linear (dense models), and the
    untied lm_head."""
    h, inter = spec.hidden_size, spec.intermediate_size
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}."
        yield p + "self_attn.q_proj", spec.q_size, h
        yield p + "self_attn.k_proj", spec.kv_size, h
        yield p + "self_attn.v_proj", spec.kv_size, h
        yield p + "self_attn.o_proj", h, spec.q_size
        for name in ("gate_proj", "up_proj"):
            yield p + "mlp." + name, inter, h
        yield p + "mlp.down_proj", h, inter
    if not spec.tie_word_embeddings:
        yield "lm_head", spec.vocab_size, h


def reference_bytes(spec: ModelSpec) -> int:
    """optimum-intel's default int4 layout of ``spec``: decoder linears 4-bit asymmetric in blocks of
    128; the embedding and an untied lm_head 8-bit asymmetric, one scale per row."""
    total = 0
    for module, n, k in linears(spec):
        if module == "lm_head":
            total += quantized_bytes(n, k, 8, 0, False)
        else:
            total += quantized_bytes(n, k, 4, REFERENCE_BLOCK, False)
    return total + quantized_bytes(spec.vocab_size, spec.hidden_size, 8, 0, False)


def scheme_bytes(spec: ModelSpec, scheme: QuantScheme, dtype_bytes: int = 4) -> int:
    """The estimated weight bytes of ``spec`` quantized by ``scheme`` (kept tensors at
    ``dtype_bytes`` a value)."""
    total = 0
    for module, n, k in linears(spec):
        layer = None if module == "lm_head" else int(module.split(".")[2])
        if (layer in scheme.keep_layers) or (module == "lm_head" and Keep.LM_HEAD in scheme.keep):
            total += n * k * dtype_bytes
        else:
            bits, block = scheme.linear_bits(module), scheme.block_for(module)
            total += quantized_bytes(n, k, bits, block, scheme.symmetric, log8=scheme.log_scales)
    return total + table_bytes(spec, scheme, dtype_bytes)


def table_bytes(spec: ModelSpec, scheme: QuantScheme, dtype_bytes: int = 4) -> int:
    """The embedding's table: codes and float16 scales, the gather's zero points one byte a block
    (asymmetric), and a tied table's packed zero points for its lm_head ``MatMulNBits``."""
    vocab, h = spec.vocab_size, spec.hidden_size
    if Keep.EMBEDDING in scheme.keep:
        return vocab * h * dtype_bytes
    bits, block = scheme.embedding_bits, scheme.block_for(TABLE)
    total = quantized_bytes(vocab, h, bits, block, True, log8=scheme.log_scales)
    if not scheme.symmetric:
        blocks = -(-h // block) if block else 1
        total += vocab * blocks
        if spec.tie_word_embeddings:
            total += -(-vocab * blocks * bits // 8)
    return total


def down_proj_order(layers: int) -> list[int]:
    """The layers whose ``down_proj`` 8 bits serve first: llama.cpp's Q4_K_M choice (its
    ``use_more_bits``: the first and last eighths of the layers, integer division, then every third
    layer between), the eighths interleaved from the ends inwards."""
    eighth, last = layers // 8, 7 * layers // 8
    edges = [i for i in range(layers) if i < eighth or i >= last]
    ends = sorted(edges, key=lambda i: (min(i, layers - 1 - i), i))
    return ends + [i for i in range(eighth, last) if (i - eighth) % 3 == 2]


def promote(scheme: QuantScheme, module: str, block: int) -> QuantScheme:
    """``scheme`` with ``module`` at 8 bits in blocks of ``block`` (an override ahead of any other
    block pattern, where its block differs)."""
    same = scheme.block_for(module) == block
    overrides = scheme.block_overrides if same else ((module, block), *scheme.block_overrides)
    return dataclasses.replace(scheme, int8_weights=(*scheme.int8_weights, module), block_overrides=overrides)


def fill_budget(spec: ModelSpec, scheme: QuantScheme, budget: int) -> tuple[QuantScheme, list[str]]:
    """``scheme`` with :func:`promotions` at 8 bits in their order, each that still fits ``budget``
    bytes, and the modules promoted; nothing changes where the layout is already over the budget."""
    promoted: list[str] = []
    for module, block in promotions(spec, scheme):
        candidate = promote(scheme, module, block)
        if scheme_bytes(spec, candidate) <= budget:
            scheme, promoted = candidate, [*promoted, module]
    return scheme, promoted


def promotions(spec: ModelSpec, scheme: QuantScheme) -> list[tuple[str, int]]:
    """What the budget puts at 8 bits, best first, with its block: every layer's ``k_proj`` at once
    where ``v_proj`` is already 8-bit and ``k_proj`` is not (the tied layout: q, k and v are three
    weights there anyway, and k costs 5 MiB at 1.5B for -4% KL), then ``down_proj`` one layer at a
    time in :func:`down_proj_order`. Layers kept, or already at 8 bits, are passed over."""
    found: list[tuple[str, int]] = []
    attention = "model.layers.0.self_attn."
    if scheme.linear_bits(attention + "v_proj") == 8 and scheme.linear_bits(attention + "k_proj") == 4:
        fits = spec.hidden_size % PROMOTED_BLOCK == 0
        found.append(
            ("model.layers.*.self_attn.k_proj", PROMOTED_BLOCK if fits else scheme.block_for(attention + "k_proj"))
        )
    fits = spec.intermediate_size % PROMOTED_BLOCK == 0
    block = PROMOTED_BLOCK if fits else scheme.block_for("model.layers.0.mlp.down_proj")
    for i in down_proj_order(spec.num_hidden_layers):
        module = f"model.layers.{i}.mlp.down_proj"
        if i not in scheme.keep_layers and scheme.linear_bits(module) == 4:
            found.append((module, block))
    return found


def shrink_order(layers: int) -> list[int]:
    """The layers in the order they give bytes back where the layout is over the budget: those
    outside Q4_K_M's 8-bit set, the middle first, then that set from the inside out (the reverse
    of :func:`down_proj_order`)."""
    preferred = down_proj_order(layers)
    rest = sorted((i for i in range(layers) if i not in preferred), key=lambda i: (-min(i, layers - 1 - i), i))
    return rest + preferred[::-1]


def shrink_to_budget(spec: ModelSpec, scheme: QuantScheme, budget: int) -> tuple[QuantScheme, dict[str, int]]:
    """``scheme`` made to fit ``budget`` where it is over (larger models: the MLP's blocks of 32 and
    the 8-bit attention outgrow what the 4-bit table saves), one layer at a time in
    :func:`shrink_order`: the MLP in blocks of 64, then of 128 (optimum-intel's), then the 8-bit
    ``model.layers.*`` patterns back at 4 bits. Per bytes saved these cost the least accuracy on
    the real Qwen2.5-Coder-1.5B (the 8-bit attention bought the most per byte). Returns the changes
    counted by layers (``{"MLP b64": 12, ...}``); stops as soon as the estimate fits."""
    changes: dict[str, int] = {}
    order = shrink_order(spec.num_hidden_layers)
    for block in WIDER_BLOCKS:
        if spec.hidden_size % block or spec.intermediate_size % block:
            continue
        for i in order:
            if scheme_bytes(spec, scheme) <= budget:
                return scheme, changes
            if i in scheme.keep_layers or scheme.block_for(f"model.layers.{i}.mlp.gate_proj") >= block:
                continue
            overrides = ((f"model.layers.{i}.mlp.*", block), *scheme.block_overrides)
            scheme = dataclasses.replace(scheme, block_overrides=overrides)
            changes[f"MLP b{block}"] = changes.get(f"MLP b{block}", 0) + 1
    scheme = _per_layer(spec, scheme)
    for i in order:
        if scheme_bytes(spec, scheme) <= budget:
            break
        mine = tuple(p for p in scheme.int8_weights if p.startswith(f"model.layers.{i}."))
        if mine:
            scheme = dataclasses.replace(scheme, int8_weights=tuple(p for p in scheme.int8_weights if p not in mine))
            changes["8-bit tensors back at 4 bits"] = changes.get("8-bit tensors back at 4 bits", 0) + 1
    return scheme, changes


def _per_layer(spec: ModelSpec, scheme: QuantScheme) -> QuantScheme:
    """``scheme`` with each ``model.layers.*.X`` pattern of ``--int8`` written out layer by layer
    (so that one layer's can be dropped)."""
    patterns: list[str] = []
    for p in scheme.int8_weights:
        if p.startswith(LAYER_GLOB):
            patterns += [f"model.layers.{i}.{p[len(LAYER_GLOB) :]}" for i in range(spec.num_hidden_layers)]
        else:
            patterns.append(p)
    return dataclasses.replace(scheme, int8_weights=tuple(patterns))
