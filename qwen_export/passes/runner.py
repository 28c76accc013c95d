"""Run a target's pass list: each pass checks its preconditions, runs and checks the graph after it
(:class:`~qwen_export.passes.base.GraphPass`); record its result (they go into ``manifest.json``)
and hand the model to ``dump(phase, model)`` (``--dump-dir``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qwen_export.passes.base import Pass
from qwen_export.spec import KVLayout


def run_passes(
    model: Any, passes: list[Pass], layout: KVLayout, dump: Callable[[str, Any], None]
) -> tuple[list[dict[str, Any]], KVLayout]:
    """Run ``passes`` on ``model`` in place; return the pass records and the KV layout.

    A non-strict fused export whose attention did not fuse (the last pass, the shared KV buffer,
    changed nothing) falls back to the concat layout.
    """
    records = []
    for p in passes:
        result = p(model)
        records.append(result.to_dict())
        dump(result.name, model)
    if layout is KVLayout.SHARED and not records[-1]["changed"]:
        layout = KVLayout.CONCAT
    return records, layout
