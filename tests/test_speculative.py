"""Speculative decoding (``qwen_export/runtime/speculative.py``).

The acceptance rule is tested on numpy distributions (cheap, statistical); the engines on the tiny
artifacts the parity suite already exports (``--logits all`` and the default ``--logits last``,
whose last k rows are asked for), in the parity suite's per-engine groups, so no export is added:
greedy speculative output must be plain greedy output token for token, with drafts both accepted
and rejected (rolled back).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from noise import Noise, check_logits
from test_cli import _one_line_error, invoke
from test_parity import ENGINES, _exported, _open

from qwen_export.errors import GenerationError, OptionError
from qwen_export.runtime import generation
from qwen_export.runtime.generation import GenerationConfig, Generator, sample_token
from qwen_export.runtime.loader import open_artifact
from qwen_export.runtime.speculative import (
    DraftModel,
    Speculation,
    SpeculationKind,
    Speculator,
    _greedy_verify,
    accept_draft,
    lookup_draft,
    make_speculator,
)

# -- the acceptance rule ---------------------------------------------------------------------------


def _chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was emitted"
    return float((((counts - expected) ** 2)[keep] / expected[keep]).sum())


def _speculative_counts(p: np.ndarray, q: np.ndarray | None, n: int, seed: int) -> np.ndarray:
    """Emit one token per trial: a draft (drawn from q, or the fixed token 0 when q is None),
    accepted or replaced by :func:`accept_draft`."""
    rng = np.random.default_rng(seed)
    counts = np.zeros(len(p), np.int64)
    for _ in range(n):
        draft = 0 if q is None else int(rng.choice(len(q), p=q))
        replacement = accept_draft(p, q, draft, rng)
        counts[draft if replacement is None else replacement] += 1
    return counts


# chi-square with 4 degrees of freedom: P(X > 18.47) = 0.001
CHI2_4DF_999 = 18.47


@pytest.mark.parametrize("draft_kind", ["sampled", "one-hot"])
def test_acceptance_rule_emits_the_target_distribution(draft_kind: str) -> None:
    p = np.array([0.05, 0.4, 0.25, 0.2, 0.1])
    q = np.array([0.5, 0.1, 0.1, 0.0, 0.3]) if draft_kind == "sampled" else None
    counts = _speculative_counts(p, q, 20000, seed=7)
    assert _chi2(counts, p) < CHI2_4DF_999
    # the same test has the power to see a wrong rule: the drafts' own distribution is rejected
    drafted = q if q is not None else np.eye(5)[0]
    assert _chi2(counts, 0.5 * p + 0.5 * drafted) > 10 * CHI2_4DF_999


def test_acceptance_rule_accepts_with_min_one_p_over_q() -> None:
    rng = np.random.default_rng(0)
    p, q = np.array([0.2, 0.8]), np.array([0.8, 0.2])
    outcomes = [accept_draft(p, q, 0, rng) for _ in range(4000)]
    rate = sum(o is None for o in outcomes) / len(outcomes)
    assert abs(rate - 0.25) < 0.03  # p/q = 0.2/0.8
    assert {o for o in outcomes if o is not None} == {1}  # the residual max(0, p - q) is all on token 1
    assert all(accept_draft(q, p, 0, rng) is None for _ in range(100))  # p >= q: always accepted


def test_greedy_verification_of_all_rows_at_once_matches_the_sampler() -> None:
    """The vectorised greedy check decides what plain decoding's sampler decides, row by row
    (NaN logits, masked tokens and exact ties included)."""
    rng = np.random.default_rng(1)
    config = GenerationConfig(temperature=0.0)
    allowed = rng.random(50) > 0.2
    for _ in range(200):
        rows = rng.integers(-3, 3, (5, 50)).astype(np.float32)  # many exact ties
        rows[rng.random(rows.shape) < 0.05] = np.nan
        best = [sample_token(r, config, [], rng, allowed) for r in rows]
        drafts = [b if rng.random() < 0.7 else int(rng.integers(50)) for b in best[:4]]
        n = next((i for i, (d, b) in enumerate(zip(drafts, best, strict=False)) if d != b), 4)
        assert _greedy_verify(rows, drafts, allowed) == (n, best[n])


# -- prompt lookup and options ---------------------------------------------------------------------


def test_lookup_takes_the_latest_match_of_the_longest_ngram() -> None:
    context = [1, 2, 3, 9, 9, 5, 2, 3, 7, 8, 4, 2, 3]
    assert lookup_draft(context, 2, ngram=3, min_ngram=1) == [7, 8]  # "2 3" latest earlier occurrence
    assert lookup_draft([5, 1, 2, 6, 6, 1, 2, 7, 7, 1, 2], 3) == [7, 7, 1]
    assert lookup_draft([4, 1, 2, 3, 8, 0, 2, 3], 1, ngram=3, min_ngram=2) == [8]
    assert lookup_draft([1, 2, 3, 4], 4) == []  # no n-gram repeats
    assert lookup_draft([7], 4) == []


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("draft", "needs the draft artifact's directory"),
        ("draft:", "needs the draft artifact's directory"),
        ("ngrams", "unknown --speculate value 'ngrams'"),
    ],
)
def test_bad_speculation_is_one_clear_error(text: str, fragment: str) -> None:
    with pytest.raises(OptionError, match=fragment):
        Speculation.parse(text)
    with pytest.raises(OptionError, match="max_draft_tokens"):
        Speculation.parse("prompt-lookup", max_draft_tokens=0)
    with pytest.raises(OptionError, match="ngram"):
        Speculation(SpeculationKind.PROMPT_LOOKUP, ngram=1, min_ngram=2)
    assert Speculation.parse("draft:/x/y", 3) == Speculation(SpeculationKind.DRAFT, 3, Path("/x/y"))


# -- engines ---------------------------------------------------------------------------------------

#: a prompt that repeats itself, so prompt lookup finds n-grams to copy
PROMPT = [int(i) for i in np.tile(np.random.default_rng(3).integers(100, 5000, 9), 4)]


@pytest.fixture(params=ENGINES)
def target(request: pytest.FixtureRequest) -> str:
    return request.param


def _greedy(engine, tokenizer, speculator=None, tokens: int = 24):  # noqa: ANN001, ANN202
    config = GenerationConfig(max_new_tokens=tokens, temperature=0.0)
    return Generator(engine, tokenizer, speculator).generate_text(PROMPT, config)


class _Oracle:
    """Proposes plain decoding's next tokens with every third one wrong: drafts are accepted up to
    a wrong one, which is rejected and rolled back, whatever the model."""

    def __init__(self, plain: tuple[int, ...]) -> None:
        self.plain = plain

    def propose(self, context, k, config, rng, allowed):  # noqa: ANN001, ANN201
        start = len(context) - len(PROMPT)
        drafts = list(self.plain[start : start + k])
        return [t + 1 if (start + i) % 3 == 2 else t for i, t in enumerate(drafts)], None


def test_speculative_greedy_is_plain_greedy(export, target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Drafts verified several per forward, rejected ones rolled back with ``truncate``: the tokens
    are plain greedy decoding's, on every engine that runs here; sampled speculation is seeded and
    leaves the cache reusable. Draft models run on ONNX Runtime only: a draft is any engine, driven
    through the same forward/truncate the target's checks above already cover."""
    loaded = _open(export("qwen2_tied", logits="all", target=_exported(target)), target)
    engine, tokenizer = loaded.engine, loaded.tokenizer
    plain = _greedy(engine, tokenizer)
    oracle = Speculator(Speculation(max_draft_tokens=4), engine, _Oracle(plain.token_ids))
    result = _greedy(engine, tokenizer, oracle)
    assert result.token_ids == plain.token_ids
    stats = result.speculation
    assert stats is not None and 0 < stats.accepted < stats.drafted, stats  # both paths ran
    assert stats.steps < len(plain.token_ids) - 1  # fewer forwards than plain decoding
    lookup = make_speculator(Speculation(SpeculationKind.PROMPT_LOOKUP, max_draft_tokens=4, min_ngram=1), engine)
    result = _greedy(engine, tokenizer, lookup)
    assert result.token_ids == plain.token_ids
    assert result.speculation is not None and result.speculation.drafted > 0
    _check_sampling(Generator(engine, tokenizer, lookup))
    if engine.capabilities.last_only:  # OpenVINO paged: a prefill without the other rows' logits
        engine.reset()
        last = engine.forward(np.asarray([PROMPT]), last_only=True)
        engine.reset()
        full = engine.forward(np.asarray([PROMPT]))
        assert last.shape == (1, 1, full.shape[-1])
        check_logits(last[0, 0], full[0, -1], Noise.REORDERED)
    if target != "onnxruntime":
        return
    monkeypatch.setattr(generation, "PREFILL_CHUNK", 5)  # a full-logits prefill in chunks: the same tokens
    assert _greedy(engine, tokenizer).token_ids == plain.token_ids
    penalized = GenerationConfig(max_new_tokens=24, temperature=0.0, repetition_penalty=1.5)
    expected = Generator(engine, tokenizer).generate_text(PROMPT, penalized).token_ids
    assert Generator(engine, tokenizer, lookup).generate_text(PROMPT, penalized).token_ids == expected
    for case in ("qwen2_tied", "qwen2_untied"):
        draft = _open(export(case, target=_exported(target)), target).engine
        model = DraftModel(draft, engine.capabilities.vocab_size)
        speculator = Speculator(Speculation(SpeculationKind.DRAFT, 3, Path("unused")), engine, model)
        result = _greedy(engine, tokenizer, speculator)
        assert result.token_ids == plain.token_ids, case
        stats = result.speculation
        assert stats is not None and stats.drafted > 0
        if case == "qwen2_tied":  # the target's own weights: every draft is accepted
            assert stats.accepted == stats.drafted, stats
        else:
            assert stats.accepted < stats.drafted, stats


