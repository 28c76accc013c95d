"""The checkpoint's tokenizer and chat template, without transformers or torch.

``tokenizer.json`` runs through the ``tokenizers`` library (the same Rust code transformers' fast
tokenizers use, so ids match); ``tokenizer_config.json`` supplies the special tokens and, unless a
``chat_template.jinja`` file is present (newer Hugging Face layout), the chat template.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from qwen_export.errors import ConfigError, GenerationError, OptionError
from qwen_export.runtime import tokenizer_guard
from qwen_export.runtime.chat import ChatTemplate
from qwen_export.runtime.jsonsafe import check_text
from qwen_export.safefs import read_regular

#: sha256 of the tokenizer.json texts that passed the guard's pattern scan and cost probe
_GUARDED: set[bytes] = set()

__all__ = ["Tokenizer", "MAX_TOKENIZER_BYTES"]

MAX_TOKENIZER_BYTES = 100 * 1024 * 1024  # refuse larger tokenizer files (real ones are ~10 MB)

# Named special tokens passed to chat templates, as transformers' ``special_tokens_map``.
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


#: ``reader(name, limit) -> bytes | None``: a file of the tokenizer's directory (None = absent).
Reader = Callable[[str, int], "bytes | None"]


def checkpoint_reader(root: Path) -> Reader:
    """Files of a checkpoint directory: regular files (links followed, as Hugging Face caches use
    them), bounded reads. Artifacts pass a reader that also refuses links and unlisted files."""

    def read(name: str, limit: int) -> bytes | None:
        return read_regular(root / name, limit, ConfigError)

    return read


def _read_text(reader: Reader, root: Path, name: str, required: bool = True) -> str | None:
    """Read a UTF-8 file of at most MAX_TOKENIZER_BYTES, or raise ConfigError naming it."""
    path = root / name
    data = reader(name, MAX_TOKENIZER_BYTES)
    if data is None:
        if not required:
            return None
        raise ConfigError(f"{path}: file not found (the checkpoint's tokenizer files are needed)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); expected a JSON/Jinja file") from None


def _read_json_object(reader: Reader, root: Path, name: str) -> dict[str, Any]:
    path = root / name
    try:
        data = json.loads(_read_text(reader, root, name) or "")
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except (ValueError, RecursionError) as e:  # an integer over 4300 digits, absurd nesting
        raise ConfigError(f"{path}: invalid JSON ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    """A special-token entry is a string or a serialized AddedToken ``{"content": ...}``."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class Tokenizer:
    """Encode/decode text and render chat templates for one checkpoint.

    Build with :meth:`from_dir`; the constructor takes already-loaded parts.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        config: Mapping[str, Any] | None = None,
        chat_templates: Mapping[str, ChatTemplate] | None = None,
    ) -> None:
        """``chat_templates`` maps template names to templates; ``"default"`` is the usual one and
        ``"tool_use"`` (older multi-template checkpoints) is preferred when tools are passed."""
        self._backend = backend
        self._max_token_chars: int | None = None
        self.config: dict[str, Any] = dict(config or {})
        self.chat_templates: dict[str, ChatTemplate] = dict(chat_templates or {})
        self.special_tokens: dict[str, str] = {}
        for name in _SPECIAL_TOKEN_NAMES:
            content = _token_content(self.config.get(name))
            if content is not None:
                self.special_tokens[name] = content
        special: set[int] = set()
        for token_id, added in backend.get_added_tokens_decoder().items():
            if added.special:
                special.add(token_id)
        for key, entry in (self.config.get("added_tokens_decoder") or {}).items():
            if isinstance(entry, Mapping) and entry.get("special") and str(key).isdigit():
                special.add(int(key))
        for content in self.special_tokens.values():
            token_id = backend.token_to_id(content)
            if token_id is not None:
                special.add(token_id)
        self.special_ids: frozenset[int] = frozenset(special)

    @classmethod
    def from_dir(cls, path: str | Path, reader: Reader | None = None) -> Tokenizer:
        """Load ``tokenizer.json``, ``tokenizer_config.json`` and (if present) ``chat_template.jinja``
        through ``reader`` (default: :func:`checkpoint_reader`)."""
        root = Path(path)
        if not root.is_dir():
            raise ConfigError(f"{root}: not a directory (expected a checkpoint with tokenizer.json)")
        reader = reader or checkpoint_reader(root)
        tokenizer_file = root / "tokenizer.json"
        text = _read_text(reader, root, "tokenizer.json") or ""
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
        data = None
        if digest not in _GUARDED:
            try:
                data = json.loads(text)
                tokenizer_guard.check_patterns(data, str(tokenizer_file))
            except (ValueError, RecursionError) as e:  # JSONDecodeError, huge integers, absurd nesting
                raise ConfigError(f"{tokenizer_file}: not a valid tokenizers JSON file: {str(e)[:200]}") from None
        try:
            backend = tokenizers.Tokenizer.from_str(text)
        except BaseException as e:  # the Rust side raises plain Exception subclasses, or panics
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"{tokenizer_file}: not a valid tokenizers JSON file: {message}") from None
        if digest not in _GUARDED:
            tokenizer_guard.probe_cost(backend.encode, str(tokenizer_file), data)
            _GUARDED.add(digest)  # same bytes, same verdict: the guard runs once per process
        config_file = root / "tokenizer_config.json"
        config = _read_json_object(reader, root, "tokenizer_config.json")

        templates: dict[str, ChatTemplate] = {}
        jinja_file = root / "chat_template.jinja"
        raw = config.get("chat_template")
        jinja = _read_text(reader, root, "chat_template.jinja", required=False)
        if jinja is not None:
            templates["default"] = ChatTemplate(jinja, str(jinja_file))
        elif isinstance(raw, str):
            templates["default"] = ChatTemplate(raw, str(config_file))
        elif isinstance(raw, list):  # older layout: [{"name": ..., "template": ...}, ...]
            for entry in raw:
                if not (isinstance(entry, Mapping) and isinstance(entry.get("name"), str)):
                    raise ConfigError(f"{config_file}: chat_template list entries need 'name' and 'template'")
                if not isinstance(entry.get("template"), str):
                    raise ConfigError(f"{config_file}: chat_template {entry['name']!r} has no 'template' string")
                templates[entry["name"]] = ChatTemplate(entry["template"], f"{config_file} ({entry['name']})")
        elif raw is not None:
            raise ConfigError(f"{config_file}: chat_template must be a string or a list, found {type(raw).__name__}")
        return cls(backend, config, templates)

    # -- vocabulary ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (``len(tokenizer)`` in transformers)."""
        return int(self._backend.get_vocab_size(with_added_tokens=True))

    def token_to_id(self, token: str) -> int | None:
        """The id of one token string, or None when it is not in the vocabulary."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The token string of one id, or None when out of range."""
        return self._backend.id_to_token(token_id)

    def same_vocabulary(self, other: Tokenizer) -> bool:
        """Whether ``other`` maps every token string to the same id (a draft model's must)."""
        mine = self._backend.get_vocab(with_added_tokens=True)
        return mine == other._backend.get_vocab(with_added_tokens=True) and self.eos_token_id == other.eos_token_id

    def _special_id(self, name: str) -> int | None:
        content = self.special_tokens.get(name)
        return None if content is None else self._backend.token_to_id(content)

    @property
    def eos_token_id(self) -> int | None:
        """Id of ``eos_token`` from tokenizer_config.json (Qwen instruct: ``<|im_end|>``)."""
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    # -- text <-> ids ---------------------------------------------------------------------------

    @property
    def max_token_chars(self) -> int:
        """No token covers more characters of a text than this (the longest token string)."""
        if self._max_token_chars is None:
            self._max_token_chars = tokenizer_guard.max_token_chars(self._backend.get_vocab(with_added_tokens=True))
        return self._max_token_chars

    def encode(self, text: str, add_special_tokens: bool = False, max_tokens: int | None = None) -> list[int]:
        """Token ids of ``text``; special-token strings in it are parsed as special tokens.

        With ``max_tokens``, a text that cannot fit (over ``max_tokens`` x :attr:`max_token_chars`
        characters) is a GenerationError before any tokenizing: the cost is bounded by the context.
        """
        if not isinstance(text, str):
            raise OptionError(f"text to tokenize must be a string, got {type(text).__name__}")
        check_text(text, "the prompt")
        if max_tokens is not None and len(text) > max_tokens * self.max_token_chars:
            raise GenerationError(
                f"the prompt has {len(text):,} characters, at least {len(text) // self.max_token_chars:,} tokens; "
                f"the context is {max_tokens} tokens: shorten it"
            )
        try:
            return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)
        except BaseException as e:
            if isinstance(e, (KeyboardInterrupt, SystemExit)) or not tokenizer_guard.rust_failure(e):
                raise
            raise ConfigError(f"the tokenizer failed on this text: {str(e).splitlines()[0][:120]}") from None

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; ids outside the vocabulary are ignored."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # -- chat -------------------------------------------------------------------------------------

    def get_chat_template(self, tools: Sequence[Mapping[str, Any]] | None = None) -> ChatTemplate:
        """The template transformers would pick: ``tool_use`` when tools are given and it exists."""
        if tools is not None and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if "default" in self.chat_templates:
            return self.chat_templates["default"]
        if not self.chat_templates:
            raise ConfigError("the checkpoint has no chat template (tokenizer_config.json or chat_template.jinja)")
        raise ConfigError(f"no 'default' chat template; available: {', '.join(sorted(self.chat_templates))}")

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        """Render OpenAI-style ``messages`` (``role: system/user/assistant/tool``, assistant
        ``tool_calls``) and JSON-schema ``tools`` as transformers'
        ``apply_chat_template(..., tokenize=False)`` does. ``extra`` are template variables such as
        ``enable_thinking=False``."""
        template = self.get_chat_template(tools)
        return template.render(messages, tools, add_generation_prompt, special_tokens=self.special_tokens, **extra)

    def apply_chat_template_ids(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        max_tokens: int | None = None,
        **extra: Any,
    ) -> list[int]:
        """Token ids of :meth:`apply_chat_template` (no extra special tokens added; ``max_tokens`` as
        in :meth:`encode`)."""
        return self.encode(
            self.apply_chat_template(messages, tools, add_generation_prompt, **extra), max_tokens=max_tokens
        )
