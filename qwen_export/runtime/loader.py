"""Open an exported artifact: verify its manifest, build its engine and tokenizer.

Torch-free: this is the runtime side. The engine module for the artifact's target is imported
only here, on demand.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwen_export import targets
from qwen_export.artifact import Manifest, load_manifest, read_artifact_file
from qwen_export.errors import ArtifactError, OptionError
from qwen_export.heap import trim_heap
from qwen_export.runtime.generation import GenerationConfig
from qwen_export.spec import Target
from qwen_export.targets.base import Engine

if TYPE_CHECKING:
    from qwen_export.targets.openvino.engine import OpenVINOOptions
    from qwen_export.targets.tensorrt.engine import TensorRTOptions
from qwen_export.runtime.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    threads: int = 0  # 0 = the engine's default
    #: OpenVINO artifacts: compile settings (precision, KV-cache precision, CACHE_DIR, hint);
    #: None = OpenVINO's defaults with ``threads``. Ignored by the other engines.
    openvino: OpenVINOOptions | None = None
    #: Which engine runs the artifact; None = its target's own. A ``--target tensorrt`` artifact can
    #: also run on ``Target.ONNXRUNTIME`` (its standard-ONNX graph on ONNX Runtime CPU: how it is
    #: verified on machines without TensorRT); any other combination is an OptionError.
    engine: Target | None = None
    #: TensorRT artifacts: engine settings (device, CUDA graphs, engine file); None = defaults.
    tensorrt: TensorRTOptions | None = None
    #: Longest piece of a prompt run in one inference (ONNX Runtime, OpenVINO); 0: the whole
    #: prompt at once; None: the engine's default (``targets.base.DEFAULT_PREFILL_CHUNK``, 2048).
    prefill_chunk: int | None = None
    #: ONNX Runtime artifacts exported with ``--prefill int8``: run prompts on their int8 graph
    #: (False: on the decode graph, and its memory is not spent). Ignored by the other engines.
    prefill_int8: bool = True


@dataclasses.dataclass
class LoadedArtifact:
    path: Path
    manifest: Manifest
    engine: Engine
    tokenizer: Tokenizer
    generation_defaults: dict[str, Any]

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        eos = self.generation_defaults.get("eos_token_id", [])
        eos = eos if isinstance(eos, list) else [eos]
        return tuple(int(e) for e in eos if isinstance(e, int))

    def generation_config(self, **overrides: Any) -> GenerationConfig:
        """The checkpoint's generation_config.json sampling defaults, with ``overrides`` (None = keep)."""
        d = self.generation_defaults
        sample = bool(d.get("do_sample", False))
        base: dict[str, Any] = {
            "temperature": float(d.get("temperature", 1.0)) if sample else 0.0,
            "top_k": int(d.get("top_k") or 0) if sample else 0,
            "top_p": float(d.get("top_p", 1.0)) if sample else 1.0,
            "repetition_penalty": float(d.get("repetition_penalty", 1.0)),
            "stop_token_ids": self.stop_token_ids,
        }
        base.update({k: v for k, v in overrides.items() if v is not None})
        config = GenerationConfig(**base)
        config.validate()
        return config


def open_artifact(path: str | Path, options: RuntimeOptions | None = None, verify: bool = True) -> LoadedArtifact:
    """Verify ``path`` (manifest, checksums) and load its engine and tokenizer."""
    options = options or RuntimeOptions()
    root = Path(path)
    manifest = load_manifest(root, verify=verify)
    target = Target.parse(manifest.target, "target in manifest.json")
    engine = targets.get(_engine_for(root, target, options)).open_engine(root, manifest, options)
    _attach_multimodal(root, manifest, engine)
    tokenizer = Tokenizer.from_dir(root, reader=artifact_reader(root, manifest))
    defaults = read_generation_defaults(root, manifest)
    trim_heap()
    return LoadedArtifact(root, manifest, engine, tokenizer, defaults)