def test_speculation_on_a_default_last_logits_artifact(export, target: str) -> None:
    """A ``--logits last`` (default) artifact returns the last k positions' logits on request
    (``last_k``: its ``logits_indices`` input), equal to a ``--logits all`` export's of the same
    weights, in one piece or across prefill chunks; speculative greedy decoding on it is plain
    greedy decoding, drafts accepted and rejected, on every engine (TensorRT: its graph on ORT)."""
    loaded = _open(export("qwen2_tied", target=_exported(target)), target)
    engine, tokenizer = loaded.engine, loaded.tokenizer
    full = _open(export("qwen2_tied", logits="all", target=_exported(target)), target).engine
    assert engine.capabilities.last_k_logits and not engine.capabilities.full_logits
    ids = np.asarray([PROMPT])
    options = engine.options
    for chunk in (options.prefill_chunk, 5):  # 5: the last 8 rows come from three pieces
        engine.reset()
        full.reset()
        engine.options = dataclasses.replace(engine.options, prefill_chunk=chunk)
        check_logits(engine.forward(ids[:, :-4], last_k=8)[0], full.forward(ids[:, :-4])[0, -8:], Noise.REORDERED)
        verify = ids[:, -4:]  # a verification step after the cache: k + 1 rows
        check_logits(engine.forward(verify, last_k=4)[0], full.forward(verify)[0], Noise.REORDERED)
        assert engine.forward(ids[:, :1]).shape == (1, 1, full.capabilities.vocab_size)  # the default: 1 row
    engine.options = options
    with pytest.raises(GenerationError, match="last_k must be an integer from 1 to the 2 new tokens, got 3"):
        engine.forward(ids[:, :2], last_k=3)
    plain = _greedy(engine, tokenizer)
    assert plain.token_ids == _greedy(full, tokenizer).token_ids
    oracle = Speculator(Speculation(max_draft_tokens=4), engine, _Oracle(plain.token_ids))
    result = _greedy(engine, tokenizer, oracle)
    assert result.token_ids == plain.token_ids
    assert result.speculation is not None and 0 < result.speculation.accepted < result.speculation.drafted
    lookup = make_speculator(Speculation(SpeculationKind.PROMPT_LOOKUP, max_draft_tokens=4, min_ngram=1), engine)
    assert _greedy(engine, tokenizer, lookup).token_ids == plain.token_ids


