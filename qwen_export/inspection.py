"""What ``qwen-export inspect`` shows: op histogram, node count and file sizes of an artifact."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from .artifact import Manifest


def describe(artifact: str | Path, manifest: Manifest) -> dict[str, Any]:
    """Op histogram of the engine graph (weights are not loaded) and every file's size in bytes."""
    import onnx

    root = Path(artifact)
    info: dict[str, Any] = {"manifest": manifest.__dict__, "files": {}}
    for name in sorted(manifest.files):
        info["files"][name] = (root / name).stat().st_size
    model_file = root / "model.onnx"
    if model_file.is_file():
        model = onnx.load(str(model_file), load_external_data=False)
        ops = Counter(
            (f"{n.domain}::" if n.domain not in ("", "ai.onnx") else "") + n.op_type for n in model.graph.node
        )
        info["ops"] = dict(ops.most_common())
        info["nodes"] = sum(ops.values())
        info["initializers"] = len(model.graph.initializer)
    return info
