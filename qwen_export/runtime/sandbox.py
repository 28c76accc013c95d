"""The chat-template sandbox: transformers' Jinja environment with a memory and a time budget.

A render gets a :class:`RenderBudget` (a context variable, so renders in several threads do not
share one). The budget is enforced where values are made, not case by case:

- every operation that builds a value in template code goes through a hook: the binary operators
  (``+ - * / // % **``), ``~`` concatenation (the code generator emits a budgeted join), capture
  blocks, macros and ``caller()`` (``environment.concat``), every call (functions, globals and
  methods: the sandbox's ``call``) and every filter (wrapped when the environment is built);
- before an operation runs, its result size is bounded from its operands (lengths add for ``+``
  and ``~``, multiply for ``*``, a ``join``'s parts add up, ``replace`` is counted, integer
  arguments, format widths and ``%`` widths may not exceed the per-value limit, ``tojson``'s indent
  is short, ``lipsum`` small), so nothing larger than :data:`MAX_VALUE_CHARS` is ever allocated;
- after it runs, the size of the result is added to the render's running total
  (:data:`MAX_TOTAL_CHARS`): memory over a whole render is bounded, not just each value;
- each hook also checks the deadline (:data:`MAX_RENDER_SECONDS`), and a watchdog interrupts a
  render still running at the deadline even in a loop that calls no hook (it raises
  :class:`RenderTimeout` in the rendering thread between two bytecodes).

Exceeding any of these raises :class:`jinja2.exceptions.SecurityError`, which
:meth:`ChatTemplate.render` reports as one line.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import json
import re
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import jinja2
import jinja2.exceptions
import jinja2.ext
import jinja2.utils
from jinja2.compiler import CodeGenerator, Frame
from jinja2.nodes import Concat
from jinja2.sandbox import ImmutableSandboxedEnvironment

from qwen_export.errors import ConfigError

#: Budgets that bound a hostile template's time and memory (real chat templates use a tiny fraction).
MAX_RANGE_ITEMS = 1_000_000  # all range() items of one render together
MAX_VALUE_CHARS = 10_000_000  # the largest string or list one operation may build
MAX_SEQUENCE_REPEAT = 1_000_000  # items/characters a ``*`` repetition may build
MAX_TOTAL_CHARS = 100_000_000  # characters/items built by all operations of one render together
MAX_POWER_BITS = 4096  # size of an integer ``**`` or ``*`` result
MAX_OUTPUT_CHARS = MAX_VALUE_CHARS
MAX_RENDER_SECONDS = 5.0

_SecurityError = jinja2.exceptions.SecurityError
_WIDTH = re.compile(r"\d{8,}")  # a format width/precision of 10^7 characters or more


class RenderTimeout(Exception):  # noqa: N818 - the name says what happened
    """Raised in the rendering thread by the watchdog at the deadline."""


class RenderBudget:
    """The time and size budget of one render."""

    def __init__(self, seconds: float | None = None) -> None:
        self.deadline = time.monotonic() + (MAX_RENDER_SECONDS if seconds is None else seconds)
        self.total = 0
        self.range_left = MAX_RANGE_ITEMS

    def tick(self, size: int = 0) -> None:
        self.total += size
        if self.total > MAX_TOTAL_CHARS:
            raise _SecurityError(f"the template builds more than {MAX_TOTAL_CHARS:,} characters in all")
        if time.monotonic() > self.deadline:
            raise _SecurityError(f"the render ran past its {MAX_RENDER_SECONDS:g} s budget")


_BUDGET: contextvars.ContextVar[RenderBudget | None] = contextvars.ContextVar("render_budget", default=None)


def _budget() -> RenderBudget:
    budget = _BUDGET.get()
    if budget is None:  # a template used outside render(): give it a budget of its own
        budget = RenderBudget()
        _BUDGET.set(budget)
    return budget


def _size(value: Any) -> int:
    if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset)):
        return len(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value.bit_length() // 8
    return 0


def _check_size(size: int, what: str) -> None:
    if size > MAX_VALUE_CHARS:
        raise _SecurityError(f"{what} would build a value of {size:,} characters/items (limit {MAX_VALUE_CHARS:,})")


def _made(value: Any) -> Any:
    """Count a value an operation built against the render's budget."""
    size = _size(value)
    _check_size(size, "an operation")
    _budget().tick(size)
    return value


