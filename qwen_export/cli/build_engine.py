"""``qwen-export build-engine``: build a --target tensorrt artifact's engine on this machine's GPU."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qwen_export.cli.common import app, console, err_console, handles_errors


@app.command("build-engine")
@handles_errors
def build_engine(
    artifact: Annotated[Path, typer.Argument(help="A --target tensorrt artifact directory.")],
    max_batch: Annotated[int | None, typer.Option(help="Largest batch (default: the export's recipe).")] = None,
    max_prompt: Annotated[
        int | None,
        typer.Option(help="Longest prompt run in one prefill (default: the recipe's, min(KV capacity, 2048))."),
    ] = None,
    workspace_mib: Annotated[int | None, typer.Option(help="Builder workspace in MiB (default 4096).")] = None,
    optimization_level: Annotated[
        int, typer.Option(help="TensorRT builder optimization level 0 (fast build) .. 5 (best engine).")
    ] = 3,
    timing_cache: Annotated[bool, typer.Option(help="Reuse and update engines/timing.cache (faster rebuilds).")] = True,
    device: Annotated[int, typer.Option(help="CUDA device index to build for.")] = 0,
) -> None:
    """Build the TensorRT engine of ARTIFACT for this machine's GPU (engines/<gpu>-<trt>.plan).

    Engines are specific to the GPU and the TensorRT version; run this where the engine will run.
    """
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from qwen_export.targets.tensorrt.build import BuildOptions
    from qwen_export.targets.tensorrt.build import build_engine as build

    options = BuildOptions(
        max_batch=max_batch,
        max_prompt=max_prompt,
        workspace=None if workspace_mib is None else workspace_mib << 20,
        timing_cache=timing_cache,
        optimization_level=optimization_level,
        device=device,
    )
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task("building TensorRT engine", total=4)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        plan = build(artifact, options, progress, message=lambda text: bar.console.print(text, highlight=False))
    console.print(f"[green]built[/] {plan}", highlight=False)
