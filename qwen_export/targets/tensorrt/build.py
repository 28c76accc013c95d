"""TensorRT target, export and build side: the standard-op ONNX graph and its build recipe, and
engines built on the GPU (run by :mod:`qwen_export.targets.tensorrt.engine`).

Three stages::

    export (any machine)   emit(): OUT/model.onnx + model.onnx.data (strongly typed, opset 24,
                           standard ops; fixed-capacity KV buffers written with TensorScatter at
                           ``cache_position``, see passes/kv_tensor_scatter.py) and
                           manifest.extra["tensorrt"] = recipe(...)
    build (on the GPU)     build_engine(): OnnxParser -> two optimization profiles (0 "prefill",
                           1 "decode") -> OUT/engines/<gpu>-sm<cc>-trt<version>.plan (+ .json: the
                           recipe used, TensorRT version, build seconds); the builder's timing
                           cache is kept in OUT/engines/timing.cache. Engines are device-specific
                           and not part of manifest.json's checksums.
    run (on the GPU)       TensorRTEngine: one execution context; torch CUDA tensors as device
                           buffers; each KV buffer [batch, kv_heads, capacity, head_dim] is bound
                           with ``set_tensor_address`` as both ``past_key_values.*`` and
                           ``present.*``: TensorRT imports ONNX TensorScatter as its KV-cache
                           update layer (IKVCacheUpdateLayer, TensorRT 10.15+), which documents
                           exactly this: the cache is a network input, the updated cache a
                           network output, and both must share one device address.

What has and has not been run. TensorRT cannot be installed where this module was written (no
GPU; its wheels fetch libraries from an unreachable host). :func:`recipe` and :func:`emit` run in
the test suite. :func:`build_engine` and :class:`TensorRTEngine` ran only against the stand-in
``tensorrt`` module of ``tests/test_tensorrt_engine.py`` (it records the calls, checks the shapes
against the selected profile and executes model.onnx with ONNX Runtime on the bound CPU tensors):
that checks the control flow (profiles, bindings, in-place KV, truncate, chunked prefill, the
CUDA-graph bookkeeping) and parity with the ONNX Runtime engine, not TensorRT itself. Neither has
been run with a real TensorRT, a GPU, or real CUDA graphs; the test that does is skipped here.

TensorRT Python API used (10.x; names checked against NVIDIA's docs and the Python binding
docstrings in github.com/NVIDIA/TensorRT ``python/docstrings/infer/pyCoreDoc.h`` and
``python/docstrings/parsers/pyOnnxDoc.h``, and the samples ``samples/python/common_runtime.py``,
``samples/python/detectron2/build_engine.py``, ``samples/python/strongly_type_autocast/sample.py``):

- build: ``trt.Logger(trt.Logger.WARNING)``, ``trt.Builder(logger)``,
  ``builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))``,
  ``trt.OnnxParser(network, logger)``, ``parser.parse_from_file(path)`` (external data is read
  next to the file), ``parser.num_errors`` / ``parser.get_error(i)`` (``desc()``, ``node_name()``,
  ``node_operator()``), ``network.num_inputs`` / ``network.get_input(i).name``,
  ``builder.create_builder_config()``,
  ``config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, bytes)``,
  ``config.builder_optimization_level`` (0..5, default 3), ``config.create_timing_cache(blob)``
  (``b""`` = new), ``config.set_timing_cache(cache, ignore_mismatch=False)``,
  ``cache.serialize()``, ``builder.create_optimization_profile()``,
  ``profile.set_shape(name, min, opt, max)``, ``config.add_optimization_profile(profile)``
  (returns the index), ``builder.build_serialized_network(network, config)`` (None on failure).
  Strongly typed networks take their precision from the graph: no FP16/INT8 builder flags are set.
- run: ``trt.Runtime(logger).deserialize_cuda_engine(plan)``, ``engine.num_io_tensors``,
  ``engine.get_tensor_name(i)``, ``engine.get_tensor_mode(name)`` (``trt.TensorIOMode.INPUT``),
  ``engine.num_optimization_profiles``, ``engine.create_execution_context()`` (profile 0 is
  selected by default), ``context.set_optimization_profile_async(index, stream_handle)``,
  ``context.set_input_shape(name, shape)``, ``context.set_tensor_address(name, ptr)``,
  ``context.execute_async_v3(stream_handle)``, with a non-default ``torch.cuda.Stream``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qwen_export.errors import ArtifactError, OptionError
from qwen_export.spec import ModelSpec
from qwen_export.targets.tensorrt.engine import (
    DATA_FILE,
    DEFAULT_WORKSPACE,
    EMBEDS,
    ENGINES_DIR,
    LOGITS_INDICES,
    MODEL_FILE,
    TIMING_CACHE,
    _cuda_device,
    _kv_names,
    _tensorrt_manifest,
    _torch,
    _trt,
    engine_slug,
    read_built,
)


def recipe(
    spec: ModelSpec | dict[str, Any],
    *,
    capacity: int,
    dtype: str,
    max_batch: int,
    max_prompt: int,
    logits_rows: bool = False,
    embeds: bool = False,
) -> dict[str, Any]:
    """The build recipe ``manifest.extra["tensorrt"]`` records (pure Python, JSON-serializable).

    Two optimization profiles, in this order (the engine selects them by index):

    - ``prefill`` (index 0): batch 1..max_batch, sequence 1..max_prompt, attention_width 1..capacity
    - ``decode`` (index 1): batch 1..max_batch, sequence 1, attention_width 1..capacity

    Each maps every input to ``{"min", "opt", "max"}`` shapes. ``logits_rows`` (a ``--logits
    last`` graph, which has the ``logits_indices`` input): its [K] is 1..max_prompt for prefill
    (speculative decoding verifies several tokens in one call), 1 for decode. ``embeds`` (a VL
    decoder): ``inputs_embeds`` [batch, seq, hidden] instead of ``input_ids``, and M-RoPE
    ``position_ids`` [3, batch, seq]. The KV inputs
    ``past_key_values.{i}.key/value`` are [batch, kv_heads, buffer, head_dim] with buffer
    1..capacity: the engine sizes its buffers to what the conversation needs and grows them (see
    :mod:`.engine`). ``opt`` is batch 1 (one conversation), a prompt of min(max_prompt, 128) for
    prefill, attention_width = capacity for decode, and full-capacity buffers.
    """
    if isinstance(spec, dict):
        spec = ModelSpec.from_dict(spec)
    if dtype not in ("fp16", "fp32"):
        raise OptionError(f"unknown TensorRT precision {dtype!r}; valid values: fp16, fp32")
    for name, value in (("capacity", capacity), ("max_batch", max_batch), ("max_prompt", max_prompt)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise OptionError(f"TensorRT {name} must be a positive integer, got {value!r}")
    if max_prompt > capacity:
        raise OptionError(
            f"TensorRT max_prompt {max_prompt} exceeds the KV capacity {capacity}; "
            "lower the prompt limit or re-export with a larger --max-length"
        )
    kv_heads, head_dim = spec.num_key_value_heads, spec.head_dim

    def profile(name: str, seq: tuple[int, int, int], width: tuple[int, int, int]) -> dict[str, Any]:
        batch = (1, 1, max_batch)
        shapes: dict[str, dict[str, list[int]]] = {}
        for idx, key in enumerate(("min", "opt", "max")):
            b, s, w = batch[idx], seq[idx], width[idx]
            tokens = (EMBEDS, [b, s, spec.hidden_size]) if embeds else ("input_ids", [b, s])
            for inp, shape in (
                tokens,
                ("attention_mask", [b, w]),
                ("position_ids", [3, b, s] if embeds else [b, s]),
                ("cache_position", [s]),
            ):
                shapes.setdefault(inp, {})[key] = shape
            if logits_rows:
                shapes.setdefault(LOGITS_INDICES, {})[key] = [1 if key != "max" else s]
            for kv in _kv_names(spec.num_hidden_layers):
                buffer = 1 if key == "min" else capacity
                shapes.setdefault(f"past_key_values.{kv}", {})[key] = [b, kv_heads, buffer, head_dim]
        return {"name": name, "shapes": shapes}

    opt_prompt = min(max_prompt, 128)
    return {
        "onnx": MODEL_FILE,
        "capacity": capacity,
        "precision": dtype,
        "strongly_typed": True,
        "workspace": DEFAULT_WORKSPACE,
        "max_batch": max_batch,
        "max_prompt": max_prompt,
        "profiles": [
            profile("prefill", (1, opt_prompt, max_prompt), (1, opt_prompt, capacity)),
            profile("decode", (1, 1, 1), (1, capacity, capacity)),
        ],
    }


def emit(
    model: Any,
    out_dir: Path,
    progress: Callable[[int, int], None] | None = None,
    *,
    spec: ModelSpec | dict[str, Any],
    capacity: int,
    dtype: str,
    max_batch: int,
    max_prompt: int,
) -> dict[str, Any]:
    """Write ``model.onnx`` + ``model.onnx.data`` (exactly as the ONNX Runtime target does) and
    return the manifest extras ``{"tensorrt": recipe(...)}``. The recipe is checked before any
    byte is written. Engines are built later, on the GPU, by :func:`build_engine`."""
    from qwen_export.onnx_writer import write_onnx

    rows = any(value.name == LOGITS_INDICES for value in model.graph.inputs)
    embeds = any(value.name == EMBEDS for value in model.graph.inputs)
    built = recipe(
        spec,
        capacity=capacity,
        dtype=dtype,
        max_batch=max_batch,
        max_prompt=max_prompt,
        logits_rows=rows,
        embeds=embeds,
    )
    write_onnx(model, Path(out_dir), MODEL_FILE, DATA_FILE, progress)
    return {"tensorrt": built}


def _has_logits_rows(used: dict[str, Any]) -> bool:
    """Whether a recipe's graph has the ``logits_indices`` input (recipes before it do not)."""
    profiles = used.get("profiles") or [{}]
    return isinstance(profiles[0], dict) and LOGITS_INDICES in (profiles[0].get("shapes") or {})


