"""``qwen-export export``: the flags go to :func:`qwen_export.export.options.export_options` (all
option policy lives there), the export runs with a progress bar, one summary line is printed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from qwen_export.artifact import check_output_dir
from qwen_export.cli.common import (
    app,
    byte_progress,
    console,
    context_line,
    err_console,
    handles_errors,
    kv_cache_line,
)
from qwen_export.errors import OptionError

Checkpoint = Annotated[
    Path,
    typer.Argument(
        help="Hugging Face checkpoint directory (config.json, *.safetensors), or a model id such as "
        "Qwen/Qwen2.5-0.5B-Instruct[@revision] (fetched into the Hugging Face cache; HF_HUB_OFFLINE=1: cache only)."
    ),
]
Output = Annotated[Path, typer.Option("--output", "-o", help="Artifact directory to create.")]
TargetOpt = Annotated[
    str,
    typer.Option(
        help="Engine: onnxruntime | openvino (a stateful OpenVINO IR plus tokenizer IR, loadable by "
        "openvino-genai) | tensorrt (standard-ONNX graph with fixed-capacity KV buffers and a build recipe; "
        "build the engine on the GPU with qwen-export build-engine)."
    ),
]
DTypeOpt = Annotated[
    str | None, typer.Option(help="Activation (and unquantized weight) precision: fp32 | fp16 (default fp32).")
]
Logits = Annotated[
    str,
    typer.Option(
        help="Logits for the last position (and, on request, the last k: speculative decoding) or all "
        "positions: last | all."
    ),
]
MaxLength = Annotated[
    int | None,
    typer.Option(
        help="Context the artifact is built for (default: the model's own, max_position_embeddings, or "
        "original x factor with YaRN). Beyond it needs --rope-scaling yarn."
    ),
]
RopeScaling = Annotated[
    str | None,
    typer.Option(
        help="RoPE scaling set at export, without editing the checkpoint: yarn (with --rope-factor) | none "
        "(drop the checkpoint's own). Default: the checkpoint's config.json."
    ),
]
RopeFactor = Annotated[
    float | None, typer.Option(help="YaRN factor: the context becomes factor x --rope-original-max (e.g. 4).")
]
RopeOriginalMax = Annotated[
    int | None,
    typer.Option(
        help="YaRN's original_max_position_embeddings (default: the checkpoint's, else max_position_embeddings)."
    ),
]
Overwrite = Annotated[bool, typer.Option(help="Replace OUTPUT if it exists.")]
Fuse = Annotated[
    bool,
    typer.Option(
        help="--target onnxruntime: fuse RMSNorm and attention into ONNX Runtime's contrib ops "
        "(SimplifiedLayerNormalization, GroupQueryAttention with rotary, packed QKV, one preallocated KV "
        "buffer); --no-fuse keeps plain ONNX ops and a KV cache that grows by concatenation. OpenVINO "
        "fuses itself when it compiles."
    ),
]
Strict = Annotated[
    bool,
    typer.Option(
        help="Fail when a fusion matches fewer times than the architecture requires; --no-strict exports "
        "what did fuse and leaves the rest unfused."
    ),
]
Explain = Annotated[
    bool, typer.Option("--explain", help="Print why the nearest match of each fusion rule failed (stderr).")
]
DumpDir = Annotated[
    Path | None, typer.Option(help="Write the model after each export phase into this directory (debugging).")
]
Weights = Annotated[
    str | None,
    typer.Option(
        help="Weight precision: fp32 | fp16 (the same as --dtype) | int8 | int4 (blockwise quantized linear "
        "weights; the embedding and a tied lm_head in int8; activations in --dtype)."
    ),
]
BlockSize = Annotated[
    int | None,
    typer.Option(
        help="Quantization block size: 32 | 64 | 128 (default 32) | 0 = per output channel (--target openvino "
        "or tensorrt; tensorrt quantizes int8 per channel anyway)."
    ),
]
Symmetric = Annotated[
    bool,
    typer.Option(
        "--symmetric",
        help="Quantize with zero point 0. Default: asymmetric for int4 where the target takes zero points "
        "(not tensorrt), symmetric for int8.",
    ),
]
Asymmetric = Annotated[bool, typer.Option("--asymmetric", help="Quantize with a zero point per block.")]
Algorithm = Annotated[
    str | None,
    typer.Option(
        help="Quantization algorithm: rtn | clip | awq | gptq | awq-gptq (the last three calibrated on "
        "--calibration). Default: gptq for int4 (about 4x an rtn export; rtn for speed), rtn for int8."
    ),
]
Keep = Annotated[str | None, typer.Option(help="Tensors kept in --dtype, comma-separated: embedding, lm_head.")]
KeepLayers = Annotated[str | None, typer.Option(help="Layer indices kept in --dtype, comma-separated (e.g. 0,23).")]
AccuracyLevel = Annotated[
    int | None,
    typer.Option(
        help="MatMulNBits activation accuracy: 0 unset | 1 fp32 | 2 fp16 | 3 bf16 | 4 int8 (default 4, fastest)."
    ),
]
Calibration = Annotated[
    Path | None,
    typer.Option(
        help="--algorithm awq|gptq|awq-gptq: calibration text: a UTF-8 file, or a directory of them (read in "
        "path order, up to 1 MiB; binary, hidden and linked files passed over); default: a built-in mixed text."
    ),
]
EmbeddingBits = Annotated[
    int | None,
    typer.Option(
        help="Bits of the quantized embedding (and a tied lm_head that shares it): 8 | 4 (smaller; with "
        "--algorithm gptq a tied table is quantized as the lm_head). Default for int4: 4 (8 for a tied model on "
        "tensorrt)."
    ),
]
Int8 = Annotated[
    list[str] | None,
    typer.Option(
        "--int8",
        help="int4 mixed precision: linear modules quantized to 8 bits instead, as glob patterns of checkpoint "
        "module names (repeatable or comma-separated), e.g. 'model.layers.*.mlp.down_proj' or lm_head; q/k/v "
        "with different bits stay three weights on onnxruntime (not one packed qkv_proj). Default for int4: "
        "'model.layers.*.self_attn.*' for an untied model, 'model.layers.*.self_attn.v_proj' for a tied one "
        "(not tensorrt; within optimum-intel's size); 'none': every linear at 4 bits.",
    ),
]
Block = Annotated[
    list[str] | None,
    typer.Option(
        "--block",
        help="Per-tensor block size PATTERN=SIZE (16 | 32 | 64 | 128; repeatable or comma-separated; first match "
        "wins): PATTERN is a glob of checkpoint module names as for --int8, or model.embed_tokens, e.g. lm_head=16. "
        "Default for int4 with a separate lm_head on onnxruntime: 'model.layers.*.self_attn.*=128', "
        "model.embed_tokens=128 (tensorrt refuses --block); 'none': every tensor at --block-size.",
    ),
]
BudgetOpt = Annotated[
    str | None,
    typer.Option(
        "--budget",
        help="int4 size budget for the weights: optimum-intel (the default where the target mixes bit widths: "
        "the size of optimum-intel's default int4 export of the checkpoint) | a size in MiB | none. The spare "
        "bytes put k_proj at 8 bits where v_proj is, then down_proj layer by layer in llama.cpp's Q4_K_M "
        "order (first and last eighths first); over it (3B and up), the MLP's blocks grow to 64 then 128, "
        "then 8-bit layers go back to 4 bits. 18% lower KL on the real Qwen2.5-Coder-1.5B (tied: 16%) with "
        "onnxruntime's log8 scales. Applied by default unless a layout option (--int8, --block, --keep, --keep-layers, "
        "--embedding-bits, --block-size) is given.",
    ),
]
ScalesOpt = Annotated[
    str | None,
    typer.Option(
        "--scales",
        help="How the files store 4-bit block scales: log8 (the int4 default on onnxruntime for asymmetric "
        "weights: a byte a block on a logarithmic grid per row, within 0.2-0.4% of the float value; ONNX "
        "Runtime computes float32 scales once at load) | float16 (two bytes a block). log8 frees about 5% "
        "of an int4 artifact for --budget to spend.",
    ),
]
VisionWeightsOpt = Annotated[
    str | None,
    typer.Option(
        "--vision-weights",
        help="A Qwen2-VL / Qwen2.5-VL checkpoint's vision tower: fp32 (default, exact) | int8 (per-column int8 "
        "linears, activations quantized at run time: a quarter of the bytes, about 3x faster to encode on a "
        "CPU with VNNI; features within 10% of fp32's; --target onnxruntime). OpenVINO runs an fp32 tower in bf16 "
        "on CPUs with native bf16 (about 2x faster, features within 2%) unless loaded with --precision f32.",
    ),
]
KVCacheExport = Annotated[
    str | None,
    typer.Option(
        "--kv-cache",
        help="--target onnxruntime: KV-cache element type fp32 (with --dtype fp32; the default, exact) | fp16 "
        "(with --dtype fp16) | int8 (a quarter of fp32's bytes: GroupQueryAttention's quantized cache, static "
        "per-channel scales calibrated on --calibration). OpenVINO chooses its KV precision "
        "at load (generate/bench --kv-cache).",
    ),
]
PrefillOpt = Annotated[
    str | None,
    typer.Option(
        "--prefill",
        help="--target onnxruntime with --weights int4/int8: none (default) | int8: also write an int8 prompt graph "
        "(prefill.onnx: q/k/v, o, gate and up as int8 GEMMs with smoothed, dynamically quantized activations). "
        "About 2x the prompt speed on a CPU with VNNI, for about one byte per weight of those projections more "
        "on disk and in memory; decoding is unchanged.",
    ),
]
MaxBatch = Annotated[
    int | None,
    typer.Option(help="--target tensorrt: largest batch of the engine's optimization profiles (default 1)."),
]


@app.command()
@handles_errors
def export(
    checkpoint: Checkpoint,
    output: Output,
    target: TargetOpt = "onnxruntime",
    dtype: DTypeOpt = None,
    logits: Logits = "last",
    max_length: MaxLength = None,
    rope_scaling: RopeScaling = None,
    rope_factor: RopeFactor = None,
    rope_original_max: RopeOriginalMax = None,
    overwrite: Overwrite = False,
    fuse: Fuse = True,
    strict: Strict = True,
    explain: Explain = False,
    dump_dir: DumpDir = None,
    weights: Weights = None,
    block_size: BlockSize = None,
    symmetric: Symmetric = False,
    asymmetric: Asymmetric = False,
    algorithm: Algorithm = None,
    keep: Keep = None,
    keep_layers: KeepLayers = None,
    accuracy_level: AccuracyLevel = None,
    calibration: Calibration = None,
    embedding_bits: EmbeddingBits = None,
    int8: Int8 = None,
    block: Block = None,
    budget: BudgetOpt = None,
    scales: ScalesOpt = None,
    max_batch: MaxBatch = None,
    kv_cache: KVCacheExport = None,
    vision_weights: VisionWeightsOpt = None,
    prefill: PrefillOpt = None,
) -> None:
    """Export CHECKPOINT to an engine artifact in OUTPUT (written atomically)."""
    if symmetric and asymmetric:
        raise OptionError("pass --symmetric or --asymmetric, not both")
    # the output is checked before the exporter's heavy imports (onnx, torch): a wrong -o fails at once
    check_output_dir(output, overwrite, keep=[p for p in (checkpoint, calibration, dump_dir) if p is not None])
    from qwen_export.export.hub import resolve_checkpoint
    from qwen_export.export.options import export_options

    checkpoint = resolve_checkpoint(checkpoint)  # a Hugging Face model id: its snapshot in the local cache
    options = export_options(
        checkpoint,
        target=target,
        weights=weights,
        dtype=dtype,
        block_size=block_size,
        symmetric=True if symmetric else False if asymmetric else None,
        algorithm=algorithm,
        keep=keep,
        keep_layers=keep_layers,
        accuracy_level=accuracy_level,
        embedding_bits=embedding_bits,
        int8=int8,
        block=block,
        budget=budget,
        scales=scales,
        calibration=calibration,
        logits=logits,
        max_length=max_length,
        rope_scaling=rope_scaling,
        rope_factor=rope_factor,
        rope_original_max=rope_original_max,
        max_batch=max_batch,
        kv_cache=kv_cache,
        vision_weights=vision_weights,
        prefill=prefill,
        fuse=fuse,
        strict=strict,
        explain=explain,
        dump_dir=dump_dir,
        overwrite=overwrite,
        message=lambda text: err_console.print(text, highlight=False),
    )
    manifest = export_with_progress(checkpoint, output, options)
    _print_summary(checkpoint, output, manifest)
    if dump_dir is not None:
        console.print(f"intermediate models written to {dump_dir}", highlight=False)


def _print_summary(checkpoint: Path, output: Path, manifest: Any) -> None:
    size = sum(p.stat().st_size for p in output.iterdir() if p.is_file())
    from qwen_export.quant.scheme import describe_weights

    precision = describe_weights(manifest.dtype, manifest.extra.get("quantization"))
    console.print(
        f"[green]exported[/] {checkpoint} -> {output}  ({manifest.target}, {precision}, "
        f"{size / 2**20:.1f} MiB, context {manifest.extra.get('max_length')})"
    )
    ctx_line = context_line(manifest.extra.get("context"), manifest.extra.get("kv_cache"))
    if ctx_line is not None:
        console.print(ctx_line, highlight=False, soft_wrap=True)
    kv_line = kv_cache_line(manifest.extra.get("kv_cache"))
    if kv_line is not None:
        console.print(kv_line, highlight=False, soft_wrap=True)


def export_with_progress(checkpoint: Path, output: Path, options: Any) -> Any:
    """Run the export pipeline with a progress bar on stderr; return the manifest."""
    from qwen_export.export import pipeline

    steps = {
        "load": "reading checkpoint",
        "calibrate": "calibrating",
        "trace": "tracing",
        "passes": "graph passes",
        "emit": "writing weights",
    }
    with byte_progress() as progress:
        task = progress.add_task("starting", total=None)

        def step(name: str) -> None:
            progress.update(task, description=steps.get(name, name), completed=0, total=None)

        def write(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        def message(text: str) -> None:  # e.g. --explain's reports: above the progress bar, on stderr
            end = "" if text.endswith("\n") else "\n"
            progress.console.print(text, end=end, markup=False, highlight=False, soft_wrap=True)

        hooks = pipeline.ExportHooks(step=step, write_progress=write, message=message)
        return pipeline.export(checkpoint, output, options, hooks)
