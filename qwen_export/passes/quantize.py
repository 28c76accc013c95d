"""Weight quantization, portable form: linear weights and the embedding behind ``DequantizeLinear``.

Runs after the fusions (packed QKV included) and before the ONNX Runtime lowering
(:mod:`.matmulnbits`). Conventions: :mod:`qwen_export.quant.scheme`. Three rewrites:

- ``linear``/``lm_head``: ``MatMul(x, W)`` where ``W`` [K, N] is a 2-D constant initializer named
  ``model.layers.{i}.<...>.weight_t`` (the packed ``qkv_proj`` included) or ``lm_head.weight_t``
  becomes ``MatMul(x, DequantizeLinear(codes, scales[, zero_points], axis=0, block_size=B))``:
  codes [K, N] int4/int8 (symmetric) or uint4/uint8 (asymmetric, with zero points), scales
  [K/B, N] in the weight's dtype;
- ``embedding``: ``Gather(E, ids)`` with ``E = model.embed_tokens.weight`` [V, H] becomes
  ``Gather(DequantizeLinear(E_codes, E_scales[, E_zp], axis=1, block_size=B), ids)``, E quantized
  with ``scheme.embedding_bits``;
- ``tied_lm_head``: the tied head ``Gemm(x, E, transB=1)`` reads the same ``DequantizeLinear``
  output: a tied embedding is stored once.

Per-channel schemes (``scheme.block_size == 0``) emit the ONNX per-axis form instead:
``DequantizeLinear(codes [K, N], scales [N], axis=1)`` for linear weights and
``DequantizeLinear(E_codes [V, H], E_scales [V], axis=0)`` for the embedding (one scale per
vocabulary row, still self-contained per row), no ``block_size`` attribute. The ONNX Runtime
lowering (:mod:`.matmulnbits`) leaves these alone (MatMulNBits needs blocks): they run as
``DequantizeLinear`` + ``MatMul`` / ``Gather``. With ``scheme.positive_scales`` every symmetric
scale is > 0 (:mod:`qwen_export.quant.numeric`).

Nothing is quantized here: the new initializers are lazy tensors computed from the source tensor
when the model is written (one tensor at a time), so the export's memory stays bounded.

Kept in the model dtype (recorded in :attr:`QuantizeWeights.kept`, name -> reason): weights of
``scheme.keep_layers``, an MoE layer's router (``mlp.gate``) and shared-expert gate (every routed
and shared expert's weights are quantized like any linear weight), the embedding (and tied head)
with ``Keep.EMBEDDING``, an untied lm_head with ``Keep.LM_HEAD``, any weight whose quantized axis
(K, or H for the embedding) is not a multiple of the block size, and any weight of those names
that is not where the rewrites expect it (not a constant 2-D float initializer, or read by other
ops). Quantization uses ``scheme.algorithm``
(RTN or the data-free clip search); with AWQ the weights were scaled by the ``awq`` pass
(:mod:`.awq`) and are quantized here with the importance-weighted clip search (AWQ's auto-clip;
RTN for the weights the ``awq`` pass left alone).

Pre-quantized checkpoints (AWQ / GPTQ, :mod:`qwen_export.quant.prequant`): a linear weight whose data is
the float view of a stored quantization (a :class:`~qwen_export.weights.CheckpointTensor` of a
pre-quantized ``<prefix>.weight``, or the packed ``qkv_proj`` :class:`~.packed_qkv.ConcatTensor` of
three, concatenated along N) keeps the stored codes, scales and zero points (a
:class:`~qwen_export.quant.tensors.StoredQuantization`: nothing is requantized) when the scheme has
the stored bits and block size (= group size) and is asymmetric, or symmetric for a symmetric
(GPTQ ``sym``) checkpoint. Otherwise (another bit width or block size, ``--symmetric`` for zero
points, the weight rescaled by the ``awq`` pass, per-channel, ...) the weight is requantized from its
dequantized floats, and why is recorded in :attr:`QuantizeWeights.requantized`. With
``positive_scales`` the stored scales are used as they are (GPTQ/AWQ scales are positive); a stored
scale <= 0, only seen when written, makes that weight requantized then, with a warning
(:class:`~qwen_export.quant.tensors.StoredQuantization`). For such models ``fired``
also counts ``prequantized`` (stored values used) and ``requantized`` weights.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from typing import Any

import onnx_ir as ir

from qwen_export.errors import OptionError
from qwen_export.passes.base import GraphPass
from qwen_export.quant.scheme import Keep, QuantAlgorithm, QuantScheme

LINEAR_RULE = "linear"
PREQUANTIZED = "prequantized"
REQUANTIZED = "requantized"
LM_HEAD_RULE = "lm_head"
EMBEDDING_RULE = "embedding"
TIED_HEAD_RULE = "tied_lm_head"
KEPT = "kept"

EMBEDDING_NAME = "model.embed_tokens.weight"
#: the embedding's module name, as ``--block`` patterns match it (``model.embed_tokens=128``)
EMBEDDING_MODULE = "model.embed_tokens"
LM_HEAD_NAME = "lm_head.weight_t"
_LAYER_WEIGHT = re.compile(r"^model\.layers\.(\d+)\..+\.weight_t$")
#: an MoE layer's router and shared-expert gate: their top-k choice is kept in the activation dtype
_ROUTER_WEIGHT = re.compile(r"^model\.layers\.\d+\.mlp\.(gate|shared_expert_gate)\.weight_t$")
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


@dataclasses.dataclass(frozen=True)
class WeightQuant:
    """How one weight is quantized: ``bits`` along ``axis`` in blocks of ``block_size`` (0:
    per-channel, one block spanning ``axis``); ``positive_scales``: symmetric scales all > 0."""

    bits: int
    block_size: int
    axis: int
    symmetric: bool
    algorithm: QuantAlgorithm
    positive_scales: bool = False


def check_scheme(scheme: QuantScheme, num_layers: int | None = None) -> None:
    """Option errors the pass would otherwise meet halfway: layers out of range. (AWQ's scaling is
    the ``awq`` pass, run before this one.)"""
    if num_layers is not None:
        bad = sorted(i for i in scheme.keep_layers if not 0 <= i < num_layers)
        if bad:
            raise OptionError(f"--keep-layers {bad}: the model has layers 0..{num_layers - 1}")


def check_int8_patterns(scheme: QuantScheme, weight_names: list[str]) -> None:
    """OptionError for an ``--int8`` pattern that selects none of the model's linear weights (names
    ``<module>.weight_t``; a packed qkv or kv stands for its projections too)."""
    modules = [name.removesuffix(".weight_t") for name in weight_names]
    modules += [m[: -len("qkv_proj")] + f"{p}_proj" for m in modules if m.endswith(".qkv_proj") for p in "qkv"]
    modules += [m[: -len("kv_proj")] + f"{p}_proj" for m in modules if m.endswith(".kv_proj") for p in "kv"]
    example = next((m for m in modules if ".mlp." in m), modules[0] if modules else "lm_head")
    for pattern in scheme.int8_weights:
        if not any(fnmatch.fnmatchcase(m, pattern) for m in modules):
            raise OptionError(
                f"--int8 {pattern!r} matches no quantized linear weight of this model "
                f"(module names look like {example!r})"
            )
    for pattern, block in scheme.block_overrides:
        if not any(fnmatch.fnmatchcase(m, pattern) for m in [*modules, EMBEDDING_MODULE]):
            raise OptionError(
                f"--block {pattern}={block} matches no quantized weight of this model "
                f"(module names look like {example!r} or {EMBEDDING_MODULE!r})"
            )


# --- lazy tensors (qwen_export.quant.tensors) -------------------------------------------------------


def dequantize_linear_tensors(
    source: ir.TensorProtocol,
    how: WeightQuant,
    dtype: ir.DataType,
    name: str,
    importance: Any = None,
    stored: Any = None,
) -> Any:
    """Lazy ``DequantizeLinear`` initializers of ``source`` (:class:`~qwen_export.quant.tensors.
    QuantizedInitializers`: codes named ``name``, ``name.scales``, ``name.zero_points``). ``stored``:
    a pre-quantized source's stored quantization (:func:`stored_quantization`), used as it is."""
    from qwen_export.quant import tensors

    quantization = None
    if stored is not None:  # stored as W^T [K, N] along K: an embedding (axis 1) reads it transposed
        quantization = tensors.StoredQuantization(
            source,
            stored,
            symmetric=how.symmetric,
            scale_dtype=dtype,
            name=name,
            positive_scales=how.positive_scales,
            transposed=how.axis == 1,
        )
    return tensors.dequantize_linear_initializers(
        source,
        bits=how.bits,
        block_size=how.block_size,
        axis=how.axis,
        symmetric=how.symmetric,
        algorithm=how.algorithm,
        importance=importance,
        output_dtype=dtype,
        name=name,
        quantization=quantization,
        positive_scales=how.positive_scales,
    )


