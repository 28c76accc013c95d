"""Image parts in served chat requests (a vision-language artifact): what the server reads.

An HTTP client is not the machine's user, so the server reads less than the library does:

- ``data:image/<type>;base64,...`` URLs: always (the image travels in the request; the body limit
  and the runtime's own size and pixel limits apply);
- ``http(s)://`` and other URLs: never (the runtime does not fetch);
- local paths: only when the server was started with an image root (``serve --image-root DIR``),
  and only files whose resolved path (symbolic links followed) lies under it. A path is handed on
  resolved, so what was checked is what is read. Without a root, a path is refused without looking
  at the file system: the reply says nothing about which files exist.

A text artifact's server passes image parts on unchanged, for the runtime to refuse as text-only.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qwen_export.serve.errors import APIError

__all__ = ["ImagePolicy", "checked_image_parts"]

_IMAGE_KINDS = ("image_url", "image")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_DATA_URL = re.compile(r"^data:image/[A-Za-z0-9.+-]+;base64,", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class ImagePolicy:
    """Where a served VL model may read images from: data URLs always; local files only under
    ``local_root`` (None: no local files)."""

    local_root: Path | None = None

    def __post_init__(self) -> None:
        if self.local_root is not None:
            root = Path(self.local_root).expanduser()
            if not root.is_dir():
                from qwen_export.errors import OptionError

                raise OptionError(f"--image-root {root}: not a directory")
            object.__setattr__(self, "local_root", root.resolve())

    def source(self, value: Any, where: str) -> str:
        """The image source to hand on for ``value`` (an image part's URL or path), or APIError 400."""
        if not isinstance(value, str) or not value:
            raise APIError.bad_request(f"{where}: an image must be a data URL (data:image/png;base64,...)", where)
        if value.startswith("data:"):
            if not _DATA_URL.match(value):
                raise APIError.bad_request(f"{where}: an image data URL must be data:image/<type>;base64,<data>", where)
            return value
        if _SCHEME.match(value):
            raise APIError.bad_request(
                f"{where}: the server does not fetch images; send the image as a data URL (data:image/png;base64,...)",
                where,
            )
        return self._local(value, where)

    def _local(self, value: str, where: str) -> str:
        if self.local_root is None:
            raise APIError.bad_request(
                f"{where}: this server reads no local image files (start it with --image-root DIR to allow files "
                "under DIR); send the image as a data URL",
                where,
            )
        try:
            path = Path(value).expanduser()
            path = path if path.is_absolute() else self.local_root / path
            resolved = path.resolve(strict=True)
        except (OSError, RuntimeError, ValueError):  # missing, a link loop, a NUL byte, no such user
            resolved = None
        if resolved is None or not resolved.is_relative_to(self.local_root) or not resolved.is_file():
            raise APIError.bad_request(f"{where}: no image file {value!r} under the server's --image-root", where)
        return str(resolved)


def checked_image_parts(messages: list[Any], policy: ImagePolicy) -> list[Any]:
    """``messages`` with every image part's source checked by ``policy`` and replaced by what it
    resolved to (a new list; the request's own objects are not changed). Other parts are left for
    the runtime's checks."""
    out: list[Any] = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind not in _IMAGE_KINDS:
                parts.append(part)
                continue
            value = part.get(kind)
            if kind == "image_url" and isinstance(value, Mapping):
                value = value.get("url")
            source = policy.source(value, f"messages[{i}].content[{j}]")
            parts.append({"type": "image_url", "image_url": {"url": source}})
        out.append({**message, "content": parts})
    return out