def _check_arguments(args: tuple[Any, ...], kwargs: dict[str, Any], what: str) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_VALUE_CHARS:
            raise _SecurityError(f"{what} got the argument {value}, over the limit of {MAX_VALUE_CHARS:,}")
        if isinstance(value, str) and _WIDTH.search(value) and ("%" in value or "{" in value):
            raise _SecurityError(f"{what} got a format with a width over the limit of {MAX_VALUE_CHARS:,}")


def _join_size(separator: str, parts: list[Any]) -> int:
    return sum(len(p) if isinstance(p, str) else len(str(p)) for p in parts) + len(separator) * max(0, len(parts) - 1)


def _precheck(target: Any, owner: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Bound the result of a method call on a string before it runs; returns the (materialised) args."""
    name = getattr(target, "__name__", "")
    if isinstance(owner, str):
        if name == "join" and args:
            parts = list(args[0])
            _check_size(_join_size(owner, parts), "join")
            return (parts, *args[1:])
        if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
            count = owner.count(args[0]) if args[0] else len(owner) + 1
            _check_size(len(owner) + count * max(0, len(args[1]) - len(args[0])), "replace")
        if name == "expandtabs":
            size = args[0] if args and isinstance(args[0], int) else kwargs.get("tabsize", 8)
            _check_size(len(owner) + owner.count("\t") * max(0, int(size) if isinstance(size, int) else 8), name)
        if name == "translate" and args and isinstance(args[0], dict):
            longest = max((len(v) for v in args[0].values() if isinstance(v, str)), default=1)
            _check_size(len(owner) * max(1, longest), name)
        if name in ("format", "format_map") and _WIDTH.search(owner):
            raise _SecurityError(f"a format width over the limit of {MAX_VALUE_CHARS:,}")
    return args


class _BudgetCodeGenerator(CodeGenerator):
    """``a ~ b`` compiles to ``environment.budget_concat((a, b))`` instead of a plain join."""

    def visit_Concat(self, node: Concat, frame: Frame) -> None:  # noqa: N802 - Jinja's visitor name
        self.write("environment.budget_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


def _bounded_filter(name: str, function: Any) -> Any:
    skip = 1 if jinja2.utils._PassArg.from_obj(function) is not None else 0  # context/eval context/environment

    @functools.wraps(function)  # keeps jinja_pass_arg (pass_context / pass_environment)
    def run(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.tick()
        values = list(args[skip:])
        _check_arguments(tuple(values[1:]), kwargs, f"the {name!r} filter")
        if name == "join" and values:
            items = list(values[0])
            separator = values[1] if len(values) > 1 and isinstance(values[1], str) else kwargs.get("d", "")
            _check_size(_join_size(str(separator), items), "the 'join' filter")
            args = (*args[:skip], items, *args[skip + 1 :])
        elif name == "replace" and len(values) >= 3 and all(isinstance(v, str) for v in values[:3]):
            _precheck(values[0].replace, values[0], tuple(values[1:3]), {})
        elif name == "indent" and values and isinstance(values[0], str):
            width = values[1] if len(values) > 1 else kwargs.get("width", 4)
            width = len(width) if isinstance(width, str) else int(width) if isinstance(width, int) else 0
            _check_size(len(values[0]) + (values[0].count("\n") + 1) * width, "the 'indent' filter")
        elif name == "format" and values and isinstance(values[0], str) and _WIDTH.search(values[0]):
            raise _SecurityError(f"a format width over the limit of {MAX_VALUE_CHARS:,}")
        return _made(function(*args, **kwargs))

    return run


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes; transformers overrides it with plain json.dumps.
    if isinstance(indent, str) and len(indent) > 16 or isinstance(indent, int) and indent > 16:
        raise _SecurityError("tojson's indent is limited to 16 characters")
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002 - Jinja's names
    if not all(isinstance(v, int) and 0 <= v <= limit for v, limit in ((n, 20), (min, 200), (max, 200))):
        raise _SecurityError("lipsum is limited to 20 paragraphs of at most 200 words")
    return jinja2.utils.generate_lorem_ipsum(n, html, min, max)


def _raise_exception(message: str) -> None:
    raise ConfigError(f"chat template raised: {message}")


def _strftime_now(format: str) -> str:  # noqa: A002 - the name templates use
    _check_arguments((format,), {}, "strftime_now")
    return datetime.now().strftime(format[:1000])


class _TemplateDict:
    """``dict`` for templates without exposing the ``dict`` type itself (no attribute/type hackery)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace`` that refuses underscore-prefixed attributes (no route to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as jinja2.utils.Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise _SecurityError(f"chat templates cannot set underscore attribute {name!r}")


class RangeBudget:
    """``range`` for one render: Jinja's sandbox caps each range at 100,000 items, which nested
    loops multiply; this caps the total over the whole render."""

    def __init__(self) -> None:
        self.left = MAX_RANGE_ITEMS

    def __call__(self, *args: int) -> range:
        r = range(*args)
        self.left -= len(r)
        if self.left < 0:
            raise _SecurityError(f"the template's loops exceed {MAX_RANGE_ITEMS:,} range items")
        return r


class StrictSandbox(ImmutableSandboxedEnvironment):
    """transformers' sandbox, except that reading an unsafe attribute fails at once, and every
    value-building operation is budgeted (see the module docstring).

    Jinja's sandbox returns an Undefined for e.g. ``''.__class__`` (which renders as ""); we raise so
    that a template probing for a way out is reported instead of silently rendering.
    """

    intercepted_binops = frozenset(["+", "-", "*", "/", "//", "%", "**"])
    code_generator_class = _BudgetCodeGenerator

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise _SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def getattr(self, obj: Any, attribute: str) -> Any:
        _budget().tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _budget().tick()
        return super().getitem(obj, argument)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _budget().tick()
        if operator == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
                if right * max(1, abs(left).bit_length()) > MAX_POWER_BITS:
                    raise _SecurityError(f"{left} ** {right} is too large for a chat template")
        elif operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(count, int):
                    if len(seq) * count > MAX_SEQUENCE_REPEAT:
                        raise _SecurityError("a repetition in the chat template builds a value too large")
            if isinstance(left, int) and isinstance(right, int):
                if abs(left).bit_length() + abs(right).bit_length() > MAX_POWER_BITS:
                    raise _SecurityError("an integer product is too large for a chat template")
        elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            _check_size(len(left) + len(right), "a concatenation")
        elif operator == "%" and isinstance(left, str):
            _check_arguments(right if isinstance(right, tuple) else (right,), {}, "a % format")
            if _WIDTH.search(left):
                raise _SecurityError(f"a % format width over the limit of {MAX_VALUE_CHARS:,}")
        return _made(self.binop_table[operator](left, right))

    def budget_concat(self, parts: tuple[Any, ...]) -> str:
        """``a ~ b ~ ...``: sizes checked before the string is built."""
        strings = [p if isinstance(p, str) else str(p) for p in parts]
        _check_size(sum(map(len, strings)), "a ~ concatenation")
        return _made("".join(strings))

    def concat(self, buffer: Any) -> str:  # type: ignore[override]  # capture blocks, macros, caller()
        strings = list(buffer)
        _check_size(sum(len(s) for s in strings), "a {% set %} block or macro")
        return _made("".join(strings))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805,B902
        _budget().tick()
        target = getattr(__obj, "__wrapped__", __obj)
        _check_arguments(args, kwargs, f"calling {getattr(target, '__name__', 'a function')!r}")
        args = _precheck(target, getattr(target, "__self__", None), args, kwargs)
        return _made(super().call(__context, __obj, *args, **kwargs))


def environment() -> StrictSandbox:
    """The environment transformers builds for chat templates, with the budgets above."""
    env = StrictSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    env.globals["lipsum"] = _lipsum
    return env


# ------------------------------------------------------------------ the deadline
_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc.argtypes = (ctypes.c_ulong, ctypes.py_object)


@contextlib.contextmanager
def budgeted(seconds: float | None = None) -> Iterator[RenderBudget]:
    """Run a render under a fresh :class:`RenderBudget`; past the deadline a watchdog raises
    :class:`RenderTimeout` in this thread (also inside loops that reach no hook)."""
    budget = RenderBudget(seconds)
    token = _BUDGET.set(budget)
    thread_id = threading.get_ident()
    lock = threading.Lock()
    active = [True]

    def interrupt() -> None:
        with lock:
            if active[0]:
                _set_async_exc(thread_id, ctypes.py_object(RenderTimeout))

    timer = threading.Timer(max(0.0, budget.deadline - time.monotonic()) + 0.05, interrupt)
    timer.daemon = True
    try:
        try:
            timer.start()
            yield budget
        finally:
            timer.cancel()
            with lock:
                active[0] = False
                _set_async_exc(thread_id, ctypes.py_object())  # clears one set but not yet delivered
    except RenderTimeout:
        raise _SecurityError(f"the render ran past its {MAX_RENDER_SECONDS:g} s budget") from None
    finally:
        _BUDGET.reset(token)
