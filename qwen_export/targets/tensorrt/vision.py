"""TensorRT target: the vision tower of a Qwen2-VL / Qwen2.5-VL artifact.

A VL artifact's ``vision.onnx`` (float32, standard ops, the same file the other targets run) is
built by ``build-engine`` into a second plan beside the decoder's, ``engines/<slug>.vision.plan``,
with one optimization profile over the number of patches: from one merge unit up to the largest
image the checkpoint's preprocessor makes (``manifest.extra.multimodal.max_image_patches``,
recorded at export from ``max_pixels``), opt a 448x448 image. Qwen2.5-VL's windowed blocks add
the window inputs, up to one window per merged token. :class:`TensorRTVision` runs it: one
execution context, each image's inputs copied to the device, the merged features
[patches / merge_unit, out_hidden] into a device buffer and back to the host.

As the rest of this target, run here only against the stand-in ``tensorrt`` module of the tests
(which executes ``vision.onnx`` with ONNX Runtime on the bound tensors), never with a real
TensorRT (see :mod:`.build`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from qwen_export.errors import ArtifactError, GenerationError
from qwen_export.vision import VisionSpec

__all__ = ["TensorRTVision", "build_vision", "vision_plan_path", "vision_recipe"]

VISION_FILE = "vision.onnx"
PLAN_SUFFIX = ".vision.plan"
#: the opt shape of the patch dimension: a 448x448 image at patch 14 (1,024 patches)
OPT_PATCHES = 1024
#: the vision graph's integer inputs (the rest are float32)
_INT64_INPUTS = ("position_ids", "segment_ids", "window_slots", "window_rows")


def vision_plan_path(decoder_plan: Path) -> Path:
    """``engines/<slug>.vision.plan`` beside the decoder's ``engines/<slug>.plan``."""
    return decoder_plan.with_name(decoder_plan.stem + PLAN_SUFFIX)