def artifact_reader(root: Path, manifest: Manifest) -> Callable[[str, int], bytes | None]:
    """Reads files of a verified artifact: only listed ones (None when not listed: absent, since the
    tree holds no unlisted file), regular and inside, bounded (:func:`read_artifact_file`)."""

    def read(name: str, limit: int) -> bytes | None:
        return read_artifact_file(root, manifest, name, limit) if name in manifest.files else None

    return read


def read_generation_defaults(root: Path, manifest: Manifest) -> dict[str, Any]:
    """``generation_config.json``'s sampling fields, type-checked ({} when the artifact has none)."""
    data = artifact_reader(root, manifest)(GENERATION_CONFIG, MAX_GENERATION_CONFIG_BYTES)
    if data is None:
        return {}
    path = root / GENERATION_CONFIG
    try:
        loaded = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, huge integers
        raise ArtifactError(f"{path}: invalid JSON ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(loaded, dict):
        raise ArtifactError(f"{path}: expected a JSON object, found {type(loaded).__name__}")
    for key, kind in _GENERATION_FIELDS.items():
        value = loaded.get(key)
        if value is None:
            continue
        ok = _is_number(value) if kind is float else isinstance(value, kind) and not isinstance(value, bool)
        if kind is bool:
            ok = isinstance(value, bool)
        if key == "eos_token_id":
            ids = value if isinstance(value, list) else [value]
            ok = len(ids) <= 64 and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i for i in ids)
        elif key == "top_k":
            ok = ok and 0 <= value <= 10_000_000
        if not ok:
            shown = repr(value)[:60]
            raise ArtifactError(f"{path}: {key} = {shown} must be {_GENERATION_WANTS[key]}; fix or remove the field")
    return loaded


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


GENERATION_CONFIG = "generation_config.json"
MAX_GENERATION_CONFIG_BYTES = 1 << 20
_GENERATION_FIELDS: dict[str, type] = {
    "do_sample": bool,
    "temperature": float,
    "top_k": int,
    "top_p": float,
    "repetition_penalty": float,
    "eos_token_id": int,
}
_GENERATION_WANTS = {
    "do_sample": "true or false",
    "temperature": "a finite number",
    "top_k": "an integer >= 0",
    "top_p": "a finite number",
    "repetition_penalty": "a finite number",
    "eos_token_id": "a token id or a list of them",
}


def _engine_for(root: Path, target: Target, options: RuntimeOptions) -> Target:
    """The engine that runs a ``target`` artifact under ``options`` (OptionError when it cannot):
    an engine's own options (``RuntimeOptions.openvino``, ``.tensorrt``) apply to that engine only."""
    given = [b for b in targets.registered() if b.options_field and getattr(options, b.options_field) is not None]
    for backend in given:
        if backend.target is not target:
            raise OptionError(backend.foreign_options_error(root, target))
    engine = options.engine or target
    runs_on = targets.get(target).engines
    if engine not in runs_on:
        allowed = " or ".join(sorted(e.value for e in runs_on))
        raise OptionError(f"{root} is a {target.value} artifact; it runs on --engine {allowed}, not {engine.value}")
    for backend in given:
        if backend.target is not engine:
            raise OptionError(backend.foreign_options_error(root, target))
    return engine


def _attach_multimodal(root: Path, manifest: Any, engine: Any) -> None:
    """A vision-language artifact: give its engine the :class:`~qwen_export.runtime.multimodal.
    MultimodalInputs` it feeds the decoder from (engines that run one expose ``encode_image``)."""
    record = manifest.extra.get("multimodal")
    if record is None:
        return
    if not isinstance(record, dict) or not hasattr(engine, "encode_image"):
        raise ArtifactError(f"{root}: a vision-language artifact this engine cannot run (manifest.extra.multimodal)")
    from qwen_export.runtime.multimodal import MultimodalInputs

    spec = engine.spec
    engine.multimodal = MultimodalInputs(
        root, record, spec.hidden_size, spec.vocab_size, engine.dtype, engine.encode_image
    )
