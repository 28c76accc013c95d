"""Reading files of an untrusted directory tree (an artifact, a checkpoint) without leaving it.

Every open goes through :func:`open_inside`: the relative path is checked (no absolute path, no
``..``), each directory component is opened with ``O_NOFOLLOW | O_DIRECTORY`` relative to its
parent's descriptor, the file itself with ``O_NOFOLLOW | O_NONBLOCK`` (a FIFO cannot hang the open),
and the opened descriptor must be a regular file (``fstat``: no device, FIFO or socket). The checks
are made on the descriptor that is then read, so swapping a file for a link between check and use
changes nothing. :func:`read_inside` reads at most a hard limit of bytes and fails past it whatever
size the file reports. :func:`scan_tree` lists a tree without following links and refuses anything
that is neither a directory nor a regular file: engines that open files themselves (ONNX Runtime's
external data, OpenVINO's ``.bin``) are only handed a tree that passed it.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from qwen_export.errors import ArtifactError, QwenExportError

__all__ = ["check_relative", "open_inside", "read_inside", "read_text_inside", "scan_tree"]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_CHUNK = 1 << 20


def check_relative(rel: str, where: str, error: type[QwenExportError] = ArtifactError) -> tuple[str, ...]:
    """The components of a relative POSIX path that stays inside its root, or ``error``."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel:
        raise error(f"{where} lists an unsafe file path {rel!r}")
    path = PurePosixPath(rel)
    parts = path.parts
    if path.is_absolute() or not parts or any(p in ("..", ".", "") for p in parts) or rel != path.as_posix():
        raise error(f"{where} lists an unsafe file path {rel!r}")
    return parts


def _describe(mode: int) -> str:
    for test, name in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _refusal(root: Path, rel: str, what: str, error: type[QwenExportError]) -> QwenExportError:
    return error(f"{root / rel} is {what}; artifacts hold only regular files inside them: re-export it")


@contextlib.contextmanager
def open_inside(
    root: str | Path, rel: str, error: type[QwenExportError] = ArtifactError
) -> Iterator[tuple[int, os.stat_result]]:
    """``(fd, stat)`` of the regular file ``root/rel``, opened without following any link below ``root``."""
    root = Path(root)
    parts = check_relative(rel, str(root), error)
    fds: list[int] = []
    try:
        try:
            fds.append(os.open(root, os.O_RDONLY | _DIRECTORY | _CLOEXEC))
            for part in parts[:-1]:
                fds.append(os.open(part, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=fds[-1]))
            fd = os.open(parts[-1], os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC, dir_fd=fds[-1])
            fds.append(fd)
        except FileNotFoundError:
            raise error(f"{root / rel} is missing (listed in manifest.json); re-export the artifact") from None
        except OSError as exc:
            with contextlib.suppress(OSError):
                mode = os.lstat(root.joinpath(*parts[: len(fds)])).st_mode
                if stat.S_ISLNK(mode) or not stat.S_ISDIR(mode) and len(fds) < len(parts):
                    raise _refusal(root, "/".join(parts[: len(fds)]), _describe(mode), error) from None
            raise error(f"{root / rel} cannot be opened ({exc.strerror})") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _refusal(root, rel, _describe(info.st_mode), error)
        yield fd, info
    finally:
        for fd in reversed(fds):
            os.close(fd)


def read_inside(root: str | Path, rel: str, limit: int, error: type[QwenExportError] = ArtifactError) -> bytes:
    """The bytes of the regular file ``root/rel`` (see :func:`open_inside`); ``error`` past ``limit`` bytes."""
    with open_inside(root, rel, error) as (fd, info):
        if info.st_size > limit:
            raise error(f"{Path(root) / rel}: {info.st_size} bytes is over the {limit} byte limit for this file")
        chunks, size = [], 0
        while True:
            try:
                chunk = os.read(fd, min(_CHUNK, limit + 1 - size))
            except OSError as exc:
                raise error(f"{Path(root) / rel} cannot be read ({exc.strerror})") from None
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise error(f"{Path(root) / rel} grows past the {limit} byte limit for this file while read")
        return b"".join(chunks)


def read_text_inside(root: str | Path, rel: str, limit: int, error: type[QwenExportError] = ArtifactError) -> str:
    """:func:`read_inside` decoded as UTF-8 (``error`` naming the first bad byte)."""
    data = read_inside(root, rel, limit, error)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{Path(root) / rel}: not UTF-8 text (byte {exc.start}); expected a JSON/Jinja file") from None


def scan_tree(root: str | Path, error: type[QwenExportError] = ArtifactError, max_entries: int = 100_000) -> list[str]:
    """Relative POSIX paths of every regular file under ``root``, links never followed.

    A symbolic link, device, FIFO or socket anywhere in the tree is an ``error`` naming it.
    """
    root = Path(root)
    found: list[str] = []
    pending = [""]
    seen = 0
    while pending:
        rel_dir = pending.pop()
        try:
            entries = sorted(os.scandir(root / rel_dir) if rel_dir else os.scandir(root), key=lambda e: e.name)
        except OSError as exc:
            raise error(f"{root / rel_dir} cannot be listed ({exc.strerror})") from None
        for entry in entries:
            seen += 1
            if seen > max_entries:
                raise error(f"{root} holds more than {max_entries} entries; not an artifact")
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            mode = entry.stat(follow_symlinks=False).st_mode
            if stat.S_ISDIR(mode):
                pending.append(rel)
            elif stat.S_ISREG(mode):
                found.append(rel)
            else:
                raise _refusal(root, rel, _describe(mode), error)
    return sorted(found)


def read_regular(path: str | Path, limit: int, error: type[QwenExportError] = ArtifactError) -> bytes | None:
    """The bytes of ``path`` when it is (or links to) a regular file of at most ``limit`` bytes; None
    when it does not exist. For checkpoints (Hugging Face caches link files into a blob store), not
    artifacts: a device, FIFO or socket is an ``error``, and reading stops at the limit."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | _NONBLOCK | _CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{path} is {_describe(info.st_mode)}, not a regular file")
        if info.st_size > limit:
            raise error(f"{path}: {info.st_size} bytes is over the {limit} byte limit for this file")
        data = b""
        while len(data) <= limit:
            chunk = os.read(fd, min(_CHUNK, limit + 1 - len(data)))
            if not chunk:
                return data
            data += chunk
        raise error(f"{path} grows past the {limit} byte limit for this file while read")
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