# ---------------------------------------------------------------------------------------- build
@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """How ``build-engine`` builds. ``max_batch`` / ``max_prompt`` / ``workspace`` (bytes): None =
    the recipe's. ``optimization_level``: TensorRT's builder_optimization_level, 0 (fast build) to
    5 (slowest build, best engine); 3 is TensorRT's default. ``timing_cache``: load and save
    ``engines/timing.cache`` so rebuilds skip kernel timing."""

    max_batch: int | None = None
    max_prompt: int | None = None
    workspace: int | None = None
    timing_cache: bool = True
    optimization_level: int = 3
    device: int = 0

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_prompt", "workspace"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise OptionError(f"build-engine {name} must be a positive integer, got {value!r}")
        if not 0 <= self.optimization_level <= 5:
            raise OptionError(f"TensorRT optimization level must be 0..5, got {self.optimization_level}")


def _atomic_write(path: Path, data: Any) -> None:
    """Write ``data`` (bytes or any buffer, e.g. TensorRT's IHostMemory) to a temporary file next
    to ``path``, then rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(data))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _parser_errors(parser: Any) -> list[str]:
    out = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        try:
            where = " ".join(x for x in (err.node_operator(), err.node_name()) if x)
            out.append(f"{where}: {err.desc()}" if where else str(err.desc()))
        except AttributeError:
            out.append(str(err))
    return out


def _parse(trt: Any, onnx_path: Path, used: dict[str, Any], message: Callable[[str], None]) -> tuple[Any, ...]:
    """A strongly typed network parsed from ``onnx_path`` whose inputs are the recipe's: returns
    ``(builder, network, parser, logger)``; the parser owns the weights and the logger must outlive
    the builder, so the caller keeps all four until the engine is built."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    message(f"parsing {onnx_path} with TensorRT {trt.__version__}")
    if not parser.parse_from_file(os.fspath(onnx_path)):
        errors = _parser_errors(parser)
        raise ArtifactError(
            f"{onnx_path}: TensorRT {trt.__version__} could not parse it ({len(errors)} error(s)): "
            + " | ".join(errors[:5] or ["no error reported"])
        )
    expected = {name for name in used["profiles"][0]["shapes"]}
    found = {network.get_input(i).name for i in range(network.num_inputs)}
    if found != expected:
        raise ArtifactError(
            f"{onnx_path}: its inputs do not match the recipe (missing {sorted(expected - found)}, "
            f"unexpected {sorted(found - expected)}); re-export the artifact"
        )
    return builder, network, parser, logger


