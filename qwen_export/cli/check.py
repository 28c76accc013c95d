"""``qwen-export check``: parity of an artifact against transformers on its source checkpoint, or
against another artifact (e.g. an int4 export against the fp32 one: no transformers, no checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from qwen_export.cli.common import (
    AttentionOpt,
    CacheDir,
    EngineOpt,
    Int8Prefill,
    KVCache,
    Precision,
    PrefillChunk,
    Threads,
    app,
    console,
    err_console,
    handles_errors,
    print_parity,
    read_text,
    runtime,
)
from qwen_export.errors import OptionError
from qwen_export.spec import DType, ModelSpec


@app.command()
@handles_errors
def check(
    artifact: Annotated[Path, typer.Argument(help="Exported artifact directory.")],
    reference: Annotated[
        Path,
        typer.Option(
            help="Source checkpoint (transformers runs it as the reference), or another artifact of the same model "
            "(e.g. the fp32 export; run by its own engine)."
        ),
    ],
    text: Annotated[Path | None, typer.Option(help="UTF-8 text file to evaluate on (default: built-in).")] = None,
    max_tokens: Annotated[int, typer.Option(help="Evaluate at most this many tokens of the text.")] = 128,
    greedy_tokens: Annotated[int, typer.Option(help="Greedy continuation length compared.")] = 16,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    threads: Threads = 0,
    precision: Precision = None,
    kv_cache: KVCache = None,
    attention: AttentionOpt = None,
    cache_dir: CacheDir = None,
    engine: EngineOpt = None,
    prefill_chunk: PrefillChunk = None,
    int8_prefill: Int8Prefill = True,
    image: Annotated[
        Path | None,
        typer.Option(help="A VL artifact: the image of the evaluation prompt (default: a built-in test image)."),
    ] = None,
) -> None:
    """Compare ARTIFACT with REFERENCE (transformers on a checkpoint, or another artifact); exit 1 past
    the thresholds of ARTIFACT's precision."""
    from qwen_export.export import parity
    from qwen_export.runtime.loader import open_artifact

    if max_tokens < 2 or greedy_tokens < 1:
        raise OptionError("--max-tokens must be >= 2 and --greedy-tokens >= 1")
    loaded = open_artifact(
        artifact, runtime(threads, precision, kv_cache, cache_dir, engine, attention, prefill_chunk, int8_prefill)
    )
    content = read_text(text) if text is not None else parity.DEFAULT_TEXT
    if getattr(loaded.engine, "multimodal", None) is not None:
        _check_vision(loaded, reference, image, content, max_tokens, greedy_tokens, artifact, as_json)
        return
    if image is not None:
        raise OptionError(f"{artifact} is not a vision-language artifact: --image needs a Qwen2-VL / Qwen2.5-VL export")
    ids = loaded.tokenizer.encode(content)[:max_tokens]
    quantized = loaded.manifest.extra.get("quantization")
    context = loaded.manifest.extra.get("context") or {}
    rope = ModelSpec.from_dict(loaded.manifest.spec) if context.get("rope_override") else None
    if (reference / "manifest.json").is_file():
        ref: parity.Reference | parity.ArtifactReference = _artifact_reference(
            reference, loaded, content, max_tokens, threads
        )
        against = f"artifact {reference}"
    else:
        # --rope-scaling at export: the reference runs it too
        ref, against = parity.Reference(reference, rope=rope), "transformers"
    kv_dtype = (loaded.manifest.extra.get("kv_cache") or {}).get("dtype")
    dtype = DType.parse(loaded.manifest.dtype)
    limits = parity.thresholds_for(dtype, quantized, kv_dtype)
    report = parity.check(loaded.engine, ref, ids, dtype, greedy_tokens, thresholds=limits)
    if as_json:
        console.print_json(json.dumps(parity.to_dict(report)))
    else:
        shown = loaded.manifest.dtype + (f", {quantized['weights']} weights" if quantized else "")
        shown += f", {kv_dtype} KV cache" if kv_dtype else ""
        print_parity(report, f"parity: {artifact} vs {against} ({shown})")
    if not report.passed:
        err_console.print(f"[bold red]parity FAILED:[/] {'; '.join(report.failures)}", highlight=False)
        note = parity.toy_model_note(loaded.manifest.spec, quantized)
        if note is not None:
            err_console.print(note, highlight=False, markup=False)
        raise typer.Exit(1)


