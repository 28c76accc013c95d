"""Run a target's pass list: check each pass's preconditions, run it, check the graph after it,
record its result (they go into ``manifest.json``) and hand the model to ``dump(phase, model)``
(``--dump-dir``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qwen_export.passes.base import FusionError, Pass, op_histogram
from qwen_export.spec import KVLayout


def run_passes(
    model: Any, passes: list[Pass], layout: KVLayout, dump: Callable[[str, Any], None]
) -> tuple[list[dict[str, Any]], KVLayout]:
    """Run ``passes`` on ``model`` in place; return the pass records and the KV layout.

    A non-strict fused export whose attention did not fuse (the last pass, the shared KV buffer,
    changed nothing) falls back to the concat layout.
    """
    records = []
    outputs = [v.name for v in model.graph.outputs]
    for p in passes:
        _check_requires(p, model)
        result = p(model)
        _check_graph(result.name, model, outputs)
        records.append(result.to_dict())
        dump(result.name, model)
    if layout is KVLayout.SHARED and not records[-1]["changed"]:
        layout = KVLayout.CONCAT
    return records, layout


def _check_requires(p: Any, model: Any) -> None:
    """Precondition: a pass that lowers an earlier pass's output names the ops it needs."""
    needed = getattr(p, "requires_ops", ())
    present = op_histogram(model)
    missing = [op for op in needed if op not in present]
    strict = getattr(p, "strict_expected", None) is not None or getattr(p, "strict", False)
    if missing and strict:
        raise FusionError(f"{p.name} pass needs {', '.join(missing)} in the graph; an earlier fusion did not run")


def _check_graph(pass_name: str, model: Any, outputs: list[str]) -> None:
    """Postcondition of every pass: graph outputs keep their names and every node input is defined
    before use (graph input, initializer or an earlier node's output)."""
    if [v.name for v in model.graph.outputs] != outputs:
        raise FusionError(f"{pass_name} pass changed the graph outputs; this is a bug in the pass")
    defined = {id(v) for v in model.graph.inputs} | {id(v) for v in model.graph.initializers.values()}
    for node in model.graph:
        for value in node.inputs:
            if value is not None and id(value) not in defined and value.producer() is not None:
                raise FusionError(
                    f"{pass_name} pass left {node.name or node.op_type} reading {value.name} before it is computed"
                )
            if value is not None and value.producer() is None and id(value) not in defined:
                raise FusionError(f"{pass_name} pass left {node.name or node.op_type} reading undefined {value.name}")
        defined.update(id(v) for v in node.outputs)
