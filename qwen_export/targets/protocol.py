"""What a target implements (:class:`TargetBackend`) and what the export hands it (:class:`EmitJob`).

A target is a frozen dataclass in its own package (``targets/<name>/__init__.py``, exported as
``TARGET``); it decides, for its engine: how the graph is traced (KV-cache IO, graph dtype), which
export options apply and how they adapt (printing what changed; options only some targets take are
listed in ``own_options``), its pass list, how the artifact is written, how an artifact is opened
for inference (and its engine options built from plain load options), and what ``inspect`` adds.
Methods import their heavy pieces (passes, lowering, the engine SDK) lazily, so the runtime side can
look a target up without importing torch, onnxscript or another target's SDK.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from qwen_export.spec import CacheIO, DType, KVLayout, ModelSpec, Target

if TYPE_CHECKING:
    from qwen_export.artifact import Manifest
    from qwen_export.passes.base import Pass, PassContext, PassReport
    from qwen_export.quant.scheme import QuantScheme
    from qwen_export.targets.base import Engine


@dataclasses.dataclass(frozen=True)
class EmitJob:
    """What the export pipeline knows when it writes the engine files of an artifact."""

    spec: ModelSpec
    source: Path  # the checkpoint directory (config.json, tokenizer files)
    dtype: DType  # the export's --dtype (weights); the graph's is ``TargetBackend.graph_dtype``
    max_length: int
    kv_layout: KVLayout
    max_batch: int = 1
    turn_end_token_id: int | None = None  # tokenizer_config's eos token (<|im_end|> for Qwen instruct)
    #: ``export --prefill int8`` (ONNX Runtime): the RMSNorm outputs' per-channel peaks
    #: (:func:`~qwen_export.export.calibration.collect_norm_peaks`); None: no prefill graph
    prefill_peaks: dict[str, Any] | None = None
    progress: Callable[[int, int], None] = lambda done, total: None
    message: Callable[[str], None] = lambda text: None


class TargetBackend(Protocol):
    #: the enum member this backend implements
    target: Target
    #: how the traced graph passes the KV cache
    cache_io: CacheIO
    #: engines that run its artifacts, its own first (a TensorRT artifact also runs on ONNX Runtime)
    engines: tuple[Target, ...]
    #: the RuntimeOptions field holding this engine's own options (None: it has none)
    options_field: str | None
    #: ``export_options()`` keywords only this target takes (given for another target: OptionError)
    own_options: frozenset[str]
    #: the ``load()`` keywords (CLI flags) that make its engine options (``engine_options``)
    load_options: tuple[str, ...]
    #: the Python module its CPU runs need (what a test skips on when it is missing)
    cpu_module: str
    #: its quantized weights may have zero points (asymmetric schemes)
    zero_points: bool
    #: an int4 export may keep some linears at 8 bits (``--int8``, mixed precision)
    mixed_bits: bool
    #: the int4 default's layout for an untied lm_head (blocks of 128 for the 8-bit attention and the
    #: embedding: :data:`~qwen_export.export.options.UNTIED_BLOCKS`) applies to it
    small_blocks_fast: bool
    #: its int4 files may store block scales in one byte a block (``--scales log8``,
    #: :class:`~qwen_export.quant.scheme.ScaleFormat`)
    log_scales: bool

    def cpu_runs(self) -> dict[str, dict[str, Any]]:
        """How its artifacts are verified on a CPU-only machine (every parity test runs each):
        label -> the RuntimeOptions fields of that run."""
        ...

    def graph_dtype(self, dtype: DType) -> DType:
        """The traced graph's dtype for an export at ``dtype``."""
        ...

    def adapt_weights(
        self, quant: QuantScheme | None, given: Mapping[str, Any], message: Callable[[str], None]
    ) -> QuantScheme | None:
        """Before the ExportOptions exist: raise OptionError for a given option this target cannot
        honour (``given``: ``export_options()`` keyword -> value, None = not given) and adapt the
        weight scheme the options and the checkpoint chose; ``message`` says what changed."""
        ...

    def check_options(self, options: Any) -> None:
        """Raise OptionError for ExportOptions this target cannot take."""
        ...

    def adapt_options(self, options: Any, message: Callable[[str], None]) -> Any:
        """ExportOptions adapted to what the engine accepts; ``message`` says what changed."""
        ...

    def passes(self, spec: ModelSpec, fuse: bool, ctx: PassContext, report: PassReport) -> tuple[list[Pass], KVLayout]:
        """The pass list and the KV layout it produces."""
        ...

    def emit(self, model: Any, out: Path, job: EmitJob) -> dict[str, Any]:
        """Write the engine files into ``out``; return manifest extras (``io``: the IO signature)."""
        ...

    def open_engine(self, root: Path, manifest: Manifest, options: Any) -> Engine:
        """This target's engine over the artifact at ``root`` (``options``: RuntimeOptions)."""
        ...

    def engine_options(self, threads: int, given: Mapping[str, Any], engine: Target | None) -> Any:
        """The value of this engine's RuntimeOptions field (``options_field``) from the plain load
        options ``given`` (``load()`` keyword -> value, None = not given): None when none of its own
        was given. ``engine``: the engine asked for (None: the artifact's own). OptionError for a bad
        value or one that cannot apply to ``engine``."""
        ...

    def inspect_lines(self, root: Path, manifest: Manifest) -> list[str]:
        """What ``qwen-export inspect`` adds for this target's manifest extras (none: ``[]``)."""
        ...

    def foreign_options_error(self, root: Path, artifact: Target) -> str:
        """Why this engine's own options cannot apply to a ``artifact`` artifact at ``root``."""
        ...
