"""export(): load -> trace -> passes -> lower -> emit, as one straight-line function.

Peak memory: tracing runs on the meta device and weights are bound lazily, so the only weight
memory is the tensor being written (plus the small ones the cleanup pass folds).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from qwen_export import artifact
from qwen_export.errors import CheckpointError, OptionError
from qwen_export.export.checkpoint import Checkpoint
from qwen_export.export.options import ExportOptions  # noqa: F401 - re-exported
from qwen_export.passes.base import PassContext, PassReport
from qwen_export.quant.scheme import PrefillWeights, QuantAlgorithm
from qwen_export.runtime.tokenizer import Tokenizer
from qwen_export.spec import DType, KVCacheDType, LogitsMode, ModelSpec
from qwen_export.targets.protocol import EmitJob

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
#: calibration tokens whose RMSNorm peaks smooth the int8 prefill graph (export --prefill int8)
PREFILL_CALIBRATION_TOKENS = 2048
OPTIONAL_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json")


@dataclasses.dataclass
class ExportHooks:
    """Progress callbacks: ``step(name)`` when a phase starts, ``write_progress(done, total)`` bytes."""

    step: Callable[[str], None] = lambda name: None
    write_progress: Callable[[int, int], None] = lambda done, total: None
    message: Callable[[str], None] = lambda text: None


def export(
    checkpoint_dir: str | Path, out_dir: str | Path, options: ExportOptions, hooks: ExportHooks | None = None
) -> artifact.Manifest:
    """Export a Hugging Face Qwen checkpoint to an artifact directory; return its manifest.

    SIGTERM is turned into :class:`artifact.Terminated` (a KeyboardInterrupt) for the whole export,
    tracing included, so a terminated export unwinds like Ctrl-C and leaves nothing behind.
    """
    with artifact.sigterm_raises():
        return _export(checkpoint_dir, out_dir, options, hooks)


def _export(
    checkpoint_dir: str | Path, out_dir: str | Path, options: ExportOptions, hooks: ExportHooks | None
) -> artifact.Manifest:
    hooks = hooks or ExportHooks()
    backend = options.backend
    options = backend.adapt_options(options, hooks.message)
    timer = _PhaseTimer(hooks)
    out = Path(out_dir)
    keep = _inputs(checkpoint_dir, options)
    artifact.check_output_dir(out, options.overwrite, keep=keep)
    timer.start("load")
    ckpt, multimodal = _open_checkpoint(checkpoint_dir, options)
    ckpt.spec = spec = options.model_spec(ckpt.spec)  # --rope-scaling: the spec the artifact is built for
    ckpt.validate(spec)
    tokenizer_files = _tokenizer_files(ckpt.directory)
    max_length = options.resolved_max_length(spec)
    if options.quant is not None:  # option errors before the slow part
        from qwen_export.passes.quantize import check_scheme

        check_scheme(options.quant, spec.num_hidden_layers)
        if spec.moe is not None and options.quant.algorithm.calibrated:
            raise OptionError(
                f"--algorithm {options.quant.algorithm.value} is not built for mixture-of-experts models (its "
                "calibration runner does not route tokens through the experts); use --algorithm rtn or clip"
            )
    with tempfile.TemporaryDirectory(prefix="qwen-export-calibration-") as scratch:
        calibration, stats, weights = _calibrate(ckpt, options, timer, hooks, Path(scratch))
        kv = _calibrate_kv(ckpt, options, timer)
        peaks = _calibrate_prefill(ckpt, options, timer)
        prepared = (max_length, tokenizer_files, stats, calibration, keep, kv, multimodal, peaks)
        return _trace_and_emit(ckpt, weights, out, options, hooks, timer, prepared)


def _open_checkpoint(checkpoint_dir: str | Path, options: ExportOptions) -> tuple[Checkpoint, Any]:
    """The checkpoint and, for a Qwen2-VL / Qwen2.5-VL one, its MultimodalSpec (else None)."""
    from qwen_export.export import vl_artifact

    multimodal = vl_artifact.checkpoint_multimodal(checkpoint_dir)
    if multimodal is None:
        return Checkpoint.open(checkpoint_dir), None
    vl_artifact.check_target(options.target.value, options.vision_weights)
    return Checkpoint.open_vl(checkpoint_dir)


def _trace_and_emit(
    ckpt: Checkpoint,
    weights: Any,
    out: Path,
    options: ExportOptions,
    hooks: ExportHooks,
    timer: _PhaseTimer,
    prepared: tuple[int, list[str], Any, dict[str, Any] | None, Any, Any, Any, Any],
) -> artifact.Manifest:
    """Trace, bind ``weights`` (the checkpoint or GPTQ's view of it), run the passes, emit. ``prepared``:
    max length, tokenizer files, AWQ statistics, calibration record, the inputs an ``--overwrite`` must
    not remove, the int8 KV cache's (ranges, record), a VL checkpoint's MultimodalSpec, the prefill
    graph's norm peaks (each None when not wanted)."""
    max_length, tokenizer_files, stats, calibration, keep, kv, multimodal, peaks = prepared
    spec, backend = ckpt.spec, options.backend
    timer.start("trace")
    from qwen_export.export.trace import TraceOptions, bind_weights, trace

    vl = multimodal is not None  # the decoder takes inputs_embeds and M-RoPE position_ids
    model = trace(spec, TraceOptions(options.graph_dtype, options.logits, cache=backend.cache_io, embeds_input=vl))
    bind_weights(model, spec, weights)

    timer.start("passes")
    from qwen_export.passes.runner import run_passes

    dump, report = _Dumper(options.dump_dir), PassReport()
    dump("traced", model)
    context = _pass_context(options, hooks, max_length, stats, kv[0] if kv is not None else None)
    passes, kv_layout = backend.passes(spec, options.fuse, context, report)
    records, kv_layout = run_passes(model, passes, kv_layout, dump)

    timer.start("emit")
    with artifact.write_artifact(out, options.overwrite, keep=keep) as staging:
        # tokenizer and generation config first: genai_config.json takes its eos ids from them
        _copy_tokenizer(ckpt.directory, staging.path, tokenizer_files)
        _write_generation_config(ckpt.directory, staging.path, spec)
        job = EmitJob(
            spec=spec,
            source=ckpt.directory,
            dtype=options.dtype,
            max_length=max_length,
            kv_layout=kv_layout,
            max_batch=options.max_batch,
            turn_end_token_id=Tokenizer.from_dir(ckpt.directory).eos_token_id,
            prefill_peaks=peaks,
            progress=hooks.write_progress,
            message=hooks.message,
        )
        target_extra = backend.emit(model, staging.path, job)
        if multimodal is not None:
            target_extra["multimodal"] = _write_multimodal(ckpt, multimodal, staging.path, options, hooks)
        kv_cache: dict[str, Any] = {
            "layout": kv_layout.value,
            "capacity": max_length,
            "bytes_per_token": spec.kv_bytes_per_token(options.graph_dtype, KVCacheDType.INT8 if kv else None),
        }
        if kv is not None:  # absent: the cache is in the activations' dtype
            kv_cache.update(dtype=KVCacheDType.INT8.value, quantization=kv[1])
        io_signature = target_extra.pop("io")
        extra = _quantization_extra(ckpt, options, report, calibration)
        staging.manifest_fields.update(
            target=options.target.value,
            dtype=options.dtype.value,
            logits=options.logits.value,
            spec=spec.to_dict(),
            io=io_signature,
            passes=records,
            extra={
                "max_length": max_length,
                "context": _context_record(spec, options, max_length),
                "kv_cache": kv_cache,
                "source": ckpt.directory.resolve().name,
                "export_seconds": timer.finish(),
                # the graph's logits_indices input: forward(..., last_k=k) (speculative decoding)
                "last_k_logits": options.logits is LogitsMode.LAST,
                **target_extra,
                **extra,
            },
        )
    return artifact.load_manifest(out, verify=False)


def _write_multimodal(ckpt: Checkpoint, multimodal: Any, out: Path, options: ExportOptions, hooks: ExportHooks) -> Any:
    """A VL artifact's vision tower, embedding table and preprocessor config; its manifest record."""
    from qwen_export.export.vl_artifact import write_parts

    return write_parts(
        ckpt,
        multimodal,
        out,
        activation_dtype=np.float16 if options.graph_dtype is DType.FP16 else np.float32,
        quantized=options.quant is not None,
        vision_weights=options.vision_weights,
        step=hooks.step,
    )


def _context_record(spec: ModelSpec, options: ExportOptions, max_length: int) -> dict[str, Any]:
    """``manifest.extra["context"]``: the chosen context, the model's own, and where they came from."""
    return {
        "max_length": max_length,
        "trained": spec.trained_context,
        "chosen_by": "--max-length" if options.max_length is not None else "model",
        "rope_override": options.rope.describe() if options.rope is not None else None,
    }


def _pass_context(
    options: ExportOptions, hooks: ExportHooks, max_length: int, stats: Any, kv_ranges: Any = None
) -> PassContext:
    return PassContext(
        strict=options.strict,
        explain=_MessageStream(hooks.message) if options.explain else None,
        max_length=max_length,
        quant=options.quant,
        accuracy_level=options.accuracy_level,
        calibration_stats=stats,
        kv_ranges=kv_ranges,
    )


def _calibrate(
    ckpt: Checkpoint, options: ExportOptions, timer: _PhaseTimer, hooks: ExportHooks, scratch: Path
) -> tuple[dict[str, Any] | None, Any, Any]:
    """``(record, stats, weights)``: the calibration record (None without calibration), AWQ's
    activation statistics (None for other schemes), and the weight source to bind (the checkpoint,
    or for GPTQ its quantized view, whose stored quantization lives in ``scratch``)."""
    quant = options.quant
    if quant is None or not quant.algorithm.calibrated:
        return None, None, ckpt
    from qwen_export.export import calibration as calib
    from qwen_export.export.gptq import GPTQSettings, gptq_width

    spec = dataclasses.replace(ckpt.spec, mrope_section=None)  # text-only: M-RoPE is plain RoPE
    settings = GPTQSettings(awq_grid=20 if quant.algorithm is QuantAlgorithm.AWQ_GPTQ else 0)
    wanted = settings.tokens_for(gptq_width(spec), calib.SEQUENCE_LENGTH)
    text, source = calib.calibration_text(options.calibration)
    ids = calib.calibration_tokens(Tokenizer.from_dir(ckpt.directory), text, source, max(calib.MAX_TOKENS, wanted))
    timer.start("calibrate")
    if quant.algorithm is QuantAlgorithm.AWQ:
        ids = ids[: calib.MAX_TOKENS]
        return {"tokens": len(ids), "source": source}, calib.collect_activation_stats(ckpt, spec, ids), ckpt
    from qwen_export.export.gptq_layers import run_gptq

    ids = ids[:wanted]
    sequences = -(-len(ids) // calib.SEQUENCE_LENGTH)  # LayerRunner's sequences, of equal lengths
    if not settings.uses_gptq(gptq_width(spec), sequences * (len(ids) // sequences)):
        hooks.message(
            f"GPTQ: --calibration {source!r} gives {len(ids)} tokens; inputs of {gptq_width(spec)} channels "
            f"need {wanted} for GPTQ and get the weighted clip search instead (give a longer text)"
        )
    record = {"tokens": len(ids), "source": source, "gptq": settings.describe()}
    scale_dtype = np.float16 if options.graph_dtype is DType.FP16 else np.float32
    weights = run_gptq(
        ckpt, spec, ids, quant, scratch, settings=settings, scale_dtype=scale_dtype, progress=hooks.write_progress
    )
    return record, None, weights


def _calibrate_kv(ckpt: Checkpoint, options: ExportOptions, timer: _PhaseTimer) -> Any:
    """``(ranges, record)`` of an int8 KV cache (``--kv-cache int8``): per layer the calibration's
    key and value maxima, and the manifest's record of the scheme; None for another cache."""
    if options.kv_cache is not KVCacheDType.INT8:
        return None
    from qwen_export.export import calibration as calib
    from qwen_export.quant import kv_cache

    text, source = calib.calibration_text(options.calibration)
    ids = calib.calibration_tokens(Tokenizer.from_dir(ckpt.directory), text, source)
    timer.start("calibrate")
    spec = dataclasses.replace(ckpt.spec, mrope_section=None)  # text-only: M-RoPE is plain RoPE
    return calib.collect_kv_ranges(ckpt, spec, ids), kv_cache.record(len(ids), source)


def _calibrate_prefill(ckpt: Checkpoint, options: ExportOptions, timer: _PhaseTimer) -> dict[str, Any] | None:
    """``export --prefill int8``: the RMSNorm outputs' per-channel peaks over the calibration text
    (at most :data:`PREFILL_CALIBRATION_TOKENS` of it); None without a prefill graph."""
    if options.prefill is not PrefillWeights.INT8:
        return None
    from qwen_export.export import calibration as calib

    text, source = calib.calibration_text(options.calibration)
    ids = calib.calibration_tokens(Tokenizer.from_dir(ckpt.directory), text, source)[:PREFILL_CALIBRATION_TOKENS]
    timer.start("calibrate")
    spec = dataclasses.replace(ckpt.spec, mrope_section=None)  # text-only: M-RoPE is plain RoPE
    return calib.collect_norm_peaks(ckpt, spec, ids)


def _quantization_extra(
    ckpt: Checkpoint, options: ExportOptions, report: PassReport, calibration: dict[str, Any] | None
) -> dict[str, Any]:
    """The manifest's ``extra`` entries about quantization: the scheme used (with calibration and the
    source's stored quantization, when any), or what a float export was dequantized from."""
    from qwen_export.quant.prequant import record as prequant_record

    source_quant = prequant_record(ckpt)
    if options.quant is None:
        return {} if source_quant is None else {"dequantized_from": source_quant}
    record = quantization_record(options, report.quantization_kept)
    if calibration is not None:
        record["calibration"] = calibration
    if source_quant is not None:
        record["prequantized"] = source_quant
        record["requantized"] = [
            {"tensor": name, "reason": why} for name, why in report.quantization_requantized.items()
        ]
    return {"quantization": record}


def quantization_record(options: ExportOptions, kept: dict[str, str]) -> dict[str, Any]:
    """``manifest.extra["quantization"]``: the scheme, MatMulNBits' accuracy level and the weights
    kept in the model dtype (``{"tensor", "reason"}`` each)."""
    assert options.quant is not None
    return {
        **options.quant.to_dict(),
        "accuracy_level": options.accuracy_level,
        "kept": [{"tensor": name, "reason": why} for name, why in kept.items()],
    }


class _MessageStream:
    def __init__(self, sink: Callable[[str], None]) -> None:
        self.sink = sink

    def write(self, text: str) -> None:
        self.sink(text)


class _Dumper:
    """``dump(phase, model)``: write the model after a phase into ``dump_dir/NN-phase/`` (weights
    included, streamed) when ``--dump-dir`` was given."""

    def __init__(self, root: Path | None) -> None:
        self.root = Path(root) if root is not None else None
        self.count = 0
        if self.root is not None:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OptionError(f"--dump-dir {self.root}: cannot create it ({exc.strerror})") from None

    def __call__(self, phase: str, model: Any) -> None:
        if self.root is None:
            return
        from qwen_export.onnx_writer import write_onnx

        out = self.root / f"{self.count:02d}-{phase}"
        self.count += 1
        if out.exists():
            shutil.rmtree(out)
        out.mkdir()
        write_onnx(model, out, "model.onnx", "model.onnx.data")


class _PhaseTimer:
    """Reports each phase to the hooks and records its wall time (kept in the manifest)."""

    def __init__(self, hooks: ExportHooks) -> None:
        self.hooks = hooks
        self.seconds: dict[str, float] = {}
        self._phase: str | None = None
        self._t0 = 0.0

    def start(self, phase: str) -> None:
        self.finish()
        self.hooks.step(phase)
        self._phase, self._t0 = phase, time.perf_counter()

    def finish(self) -> dict[str, float]:
        if self._phase is not None:
            # a phase started again (calibration for GPTQ, then for the KV cache): the times add up
            elapsed = time.perf_counter() - self._t0
            self.seconds[self._phase] = round(self.seconds.get(self._phase, 0.0) + elapsed, 3)
            self._phase = None
        return dict(self.seconds)


def _inputs(checkpoint_dir: str | Path, options: ExportOptions) -> list[Path]:
    """What the export reads: replacing the output must never delete one of them."""
    paths = [Path(checkpoint_dir)]
    for name in ("calibration", "dump_dir"):
        value = getattr(options, name, None)
        if isinstance(value, (str, Path)):
            paths.append(Path(value))
    return paths


def _tokenizer_files(directory: Path) -> list[str]:
    """The tokenizer files to copy, after loading them once (a bad file fails before any work)."""
    missing = [f for f in TOKENIZER_FILES if not (directory / f).exists()]
    if missing:
        raise CheckpointError(
            f"{directory}: {', '.join(missing)} missing; the artifact needs the checkpoint's tokenizer files"
        )
    Tokenizer.from_dir(directory)  # ConfigError naming the file: not UTF-8, too large, invalid, bad template
    return list(TOKENIZER_FILES) + [f for f in OPTIONAL_FILES if (directory / f).is_file()]


def _copy_tokenizer(src: Path, dst: Path, files: list[str]) -> None:
    """Copy the tokenizer files; a single chat template is also written as ``chat_template.jinja``
    (named templates stay in tokenizer_config.json, where the runtime picks ``tool_use`` for tools)."""
    for name in files:
        shutil.copyfile(src / name, dst / name)
    template = src / "chat_template.jinja"
    if template.is_file():
        shutil.copyfile(template, dst / "chat_template.jinja")
        return
    chat = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    if isinstance(chat, str):
        (dst / "chat_template.jinja").write_text(chat, encoding="utf-8")


def _write_generation_config(src: Path, dst: Path, spec: ModelSpec) -> None:
    path = src / "generation_config.json"
    if path.is_file():
        shutil.copyfile(path, dst / "generation_config.json")
        return
    eos = list(spec.eos_token_ids)
    (dst / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}, indent=2), encoding="utf-8")
