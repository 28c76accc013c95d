"""Structured output: OpenAI-style ``response_format`` enforced by constrained decoding.

``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}`` constrains generation
to JSON that validates against the schema; ``{"type": "json_object"}`` to any JSON object;
``{"type": "text"}`` (or None) leaves generation free. Before each token the :class:`Constraint`
gives the set of tokens the grammar allows (everything else is set to -inf), and it advances with
the sampled token. The guarantee: whenever a constrained generation finishes with a stop token
(``finish_reason`` ``stop_token``, ``complete`` True), its text parses and validates, whatever the
weights. Near the end of the budget the document is steered to a closing
(:mod:`qwen_export.runtime.closing`); one that still ends at ``max_new_tokens`` or the context
(``length`` / ``context``), or at a stop string, has ``complete`` False and its text is only a prefix
of a valid document.

The grammar engine is `llguidance <https://github.com/guidance-ai/llguidance>`_ (MIT, no torch;
see ``benchmarks/README.md``, "Constrained decoding", for the comparison with xgrammar and
outlines-core). It is imported lazily, here only. Compiled grammars are cached per (tokenizer,
schema): a new :class:`Constraint` for a schema seen before is a copy of a ready matcher.

Output is compact JSON (no whitespace between tokens, properties in the schema's order), which
keeps a model from padding the document with endless whitespace.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

from qwen_export.errors import GenerationError, OptionError
from qwen_export.runtime.closing import Closer
from qwen_export.runtime.jsonsafe import check_json

__all__ = ["Constraint", "ResponseFormat", "cache_info", "clear_cache", "make_constraint", "make_tool_constraint"]

_TYPES = ("text", "json_object", "json_schema")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # as OpenAI's json_schema.name
_JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}
# llguidance JSON compile options: fixed "," and ":" separators, no free whitespace.
_COMPILE_OPTIONS = {"whitespace_flexible": False}
_MAX_SCHEMAS_PER_TOKENIZER = 64


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


@dataclasses.dataclass(frozen=True)
class ResponseFormat:
    """A parsed ``response_format``. ``schema_json`` is the schema as canonical JSON (hashable)."""

    type: str = "text"  # "text" | "json_object" | "json_schema"
    name: str | None = None  # json_schema.name
    schema_json: str | None = None  # json_schema.schema (json_schema only)
    description: str | None = None
    strict: bool | None = None  # accepted for compatibility; the schema is always enforced

    @classmethod
    def parse(cls, value: Mapping[str, Any] | ResponseFormat | None) -> ResponseFormat:
        """Parse an OpenAI-style dict (None = text); raise OptionError (one line) when invalid."""
        if value is None:
            return cls()
        if isinstance(value, ResponseFormat):
            return value
        if not isinstance(value, Mapping):
            raise OptionError(f"response_format must be an object like {{'type': 'json_object'}}, got {value!r}")
        kind = value.get("type")
        if kind not in _TYPES:
            raise OptionError(f"response_format.type must be one of {', '.join(_TYPES)}; got {kind!r}")
        allowed_keys = {"type", "json_schema"} if kind == "json_schema" else {"type"}
        extra = sorted(str(k) for k in value if k not in allowed_keys)
        if extra:
            raise OptionError(f"response_format of type {kind!r} has unknown keys: {', '.join(extra)}")
        if kind != "json_schema":
            return cls(type=kind)
        spec = value.get("json_schema")
        if not isinstance(spec, Mapping):
            raise OptionError("response_format.json_schema must be an object with 'name' and 'schema'")
        extra = sorted(str(k) for k in spec if k not in {"name", "schema", "description", "strict"})
        if extra:
            raise OptionError(f"response_format.json_schema has unknown keys: {', '.join(extra)}")
        name = spec.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise OptionError(f"response_format.json_schema.name must match [A-Za-z0-9_-]{{1,64}}, got {name!r}")
        description = spec.get("description")
        if description is not None and not isinstance(description, str):
            raise OptionError(f"response_format.json_schema.description must be a string, got {description!r}")
        strict = spec.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise OptionError(f"response_format.json_schema.strict must be true, false or null, got {strict!r}")
        schema = spec.get("schema")
        if not isinstance(schema, Mapping):
            raise OptionError(f"response_format.json_schema.schema must be a JSON Schema object, got {schema!r}")
        check_json(schema, "response_format.json_schema.schema")
        try:
            schema_json = json.dumps(schema, sort_keys=False, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError, RecursionError) as e:
            raise OptionError(f"response_format.json_schema.schema is not JSON-serializable: {e}") from None
        _check_schema(schema_json, name)
        return cls(type="json_schema", name=name, schema_json=schema_json, description=description, strict=strict)

    @property
    def constrained(self) -> bool:
        """False for ``text`` (no constraint)."""
        return self.type != "text"

    @property
    def schema(self) -> dict[str, Any] | None:
        """The JSON Schema enforced (``{"type": "object"}`` in JSON mode), None for text."""
        if self.type == "json_object":
            return dict(_JSON_OBJECT_SCHEMA)
        return None if self.schema_json is None else json.loads(self.schema_json)

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI-style dict this was parsed from (normalized)."""
        if self.type != "json_schema":
            return {"type": self.type}
        spec: dict[str, Any] = {"name": self.name, "schema": self.schema}
        if self.description is not None:
            spec["description"] = self.description
        if self.strict is not None:
            spec["strict"] = self.strict
        return {"type": "json_schema", "json_schema": spec}


