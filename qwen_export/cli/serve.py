"""``qwen-export serve``: the OpenAI-compatible HTTP server (FastAPI + uvicorn, the ``serve`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qwen_export.artifact import MANIFEST_NAME
from qwen_export.cli.common import (
    AttentionOpt,
    CacheDir,
    EngineOpt,
    KVCache,
    Precision,
    PrefillChunk,
    Threads,
    app,
    err_console,
    handles_errors,
    runtime,
)
from qwen_export.errors import ArtifactError

#: ``serve --image-root``
ImageRoot = Annotated[
    Path | None,
    typer.Option(
        help="VL artifacts: requests may name image files under DIR (default: data URLs only).", metavar="DIR"
    ),
]


@app.command()
@handles_errors
def serve(
    artifact: Annotated[Path, typer.Argument(help="Exported artifact directory.")],
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = 8000,
    max_queue: Annotated[
        int, typer.Option(min=0, help="Requests that may wait while the batch is full; more get HTTP 429.")
    ] = 64,
    max_batch: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Requests decoded together (continuous batching; default 8 where the engine can batch, else 1). "
            "1: one at a time, with the prefix cache across turns.",
        ),
    ] = None,
    ray: Annotated[
        bool, typer.Option("--ray", help="Deploy on Ray Serve (the 'ray' extra): --replicas copies behind Ray's proxy.")
    ] = False,
    replicas: Annotated[int, typer.Option(min=1, help="--ray: replicas of the deployment.")] = 1,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="QWEN_EXPORT_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1/* (401 without)."),
    ] = None,
    model_name: Annotated[
        str | None, typer.Option(help="The model id clients send (default: the artifact directory's name).")
    ] = None,
    image_root: ImageRoot = None,
    threads: Threads = 0,
    precision: Precision = None,
    kv_cache: KVCache = None,
    attention: AttentionOpt = None,
    cache_dir: CacheDir = None,
    engine: EngineOpt = None,
    prefill_chunk: PrefillChunk = None,
) -> None:
    """Serve ARTIFACT over HTTP with OpenAI's API: /v1/chat/completions, /v1/completions, /v1/models,
    plus /health and /metrics (Prometheus). The model loads in the background (503 until then);
    up to --max-batch requests decode together (continuous batching), the others wait in arrival order.
    --ray deploys the same app on Ray Serve with --replicas copies (a local Ray, or the cluster
    RAY_ADDRESS names)."""
    from qwen_export.serve import require_serve_extra

    require_serve_extra()
    from qwen_export.serve.images import ImagePolicy

    if not (artifact / MANIFEST_NAME).is_file():
        raise ArtifactError(
            f"{artifact} is not an exported artifact (no {MANIFEST_NAME}); run `qwen-export export` first"
        )
    runtime(
        threads, precision, kv_cache, cache_dir, engine, attention, prefill_chunk
    )  # bad engine options: fail before listening
    given = {
        "engine": engine,
        "threads": threads,
        "precision": precision,
        "kv_cache": kv_cache,
        "attention": attention,
        "cache_dir": cache_dir,
        "prefill_chunk": prefill_chunk,
    }
    options = {k: v for k, v in given.items() if v is not None}
    ImagePolicy(image_root)  # a bad --image-root fails before listening
    settings = {"api_key": api_key, "max_queue": max_queue, "model_name": model_name, "max_batch": max_batch}
    settings["image_root"] = image_root
    if ray:
        from qwen_export.serve.ray import serve_on_ray

        serve_on_ray(artifact, replicas=replicas, host=host, port=port, load_options=options, **settings)
        return
    import uvicorn

    from qwen_export.serve.app import create_app

    server = create_app(artifact, load_options=options, **settings)
    err_console.print(f"serving {artifact} on http://{host}:{port}/v1 (Ctrl-C stops)", highlight=False)
    uvicorn.run(server, host=host, port=port, log_level="info")
