"""Trace the Qwen-VL vision tower (:mod:`.vision_modeling`) to ONNX and bind its weights to the
checkpoint, lazily, as :mod:`.trace` does for the decoder.

Checkpoint names: the released checkpoints store the tower under ``visual.``; transformers 5 saves
it under ``model.visual.``. Both are read. The patch embedding's Conv3d kernel
``[embed, C, T, P, P]`` is flattened to the ``[C*T*P*P, embed]`` matrix the graph multiplies by
(the processor's patch layout is (C, T, P, P), the kernel's order).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qwen_export.errors import CheckpointError
from qwen_export.export.trace import export_module
from qwen_export.vision import VisionSpec
from qwen_export.weights import CheckpointTensor, WeightSource, _Binding

VISION_INPUTS = ("pixel_values", "position_ids", "segment_ids", "window_slots", "window_mask", "window_rows")
VISION_OUTPUT = "image_embeds"
_PREFIXES = ("visual.", "model.visual.")
_TRACE_PATCHES = 32  # patches in the traced example (a multiple of every merge unit); symbolic after


def input_names(spec: VisionSpec) -> list[str]:
    return list(VISION_INPUTS if spec.windowed else VISION_INPUTS[:3])


def trace_vision(spec: VisionSpec) -> ir.Model:
    """The vision tower as an ONNX IR model; initializers carry no data yet (:func:`bind_vision`)."""
    import torch

    from qwen_export.export.vision_modeling import VisionTower

    n = _TRACE_PATCHES
    with torch.device("meta"):
        module = VisionTower(spec).eval()
        args: tuple = (
            torch.zeros(n, spec.patch_dim),
            torch.zeros(n, 2, dtype=torch.int64),
            torch.zeros(n, dtype=torch.int64),
        )
        if spec.windowed:
            windows, width = 3, spec.window_patches  # a traced example; only the shapes matter
            args += (
                torch.zeros(windows, width, dtype=torch.int64),
                torch.zeros(windows, width),
                torch.zeros(n, dtype=torch.int64),
            )
    patches = torch.export.Dim("patches", min=spec.merge_unit)
    shapes: tuple = ({0: patches}, {0: patches}, {0: patches})
    if spec.windowed:
        windows_dim = torch.export.Dim("windows", min=1)
        shapes += ({0: windows_dim}, {0: windows_dim}, {0: patches})
    model = export_module(module, args, input_names(spec), [VISION_OUTPUT], shapes)
    _name_dims(model)
    return model


def _name_dims(model: ir.Model) -> None:
    patches, tokens, windows = ir.SymbolicDim("patches"), ir.SymbolicDim("image_tokens"), ir.SymbolicDim("windows")
    for value in model.graph.inputs:
        assert value.shape is not None
        first = windows if value.name in ("window_slots", "window_mask") else patches
        value.shape = ir.Shape([first, *value.shape.dims[1:]])
    out = model.graph.outputs[0]
    assert out.shape is not None
    out.shape = ir.Shape([tokens, out.shape.dims[1]])


def checkpoint_prefix(source: WeightSource, names: list[str]) -> str:
    """``visual.`` or ``model.visual.``: where this checkpoint keeps the vision tower."""
    for prefix in _PREFIXES:
        if any(name.startswith(prefix) for name in names):
            return prefix
    raise CheckpointError("the checkpoint has no vision tower (no tensor under visual. or model.visual.)")


def vision_inv_freq(spec: VisionSpec) -> np.ndarray:
    """The 2-D rotary's inverse frequencies, computed by torch in float32 as transformers does."""
    import torch

    dim = spec.head_dim // 2
    inv = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    return inv.numpy().astype(np.float32)


def _binding(name: str, spec: VisionSpec, source: WeightSource, prefix: str) -> _Binding:
    if name == "rotary_inv_freq":
        return _Binding(None, computed=lambda: vision_inv_freq(spec))
    if name == "patch_embed.proj.weight_t":
        hf = prefix + "patch_embed.proj.weight"
        return _Binding(None, computed=lambda: source.read(hf).reshape(spec.embed_dim, spec.patch_dim).T)
    if name.endswith(".weight_t"):
        return _Binding(prefix + name[: -len("_t")], transpose=True)
    return _Binding(prefix + name)


def bind_vision(model: ir.Model, spec: VisionSpec, source: WeightSource, names: list[str]) -> None:
    """Attach a lazy checkpoint tensor to every initializer (float32)."""
    prefix = checkpoint_prefix(source, names)
    for name, value in model.graph.initializers.items():
        shape = tuple(int(d) for d in value.shape.dims)  # type: ignore[union-attr]
        binding = _binding(name, spec, source, prefix)
        if binding.hf_name is not None and binding.hf_name not in names:
            raise CheckpointError(
                f"the checkpoint has no tensor {binding.hf_name} (vision tower of {spec.family.value})"
            )
        value.const_value = CheckpointTensor(source, binding, shape, ir.DataType.FLOAT, name)


def export_vision(
    source: WeightSource,
    names: list[str],
    spec: VisionSpec,
    out_dir: Path,
    stem: str = "vision",
    rewrite: Callable[[ir.Model], None] | None = None,
) -> Path:
    """Write ``out_dir/<stem>.onnx`` (+ ``.onnx.data``) for the tower; return the model path.
    ``rewrite``: applied to the bound graph before it is written (e.g. int8 weights)."""
    from qwen_export.onnx_writer import write_onnx

    model = trace_vision(spec)
    bind_vision(model, spec, source, names)
    if rewrite is not None:
        rewrite(model)
    write_onnx(model, out_dir, f"{stem}.onnx", f"{stem}.onnx.data")
    return out_dir / f"{stem}.onnx"
