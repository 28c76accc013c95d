"""``qwen-export chat``: an interactive multi-turn chat, optionally with tools, JSON output or raw text.

Line editing and history come from ``readline`` when stdin is a terminal. Ctrl-C while a reply is
streaming stops that reply (what was generated stays in the conversation) and keeps the session;
Ctrl-C at the prompt clears the line; Ctrl-D, ``/exit`` or ``/quit`` end it.
"""

from __future__ import annotations

import json
import sys
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
    console,
    err_console,
    handles_errors,
    load_llm,
    read_json,
    sampling_options,
    speculation,
)
from qwen_export.cli.generate import ImageOpt, response_format_option, user_content
from qwen_export.errors import OptionError


@app.command()
@handles_errors
def chat(
    artifact: Annotated[Path, typer.Argument(help="Exported artifact directory.")],
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    tools: Annotated[
        Path | None, typer.Option(help="JSON file with a list of tools (OpenAI function specs) the model may call.")
    ] = None,
    json_schema: Annotated[
        Path | None, typer.Option(help="JSON Schema file: every reply is constrained to validate against it.")
    ] = None,
    json_mode: Annotated[bool, typer.Option(help="Constrain every reply to be a JSON object.")] = False,
    raw: Annotated[
        bool, typer.Option(help="No chat template: each line continues one raw text (a base model's completion).")
    ] = False,
    max_new_tokens: MaxNew = 256,
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
    """Interactive multi-turn chat; earlier turns stay in the KV cache. Commands: /reset, /exit,
    and /image PATH (a VL artifact: the image goes with the next message).

    With --tools, the model's tool calls are printed as JSON and you type each tool's result.
    Ctrl-C stops the reply being written and keeps the conversation.
    """

    tool_specs = read_json(tools, "tools") if tools is not None else None
    if tool_specs is not None and not isinstance(tool_specs, list):
        raise OptionError(f"{tools}: expected a JSON list of tool specs")
    response_format = response_format_option(json_schema, json_mode)
    if raw and (tool_specs is not None or system is not None or think is not None or image):
        raise OptionError(
            "--raw has no chat template: it takes neither --tools, --system, --image nor --think/--no-think"
        )
    spec = speculation(speculate, max_draft_tokens)
    engine_flags = (threads, precision, kv_cache, cache_dir, engine, attention, spec)
    llm = load_llm(artifact, *engine_flags, prefill_chunk=prefill_chunk, int8_prefill=int8_prefill)
    sampling = sampling_options(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop)
    session = _Session(llm, system, tool_specs, response_format, sampling, think, raw)
    session.attach(image or [], artifact)
    enable_line_editing()
    err_console.print("[dim]chat: /reset starts over, /exit or Ctrl-D quits, Ctrl-C stops a reply[/]")
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        except KeyboardInterrupt:  # at the prompt: a fresh line, as a shell does
            sys.stdout.write("\n")
            continue
        except UnicodeDecodeError as exc:
            raise OptionError(f"stdin is not UTF-8 text (byte {exc.start} of a line); type UTF-8") from None
        command = line.strip()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            session.reset()
            err_console.print("[dim]conversation reset: the next message starts a new one[/]")
            continue
        if command.startswith("/image "):
            _attach_typed(session, command, artifact)
            continue
        if command and not session.turn(line):
            return


def _attach_typed(session: _Session, command: str, artifact: Path) -> None:
    """``/image PATH``: the image goes with the next message; a bad path is reported, the chat goes on."""
    try:
        session.attach([Path(command.removeprefix("/image ").strip())], artifact)
    except OptionError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)


def enable_line_editing() -> bool:
    """Line editing and history for ``input()`` when stdin is a terminal (readline, where it exists)."""
    if not sys.stdin.isatty():
        return False
    try:
        import readline  # noqa: F401 - importing it is what turns line editing on for input()
    except ImportError:  # e.g. Windows without pyreadline
        return False
    return True


