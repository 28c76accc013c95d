"""Untrusted JSON and text at the runtime's edges (torch-free): one place that bounds them.

``json.loads`` raises ``RecursionError`` on deep nesting and ``ValueError`` on integers of over 4300
digits, and values under those limits can still blow up the code that walks them (schema compilers,
chat templates). :func:`load_json_text` and :func:`check_json` turn all of that into one-line
:class:`~qwen_export.errors.OptionError`\\ s; :func:`check_text` refuses strings that are not valid
Unicode text (what non-UTF-8 bytes on a command line or stdin become in Python: lone surrogates).
"""

from __future__ import annotations

import json
import math
from typing import Any

from qwen_export.errors import OptionError

__all__ = ["MAX_JSON_DEPTH", "MAX_JSON_ITEMS", "check_json", "check_text", "load_json_text"]

MAX_JSON_DEPTH = 64
MAX_JSON_ITEMS = 1_000_000
MAX_INT_BITS = 256


def check_text(text: str, what: str) -> None:
    """OptionError unless ``text`` is valid Unicode (encodable as UTF-8: no lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise OptionError(
            f"{what} is not valid UTF-8 text (undecodable byte at character {exc.start}); pass UTF-8 text"
        ) from None


def check_json(value: Any, what: str) -> None:
    """OptionError when ``value`` nests deeper than MAX_JSON_DEPTH, holds over MAX_JSON_ITEMS items,
    an integer over MAX_INT_BITS bits, a non-finite float or a string that is not valid Unicode.
    Values of other types are left alone (callers decide what they accept)."""
    pending: list[tuple[Any, int]] = [(value, 1)]
    items = 0
    while pending:
        node, depth = pending.pop()
        items += 1
        if items > MAX_JSON_ITEMS:
            raise OptionError(f"{what} has over {MAX_JSON_ITEMS:,} values")
        if isinstance(node, (dict, list, tuple)):
            if depth > MAX_JSON_DEPTH:
                raise OptionError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels")
            children = [*node.keys(), *node.values()] if isinstance(node, dict) else list(node)
            pending.extend((child, depth + 1) for child in children)
        elif isinstance(node, bool) or node is None:
            continue
        elif isinstance(node, int) and node.bit_length() > MAX_INT_BITS:
            raise OptionError(f"{what} holds an integer of {node.bit_length()} bits (limit {MAX_INT_BITS})")
        elif isinstance(node, float) and not math.isfinite(node):
            raise OptionError(f"{what} holds a non-finite number ({node})")
        elif isinstance(node, str):
            check_text(node, what)


def load_json_text(text: str, what: str) -> Any:
    """Parse JSON ``text`` and :func:`check_json` it; every failure is one OptionError line."""
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise OptionError(f"{what} is not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})") from None
    except RecursionError:
        raise OptionError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:  # an integer of over 4300 digits, NaN/Infinity
        raise OptionError(f"{what} is not usable JSON ({str(exc).split(';')[0]})") from None
    check_json(value, what)
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