def vision_recipe(vision: VisionSpec, max_patches: int, inputs: list[str], workspace: int) -> dict[str, Any]:
    """The tower's build recipe: one profile ``vision`` over the patch count (pure, JSON-ready).
    ``inputs``: the graph's input names (``manifest.extra.multimodal.vision_inputs``)."""
    unit = vision.merge_unit
    top = max(unit, max_patches // unit * unit)
    patches = (unit, min(OPT_PATCHES, top), top)
    windows = (1, max(1, patches[1] // max(1, vision.window_patches)), top // unit)
    width = vision.window_patches
    per_input = {
        "pixel_values": lambda p, w: [p, vision.patch_dim],
        "position_ids": lambda p, w: [p, 2],
        "segment_ids": lambda p, w: [p],
        "window_slots": lambda p, w: [w, width],
        "window_mask": lambda p, w: [w, width],
        "window_rows": lambda p, w: [p],
    }
    unknown = sorted(set(inputs) - set(per_input))
    if unknown:
        raise ArtifactError(f"{VISION_FILE}: inputs {unknown} have no TensorRT profile; re-export the artifact")
    shapes = {
        name: {key: per_input[name](patches[i], windows[i]) for i, key in enumerate(("min", "opt", "max"))}
        for name in inputs
    }
    return {
        "onnx": VISION_FILE,
        "strongly_typed": True,
        "workspace": workspace,
        "max_patches": top,
        "profiles": [{"name": "vision", "shapes": shapes}],
    }


def build_vision(
    trt: Any,
    root: Path,
    record: dict[str, Any],
    decoder_plan: Path,
    settings: tuple[Any, int],
    message: Callable[[str], None],
) -> Path:
    """Build ``vision.onnx`` into ``engines/<slug>.vision.plan`` (+ its ``.json``) with the timing
    cache shared with the decoder's build; ``settings``: the build's BuildOptions and workspace
    (bytes). Return the plan's path."""
    options, workspace = settings
    from qwen_export.targets.tensorrt.build import _atomic_write, _configure, _parse

    vision = VisionSpec.from_dict(record["vision"])
    max_patches = int(record.get("max_image_patches") or 0)
    if max_patches < vision.merge_unit:
        raise ArtifactError(f"{root}: the artifact records no max_image_patches for its vision tower; re-export it")
    used = vision_recipe(vision, max_patches, list(record["vision_inputs"]), workspace)
    onnx_path = root / str(record.get("vision_model", VISION_FILE))
    builder, network, _parser, _logger = _parse(trt, onnx_path, used, message)
    config, cache = _configure(trt, builder, used, options, decoder_plan.parent / "timing.cache", message, root)
    message(f"building the vision tower's engine (patches <= {used['max_patches']})")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ArtifactError(
            f"TensorRT {trt.__version__} could not build an engine from {onnx_path} (the log above says why); "
            "try a larger --workspace"
        )
    path = vision_plan_path(decoder_plan)
    _atomic_write(path, plan)
    _atomic_write(path.with_suffix(".json"), json.dumps({"recipe": used}, indent=1).encode())
    if cache is not None:
        _atomic_write(decoder_plan.parent / "timing.cache", cache.serialize())
    return path


class TensorRTVision:
    """The tower's engine: ``encode(feeds)`` -> merged image features [tokens, out_hidden] float32."""

    def __init__(self, trt: Any, runtime: Any, plan_path: Path, root: Path, vision: VisionSpec, device: Any) -> None:
        from qwen_export.targets.tensorrt.engine import MAX_PLAN_BYTES, _torch, read_built

        if not plan_path.is_file():
            raise ArtifactError(
                f"{root} has no vision engine {plan_path.name} beside its decoder engine; "
                f"build both: qwen-export build-engine {root}"
            )
        self.engine = runtime.deserialize_cuda_engine(read_built(root, plan_path, MAX_PLAN_BYTES))
        if self.engine is None:
            raise ArtifactError(f"{plan_path}: TensorRT could not load it; rebuild: qwen-export build-engine {root}")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in self.inputs]
        if len(outputs) != 1:
            raise ArtifactError(f"{plan_path}: expected one output (the image features), found {outputs}")
        self.output, self.plan_path, self.vision = outputs[0], plan_path, vision
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise GenerationError(f"TensorRT could not create an execution context for {plan_path} (GPU memory?)")
        self._torch, self.device = _torch(), device
        self._live: list[Any] = []  # this call's device tensors (the tests map addresses back to them)

    def tensors(self) -> Iterator[Any]:
        yield from self._live

    def encode(self, feeds: dict[str, np.ndarray], stream: Any = None) -> np.ndarray:
        torch, ctx = self._torch, self.context
        missing = sorted(set(self.inputs) - set(feeds))
        if missing:
            raise GenerationError(f"the vision engine {self.plan_path} needs inputs {missing}")
        patches = int(feeds["pixel_values"].shape[0])
        self._live = []
        for name in self.inputs:
            dtype = np.int64 if name in _INT64_INPUTS else np.float32
            tensor = torch.from_numpy(np.ascontiguousarray(feeds[name], dtype=dtype)).to(self.device)
            self._live.append(tensor)
            if not ctx.set_input_shape(name, tuple(tensor.shape)):
                raise GenerationError(
                    f"the vision engine {self.plan_path} refused {name} of shape {tuple(tensor.shape)} "
                    "(an image larger than the build's max_image_patches?)"
                )
            ctx.set_tensor_address(name, int(tensor.data_ptr()))
        out = torch.empty((patches // self.vision.merge_unit, self.vision.out_hidden_size), device=self.device)
        self._live.append(out)
        ctx.set_tensor_address(self.output, int(out.data_ptr()))
        handle = 0 if stream is None else int(stream.cuda_stream)
        if not ctx.execute_async_v3(handle):
            raise GenerationError(f"TensorRT failed to run {self.plan_path} (execute_async_v3 returned False)")
        if stream is not None:
            stream.synchronize()
        result = out.cpu().numpy().copy()
        self._live = []
        return result
