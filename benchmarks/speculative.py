"""Prompt-lookup speculative decoding vs plain decoding on one artifact: code editing and free text.

The tasks, each a chat prompt run greedily (the model's own stop tokens end it):

* ``docstring``: a source file, "add a one-line docstring to every function; reply with the whole
  file": the output mostly copies the input, which prompt lookup drafts from;
* ``rename``: the same file, "rename variable OLD to NEW" (OLD: the file's most frequent
  identifier unless ``--rename OLD:NEW``);
* ``free``: a short story, nothing to copy: speculation's overhead (the target: >= 0.95x).

Plain and speculative decoding share one engine and alternate on every round (warm-up rounds
first, not counted), each from an empty cache, so their ratio holds on a busy machine. Figures:
decode tok/s (tokens after the first over the time after the first token) and end-to-end tok/s
(tokens over the whole call, prefill included), with the ratio's median and min-max over rounds,
the acceptance rate, tokens per target forward, and whether every speculative output equals the
plain one (greedy: it must, up to near-ties: where one differs, the token and plain decoding's
gap between its two best logits there are reported). The artifact is a default ``--logits last``
export (speculation asks it for the last k+1 rows it verifies) or a ``--logits all`` one;
``--baseline`` adds plain decoding on another artifact of the same model (e.g. the same export made
by an earlier version, to see that plain decoding did not get slower, or a ``--logits all`` one,
whose prefill computes every prompt row's full-vocabulary logits).

    .venv/bin/python benchmarks/speculative.py ART [--baseline OTHER_ART] [--threads 2]
        [--source FILE] [--repeats 3] [--warmup 1] [--max-new-tokens 512] [--free-new-tokens 128]
        [--max-draft-tokens 8] [--json benchmarks/results/speculative.json]
"""

from __future__ import annotations

import argparse
import collections
import keyword
import re
import sys
from pathlib import Path
from typing import Any

import harness
import numpy as np

from qwen_export.errors import OptionError, QwenExportError
from qwen_export.runtime.generation import GenerationResult, Generator
from qwen_export.runtime.loader import LoadedArtifact, RuntimeOptions, open_artifact
from qwen_export.runtime.speculative import Speculation, make_speculator