def stored_quantization(tensor: Any) -> Any:
    """What a weight's data holds of a pre-quantized checkpoint's stored quantization:

    - None: nothing (a float weight);
    - a :class:`~qwen_export.quant.prequant.StoredLinear` (or ``StoredConcat``) of W [K, N]: the stored
      values, for a ``*.weight_t`` read from the checkpoint or a packed ``qkv_proj`` of such;
    - a string: why the stored values cannot be used although the weight derives from them.
    """
    from qwen_export.passes.awq import ScaledTensor
    from qwen_export.passes.packed_qkv import ConcatTensor
    from qwen_export.quant.prequant import StoredConcat
    from qwen_export.weights import CheckpointTensor

    if isinstance(tensor, CheckpointTensor):
        lookup = getattr(tensor.source, "stored_quantization", None)
        name = tensor.binding.hf_name
        if lookup is None or name is None:
            return None
        stored = lookup(name)
        if stored is not None and not tensor.binding.transpose:
            return f"{name} is read untransposed"
        return stored
    if isinstance(tensor, ConcatTensor):
        found = [stored_quantization(part) for part in tensor.parts]
        if all(f is None for f in found):
            return None
        why = next((f for f in found if isinstance(f, str)), None)
        if why is not None:
            return why
        if tensor.axis != 1 or any(f is None for f in found):
            return "the packed projections mix stored and float weights"
        try:
            return StoredConcat(found)
        except ValueError as exc:
            return str(exc)
    if isinstance(tensor, ScaledTensor):
        return None if stored_quantization(tensor.source) is None else "rescaled by the awq pass (--algorithm awq)"
    return None


