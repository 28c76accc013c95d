"""``qwen-export generate``: one completion, streamed to the terminal."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from qwen_export.cli.common import (
    AttentionOpt,
    CacheDir,
    EngineOpt,
    Int8Prefill,
    KVCache,
    MaxDraftOpt,
    MaxNew,
    MinP,
    Precision,
    PrefillChunk,
    RepPen,
    Seed,
    SpeculateOpt,
    Stop,
    Temp,
    Think,
    Threads,
    TopK,
    TopP,
    app,
    err_console,
    handles_errors,
    load_llm,
    print_stream,
    read_json,
    sampling_options,
    speculation,
)
from qwen_export.errors import OptionError

ImageOpt = Annotated[
    list[Path] | None,
    typer.Option(help="An image file for a Qwen2-VL / Qwen2.5-VL artifact (repeatable): before the (first) message."),
]


@app.command()
@handles_errors
def generate(
    artifact: Annotated[Path, typer.Argument(help="Exported artifact directory.")],
    prompt: Annotated[str, typer.Argument(help="Prompt text (a user message unless --raw).")],
    raw: Annotated[bool, typer.Option(help="Feed PROMPT as is, without the chat template.")] = False,
    system: Annotated[str | None, typer.Option(help="System prompt (chat template).")] = None,
    json_schema: Annotated[
        Path | None, typer.Option(help="JSON Schema file: the output is constrained to validate against it.")
    ] = None,
    json_mode: Annotated[bool, typer.Option(help="Constrain the output to be a JSON object.")] = False,
    max_new_tokens: MaxNew = 128,
    temperature: Temp = None,
    top_k: TopK = None,
    top_p: TopP = None,
    min_p: MinP = None,
    repetition_penalty: RepPen = None,
    seed: Seed = None,
    stop: Stop = None,
    threads: Threads = 0,
    precision: Precision = None,
    kv_cache: KVCache = None,
    attention: AttentionOpt = None,
    cache_dir: CacheDir = None,
    engine: EngineOpt = None,
    prefill_chunk: PrefillChunk = None,
    int8_prefill: Int8Prefill = True,
    speculate: SpeculateOpt = None,
    max_draft_tokens: MaxDraftOpt = None,
    think: Think = None,
    image: ImageOpt = None,
) -> None:
    """Generate a completion for PROMPT, streamed to the terminal.

    With --json-schema / --json-mode the exit status is 1 when the document did not close (the
    token limit or the context came first): the text printed is then a prefix, not valid JSON.
    """

    if image and raw:
        raise OptionError("--image needs the chat template; drop --raw")
    spec = speculation(speculate, max_draft_tokens)
    llm = load_llm(
        artifact,
        threads,
        precision,
        kv_cache,
        cache_dir,
        engine,
        attention,
        spec,
        prefill_chunk=prefill_chunk,
        int8_prefill=int8_prefill,
    )
    sampling = sampling_options(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop)
    response_format = response_format_option(json_schema, json_mode)
    if raw:
        if think is not None:
            raise OptionError("--think/--no-think apply to the chat template; --raw feeds the prompt without it")
        source: Any = prompt
    else:
        content = user_content(llm, prompt, image or [], artifact)
        source = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    stream = llm.stream(source, response_format=response_format, enable_thinking=think, **sampling)
    print_stream(stream)
    result = stream.result
    assert result is not None
    err_console.print(
        f"[dim]{result.prompt_tokens} prompt + {result.completion_tokens} new tokens, "
        f"finish: {result.finish_reason.value}, TTFT {result.timings.time_to_first_token_s * 1e3:.0f} ms, "
        f"decode {result.decode_tokens_per_s or 0:.1f} tok/s{_speculation_note(result)}[/]",
        highlight=False,
    )
    if not result.complete:
        err_console.print(
            f"[bold red]error:[/] the JSON document is incomplete: generation ended with "
            f"'{result.finish_reason.value}' after {result.completion_tokens} tokens before the document closed "
            "(raise --max-new-tokens); the text above does not parse",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1)


def user_content(llm: Any, prompt: str, images: list[Path], artifact: Path) -> Any:
    """A user message's content: PROMPT, after the ``--image`` files' parts when there are any."""
    if not images:
        return prompt
    if llm.multimodal is None:
        raise OptionError(f"{artifact} is not a vision-language artifact: --image needs a Qwen2-VL / Qwen2.5-VL export")
    return [*({"type": "image", "image": path} for path in images), {"type": "text", "text": prompt}]


def _speculation_note(result: Any) -> str:
    stats = result.speculation
    if stats is None:
        return ""
    rate = "n/a" if stats.acceptance_rate is None else f"{stats.acceptance_rate:.0%}"
    return f", speculation: {stats.accepted}/{stats.drafted} drafts accepted ({rate}) in {stats.steps} forwards"


def response_format_option(json_schema: Path | None, json_mode: bool) -> dict[str, Any] | None:
    if json_schema is not None and json_mode:
        raise OptionError("pass either --json-schema or --json-mode, not both")
    if json_schema is not None:
        schema = read_json(json_schema, "JSON Schema")
        return {"type": "json_schema", "json_schema": {"name": json_schema.stem, "schema": schema}}
    return {"type": "json_object"} if json_mode else None