def test_a_proposer_that_keeps_failing_backs_off(export) -> None:
    """Drafts that are always wrong: after each fully rejected step the next 1, 2, 4 ... steps
    decode plainly (``MAX_BACKOFF``), so few forwards carry drafts; the tokens stay plain decoding's."""
    loaded = open_artifact(export("qwen2_tied"))
    plain = _greedy(loaded.engine, loaded.tokenizer)

    class Wrong(_Oracle):
        def propose(self, context, k, config, rng, allowed):  # noqa: ANN001, ANN202
            start = len(context) - len(PROMPT)
            return [t + 1 for t in self.plain[start : start + k]], None

    result = _greedy(loaded.engine, loaded.tokenizer, Speculator(Speculation(), loaded.engine, Wrong(plain.token_ids)))
    assert result.token_ids == plain.token_ids
    stats = result.speculation
    assert stats is not None and stats.accepted == 0 and stats.steps == len(plain.token_ids) - 1
    assert stats.drafted == 8 + 4  # 8 drafts, then one at steps 2, 5, 10, 19 (back-off 1, 2, 4, 8)


def _old_last_artifact(export, tmp_path: Path) -> Path:  # noqa: ANN001
    """The default ONNX Runtime export as artifacts were before ``logits_indices``: the input gone
    (its initializer, [-1], stays a constant: one row), the manifest without ``last_k_logits``."""
    import shutil

    import onnx

    from qwen_export.artifact import MANIFEST_NAME, sha256_file

    art = tmp_path / "old"
    shutil.copytree(export("qwen2_tied"), art)
    model = onnx.load(art / "model.onnx", load_external_data=False)
    (kept,) = [i for i in model.graph.input if i.name == "logits_indices"]
    model.graph.input.remove(kept)
    onnx.save(model, art / "model.onnx")
    manifest = json.loads((art / MANIFEST_NAME).read_text())
    manifest["files"]["model.onnx"] = sha256_file(art / "model.onnx")
    del manifest["extra"]["last_k_logits"]
    (art / MANIFEST_NAME).write_text(json.dumps(manifest))
    return art


