"""``qwen-export convert-gguf``: a llama.cpp GGUF file into a Hugging Face checkpoint directory."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from qwen_export.cli.common import app, byte_progress, console, handles_errors


@app.command("convert-gguf")
@handles_errors
def convert_gguf(
    gguf_file: Annotated[Path, typer.Argument(help="llama.cpp GGUF file of a Qwen2/2.5 or Qwen3 model.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Checkpoint directory to create.")],
    dtype: Annotated[str, typer.Option(help="Precision of the written weights: bf16 | fp16 | fp32.")] = "bf16",
    tokenizer_dir: Annotated[
        Path | None,
        typer.Option(help="Directory with the model's tokenizer.json (default: the bundled Qwen tokenizer)."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUTPUT if it is an existing checkpoint.")] = False,
) -> None:
    """Convert a GGUF file into a Hugging Face checkpoint directory (written atomically) for `export`."""
    from qwen_export.export.gguf_import import convert_gguf as run_convert

    t0 = time.perf_counter()
    with byte_progress() as progress:
        task = progress.add_task("reading GGUF", total=None)
        run_convert(
            gguf_file,
            output,
            dtype=dtype,
            tokenizer_dir=tokenizer_dir,
            overwrite=overwrite,
            progress=lambda done, total: progress.update(task, description="dequantizing", completed=done, total=total),
        )
    size = sum(p.stat().st_size for p in output.iterdir() if p.is_file())
    console.print(
        f"[green]converted[/] {gguf_file} -> {output}  ({dtype}, {size / 2**20:.1f} MiB, "
        f"{time.perf_counter() - t0:.1f} s)"
    )