DEFAULT_SOURCE = Path(__file__).resolve().parents[1] / "qwen_export" / "runtime" / "jsonsafe.py"
STORY = "Write a short story (about 300 words) about a lighthouse keeper who finds a message in a bottle."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact", type=Path, help="an artifact (--logits last, the default, or --logits all)")
    p.add_argument("--baseline", type=Path, help="another artifact of the same model, run plain")
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="the file the code-editing tasks edit")
    p.add_argument("--rename", help="OLD:NEW for the rename task (default: the file's most frequent identifier)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=512, help="code-editing tasks")
    p.add_argument("--free-new-tokens", type=int, default=128, help="the free-generation task")
    p.add_argument("--max-draft-tokens", type=int, default=8)
    p.add_argument("--tasks", default="docstring,rename,free")
    p.add_argument("--json", type=Path, help="write the report here")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    unknown = set(args.tasks.split(",")) - {"docstring", "rename", "free"}
    if unknown:
        p.error(f"unknown task(s) {sorted(unknown)}; valid: docstring, rename, free")
    if not args.source.is_file():
        p.error(f"--source {args.source}: not a file")
    return args


def most_frequent_identifier(source: str) -> str:
    words = re.findall(r"\b[a-z_][a-z0-9_]{3,}\b", source)
    skip = set(keyword.kwlist) | {"self", "none", "true", "false", "return", "from", "import"}
    counts = collections.Counter(w for w in words if w not in skip)
    if not counts:
        raise SystemExit("error: the source has no identifier to rename; pass --rename OLD:NEW")
    return counts.most_common(1)[0][0]


def tasks(args: argparse.Namespace) -> dict[str, tuple[str, int]]:
    """task name -> (user message, max new tokens)."""
    source = args.source.read_text(encoding="utf-8")
    old, new = args.rename.split(":", 1) if args.rename else (most_frequent_identifier(source), "renamed_value")
    block = f"```python\n{source}\n```"
    every = {
        "docstring": (
            "Add a one-line docstring to every function of this file that has none. Reply with the whole "
            f"updated file only, in one python code block.\n\n{block}",
            args.max_new_tokens,
        ),
        "rename": (
            f"Rename the variable `{old}` to `{new}` everywhere in this file. Reply with the whole updated file "
            f"only, in one python code block.\n\n{block}",
            args.max_new_tokens,
        ),
        "free": (STORY, args.free_new_tokens),
    }
    return {name: every[name] for name in args.tasks.split(",")}


def rates(result: GenerationResult) -> tuple[float, float]:
    """(decode tok/s, end-to-end tok/s) of one generation."""
    total = result.timings.time_to_first_token_s + result.timings.decode_s
    return result.decode_tokens_per_s or float("nan"), result.completion_tokens / total


def run_task(
    gens: dict[str, Generator], loaded: LoadedArtifact, prompt: list[int], new: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Every generator once per round, interleaved; the figures of the measured rounds."""
    config = loaded.generation_config(max_new_tokens=new, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)
    runs: dict[str, list[GenerationResult]] = {name: [] for name in gens}
    for i in range(args.warmup + args.repeats):
        for name, gen in gens.items():
            gen.reset()
            result = gen.generate_text(prompt, config)
            if i >= args.warmup:
                runs[name].append(result)
    plain = runs["plain"]
    out: dict[str, Any] = {"prompt_tokens": len(prompt), "tokens": [r.completion_tokens for r in plain]}
    for name, results in runs.items():
        decode = [rates(r)[0] for r in results]
        e2e = [rates(r)[1] for r in results]
        out[name] = {"decode_tok_s": harness.spread(decode), "end_to_end_tok_s": harness.spread(e2e)}
        if name != "plain":
            out[name]["decode_vs_plain"] = harness.spread(
                [rates(r)[0] / rates(p)[0] for r, p in zip(results, plain, strict=True)]
            )
            out[name]["end_to_end_vs_plain"] = harness.spread(
                [rates(r)[1] / rates(p)[1] for r, p in zip(results, plain, strict=True)]
            )
            out[name]["same_tokens"] = all(r.token_ids == p.token_ids for r, p in zip(results, plain, strict=True))
            differing = next((r for r, p in zip(results, plain, strict=True) if r.token_ids != p.token_ids), None)
            if differing is not None:
                first = divergence(loaded.engine, prompt, plain[0].token_ids, differing.token_ids)
                out[name]["first_difference"] = first
        stats = [r.speculation for r in results if r.speculation is not None]
        if stats:
            drafted = sum(s.drafted for s in stats)
            out[name]["acceptance_rate"] = sum(s.accepted for s in stats) / drafted if drafted else None
            out[name]["tokens_per_forward"] = sum(r.completion_tokens - 1 for r in results) / max(
                1, sum(s.steps for s in stats)
            )
    return out


def divergence(engine: Any, prompt: list[int], plain: list[int], other: list[int]) -> dict[str, Any]:
    """Where ``other`` first differs from plain decoding's ``plain`` (completion ids), and plain
    decoding's gap between its two best logits there, recomputed by one forward of the prompt and
    the agreed tokens: a near-tie that the verify forwards' different rounding can tip, or a real
    disagreement (a gap far above the engine's rounding)."""
    pairs = enumerate(zip(plain, other, strict=False))
    first = next((i for i, (a, b) in pairs if a != b), min(len(plain), len(other)))
    engine.reset()
    logits = engine.forward(np.asarray([prompt + list(plain[:first])], dtype=np.int64))[0, -1]
    engine.reset()
    top = np.sort(np.asarray(logits, dtype=np.float64))[-2:]
    return {"token": first, "plain_top2_gap": float(top[1] - top[0])}


def _fmt(s: dict[str, float]) -> str:
    return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"


def report_lines(name: str, row: dict[str, Any]) -> list[str]:
    lines = [f"{name}: prompt {row['prompt_tokens']} tokens, generated {row['tokens']}"]
    for gen in (k for k in row if isinstance(row[k], dict)):
        r = row[gen]
        line = f"  {gen:12s} decode tok/s {_fmt(r['decode_tok_s'])}, end-to-end tok/s {_fmt(r['end_to_end_tok_s'])}"
        if "decode_vs_plain" in r:
            line += f"; vs plain: decode x{_fmt(r['decode_vs_plain'])}, end-to-end x{_fmt(r['end_to_end_vs_plain'])}"
            line += f", same tokens: {r['same_tokens']}"
            if "first_difference" in r:
                diff = r["first_difference"]
                line += f" (from token {diff['token']}: plain's top-2 logit gap there {diff['plain_top2_gap']:.4f})"
        if r.get("acceptance_rate") is not None:
            line += f", accepted {r['acceptance_rate']:.0%}, {r['tokens_per_forward']:.2f} tokens/forward"
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        options = RuntimeOptions(threads=args.threads)
        loaded = open_artifact(args.artifact, options)
        speculation = Speculation(max_draft_tokens=args.max_draft_tokens)
        gens = {
            "plain": Generator(loaded.engine, loaded.tokenizer),
            "prompt-lookup": Generator(loaded.engine, loaded.tokenizer, make_speculator(speculation, loaded.engine)),
        }
        if args.baseline is not None:
            base = open_artifact(args.baseline, options)
            gens["baseline"] = Generator(base.engine, base.tokenizer)
        report: dict[str, Any] = {"artifact": str(args.artifact), "host": harness.host(), "tasks": {}}
        report["loadavg_start"] = harness.loadavg()
        for name, (message, new) in tasks(args).items():
            prompt = loaded.tokenizer.apply_chat_template_ids(
                [{"role": "user", "content": message}], max_tokens=loaded.engine.capabilities.max_context
            )
            context = min(g.engine.capabilities.max_context for g in gens.values())
            if len(prompt) + new > context:
                raise OptionError(
                    f"task {name}: {len(prompt)} prompt + {new} new tokens exceed the context of {context}; "
                    "pass a shorter --source or fewer new tokens"
                )
            harness.log(f"{name}: {len(prompt)} prompt tokens, up to {new} new, {args.repeats} round(s)")
            row = run_task(gens, loaded, prompt, new, args)
            report["tasks"][name] = row
            for line in report_lines(name, row):
                print(line, flush=True)
        report["loadavg_end"] = harness.loadavg()
    except QwenExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json is not None:
        harness.write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
