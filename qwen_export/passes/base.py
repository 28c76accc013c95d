"""The pass contract: a pass mutates an ``onnx_ir`` model in place and reports what it did."""

from __future__ import annotations

import contextlib
import dataclasses
import io
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

from qwen_export.errors import QwenExportError


@dataclasses.dataclass(frozen=True)
class PassContext:
    """What the passes read: the export's options that concern them, typed."""

    strict: bool = True  # a fusion firing fewer times than the architecture needs is an error
    explain: Any = None  # a text stream for --explain reports (``write(str)``), or None
    max_length: int = 4096  # the artifact's context (rotary tables, KV buffers)
    quant: Any = None  # QuantScheme of the weight quantization, or None
    accuracy_level: int = 4  # MatMulNBits' activation accuracy
    calibration_stats: Any = None  # AWQ: collect_activation_stats' result


@dataclasses.dataclass
class PassReport:
    """What the passes report beyond their PassResult (it goes into the manifest)."""

    #: weights the quantization kept in the model dtype -> why
    quantization_kept: dict[str, str] = dataclasses.field(default_factory=dict)
    #: pre-quantized (AWQ/GPTQ) sources: weights the scheme could not take as stored -> why
    quantization_requantized: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class PassResult:
    name: str
    changed: bool
    fired: dict[str, int]  # rule name -> times it fired
    nodes_before: int
    nodes_after: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


Pass = Callable[[Any], PassResult]


def op_histogram(model: Any) -> Counter[str]:
    """Op type counts of the main graph (domain-qualified for non-default domains)."""
    return Counter((f"{n.domain}::" if n.domain not in ("", "ai.onnx") else "") + n.op_type for n in model.graph)


MS_DOMAIN = "com.microsoft"


class FusionError(QwenExportError):
    """A fusion pass fired fewer times than the model's architecture requires."""


def require_count(pass_name: str, what: str, fired: int, expected: int | None, where: str) -> None:
    """Strict mode: raise :class:`FusionError` when a fusion fired fewer times than expected."""
    if expected is not None and fired < expected:
        raise FusionError(
            f"{pass_name} pass fused {fired} {what}, expected {expected}: the traced subgraph no longer "
            f"matches its pattern (see {where}); rerun with --explain to see why, or export with --no-strict"
        )


def constant_array(value: ir.Value | None, limit: int = 1 << 16) -> np.ndarray | None:
    """The numpy value of a small constant (initializer or folded constant), else None."""
    if value is None or value.const_value is None or value.const_value.size > limit:
        return None
    return np.asarray(value.const_value.numpy())


def explain_to(stream: Any, pass_name: str, apply: Callable[[Any], int]) -> int:
    """Run ``apply(tracer=None)`` (the rewrite); with a stream, then dry-run ``apply(tracer)`` on the
    rewritten model (onnxscript's MatchingTracer changes nothing) and write the report of each
    rule's nearest misses, i.e. why what was left unfused did not match."""
    fired = apply(None)
    if stream is None:
        return fired
    from onnxscript.rewriter._basics import MatchingTracer

    tracer = MatchingTracer()
    apply(tracer)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        tracer.report()
    stream.write(f"--- {pass_name}: fired {fired} time(s); nearest misses left:\n{buffer.getvalue() or '(none)'}\n")
    return fired
