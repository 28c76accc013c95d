"""Session-scoped exports of the tiny checkpoints (each variant is exported once per test run)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from qwen_export.export.pipeline import ExportOptions
from qwen_export.export.pipeline import export as run_export
from qwen_export.export.tiny import make_checkpoint
from qwen_export.spec import DType, LogitsMode, Target


@pytest.fixture(scope="session")
def qwen2_sliding(tiny_root: Path) -> Path:
    """Qwen2, 3 layers: full attention, then two sliding-window layers (window 8)."""
    return make_checkpoint(tiny_root / "qwen2_sliding", "qwen2", tied=True, sliding=True, sliding_window=8, layers=3)


@pytest.fixture(scope="session")
def export(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``export(case, dtype="fp32", logits="last", fuse=True, target="onnxruntime") -> artifact dir``;
    cached for the session."""
    cache: dict[tuple[str, str, str, bool, str], Path] = {}
    root = tmp_path_factory.mktemp("artifacts")

    def run(
        case: str, dtype: str = "fp32", logits: str = "last", fuse: bool = True, target: str = "onnxruntime"
    ) -> Path:
        key = (case, dtype, logits, fuse, target)
        if key not in cache:
            checkpoint = request.getfixturevalue(case)
            out = root / f"{case}-{dtype}-{logits}{'' if fuse else '-unfused'}-{target}"
            options = ExportOptions(
                target=Target.parse(target), dtype=DType.parse(dtype), logits=LogitsMode.parse(logits), fuse=fuse
            )
            run_export(checkpoint, out, options)
            cache[key] = out
        return cache[key]

    return run