def stored_table(tensor: Any) -> Any:
    """The stored quantization of the embedding ``tensor`` (as read from the checkpoint, [V, H]) as
    W^T [H, V] along H, or None: a GPTQ export's tied table (:mod:`qwen_export.export.gptq_layers`)."""
    from qwen_export.weights import CheckpointTensor

    if not isinstance(tensor, CheckpointTensor) or tensor.binding.transpose:
        return None
    lookup = getattr(tensor.source, "stored_quantization", None)
    name = tensor.binding.hf_name
    return None if lookup is None or name != EMBEDDING_NAME else lookup(name)


def _stored_mismatch(stored: Any, how: WeightQuant) -> str | None:
    """Why a pre-quantized weight's stored values cannot be used for ``how`` (None: they can)."""
    if how.block_size == 0:
        return f"stored {stored.describe()} is quantized in groups; per-channel (block size 0) was requested"
    return stored.mismatch(how.bits, how.block_size, how.symmetric)


# --- graph helpers -----------------------------------------------------------------------------------


def _constant_2d(value: ir.Value | None) -> bool:
    return (
        value is not None
        and value.is_initializer()
        and not value.is_graph_input()
        and not value.is_graph_output()
        and value.const_value is not None
        and value.dtype in _FLOAT_TYPES
        and value.shape is not None
        and len(value.shape) == 2
        and all(isinstance(d, int) for d in value.shape)
    )