def _check_vision(
    loaded: Any, reference: Path, image: Path | None, content: str, max_tokens: int, greedy: int, artifact: Path,
    as_json: bool,
) -> None:  # fmt: skip
    """``check`` of a VL artifact against transformers: vision features, then the decoder on the
    image-and-text prompt (see :mod:`qwen_export.export.parity_vl`)."""
    import dataclasses

    from qwen_export.export import parity, parity_vl

    if (reference / "manifest.json").is_file():
        raise OptionError("a vision-language artifact is checked against its checkpoint (transformers) only")
    picture = image if image is not None else parity_vl.builtin_image()
    prompt = parity_vl.vision_prompt(loaded, picture, content, max_tokens)
    multimodal = loaded.engine.multimodal
    ref = parity_vl.VisionReference(reference, prompt.patches, multimodal.spec)
    quantized = loaded.manifest.extra.get("quantization")
    int8_tower = (loaded.manifest.extra.get("multimodal") or {}).get("vision_weights") == "int8"
    half_tower = getattr(loaded.engine, "tower_precision", "f32") != "f32"  # OpenVINO's bf16/f16 tower
    # an int8 (or bf16) tower's features move the decoder's logits as int8 weights would
    weights = quantized if quantized or not (int8_tower or half_tower) else {"weights": "int8"}
    limits = parity.thresholds_for(DType.parse(loaded.manifest.dtype), weights)
    report = parity.check(loaded.engine, ref, prompt.ids, DType.parse(loaded.manifest.dtype), greedy, limits,
                          greedy_prompt=prompt.ids)  # fmt: skip
    report = dataclasses.replace(
        report,
        vision_relative_error=parity_vl.vision_error(loaded.engine, ref, prompt),
        max_vision_relative_error=parity_vl.tower_limit(int8_tower, half_tower, report.max_vision_relative_error),
    )
    if as_json:
        console.print_json(json.dumps(parity.to_dict(report)))
    else:
        shown = loaded.manifest.dtype + (f", {quantized['weights']} weights" if quantized else "")
        print_parity(report, f"parity: {artifact} vs transformers, image {prompt.patches.grid_thw} + text ({shown})")
    if not report.passed:
        err_console.print(f"[bold red]parity FAILED:[/] {'; '.join(report.failures)}", highlight=False)
        note = parity.toy_model_note(loaded.manifest.spec, weights)
        if note is not None:
            err_console.print(note, highlight=False, markup=False)
        raise typer.Exit(1)


def _artifact_reference(reference: Path, loaded: Any, content: str, max_tokens: int, threads: int) -> Any:
    """The other artifact as the reference, after checking it reads the text as the same tokens."""
    from qwen_export.export.parity import ArtifactReference
    from qwen_export.runtime.loader import open_artifact

    other = open_artifact(reference, runtime(threads, None, None, None, None, None))
    if other.tokenizer.encode(content)[:max_tokens] != loaded.tokenizer.encode(content)[:max_tokens]:
        raise OptionError(f"{reference}: its tokenizer reads the text differently; compare artifacts of one model")
    mine, theirs = loaded.engine.capabilities.vocab_size, other.engine.capabilities.vocab_size
    if mine != theirs:
        raise OptionError(f"{reference}: vocabulary of {theirs} logits, the artifact has {mine}; not the same model")
    return ArtifactReference(other.engine, str(reference))
