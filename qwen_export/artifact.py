"""Artifact directories: atomic writing, the manifest, and verification on load.

An artifact is a directory holding engine files plus ``manifest.json``, which records what was
exported (spec, target, dtype, I/O signature, passes), with which package versions, and the sha256
of every file. :func:`write_artifact` builds the directory next to its destination and renames it
into place only when the block succeeds, so an interrupted export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import hashlib
import importlib.metadata
import json
import os
import secrets
import shutil
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from qwen_export import __version__
from qwen_export.atomic_dir import OutputExists, clean_stale, make_temp_dir, move_into_place, release_temp_dir
from qwen_export.errors import ArtifactError, QwenExportError
from qwen_export.manifest_schema import validate_manifest
from qwen_export.safefs import open_inside, read_inside, scan_tree

MANIFEST_SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
#: distributions whose versions are recorded in the manifest when installed.
RECORDED_PACKAGES = (
    "numpy",
    "onnx",
    "onnxruntime",
    "openvino",
    "openvino-tokenizers",
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
)
_CHUNK = 1 << 20
MAX_MANIFEST_BYTES = 64 << 20
#: directories of an artifact written after export and not in ``files``: TensorRT's engines built on
#: the GPU machine (``qwen-export build-engine``). Their files must still be regular and inside.
UNLISTED_DIRS = ("engines",)


def installed_packages() -> dict[str, str]:
    """Versions of :data:`RECORDED_PACKAGES` that are installed."""
    out = {}
    for name in RECORDED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclasses.dataclass(frozen=True)
class Manifest:
    """Contents of ``manifest.json``.

    ``io`` maps ``"inputs"``/``"outputs"`` to ``{name: {"dtype": str, "shape": [int | str, ...]}}``
    (symbolic dimensions as strings); ``files`` maps relative POSIX paths to sha256 hex digests.
    """

    target: str
    dtype: str
    logits: str  # "last" or "all"
    spec: dict[str, Any]
    io: dict[str, Any] = dataclasses.field(default_factory=dict)
    passes: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    files: dict[str, str] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    packages: dict[str, str] = dataclasses.field(default_factory=installed_packages)
    created: str = dataclasses.field(default_factory=_now)
    qwen_export_version: str = __version__
    schema_version: int = MANIFEST_SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = MANIFEST_NAME) -> Manifest:
        """Parse and check a manifest; unknown keys of the same schema version are ignored."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ArtifactError(
                f"{source} is not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})"
            ) from None
        except (ValueError, RecursionError) as exc:  # e.g. an integer over 4300 digits, absurd nesting
            raise ArtifactError(f"{source} is not valid JSON ({type(exc).__name__}: {exc})") from None
        if not isinstance(data, dict):
            raise ArtifactError(f"{source} is not a JSON object")
        version = data.get("schema_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ArtifactError(f"{source} has no valid schema_version (found {version!r})")
        if version > MANIFEST_SCHEMA_VERSION:
            raise ArtifactError(
                f"{source} was written by a newer qwen-export (schema {version} > {MANIFEST_SCHEMA_VERSION}); "
                "upgrade qwen-export to load it"
            )
        kinds = {
            "target": str,
            "dtype": str,
            "logits": str,
            "spec": dict,
            "io": dict,
            "passes": list,
            "files": dict,
            "extra": dict,
            "packages": dict,
            "created": str,
            "qwen_export_version": str,
        }
        for key, kind in kinds.items():
            if not isinstance(data.get(key), kind):
                raise ArtifactError(f"{source}: field {key!r} is missing or not a {kind.__name__}")
        validate_manifest(data, source)
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


#: manifest fields a caller of :func:`write_artifact` may set; the rest are filled in automatically.
SETTABLE_FIELDS = ("target", "dtype", "logits", "spec", "io", "passes", "extra")


@dataclasses.dataclass
class ArtifactWriter:
    """Yielded by :func:`write_artifact`: write files under ``path``, put manifest fields in ``manifest_fields``."""

    path: Path
    manifest_fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    manifest: Manifest | None = None  # set once the artifact is in place


def check_output_dir(
    out: str | Path,
    overwrite: bool,
    marker: str = MANIFEST_NAME,
    kind: str = "qwen-export artifact",
    error: type[QwenExportError] = ArtifactError,
    keep: Sequence[str | Path] = (),
) -> None:
    """Fail fast (before any work) when ``out`` cannot be written.

    With ``overwrite`` an existing directory is replaced only when it is empty or holds ``marker``
    (what a ``kind`` directory always has), so a mistyped output path cannot delete an unrelated
    directory, and never when one of the inputs ``keep`` lies inside it. The nearest existing
    ancestor must be a directory this process can create entries in. Errors are raised as ``error``.
    """
    out = Path(out)
    _check_writable(out, error)
    if not (out.exists() or out.is_symlink()):
        return
    for path in keep:
        inside = Path(os.path.realpath(path))
        if inside == Path(os.path.realpath(out)) or Path(os.path.realpath(out)) in inside.parents:
            raise error(f"{path} is inside {out}; replacing {out} would delete it: choose another output")
    if not overwrite:
        raise error(f"{out} exists; pass --overwrite to replace it")
    if not out.is_dir() or out.is_symlink():
        raise error(f"{out} exists and is not a directory; refusing to replace it")
    if any(out.iterdir()) and not (out / marker).is_file():
        raise error(f"{out} is not a {kind} (no {marker}); refusing to replace it")


def _check_writable(out: Path, error: type[QwenExportError]) -> None:
    """The nearest existing ancestor of ``out`` must be a directory we can create entries in (probed)."""
    ancestor = out.parent
    while not (ancestor.exists() or ancestor.is_symlink()) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise error(f"{ancestor} is not a directory; {out} cannot be created under it: choose another output")
    try:
        probe = ancestor / f".{out.name[:64]}.probe-{secrets.token_hex(4)}"
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise error(f"cannot write in {ancestor} ({exc.strerror}); choose another output") from None


@contextlib.contextmanager
def write_artifact(
    out_dir: str | Path, overwrite: bool = False, keep: Sequence[str | Path] = ()
) -> Iterator[ArtifactWriter]:
    """Build an artifact in a temporary sibling of ``out_dir`` and move it into place on success.

    On success ``manifest.json`` is written (sha256 of every file) and the directory renamed onto
    ``out_dir`` (an existing one, with ``overwrite``, is swapped out and deleted). On any exception,
    KeyboardInterrupt or SIGTERM (turned into :class:`Terminated` while the block runs) the temporary
    directory is removed and ``out_dir`` is left as it was. Running out of disk space (ENOSPC,
    EDQUOT) anywhere in the block becomes a one-line :class:`ArtifactError` with the free space left.
    """
    out = Path(out_dir)
    check_output_dir(out, overwrite, keep=keep)
    tmp: Path | None = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(out)  # temporary directories of writers that were killed
        tmp = make_temp_dir(out)
        writer = ArtifactWriter(path=tmp)
        with sigterm_raises():
            yield writer
            unknown = set(writer.manifest_fields) - set(SETTABLE_FIELDS)
            if unknown:
                raise TypeError(f"unknown manifest field(s) {sorted(unknown)}; settable: {', '.join(SETTABLE_FIELDS)}")
            manifest = Manifest(**writer.manifest_fields, files=hash_files(tmp))
            (tmp / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
            with _signals_deferred():  # it may have appeared meanwhile: checked again under the lock
                move_into_place(tmp, out, overwrite, check=lambda: check_output_dir(out, overwrite, keep=keep))
            writer.path, writer.manifest = out, manifest
    except OutputExists:
        raise ArtifactError(
            f"{out} appeared while this export ran (another writer?); pass --overwrite to replace it"
        ) from None
    except Exception as exc:
        full = _disk_full_error(exc)
        if full is None:
            raise
        written = _tree_bytes(tmp) if tmp is not None else 0
        if tmp is not None:
            release_temp_dir(tmp)  # before measuring: what is free once we are gone
        raise ArtifactError(_disk_full_message(out, full, written)) from exc
    finally:
        if tmp is not None:
            release_temp_dir(tmp)  # a no-op after a successful move, but for the lock


def hash_files(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (except the manifest), keyed by relative POSIX path."""
    return {
        path.relative_to(root).as_posix(): sha256_file(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.relative_to(root).as_posix() != MANIFEST_NAME
    }


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def load_manifest(directory: str | Path, verify: bool = True) -> Manifest:
    """Read an artifact's manifest and check the whole tree against it.

    Every entry under ``directory`` must be a directory or a regular file (no symbolic link, device,
    FIFO or socket), every file must be listed in ``files`` (except ``manifest.json`` and the
    locally built ``engines/``, see :data:`UNLISTED_DIRS`), every listed file must exist and, with
    ``verify``, match its sha256. Engines that open files themselves are handed only a tree that
    passed, so nothing they read can lead outside the artifact.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: artifact directory not found")
    path = directory / MANIFEST_NAME
    if not (path.exists() or path.is_symlink()):
        raise ArtifactError(
            f"{directory} has no {MANIFEST_NAME}; it is not a qwen-export artifact (or its export was interrupted)"
        )
    data = read_inside(directory, MANIFEST_NAME, MAX_MANIFEST_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{path} cannot be read (not UTF-8 at byte {exc.start})") from None
    manifest = Manifest.from_json(text, source=str(path))
    present = scan_tree(directory)
    unlisted = [
        rel
        for rel in present
        if rel != MANIFEST_NAME and rel not in manifest.files and rel.split("/")[0] not in UNLISTED_DIRS
    ]
    if unlisted:
        raise ArtifactError(
            f"{directory / unlisted[0]} is not listed in {MANIFEST_NAME} (an engine could read it unverified); "
            "remove it or re-export the artifact"
        )
    for rel, digest in manifest.files.items():
        if rel == MANIFEST_NAME or rel.split("/")[0] in UNLISTED_DIRS:
            raise ArtifactError(f"{path} lists {rel!r}, which is not an exported file; re-export the artifact")
        with open_inside(directory, rel) as (fd, _):
            if verify and _sha256_fd(fd, directory / rel) != digest:
                raise ArtifactError(
                    f"{directory / rel} was modified after export (sha256 mismatch); re-export the artifact"
                )
    return manifest


def _sha256_fd(fd: int, name: Path) -> str:
    digest = hashlib.sha256()
    try:
        while chunk := os.read(fd, _CHUNK):
            digest.update(chunk)
    except OSError as exc:
        raise ArtifactError(f"{name} cannot be read ({exc.strerror})") from None
    return digest.hexdigest()


def read_artifact_file(directory: str | Path, manifest: Manifest, rel: str, limit: int) -> bytes:
    """The bytes of a file the runtime reads from an artifact: it must be listed (and so hashed) in
    the manifest, a regular file inside the artifact, and at most ``limit`` bytes."""
    if rel not in manifest.files:
        raise ArtifactError(f"{Path(directory) / rel} is not listed in {MANIFEST_NAME}; re-export the artifact")
    return read_inside(directory, rel, limit)


# ---------------------------------------------------------------------- helpers
class Terminated(KeyboardInterrupt):
    """Raised in the main thread when SIGTERM arrives under :func:`sigterm_raises` (export, :func:`write_artifact`)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(f"terminated by signal {signum}")


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` for the duration; restore the previous handler after.

    Nests (an inner use restores the outer handler). A no-op outside the main thread. The export
    pipeline runs under it, so SIGTERM during tracing unwinds like Ctrl-C instead of killing the process.
    """
    if not _in_main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGTERM and SIGINT back while the final renames run, so they are never half done.

    A signal that arrives meanwhile is re-raised when the block ends, i.e. after the artifact is in
    place. (Python-level handlers, not ``pthread_sigmask``: a mask covers only the calling thread, and
    the signal may be delivered to any of the engine's threads.)
    """
    if not _in_main_thread():
        yield
        return
    pending: list[int] = []

    def defer(signum: int, frame: object) -> None:
        pending.append(signum)

    previous = {sig: signal.signal(sig, defer) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        for sig in dict.fromkeys(pending):
            signal.raise_signal(sig)  # the handler that was in force decides (raise, ignore, or die)


#: errno values that mean "no room left": the disk is full, or the user's quota is spent.
_NO_SPACE = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if e is not None)


def _disk_full_error(exc: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT OSError behind ``exc`` (itself, its cause or its context), if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _NO_SPACE:
            return current
        current = current.__cause__ or current.__context__
    return None


def _tree_bytes(root: Path) -> int:
    total = 0
    for path in root.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file():
                total += path.stat().st_size
    return total


def _disk_full_message(out: Path, exc: OSError, written: int) -> str:
    try:
        free = f"{shutil.disk_usage(out.parent).free / 2**20:.0f} MiB"
    except OSError:
        free = "unknown space"
    reason = exc.strerror or os.strerror(exc.errno or errno.ENOSPC)
    return (
        f"disk full while writing {out}: {reason} after {written / 2**20:.1f} MiB "
        f"({free} free on that filesystem); free space or choose another --output"
    )
