"""The pass contract: a pass mutates an ``onnx_ir`` model in place and reports what it did."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any


@dataclasses.dataclass(frozen=True)
class PassResult:
    name: str
    changed: bool
    fired: dict[str, int]  # rule name -> times it fired
    nodes_before: int
    nodes_after: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def op_histogram(model: Any) -> Counter[str]:
    """Op type counts of the main graph (domain-qualified for non-default domains)."""
    return Counter((f"{n.domain}::" if n.domain not in ("", "ai.onnx") else "") + n.op_type for n in model.graph)