# -- the grammar engine (llguidance, imported lazily) ---------------------------------------------


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as e:  # a dependency of the package; missing only in a broken install
        raise OptionError(f"structured output needs the llguidance package (pip install llguidance): {e}") from None
    return llguidance


def _grammar(schema_json: str) -> str:
    llg = _llguidance()
    try:
        return llg.LLMatcher.grammar_from_json_schema(schema_json, defaults=_COMPILE_OPTIONS)
    except ValueError as e:
        raise OptionError(f"response_format schema is not a JSON object: {_one_line(str(e))}") from None


def _check_schema(schema_json: str, name: str) -> None:
    """Raise OptionError when llguidance cannot compile the schema (invalid or unsupported)."""
    grammar = _grammar(schema_json)
    message = _llguidance().LLMatcher.validate_grammar(grammar)
    if message:
        raise OptionError(f"response_format schema {name!r} cannot be enforced: {_one_line(message)}")


class _TokenizerEntry:
    """An llguidance tokenizer for one of our tokenizers, and its compiled grammars (LRU)."""

    def __init__(self, tokenizer: Any) -> None:
        llg = _llguidance()
        backend = getattr(tokenizer, "_backend", tokenizer)  # qwen_export Tokenizer or tokenizers.Tokenizer
        if not hasattr(backend, "to_str"):
            raise OptionError(f"structured output needs a tokenizers-based tokenizer, got {type(tokenizer).__name__}")
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:  # a raw tokenizers.Tokenizer, or a base checkpoint without eos_token
            eos = next((i for t in ("<|im_end|>", "<|endoftext|>") if (i := backend.token_to_id(t)) is not None), None)
        if eos is None:
            raise OptionError("structured output needs an eos token; the tokenizer defines none")
        self.eos_token_id = int(eos)
        self.vocab_size = int(backend.get_vocab_size(with_added_tokens=True))
        try:
            self.lltokenizer = llg.LLTokenizer(backend.to_str(), n_vocab=self.vocab_size, eos_token=self.eos_token_id)
        except Exception as e:  # the Rust side raises ValueError/RuntimeError
            raise OptionError(f"cannot build the constrained-decoding tokenizer: {_one_line(str(e))}") from None
        self.matchers: OrderedDict[str, Any] = OrderedDict()
        self.lock = threading.Lock()

        def single_token(text: str) -> int | None:
            ids = backend.encode(text, add_special_tokens=False).ids
            return ids[0] if len(ids) == 1 else None

        self.closing_preferences = Closer.preference_ids(single_token)

    def closer(self) -> Closer:
        return Closer(self.lltokenizer, self.closing_preferences, self.eos_token_id)

    def matcher(self, grammar: str, what: str = "response_format schema") -> Any:
        """A fresh matcher for an llguidance ``grammar`` (a copy of the cached, compiled one)."""
        with self.lock:
            template = self.matchers.get(grammar)
            if template is not None:
                self.matchers.move_to_end(grammar)
                return template.deep_copy()
        llg = _llguidance()
        template = llg.LLMatcher(self.lltokenizer, grammar, log_level=0)
        if template.is_error():
            raise OptionError(f"{what} cannot be enforced: {_one_line(template.get_error())}")
        with self.lock:
            self.matchers[grammar] = template
            while len(self.matchers) > _MAX_SCHEMAS_PER_TOKENIZER:
                self.matchers.popitem(last=False)
        return template.deep_copy()


