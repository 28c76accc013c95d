"""Class 2 of issue 20: a chat-template render has a memory and a time budget.

Each hostile template below would build gigabytes or run for minutes without the budget. They run
in one child process under an address-space limit (so a miss shows up as a MemoryError or a kill,
not a swapping machine), and each must fail as a one-line sandbox error within seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from qwen_export.errors import ConfigError
from qwen_export.runtime import sandbox
from qwen_export.runtime.chat import ChatTemplate

BIG = "{% set big = 'x' * 1000000 %}"
HOSTILE = {
    "tilde-doubling": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "plus-doubling": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "list-doubling": "{% set ns = namespace(l=[1]) %}{% for i in range(64) %}{% set ns.l = ns.l + ns.l %}{% endfor %}",
    "int-squaring": "{% set ns = namespace(x=3) %}{% for i in range(64) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
    "center-filter": "{{ 'x'|center(2000000000) }}",
    "center-method": "{{ 'x'.center(2000000000) }}",
    "ljust-method": "{{ 'x'.ljust(1999999999) }}",
    "zfill-method": "{{ '1'.zfill(1999999999) }}",
    "format-filter": "{{ '%2000000000d'|format(1) }}",
    "percent-width": "{{ '%2000000000d' % 1 }}",
    "percent-star": "{{ '%*d' % (2000000000, 1) }}",
    "str-format": "{{ '{:>2000000000}'.format(1) }}",
    "str-format-nested": "{{ '{:>{}}'.format(1, 2000000000) }}",
    "join-filter": BIG + "{{ ([big] * 5000)|join('') }}",
    "join-method": BIG + "{{ ''.join([big] * 5000) }}",
    "replace-method": "{% set s = 'a' * 200000 %}{{ s.replace('a', s) }}",
    "replace-filter": "{% set s = 'a' * 200000 %}{{ s|replace('a', s) }}",
    "expandtabs-method": "{{ ('\t' * 1000000).expandtabs(9000000) }}",
    "translate-method": BIG + "{{ ('a' * 100000).translate({97: big}) }}",
    "indent-filter": "{{ ('\\n' * 1000000)|indent(5000) }}",
    "tojson-indent": "{{ [[[[[1]]]]]|tojson(indent=100000000) }}",
    "set-block": BIG + "{% set x %}{% for i in range(5000) %}{{ big }}{% endfor %}{% endset %}{{ x|length }}",
    "macro-caller": BIG + "{% macro m() %}{% for i in range(5000) %}{{ caller() }}{% endfor %}{% endmacro %}"
    "{% call m() %}{{ big }}{% endcall %}",
    "lipsum": "{{ lipsum(n=100000, html=false, min=100, max=100) }}",
    "many-distinct-values": "{% set ns = namespace(l=[]) %}{% for i in range(1000) %}"
    "{% set ns.l = ns.l + [('x' * 1000000) ~ i] %}{% endfor %}",
    "hookless-loop": "{% for a in 'x' * 1000000 %}{% for b in 'x' * 1000000 %}{% endfor %}{% endfor %}",
}

_CHILD = """
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
from qwen_export.runtime import sandbox
sandbox.MAX_RENDER_SECONDS = 2.0
from qwen_export.runtime.chat import ChatTemplate
from qwen_export.errors import ConfigError
out = {}
for name, source in json.loads(sys.stdin.read()).items():
    started = time.monotonic()
    try:
        ChatTemplate(source, name).render([{"role": "user", "content": "hi"}])
        out[name] = ["rendered", time.monotonic() - started]
    except ConfigError as e:
        out[name] = [str(e), time.monotonic() - started]
    except BaseException as e:
        out[name] = [f"UNEXPECTED {type(e).__name__}: {e}", time.monotonic() - started]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def hostile_results() -> dict[str, list]:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD], input=json.dumps(HOSTILE), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_template_is_stopped_by_the_budget(hostile_results: dict[str, list], name: str) -> None:
    message, seconds = hostile_results[name]
    assert "tried an unsafe operation" in message, message
    assert "\n" not in message and name in message
    assert seconds < 4.0, (name, seconds)


def test_deadline_interrupts_a_loop_that_reaches_no_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "MAX_RENDER_SECONDS", 0.5)
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"ran past its 0\.5 s budget"):
        ChatTemplate(HOSTILE["hookless-loop"]).render([{"role": "user", "content": "hi"}])
    assert time.monotonic() - started < 3


def test_budget_is_per_render_and_nothing_leaks_after_a_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "MAX_RENDER_SECONDS", 0.3)
    fine = ChatTemplate("{% for m in messages %}{{ m.content ~ '!' }}{% endfor %}")
    for _ in range(3):
        with pytest.raises(ConfigError):
            ChatTemplate(HOSTILE["hookless-loop"]).render([{"role": "user", "content": "hi"}])
        assert fine.render([{"role": "user", "content": "hi"}]) == "hi!"
    time.sleep(0.5)  # a late watchdog must not fire into unrelated code
    assert sum(range(10**6)) > 0


def test_cumulative_budget_counts_every_operation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "MAX_TOTAL_CHARS", 1000)
    template = ChatTemplate("{% for i in range(100) %}{{ ('y' * 20) ~ i }}{% endfor %}")
    with pytest.raises(ConfigError, match="characters in all"):
        template.render([{"role": "user", "content": "hi"}])


def test_real_templates_and_ordinary_operations_still_work() -> None:
    source = (
        "{{ 'a'|center(9) }}|{{ '%5d' % 42 }}|{{ '{:>4}'.format(7) }}|{{ ['a', 'b']|join(',') }}|"
        "{{ 'x'.ljust(3) ~ 'y' }}|{{ 'abc'.replace('b', 'BB') }}|{{ {'k': [1]}|tojson(indent=2)|length }}|"
        "{% set c %}{{ messages[0].content }}{% endset %}{{ c }}|{{ 2 ** 10 }}|{{ lipsum(1, false, 5, 9)|length > 0 }}"
    )
    out = ChatTemplate(source).render([{"role": "user", "content": "hi"}])
    assert out == "    a    |   42|   7|a,b|x  y|aBBc|22|hi|1024|True"