def _default_domain(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def _unique(graph: ir.Graph, name: str) -> str:
    taken, candidate, n = graph.initializers, name, 1
    while candidate in taken:
        candidate, n = f"{name}_{n}", n + 1
    return candidate


def _first_user(graph: ir.Graph, value: ir.Value) -> ir.Node:
    users = {id(use.node) for use in value.uses()}
    return next(n for n in graph if id(n) in users)


def _dequantize(
    graph: ir.Graph, weight: ir.Value, how: WeightQuant, importance: Any = None, stored: Any = None
) -> ir.Value:
    """Put ``DequantizeLinear(codes, scales[, zp])`` of ``weight`` in its place; return its output.

    The codes take the weight's name (``<w>.scales``, ``<w>.zero_points`` beside them) and the three
    are registered one after the other: the writer computes them from one quantization of the
    source (or reads the ``stored`` one), when the codes are written (:mod:`qwen_export.quant.tensors`)."""
    assert weight.const_value is not None and weight.name is not None and weight.dtype is not None
    base = weight.name
    init = dequantize_linear_tensors(weight.const_value, how, weight.dtype, base, importance, stored)
    inputs = [
        ir.Value(
            name=tensor.name, shape=ir.Shape(list(tensor.shape)), type=ir.TensorType(tensor.dtype), const_value=tensor
        )
        for tensor in init.tensors
    ]
    node = ir.node("DequantizeLinear", inputs, init.attributes, name=f"{base}/DequantizeLinear")
    out = node.outputs[0]
    out.name, out.dtype, out.shape = f"{base}.dequantized", weight.dtype, weight.shape
    graph.insert_before(_first_user(graph, weight), node)
    weight.replace_all_uses_with(out)
    del graph.initializers[base]
    for value in inputs:
        value.name = _unique(graph, value.name or base)
        graph.register_initializer(value)
    return out


# --- the pass ----------------------------------------------------------------------------------------


class QuantizeWeights(GraphPass):
    """Replace linear weights and the embedding by lazily quantized ``DequantizeLinear`` inputs.

    ``scheme``: what to quantize and how; ``num_layers``: the model's layer count (checks
    ``keep_layers``). After a call, :attr:`kept` maps each weight left in the model dtype to why.
    Raises :class:`~qwen_export.errors.OptionError` for layers out of range.
    ``explain``: a text stream that gets the weights left alone and why.
    """

    name = "quantize"
    explain_heading = "left alone"

    def __init__(
        self,
        scheme: QuantScheme,
        num_layers: int | None = None,
        explain: Any = None,
        kept: dict[str, str] | None = None,
        importance: dict[str, Any] | None = None,
        requantized: dict[str, str] | None = None,
    ) -> None:
        check_scheme(scheme, num_layers)
        self.scheme = scheme
        #: AWQ: weight name -> per-input-channel importance (filled by the ``awq`` pass before this
        #: one runs): those weights get the importance-weighted clip search instead of RTN
        self.importance = importance if importance is not None else {}
        self.explain = explain
        #: weight name -> why it stays in the model dtype; ``kept`` (a caller's dict) is filled in place
        self.kept: dict[str, str] = {} if kept is None else kept
        #: pre-quantized checkpoints: weight name -> why its stored quantization was not used (the weight
        #: was requantized from its dequantized floats); ``requantized`` (a caller's dict) is filled in place
        self.requantized: dict[str, str] = {} if requantized is None else requantized

    def _linear(self, axis: int, bits: int, block: int) -> WeightQuant:
        s = self.scheme
        return WeightQuant(bits, block, axis, s.symmetric, s.algorithm, positive_scales=s.positive_scales)

    def _keep_reason(self, name: str, length: int, what: str, block: int) -> str | None:
        s = self.scheme
        match = _LAYER_WEIGHT.match(name)
        if match is not None and int(match.group(1)) in s.keep_layers:
            return f"layer {match.group(1)} in keep_layers"
        if _ROUTER_WEIGHT.match(name):
            return "MoE router (routing stays in the activation dtype)"
        if name == LM_HEAD_NAME and Keep.LM_HEAD in s.keep:
            return "keep lm_head"
        if name == EMBEDDING_NAME and Keep.EMBEDDING in s.keep:
            return "keep embedding"
        if block and length % block:
            return f"{what}={length} is not a multiple of the block size {block}"
        return None

    def rewrite(self, model: Any) -> dict[str, int]:
        graph = model.graph
        self.kept.clear()
        self.requantized.clear()
        fired = {LINEAR_RULE: 0, LM_HEAD_RULE: 0, EMBEDDING_RULE: 0, TIED_HEAD_RULE: 0}
        stored_counts = {PREQUANTIZED: 0, REQUANTIZED: 0}
        seen_stored = False
        misses: list[str] = []
        linear_weights = self._linear_weights(graph, misses)
        check_int8_patterns(self.scheme, [w.name for w in linear_weights if w.name is not None])
        for weight in linear_weights:
            assert weight.name is not None and weight.shape is not None
            stored = stored_quantization(weight.const_value)
            seen_stored = seen_stored or stored is not None
            module = weight.name.removesuffix(".weight_t")
            block = self.scheme.block_for(module)
            reason = self._keep_reason(weight.name, int(weight.shape[0]), "K", block)
            if reason is not None:
                self.kept[weight.name] = reason
                continue
            how = self._linear(0, self.scheme.linear_bits(module), block)
            if stored is not None:
                why = stored if isinstance(stored, str) else _stored_mismatch(stored, how)
                if why is not None:
                    self.requantized[weight.name] = why
                    stored = None
                stored_counts[REQUANTIZED if why is not None else PREQUANTIZED] += 1
            _dequantize(graph, weight, how, self.importance.get(weight.name), stored)
            fired[LM_HEAD_RULE if weight.name == LM_HEAD_NAME else LINEAR_RULE] += 1
        embedding = self._embedding(graph, misses)
        if embedding is not None:
            weight, tied = embedding
            assert weight.shape is not None
            block = self.scheme.block_for(EMBEDDING_MODULE)
            reason = self._keep_reason(EMBEDDING_NAME, int(weight.shape[1]), "H", block)
            if reason is not None:
                self.kept[EMBEDDING_NAME] = reason + (" (tied lm_head too)" if tied else "")
            else:
                how = self._linear(1, self.scheme.embedding_bits, block)
                stored = self._stored_table(weight, how)
                if stored is not None or EMBEDDING_NAME in self.requantized:
                    seen_stored = True
                    stored_counts[PREQUANTIZED if stored is not None else REQUANTIZED] += 1
                _dequantize(graph, weight, how, None, stored)
                fired[EMBEDDING_RULE] += 1
                fired[TIED_HEAD_RULE] += int(tied)
        for miss in misses:  # weights of a quantizable name in an unexpected place: kept, with the reason
            name, why = miss.split(": ", 1)
            self.kept.setdefault(name, why)
        fired[KEPT] = len(self.kept)
        if seen_stored:
            fired.update(stored_counts)
        return fired

    def _stored_table(self, weight: ir.Value, how: WeightQuant) -> Any:
        """The embedding's stored quantization (GPTQ's of a tied table, as the lm_head's W^T), or
        None: none, or one ``how`` cannot use (recorded in :attr:`requantized`)."""
        stored = stored_table(weight.const_value)
        why = None if stored is None else _stored_mismatch(stored, how)
        if why is not None:
            self.requantized[EMBEDDING_NAME] = why
            return None
        return stored

    def left_alone(self) -> list[str]:
        lines = [f"{name}: kept ({why})" for name, why in self.kept.items()]
        return lines + [f"{name}: requantized ({why})" for name, why in self.requantized.items()]

    @staticmethod
    def _linear_weights(graph: ir.Graph, misses: list[str]) -> list[ir.Value]:
        """The constant 2-D weights named like a linear weight whose every use is a MatMul's B."""
        found = []
        for name, value in graph.initializers.items():
            if not (name == LM_HEAD_NAME or _LAYER_WEIGHT.match(name)):
                continue
            uses = list(value.uses())
            if not _constant_2d(value):
                misses.append(f"{name}: not a constant 2-D float initializer")
            elif not uses or any(u.node.op_type != "MatMul" or not _default_domain(u.node) or u.idx != 1 for u in uses):
                misses.append(f"{name}: not used as the weight of MatMul alone")
            else:
                found.append(value)
        return found

    @staticmethod
    def _embedding(graph: ir.Graph, misses: list[str]) -> tuple[ir.Value, bool] | None:
        """``(E, tied)`` when ``E`` is read by ``Gather(E, ids, axis=0)`` and, tied, by
        ``Gemm(x, E, transB=1)`` only (or by the Gemm alone: a VL decoder takes embeddings as input)."""
        value = graph.initializers.get(EMBEDDING_NAME)
        if value is None:
            return None
        if not _constant_2d(value):
            misses.append(f"{EMBEDDING_NAME}: not a constant 2-D float initializer")
            return None
        gathers, heads, other = 0, 0, []
        for use in value.uses():
            node = use.node
            if (
                node.op_type == "Gather"
                and _default_domain(node)
                and use.idx == 0
                and node.attributes.get_int("axis", 0) == 0
            ):
                gathers += 1
            elif (
                node.op_type == "Gemm"
                and _default_domain(node)
                and use.idx == 1
                and node.attributes.get_int("transB", 0) == 1
                and node.attributes.get_int("transA", 0) == 0
            ):
                heads += 1
            else:
                other.append(node.op_type)
        if other or not (gathers or heads):
            misses.append(f"{EMBEDDING_NAME}: used by {other or 'nothing'}, not by Gather and the tied Gemm alone")
            return None
        return value, heads > 0  # heads only: a decoder fed inputs_embeds (VL) with a tied lm_head
