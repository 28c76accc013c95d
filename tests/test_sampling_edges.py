"""Class 7 of issue 20: numerics at the edge of sampling.

A subnormal temperature is refused; a tiny normal one cannot overflow into NaN; and no sampler ever
picks an id the tokenizer cannot decode (the embedding is usually padded past the vocabulary).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
import pytest
from test_generation import FakeEngine
from test_hostile_inputs import assert_one_error, invoke

import qwen_export
from qwen_export.errors import OptionError
from qwen_export.runtime.generation import GenerationConfig, Generator, process_logits, sample_token


class SizedDecoder:
    """A tokenizer of ``size`` ids (decoded as letters); ids past it are unknown."""

    eos_token_id = None

    def __init__(self, size: int) -> None:
        self.vocab_size = size

    def id_to_token(self, token_id: int) -> str | None:
        return chr(ord("a") + token_id % 26) if 0 <= token_id < self.vocab_size else None

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return "".join(self.id_to_token(i) or "" for i in ids)


@pytest.mark.parametrize("temperature", [1e-310, 5e-324, sys.float_info.min / 2, -0.0 - 1e-300])
def test_subnormal_or_negative_temperatures_are_refused(temperature: float) -> None:
    with pytest.raises(OptionError, match="temperature"):
        GenerationConfig(temperature=temperature).validate()


@pytest.mark.parametrize("temperature", ["1e-310", "4.9e-324", "-1e-300"])
def test_cli_refuses_a_subnormal_temperature(export, temperature: str) -> None:
    assert_one_error(invoke("generate", export("qwen2_tied"), "hi", "--temperature", temperature), "temperature")


@pytest.mark.parametrize("temperature", [sys.float_info.min, 1e-300, 1e-30])
def test_tiny_temperatures_pick_the_best_token_without_nan(temperature: float) -> None:
    logits = np.array([1.0, 5.0, -3.0, 4.999, 2.0, -np.inf], dtype=np.float64)
    scores = process_logits(logits, GenerationConfig(temperature=temperature), [])
    assert not np.isnan(scores).any() and not np.isposinf(scores).any()
    assert np.argmax(scores) == 1
    rng = np.random.default_rng(0)
    for _ in range(50):
        assert sample_token(logits, GenerationConfig(temperature=temperature), [], rng) == 1


def test_ordinary_temperatures_are_unchanged() -> None:
    logits = np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(process_logits(logits, GenerationConfig(temperature=0.5), []), [2.0, 4.0, 6.0])


@pytest.mark.parametrize(
    "config",
    [GenerationConfig(max_new_tokens=20), GenerationConfig(max_new_tokens=20, temperature=1.0, seed=1)],
    ids=["greedy", "sampling"],
)
def test_padded_vocabulary_ids_are_never_sampled(config: GenerationConfig) -> None:
    """The engine's logits are 16 wide, the tokenizer knows 10 ids; the padding columns score highest."""

    def logits(cache: list[int]) -> np.ndarray:
        out = np.zeros(16, dtype=np.float32)
        out[10:] = 50.0  # padding rows of the embedding: the best scores
        out[(cache[-1] + 1) % 10] = 5.0
        return out

    generator = Generator(FakeEngine(logits, vocab_size=16), SizedDecoder(10))
    result = generator.generate_text([0], config)
    assert result.token_ids and max(result.token_ids) < 10


def test_real_artifact_never_samples_past_the_tokenizer(export, monkeypatch: pytest.MonkeyPatch) -> None:
    llm = qwen_export.load(export("qwen2_tied"))
    size = llm.tokenizer.vocab_size
    width = llm.engine.capabilities.vocab_size
    assert width > size  # the tiny Qwen2 pads its embedding past the tokenizer, as the real ones do
    real = llm.engine.forward

    def forward(*args, **kwargs):
        out = real(*args, **kwargs).copy()
        out[..., size:] = 1e4
        return out

    monkeypatch.setattr(llm.engine, "forward", forward)
    for options in ({"temperature": 0}, {"temperature": 1.0, "seed": 3}, {"temperature": 1e-300, "seed": 3}):
        stream = llm.stream("Hello", max_new_tokens=5, **options)
        list(stream)
        assert stream.result is not None and max(stream.result.token_ids) < size
