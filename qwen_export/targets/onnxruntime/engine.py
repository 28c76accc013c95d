"""ONNX Runtime target: emit the model, load it, run it behind the Engine protocol.

The KV cache never goes through numpy between steps. Two layouts (``manifest.extra.kv_cache``):

- ``shared`` (fused artifacts): one buffer per layer and kind, [batch, kv_heads, capacity,
  head_dim], bound (IOBinding) as both ``past_key_values.*`` and ``present.*``; GroupQueryAttention
  writes the new tokens into it in place, so a step copies no cache. The capacity follows use: the
  buffers are allocated for the first call rounded up to ``OrtOptions.kv_step`` tokens and, when a
  call needs more, reallocated at least twice as large (rounded up likewise, at most the artifact's
  context) with the cached columns copied over: a 100-token chat on a 128K artifact holds 256
  tokens of KV, and growing costs amortised O(1) copies per token. ``truncate`` only forgets
  columns. A generation past the artifact's context is refused.
  With ``export --kv-cache int8`` the buffers are int8 (GroupQueryAttention quantizes each new key
  and value with the artifact's static scales, :mod:`.kv_quant`): a quarter of fp32's bytes.
- ``concat`` (unfused artifacts): the ``present.*`` outputs of one step are ``OrtValue`` objects
  that ORT allocated, bound as the ``past_key_values.*`` inputs of the next step.
- ``fixed`` (``--target tensorrt`` artifacts, run here on CPU to verify them): the same buffers
  and binding as ``shared``; the graph writes the new rows with ScatterElements at the
  ``cache_position`` input (the KV columns cached .. cached+S-1), which this engine feeds.

Only the logits are copied out. ``onnxruntime`` is imported lazily here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from qwen_export.artifact import Manifest, read_artifact_file
from qwen_export.errors import ArtifactError, EngineUnavailableError, OptionError
from qwen_export.heap import trim_heap
from qwen_export.spec import ModelSpec
from qwen_export.targets.base import (
    DEFAULT_KV_STEP,
    DEFAULT_PREFILL_CHUNK,
    EngineCapabilities,
    Truncation,
    check_last_k,
    check_prefill_chunk,
    grown_capacity,
    plan_truncate,
    position_ids_from_mask,
    prepare_step,
    run_in_chunks,
)

__all__ = ["OnnxRuntimeEngine", "OrtOptions", "emit", "position_ids_from_mask"]

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
LOGITS_INDICES = "logits_indices"  # the graph input of the logits rows (export.trace.LOGITS_INDICES)


def _check_int8_kv(path: Path) -> None:
    """ArtifactError naming the fix when this ONNX Runtime cannot run an int8 KV cache."""
    from qwen_export.targets.onnxruntime.kv_quant import int8_kv_unavailable

    why = int8_kv_unavailable()
    if why:
        raise ArtifactError(
            f"{path}: its int8 KV cache needs ONNX Runtime's CPU GroupQueryAttention with a quantized cache, "
            f"which this installation lacks ({why}); upgrade onnxruntime or re-export without --kv-cache int8"
        )


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError:  # pragma: no cover - onnxruntime is a core dependency
        raise EngineUnavailableError("onnxruntime is not installed; pip install onnxruntime") from None
    return onnxruntime


@dataclasses.dataclass(frozen=True)
class OrtOptions:
    """Session options. ``threads`` = 0 lets ONNX Runtime choose (one per physical core).
    ``prefill_chunk``: longest piece of a prompt run at once (0: the whole prompt); ``kv_step``:
    the shared KV buffers grow in multiples of this many tokens."""

    threads: int = 0
    optimization: str = "all"  # ORT graph optimization level: disable | basic | extended | all
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    kv_step: int = DEFAULT_KV_STEP
    #: run prompt-shaped steps on int8 GEMMs when the artifact carries activation peaks and the CPU
    #: has VNNI (:mod:`.prefill_int8`); False: every step on the artifact's own graph
    prefill_int8: bool = True

    def __post_init__(self) -> None:
        check_prefill_chunk(self.prefill_chunk)
        if isinstance(self.kv_step, bool) or not isinstance(self.kv_step, int) or self.kv_step < 1:
            raise ArtifactError(f"kv_step must be a positive number of tokens, got {self.kv_step!r}")


_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def emit(model: Any, out_dir: Path, progress: Any = None) -> list[str]:
    """Write the ONNX IR model as ``model.onnx`` + ``model.onnx.data`` (external data, streamed).

    ``progress(done_bytes, total_bytes)`` is called after each tensor is written.
    """
    from qwen_export.onnx_writer import write_onnx

    default_logits_rows(model)
    write_onnx(model, out_dir, MODEL_FILE, DATA_FILE, progress)
    return [MODEL_FILE, DATA_FILE]


def default_logits_rows(model: Any) -> bool:
    """Give a ``--logits last`` graph's ``logits_indices`` input the initializer ``[-1]`` (the last
    position's logits; an ONNX Runtime "overridable initializer"): callers that do not know the
    input (onnxruntime-genai, older code) feed nothing and get what they always did. The logits
    output is declared [B, 1, V], that default's shape, as before the input existed:
    onnxruntime-genai reads a static 1 as "last position only" (and preallocates [B, S, V]
    otherwise); ONNX Runtime returns the K rows of an override all the same. True when the graph
    has the input."""
    import onnx_ir as ir

    value = next((v for v in model.graph.inputs if v.name == LOGITS_INDICES), None)
    if value is None:
        return False
    if value.name not in model.graph.initializers:
        value.const_value = ir.tensor(np.array([-1], np.int64), name=LOGITS_INDICES)
        model.graph.register_initializer(value)
    logits = next(v for v in model.graph.outputs if v.name == "logits")
    if logits.shape is not None and len(logits.shape) == 3:
        logits.shape = ir.Shape([logits.shape[0], 1, logits.shape[2]])
    return True


MAX_GRAPH_BYTES = 2**31  # protobuf's own limit for model.onnx (weights live in external data)


def check_external_data(root: Path, manifest: Manifest, model_file: str = MODEL_FILE) -> None:
    """``model_file`` must be listed in the manifest, and every external-data location it names must
    be a file the manifest lists (hashed, regular, inside: :func:`~qwen_export.artifact.load_manifest`
    checked the tree), before ONNX Runtime opens any of them itself."""
    import onnx

    data = read_artifact_file(root, manifest, model_file, MAX_GRAPH_BYTES)
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise ArtifactError(f"{root / model_file}: not an ONNX model ({type(exc).__name__})") from None
    tensors = list(model.graph.initializer)
    tensors += [a.t for node in model.graph.node for a in node.attribute if a.HasField("t")]
    for tensor in tensors:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value not in manifest.files:
                raise ArtifactError(
                    f"{root / model_file}: tensor {tensor.name!r} reads external data from {entry.value!r}, "
                    "which is not a file of this artifact; re-export it"
                )


class OnnxRuntimeEngine:
    """Engine over an exported ONNX Runtime artifact (CPU)."""

    def __init__(self, artifact_dir: str | Path, manifest: Manifest, options: OrtOptions | None = None) -> None:
        ort = _ort()
        self.options = options or OrtOptions()
        self.spec = ModelSpec.from_dict(manifest.spec)
        self.dtype = np.float16 if manifest.dtype == "fp16" else np.float32
        path = Path(artifact_dir) / MODEL_FILE
        check_external_data(Path(artifact_dir), manifest)
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[self.options.optimization])
        if self.options.threads:
            so.intra_op_num_threads = self.options.threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        kv = manifest.extra.get("kv_cache") or {}
        #: the shared buffers' element type: the activations', or int8 (``export --kv-cache int8``)
        self.kv_dtype = np.dtype(np.int8) if kv.get("dtype") == "int8" else np.dtype(self.dtype)
        if self.kv_dtype == np.int8:
            _check_int8_kv(path)
        if kv.get("layout") == "fixed":
            # a TensorRT graph run here to verify it: ORT would fuse its int4 DequantizeLinear ->
            # MatMul into MatMulNBits with int8 activations (accuracy level 4); compute in the
            # activations' own precision, as TensorRT's weight-only dequantization does
            so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        try:
            self.session = ort.InferenceSession(os.fspath(path), so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own types; report one line
            raise ArtifactError(f"{path}: ONNX Runtime could not load it: {str(exc).splitlines()[0]}") from None
        self._ort = ort
        full = manifest.logits == "all"
        self._inputs = {i.name for i in self.session.get_inputs()}
        # logits_indices: an input of the TensorRT graph, an overridable initializer ([-1]) of ours
        optional = {i.name for i in self.session.get_overridable_initializers()}
        self._rows_input = LOGITS_INDICES in self._inputs | optional
        logits_type = next(o.type for o in self.session.get_outputs() if o.name == "logits")
        self._logits_dtype = np.float16 if logits_type == "tensor(float16)" else np.float32
        self.capabilities = EngineCapabilities(
            name="onnxruntime",
            max_context=int(manifest.extra.get("max_length", self.spec.max_position_embeddings)),
            max_batch=0,
            devices=("cpu",),
            full_logits=full,
            vocab_size=self.spec.vocab_size,
            last_k_logits=not full and self._rows_input,
        )
        self._layers = self.spec.num_hidden_layers
        self.shared_kv = kv.get("layout") in ("shared", "fixed")
        self._buffers: list[Any] = []  # shared layout: [numpy array, OrtValue] kept alive together
        self._kv_generation = 0  # counts the allocations of ``_buffers``
        #: id(IO binding) -> (KV generation, what else is bound) of the shared buffers it holds bound
        self._bound: dict[int, tuple[int, Any]] = {}
        self._binding = self.session.io_binding()
        self._quant = manifest.extra.get("quantization") or {}
        self._fixed_kv = kv.get("layout") == "fixed"
        self._source = (Path(artifact_dir), manifest)
        self._session_options = so
        #: (session, IO binding) for steps of at least prefill_int8.MIN_TOKENS tokens, or None
        self._prefill, self.prefill_note = self._open_prefill()
        #: a vision-language artifact's inputs (embeddings, images, M-RoPE positions): attached by the
        #: runtime's loader (``runtime.multimodal.MultimodalInputs``); None for a text artifact
        self.multimodal: Any = None
        self._vision: Any = None
        self.reset()

    def _session_options_copy(self) -> Any:
        """A new SessionOptions with this engine's settings (ORT's cannot be copied)."""
        so = self._ort.SessionOptions()
        so.graph_optimization_level = self._session_options.graph_optimization_level
        so.intra_op_num_threads = self._session_options.intra_op_num_threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        return so

    def _open_prefill(self) -> tuple[Any, str]:
        """The int8 prefill session and its IO binding (or None), and what prompts run on."""
        from qwen_export import cpuinfo
        from qwen_export.targets.onnxruntime import prefill_int8

        root, manifest = self._source
        record = manifest.extra.get("prefill") or {}
        if record.get("weights") != "int8":
            return None, "the decode graph (export --prefill int8 adds an int8 prompt graph)"
        if not self.options.prefill_int8:
            return None, "the decode graph (the int8 prompt graph is turned off)"
        if cpuinfo.int8_gemm_saturates(platform.machine(), cpuinfo.cpu_model_and_flags()[1]):
            return None, "the decode graph (the int8 prompt graph needs a CPU with VNNI)"
        name = str(record.get("model", prefill_int8.PREFILL_FILE))
        check_external_data(root, manifest, name)
        options = self._session_options_copy()
        # its pool's threads must not spin after a prompt: they would take the decode session's cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = prefill_int8.open_session(self._ort, root, options)
        except Exception as exc:  # ORT raises its own types; report one line
            raise ArtifactError(f"{root / name}: ONNX Runtime could not load it: {str(exc).splitlines()[0]}") from None
        note = f"int8 GEMMs ({record.get('linears', '?')} linears) for steps of {prefill_int8.MIN_TOKENS}+ tokens"
        return (session, session.io_binding()), note

    def encode_image(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The vision tower on one image's patches (its session opened on first use)."""
        if self._vision is None:
            self._vision = self._open_vision()
        names = {value.name for value in self._vision.get_inputs()}
        return self._vision.run(None, {name: feeds[name] for name in names})[0]

    def _open_vision(self) -> Any:
        """The vision tower's session. An int8 tower (``DynamicQuantizeMatMul``) on an x86 CPU
        without VNNI gets unsigned weight codes first (:mod:`.dynamic_int8`: no int16 saturation)."""
        from qwen_export.cpuinfo import cpu_model_and_flags
        from qwen_export.targets.onnxruntime import dynamic_int8

        root, manifest = self._source
        record = manifest.extra["multimodal"]
        name = str(record.get("vision_model", "vision.onnx"))
        check_external_data(root, manifest, name)
        model: Any = os.fspath(root / name)
        try:
            if record.get("vision_weights") == "int8" and dynamic_int8.saturates(
                platform.machine(), cpu_model_and_flags()[1]
            ):
                import onnx

                proto = onnx.load(model)
                dynamic_int8.unsigned_codes(proto)
                model = proto.SerializeToString()
            session = self._ort.InferenceSession(model, self._session_options, providers=["CPUExecutionProvider"])
            trim_heap()  # a session made after the artifact was opened (its prompt graph)
            return session
        except Exception as exc:  # ORT and onnx raise their own types; report one line
            first = str(exc).splitlines()[0]
            raise ArtifactError(f"{root / name}: ONNX Runtime could not load it: {first}") from None

    def open_rows(self, max_rows: int) -> Any:
        """A :class:`~qwen_export.targets.base.RowBatch` of ``max_rows`` rows on this artifact
        (continuous batching; :mod:`.rows`): its own session and KV buffers."""
        from qwen_export.targets.onnxruntime.rows import OrtRows

        if self.multimodal is not None:
            raise OptionError("a vision-language artifact does not batch sequences yet: use LLM.chat / stream")
        root, manifest = self._source
        prefill = None
        if self._prefill is not None:  # the int8 prompt graph, in the rows too
            from qwen_export.targets.onnxruntime.prefill_int8 import PREFILL_FILE

            name = str(manifest.extra["prefill"].get("model", PREFILL_FILE))
            prefill = read_artifact_file(root, manifest, name, MAX_GRAPH_BYTES)
        model = read_artifact_file(root, manifest, MODEL_FILE, MAX_GRAPH_BYTES)
        return OrtRows(self, max_rows, root, model, prefill)

    def kernel_choices(self) -> dict[str, str]:
        """What runs on this CPU: threads, the ISA MLAS dispatches to, the quantized MatMul's
        activations (accuracy level 4: int8 activations, the VNNI/AMX-friendly kernels)."""
        from qwen_export.cpuinfo import default_threads, isa_summary

        choices = {"threads": str(default_threads(self.options.threads)), "isa": isa_summary()}
        if self._quant.get("weights") in ("int4", "int8"):
            level = 1 if self._fixed_kv else int(self._quant.get("accuracy_level", 0))
            choices["matmul activations"] = {4: "int8", 2: "fp16", 3: "bf16"}.get(level, "fp32")
            choices["prefill"] = self.prefill_note
        if self.kv_dtype == np.int8:
            choices["kv cache"] = "int8 (static per-channel scales)"
        else:
            choices["kv cache"] = "fp16" if self.dtype is np.float16 else "fp32"
        return choices

    # ------------------------------------------------------------------ Engine API
    @property
    def num_cached_tokens(self) -> int:
        return 0 if self._mask is None else int(self._mask.shape[1])

    def reset(self) -> None:
        self._mask: np.ndarray | None = None
        self._past: list[Any] | None = None
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
        assert self._mask is not None
        if self.shared_kv:  # the buffer keeps its columns; later steps overwrite them
            self._mask = self._mask[:, :num_tokens]
            return
        assert self._past is not None
        self._past = [
            self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[:, :, :num_tokens]))
            for v in self._past
        ]
        self._mask = self._mask[:, :num_tokens]

    @property
    def kv_capacity(self) -> int:
        """Tokens per row the shared KV buffers hold now (0: none allocated; concat layout: 0)."""
        return int(self._buffers[0][0].shape[2]) if self._buffers else 0

    @property
    def kv_bytes(self) -> int:
        """Bytes held by the KV cache now (the shared buffers, or the last step's presents)."""
        if self._buffers:
            return sum(array.nbytes for array, _ in self._buffers)
        past = self._past or []
        return sum(int(np.prod(v.shape())) * np.dtype(self.dtype).itemsize for v in past)

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

    # ------------------------------------------------------------------ internals
    def _piece(self, ids: np.ndarray, mask: np.ndarray, position_ids: np.ndarray, rows: int = 1) -> np.ndarray:
        """One inference; ``mask`` covers everything cached once ``ids`` are in; ``rows``: the last
        positions whose logits a ``logits_indices`` graph returns."""
        self._run(ids, mask, position_ids, rows)
        self._mask = mask
        return self._logits

    def _run(self, ids: np.ndarray, mask: np.ndarray, position_ids: np.ndarray, rows: int = 1) -> None:
        from qwen_export.targets.onnxruntime.prefill_int8 import MIN_TOKENS

        session, b = self.session, self._binding
        if self._prefill is not None and ids.shape[1] >= MIN_TOKENS:
            session, b = self._prefill
        seq = ids.shape[1]
        feeds: dict[str, np.ndarray] = {"attention_mask": mask}
        if "inputs_embeds" in self._inputs:  # embeddings with image features merged, M-RoPE positions
            if self.multimodal is None:
                raise ArtifactError("a vision-language decoder needs its inputs: open it with qwen_export.load")
            feeds["inputs_embeds"], position_ids = self.multimodal.feeds(ids, mask.shape[1] - seq)
        else:
            feeds["input_ids"] = ids
        if "position_ids" in self._inputs:
            feeds["position_ids"] = np.ascontiguousarray(position_ids)
        if "cache_position" in self._inputs:  # fixed layout: the buffer columns of the new tokens
            feeds["cache_position"] = np.arange(mask.shape[1] - seq, mask.shape[1], dtype=np.int64)
        with_rows = self._rows_input and (rows > 1 or LOGITS_INDICES in self._inputs)  # else its default, [-1]
        if self.shared_kv:
            buffers = self._shared_buffers(ids.shape[0], mask.shape[1], mask.shape[1] - ids.shape[1])
            self._bind_step(b, feeds, self._rows_value(seq, rows) if with_rows else None, buffers)
            if seq == 1:  # a decode step: logits into an array of ours (get_outputs wraps every present)
                logits = np.empty((ids.shape[0], 1, self.spec.vocab_size), self._logits_dtype)
                b.bind_ortvalue_output("logits", self._ort.OrtValue.ortvalue_from_numpy(logits))
                session.run_with_iobinding(b)
                self._logits = logits
                return
            session.run_with_iobinding(b)
            self._logits = b.get_outputs()[0].numpy()
            return
        self._bind_step(b, feeds, self._rows_value(seq, rows) if with_rows else None, None)
        past = self._past or self._empty_past(ids.shape[0])
        for name, value in zip(self._kv_names(), past, strict=True):
            b.bind_ortvalue_input(f"past_key_values.{name}", value)
            b.bind_output(f"present.{name}", "cpu")
        session.run_with_iobinding(b)
        outputs = b.get_outputs()
        self._logits = outputs[0].numpy()
        self._past = list(outputs[1:])

    def _rows_value(self, seq: int, rows: int) -> Any:
        """The ``logits_indices`` of a step: its last ``rows`` positions, as an OrtValue (kept alive
        until the next step: the binding holds no reference to it)."""
        self._rows = self._ort.OrtValue.ortvalue_from_numpy(np.arange(seq - rows, seq, dtype=np.int64))
        return self._rows

    def _bind_step(self, b: Any, feeds: dict[str, np.ndarray], rows: Any, buffers: list[Any] | None) -> None:
        """Bind one step's inputs and the logits on ``b``. The shared KV buffers (``buffers``) stay
        bound from the previous step on the same binding when they are the same buffers and the
        same inputs are bound: a step then re-binds 4-5 names, not 2 x 2 x layers more."""
        names = (tuple(feeds), rows is not None)
        keep = buffers is not None and self._bound.get(id(b)) == (self._kv_generation, names)
        if not keep:
            b.clear_binding_inputs()
            b.clear_binding_outputs()
        for name, value in feeds.items():
            b.bind_cpu_input(name, value)
        if rows is not None:  # an OrtValue: bind_cpu_input looks the name up among the required inputs only
            b.bind_ortvalue_input(LOGITS_INDICES, rows)
        b.bind_output("logits", "cpu")
        if buffers is None or keep:
            return
        for name, (_, value) in zip(self._kv_names(), buffers, strict=True):
            b.bind_ortvalue_input(f"past_key_values.{name}", value)
            b.bind_ortvalue_output(f"present.{name}", value)
        self._bound[id(b)] = (self._kv_generation, names)

    def _unbind_kv(self) -> None:
        """Drop every binding of the shared buffers (before they are freed or replaced): a binding
        holds its values alive."""
        for binding in [self._binding] + ([self._prefill[1]] if self._prefill is not None else []):
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
        self._bound.clear()
        self._kv_generation += 1

    def _kv_names(self) -> list[str]:
        return [f"{i}.{kind}" for i in range(self._layers) for kind in ("key", "value")]

    def _shared_buffers(self, batch: int, needed: int, cached: int) -> list[Any]:
        """The shared KV buffers for ``batch`` rows holding at least ``needed`` tokens: allocated
        zeroed on first use (or for a new batch size), reallocated larger with the first ``cached``
        columns copied when ``needed`` exceeds the capacity, reused otherwise."""
        if self._buffers and self._buffers[0][0].shape[0] != batch:
            self._unbind_kv()
            self._buffers = []  # free the old ones first
        current = self.kv_capacity
        if needed <= current:
            return self._buffers
        self._unbind_kv()
        capacity = grown_capacity(needed, current, self.options.kv_step, self.capabilities.max_context)
        shape = (batch, self.spec.num_key_value_heads, capacity, self.spec.head_dim)
        buffers: list[Any] = self._buffers or [None] * (2 * self._layers)
        self._buffers = []
        try:
            for i, old in enumerate(buffers):  # one at a time: each old buffer is freed once copied
                array = np.zeros(shape, self.kv_dtype)  # the OrtValue shares this memory: keep it alive
                if old is not None and cached:
                    array[:, :, :cached] = old[0][:, :, :cached]
                buffers[i] = (array, self._ort.OrtValue.ortvalue_from_numpy(array))
                del old
        except BaseException:  # MemoryError, Ctrl-C: the cache is lost, say so
            self.reset()
            raise
        self._buffers = buffers
        return self._buffers

    def _empty_past(self, batch: int) -> list[Any]:
        shape = (batch, self.spec.num_key_value_heads, 0, self.spec.head_dim)
        empty = np.zeros(shape, self.dtype)
        return [self._ort.OrtValue.ortvalue_from_numpy(empty) for _ in range(2 * self._layers)]