_CACHE: weakref.WeakKeyDictionary[Any, _TokenizerEntry] = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


def _entry(tokenizer: Any) -> _TokenizerEntry:
    with _CACHE_LOCK:
        entry = _CACHE.get(tokenizer)
    if entry is None:
        entry = _TokenizerEntry(tokenizer)  # ~1-2 s for the Qwen vocabulary: built once per tokenizer
        with _CACHE_LOCK:
            entry = _CACHE.setdefault(tokenizer, entry)
    return entry


def clear_cache() -> None:
    """Forget every cached tokenizer adapter and compiled grammar."""
    with _CACHE_LOCK:
        _CACHE.clear()


def cache_info(tokenizer: Any) -> int:
    """Number of compiled grammars cached for ``tokenizer`` (0 when none)."""
    with _CACHE_LOCK:
        entry = _CACHE.get(tokenizer)
    return 0 if entry is None else len(entry.matchers)


class Constraint:
    """The grammar state of one generation: which tokens may come next, advanced token by token.

    Build with :func:`make_constraint`. Single use: one constraint per generated completion.
    """

    def __init__(
        self,
        matcher: Any,
        eos_token_id: int,
        vocab_size: int,
        response_format: ResponseFormat,
        closer: Closer | None = None,
    ) -> None:
        self._matcher = matcher
        self.eos_token_id = eos_token_id
        self.response_format = response_format
        self._vocab_size = vocab_size
        self._closer = closer  # steers to a valid closing when the budget runs out (None: never)
        self._tokens: list[int] = []  # consumed so far
        self._bitmask = np.zeros((1, (vocab_size + 31) // 32), dtype=np.int32)
        self._allowed_cache: tuple[int, np.ndarray] | None = None  # (vocab_width, mask) of this step

    def _check(self) -> None:
        if self._matcher.is_error():
            raise GenerationError(f"constrained decoding failed: {_one_line(self._matcher.get_error())}")

    def allowed(self, vocab_width: int) -> np.ndarray:
        """``bool[vocab_width]``: True for the tokens the grammar allows next (ids past the
        tokenizer's vocabulary, e.g. the model's padding rows, are never allowed)."""
        if self._allowed_cache is not None and self._allowed_cache[0] == vocab_width:
            return self._allowed_cache[1]
        self._check()
        bitmask = self._bitmask
        self._matcher.unsafe_compute_mask_ptr(bitmask.ctypes.data, bitmask.nbytes)
        self._check()
        n = min(vocab_width, self._vocab_size)
        out = np.zeros(vocab_width, dtype=bool)
        out[:n] = np.unpackbits(bitmask.view(np.uint8), count=n, bitorder="little").view(bool)
        self._allowed_cache = (vocab_width, out)
        return out

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """Set the disallowed entries of a 1-D logits/scores vector to -inf, in place; return it."""
        logits[~self.allowed(logits.shape[-1])] = -np.inf
        return logits

    def advance(self, token_id: int) -> None:
        """Consume the sampled token; GenerationError when the grammar does not allow it."""
        self._allowed_cache = None
        self._tokens.append(int(token_id))
        if not self._matcher.consume_token(int(token_id)):
            raise GenerationError(
                f"token {int(token_id)} is not allowed by the response_format grammar here: "
                f"{_one_line(self._matcher.get_error()) or 'rejected'}"
            )

    @property
    def done(self) -> bool:
        """The document is complete and nothing but eos may follow."""
        return bool(self._matcher.is_stopped()) and not self._matcher.is_error()

    @property
    def accepting(self) -> bool:
        """The text so far is a complete document (eos may come next, or must)."""
        return not self._matcher.is_error() and bool(self._matcher.is_stopped() or self._matcher.is_accepting())

    def closing_token(self, left: int) -> int | None:
        """With ``left`` tokens of budget: the next token of a closing path once the document needs
        about all of them to close (:mod:`qwen_export.runtime.closing`), else None (sample freely)."""
        if self._closer is None or self._matcher.is_error():
            return None
        return self._closer.next_token(self._matcher, self._tokens, left, self.accepting)

    def reset(self) -> None:
        """Back to the start of the document."""
        self._tokens = []
        self._allowed_cache = None
        self._matcher.reset()


def make_constraint(response_format: Mapping[str, Any] | ResponseFormat | None, tokenizer: Any) -> Constraint | None:
    """A fresh :class:`Constraint` for ``response_format`` (dict or parsed), None for ``text``.

    ``tokenizer`` is a :class:`qwen_export.runtime.tokenizer.Tokenizer` (or a ``tokenizers.Tokenizer``).
    The tokenizer adapter and the compiled grammar are cached (per tokenizer object and schema).
    """
    fmt = ResponseFormat.parse(response_format)
    if not fmt.constrained:
        return None
    schema_json = fmt.schema_json if fmt.type == "json_schema" else json.dumps(_JSON_OBJECT_SCHEMA)
    assert schema_json is not None
    entry = _entry(tokenizer)
    return Constraint(entry.matcher(_grammar(schema_json)), entry.eos_token_id, entry.vocab_size, fmt, entry.closer())


# -- tool calls (tool_choice, tools together with response_format) ---------------------------------

#: llguidance's JSON options for tool-call blocks: the separators Qwen's template writes.
_TOOL_JSON = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


def _call_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"name": <one of tools>, "arguments": <its parameters>}`` as one JSON Schema."""
    options = []
    for tool in tools:
        parameters = tool.get("parameters") or {"type": "object"}
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": tool["name"]}, "arguments": parameters},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "x-guidance": _TOOL_JSON}


def _tag(tokenizer: Any, text: str) -> str:
    """A Lark item for ``text``: its token when the vocabulary has one (Qwen's added tokens)."""
    token_id = tokenizer.token_to_id(text)
    return f"<[{int(token_id)}]>" if token_id is not None else json.dumps(text)


def make_tool_constraint(
    tools: list[dict[str, Any]], *, single: bool, answer: ResponseFormat | None, tokenizer: Any
) -> Constraint:
    """A constraint for Qwen/Hermes tool calls: ``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>``
    blocks whose arguments validate against each tool's ``parameters``.

    ``tools``: ``{"name", "parameters"}`` dicts (the functions that may be called). ``single``: exactly
    one call (a named ``tool_choice``), else one or more. ``answer``: a constrained response_format
    the reply may be *instead* of the calls (``tool_choice="auto"`` with ``response_format``); None
    when a call is required.
    """
    call = f'{_tag(tokenizer, "<tool_call>")} "\\n" %json {json.dumps(_call_schema(tools))} "\\n" '
    call += _tag(tokenizer, "</tool_call>")
    rules = [f"call: {call}", "calls: call" if single else 'calls: call ("\\n" call)*']
    if answer is not None and answer.constrained:
        schema = answer.schema if answer.type == "json_schema" else dict(_JSON_OBJECT_SCHEMA)
        rules += [
            "start: calls | answer",
            f"answer: %json {json.dumps({**(schema or {}), 'x-guidance': _COMPILE_OPTIONS})}",
        ]
    else:
        rules.append("start: calls")
    llg = _llguidance()
    try:
        grammar = llg.LLMatcher.grammar_from_lark("\n".join(rules))
    except ValueError as e:
        raise OptionError(f"the tools cannot be enforced: {_one_line(str(e))}") from None
    message = llg.LLMatcher.validate_grammar(grammar)
    if message:
        raise OptionError(f"the tools' parameter schemas cannot be enforced: {_one_line(message)}")
    entry = _entry(tokenizer)
    fmt = answer if answer is not None else ResponseFormat(type="json_object")
    matcher = entry.matcher(grammar, "the tools' parameter schemas")
    return Constraint(matcher, entry.eos_token_id, entry.vocab_size, fmt, entry.closer())