def test_an_artifact_without_logits_indices_works_as_before(export, tmp_path: Path) -> None:
    import qwen_export

    art = _old_last_artifact(export, tmp_path)
    loaded = open_artifact(art)
    assert not loaded.engine.capabilities.last_k_logits
    current = open_artifact(export("qwen2_tied"))
    assert _greedy(loaded.engine, loaded.tokenizer).token_ids == _greedy(current.engine, current.tokenizer).token_ids
    with pytest.raises(GenerationError, match="no logits_indices input"):
        loaded.engine.forward(np.asarray([PROMPT[:3]]), last_k=2)
    with pytest.raises(OptionError, match="returns the last position's only; re-export it"):
        qwen_export.load(art, speculate=Speculation())
    _one_line_error(invoke("generate", art, "hi", "--speculate", "prompt-lookup"), "re-export it")


def _check_sampling(gen: Generator) -> None:
    config = GenerationConfig(max_new_tokens=16, temperature=0.7, top_k=50, seed=5)
    first = gen.generate_text(PROMPT, config)
    again = gen.generate_text(PROMPT, config)
    assert first.token_ids == again.token_ids and len(first.token_ids) == 16
    assert again.reused_tokens == len(PROMPT) - 1
    assert gen.engine.num_cached_tokens <= len(PROMPT) + 16


def test_cli_speculates_and_bench_reports_it(export) -> None:
    art = export("qwen2_tied", logits="all")
    args = ("--raw", "--max-new-tokens", "6", "--temperature", "0")
    result = invoke("generate", art, "a b a b a b a", *args, "--speculate", "prompt-lookup", "--max-draft-tokens", "3")
    assert result.exit_code == 0, result.output
    assert "drafts accepted" in result.output and "6 new tokens" in result.output
    bench = ("bench", art, "--prompt-lengths", "8", "--new-tokens", "4", "--repeats", "1", "--warmup", "0")
    result = invoke(*bench, "--speculate", f"draft:{export('qwen2_tied')}", "--json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output[result.output.index("{") :])["speculation"]
    assert row["acceptance_rate"] == 1.0 and row["identical"] and row["speedup"] > 0


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--speculate", "ngram"), "unknown --speculate value 'ngram'"),
        (("--max-draft-tokens", "4"), "--max-draft-tokens needs --speculate"),
        (("--speculate", "prompt-lookup", "--max-draft-tokens", "0"), "max_draft_tokens must be an integer"),
    ],
)
def test_cli_bad_speculation_is_one_line(export, args: tuple[str, ...], fragment: str) -> None:
    _one_line_error(invoke("generate", export("qwen2_tied", logits="all"), "hi", *args), fragment)


def test_a_draft_needs_the_same_vocabulary() -> None:
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel

    from qwen_export.runtime.tokenizer import Tokenizer

    def tok(vocab: dict[str, int]) -> Tokenizer:
        return Tokenizer(Backend(WordLevel(vocab, unk_token="<unk>")))

    base = {"<unk>": 0, "a": 1, "b": 2}
    assert tok(base).same_vocabulary(tok(dict(base)))
    assert not tok(base).same_vocabulary(tok({"<unk>": 0, "a": 2, "b": 1}))
    assert not tok(base).same_vocabulary(tok({**base, "c": 3}))


def test_load_takes_a_speculation_object(tmp_path: Path) -> None:
    import qwen_export

    with pytest.raises(OptionError, match="speculate must be a Speculation or None, got str"):
        qwen_export.load(tmp_path, speculate="prompt-lookup")  # type: ignore[arg-type]
