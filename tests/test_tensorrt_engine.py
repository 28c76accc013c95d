"""The TensorRT target: recipe, build_engine and TensorRTEngine.

TensorRT is not installable here, so most tests run the real ``build_engine`` / ``TensorRTEngine``
code against ``FakeTRT``: a stand-in for the ``tensorrt`` module that records every call, checks
input shapes against the selected optimization profile, and whose ``execute_async_v3`` runs the
artifact's model.onnx with ONNX Runtime on numpy views of the torch CPU tensors bound with
``set_tensor_address`` (addresses are mapped back to the engine's registered tensors), writing the
outputs into the bound output tensors. It checks our control flow and numerics, not TensorRT.
The last test builds and runs a real engine where ``tensorrt`` and a CUDA GPU exist.
"""

from __future__ import annotations

import enum
import json
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from noise import Noise, check_logits

from qwen_export.artifact import load_manifest
from qwen_export.errors import ArtifactError, EngineUnavailableError, GenerationError, OptionError
from qwen_export.export.pipeline import ExportOptions
from qwen_export.export.pipeline import export as run_export
from qwen_export.spec import ModelSpec, Target
from qwen_export.targets.onnxruntime.engine import OnnxRuntimeEngine
from qwen_export.targets.tensorrt import engine as trt_target
from qwen_export.targets.tensorrt.build import BuildOptions, build_engine, recipe
from qwen_export.targets.tensorrt.engine import TensorRTEngine, TensorRTOptions

CAPACITY = 64
CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------- stand-in
class FakeParserError:
    def __init__(self, text: str) -> None:
        self.text = text

    def desc(self) -> str:
        return self.text

    def node_name(self) -> str:
        return "/model/layers.0/Foo"

    def node_operator(self) -> str:
        return "Foo"


class FakeNetwork:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.inputs: list[str] = []

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, i: int) -> Any:
        return SimpleNamespace(name=self.inputs[i])


class FakeParser:
    def __init__(self, trt: FakeTRT, network: FakeNetwork) -> None:
        self.trt, self.network, self.errors = trt, network, []

    def parse_from_file(self, path: str) -> bool:
        import onnx

        self.trt.calls.append(("parse_from_file", path))
        assert Path(path + ".data").is_file()  # external data sits next to the file
        if self.trt.parse_errors:
            self.errors = [FakeParserError(e) for e in self.trt.parse_errors]
            return False
        model = onnx.load(path, load_external_data=False)
        self.network.inputs = [i.name for i in model.graph.input]
        self.trt.onnx_path = path
        return True

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, i: int) -> FakeParserError:
        return self.errors[i]


class FakeProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, dict[str, list[int]]] = {}

    def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
        self.shapes[name] = {"min": list(lo), "opt": list(opt), "max": list(hi)}


class FakeTimingCache:
    def __init__(self, blob: bytes) -> None:
        self.blob = bytes(blob)

    def serialize(self) -> bytes:
        return b"TIMING" + self.blob[-8:]


