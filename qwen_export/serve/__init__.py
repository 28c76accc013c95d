"""``qwen-export serve``: an OpenAI-compatible HTTP server over an artifact (FastAPI + uvicorn, the
``serve`` extra). ``create_app(llm_or_artifact, api_key=..., max_queue=..., model_name=...)`` builds
the ASGI app; see :mod:`qwen_export.serve.app`. The runtime library does not import this package."""

from __future__ import annotations

from typing import Any

__all__ = ["create_app", "require_serve_extra"]

INSTALL = 'pip install "qwen-export[serve]"'


def require_serve_extra() -> None:
    """MissingDependencyError (one line) unless FastAPI and uvicorn are installed."""
    import importlib.util

    from qwen_export.errors import MissingDependencyError

    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingDependencyError(f"serving needs {' and '.join(missing)}: {INSTALL}")


def create_app(llm_or_artifact: Any, **options: Any) -> Any:
    """:func:`qwen_export.serve.app.create_app` (imported here: FastAPI is needed only to serve)."""
    require_serve_extra()
    from qwen_export.serve.app import create_app as build

    return build(llm_or_artifact, **options)
