"""The target registry: one package per target, each exposing one ``TARGET`` object.

The export pipeline, the loader, the LLM and the CLI name no target: they ask :func:`get` for the
:class:`~qwen_export.targets.protocol.TargetBackend` of a :class:`~qwen_export.spec.Target` and call
its methods. A target package imports its engine SDK only inside its engine module, lazily, so
looking a target up costs nothing. Adding a target is one package here plus one line in
``_PACKAGES`` (and its member of :class:`~qwen_export.spec.Target`); docs/architecture.md walks
through it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from qwen_export.spec import Target

if TYPE_CHECKING:
    from qwen_export.targets.protocol import TargetBackend

#: target -> the package whose ``TARGET`` implements it
_PACKAGES: dict[Target, str] = {
    Target.ONNXRUNTIME: "qwen_export.targets.onnxruntime",
    Target.OPENVINO: "qwen_export.targets.openvino",
    Target.TENSORRT: "qwen_export.targets.tensorrt",
}


def get(target: Target | str) -> TargetBackend:
    """The backend of ``target`` (an enum member or its name)."""
    return importlib.import_module(_PACKAGES[Target.parse(target, "target")]).TARGET


def registered() -> list[TargetBackend]:
    """Every registered backend, in registry order."""
    return [get(target) for target in _PACKAGES]
