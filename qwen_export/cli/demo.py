"""``qwen-export demo``: a tiny random checkpoint exported, chatted with and checked, no download."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from qwen_export.cli.common import app, console, handles_errors, print_parity, print_stream
from qwen_export.cli.export import export_with_progress
from qwen_export.spec import DType


@app.command()
@handles_errors
def demo(
    workdir: Annotated[Path | None, typer.Option(help="Keep the checkpoint and artifact here (default: temp).")] = None,
    prompt: Annotated[str, typer.Option(help="User message for the chat demo.")] = "Write a haiku about compilers.",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 24,
) -> None:
    """Build a tiny random Qwen2 checkpoint (no download), export it, chat with it, check parity."""
    from qwen_export.export import parity
    from qwen_export.export.options import export_options
    from qwen_export.export.tiny import make_checkpoint
    from qwen_export.runtime.llm import load

    root = Path(tempfile.mkdtemp(prefix="qwen-export-demo-")) if workdir is None else workdir
    try:
        root.mkdir(parents=True, exist_ok=True)
        ckpt, out = root / "tiny-qwen2", root / "tiny-qwen2-onnx"
        console.print(f"[bold]1. building a tiny random Qwen2 checkpoint[/] in {ckpt}")
        make_checkpoint(ckpt)
        console.print("[bold]2. exporting to ONNX Runtime[/] (fp32)")
        export_with_progress(ckpt, out, export_options(ckpt, overwrite=True))
        llm = load(out)
        messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": prompt}]
        console.print("[bold]3. chat[/] (the weights are random, so the text is noise)")
        console.print(f"[cyan]user:[/] {prompt}\n[cyan]assistant:[/] ", end="")
        stream = llm.stream(messages, max_new_tokens=max_new_tokens, temperature=0.0)
        print_stream(stream)
        result = stream.result
        assert result is not None
        console.print(
            f"[dim]{result.prompt_tokens} prompt + {result.completion_tokens} new tokens, "
            f"finish: {result.finish_reason.value}[/]"
        )
        console.print("[bold]4. parity against transformers[/]")
        report = parity.check(llm.engine, parity.Reference(ckpt), llm.tokenizer.encode(parity.DEFAULT_TEXT), DType.FP32)
        print_parity(report, "tiny Qwen2, fp32: qwen-export (ONNX Runtime) vs transformers")
        if not report.passed:
            raise typer.Exit(1)
        console.print(
            "[bold]5. quantization[/] is not part of the demo: "
            + (parity.toy_model_note(llm.artifact.manifest.spec, {"weights": "int4"}) or "").removeprefix("note: ")
            + " On a real checkpoint: qwen-export export CKPT -o OUT --weights int4, then "
            "qwen-export check OUT --reference OUT_FP32 (the fp32 export) or --reference CKPT.",
            highlight=False,
            markup=True,
        )
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)
