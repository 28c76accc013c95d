"""Structured output (response_format) through constrained decoding, on the tiny random model."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest

from qwen_export.errors import OptionError
from qwen_export.runtime.generation import FinishReason, GenerationConfig, Generator
from qwen_export.runtime.loader import open_artifact
from qwen_export.runtime.structured import Constraint, ResponseFormat, cache_info, make_constraint

SCHEMAS: dict[str, dict[str, Any]] = {
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 12},
                    "address": {
                        "type": "object",
                        "properties": {
                            "city": {"type": "string", "maxLength": 10},
                            "zip": {"type": "integer", "minimum": 0, "maximum": 99999},
                        },
                        "required": ["city", "zip"],
                        "additionalProperties": False,
                    },
                },
                "required": ["name", "address"],
                "additionalProperties": False,
            },
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"],
        "additionalProperties": False,
    },
    "enums": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"type": "string", "enum": ["S", "M", "L", "XL"]},
            "level": {"enum": [1, 2, 3, None]},
        },
        "required": ["color", "size", "level"],
        "additionalProperties": False,
    },
    "arrays": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 2, "maxItems": 4},
            "points": {
                "type": "array",
                "items": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "maxItems": 3},
                "minItems": 1,
                "maxItems": 3,
            },
        },
        "required": ["tags", "points"],
        "additionalProperties": False,
    },
    "numbers": {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "ratio": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.01},
            "temp": {"type": "number", "exclusiveMinimum": -10, "exclusiveMaximum": 10, "multipleOf": 0.5},
            "count": {"type": "integer", "minimum": 10, "maximum": 99},
        },
        "required": ["age", "ratio", "temp", "count"],
        "additionalProperties": False,
    },
    "strings_required": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "maxLength": 8},
            "note": {"type": "string", "minLength": 2, "maxLength": 20},
            "optional": {"type": "string", "maxLength": 5},
        },
        "required": ["id", "note"],
        "additionalProperties": False,
    },
}

# The tiny model's context is 256 tokens. Its text is noise, so every schema bounds the output's
# length (maxLength, maxItems, integer ranges, multipleOf for decimals) or generation never ends.
GREEDY = GenerationConfig(max_new_tokens=200)
SAMPLED = GenerationConfig(max_new_tokens=200, temperature=1.0, top_p=0.95, seed=1234)


def schema_format(name: str) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name]}}


@pytest.fixture(scope="module")
def generator(export: Callable[..., Path]) -> Generator:
    artifact = open_artifact(export("qwen2_tied"))
    return Generator(artifact.engine, artifact.tokenizer)


@pytest.fixture(scope="module")
def prompt(generator: Generator) -> list[int]:
    return generator.tokenizer.encode("Reply in JSON: describe a user.")


@pytest.mark.parametrize("config", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_output_validates_against_schema(generator: Generator, prompt: list[int], name: str, config) -> None:
    constraint = make_constraint(schema_format(name), generator.tokenizer)
    result = generator.generate_text(prompt, config, constraint=constraint)
    assert result.finish_reason is FinishReason.STOP_TOKEN, result
    assert result.complete
    assert result.token_ids[-1] == generator.tokenizer.eos_token_id
    jsonschema.validate(json.loads(result.text), SCHEMAS[name])


class QuoteBiasedEngine:
    """The tiny engine with +``bias`` on the closing tokens (``"``, ``"}``, ``}``...): JSON mode bounds
    nothing, and the random model alone writes one endless string; this makes it close them."""

    def __init__(self, engine: Any, tokenizer: Any, bias: float = 50.0) -> None:
        self._engine = engine
        self.capabilities = engine.capabilities
        width = engine.capabilities.vocab_size
        self._bias = np.zeros(width, dtype=np.float32)
        for i in range(tokenizer.vocab_size):
            piece = tokenizer.decode([i])
            if piece in ('"', '"}', "}"):
                self._bias[i] = bias

    @property
    def num_cached_tokens(self) -> int:
        return self._engine.num_cached_tokens

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        return self._engine.forward(input_ids, attention_mask) + self._bias

    def reset(self) -> None:
        self._engine.reset()

    def truncate(self, num_tokens: int) -> None:
        self._engine.truncate(num_tokens)


@pytest.mark.parametrize("config", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_json_object_mode(generator: Generator, prompt: list[int], config) -> None:
    tok = generator.tokenizer
    biased = Generator(QuoteBiasedEngine(generator.engine, tok), tok)
    constraint = make_constraint({"type": "json_object"}, tok)
    result = biased.generate_text(prompt, config, constraint=constraint)
    assert result.finish_reason is FinishReason.STOP_TOKEN, result
    assert isinstance(json.loads(result.text), dict)
    generator.reset()  # the shared engine's cache was used by another Generator


@pytest.mark.parametrize("config", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize(("fmt", "budget"), [({"type": "json_object"}, 20), (schema_format("nested"), 30)])
def test_document_is_steered_closed_at_the_token_limit(
    generator: Generator, prompt: list[int], config, fmt: dict[str, Any], budget: int
) -> None:
    """Unbiased, the random model writes one endless string (json_object) or overruns a nested schema's
    budget; near the limit generation follows a closing path instead (runtime/closing.py): the
    document closes within max_new_tokens and validates."""
    constraint = make_constraint(fmt, generator.tokenizer)
    result = generator.generate_text(prompt, dataclasses.replace(config, max_new_tokens=budget), constraint=constraint)
    assert result.finish_reason is FinishReason.STOP_TOKEN and result.complete, result
    assert len(result.token_ids) <= budget + 1  # the eos appended after a closed document
    document = json.loads(result.text)
    if fmt["type"] == "json_schema":
        jsonschema.validate(document, SCHEMAS["nested"])


def test_json_positions_of_document_prefixes() -> None:
    from qwen_export.runtime.closing import json_position

    cases = {
        "": "value",
        "{": "key_or_close",
        '{"a': "string",
        '{"a"': "colon",
        '{"a":': "value",
        '{"a":"x\\"': "string",  # an escaped quote stays inside the string
        '{"a":1': "after_object_value",
        '{"a":[': "value_or_close",
        '{"a":[1,': "value",
        '{"a":{},': "key",
        '<tool_call>\n{"name":"f"}': "done",
    }
    for prefix, position in cases.items():
        assert json_position(prefix) == position, prefix


def test_streamed_text_matches_and_ends_with_eos(generator: Generator, prompt: list[int]) -> None:
    constraint = make_constraint(schema_format("enums"), generator.tokenizer)
    events = list(generator.generate(prompt, GREEDY, constraint=constraint))
    result = events[-1].result
    assert result is not None and "".join(e.text for e in events) == result.text
    assert [e.token_id for e in events] == list(result.token_ids)
    assert constraint.done
    jsonschema.validate(json.loads(result.text), SCHEMAS["enums"])


def test_length_limit_reports_incomplete(generator: Generator, prompt: list[int]) -> None:
    constraint = make_constraint(schema_format("nested"), generator.tokenizer)
    result = generator.generate_text(prompt, GenerationConfig(max_new_tokens=3), constraint=constraint)
    assert result.finish_reason is FinishReason.LENGTH
    assert not constraint.done and not result.complete
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.text)


def test_text_format_is_unconstrained(generator: Generator) -> None:
    assert make_constraint({"type": "text"}, generator.tokenizer) is None
    assert make_constraint(None, generator.tokenizer) is None


def test_first_token_mask_forbids_non_json(generator: Generator) -> None:
    tok = generator.tokenizer
    width = generator.engine.capabilities.vocab_size
    constraint = make_constraint({"type": "json_object"}, tok)
    assert isinstance(constraint, Constraint)
    allowed = constraint.allowed(width)
    assert allowed.shape == (width,) and allowed.dtype == bool
    assert allowed.any()
    for i in np.flatnonzero(allowed):
        assert tok.decode([int(i)]).lstrip().startswith("{"), tok.decode([int(i)])
    for text in ("hello", "[", "1", " Sure", '"'):
        ids = tok.encode(text)
        assert len(ids) == 1 and not allowed[ids[0]], text
    assert not allowed[tok.eos_token_id]
    assert not allowed[tok.vocab_size :].any()  # the model's padding rows
    logits = np.zeros(width, dtype=np.float32)
    constraint.apply(logits)
    assert np.isneginf(logits[~allowed]).all() and (logits[allowed] == 0).all()


def test_mask_applied_after_processing(generator: Generator, prompt: list[int]) -> None:
    """A strong preference for a forbidden token (here: eos first) is overridden by the mask."""
    tok = generator.tokenizer
    constraint = make_constraint(schema_format("enums"), tok)
    assert constraint is not None
    allowed = constraint.allowed(generator.engine.capabilities.vocab_size)
    assert not allowed[tok.eos_token_id]
    from qwen_export.runtime.generation import sample_token

    logits = np.zeros(allowed.shape[0], dtype=np.float32)
    logits[tok.eos_token_id] = 100.0
    rng = np.random.default_rng(0)
    for config in (GREEDY, SAMPLED, GenerationConfig(temperature=1.0, top_k=1)):
        assert allowed[sample_token(logits, config, [], rng, allowed)]


def test_constraint_rejects_disallowed_token(generator: Generator) -> None:
    from qwen_export.errors import GenerationError

    constraint = make_constraint({"type": "json_object"}, generator.tokenizer)
    assert constraint is not None
    with pytest.raises(GenerationError, match="not allowed"):
        constraint.advance(generator.tokenizer.encode("hello")[0])


def test_compiled_grammar_is_cached(generator: Generator) -> None:
    tok = generator.tokenizer
    fmt = {"type": "json_schema", "json_schema": {"name": "cached", "schema": {"enum": ["only-here", 1]}}}
    before = cache_info(tok)
    first = make_constraint(fmt, tok)
    after_first = cache_info(tok)
    second = make_constraint(ResponseFormat.parse(fmt), tok)
    assert cache_info(tok) == after_first >= min(before + 1, 64)
    assert first is not None and second is not None and first is not second
    first.advance(tok.encode('"')[0])  # independent states
    assert not np.array_equal(first.allowed(1000), second.allowed(1000))


def test_parse_roundtrip() -> None:
    assert ResponseFormat.parse(None) == ResponseFormat() and not ResponseFormat.parse(None).constrained
    assert ResponseFormat.parse({"type": "json_object"}).schema == {"type": "object"}
    fmt = ResponseFormat.parse(
        {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMAS["enums"], "strict": True}}
    )
    assert fmt.constrained and fmt.name == "x" and fmt.strict is True and fmt.schema == SCHEMAS["enums"]
    assert ResponseFormat.parse(fmt.to_dict()) == fmt
    hash(fmt)


@pytest.mark.parametrize(
    "value",
    [
        "json",
        {"type": "xml"},
        {},
        {"type": "json_object", "schema": {}},
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}},
        {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {"type": "object"}}},
        {"type": "json_schema", "json_schema": {"name": "x"}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": "object"}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": "yes"}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}, "extra": 1}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(("}}},
        {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}},
        },
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/defs/missing"}}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"const": float("nan")}}},
    ],
)
def test_invalid_response_format(value: Any) -> None:
    with pytest.raises(OptionError) as info:
        ResponseFormat.parse(value)
    assert "\n" not in str(info.value)
