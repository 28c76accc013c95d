"""OpenVINO target, runtime side: the stateful engine, runtime inspection, compile options.

The IR is written by :mod:`qwen_export.targets.openvino.lowering`.

Runtime (:class:`OpenVINOEngine`): one compiled model and one infer request; the KV cache is the
request's state. ``reset()`` calls ``reset_state()``; ``truncate`` trims the state tensors (chat
turns reuse the common prefix). This is ``attention=stateful``; the default runs the same artifact
as PagedAttention over a block cache (:mod:`.paged`) unless the model has sliding-window
layers. ``openvino`` is imported lazily, here and in :mod:`.paged`.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from qwen_export.artifact import Manifest
from qwen_export.errors import ArtifactError, EngineUnavailableError, OptionError
from qwen_export.spec import ModelSpec, _ChoiceEnum
from qwen_export.targets.base import (
    DEFAULT_PREFILL_CHUNK,
    EngineCapabilities,
    Truncation,
    check_last_k,
    check_prefill_chunk,
    plan_truncate,
    prepare_step,
    run_in_chunks,
)

MODEL_XML = "openvino_model.xml"
MODEL_BIN = "openvino_model.bin"
TOKENIZER_XML = "openvino_tokenizer.xml"
TOKENIZER_BIN = "openvino_tokenizer.bin"
DETOKENIZER_XML = "openvino_detokenizer.xml"
DETOKENIZER_BIN = "openvino_detokenizer.bin"
TOKENIZER_IR_FILES = (TOKENIZER_XML, TOKENIZER_BIN, DETOKENIZER_XML, DETOKENIZER_BIN)
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
INSTALL_HINT = "pip install 'qwen-export[openvino]'"


def _ov() -> Any:
    try:
        import openvino
    except ImportError:
        raise EngineUnavailableError(f"the OpenVINO target needs openvino; {INSTALL_HINT}") from None
    return openvino


class Precision(_ChoiceEnum):
    """OpenVINO's INFERENCE_PRECISION_HINT: f32 for parity; bf16 where the CPU has it (AMX/AVX-512 BF16).

    SPLIT compiles the artifact twice and picks per call: prompts (``PREFILL_MIN_TOKENS`` or more new
    tokens) run in bf16, the compute-bound phase that AMX / AVX-512 BF16 speed up; decode steps run
    in f32, whose int8 dynamic quantization of activations is faster for one token at a time. Both
    read and write one u8 KV cache (the one cache precision OpenVINO's PagedAttention accepts with
    either), so it needs the paged attention, and it holds the weights twice.
    AUTO (the default): SPLIT for a quantized (int4/int8) artifact on a CPU with bf16 instructions
    when the attention is paged, f32 otherwise (an fp32 or fp16 artifact is exported to be exact; a
    CPU without bf16 would emulate it slowly). Measured on the real Qwen2.5-Coder-1.5B int4 (AMX
    Xeon): split prefills 1.6x (128 tokens) and 2.1x (1024) faster than f32, decodes as fast, at
    the same KL (benchmarks/README.md)."""

    AUTO = "auto"
    F32 = "f32"
    BF16 = "bf16"
    F16 = "f16"
    SPLIT = "split"

    def resolve(self, quantized: bool, cpu_flags: frozenset[str] | None = None, paged: bool = True) -> Precision:
        """AUTO decided for this CPU (``cpu_flags``: /proc/cpuinfo's by default); the others as they are."""
        if self is not Precision.AUTO:
            return self
        from qwen_export.cpuinfo import cpu_flags as read_flags

        flags = read_flags() if cpu_flags is None else cpu_flags
        has_bf16 = bool(flags & {"avx512_bf16", "amx_bf16"})
        return Precision.SPLIT if quantized and has_bf16 and paged else Precision.F32

    @property
    def phases(self) -> tuple[Precision, ...]:
        """The compiled precisions: (decode, prefill) for SPLIT, else just this one."""
        return (Precision.F32, Precision.BF16) if self is Precision.SPLIT else (self,)


#: new tokens in one call from which a SPLIT engine runs its bf16 (prefill) form
PREFILL_MIN_TOKENS = 16


class KVCachePrecision(_ChoiceEnum):
    """OpenVINO's KV_CACHE_PRECISION. F32 (our default) keeps the cache exact with f32 compute (with
    bf16 or f16 compute it is held in that precision: :attr:`OpenVINOOptions.effective_kv_cache`);
    AUTO leaves OpenVINO's default, u8 on x86 CPUs, which openvino-genai runs with: faster on long
    contexts, not exact (its logit error: README.md, "--target openvino")."""

    AUTO = "auto"
    F32 = "f32"
    F16 = "f16"
    BF16 = "bf16"
    U8 = "u8"


class Attention(_ChoiceEnum):
    """How the engine runs attention and holds the KV cache.

    STATEFUL runs the artifact as saved: OpenVINO's SDPA with the cache in the request's state.
    PAGED rewrites it at load with OpenVINO's SDPAToPagedAttention (the model openvino-genai runs
    on CPU by default): PagedAttention over a block KV cache the engine allocates and hands in.
    At least as fast as STATEFUL (benchmarks/README.md has the figures); it refuses sliding-window
    layers (the rewrite drops the graph's window masks). AUTO (the default): PAGED, or STATEFUL
    for a model with sliding-window layers."""

    AUTO = "auto"
    STATEFUL = "stateful"
    PAGED = "paged"

    def resolve(self, spec: ModelSpec, precision: Precision = Precision.F32) -> Attention:
        """The attention an engine for ``spec`` at ``precision`` runs: AUTO decided, the others as
        they are. f16 compute runs STATEFUL: OpenVINO 2026.4's PagedAttention with f16 compute gave
        wrong logits here (max error 26 on a tiny model whose stateful f16 error is 0.045)."""
        if self is Attention.PAGED and precision is Precision.F16:
            raise OptionError(
                "paged attention with f16 compute gives wrong logits in this OpenVINO; "
                "use attention=stateful (--attention stateful) or precision bf16/f32"
            )
        if precision is Precision.SPLIT and (self is Attention.STATEFUL or spec.has_sliding_layers):
            why = "this model has sliding-window layers" if spec.has_sliding_layers else "attention=stateful was asked"
            raise OptionError(
                f"precision split shares one KV cache between two compiled forms, which needs the paged "
                f"attention ({why}); use precision bf16 or f32"
            )
        if self is not Attention.AUTO:
            return self
        return Attention.STATEFUL if spec.has_sliding_layers or precision is Precision.F16 else Attention.PAGED


class PerformanceHint(str, enum.Enum):
    LATENCY = "LATENCY"
    THROUGHPUT = "THROUGHPUT"


@dataclasses.dataclass(frozen=True)
class OpenVINOOptions:
    """How the engine compiles the artifact. ``threads`` = 0 lets OpenVINO choose; ``cache_dir``
    (OpenVINO's CACHE_DIR) makes the second load of an artifact fast (None: no model cache)."""

    threads: int = 0
    hint: PerformanceHint = PerformanceHint.LATENCY
    precision: Precision = Precision.AUTO
    kv_cache: KVCachePrecision = KVCachePrecision.F32
    cache_dir: Path | None = None
    device: str = "CPU"
    attention: Attention = Attention.AUTO
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK  # longest piece of a prompt run at once (0: whole)
    #: a vision-language artifact's tower: AUTO takes ``precision`` when that was chosen (f32,
    #: bf16, f16), else bf16 on a CPU that multiplies bf16 in hardware (AVX512-BF16, AMX), f32
    #: otherwise: on the random Qwen2.5-VL-3B shape, bf16 encodes 1.9x faster than f32 on an AMD EPYC
    #: with AVX512-BF16, its features within 1.6% of f32's (benchmarks/README.md, vl_bench.py)
    vision_precision: Precision = Precision.AUTO

    def __post_init__(self) -> None:
        check_prefill_chunk(self.prefill_chunk)

    def for_artifact(self, manifest: Manifest) -> OpenVINOOptions:
        """These options with ``precision`` AUTO decided for the artifact (quantized or not), its
        attention and this CPU."""
        quantized = (manifest.extra.get("quantization") or {}).get("weights") in ("int4", "int8")
        spec = ModelSpec.from_dict(manifest.spec)
        attention = self.attention
        if manifest.extra.get("multimodal"):  # the paged rewrite reads input_ids; the VL decoder takes embeddings
            if attention is Attention.PAGED:
                raise OptionError(
                    "a vision-language artifact runs on the stateful attention (its decoder takes embeddings, "
                    "which the paged rewrite does not); drop attention=paged"
                )
            attention = Attention.STATEFUL
        paged = attention is not Attention.STATEFUL and not spec.has_sliding_layers
        precision = self.precision.resolve(quantized, paged=paged)
        vision = self.vision_precision
        if vision is Precision.SPLIT:
            raise OptionError("vision_precision split: the tower runs once per image; use f32, bf16 or f16")
        if vision is Precision.AUTO:
            from qwen_export.cpuinfo import native_bf16

            chosen = self.precision not in (Precision.AUTO, Precision.SPLIT)
            vision = self.precision if chosen else Precision.BF16 if native_bf16() else Precision.F32
        return dataclasses.replace(self, precision=precision, attention=attention, vision_precision=vision)

    @property
    def effective_kv_cache(self) -> KVCachePrecision:
        """The KV cache precision compiled. An f32 cache needs f32 compute: with ``precision`` bf16
        or f16 an ``F32`` cache is held in that precision (what OpenVINO's CPU plugin does with the
        stateful SDPA's cache anyway; its PagedAttention refuses an f32 cache with bf16 compute)."""
        if self.precision is Precision.SPLIT:
            return KVCachePrecision.U8
        if self.kv_cache is KVCachePrecision.F32 and self.precision is not Precision.F32:
            return KVCachePrecision(self.precision.value)
        return self.kv_cache

    def properties(self, phase: Precision | None = None) -> dict[str, Any]:
        """The compile properties (``phase``: which of :attr:`Precision.phases` to compile)."""
        props: dict[str, Any] = {
            "PERFORMANCE_HINT": self.hint.value,
            "INFERENCE_PRECISION_HINT": (phase or self.precision.phases[0]).value,
        }
        if self.threads:
            props["INFERENCE_NUM_THREADS"] = self.threads
        if self.effective_kv_cache is not KVCachePrecision.AUTO:
            props["KV_CACHE_PRECISION"] = self.effective_kv_cache.value
        if self.cache_dir is not None:
            props["CACHE_DIR"] = os.fspath(self.cache_dir)
        return props

    def vision_properties(self) -> dict[str, Any]:
        """The compile properties of a VL artifact's tower (:attr:`vision_precision`, decided by
        :meth:`for_artifact`; no KV cache)."""
        props = {k: v for k, v in self.properties().items() if k != "KV_CACHE_PRECISION"}
        precision = self.vision_precision if self.vision_precision is not Precision.AUTO else Precision.F32
        props["INFERENCE_PRECISION_HINT"] = precision.value
        return props


#: the exact settings parity checks use (fp32 compute, fp32 KV cache)
EXACT = OpenVINOOptions(precision=Precision.F32, kv_cache=KVCachePrecision.F32)


# ------------------------------------------------------------------------------------ load-time graph
def unflatten_lm_head(ov_model: Any) -> bool:
    """Make the ``logits`` Result read a 3-D MatMul directly; return whether the graph changed.

    The tied lm_head is traced as ``Reshape([B*S, H]) -> Gemm(transB) -> Reshape([B, S, V])`` (no
    transposed copy of the embedding). openvino-genai looks for the lm_head as the MatMul that feeds
    the logits Result (``find_llm_matmul``: MatMul, or MatMul -> Add/Transpose) and, on its default
    paged-attention backend, where every token is a row of the batch, inserts a Gather of the
    sampled tokens in front of it. With the Reshapes around it that match fails and openvino-genai
    computes the full-vocabulary logits of every prompt token (benchmarks/README.md: what it cost).
    ``MatMul([B, S, H], W, transpose_b)`` computes the same logits.
    """
    from openvino import opset13

    logits = ov_model.output("logits")
    tail = logits.get_node().input_value(0).get_node()
    if tail.get_type_name() != "Reshape":
        return False
    matmul = tail.input_value(0).get_node()
    if matmul.get_type_name() != "MatMul" or matmul.get_transpose_a():
        return False
    flat = matmul.input_value(0).get_node()
    if flat.get_type_name() != "Reshape":
        return False
    hidden = flat.input_value(0)
    if hidden.get_partial_shape().rank.get_length() != 3 or tail.get_output_partial_shape(0).rank.get_length() != 3:
        return False
    direct = opset13.matmul(hidden, matmul.input_value(1), False, matmul.get_transpose_b())
    direct.set_friendly_name(matmul.get_friendly_name())
    tail.output(0).replace(direct.output(0))
    ov_model.validate_nodes_and_infer_types()
    return True


#: a ``--logits last`` graph's input of the positions whose logits it returns (export.trace's). The
#: saved IR holds it as a Constant ``[-1]`` of that name (openvino-genai's signature, unchanged);
#: the stateful engine turns it back into a Parameter at load, the paged form keeps it (each token
#: is a row there; ``sampled_tokens_indices`` picks the rows).
LOGITS_INDICES = "logits_indices"


def fold_logits_rows(ov_model: Any) -> bool:
    """Export side: the ``logits_indices`` Parameter becomes the Constant ``[-1]``; True when the
    model had it."""
    from openvino import opset13

    params = [p for p in ov_model.get_parameters() if LOGITS_INDICES in p.output(0).get_names()]
    if not params:
        return False
    const = opset13.constant(np.array([-1], dtype=np.int64))
    const.set_friendly_name(LOGITS_INDICES)
    params[0].output(0).replace(const.output(0))
    ov_model.remove_parameter(params[0])
    ov_model.validate_nodes_and_infer_types()
    return True


def open_logits_rows(ov_model: Any) -> None:
    """Load side: the ``logits_indices`` Constant becomes a Parameter (int64 [K]) again. Raises
    ArtifactError when the IR has no such Constant."""
    from openvino import opset13

    found = [
        op for op in ov_model.get_ops() if op.get_type_name() == "Constant" and op.get_friendly_name() == LOGITS_INDICES
    ]
    if len(found) != 1:
        raise ArtifactError(f"the manifest records a {LOGITS_INDICES} input but the IR has {len(found)}; re-export it")
    param = opset13.parameter([-1], np.int64, name=LOGITS_INDICES)
    param.output(0).get_tensor().set_names({LOGITS_INDICES})
    found[0].output(0).replace(param.output(0))
    ov_model.add_parameters([param])
    ov_model.validate_nodes_and_infer_types()


# ---------------------------------------------------------------------------------------- inspection
@dataclasses.dataclass(frozen=True)
class RuntimeReport:
    """What OpenVINO's CPU plugin made of the artifact (from ``compiled.get_runtime_model()``)."""

    layer_types: dict[str, int]
    stateful_attention: int  # SDPA nodes reading the KV cache from state and writing it back
    decomposed_attention: int  # SDPA nodes fed by a Concat of the cache (no internal KV cache)
    paged_attention: int  # PagedAttention nodes (attention=paged: the cache is the engine's blocks)
    weight_precisions: dict[str, int]  # FullyConnected weight element types (i4, u4, i8, u8, f32...)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def runtime_report(compiled: Any) -> RuntimeReport:
    """Count the fused ops in a compiled model: attention with its internal KV cache, and the
    element type of each FullyConnected's weights (compressed weights stay i4/u4/i8/u8)."""
    runtime = compiled.get_runtime_model()
    types: Counter[str] = Counter()
    stateful = decomposed = 0
    weights: Counter[str] = Counter()
    for op in runtime.get_ops():
        kind = _layer_type(op)
        types[kind] += 1
        sources = [_layer_type(i.get_source_output().get_node()) for i in op.inputs()]
        if kind == "ScaledDotProductAttention":
            reads_state = sources.count("MemoryInput") >= 2
            writes_state = any(
                _layer_type(t.get_node()) == "MemoryOutput" for out in op.outputs() for t in out.get_target_inputs()
            )
            if reads_state and writes_state:
                stateful += 1
            else:
                decomposed += 1
        elif kind == "FullyConnected" and len(op.inputs()) > 1:
            weights[_short_type(op.inputs()[1].get_element_type())] += 1
    return RuntimeReport(dict(types), stateful, decomposed, types["PagedAttention"], dict(weights))


#: compiled-model properties :func:`compiled_choices` reports, with their short names
_CHOSEN = {
    "INFERENCE_PRECISION_HINT": "precision",
    "KV_CACHE_PRECISION": "kv cache",
    "DYNAMIC_QUANTIZATION_GROUP_SIZE": "dynamic quantization group",
    "INFERENCE_NUM_THREADS": "threads",
    "NUM_STREAMS": "streams",
}


def compiled_choices(compiled: Any, attention: str) -> dict[str, str]:
    """What the CPU plugin compiled: precision, KV-cache precision, activation dynamic-quantization
    group (0: off), threads, streams, as the compiled model reports them, and the ISA."""
    from qwen_export.cpuinfo import isa_summary

    choices = {"attention": attention, "isa": isa_summary()}
    for key, name in _CHOSEN.items():
        try:
            value = compiled.get_property(key)
        except RuntimeError:  # a device without that property
            continue
        choices[name] = str(value.get_type_name() if hasattr(value, "get_type_name") else value)
    return choices


def _layer_type(op: Any) -> str:
    info = op.get_rt_info()
    return str(info["layerType"].astype(str)) if "layerType" in info else op.get_type_name()


def _short_type(element_type: Any) -> str:
    return str(element_type.get_type_name()) if hasattr(element_type, "get_type_name") else str(element_type)


# ---------------------------------------------------------------------------------------- engine
class OpenVINOEngine:
    """Engine over an exported OpenVINO artifact: a compiled stateful model and one infer request."""

    def __init__(self, artifact_dir: str | Path, manifest: Manifest, options: OpenVINOOptions | None = None) -> None:
        ov = _ov()
        self.options = (options or OpenVINOOptions()).for_artifact(manifest)
        self.spec = ModelSpec.from_dict(manifest.spec)
        Attention.STATEFUL.resolve(self.spec, self.options.precision)  # refuses split
        path = Path(artifact_dir) / MODEL_XML
        if not path.is_file():
            raise ArtifactError(f"{path}: missing; re-export the artifact with --target openvino")
        core = ov.Core()
        self._core, self._root = core, Path(artifact_dir)
        #: the IR's float inputs (a VL decoder's inputs_embeds): float32 (fp16 weights are stored compressed)
        self.dtype = np.float32
        if self.options.precision is not Precision.F32:
            _check_precision(core, self.options)
        started = time.perf_counter()
        self.capabilities = capabilities(manifest, self.spec, self.options)
        try:
            if self.capabilities.last_k_logits:
                model = core.read_model(os.fspath(path))
                open_logits_rows(model)
                self.compiled = core.compile_model(model, self.options.device, self.options.properties())
                del model
            else:
                self.compiled = core.compile_model(os.fspath(path), self.options.device, self.options.properties())
        except RuntimeError as exc:  # OpenVINO raises RuntimeError with a multi-line trace
            raise ArtifactError(f"{path}: OpenVINO could not compile it: {_first_line(exc)}") from None
        self.load_seconds = time.perf_counter() - started
        self.request = self.compiled.create_infer_request()
        self._inputs = {name for port in self.compiled.inputs for name in port.get_names()}
        #: a vision-language artifact's inputs (embeddings, images, M-RoPE positions): attached by the
        #: runtime's loader (``runtime.multimodal.MultimodalInputs``); None for a text artifact
        self.multimodal: Any = None
        self._vision: Any = None
        self._vision_record = manifest.extra.get("multimodal")
        self.reset()

    @property
    def num_cached_tokens(self) -> int:
        return 0 if self._mask is None else int(self._mask.shape[1])

    @property
    def kv_bytes(self) -> int:
        """Bytes the KV cache (the request's state tensors) holds now."""
        return sum(int(state.state.byte_size) for state in self.request.query_state())

    def kernel_choices(self) -> dict[str, str]:
        return compiled_choices(self.compiled, "stateful")

    def open_rows(self, max_rows: int) -> Any:
        """Continuous batching needs the paged attention: the stateful SDPA keeps one KV state."""
        if self._vision_record:
            raise OptionError("a vision-language artifact does not batch sequences yet: use LLM.chat / stream")
        raise OptionError(
            "attention=stateful keeps one KV state for the whole batch and cannot batch independent "
            "sequences; use attention=paged (the default unless the model has sliding-window layers)"
        )

    @property
    def tower_precision(self) -> str:
        """The compute precision of a VL artifact's tower (``OpenVINOOptions.vision_precision``)."""
        return self.options.vision_properties()["INFERENCE_PRECISION_HINT"]

    def encode_image(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The vision tower on one image's patches (compiled on first use from the artifact's ONNX
        file, which OpenVINO reads directly, in :attr:`tower_precision`)."""
        if self._vision is None:
            name = str((self._vision_record or {}).get("vision_model", "vision.onnx"))
            try:
                self._vision = self._core.compile_model(
                    os.fspath(self._root / name), self.options.device, self.options.vision_properties()
                )
            except RuntimeError as exc:
                raise ArtifactError(f"{self._root / name}: OpenVINO could not compile it: {_first_line(exc)}") from None
        names = {name for port in self._vision.inputs for name in port.get_names()}
        result = self._vision({name: feeds[name] for name in names if name in feeds})
        return np.asarray(result[self._vision.output(0)])

    def reset(self) -> None:
        self.request.reset_state()
        self._mask: np.ndarray | None = None
        if self.multimodal is not None:
            self.multimodal.truncate(0)

    def truncate(self, num_tokens: int) -> None:
        plan = plan_truncate(num_tokens, self.num_cached_tokens)
        if plan is Truncation.RESET:
            self.reset()
            return
        if plan is Truncation.NOTHING:
            return
        if self.multimodal is not None:
            self.multimodal.truncate(num_tokens)
        ov = _ov()
        for state in self.request.query_state():  # [batch, kv_heads, cached, head_dim]
            kept = np.ascontiguousarray(state.state.data[:, :, :num_tokens])
            state.state = ov.Tensor(kept)
        assert self._mask is not None
        self._mask = self._mask[:, :num_tokens]

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, last_k: int | None = None
    ) -> np.ndarray:
        """``last_k`` (``capabilities.last_k_logits``): the last k positions' logits."""
        step = prepare_step(
            input_ids,
            attention_mask,
            self._mask,
            vocab_size=self.spec.vocab_size,
            max_context=self.capabilities.max_context,
        )
        last_k = check_last_k(last_k, step.ids.shape[1], self.capabilities)
        return run_in_chunks(step, self.options.prefill_chunk, self._piece, self.capabilities.full_logits, last_k)

    def _piece(self, ids: np.ndarray, mask: np.ndarray, position_ids: np.ndarray, rows: int = 1) -> np.ndarray:
        """One inference; ``mask`` covers everything cached once ``ids`` are in; ``rows``: the last
        positions whose logits a ``logits_indices`` model returns."""
        feeds = {
            "input_ids": np.ascontiguousarray(ids),
            "attention_mask": np.ascontiguousarray(mask),
            "position_ids": np.ascontiguousarray(position_ids),
            "beam_idx": np.arange(ids.shape[0], dtype=np.int32),
        }
        if "inputs_embeds" in self._inputs:  # embeddings with image features merged, M-RoPE positions
            if self.multimodal is None:
                raise ArtifactError("a vision-language decoder needs its inputs: open it with qwen_export.load")
            del feeds["input_ids"]
            feeds["inputs_embeds"], feeds["position_ids"] = self.multimodal.feeds(ids, mask.shape[1] - ids.shape[1])
        if self.capabilities.last_k_logits:
            feeds[LOGITS_INDICES] = np.arange(ids.shape[1] - rows, ids.shape[1], dtype=np.int64)
        self.request.infer(feeds, share_inputs=True)
        self._mask = mask
        return np.array(self.request.get_tensor("logits").data, dtype=np.float32)

    def runtime_report(self) -> RuntimeReport:
        return runtime_report(self.compiled)


def capabilities(manifest: Manifest, spec: ModelSpec, options: OpenVINOOptions) -> EngineCapabilities:
    """What an OpenVINO engine (stateful or paged) over this artifact offers."""
    return EngineCapabilities(
        name="openvino",
        max_context=int(manifest.extra.get("max_length", spec.max_position_embeddings)),
        max_batch=0,
        devices=(options.device.lower(),),
        full_logits=manifest.logits == "all",
        vocab_size=spec.vocab_size,
        last_k_logits=manifest.logits == "last" and manifest.extra.get("last_k_logits") is True,
    )


def _check_precision(core: Any, options: OpenVINOOptions) -> None:
    capabilities = core.get_property(options.device, "OPTIMIZATION_CAPABILITIES")
    wanted = {Precision.BF16: "BF16", Precision.SPLIT: "BF16", Precision.F16: "FP16"}[options.precision]
    if wanted not in capabilities:
        raise OptionError(
            f"inference precision {options.precision.value} is not supported by this {options.device} "
            f"(it offers {', '.join(capabilities)}); use f32"
        )


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and not line.startswith("Exception from")]
    return lines[0] if lines else type(exc).__name__
