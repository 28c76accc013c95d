"""TensorRT target, runtime side: run a built engine behind the Engine protocol.

The graph and its build recipe are written, and engines built on the GPU, by
:mod:`qwen_export.targets.tensorrt.build` (its docstring has the three stages and what has and
has not been run).

KV buffers: one per layer and kind, [batch, kv_heads, buffer, head_dim], bound as both past and
present. The buffer length follows the request: the first call allocates what it needs rounded up
to ``TensorRTOptions.kv_step`` tokens, and a call that needs more reallocates them at least twice
as large (at most the artifact's capacity), copying the cached columns, so a short chat on a 128K
artifact does not hold 128K tokens of KV in GPU memory. (Plans built from a recipe whose KV
profile is fixed at the capacity, before this, get full-capacity buffers as they expect.)

CUDA graphs (``TensorRTOptions(cuda_graphs=True)``): decode steps run with the attention mask
padded with zeros to the buffer length (the graph accepts it: columns past the cache are masked),
so every decode step of a batch size has the same shapes and the same (static) device buffers. The
first decode step after a profile switch or a buffer reallocation runs ``execute_async_v3`` as
usual (TensorRT wants one enqueue after shape changes before a capture), then one
``torch.cuda.CUDAGraph`` is captured on the engine's stream for that batch size; later decode
steps copy their inputs into the static buffers and call ``graph.replay()``. A prefill switches
to profile 0, which drops the captured graphs (the context's shape state changed), so each
decode run after a prefill captures once."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from qwen_export.artifact import Manifest, load_manifest
from qwen_export.errors import ArtifactError, EngineUnavailableError, GenerationError, OptionError
from qwen_export.safefs import read_inside, read_regular
from qwen_export.spec import ModelSpec
from qwen_export.targets.base import (
    DEFAULT_KV_STEP,
    EngineCapabilities,
    Truncation,
    check_last_k,
    grown_capacity,
    plan_truncate,
    prepare_step,
)

__all__ = ["TensorRTEngine", "TensorRTOptions", "engine_slug"]

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
ENGINES_DIR = "engines"
TIMING_CACHE = "timing.cache"
#: builder workspace (``MemoryPoolType.WORKSPACE``) the recipe asks for unless overridden: 4 GiB
DEFAULT_WORKSPACE = 4 << 30
PREFILL, DECODE = 0, 1  # optimization profile indices (the order of the recipe's "profiles")
INPUTS = ("input_ids", "attention_mask", "position_ids", "cache_position")
#: the ``--logits last`` graph's input of the positions whose logits it returns (export.trace's)
LOGITS_INDICES = "logits_indices"
EMBEDS = "inputs_embeds"  # a VL decoder's first input, instead of input_ids
INSTALL_TRT = "pip install tensorrt (TensorRT 10.x, on a machine with an NVIDIA GPU and driver)"
INSTALL_TORCH_CUDA = (
    "install a CUDA build of PyTorch (e.g. pip install torch --index-url https://download.pytorch.org/whl/cu126) "
    "on a machine with an NVIDIA GPU and driver"
)


# ---------------------------------------------------------------------------------------- SDKs
def _trt() -> Any:
    """Import TensorRT (10.x) or say what to install."""
    try:
        import tensorrt
    except ImportError:
        raise EngineUnavailableError(f"TensorRT is not installed: {INSTALL_TRT}") from None
    version = str(getattr(tensorrt, "__version__", "0"))
    if not version.split(".")[0].isdigit() or int(version.split(".")[0]) < 10:
        raise EngineUnavailableError(
            f"TensorRT {version} is too old; this engine uses the TensorRT 10 API: {INSTALL_TRT}"
        )
    return tensorrt


def _torch() -> Any:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        raise EngineUnavailableError(
            f"the TensorRT engine keeps its buffers in PyTorch tensors: {INSTALL_TORCH_CUDA}"
        ) from None
    return torch


def _cuda_device(index: int) -> Any:
    """``torch.device("cuda", index)``, or a one-line error naming the fix."""
    torch = _torch()
    if not torch.cuda.is_available():
        raise EngineUnavailableError(
            f"TensorRT engines run on a CUDA GPU, but torch.cuda.is_available() is False (torch {torch.__version__}); "
            + INSTALL_TORCH_CUDA
        )
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise OptionError(f"CUDA device {index} does not exist; this machine has {count} (valid: 0..{count - 1})")
    return torch.device("cuda", index)


def engine_slug(trt: Any, device: Any) -> str:
    """The engine file stem for this GPU and TensorRT: ``<gpu name>-sm<major><minor>-trt<version>``
    (``cpu-trt<version>`` for the CPU stand-in the tests use)."""
    if device.type == "cuda":
        torch = _torch()
        major, minor = torch.cuda.get_device_capability(device)
        gpu = f"{torch.cuda.get_device_name(device)}-sm{major}{minor}"
    else:
        gpu = device.type
    return re.sub(r"[^a-z0-9.]+", "-", f"{gpu}-trt{trt.__version__}".lower()).strip("-")


# ---------------------------------------------------------------------------------------- export
def _kv_names(layers: int) -> list[str]:
    return [f"{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def _tensorrt_manifest(directory: Path, manifest: Manifest | None = None) -> tuple[Manifest, dict[str, Any]]:
    manifest = manifest or load_manifest(directory)
    if manifest.target != "tensorrt":
        raise ArtifactError(
            f"{directory} is a {manifest.target} artifact; TensorRT engines need one exported with --target tensorrt"
        )
    built = manifest.extra.get("tensorrt")
    if not isinstance(built, dict) or "profiles" not in built:
        raise ArtifactError(f"{directory}/manifest.json has no TensorRT build recipe (extra.tensorrt); re-export it")
    return manifest, built


@dataclasses.dataclass(frozen=True)
class TensorRTOptions:
    """``device``: the CUDA device index. ``cuda_graphs``: replay decode steps as CUDA graphs
    (see the module docstring). ``engine``: a plan file to load instead of
    ``engines/<this GPU's slug>.plan`` (relative paths are taken from the artifact)."""

    device: int = 0
    cuda_graphs: bool = False
    engine: Path | None = None
    kv_step: int = DEFAULT_KV_STEP  # KV buffers grow in multiples of this many tokens


