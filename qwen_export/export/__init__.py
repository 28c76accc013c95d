"""The export side: checkpoint in, artifact out. :func:`export` is the library's one call; it does
what ``qwen-export export`` does (the same option policy, :func:`~.options.export_options`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qwen_export.artifact import Manifest


def export(
    checkpoint: str | Path,
    out: str | Path,
    *,
    message: Callable[[str], None] | None = None,
    **flags: Any,
) -> Manifest:
    """Export ``checkpoint`` (a directory, or a Hugging Face model id: :mod:`.hub`) to the artifact
    directory ``out`` and return its manifest.

    ``flags`` are ``qwen-export export``'s flags as keywords (``target="openvino"``,
    ``weights="int4"``, ``block_size=64``, ...; see :func:`~.options.export_options`); ``message``
    hears what the target changed and the ``explain`` reports. A pre-quantized checkpoint keeps its
    quantization by default, as on the command line.
    """
    from qwen_export.export.hub import resolve_checkpoint
    from qwen_export.export.options import export_options
    from qwen_export.export.pipeline import ExportHooks
    from qwen_export.export.pipeline import export as run_export

    checkpoint = resolve_checkpoint(checkpoint)  # a Hugging Face model id: its snapshot in the local cache
    sink = message or (lambda text: None)
    options = export_options(checkpoint, message=sink, **flags)
    return run_export(checkpoint, out, options, ExportHooks(message=sink))
