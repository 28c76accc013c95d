"""``qwen-export check``: parity of an artifact against transformers on its source checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from qwen_export.cli.common import (
    AttentionOpt,
    CacheDir,
    EngineOpt,
    KVCache,
    Precision,
    PrefillChunk,
    Threads,
    app,
    console,
    err_console,
    handles_errors,
    print_parity,
    runtime,
)
from qwen_export.errors import OptionError
from qwen_export.spec import DType, ModelSpec


@app.command()
@handles_errors
def check(
    artifact: Annotated[Path, typer.Argument(help="Exported artifact directory.")],
    reference: Annotated[Path, typer.Option(help="Source checkpoint (transformers runs it as the reference).")],
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
) -> None:
    """Compare ARTIFACT with transformers on REFERENCE; exit 1 past the precision's thresholds."""
    from qwen_export.export import parity
    from qwen_export.runtime.loader import open_artifact

    if max_tokens < 2 or greedy_tokens < 1:
        raise OptionError("--max-tokens must be >= 2 and --greedy-tokens >= 1")
    loaded = open_artifact(artifact, runtime(threads, precision, kv_cache, cache_dir, engine, attention, prefill_chunk))
    content = _read_text(text) if text is not None else parity.DEFAULT_TEXT
    ids = loaded.tokenizer.encode(content)[:max_tokens]
    quantized = loaded.manifest.extra.get("quantization")
    context = loaded.manifest.extra.get("context") or {}
    rope = ModelSpec.from_dict(loaded.manifest.spec) if context.get("rope_override") else None
    report = parity.check(
        loaded.engine,
        parity.Reference(reference, rope=rope),  # --rope-scaling at export: the reference runs it too
        ids,
        DType.parse(loaded.manifest.dtype),
        greedy_tokens,
        quantization=quantized,
    )
    if as_json:
        console.print_json(json.dumps(parity.to_dict(report)))
    else:
        shown = loaded.manifest.dtype + (f", {quantized['weights']} weights" if quantized else "")
        print_parity(report, f"parity: {artifact} vs transformers ({shown})")
    if not report.passed:
        err_console.print(f"[bold red]parity FAILED:[/] {'; '.join(report.failures)}", highlight=False)
        raise typer.Exit(1)


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise OptionError(f"{path}: text file not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise OptionError(f"{path}: not UTF-8 text") from None
