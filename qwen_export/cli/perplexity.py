"""``qwen-export perplexity``: an artifact's perplexity on a text, reference-free (llama-perplexity's
measure): no transformers, no checkpoint, any engine."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from qwen_export.cli.common import (
    AttentionOpt,
    CacheDir,
    EngineOpt,
    KVCache,
    Precision,
    Threads,
    app,
    console,
    err_console,
    handles_errors,
    read_text,
    runtime,
)
from qwen_export.errors import OptionError


@app.command()
@handles_errors
def perplexity(
    artifact: Annotated[Path, typer.Argument(help="Exported artifact directory.")],
    text: Annotated[Path, typer.Option(help="UTF-8 text file to evaluate on.")],
    window: Annotated[
        int | None, typer.Option(help="Tokens per evaluation window (default: min(512, the artifact's context)).")
    ] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Evaluate at most this many tokens of the text.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    threads: Threads = 0,
    precision: Precision = None,
    kv_cache: KVCache = None,
    attention: AttentionOpt = None,
    cache_dir: CacheDir = None,
    engine: EngineOpt = None,
) -> None:
    """Perplexity of ARTIFACT on a text (windows from an empty cache, every token but each window's first
    scored), with its standard error: comparable across quantizations of one model on one text."""
    from qwen_export.runtime.loader import open_artifact
    from qwen_export.runtime.perplexity import perplexity as measure

    if max_tokens is not None and max_tokens < 2:
        raise OptionError(f"--max-tokens must be >= 2, got {max_tokens}")
    content = read_text(text)
    loaded = open_artifact(artifact, runtime(threads, precision, kv_cache, cache_dir, engine, attention))
    ids = loaded.tokenizer.encode(content)[:max_tokens]
    size = window if window is not None else min(512, loaded.engine.capabilities.max_context)
    with err_console.status(f"scoring {len(ids)} tokens"):
        report = measure(loaded.engine, ids, size)
    if as_json:
        console.print_json(json.dumps({"artifact": str(artifact), "text": str(text), **dataclasses.asdict(report)}))
        return
    table = Table(title=f"perplexity: {artifact} on {text}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for row in report.rows():
        table.add_row(*row)
    console.print(table)
