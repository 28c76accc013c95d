"""The pass contract: a pass rewrites an ``onnx_ir`` model in place and reports what it did.

Every pass is a :class:`GraphPass`, an ``onnx_ir.passes.InPlacePass``. Its body,
:meth:`GraphPass.rewrite`, only rewrites the model and returns its rule counts; ``p(model)`` runs,
in this order, the preconditions (:meth:`GraphPass.requires`: the ops an earlier pass must have
produced), :meth:`GraphPass.call` (the op histogram before and after the body, the ``--explain``
report, the strict count, the :class:`PassResult`) and the postconditions
(:meth:`GraphPass.ensures`: the graph outputs keep their names, every node input is defined before
use). A violated condition or a short strict count raises :class:`FusionError`.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import io
from collections import Counter
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchingTracer

from qwen_export.errors import QwenExportError
from qwen_export.onnx_writer import qualified_op


@dataclasses.dataclass(frozen=True)
class PassContext:
    """What the passes read: the export's options that concern them, typed."""

    strict: bool = True  # a fusion firing fewer times than the architecture needs is an error
    explain: Any = None  # a text stream for --explain reports (``write(str)``), or None
    max_length: int = 4096  # the artifact's context (rotary tables, KV buffers)
    quant: Any = None  # QuantScheme of the weight quantization, or None
    accuracy_level: int = 4  # MatMulNBits' activation accuracy
    calibration_stats: Any = None  # AWQ: collect_activation_stats' result
    kv_ranges: Any = None  # --kv-cache int8: collect_kv_ranges' per-layer (key, value) maxima


@dataclasses.dataclass
class PassReport:
    """What the passes report beyond their PassResult (it goes into the manifest)."""

    #: weights the quantization kept in the model dtype -> why
    quantization_kept: dict[str, str] = dataclasses.field(default_factory=dict)
    #: pre-quantized (AWQ/GPTQ) sources: weights the scheme could not take as stored -> why
    quantization_requantized: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PassResult(ir.passes.PassResult):
    """onnx_ir's result (``model``, ``modified``) and the pass record that goes into the manifest."""

    name: str
    fired: dict[str, int]  # rule name -> times it fired
    nodes_before: int
    nodes_after: int

    @property
    def changed(self) -> bool:
        return self.modified

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "changed": self.modified,
            "fired": dict(self.fired),
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
        }


def op_histogram(model: Any) -> Counter[str]:
    """Op type counts of the main graph (domain-qualified for non-default domains)."""
    return Counter(qualified_op(n.domain, n.op_type) for n in model.graph)


MS_DOMAIN = "com.microsoft"


class FusionError(QwenExportError):
    """A fusion pass fired fewer times than the model's architecture requires."""


class FusionPreconditionError(FusionError, ir.passes.PreconditionError):
    """A pass's input lacks what an earlier pass should have produced."""


class FusionPostconditionError(FusionError, ir.passes.PostconditionError):
    """A pass left the graph broken (renamed outputs, a value read before it is computed)."""


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


