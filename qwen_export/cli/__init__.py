"""The ``qwen-export`` command line (typer). Thin: parse options, call the library, print.

One module per command (``export``, ``build_engine``, ``convert_gguf``, ``generate``, ``chat``, ``perplexity``,
``check``, ``inspect``, ``bench``, ``serve``, ``demo``), each registering itself on the shared :data:`app` of
:mod:`.common` (with the consoles, error handling and shared options). Every deliberate error
(:class:`~qwen_export.errors.QwenExportError`) is printed as one ``error: ...`` line on stderr with
exit status 2; no command leaves a half-written artifact behind.
"""

from __future__ import annotations

from qwen_export.cli.common import app

# isort: off
# each command module registers its command on ``app`` when imported: this order is --help's
from qwen_export.cli import export, build_engine, convert_gguf, generate, chat, check  # noqa: F401
from qwen_export.cli import perplexity, inspect, bench, serve, demo  # noqa: F401

# isort: on

__all__ = ["app", "main"]


def main() -> None:
    app()