class FakeConfig:
    def __init__(self, trt: FakeTRT) -> None:
        self.trt, self.profiles, self.pools = trt, [], {}
        self.builder_optimization_level = 3
        self.cache: FakeTimingCache | None = None

    def set_memory_pool_limit(self, pool: Any, size: int) -> None:
        self.pools[pool] = size

    def create_timing_cache(self, blob: bytes) -> FakeTimingCache:
        self.trt.calls.append(("create_timing_cache", bytes(blob)))
        return FakeTimingCache(blob)

    def set_timing_cache(self, cache: FakeTimingCache, ignore_mismatch: bool) -> bool:
        assert ignore_mismatch is False
        if cache.blob.startswith(b"BAD"):
            return False
        self.cache = cache
        return True

    def add_optimization_profile(self, profile: FakeProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1


class FakeBuilder:
    def __init__(self, trt: FakeTRT) -> None:
        self.trt = trt

    def create_network(self, flags: int) -> FakeNetwork:
        self.trt.calls.append(("create_network", flags))
        return FakeNetwork(flags)

    def create_builder_config(self) -> FakeConfig:
        self.trt.config = FakeConfig(self.trt)
        return self.trt.config

    def create_optimization_profile(self) -> FakeProfile:
        return FakeProfile()

    def build_serialized_network(self, network: FakeNetwork, config: FakeConfig) -> bytes | None:
        if self.trt.fail_build:
            return None
        assert network.flags == 1 << int(FakeTRT.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        plan = {"onnx": self.trt.onnx_path, "profiles": [p.shapes for p in config.profiles]}
        return b"FAKEPLAN" + json.dumps(plan).encode()


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine, self.trt = engine, engine.trt
        self.profile = 0  # TensorRT: profile 0 is selected by default
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.log: list[tuple[Any, ...]] = []

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        self.log.append(("profile", index))
        self.profile = index
        self.shapes = {}  # switching invalidates the input shapes (they must be set again)
        return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.log.append(("shape", name, tuple(shape)))
        limits = self.engine.profiles[self.profile][name]
        ok = len(shape) == len(limits["min"]) and all(
            lo <= s <= hi for lo, s, hi in zip(limits["min"], shape, limits["max"], strict=True)
        )
        if ok:
            self.shapes[name] = tuple(shape)
        return ok

    def set_tensor_address(self, name: str, ptr: int) -> None:
        self.log.append(("address", name, ptr))
        self.addresses[name] = ptr

    def _tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The bound memory of ``name`` as a tensor of ``shape`` (a view: writes reach the engine)."""
        ptr = self.addresses[name]
        matches = [t for t in self.trt.tensors() if t.data_ptr() == ptr]
        assert matches, f"{name} is bound to {ptr:#x}, which is no registered tensor"
        flat = matches[0].reshape(-1)
        assert flat.numel() >= int(np.prod(shape)), f"{name}: buffer too small for {shape}"
        return flat[: int(np.prod(shape))].view(shape)

    def execute_async_v3(self, stream: int) -> bool:
        self.log.append(("execute",))
        session = self.engine.session
        names = [i.name for i in session.get_inputs()]
        if any(n not in self.shapes for n in names):  # TensorRT: shapes must be set under this profile
            return False
        feeds = {n: self._tensor(n, self.shapes[n]).cpu().numpy().copy() for n in names}
        outputs = session.run(None, feeds)
        for meta, value in zip(session.get_outputs(), outputs, strict=True):
            self._tensor(meta.name, value.shape).copy_(torch.from_numpy(value))  # CPU or CUDA tensors
        return True


class FakeEngine:
    def __init__(self, trt: FakeTRT, plan: dict[str, Any]) -> None:
        import onnxruntime as ort

        self.trt = trt
        self.profiles = plan["profiles"]
        self.session = ort.InferenceSession(plan["onnx"], providers=["CPUExecutionProvider"])
        self.modes = {i.name: FakeTRT.TensorIOMode.INPUT for i in self.session.get_inputs()}
        self.modes |= {o.name: FakeTRT.TensorIOMode.OUTPUT for o in self.session.get_outputs()}
        self.names = list(self.modes)
        self.contexts: list[FakeContext] = []

    num_optimization_profiles = property(lambda self: len(self.profiles))
    num_io_tensors = property(lambda self: len(self.names))

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> Any:
        return self.modes[name]

    def create_execution_context(self) -> FakeContext:
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


class FakeRuntime:
    def __init__(self, trt: FakeTRT) -> None:
        self.trt = trt

    def deserialize_cuda_engine(self, plan: bytes) -> FakeEngine | None:
        if not plan.startswith(b"FAKEPLAN"):
            return None
        self.trt.engine = FakeEngine(self.trt, json.loads(plan[len(b"FAKEPLAN") :]))
        return self.trt.engine


class FakeTRT:
    """The parts of the ``tensorrt`` 10.x module the target uses (see the module docstring)."""

    __version__ = "10.99.0"

    class Logger:
        WARNING = 2

        def __init__(self, severity: int = 2) -> None:
            self.severity = severity

    class NetworkDefinitionCreationFlag(enum.IntEnum):
        STRONGLY_TYPED = 1

    class MemoryPoolType(enum.Enum):
        WORKSPACE = 0

    class TensorIOMode(enum.Enum):
        INPUT = 1
        OUTPUT = 2

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.parse_errors: list[str] = []
        self.fail_build = False
        self.config: FakeConfig | None = None
        self.engine: FakeEngine | None = None
        self.onnx_path = ""
        self.tensors: Callable[[], Iterable[torch.Tensor]] = list

    def Builder(self, logger: Any) -> FakeBuilder:  # noqa: N802 - the tensorrt spelling
        return FakeBuilder(self)

    def OnnxParser(self, network: FakeNetwork, logger: Any) -> FakeParser:  # noqa: N802
        return FakeParser(self, network)

    def Runtime(self, logger: Any) -> FakeRuntime:  # noqa: N802
        return FakeRuntime(self)


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def artifact(qwen2_tied: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trt") / "qwen2-tensorrt"
    run_export(qwen2_tied, out, ExportOptions(target=Target.TENSORRT, max_length=CAPACITY))
    return out


@pytest.fixture(scope="module")
def built(artifact: Path) -> Path:
    return build_engine(artifact, trt_module=FakeTRT(), torch_device=CPU)


def _engine(artifact: Path, device: torch.device = CPU, **options: Any) -> tuple[TensorRTEngine, FakeTRT]:
    fake = FakeTRT()
    engine = TensorRTEngine(
        artifact, load_manifest(artifact), TensorRTOptions(**options), trt_module=fake, torch_device=device
    )
    fake.tensors = engine._device_tensors
    return engine, fake


def _reference(artifact: Path) -> OnnxRuntimeEngine:
    return OnnxRuntimeEngine(artifact, load_manifest(artifact))


def _prompt(n: int, batch: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 151643, (batch, n)).astype(np.int64)


def _greedy(logits: np.ndarray) -> np.ndarray:
    return logits[:, -1].argmax(-1)[:, None].astype(np.int64)


def _profile_switches(log: list[tuple[Any, ...]]) -> list[int]:
    return [entry[1] for entry in log if entry[0] == "profile"]


def _spec(artifact: Path) -> ModelSpec:
    return ModelSpec.from_dict(load_manifest(artifact).spec)


# ---------------------------------------------------------------------------------------- recipe
def test_recipe_profiles(artifact: Path) -> None:
    spec = _spec(artifact)
    r = recipe(spec, capacity=256, dtype="fp16", max_batch=4, max_prompt=128)
    json.dumps(r)  # JSON-serializable
    assert r["capacity"] == 256 and r["precision"] == "fp16" and r["strongly_typed"] is True
    assert r["onnx"] == "model.onnx" and r["workspace"] > 0
    prefill, decode = r["profiles"]
    assert (prefill["name"], decode["name"]) == ("prefill", "decode")
    kv = [f"past_key_values.{i}.{k}" for i in range(spec.num_hidden_layers) for k in ("key", "value")]
    assert set(prefill["shapes"]) == {"input_ids", "attention_mask", "position_ids", "cache_position", *kv}
    assert prefill["shapes"]["input_ids"] == {"min": [1, 1], "opt": [1, 128], "max": [4, 128]}
    assert prefill["shapes"]["attention_mask"]["max"] == [4, 256]
    assert decode["shapes"]["input_ids"] == {"min": [1, 1], "opt": [1, 1], "max": [4, 1]}
    assert decode["shapes"]["cache_position"] == {"min": [1], "opt": [1], "max": [1]}
    assert decode["shapes"]["attention_mask"] == {"min": [1, 1], "opt": [1, 256], "max": [4, 256]}
    for profile in (prefill, decode):
        for name in kv:  # the KV buffers grow with the conversation, up to the capacity
            shape = profile["shapes"][name]
            assert shape["min"] == [1, spec.num_key_value_heads, 1, spec.head_dim]
            assert shape["max"] == [4, spec.num_key_value_heads, 256, spec.head_dim]
    # the artifact's own recipe (written by emit through the pipeline): its --logits last graph has
    # the logits_indices input, 1..max_prompt rows for prefill (speculative verification), 1 for decode
    manifest = load_manifest(artifact)
    own = recipe(spec, capacity=CAPACITY, dtype="fp32", max_batch=1, max_prompt=CAPACITY, logits_rows=True)
    assert manifest.extra["tensorrt"] == own
    assert own["profiles"][0]["shapes"]["logits_indices"] == {"min": [1], "opt": [1], "max": [CAPACITY]}
    assert own["profiles"][1]["shapes"]["logits_indices"] == {"min": [1], "opt": [1], "max": [1]}
    assert manifest.extra["kv_cache"]["layout"] == "fixed"


def test_recipe_refuses_bad_limits(artifact: Path) -> None:
    spec = _spec(artifact)
    with pytest.raises(OptionError, match="max_prompt 300 exceeds the KV capacity 256"):
        recipe(spec, capacity=256, dtype="fp32", max_batch=1, max_prompt=300)
    with pytest.raises(OptionError, match="valid values: fp16, fp32"):
        recipe(spec, capacity=256, dtype="bf16", max_batch=1, max_prompt=16)
    with pytest.raises(OptionError, match="max_batch must be a positive integer"):
        recipe(spec, capacity=256, dtype="fp32", max_batch=0, max_prompt=16)
    with pytest.raises(OptionError, match="optimization level"):
        BuildOptions(optimization_level=6)


# ---------------------------------------------------------------------------------------- no SDK
def test_missing_tensorrt_names_the_install(artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError, even where installed
    with pytest.raises(EngineUnavailableError, match=r"TensorRT is not installed: pip install tensorrt"):
        build_engine(artifact)
    with pytest.raises(EngineUnavailableError, match=r"pip install tensorrt"):
        TensorRTEngine(artifact, load_manifest(artifact))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_missing_cuda_names_the_fix() -> None:
    with pytest.raises(EngineUnavailableError, match=r"torch.cuda.is_available\(\) is False.*CUDA build of PyTorch"):
        trt_target._cuda_device(0)


def test_wrong_target_refused(tmp_path: Path, qwen2_tied: Path) -> None:
    out = tmp_path / "ort"
    run_export(qwen2_tied, out, ExportOptions(max_length=32))
    with pytest.raises(ArtifactError, match="onnxruntime artifact; TensorRT engines need one exported with --target"):
        build_engine(out, trt_module=FakeTRT(), torch_device=CPU)


# ---------------------------------------------------------------------------------------- build
def test_build_engine_with_stand_in(artifact: Path, built: Path) -> None:
    assert built == artifact / "engines" / "cpu-trt10.99.0.plan" and built.is_file()
    info = json.loads(built.with_suffix(".json").read_text())
    assert info["tensorrt"] == "10.99.0" and info["build_seconds"] >= 0
    assert info["recipe"]["profiles"] == load_manifest(artifact).extra["tensorrt"]["profiles"]
    assert (artifact / "engines" / "timing.cache").read_bytes().startswith(b"TIMING")
    assert not [p for p in (artifact / "engines").iterdir() if p.name.endswith(".tmp")]
    load_manifest(artifact)  # engines/ is outside the checksums: the artifact still verifies

    # a rebuild with overrides: loads the saved timing cache, applies the limits, sets the config
    fake = FakeTRT()
    options = BuildOptions(max_batch=2, max_prompt=16, workspace=1 << 20, optimization_level=1)
    messages: list[str] = []
    steps: list[tuple[int, int]] = []
    path = build_engine(
        artifact, options, lambda d, t: steps.append((d, t)), messages.append, trt_module=fake, torch_device=CPU
    )
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)] and any("building" in m for m in messages)
    assert fake.calls[0] == ("create_network", 1 << int(FakeTRT.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    assert fake.calls[1] == ("parse_from_file", str(artifact / "model.onnx"))
    timing = [c for c in fake.calls if c[0] == "create_timing_cache"]
    assert len(timing) == 1 and timing[0][1].startswith(b"TIMING")  # the cache the first build saved
    config = fake.config
    assert config is not None and config.builder_optimization_level == 1
    assert config.pools == {FakeTRT.MemoryPoolType.WORKSPACE: 1 << 20}
    prefill, decode = (p.shapes for p in config.profiles)
    assert prefill["input_ids"]["max"] == [2, 16] and decode["input_ids"]["max"] == [2, 1]
    assert prefill["attention_mask"]["max"] == [2, CAPACITY]
    assert json.loads(path.with_suffix(".json").read_text())["recipe"]["max_batch"] == 2
    build_engine(artifact, trt_module=FakeTRT(), torch_device=CPU)  # restore the default plan for the others


def test_build_engine_reports_parse_and_build_failures(artifact: Path, tmp_path: Path) -> None:
    copy = tmp_path / "a"
    shutil.copytree(artifact, copy, ignore=shutil.ignore_patterns("engines"))
    fake = FakeTRT()
    fake.parse_errors = ["unsupported op Foo", "bad type"]
    with pytest.raises(ArtifactError, match=r"could not parse it \(2 error\(s\)\): Foo /model/layers.0/Foo: unsup"):
        build_engine(copy, trt_module=fake, torch_device=CPU)
    fake = FakeTRT()
    fake.fail_build = True
    with pytest.raises(ArtifactError, match="could not build an engine"):
        build_engine(copy, trt_module=fake, torch_device=CPU)
    assert not list((copy / "engines").glob("*.plan"))
    # a timing cache from another GPU is replaced, not fatal
    (copy / "engines" / "timing.cache").write_bytes(b"BAD cache")
    messages: list[str] = []
    build_engine(copy, message=messages.append, trt_module=FakeTRT(), torch_device=CPU)
    assert any("starting a new timing cache" in m for m in messages)


def test_missing_engine_names_build_engine(artifact: Path, built: Path) -> None:
    fake = FakeTRT()
    fake.__version__ = "10.1.0"  # another TensorRT: another slug
    with pytest.raises(ArtifactError, match=r"no TensorRT engine .*\(cpu-trt10.1.0\).*cpu-trt10.99.0.*build-engine"):
        TensorRTEngine(artifact, load_manifest(artifact), trt_module=fake, torch_device=CPU)


# ---------------------------------------------------------------------------------------- run
def test_parity_profiles_and_in_place_kv(artifact: Path, built: Path) -> None:
    engine, fake = _engine(artifact)
    reference = _reference(artifact)
    assert engine.capabilities.name == "tensorrt" and engine.capabilities.max_context == CAPACITY
    context = fake.engine.contexts[0]
    prompt = _prompt(7)
    a, b = engine.forward(prompt), reference.forward(prompt)
    assert a.dtype == np.float32 and a.shape == (1, 1, engine.spec.vocab_size)
    check_logits(a, b, Noise.CROSS)
    assert _profile_switches(context.log) == []  # prefill runs on profile 0, the context's default
    for _ in range(8):
        token = _greedy(b)
        a, b = engine.forward(token), reference.forward(token)
        check_logits(a, b, Noise.CROSS)
    assert _profile_switches(context.log) == [1]  # switched once, to decode
    assert engine.num_cached_tokens == 15
    kv = [f"{i}.{k}" for i in range(engine.spec.num_hidden_layers) for k in ("key", "value")]
    for name in kv:  # present.* bound to the very memory of past_key_values.*: the cache updates in place
        assert context.addresses[f"present.{name}"] == context.addresses[f"past_key_values.{name}"]
    assert [context.addresses[f"past_key_values.{n}"] for n in kv] == [t.data_ptr() for t in engine._kv]
    # every execute had every input's shape set under the active profile (the stand-in refuses otherwise)
    executes = [i for i, entry in enumerate(context.log) if entry[0] == "execute"]
    assert len(executes) == 9
    last_shapes = {e[1]: e[2] for e in context.log[executes[-2] + 1 : executes[-1]] if e[0] == "shape"}
    assert last_shapes["input_ids"] == (1, 1) and last_shapes["attention_mask"] == (1, 15)
    assert last_shapes["cache_position"] == (1,)
    buffers = [t.data_ptr() for t in engine._kv]
    engine.reset()
    reference.reset()
    check_logits(engine.forward(prompt), reference.forward(prompt), Noise.CROSS)
    assert _profile_switches(context.log) == [1, 0]  # back to prefill once
    assert [t.data_ptr() for t in engine._kv] == buffers  # reused after reset


def test_kv_buffers_grow_with_the_conversation(artifact: Path, built: Path) -> None:
    """Buffers sized to the request (steps of 16 here), reallocated with the cache copied and bound
    again when a call needs more: logits as with full-capacity buffers, addresses still shared."""
    engine, fake = _engine(artifact, kv_step=16)
    full, _ = _engine(artifact)
    prompt = _prompt(12, seed=3)
    check_logits(engine.forward(prompt), full.forward(prompt), Noise.REPEAT)
    assert engine.kv_capacity == 16 and full.kv_capacity == CAPACITY
    for token in range(3, 9):  # 12 -> 18 tokens: past the first buffer
        step = np.array([[token]], np.int64)
        check_logits(engine.forward(step), full.forward(step), Noise.REPEAT)
    assert engine.kv_capacity == 32 and engine.kv_bytes * 2 == full.kv_bytes
    context = fake.engine.contexts[0]
    for i, tensor in enumerate(engine._kv):
        name = f"{i // 2}.{('key', 'value')[i % 2]}"
        assert context.addresses[f"past_key_values.{name}"] == context.addresses[f"present.{name}"] == tensor.data_ptr()


def test_truncate_and_refeed_match_a_fresh_run(artifact: Path, built: Path) -> None:
    engine, _ = _engine(artifact)
    prompt = _prompt(10, seed=1)
    engine.forward(prompt[:, :6])
    for token in (5, 6, 7):
        engine.forward(np.array([[token]], np.int64))
    engine.truncate(6)  # forget the three decoded tokens (their buffer columns stay, masked)
    assert engine.num_cached_tokens == 6
    again = engine.forward(prompt[:, 6:])
    fresh, _ = _engine(artifact)
    check_logits(again, fresh.forward(prompt), Noise.CROSS)
    with pytest.raises(GenerationError, match="cannot keep 11 tokens"):
        engine.truncate(11)
    engine.truncate(0)
    assert engine.num_cached_tokens == 0


def test_overflow_refused(artifact: Path, built: Path) -> None:
    engine, _ = _engine(artifact)
    engine.forward(_prompt(CAPACITY - 2))
    engine.forward(np.array([[3]], np.int64))
    with pytest.raises(GenerationError, match=rf"{CAPACITY + 1} tokens exceed the artifact's context of {CAPACITY}"):
        engine.forward(np.array([[3, 4]], np.int64))
    assert engine.num_cached_tokens == CAPACITY - 1  # the refused step changed nothing
    engine.forward(np.array([[4]], np.int64))  # the last column is still usable
    assert engine.num_cached_tokens == CAPACITY


def test_batch_change_reallocates(artifact: Path, built: Path, tmp_path: Path) -> None:
    copy = tmp_path / "a"
    shutil.copytree(artifact, copy, ignore=shutil.ignore_patterns("engines"))
    build_engine(copy, BuildOptions(max_batch=2), trt_module=FakeTRT(), torch_device=CPU)
    engine, fake = _engine(copy)
    reference = _reference(copy)
    engine.forward(_prompt(5))
    single = [t.data_ptr() for t in engine._kv]
    with pytest.raises(GenerationError, match="batch size changed from 1 to 2; call reset"):
        engine.forward(_prompt(1, batch=2))
    engine.reset()
    ids = _prompt(9, batch=2, seed=3)
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding
    a, b = engine.forward(ids, mask), reference.forward(ids, mask)
    check_logits(a, b, Noise.CROSS)
    assert all(t.shape[0] == 2 for t in engine._kv)
    context = fake.engine.contexts[0]
    assert [context.addresses[f"past_key_values.{i}.key"] for i in range(engine.spec.num_hidden_layers)] == [
        t.data_ptr() for t in engine._kv[::2]
    ]
    assert single != [t.data_ptr() for t in engine._kv]
    for _ in range(3):
        token = _greedy(b)
        a, b = engine.forward(token), reference.forward(token)
        check_logits(a, b, Noise.CROSS)
    engine.reset()
    with pytest.raises(GenerationError, match="batch 3 exceeds the engine's max_batch 2"):
        engine.forward(_prompt(2, batch=3))


def test_long_prompt_is_prefilled_in_chunks(artifact: Path, built: Path, tmp_path: Path) -> None:
    copy = tmp_path / "a"
    shutil.copytree(artifact, copy, ignore=shutil.ignore_patterns("engines"))
    build_engine(copy, BuildOptions(max_prompt=8), trt_module=FakeTRT(), torch_device=CPU)
    engine, fake = _engine(copy)
    assert engine.max_prompt == 8
    prompt = _prompt(21, seed=4)  # chunks of 8, 8, 5 (the stand-in refuses sequences over 8)
    reference = _reference(copy)
    check_logits(engine.forward(prompt), reference.forward(prompt), Noise.CROSS)
    log = fake.engine.contexts[0].log
    assert [e[2] for e in log if e[0] == "shape" and e[1] == "cache_position"] == [(8,), (8,), (5,)]
    engine.reset()
    reference.reset()
    log.clear()  # the last 11 rows (last_k, speculative verification) come from the last two chunks
    check_logits(engine.forward(prompt, last_k=11), reference.forward(prompt, last_k=11), Noise.CROSS)
    assert [e[2] for e in log if e[0] == "shape" and e[1] == "logits_indices"] == [(1,), (6,), (5,)]


def test_cuda_graph_bookkeeping(artifact: Path, built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA-graph path on CPU: ``_capture`` returns a stand-in whose ``replay`` re-runs the
    context with the shapes and addresses bound at capture time (as a real graph replays them)."""
    engine, fake = _engine(artifact)
    engine._use_graphs = True
    context = fake.engine.contexts[0]
    captures: list[int] = []

    def capture() -> Any:
        captures.append(len(context.log))
        return SimpleNamespace(replay=lambda: context.execute_async_v3(0))

    monkeypatch.setattr(engine, "_capture", capture)
    reference = _reference(artifact)
    prompt = _prompt(6, seed=5)
    check_logits(engine.forward(prompt), b := reference.forward(prompt), Noise.CROSS)
    for _ in range(5):
        token = _greedy(b)
        a, b = engine.forward(token), reference.forward(token)
        check_logits(a, b, Noise.CROSS)
    assert len(captures) == 1  # after the first decode step (its execute is the warm-up)
    shapes = [e for e in context.log if e[0] == "shape" and e[1] == "attention_mask"]
    assert shapes[-1][2] == (1, CAPACITY)  # decode runs with the mask padded to capacity
    assert len(shapes) == 2  # prefill + the warm-up decode; the replays set no shapes
    assert sum(e[0] == "execute" for e in context.log) == 1 + 5
    engine.reset()
    reference.reset()
    check_logits(engine.forward(prompt), b := reference.forward(prompt), Noise.CROSS)
    check_logits(engine.forward(_greedy(b)), reference.forward(_greedy(b)), Noise.CROSS)
    assert len(captures) == 2  # the prefill switched profiles: the decode graph was captured again


def test_cuda_graphs_need_cuda(artifact: Path, built: Path) -> None:
    with pytest.raises(OptionError, match="CUDA graphs need a CUDA device"):
        _engine(artifact, cuda_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (PyTorch with CUDA; TensorRT not needed)")
def test_stand_in_on_cuda_buffers(artifact: Path, tmp_path: Path) -> None:
    """The engine's CUDA path (torch.cuda.Stream, device buffers, staging, logits read-back) with
    the stand-in, which copies the bound CUDA tensors to the host to run ONNX Runtime."""
    cuda = torch.device("cuda", 0)
    copy = tmp_path / "a"
    shutil.copytree(artifact, copy, ignore=shutil.ignore_patterns("engines"))
    build_engine(copy, trt_module=FakeTRT(), torch_device=cuda)
    engine, fake = _engine(copy, cuda)
    assert engine._stream is not None and engine._stream_handle != 0 and engine._kv[0].is_cuda
    reference = _reference(copy)
    prompt = _prompt(7)
    a, b = engine.forward(prompt), reference.forward(prompt)
    check_logits(a, b, Noise.CROSS)
    for _ in range(8):
        token = _greedy(b)
        a, b = engine.forward(token), reference.forward(token)
        check_logits(a, b, Noise.CROSS)
    assert _profile_switches(fake.engine.contexts[0].log) == [1]


# ---------------------------------------------------------------------------------------- real GPU
def test_real_tensorrt_engine_matches_onnxruntime(artifact: Path, tmp_path: Path) -> None:
    """Builds and runs a real engine: only where ``tensorrt`` imports and a CUDA GPU exists."""
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install tensorrt, needs a CUDA GPU)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT is installed but torch.cuda.is_available() is False")
    copy = tmp_path / "a"
    shutil.copytree(artifact, copy, ignore=shutil.ignore_patterns("engines"))
    build_engine(copy, BuildOptions(optimization_level=0))
    reference = _reference(copy)
    for graphs in (False, True):
        engine = TensorRTEngine(copy, load_manifest(copy), TensorRTOptions(cuda_graphs=graphs))
        reference.reset()
        prompt = _prompt(7)
        a, b = engine.forward(prompt), reference.forward(prompt)
        np.testing.assert_allclose(a, b, atol=2e-2, rtol=2e-2)  # fp32 engine; TF32 kernels allowed
        for _ in range(8):
            token = _greedy(b)
            a, b = engine.forward(token), reference.forward(token)
            np.testing.assert_allclose(a, b, atol=2e-2, rtol=2e-2)
        assert engine.options.cuda_graphs is graphs


class _NoText:
    eos_token_id = None

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        return ""


class _WrongEveryThird:
    """Drafts plain decoding's next tokens, every third one wrong (accepted, then rejected)."""

    def __init__(self, plain: tuple[int, ...], prompt_len: int) -> None:
        self.plain, self.prompt_len = plain, prompt_len

    def propose(self, context: list[int], k: int, config: Any, rng: Any, allowed: Any) -> tuple[list[int], None]:
        start = len(context) - self.prompt_len
        drafts = list(self.plain[start : start + k])
        return [t + 1 if (start + i) % 3 == 2 else t for i, t in enumerate(drafts)], None


def test_speculative_verify_and_rollback(export, tmp_path: Path) -> None:
    """Speculative decoding through the TensorRT engine's own code (the stand-in): verify forwards of
    several tokens run on the prefill profile at the cache's offset, rejected drafts are dropped by
    ``truncate``; the greedy tokens are plain decoding's (the full-logits and default exports the
    parity suite already makes in this group, copied: build-engine writes into it)."""
    from qwen_export.runtime.generation import GenerationConfig, Generator
    from qwen_export.runtime.speculative import Speculation, Speculator

    for logits in ("all", "last"):  # last: the k+1 verified rows through logits_indices (last_k)
        art = shutil.copytree(export("qwen2_tied", logits=logits, target="tensorrt"), tmp_path / logits)
        build_engine(art, trt_module=FakeTRT(), torch_device=CPU)
        engine, fake = _engine(art)
        prompt = _prompt(12, seed=4)[0].tolist()
        config = GenerationConfig(max_new_tokens=12, temperature=0.0)
        plain = Generator(engine, _NoText()).generate_text(prompt, config)
        log = fake.engine.contexts[0].log
        log.clear()
        proposer = _WrongEveryThird(plain.token_ids, len(prompt))
        speculator = Speculator(Speculation(max_draft_tokens=4), engine, proposer)
        result = Generator(engine, _NoText(), speculator).generate_text(prompt, config)
        assert result.token_ids == plain.token_ids
        stats = result.speculation
        assert stats is not None and 0 < stats.accepted < stats.drafted, stats
        assert 0 in _profile_switches(log)  # the verify forwards ran on the prefill profile
        verified = [e[2][0] for e in log if e[0] == "shape" and e[1] == "cache_position"]
        assert max(verified) > 1  # several tokens in one forward
        rows = [e[2][0] for e in log if e[0] == "shape" and e[1] == "logits_indices"]
        assert rows == ([] if logits == "all" else [1, *verified[1:]])  # the prompt's last, then each verify's


def test_vl_artifact_builds_a_tower_plan_and_decodes_as_onnxruntime(tmp_path: Path) -> None:
    """A Qwen2.5-VL `--target tensorrt` artifact through the TensorRT code (the stand-in): build-engine
    makes the decoder's plan (inputs_embeds, M-RoPE position_ids [3, B, S]) and the tower's
    (``<slug>.vision.plan``, one profile up to the artifact's max_image_patches); the engine encodes
    the image on the tower's plan, and its logits over an image prompt and decode steps, and after
    a truncate, equal the ONNX Runtime engine's on the same artifact."""
    from qwen_export.export.tiny_vl import make_vl_checkpoint
    from qwen_export.runtime.loader import _attach_multimodal
    from qwen_export.runtime.multimodal import image_sources
    from qwen_export.runtime.tokenizer import Tokenizer
    from qwen_export.targets.tensorrt.vision import vision_recipe
    from qwen_export.vision import VisionSpec

    ckpt = make_vl_checkpoint(tmp_path / "ckpt", "qwen2_5_vl", seed=3)
    art = tmp_path / "vl"
    run_export(ckpt, art, ExportOptions(target=Target.TENSORRT, max_length=CAPACITY * 4))
    plan = build_engine(art, trt_module=FakeTRT(), torch_device=CPU)
    record = load_manifest(art).extra["multimodal"]
    tower = json.loads(plan.with_name(plan.stem + ".vision.json").read_text())["recipe"]
    vision = VisionSpec.from_dict(record["vision"])
    assert tower == vision_recipe(vision, record["max_image_patches"], record["vision_inputs"], tower["workspace"])
    assert tower["profiles"][0]["shapes"]["pixel_values"]["max"] == [record["max_image_patches"], vision.patch_dim]
    decoder = json.loads(plan.with_suffix(".json").read_text())["recipe"]["profiles"][1]["shapes"]
    assert decoder["inputs_embeds"]["max"][1:] == [1, 64] and decoder["position_ids"]["max"][:2] == [3, 1]

    engine, fake = _engine(art)
    reference = _reference(art)
    for e in (engine, reference):
        _attach_multimodal(art, load_manifest(art), e)
    from test_vl_vision import _image

    tokenizer = Tokenizer.from_dir(art)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": _image(90, 140, seed=5)}, {"type": "text", "text": "Hi"}],
        }
    ]
    plain, sources = image_sources(messages)
    for e in (engine, reference):
        patches = e.multimodal.prepare_images(sources)
        ids = e.multimodal.expand(tokenizer.apply_chat_template_ids(plain), patches)
        e.multimodal.set_prompt(ids, patches)
    a, b = engine.forward(np.asarray([ids])), reference.forward(np.asarray([ids]))
    check_logits(a[:, -1], b[:, -1], Noise.REORDERED)
    assert engine._vision is not None and fake.engine is engine._vision.engine  # the tower ran on its own plan
    assert "pixel_values" in fake.engine.modes and fake.engine.contexts[0].log[-1] == ("execute",)
    for _ in range(6):
        token = _greedy(b)
        a, b = engine.forward(token), reference.forward(token)
        check_logits(a[:, -1], b[:, -1], Noise.REORDERED)
    engine.truncate(len(ids))
    reference.truncate(len(ids))
    token = _greedy(b)
    check_logits(engine.forward(token)[:, -1], reference.forward(token)[:, -1], Noise.REORDERED)