class GraphPass(ir.passes.InPlacePass):
    """A pass of a target's pass list (see the module docstring).

    Subclasses set :attr:`name` and implement :meth:`rewrite`; the class attributes below declare
    what :meth:`call`, :meth:`requires` and :meth:`ensures` check and report.
    """

    #: the pass's name in the manifest, the messages and the ``--dump-dir`` phases
    name: ClassVar[str]
    #: ops (``domain::op`` outside the default domain) the pass lowers: an earlier pass made them
    requires_ops: ClassVar[tuple[str, ...]] = ()
    #: strict count: the rule that must fire :attr:`strict_expected` times, and what it fuses
    counted: ClassVar[tuple[str, str] | None] = None
    #: --explain: a heading for the one report written after the body (every count, then
    #: :meth:`left_alone`); None when the body reports per rule set (:meth:`apply_rules`, :meth:`report_misses`)
    explain_heading: ClassVar[str | None] = None

    strict_expected: int | None = None  # minimum count of the :attr:`counted` rule (None: not strict)
    strict: bool = False  # strict without a count (a missing required op is an error)
    explain: Any = None  # a text stream for --explain reports (``write(str)``), or None
    _outputs: list[str | None]  # the graph output names before the run (:meth:`requires`)

    @abc.abstractmethod
    def rewrite(self, model: ir.Model) -> dict[str, int]:
        """Rewrite ``model`` in place; return how many times each rule fired."""

    def modified(self, before: Counter[str], after: Counter[str]) -> bool:
        """Whether the body changed the model (default: its op histogram changed)."""
        return before != after

    def left_alone(self) -> list[str]:
        """With :attr:`explain_heading`: one line per thing the body left alone, and why."""
        return []

    def call(self, model: ir.Model) -> PassResult:
        before = op_histogram(model)
        fired = self.rewrite(model)
        if self.explain_heading is not None:
            self._explain(self.name, f"{fired}; {self.explain_heading}", self.left_alone())
        if self.counted is not None:
            rule, what = self.counted
            where = type(self).__module__.replace(".", "/") + ".py"
            require_count(self.name, what, fired[rule], self.strict_expected, where)
        after = op_histogram(model)
        return PassResult(
            model,
            self.modified(before, after),
            name=self.name,
            fired=fired,
            nodes_before=sum(before.values()),
            nodes_after=sum(after.values()),
        )

    def requires(self, model: ir.Model) -> None:
        """A pass that lowers an earlier pass's output needs its ops (an error when strict)."""
        self._outputs = [v.name for v in model.graph.outputs]
        if not self.requires_ops:
            return
        present = op_histogram(model)
        missing = [op for op in self.requires_ops if op not in present]
        if missing and (self.strict_expected is not None or self.strict):
            raise FusionPreconditionError(
                f"{self.name} pass needs {', '.join(missing)} in the graph; an earlier fusion did not run"
            )

    def ensures(self, model: ir.Model) -> None:
        """Graph outputs keep their names and every node input is defined before use (graph input,
        initializer or an earlier node's output)."""
        if [v.name for v in model.graph.outputs] != self._outputs:
            raise FusionPostconditionError(f"{self.name} pass changed the graph outputs; this is a bug in the pass")
        graph = model.graph
        defined = {id(v) for v in graph.inputs} | {id(v) for v in graph.initializers.values()}
        for node in graph:
            for value in node.inputs:
                if value is None or id(value) in defined:
                    continue
                where = node.name or node.op_type
                if value.producer() is not None:
                    raise FusionPostconditionError(
                        f"{self.name} pass left {where} reading {value.name} before it is computed"
                    )
                raise FusionPostconditionError(f"{self.name} pass left {where} reading undefined {value.name}")
            defined.update(id(v) for v in node.outputs)

    def apply_rules(self, model: ir.Model, rules: Any, part: str | None = None) -> int:
        """Apply an onnxscript rewrite rule set; return how many times it fired. With --explain,
        dry-run it on the rewritten model with onnxscript's MatchingTracer (which changes nothing)
        and report each rule's nearest misses, i.e. why what was left unfused did not match."""
        fired = rules.apply_to_model(model)
        if self.explain is not None:
            tracer = MatchingTracer()
            rules.apply_to_model(model, tracer=tracer)
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                tracer.report()
            self.report_misses(fired, [buffer.getvalue()], part)
        return fired

    def report_misses(self, fired: int, misses: list[str], part: str | None = None) -> None:
        """--explain: a rule set (``<name>/<part>``) fired ``fired`` times and left ``misses``."""
        section = self.name if part is None else f"{self.name}/{part}"
        self._explain(section, f"fired {fired} time(s); nearest misses left", misses)

    def _explain(self, section: str, summary: str, lines: list[str]) -> None:
        if self.explain is not None:
            self.explain.write(f"--- {section}: {summary}:\n{chr(10).join(lines) or '(none)'}\n")


#: what a target's pass list holds
Pass = GraphPass
