"""``qwen-export inspect``: an artifact's IO signature, op histogram, files, passes and KV cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from qwen_export.cli.common import app, console, handles_errors, kv_cache_line


@app.command()
@handles_errors
def inspect(
    artifact: Annotated[Path, typer.Argument(help="Exported artifact directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show an artifact's IO signature, op histogram, sizes and manifest."""
    from qwen_export.artifact import load_manifest
    from qwen_export.runtime.inspection import describe

    manifest = load_manifest(artifact, verify=True)
    info = describe(artifact, manifest)
    if as_json:
        console.print_json(json.dumps(info))
        return
    spec = manifest.spec
    console.print(
        f"[bold]{artifact}[/]  target={manifest.target} weights: {info['weights']}; logits={manifest.logits} "
        f"schema={manifest.schema_version} qwen-export {manifest.qwen_export_version}"
    )
    console.print(
        f"model: {spec['architecture']} layers={spec['num_hidden_layers']} hidden={spec['hidden_size']} "
        f"heads={spec['num_attention_heads']}/{spec['num_key_value_heads']} head_dim={spec['head_dim']} "
        f"vocab={spec['vocab_size']} tied={spec['tie_word_embeddings']} context={manifest.extra.get('max_length')}"
    )
    console.print(_io_table(manifest))
    console.print(_ops_table(info))
    console.print(_files_table(info))
    _print_details(artifact, manifest, info)


def _io_table(manifest: Any) -> Table:
    io = Table(title="IO signature")
    for column in ("direction", "name", "dtype", "shape"):
        io.add_column(column)
    for direction in ("inputs", "outputs"):
        items = list(manifest.io.get(direction, {}).items())
        shown = (
            items
            if len(items) <= 8
            else items[:5] + [("…", {"dtype": "", "shape": f"{len(items) - 6} more"})] + items[-1:]
        )
        for name, v in shown:
            io.add_row(direction, name, str(v.get("dtype")), str(v.get("shape")))
    return io


def _ops_table(info: dict[str, Any]) -> Table:
    ops = Table(title=f"op histogram ({info['nodes']} nodes)")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, n in info["ops"].items():
        ops.add_row(op, str(n))
    return ops


def _files_table(info: dict[str, Any]) -> Table:
    files = Table(title="files")
    files.add_column("file")
    files.add_column("MiB", justify="right")
    for name, size in info["files"].items():
        files.add_row(name, f"{size / 2**20:.2f}")
    return files


def _print_details(artifact: Path, manifest: Any, info: dict[str, Any]) -> None:
    """Passes (one line each, never wrapped: grep-friendly), KV cache, genai config, what the
    targets add (the registry's ``inspect_lines``) and the packages that exported it."""
    from qwen_export import targets

    for record in info["passes"]:
        console.print(
            f"pass {record['name']}: nodes {record['nodes']}, fired: {record['rules']}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    kv_line = kv_cache_line(manifest.extra.get("kv_cache"))
    console.print(kv_line or "KV cache: not recorded in manifest.json", highlight=False, soft_wrap=True)
    if info.get("genai") is not None:
        genai = info["genai"]
        console.print(
            f"onnxruntime-genai: genai_config.json (type {genai['type']}, max_length {genai['max_length']}, "
            f"past_present_share_buffer={str(genai['past_present_share_buffer']).lower()})",
            highlight=False,
            soft_wrap=True,
        )
    moe = info.get("moe")
    if moe is not None:
        shared = moe["shared_expert_intermediate_size"]
        console.print(
            f"mixture of experts: {moe['experts']} experts (intermediate {moe['expert_intermediate_size']}), "
            f"top-{moe['top_k']}{' renormalised' if moe['norm_topk_prob'] else ''}, "
            f"{'shared expert ' + str(shared) if shared else 'no shared expert'}; "
            f"{moe['sparse_layers']} sparse + {moe['dense_layers']} dense layers; parameters "
            f"{moe['total_params']:,} total, {moe['active_params_per_token']:,} active per token",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    for backend in targets.registered():
        for line in backend.inspect_lines(artifact, manifest):
            console.print(line, highlight=False, soft_wrap=True)
    console.print(f"packages: {manifest.packages}")
