"""OpenVINO (Intel CPUs): the portable graph converted to a stateful OpenVINO IR, run as saved or
rewritten at load to PagedAttention over a block KV cache the engine owns."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from qwen_export.errors import EngineUnavailableError, OptionError
from qwen_export.spec import CacheIO, DType, KVLayout, ModelSpec, Target
from qwen_export.targets.protocol import EmitJob


@dataclasses.dataclass(frozen=True)
class OpenVINOTarget:
    target: Target = Target.OPENVINO
    cache_io: CacheIO = CacheIO.CONCAT
    engines: tuple[Target, ...] = (Target.OPENVINO,)
    options_field: str | None = "openvino"
    own_options: frozenset[str] = frozenset()
    cpu_module: str = "openvino"
    zero_points: bool = True
    mixed_bits: bool = True
    log_scales: bool = False  # the CPU plugin's compressed weights take constant scales (not built)
    small_blocks_fast: bool = False  # not measured on the CPU plugin (its group 16 decoded at 0.68-0.71x group 32)

    def cpu_runs(self) -> dict[str, dict[str, Any]]:
        """The default engine (PagedAttention over the engine's block cache, stateful for
        sliding-window models) and the artifact run as saved (stateful)."""
        from qwen_export.targets.openvino.engine import Attention, OpenVINOOptions

        return {"openvino": {}, "openvino-stateful": {"openvino": OpenVINOOptions(attention=Attention.STATEFUL)}}

    #: the load options (``load()`` keywords, CLI flags) that make ``RuntimeOptions.openvino``
    load_options: tuple[str, ...] = ("precision", "kv_cache", "cache_dir", "attention")

    def graph_dtype(self, dtype: DType) -> DType:
        """fp32: fp16 weights are stored compressed (decompressed on load; the CPU plugin picks the
        compute precision at run time); an fp16 graph's casts around softmax would hide the attention
        from its SDPA fusion."""
        return DType.FP32

    def adapt_weights(self, quant: Any, given: Mapping[str, Any], message: Callable[[str], None]) -> Any:
        return quant

    def check_options(self, options: Any) -> None:
        if not options.fuse:
            raise OptionError(
                "--no-fuse applies to --target onnxruntime only; openvino fuses attention, RoPE and RMSNorm itself "
                "when it compiles the model"
            )

    def adapt_options(self, options: Any, message: Callable[[str], None]) -> Any:
        return options

    def passes(self, spec: ModelSpec, fuse: bool, ctx: Any, report: Any) -> tuple[list[Any], KVLayout]:
        """Cleanup [, AWQ scaling, portable weight quantization]. The graph stays standard ONNX:
        OpenVINO's converter and CPU plugin fuse attention (with its internal KV cache), RoPE and
        RMSNorm themselves; its weights stay compressed behind blocked DequantizeLinear. The KV
        cache is made stateful when the IR is emitted."""
        from qwen_export.passes.cleanup import CleanupPass
        from qwen_export.passes.quantization import quantization_passes

        return [CleanupPass(), *quantization_passes(spec, ctx, report)], KVLayout.STATEFUL

    def emit(self, model: Any, out: Path, job: EmitJob) -> dict[str, Any]:
        """openvino_model.xml/.bin, the tokenizer IR for openvino-genai and the model's config.json."""
        from qwen_export.targets.openvino import lowering as ov_target

        ov_target.emit(model, out, progress=job.progress, message=job.message, fp16_weights=job.dtype is DType.FP16)
        io = ov_target.io_signature(out)
        try:
            tokenizer_files = ov_target.write_tokenizer_ir(job.source, out)
        except EngineUnavailableError as exc:  # the artifact still runs in our engine; say what is missing
            job.message(f"no tokenizer IR for openvino-genai: {exc}")
            tokenizer_files = []
        if (job.source / "config.json").is_file():  # openvino-genai reads the model's config.json
            shutil.copyfile(job.source / "config.json", out / "config.json")
        return {"io": io, "openvino": {"tokenizer_ir": bool(tokenizer_files)}}

    def open_engine(self, root: Path, manifest: Any, options: Any) -> Any:
        """The paged engine, or the stateful one (``attention``, sliding-window layers, f16)."""
        from qwen_export.targets.openvino.engine import Attention, OpenVINOEngine, OpenVINOOptions

        ov_options = (options.openvino or OpenVINOOptions(threads=options.threads)).for_artifact(manifest)
        if options.prefill_chunk is not None:
            ov_options = dataclasses.replace(ov_options, prefill_chunk=options.prefill_chunk)
        if ov_options.attention.resolve(ModelSpec.from_dict(manifest.spec), ov_options.precision) is Attention.PAGED:
            from qwen_export.targets.openvino.paged import PagedOpenVINOEngine

            return PagedOpenVINOEngine(root, manifest, ov_options)
        return OpenVINOEngine(root, manifest, ov_options)

    def engine_options(self, threads: int, given: Mapping[str, Any], engine: Target | None) -> Any:
        """OpenVINOOptions when precision, kv_cache, cache_dir or attention was given (each checked
        against its enum; unset ones take their defaults); the loader refuses them for other targets."""
        if all(given.get(name) is None for name in self.load_options):
            return None
        from qwen_export.targets.openvino.engine import Attention, KVCachePrecision, OpenVINOOptions, Precision

        cache_dir = given.get("cache_dir")
        return OpenVINOOptions(
            threads=threads,
            precision=Precision.parse(given.get("precision") or "auto", "precision"),
            kv_cache=KVCachePrecision.parse(given.get("kv_cache") or "f32", "kv_cache"),
            cache_dir=Path(cache_dir) if cache_dir is not None else None,
            attention=Attention.parse(given.get("attention") or "auto", "attention"),
        )

    def inspect_lines(self, root: Path, manifest: Any) -> list[str]:
        return []

    def foreign_options_error(self, root: Path, artifact: Target) -> str:
        return (
            f"{root} is a {artifact.value} artifact; the OpenVINO options (precision, KV-cache precision, attention, "
            "cache dir) apply to --target openvino artifacts only"
        )


TARGET = OpenVINOTarget()