class _Session:
    """The conversation (messages, or one raw text with --raw) and how each turn is run."""

    def __init__(
        self,
        llm: Any,
        system: str | None,
        tools: Any,
        response_format: Any,
        sampling: dict[str, Any],
        think: bool | None,
        raw: bool,
    ) -> None:
        self.llm, self.tools, self.response_format, self.raw = llm, tools, response_format, raw
        self.options = {**sampling, **({} if think is None else {"enable_thinking": think})}
        self.start: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        self.messages = list(self.start)
        self.text = ""  # --raw: the transcript so far
        self.images: list[Path] = []  # for the next user message

    def attach(self, images: list[Path], artifact: Path) -> None:
        """Images for the next user message (a VL artifact; OptionError otherwise or for a missing file)."""
        if images and self.raw:
            raise OptionError("/image needs the chat template; --raw has none")
        user_content(self.llm, "", images, artifact)  # refuses a text artifact
        for path in images:
            if not path.is_file():
                raise OptionError(f"image file not found: {path}")
        self.images += images

    def reset(self) -> None:
        self.messages, self.text = list(self.start), ""
        self.llm.reset()

    def turn(self, line: str) -> bool:
        """One user line; False when the input ends while a tool result is asked for."""
        if self.raw:
            self.text += line
            stream = self.llm.stream(self.text, response_format=self.response_format, **self.options)
            self.text += _show(stream, lambda piece: (None, piece))
            _reused(stream.result)
            return True
        self.messages.append({"role": "user", "content": user_content(self.llm, line, self.images, Path("."))})
        self.images = []
        while True:  # a reply with tool calls is followed by another once their results are typed
            stream = self.llm.chat_stream(self.messages, self.tools, self.response_format, **self.options)
            partial = _show(
                stream, lambda delta: (delta.kind.value, delta.text), hide_from="<tool_call>" if self.tools else None
            )
            result = stream.result
            if result is None:  # stopped by Ctrl-C: what was written stays in the conversation
                self.messages.append({"role": "assistant", "content": partial})
                return True
            self.messages.append(result.message())
            _reused(result)
            good = _print_tool_calls(result.tool_calls)
            if not good:
                return True
            try:
                for call in good:
                    content = _read_line(f"{call.name} result> ")
                    self.messages.append(
                        {"role": "tool", "tool_call_id": call.id, "name": call.name, "content": content}
                    )
            except EOFError:
                return False


def _show(stream: Any, split: Any, hide_from: str | None = None) -> str:
    """Print a stream as it comes (reasoning dimmed on stderr); Ctrl-C stops it. Returns the content.

    ``hide_from``: content from this marker on is not printed (tool-call blocks: printed parsed, after)."""
    content, shown = "", 0
    try:
        for item in stream:
            kind, text = split(item)
            if kind == "reasoning":
                err_console.print(text, style="dim", end="", highlight=False, markup=False)
                continue
            content += text
            end = _visible_end(content, hide_from)
            if end > shown:
                sys.stdout.write(content[shown:end])
                sys.stdout.flush()
                shown = end
    except KeyboardInterrupt:
        stream.close()
        sys.stdout.write("\n")
        err_console.print("[dim](reply stopped)[/]")
        return content
    sys.stdout.write(content[shown : _visible_end(content, hide_from, final=True)] + "\n")
    return content


def _visible_end(text: str, marker: str | None, final: bool = False) -> int:
    """How much of ``text`` may be printed: up to ``marker``, holding back a tail that may start it."""
    if marker is None:
        return len(text)
    at = text.find(marker)
    if at >= 0:
        return at
    if final:
        return len(text)
    held = next((n for n in range(min(len(marker) - 1, len(text)), 0, -1) if text.endswith(marker[:n])), 0)
    return len(text) - held


def _reused(result: Any) -> None:
    if result is not None:
        err_console.print(
            f"[dim]({result.reused_tokens} of {result.prompt_tokens} prompt tokens reused from the cache)[/]",
            highlight=False,
        )


def _print_tool_calls(calls: Any) -> list[Any]:
    """Print each parsed tool call as JSON; return the well-formed ones."""
    for call in calls:
        shown = (
            {"name": call.name, "arguments": call.arguments}
            if call.error is None
            else {"error": call.error, "raw": call.raw}
        )
        console.print_json(json.dumps({"tool_call": shown}))
    return [c for c in calls if c.error is None]


def _read_line(prompt: str) -> str:
    try:
        return input(prompt)
    except UnicodeDecodeError as exc:
        raise OptionError(f"stdin is not UTF-8 text (byte {exc.start} of a line); type UTF-8") from None
