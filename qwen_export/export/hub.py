"""A checkpoint named by its Hugging Face model id (``Qwen/Qwen2.5-0.5B-Instruct``) instead of a
directory: resolved through ``huggingface_hub`` (a dependency of ``tokenizers``, imported here only)
to its snapshot in the local cache, downloading what export reads when it is not there yet.

Only the files an export reads are fetched (config, generation config, tokenizer files, chat
template, safetensors weights and their index): never pickle weights or repository code. Offline
(``HF_HUB_OFFLINE=1``) only the cache is looked at. The cache is ``HF_HUB_CACHE`` (or
``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``), read when the call is made.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from qwen_export.errors import CheckpointError

__all__ = ["EXPORT_FILES", "is_model_id", "resolve_checkpoint"]

#: What an export reads from a checkpoint (``allow_patterns`` of the download).
EXPORT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "*.safetensors",
    "*.safetensors.index.json",
)
# owner/name as the Hub spells them (an optional @revision)
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(@[A-Za-z0-9_./-]{1,128})?$")


def is_model_id(value: str | Path) -> bool:
    """``owner/name[@revision]`` that is not an existing path."""
    text = str(value)
    return bool(_MODEL_ID.match(text)) and not Path(text).exists() and ".." not in text


def _cache_dir() -> str | None:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_checkpoint(value: str | Path) -> Path:
    """The checkpoint directory for ``value``: itself when it is not a model id, else the id's snapshot
    (from the cache, downloaded when missing and online). CheckpointError (one line) when it cannot."""
    if not is_model_id(value):
        return Path(value)
    repo_id, _, revision = str(value).partition("@")
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(
            f"{value} is not a directory; to fetch it as a Hugging Face model id, pip install huggingface_hub"
        ) from None
    kwargs = {"revision": revision or None, "cache_dir": _cache_dir(), "allow_patterns": list(EXPORT_FILES)}
    try:
        path = huggingface_hub.snapshot_download(repo_id, local_files_only=_offline(), **kwargs)
    except Exception as online_error:  # noqa: BLE001 - any network or hub failure: fall back to the cache
        if _offline():
            raise CheckpointError(
                f"{value} is not a directory and not in the Hugging Face cache ({_cache_dir() or 'default'}), "
                "and HF_HUB_OFFLINE is set"
            ) from None
        try:
            path = huggingface_hub.snapshot_download(repo_id, local_files_only=True, **kwargs)
        except Exception:  # noqa: BLE001
            reason = " ".join(str(online_error).split())[:300]
            raise CheckpointError(
                f"{value}: not a directory, and fetching it from the Hugging Face Hub failed: {reason}"
            ) from None
    return Path(path)
