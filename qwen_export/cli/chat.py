"""``qwen-export chat``: an interactive multi-turn chat, optionally with tools."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from qwen_export.cli.common import (
    AttentionOpt,
    CacheDir,
    EngineOpt,
    KVCache,
    MaxDraftOpt,
    MaxNew,
    MinP,
    Precision,
    PrefillChunk,
    RepPen,
    Seed,
    SpeculateOpt,
    Temp,
    Threads,
    TopK,
    TopP,
    app,
    console,
    err_console,
    handles_errors,
    load_llm,
    print_stream,
    read_json,
    sampling_options,
    speculation,
)
from qwen_export.errors import OptionError


@app.command()
@handles_errors
def chat(
    artifact: Annotated[Path, typer.Argument(help="Exported artifact directory.")],
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    tools: Annotated[
        Path | None, typer.Option(help="JSON file with a list of tools (OpenAI function specs) the model may call.")
    ] = None,
    max_new_tokens: MaxNew = 256,
    temperature: Temp = None,
    top_k: TopK = None,
    top_p: TopP = None,
    min_p: MinP = None,
    repetition_penalty: RepPen = None,
    seed: Seed = None,
    threads: Threads = 0,
    precision: Precision = None,
    kv_cache: KVCache = None,
    attention: AttentionOpt = None,
    cache_dir: CacheDir = None,
    engine: EngineOpt = None,
    prefill_chunk: PrefillChunk = None,
    speculate: SpeculateOpt = None,
    max_draft_tokens: MaxDraftOpt = None,
) -> None:
    """Interactive multi-turn chat; earlier turns stay in the KV cache. Commands: /reset, /exit.

    With --tools, the model's tool calls are printed as JSON and you type each tool's result.
    """

    tool_specs = read_json(tools, "tools") if tools is not None else None
    if tool_specs is not None and not isinstance(tool_specs, list):
        raise OptionError(f"{tools}: expected a JSON list of tool specs")
    spec = speculation(speculate, max_draft_tokens)
    llm = load_llm(
        artifact, threads, precision, kv_cache, cache_dir, engine, attention, spec, prefill_chunk=prefill_chunk
    )
    sampling = sampling_options(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, None)
    start: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    err_console.print("[dim]chat: /reset starts over, /exit or Ctrl-D quits[/]")
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        except UnicodeDecodeError as exc:
            raise OptionError(f"stdin is not UTF-8 text (byte {exc.start} of a line); type UTF-8") from None
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages = list(start)
            llm.reset()
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        turn = _plain_turn if tool_specs is None else _tool_turns
        if not turn(llm, messages, tool_specs, sampling):
            return


def _plain_turn(llm: Any, messages: list[dict[str, Any]], tool_specs: Any, sampling: dict[str, Any]) -> bool:
    """Stream the reply as it is generated; append it to ``messages``."""
    stream = llm.stream(messages, **sampling)
    messages.append({"role": "assistant", "content": print_stream(stream)})
    assert stream.result is not None
    err_console.print(
        f"[dim]({stream.result.reused_tokens} of {stream.result.prompt_tokens} prompt tokens reused from the cache)[/]",
        highlight=False,
    )
    return True


def _tool_turns(llm: Any, messages: list[dict[str, Any]], tool_specs: Any, sampling: dict[str, Any]) -> bool:
    """One user turn may take several assistant turns when tools are called; the user types each
    tool's result. False when the input ends (EOF while a result is asked for)."""
    while True:
        result = llm.chat(messages, tools=tool_specs, **sampling)
        console.print(result.text, highlight=False, markup=False)
        messages.append(result.message())
        err_console.print(
            f"[dim]({result.reused_tokens} of {result.prompt_tokens} prompt tokens reused from the cache)[/]",
            highlight=False,
        )
        for call in result.tool_calls:
            shown = (
                {"name": call.name, "arguments": call.arguments}
                if call.error is None
                else {"error": call.error, "raw": call.raw}
            )
            console.print_json(json.dumps({"tool_call": shown}))
        good = [c for c in result.tool_calls if c.error is None]
        if not good:
            return True
        try:
            for call in good:
                messages.append({"role": "tool", "name": call.name, "content": _read_line(f"{call.name} result> ")})
        except EOFError:
            return False


def _read_line(prompt: str) -> str:
    try:
        return input(prompt)
    except UnicodeDecodeError as exc:
        raise OptionError(f"stdin is not UTF-8 text (byte {exc.start} of a line); type UTF-8") from None