def _configure(
    trt: Any,
    builder: Any,
    used: dict[str, Any],
    options: BuildOptions,
    cache_path: Path,
    message: Callable[[str], None],
    root: Path,
) -> tuple[Any, Any]:
    """The builder config: workspace, optimization level, timing cache (when kept), profiles."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(used["workspace"]))
    config.builder_optimization_level = options.optimization_level
    cache = None
    if options.timing_cache:
        blob = read_built(root, cache_path, 1 << 30) or b""
        cache = config.create_timing_cache(blob)
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            message(f"{cache_path} was made on another GPU or TensorRT; starting a new timing cache")
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, ignore_mismatch=False)
    for index, entry in enumerate(used["profiles"]):
        profile = builder.create_optimization_profile()
        for name, shape in entry["shapes"].items():
            profile.set_shape(name, shape["min"], shape["opt"], shape["max"])
        if config.add_optimization_profile(profile) != index:
            raise ArtifactError(f"TensorRT rejected the {entry['name']!r} optimization profile of {root}'s recipe")
    return config, cache


def build_engine(
    artifact_dir: str | Path,
    options: BuildOptions | None = None,
    progress: Callable[[int, int], None] | None = None,
    message: Callable[[str], None] = lambda text: None,
    *,
    trt_module: Any = None,
    torch_device: Any = None,
) -> Path:
    """Build the TensorRT engine of a ``--target tensorrt`` artifact for this GPU; return its path.

    Parses ``model.onnx`` (strongly typed network), adds the recipe's two optimization profiles
    (with ``max_batch`` / ``max_prompt`` overrides applied), loads the timing cache, builds, and
    writes ``engines/<slug>.plan``, ``engines/<slug>.json`` and ``engines/timing.cache``
    atomically. ``progress(step, 4)`` after parse, configure, build and write. Raises
    EngineUnavailableError (no TensorRT / CUDA), ArtifactError (parse or build failure).
    """
    options = options or BuildOptions()
    root = Path(artifact_dir)
    manifest, base = _tensorrt_manifest(root)
    spec = ModelSpec.from_dict(manifest.spec)
    used = recipe(
        spec,
        capacity=int(base["capacity"]),
        dtype=str(base["precision"]),
        max_batch=options.max_batch or int(base["max_batch"]),
        max_prompt=options.max_prompt or int(base["max_prompt"]),
        logits_rows=_has_logits_rows(base),
        embeds=EMBEDS in base["profiles"][0]["shapes"],
    )
    used["workspace"] = options.workspace or int(base.get("workspace", DEFAULT_WORKSPACE))
    trt = trt_module if trt_module is not None else _trt()
    device = torch_device if torch_device is not None else _cuda_device(options.device)
    if device.type == "cuda":
        _torch().cuda.set_device(device)  # the builder builds for the current CUDA device
    onnx_name = base.get("onnx", MODEL_FILE)
    if not isinstance(onnx_name, str) or onnx_name not in manifest.files:
        raise ArtifactError(f"{root}: the recipe's onnx {onnx_name!r} is not a file of the artifact; re-export it")
    onnx_path = root / onnx_name
    step = progress or (lambda done, total: None)

    builder, network, _parser, _logger = _parse(trt, onnx_path, used, message)
    step(1, 4)

    engines = root / ENGINES_DIR
    engines.mkdir(exist_ok=True)
    cache_path = engines / TIMING_CACHE
    config, cache = _configure(trt, builder, used, options, cache_path, message, root)
    step(2, 4)

    slug = engine_slug(trt, device)
    message(f"building the TensorRT engine {slug} (batch <= {used['max_batch']}, prompt <= {used['max_prompt']})")
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if plan is None:
        raise ArtifactError(
            f"TensorRT {trt.__version__} could not build an engine from {onnx_path} (the log above says why); "
            "try a smaller --max-batch / --max-prompt or a larger --workspace"
        )
    step(3, 4)
    plan_path = engines / f"{slug}.plan"
    _atomic_write(plan_path, plan)
    info = {
        "slug": slug,
        "tensorrt": str(trt.__version__),
        "device": str(device),
        "build_seconds": round(seconds, 3),
        "optimization_level": options.optimization_level,
        "onnx_sha256": manifest.files.get(MODEL_FILE),
        "recipe": used,
    }
    _atomic_write(plan_path.with_suffix(".json"), json.dumps(info, indent=1).encode())
    if cache is not None:
        _atomic_write(cache_path, cache.serialize())
    _build_tower(trt, root, manifest.extra.get("multimodal"), plan_path, (options, int(used["workspace"])), message)
    step(4, 4)
    message(f"wrote {plan_path} in {seconds:.1f} s")
    return plan_path


def _build_tower(
    trt: Any, root: Path, record: Any, plan_path: Path, settings: tuple[Any, int], message: Callable[[str], None]
) -> None:
    """A VL artifact (``record``: its ``extra.multimodal``): the vision tower's plan beside the decoder's."""
    if record:
        from qwen_export.targets.tensorrt.vision import build_vision

        build_vision(trt, root, record, plan_path, settings, message)


# ---------------------------------------------------------------------------------------- run