MAX_PLAN_BYTES = 1 << 36


def _count(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= 10_000_000:
        raise ValueError(value)
    return value


def _fixed_kv(recipe: dict[str, Any]) -> bool:
    """Whether a plan's recipe fixes the KV buffers at the capacity (recipes before growing buffers)."""
    try:
        shapes = recipe["profiles"][0]["shapes"]
        kv = next(v for k, v in shapes.items() if k.startswith("past_key_values."))
        return int(kv["min"][2]) == int(recipe["capacity"])
    except (KeyError, IndexError, StopIteration, TypeError, ValueError):
        return True


def read_built(root: Path, path: Path, limit: int) -> bytes | None:
    """A plan or its sidecar: inside the artifact, a regular file reached without links (a plan
    given elsewhere with ``engine=`` is the caller's own file: links followed); None when absent."""
    try:
        rel = path.relative_to(root).as_posix()
    except ValueError:
        return read_regular(path, limit)
    if not (path.exists() or path.is_symlink()):
        return None
    return read_inside(root, rel, limit)


class TensorRTEngine:
    """Engine over a ``--target tensorrt`` artifact with a built engine (``qwen-export build-engine``).

    ``trt_module`` / ``torch_device`` replace ``import tensorrt`` and the CUDA device (tests run
    the engine with a stand-in module on CPU tensors).
    """

    def __init__(
        self,
        artifact_dir: str | Path,
        manifest: Manifest,
        options: TensorRTOptions | None = None,
        *,
        trt_module: Any = None,
        torch_device: Any = None,
    ) -> None:
        self.options = options or TensorRTOptions()
        self.root = Path(artifact_dir)
        manifest, base = _tensorrt_manifest(self.root, manifest)
        trt = trt_module if trt_module is not None else _trt()
        torch = _torch()
        device = torch_device if torch_device is not None else _cuda_device(self.options.device)
        self._trt, self._torch, self.device = trt, torch, device
        if device.type == "cuda":
            torch.cuda.set_device(device)  # TensorRT deserializes and runs on the current CUDA device
        self.spec = ModelSpec.from_dict(manifest.spec)
        self.plan_path, info = self._find_plan(trt, device)
        if info.get("onnx_sha256") and manifest.files.get(MODEL_FILE) not in (None, info["onnx_sha256"]):
            raise ArtifactError(
                f"{self.plan_path} was built from an earlier export of {self.root}; "
                f"rebuild it: qwen-export build-engine {self.root}"
            )
        used = info.get("recipe") or base
        try:
            self.capacity, self.max_batch, self.max_prompt = (
                _count(used[key]) for key in ("capacity", "max_batch", "max_prompt")
            )
        except (KeyError, TypeError, ValueError):
            raise ArtifactError(
                f"{self.plan_path}: its build recipe lacks valid capacity/max_batch/max_prompt; "
                f"rebuild it: qwen-export build-engine {self.root}"
            ) from None
        self._kv_step = self.capacity if _fixed_kv(used) else max(1, int(self.options.kv_step))
        self._read_inputs(used, manifest)
        kv = manifest.extra.get("kv_cache") or {}
        if int(kv.get("capacity", self.capacity)) != self.capacity:
            raise ArtifactError(
                f"{self.plan_path} holds {self.capacity} tokens but the artifact's KV capacity is {kv['capacity']}"
            )

        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(read_built(self.root, self.plan_path, MAX_PLAN_BYTES))
        if self.engine is None:
            raise ArtifactError(
                f"{self.plan_path}: TensorRT {trt.__version__} could not load it (built by another TensorRT or for "
                f"another GPU?); rebuild it: qwen-export build-engine {self.root}"
            )
        self._check_io(trt)
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise GenerationError(f"TensorRT could not create an execution context for {self.plan_path} (GPU memory?)")
        self._profile = PREFILL  # a new context starts on profile 0
        cuda = device.type == "cuda"
        self._stream: Any = torch.cuda.Stream(device=device) if cuda else None
        self._stream_handle = 0 if self._stream is None else int(self._stream.cuda_stream)
        self._use_graphs = self.options.cuda_graphs
        if self._use_graphs and not cuda:
            raise OptionError("CUDA graphs need a CUDA device")
        self.capabilities = EngineCapabilities(
            name="tensorrt",
            max_context=self.capacity,
            max_batch=self.max_batch,
            devices=(str(device),),
            full_logits=manifest.logits == "all",
            vocab_size=self.spec.vocab_size,
            last_k_logits=manifest.logits == "last" and self._rows_input,
        )
        self._layers = self.spec.num_hidden_layers
        self._kv_dtype = torch.float16 if manifest.dtype == "fp16" else torch.float32
        self._batch = 0  # batch size the device buffers are allocated for (0 = none)
        self._kv: list[Any] = []  # 2 * layers tensors [batch, kv_heads, buffer, head_dim]
        self._buffers: dict[str, Any] = {}  # flat static device buffers of the inputs and logits
        self._bound: dict[str, int] = {}  # tensor name -> address last given to set_tensor_address
        self._graphs: dict[int, Any] = {}  # batch size -> captured decode graph
        self.reset()

    def _read_inputs(self, used: dict[str, Any], manifest: Manifest) -> None:
        """What the recipe's inputs say: a ``logits_indices`` input (absent before last-k logits),
        and a VL decoder's ``inputs_embeds`` [B, S, hidden] with M-RoPE ``position_ids`` [3, B, S]."""
        profiles = used.get("profiles") if isinstance(used.get("profiles"), list) else [{}]
        first = profiles[0] if profiles and isinstance(profiles[0], dict) else {}
        self._rows_input = LOGITS_INDICES in (first.get("shapes") or {})
        self._embeds = EMBEDS in (first.get("shapes") or {})
        self._vision_record = manifest.extra.get("multimodal")
        self._vision: Any = None
        #: a VL artifact's inputs (embeddings, images, M-RoPE positions): attached by the runtime's loader
        self.multimodal: Any = None
        self.dtype = np.float16 if manifest.dtype == "fp16" else np.float32

    # ------------------------------------------------------------------ Engine API
    @property
    def num_cached_tokens(self) -> int:
        return 0 if self._mask is None else int(self._mask.shape[1])

    def open_rows(self, max_rows: int) -> Any:
        """Not built: TensorRT's fixed-shape KV buffers have no per-row lengths here (and TensorRT
        cannot be installed where this was written, so it could not be tested)."""
        raise OptionError(
            "the TensorRT engine does not batch independent sequences yet; run requests one at a time "
            "(qwen-export serve --max-batch 1)"
        )

    def reset(self) -> None:
        """Forget the cache (the buffers stay allocated; their stale columns are masked)."""
        self._mask: np.ndarray | None = None
        if self.multimodal is not None:
            self.multimodal.truncate(0)

    def truncate(self, num_tokens: int) -> None:
        """Keep the first ``num_tokens`` cached tokens: only the mask forgets columns; the buffer
        keeps them and later steps overwrite them (as the ONNX Runtime engine's shared layout)."""
        plan = plan_truncate(num_tokens, self.num_cached_tokens)
        if plan is Truncation.RESET:
            self.reset()
            return
        if plan is Truncation.NOTHING:
            return
        if self.multimodal is not None:
            self.multimodal.truncate(num_tokens)
        assert self._mask is not None
        self._mask = self._mask[:, :num_tokens]

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, last_k: int | None = None
    ) -> np.ndarray:
        """``last_k`` (``capabilities.last_k_logits``): the last k positions' logits."""
        step = prepare_step(
            input_ids,
            attention_mask,
            self._mask,
            vocab_size=self.spec.vocab_size,
            max_context=self.capacity,
            capacity_note=" (the capacity of its preallocated KV buffer)",
        )
        batch, seq = step.ids.shape
        if batch > self.max_batch:
            raise GenerationError(
                f"batch {batch} exceeds the engine's max_batch {self.max_batch}; "
                f"rebuild it: qwen-export build-engine {self.root} --max-batch {batch}"
            )
        last_k = check_last_k(last_k, seq, self.capabilities)
        tail = seq - (last_k or 1)  # the positions after it are the rows returned (last_k)
        cached = step.mask.shape[1] - seq
        chunks, rows = [], []
        for start in range(0, seq, self.max_prompt):  # prompts longer than the prefill profile: chunks
            end = min(seq, start + self.max_prompt)
            rows.append(end - max(start, tail))
            chunks.append(
                self._run(
                    step.ids[:, start:end],
                    step.mask[:, : cached + end],
                    step.position_ids[:, start:end],
                    cached + start,
                    max(1, rows[-1]),
                )
            )
        self._mask = step.mask
        if last_k is not None:
            chunks = [logits for logits, n in zip(chunks, rows, strict=True) if n > 0]
        elif not self.capabilities.full_logits:
            chunks = chunks[-1:]
        return np.concatenate(chunks, axis=1) if len(chunks) > 1 else chunks[0]

    # ------------------------------------------------------------------ internals
    def _find_plan(self, trt: Any, device: Any) -> tuple[Path, dict[str, Any]]:
        if self.options.engine is not None:
            path = Path(self.options.engine)
            path = path if path.is_absolute() else self.root / path
            if not path.is_file():
                raise ArtifactError(f"{path}: TensorRT engine file not found")
        else:
            slug = engine_slug(trt, device)
            path = self.root / ENGINES_DIR / f"{slug}.plan"
            if not path.is_file():
                built = sorted(p.stem for p in (self.root / ENGINES_DIR).glob("*.plan"))
                have = f" (it has engines for: {', '.join(built)})" if built else ""
                raise ArtifactError(
                    f"{self.root} has no TensorRT engine for this GPU and TensorRT ({slug}){have}; "
                    f"build it: qwen-export build-engine {self.root}"
                )
        sidecar = path.with_suffix(".json")
        try:
            info = json.loads(read_built(self.root, sidecar, 1 << 20) or b"{}")
            if not isinstance(info, dict):
                raise ValueError("not a JSON object")
        except (ValueError, RecursionError) as exc:
            raise ArtifactError(
                f"{sidecar} cannot be read ({exc}); rebuild: qwen-export build-engine {self.root}"
            ) from None
        return path, info

    def _check_io(self, trt: Any) -> None:
        inputs: set[str] = set()
        outputs: set[str] = set()
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            (inputs if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).add(name)
        kv = _kv_names(self.spec.num_hidden_layers)
        want_in = set(INPUTS) - ({"input_ids"} if self._embeds else set()) | ({EMBEDS} if self._embeds else set())
        want_in |= {f"past_key_values.{n}" for n in kv} | ({LOGITS_INDICES} if self._rows_input else set())
        want_out = {"logits"} | {f"present.{n}" for n in kv}
        if inputs != want_in or outputs != want_out:
            missing = sorted((want_in - inputs) | (want_out - outputs))
            extra = sorted((inputs - want_in) | (outputs - want_out))
            raise ArtifactError(
                f"{self.plan_path}: its IO does not match the artifact "
                f"(missing {missing[:4]}, unexpected {extra[:4]}); rebuild it: qwen-export build-engine {self.root}"
            )
        if self.engine.num_optimization_profiles < 2:
            raise ArtifactError(
                f"{self.plan_path} has no decode profile; rebuild it: qwen-export build-engine {self.root}"
            )

    def _device_tensors(self) -> Iterator[Any]:
        """Every device buffer bound to a context (the tests map addresses back to them)."""
        yield from self._kv
        yield from self._buffers.values()
        if self._vision is not None:
            yield from self._vision.tensors()

    def encode_image(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """A VL artifact's vision tower on one image's inputs (its own engine, built beside the
        decoder's by ``build-engine``; loaded on first use): the merged features, float32."""
        if self._vision_record is None:
            raise ArtifactError(f"{self.root} is not a vision-language artifact")
        if self._vision is None:
            from qwen_export.targets.tensorrt.vision import TensorRTVision, vision_plan_path
            from qwen_export.vision import VisionSpec

            vision = VisionSpec.from_dict(self._vision_record["vision"])
            path = vision_plan_path(self.plan_path)
            self._vision = TensorRTVision(self._trt, self._runtime, path, self.root, vision, self.device)
        with self._stream_scope():
            return self._vision.encode(feeds, self._stream)

    def _stream_scope(self) -> Any:
        return self._torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()

    @property
    def kv_capacity(self) -> int:
        """Tokens per row the KV buffers hold now (0: none allocated)."""
        return int(self._kv[0].shape[2]) if self._kv else 0

    @property
    def kv_bytes(self) -> int:
        return sum(int(t.numel()) * t.element_size() for t in self._kv)

    def _reserve_kv(self, needed: int, cached: int) -> None:
        """KV buffers of at least ``needed`` tokens: zeroed on first use, else reallocated larger
        with the first ``cached`` columns copied (their addresses change: bind again, recapture)."""
        current = self.kv_capacity
        if needed <= current:
            return
        length = grown_capacity(needed, current, self._kv_step, self.capacity)
        shape = (self._batch, self.spec.num_key_value_heads, length, self.spec.head_dim)
        for i in range(2 * self._layers):
            new = self._torch.zeros(shape, dtype=self._kv_dtype, device=self.device)
            if current and cached:
                new[:, :, :cached].copy_(self._kv[i][:, :, :cached])
            if current:
                self._kv[i] = new  # the old buffer is freed as its copy is made
            else:
                self._kv.append(new)
        self._bound, self._graphs = {}, {}

    def _allocate(self, batch: int) -> None:
        """Static input buffers for ``batch`` rows (once per batch size); the KV buffers are
        allocated by :meth:`_reserve_kv`."""
        torch = self._torch
        self._kv, self._buffers, self._bound, self._graphs = [], {}, {}, {}  # free the old ones first
        streams = 3 if self._embeds else 1  # M-RoPE: time, height and width positions
        for name, size in (
            ("input_ids", 0 if self._embeds else batch * self.max_prompt),
            ("position_ids", streams * batch * self.max_prompt),
            ("cache_position", self.max_prompt),
            (LOGITS_INDICES, self.max_prompt),
            ("attention_mask", batch * self.capacity),
        ):
            self._buffers[name] = torch.zeros(size, dtype=torch.int64, device=self.device)
        if self._embeds:
            size = batch * self.max_prompt * self.spec.hidden_size
            self._buffers[EMBEDS] = torch.zeros(size, dtype=self._kv_dtype, device=self.device)
        self._batch = batch

    def _logits_buffer(self, size: int) -> Any:
        buf = self._buffers.get("logits")
        if buf is None or buf.numel() < size:  # grows (full logits); a new address drops the graphs
            self._buffers["logits"] = buf = self._torch.empty(size, dtype=self._torch.float32, device=self.device)
            self._graphs = {}
        return buf

    def _stage(self, name: str, array: np.ndarray) -> Any:
        """Copy a host array into the front of its static device buffer; return that view."""
        view = self._buffers[name][: array.size].view(array.shape)
        view.copy_(self._torch.from_numpy(np.ascontiguousarray(array)), non_blocking=False)
        return view

    def _bind(self, name: str, tensor: Any) -> None:
        ptr = int(tensor.data_ptr())
        if self._bound.get(name) != ptr:
            self.context.set_tensor_address(name, ptr)
            self._bound[name] = ptr

    def _select_profile(self, profile: int) -> None:
        if profile == self._profile:
            return
        if not self.context.set_optimization_profile_async(profile, self._stream_handle):
            raise GenerationError(f"TensorRT could not switch {self.plan_path} to optimization profile {profile}")
        self._profile = profile
        self._bound = {}  # bind every address again under the new profile
        self._graphs = {}  # the context's shapes changed: captured decode graphs are stale

    def _run(
        self, ids: np.ndarray, mask: np.ndarray, position_ids: np.ndarray, start: int, rows: int = 1
    ) -> np.ndarray:
        """One inference of at most ``max_prompt`` tokens written from buffer column ``start``;
        ``rows``: the last positions whose logits a ``logits_indices`` graph returns."""
        batch, seq = ids.shape
        if batch != self._batch:
            self._allocate(batch)
        self._reserve_kv(mask.shape[1], start)
        profile = PREFILL if seq > 1 else DECODE
        graphed = self._use_graphs and profile == DECODE
        length = self.kv_capacity
        if graphed and mask.shape[1] < length:  # constant decode shapes: pad the mask with zeros
            mask = np.concatenate([mask, np.zeros((batch, length - mask.shape[1]), np.int64)], axis=1)
        seq_out = seq if self.capabilities.full_logits else rows
        with self._stream_scope():
            self._select_profile(profile)
            feeds = {
                **self._token_feeds(ids, position_ids, start),
                "attention_mask": self._stage("attention_mask", mask),
                "cache_position": self._stage("cache_position", np.arange(start, start + seq, dtype=np.int64)),
            }
            if self._rows_input:
                feeds[LOGITS_INDICES] = self._stage(LOGITS_INDICES, np.arange(seq - rows, seq, dtype=np.int64))
            size = batch * seq_out * self.spec.vocab_size
            logits = self._logits_buffer(size)[:size].view(batch, seq_out, self.spec.vocab_size)
            graph = self._graphs.get(batch) if graphed else None
            if graph is not None:
                graph.replay()
            else:
                self._execute(feeds, logits)
                if graphed:
                    self._graphs[batch] = self._capture()
            if self._stream is not None:
                self._stream.synchronize()
        return logits.cpu().numpy().copy()

    def _token_feeds(self, ids: np.ndarray, position_ids: np.ndarray, start: int) -> dict[str, Any]:
        """The new tokens' inputs: ids and positions, or for a VL decoder the embeddings with the
        image features merged and the M-RoPE positions (``multimodal``, from its prompt state)."""
        if not self._embeds:
            return {
                "input_ids": self._stage("input_ids", ids),
                "position_ids": self._stage("position_ids", position_ids),
            }
        if self.multimodal is None:
            raise ArtifactError("a vision-language decoder needs its inputs: open it with qwen_export.load")
        embeds, positions = self.multimodal.feeds(ids, start)
        dtype = np.float16 if self._kv_dtype == self._torch.float16 else np.float32
        return {
            EMBEDS: self._stage(EMBEDS, embeds.astype(dtype, copy=False)),
            "position_ids": self._stage("position_ids", positions),
        }

    def _execute(self, feeds: dict[str, Any], logits: Any) -> None:
        ctx = self.context
        for name, tensor in feeds.items():
            if not ctx.set_input_shape(name, tuple(tensor.shape)):
                raise GenerationError(
                    f"TensorRT refused {name} of shape {tuple(tensor.shape)} for profile {self._profile} of "
                    f"{self.plan_path}; rebuild it with larger limits: qwen-export build-engine {self.root}"
                )
            self._bind(name, tensor)
        for name, buffer in zip(_kv_names(self._layers), self._kv, strict=True):
            if not ctx.set_input_shape(f"past_key_values.{name}", tuple(buffer.shape)):
                raise GenerationError(f"TensorRT refused the KV buffer shape {tuple(buffer.shape)} of {self.plan_path}")
            self._bind(f"past_key_values.{name}", buffer)
            self._bind(f"present.{name}", buffer)  # the same memory: TensorScatter updates it in place
        self._bind("logits", logits)
        if not ctx.execute_async_v3(self._stream_handle):
            raise GenerationError(f"TensorRT failed to run {self.plan_path} (execute_async_v3 returned False)")

    def _capture(self) -> Any:
        """Capture one decode step (shapes and addresses as just executed) as a CUDA graph."""
        torch = self._torch
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self._stream):
                ok = self.context.execute_async_v3(self._stream_handle)
        except RuntimeError as exc:
            first = (str(exc).splitlines() or ["?"])[0]
            raise GenerationError(
                f"CUDA graph capture of {self.plan_path} failed ({first}); run without cuda_graphs"
            ) from None
        if not ok:
            raise GenerationError(f"TensorRT could not enqueue {self.plan_path} during CUDA graph capture")
        return graph
