"""Mean KL of artifacts against transformers' fp32 logits on the three evaluation texts (issue 18).

The texts every int4 accuracy figure in ``benchmarks/README.md`` since 2026-12-04 is measured on,
3,458 tokens in all, tokenized by the checkpoint's own tokenizer:

1. ``quant_real_text.txt`` (642 tokens);
2. the first 1,408 tokens of CPython's ``textwrap.py`` followed by ``heapq.py`` (Python; read from
   the running interpreter's standard library: 3.11 gives the figures in the README);
3. 704 tokens of ``rich``'s package description (its installed ``METADATA``: Markdown with badges
   and URLs) and 704 tokens of ``zlib.h`` from ``#define ZLIB_VERSION`` (C, long comments).

Reference logits come from ``transformers.AutoModelForCausalLM`` in float32 on each whole text
(cached in ``--workdir``: about 2 GB for the 1.5B); each artifact runs in its own process through
:func:`accuracy.run_eval` (``--chunk``-token chunks continuing the KV cache), and
:func:`accuracy.compare` gives the mean / p99 KL and top-1 agreement per text; pooled = weighted by
tokens. One JSON line per artifact::

    python benchmarks/three_texts.py --checkpoint CKPT --workdir W ART [ART ...] [--zlib-h /usr/include/zlib.h]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import sysconfig
from pathlib import Path
from typing import Any

import accuracy

HERE = Path(__file__).resolve().parent
TEXT2_TOKENS = 1408
TEXT3_HALF = 704


def texts(zlib_h: Path) -> list[str]:
    """The three texts (2 and 3 before their token cuts: see :func:`token_ids`)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    python = (stdlib / "textwrap.py").read_text() + (stdlib / "heapq.py").read_text()
    metadata = importlib.metadata.distribution("rich").read_text("METADATA") or ""
    description = metadata.split("\n\n", 1)[1]
    header = zlib_h.read_text(errors="replace")
    start = header.find("#define ZLIB_VERSION")
    if start < 0:
        raise SystemExit(f"{zlib_h}: no '#define ZLIB_VERSION' (pass --zlib-h with zlib's header)")
    return [(HERE / "quant_real_text.txt").read_text(), python, description, header[start:]]


def token_ids(checkpoint: Path, zlib_h: Path) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    enc = [tok.encode(t, add_special_tokens=False).ids for t in texts(zlib_h)]
    return [enc[0], enc[1][:TEXT2_TOKENS], enc[2][:TEXT3_HALF] + enc[3][:TEXT3_HALF]]


def references(checkpoint: Path, ids: list[Path], workdir: Path) -> list[Path]:
    """transformers' fp32 logits of each text (computed once per checkpoint and kept)."""
    import numpy as np

    out = [workdir / f"reference-{i + 1}.npy" for i in range(len(ids))]
    if all(p.exists() for p in out):
        return out
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    for path, text in zip(out, ids, strict=True):
        with torch.no_grad():
            logits = model(torch.from_numpy(np.load(text))[None]).logits[0].float().numpy()
        np.save(path, logits)
    return out


def evaluate(artifact: Path, refs: list[Path], ids: list[Path], workdir: Path, chunk: int) -> dict[str, Any]:
    import numpy as np

    per_text = []
    for i, (ref, text) in enumerate(zip(refs, ids, strict=True)):
        res = accuracy.evaluate(f"{artifact.name}-{i + 1}", "ours", artifact, ref, text, workdir, chunk=chunk)
        if "error" in res:
            raise SystemExit(f"{artifact}: {res['error']}")
        per_text.append(res)
    count = sum(r["positions"] for r in per_text)
    return {
        "artifact": str(artifact),
        "mean_kl": [round(r["mean_kl"], 4) for r in per_text],
        "p99_kl": [round(r["p99_kl"], 3) for r in per_text],
        "pooled_kl": round(
            float(np.dot([r["mean_kl"] for r in per_text], [r["positions"] for r in per_text])) / count, 4
        ),
        "top1": round(float(np.dot([r["top1"] for r in per_text], [r["positions"] for r in per_text])) / count, 4),
        "tokens": count,
    }


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifacts", nargs="+", type=Path, help="artifacts exported with --logits all")
    p.add_argument("--checkpoint", type=Path, required=True, help="the checkpoint they were exported from")
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--zlib-h", type=Path, default=Path("/usr/include/zlib.h"))
    p.add_argument("--chunk", type=int, default=128)
    args = p.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    owner = args.workdir / "checkpoint.txt"  # the cached references belong to one checkpoint
    if owner.exists() and owner.read_text() != str(args.checkpoint.resolve()):
        raise SystemExit(
            f"{args.workdir} holds another checkpoint's references ({owner.read_text()}): use another --workdir"
        )
    owner.write_text(str(args.checkpoint.resolve()))
    ids = []
    for i, seq in enumerate(token_ids(args.checkpoint, args.zlib_h)):
        ids.append(args.workdir / f"ids-{i + 1}.npy")
        np.save(ids[-1], np.asarray(seq, np.int64))
    refs = references(args.checkpoint, ids, args.workdir)
    for artifact in args.artifacts:
        print(json.dumps(evaluate(artifact, refs, ids, args.workdir, args.chunk)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
