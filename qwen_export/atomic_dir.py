"""Putting a finished directory in place atomically, and cleaning up after writers that died.

- A writer builds in a temporary sibling ``.NAME.tmp-XXXXXXXX`` that it holds an exclusive
  ``flock`` on for as long as it lives: the kernel drops the lock when the process dies, even by
  SIGKILL, so a later writer can tell an abandoned temporary directory from a live one and removes
  (or, for a swapped-out old artifact, restores) it.
- The final step runs under an ``flock`` on the parent directory: the output checks and the
  rename are one critical section against every other writer.
- A new output is moved in with ``renameat2(RENAME_NOREPLACE)`` (Linux): a directory that appeared
  meanwhile is never replaced. ``--overwrite`` swaps the new directory with the old one with
  ``renameat2(RENAME_EXCHANGE)``: there is no moment at which the output does not exist. Where the
  OS has neither, two renames are used, and an interrupted swap is undone by the next writer.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["make_temp_dir", "release_temp_dir", "move_into_place", "clean_stale", "parent_lock", "OutputExists"]

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100
_held: dict[str, int] = {}  # temporary directory -> the descriptor holding its flock


class OutputExists(FileExistsError):
    """The output appeared while it was being written (another writer won)."""


def _libc_renameat2() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_renameat2 = _libc_renameat2()


def renameat2(old: Path, new: Path, flags: int) -> bool:
    """``renameat2(old, new, flags)``; False when this OS or filesystem does not support it."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(new))


def _try_lock(fd: int) -> bool:
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


@contextlib.contextmanager
def parent_lock(directory: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``directory`` (the outputs' parent) for the block."""
    if fcntl is None:
        yield
        return
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def make_temp_dir(out: Path) -> Path:
    """An empty sibling of ``out`` (same filesystem, so the final rename is atomic), locked while this
    process lives; mode set by the umask. Give it back with :func:`release_temp_dir`. Made and locked
    under the parent's lock: :func:`clean_stale` (another writer's, under the same lock) would
    otherwise take a directory made but not yet locked for a dead writer's and remove it."""
    with parent_lock(out.parent):
        while True:
            tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
            try:
                tmp.mkdir()
            except FileExistsError:
                continue
            fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            _try_lock(fd)
            _held[str(tmp)] = fd
            return tmp


def release_temp_dir(tmp: Path) -> None:
    """Remove ``tmp`` if it is still there and drop its lock."""
    shutil.rmtree(tmp, ignore_errors=True)
    fd = _held.pop(str(tmp), None)
    if fd is not None:
        os.close(fd)


def clean_stale(out: Path) -> list[Path]:
    """Remove the temporary siblings of ``out`` whose writers died (their lock is free); restore a
    swapped-out old output when ``out`` itself is missing. Returns what was removed or restored."""
    done: list[Path] = []
    if not out.parent.is_dir():
        return done
    with parent_lock(out.parent):
        for kind in ("old", "tmp"):  # a swapped-out old output first: it may be restored
            for path in sorted(out.parent.glob(f".{out.name}.{kind}-*")):
                if str(path) in _held or path.is_symlink() or not path.is_dir():
                    continue
                try:
                    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
                except OSError:
                    continue
                try:
                    if not _try_lock(fd):
                        continue  # a live writer's
                    if kind == "old" and not (out.exists() or out.is_symlink()):
                        os.rename(path, out)
                    else:
                        shutil.rmtree(path, ignore_errors=True)
                    done.append(path)
                finally:
                    os.close(fd)
    return done


def move_into_place(tmp: Path, out: Path, overwrite: bool = True, check: Callable[[], None] | None = None) -> None:
    """Move ``tmp`` onto ``out`` under the parent's lock, after ``check()`` (the output rules).

    A new ``out`` never replaces one that appeared meanwhile (:class:`OutputExists`); with
    ``overwrite`` an existing ``out`` is exchanged atomically and the old one removed after.
    """
    with parent_lock(out.parent):
        if check is not None:
            check()
        exists = out.exists() or out.is_symlink()
        if not exists:
            if renameat2(tmp, out, RENAME_NOREPLACE):
                return
            if out.exists() or out.is_symlink():  # pragma: no cover - only without renameat2
                raise OutputExists(errno.EEXIST, "appeared while writing", str(out))
            os.rename(tmp, out)
            return
        if not overwrite:
            raise OutputExists(errno.EEXIST, "appeared while writing", str(out))
        if renameat2(tmp, out, RENAME_EXCHANGE):
            shutil.rmtree(tmp, ignore_errors=True)  # the old output, now at tmp's name
            return
        backup = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
        os.rename(out, backup)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(backup, out)
            raise
        shutil.rmtree(backup, ignore_errors=True)
