"""Property-based fuzzing of every parser that reads untrusted input.

Targets (each a ``@given`` test below; :data:`TARGETS` names them for ``benchmarks/fuzz.py``):

* ``config`` / ``config_file``: ``ModelSpec.from_config`` on arbitrary and mutated Qwen2/Qwen3 configs,
  ``ModelSpec.from_config_file`` on arbitrary bytes;
* ``manifest`` / ``load_manifest``: ``Manifest.from_json`` and ``load_manifest`` on garbage and mutated manifests;
* ``manifest_fields``: manifests whose nested fields (spec, io, extra.kv_cache, passes, ...) hold arbitrary
  JSON: validation fails in one line, or every consumer of those fields works;
* ``artifact_tree``: artifact directories with symlinks (inside, outside, to directories, to /dev/null),
  FIFOs, directories and unlisted files against random listings: one line, no hang, no read outside;
* ``safetensors`` / ``checkpoint``: ``read_header`` on garbage and mutated safetensors files,
  ``Checkpoint.open`` on a fuzzed config.json + model.safetensors;
* ``chat``: ``ChatTemplate(source).render(...)`` with templates built from Jinja fragments (sandbox escapes,
  huge ranges, recursion) and random messages/tools.

Property everywhere: the call returns its documented type or raises the module's :class:`QwenExportError`
subclass with a one-line message; never any other exception. The default run is bounded
(``QWEN_EXPORT_FUZZ_EXAMPLES``, default 150 examples per target) and derandomized for CI.
"""

from __future__ import annotations

import atexit
import copy
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen_export.artifact import MANIFEST_NAME, Manifest, load_manifest
from qwen_export.errors import ArtifactError, CheckpointError, ConfigError, OptionError, QwenExportError
from qwen_export.export.checkpoint import _DTYPES, Checkpoint, read_header
from qwen_export.runtime.chat import ChatTemplate, parse_tool_calls
from qwen_export.spec import ModelSpec

EXAMPLES = int(os.environ.get("QWEN_EXPORT_FUZZ_EXAMPLES", "150"))
settings.register_profile(
    "qwen-export-fuzz",
    max_examples=EXAMPLES,
    derandomize=True,  # reproducible in CI; benchmarks/fuzz.py turns this off for long runs
    deadline=2000,  # ms per example
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
FUZZ = settings.get_profile("qwen-export-fuzz")

#: examples run per target in this process (read by benchmarks/fuzz.py).
CASES: Counter[str] = Counter()

_WORKDIR: Path | None = None


def _workdir(name: str) -> Path:
    """A per-target scratch directory reused across examples (no function-scoped fixtures with @given)."""
    global _WORKDIR
    if _WORKDIR is None:
        _WORKDIR = Path(tempfile.mkdtemp(prefix="qwen-export-fuzz-"))
        atexit.register(shutil.rmtree, _WORKDIR, ignore_errors=True)
    d = _WORKDIR / name
    d.mkdir(exist_ok=True)
    for p in d.iterdir():  # everything an earlier example left: FIFOs and directories too
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink()
    return d


def _write_scratch(path: Path, data: bytes) -> None:
    """Write a scratch file without following a last-component link or waiting on a FIFO a tree
    put there (through a linked directory an example may have turned a path into one): OSError."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _one_line(exc: BaseException) -> None:
    msg = str(exc)
    assert msg and "\n" not in msg and "\r" not in msg, f"{type(exc).__name__} message is not one line: {msg!r}"


# ---------------------------------------------------------------- generic JSON garbage
_SPECIAL = [
    None, True, False, 0, 1, -1, 2, 3, 7, -(2**63), 2**63, 2**64 + 1, 10**30, 10_000_001, 0.5, 1.5, -0.0, 1e308,
    float("nan"), float("inf"), float("-inf"), "", "abc", "64", "qwen2", "yarn", "sliding_attention", "\n",
    [], {}, [1, 2], {"a": 1}, [None], [[[]]],
]  # fmt: skip
special = st.sampled_from(_SPECIAL)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-4, 4096), st.floats(allow_nan=True), st.text(max_size=12)
)
json_values = st.recursive(
    st.one_of(scalars, special),
    lambda c: st.one_of(st.lists(c, max_size=5), st.dictionaries(st.text(max_size=8), c, max_size=5)),
    max_leaves=12,
)

# ---------------------------------------------------------------- 1. config parsing
QWEN2 = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "sliding_window": 32,
    "max_window_layers": 2,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": [2, 3],
    "pad_token_id": 0,
}
QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "vocab_size": 300,
    "max_position_embeddings": 4096,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "attention_bias": False,
    "layer_types": ["full_attention", "sliding_attention", "full_attention"],
    "use_sliding_window": True,
    "sliding_window": 128,
    "eos_token_id": 7,
    "dtype": "float16",
}
CONFIG_KEYS = sorted(set(QWEN2) | set(QWEN3) | {"rope_type", "original_max_position_embeddings", "mscale"})
ROPE_KEYS = [
    "rope_type", "type", "factor", "rope_theta", "original_max_position_embeddings", "attention_factor",
    "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate",
]  # fmt: skip
layer_type_values = st.one_of(st.sampled_from(["full_attention", "sliding_attention", "FULL_ATTENTION"]), json_values)


@st.composite
def mutated_config(draw: st.DrawFn) -> dict[str, Any]:
    cfg = json.loads(json.dumps(draw(st.sampled_from([QWEN2, QWEN3]))))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["delete", "garbage", "number", "rope", "layer_types", "extra", "rope_whole"]))
        key = draw(st.sampled_from(CONFIG_KEYS))
        if op == "delete":
            cfg.pop(key, None)
        elif op == "garbage":
            cfg[key] = draw(json_values)
        elif op == "number":
            cfg[key] = draw(st.one_of(st.integers(-(2**70), 2**70), st.integers(-3, 300), st.floats(), special))
        elif op in ("rope", "rope_whole"):
            rkey = draw(st.sampled_from(["rope_scaling", "rope_parameters"]))
            if op == "rope_whole":
                cfg[rkey] = draw(json_values)
            else:
                rope = cfg.get(rkey) if isinstance(cfg.get(rkey), dict) else {"rope_type": "yarn"}
                rope[draw(st.sampled_from(ROPE_KEYS))] = draw(
                    st.one_of(st.sampled_from(["default", "linear", "dynamic", "yarn", "longrope"]), json_values)
                )
                cfg[rkey] = rope
        elif op == "layer_types":
            n = cfg.get("num_hidden_layers")
            length = draw(st.one_of(st.just(n if isinstance(n, int) and 0 <= n < 64 else 3), st.integers(0, 8)))
            exact = st.lists(layer_type_values, min_size=length, max_size=length)
            cfg["layer_types"] = draw(st.one_of(exact, json_values))
        else:
            cfg[draw(st.text(max_size=10))] = draw(json_values)
    return cfg


configs = st.one_of(
    mutated_config(),
    st.dictionaries(st.one_of(st.sampled_from(CONFIG_KEYS), st.text(max_size=10)), json_values, max_size=25),
    st.builds(lambda extra, base: {**base, **extra}, st.dictionaries(st.sampled_from(CONFIG_KEYS), json_values),
              st.sampled_from([QWEN2, QWEN3])),
)  # fmt: skip


def _check_config(raw: dict[str, Any]) -> ModelSpec | None:
    try:
        spec = ModelSpec.from_config(raw)
    except (ConfigError, OptionError) as exc:
        _one_line(exc)
        return None
    assert isinstance(spec, ModelSpec)
    assert spec.num_attention_heads % spec.num_key_value_heads == 0
    assert spec.head_dim > 0 and spec.head_dim % 2 == 0
    assert len(spec.layer_types) == spec.num_hidden_layers > 0
    assert 0 < spec.rms_norm_eps < 1 and math.isfinite(spec.rope_theta) and spec.rope_theta > 1
    assert all(isinstance(e, int) for e in spec.eos_token_ids)
    assert all(t is None or isinstance(t, int) for t in (spec.bos_token_id, spec.pad_token_id))
    if spec.rope_scaling is not None:
        assert math.isfinite(spec.rope_scaling.factor) and spec.rope_scaling.factor > 0
    if spec.head_dim <= 4096:  # what the exporter computes from the spec must not crash either
        inv_freq, scale = spec.rope_inv_freq_and_scale()
        assert len(inv_freq) == spec.head_dim // 2 and isinstance(scale, float)
    data = spec.to_dict()
    json.dumps(data, allow_nan=False)  # it is written into manifest.json
    assert ModelSpec.from_dict(data) == spec
    assert ModelSpec.from_dict(json.loads(json.dumps(data))) == spec
    return spec


@FUZZ
@given(configs)
def test_fuzz_config(raw: dict[str, Any]) -> None:
    CASES["config"] += 1
    _check_config(raw)


#: inputs that once escaped with another exception type (or were accepted) before spec.py was fixed.
CONFIG_REGRESSIONS = [
    {"architectures": [{}]},
    {"architectures": None, "model_type": [1]},
    {"num_attention_heads": None},
    {"hidden_size": None},
    {"num_key_value_heads": None, "max_position_embeddings": None},  # null defaulted ints: the defaults apply
    {"rope_theta": float("nan")},
    {"rope_theta": float("inf")},
    {"rope_theta": 10**400},
    {"rope_scaling": {"rope_type": "linear", "factor": float("nan")}},
    {"rope_scaling": {"rope_type": "yarn", "original_max_position_embeddings": 0}},
    {"rope_scaling": {"rope_type": "yarn", "factor": 2, "original_max_position_embeddings": "x"}},
    {"rope_scaling": {"rope_type": "yarn", "factor": 2, "beta_fast": "x"}},
    {"rope_scaling": {"rope_type": "yarn", "factor": 2, "beta_fast": -1}},
    {"rope_scaling": {"rope_type": "yarn", "factor": 2, "attention_factor": [1]}},
    {"rope_scaling": {"rope_type": "yarn", "factor": 2, "mscale": float("nan")}},
    {"eos_token_id": "x"},
    {"eos_token_id": [None]},
    {"bos_token_id": {}},
    {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": "a", "layer_types": None},
]


@pytest.mark.parametrize("change", CONFIG_REGRESSIONS, ids=range(len(CONFIG_REGRESSIONS)))
def test_config_regressions(change: dict[str, Any]) -> None:
    _check_config({**QWEN2, **change})


def _mutate_bytes(data: bytes, draw: st.DrawFn) -> bytes:
    buf = bytearray(data)
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if not buf and op != "insert":
            continue
        i = draw(st.integers(0, max(len(buf) - 1, 0)))
        if op == "flip":
            buf[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            buf[i] = draw(st.integers(0, 255))
        elif op == "insert":
            buf[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del buf[i : i + draw(st.integers(1, 8))]
        else:
            del buf[i:]
    return bytes(buf)


SPECIAL_CONFIG_BYTES = [
    b"\xff\xfe{}",  # not UTF-8
    b"\xef\xbb\xbf{}",  # UTF-8 BOM
    b"{" * 5000,
    b"[" * 100_000,  # nesting beyond the recursion limit
    b'{"hidden_size": ' + b"1" * 5000 + b"}",  # an integer over Python's 4300-digit limit
    b"NaN",
    b"null",
    b'"x"',
    b"",
    b"\x00" * 16,
    b'{"model_type": "qwen2\\u0000"}',
]


@st.composite
def config_bytes(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["binary", "mutated", "json", "special"]))
    if kind == "binary":
        return draw(st.binary(max_size=200))
    if kind == "special":
        return draw(st.sampled_from(SPECIAL_CONFIG_BYTES))
    text = json.dumps(draw(configs) if kind == "json" else draw(mutated_config()))
    return _mutate_bytes(text.encode(), draw) if kind == "mutated" else text.encode()


@FUZZ
@given(config_bytes())
def test_fuzz_config_file(data: bytes) -> None:
    CASES["config_file"] += 1
    path = _workdir("config_file") / "config.json"
    path.write_bytes(data)
    try:
        spec = ModelSpec.from_config_file(path)
    except (ConfigError, OptionError) as exc:
        _one_line(exc)
        return
    assert _check_config(json.loads(data.decode("utf-8"))) == spec


# ---------------------------------------------------------------- 2. manifest loading
_SPEC = ModelSpec.from_config(QWEN2)
_FILE_BYTES = b"onnx graph bytes"


def _valid_manifest(files: dict[str, str] | None = None) -> str:
    return Manifest(
        target="onnxruntime",
        dtype="fp32",
        logits="last",
        spec=_SPEC.to_dict(),
        io={"inputs": {"input_ids": {"dtype": "int64", "shape": ["batch", "seq"]}}, "outputs": {}},
        passes=[{"name": "fold", "changed": 3}],
        files=files if files is not None else {"model.onnx": hashlib.sha256(_FILE_BYTES).hexdigest()},
        packages={"numpy": "2.0"},
    ).to_json()


MANIFEST_KEYS = [
    "target", "dtype", "logits", "spec", "io", "passes", "files", "extra", "packages", "created",
    "qwen_export_version", "schema_version",
]  # fmt: skip
file_names = st.one_of(
    st.sampled_from(
        ["model.onnx", "../model.onnx", "/etc/passwd", "", ".", "sub/../model.onnx", "a\x00b", "a" * 300,
         "x/" * 200 + "y", "sub/model.onnx", "manifest.json", "\\..\\x", "~/x", "sub", "model.onnx/"]
    ),
    st.text(max_size=20),
)  # fmt: skip


@st.composite
def manifest_texts(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["text", "mutated", "fields", "special"]))
    if kind == "text":
        return draw(st.text(max_size=200))
    if kind == "special":
        return draw(st.sampled_from(["[" * 100_000, '{"schema_version": ' + "9" * 5000 + "}", "NaN", "", "{}"]))
    data = json.loads(_valid_manifest())
    if kind == "fields":
        for _ in range(draw(st.integers(1, 5))):
            key = draw(st.sampled_from(MANIFEST_KEYS))
            op = draw(st.sampled_from(["delete", "garbage", "files", "version"]))
            if op == "delete":
                data.pop(key, None)
            elif op == "garbage":
                data[key] = draw(json_values)
            elif op == "files":
                data["files"] = draw(st.dictionaries(file_names, st.one_of(st.text(max_size=70), json_values)))
            else:
                data["schema_version"] = draw(st.one_of(st.integers(-2, 3), special))
        return json.dumps(data)
    text = json.dumps(data)
    return _mutate_bytes(text.encode(), draw).decode("utf-8", errors="replace")


@FUZZ
@given(manifest_texts())
def test_fuzz_manifest(text: str) -> None:
    CASES["manifest"] += 1
    try:
        manifest = Manifest.from_json(text)
    except ArtifactError as exc:
        _one_line(exc)
        return
    assert isinstance(manifest, Manifest) and isinstance(manifest.files, dict)
    assert isinstance(manifest.schema_version, int) and 1 <= manifest.schema_version


@st.composite
def manifest_bytes(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(st.one_of(st.binary(max_size=100), manifest_texts().map(lambda t: t.encode("utf-8", "replace"))))
    return _valid_manifest(draw(st.dictionaries(file_names, st.sampled_from(
        [hashlib.sha256(_FILE_BYTES).hexdigest(), "0" * 64, "", "x"]), max_size=4))).encode()  # fmt: skip


@FUZZ
@given(manifest_bytes(), st.booleans(), st.booleans())
def test_fuzz_load_manifest(data: bytes, with_file: bool, verify: bool) -> None:
    CASES["load_manifest"] += 1
    d = _workdir("load_manifest")
    (d / MANIFEST_NAME).write_bytes(data)
    if with_file:
        (d / "model.onnx").write_bytes(_FILE_BYTES)
    try:
        manifest = load_manifest(d, verify=verify)
    except ArtifactError as exc:
        _one_line(exc)
        return
    for rel, digest in manifest.files.items():
        file = (d / rel).resolve()
        assert file.is_file() and file.is_relative_to(d.resolve()), rel
        if verify:
            assert hashlib.sha256(file.read_bytes()).hexdigest() == digest


# ---------------------------------------------------------------- 3. safetensors headers
def _real_safetensors() -> bytes:
    from safetensors.numpy import save_file

    with tempfile.TemporaryDirectory(prefix="qwen-export-fuzz-st-") as tmp:
        path = Path(tmp) / "model.safetensors"
        _save_real(save_file, path)
        return path.read_bytes()


def _save_real(save_file: Any, path: Path) -> None:
    save_file(
        {
            "model.embed_tokens.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
            "half": np.ones((2, 3), dtype=np.float16),
            "ids": np.array([1, 2, 3], dtype=np.int64),
            "mask": np.array([True, False]),
            "scalar": np.array(5.0, dtype=np.float64),
            "empty": np.zeros((0, 3), dtype=np.uint8),
        },
        str(path),
        metadata={"format": "pt"},
    )


REAL_ST = _real_safetensors()
_N = struct.unpack("<Q", REAL_ST[:8])[0]
REAL_HEADER: dict[str, Any] = json.loads(REAL_ST[8 : 8 + _N])
REAL_DATA = REAL_ST[8 + _N :]
ENTRY_KEYS = ["dtype", "shape", "data_offsets"]
dtype_strings = st.one_of(st.sampled_from([*_DTYPES, "F8_E4M3", "f32", "", "BF16 ", "C64"]), st.text(max_size=6))
int_lists = st.lists(st.one_of(st.integers(-2, 1000), st.integers(), special), max_size=4)


def _serialize(header: Any, data: bytes, pad: int, length_delta: int) -> bytes:
    raw = json.dumps(header).encode() + b" " * pad
    return struct.pack("<Q", max(0, len(raw) + length_delta)) + raw + data


@st.composite
def safetensors_bytes(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["binary", "prefix", "bytes", "header", "header", "special"]))
    if kind == "binary":
        return draw(st.binary(max_size=120))
    if kind == "special":
        return draw(
            st.sampled_from(
                [b"", b"\x00" * 7, struct.pack("<Q", 2**64 - 1) + b"{}", struct.pack("<Q", 2) + b"{}",
                 struct.pack("<Q", 3) + b"[]x", struct.pack("<Q", 100_000) + b"[" * 100_000,
                 _serialize({"t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"", 0, 0),
                 struct.pack("<Q", 5008) + b'{"a":' + b"1" * 5000 + b"}  "]
            )
        )  # fmt: skip
    if kind == "prefix":  # corrupt the 8-byte length
        buf = bytearray(REAL_ST)
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, 7))
            buf[i] = draw(st.integers(0, 255))
        return bytes(buf)
    if kind == "bytes":
        return _mutate_bytes(REAL_ST, draw)
    header = json.loads(json.dumps(REAL_HEADER))
    names = sorted(header)
    for _ in range(draw(st.integers(1, 4))):
        name = draw(st.sampled_from(names))
        op = draw(st.sampled_from(["dtype", "shape", "offsets", "entry", "delete", "add", "key"]))
        entry = header.get(name)
        if op == "delete":
            header.pop(name, None)
        elif op == "entry" or not isinstance(entry, dict):
            header[name] = draw(json_values)
        elif op == "dtype":
            entry["dtype"] = draw(dtype_strings)
        elif op == "shape":
            entry["shape"] = draw(int_lists)
        elif op == "offsets":
            entry["data_offsets"] = draw(int_lists)
        elif op == "key":
            entry[draw(st.sampled_from(ENTRY_KEYS))] = draw(json_values)
        else:
            header[draw(st.text(max_size=8))] = {
                "dtype": draw(dtype_strings), "shape": draw(int_lists), "data_offsets": draw(int_lists)
            }  # fmt: skip
    data = REAL_DATA[: draw(st.integers(0, len(REAL_DATA)))] if draw(st.booleans()) else REAL_DATA
    return _serialize(header, data, draw(st.integers(0, 8)), draw(st.sampled_from([0, 0, 0, -1, 1, 7])))


def _check_header(path: Path) -> dict[str, Any] | None:
    try:
        tensors = read_header(path)
    except CheckpointError as exc:
        _one_line(exc)
        return None
    size = path.stat().st_size
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert isinstance(tensors, dict)
    for name, info in tensors.items():
        assert isinstance(name, str) and name != "__metadata__"
        assert 8 + n <= info.start <= info.end <= size, (name, info, size)
        assert all(type(d) is int and d >= 0 for d in info.shape), info
        if info.dtype in _DTYPES:
            assert info.end - info.start == math.prod(info.shape) * _DTYPES[info.dtype][1], info
    return tensors


@FUZZ
@given(safetensors_bytes())
def test_fuzz_safetensors_header(data: bytes) -> None:
    CASES["safetensors"] += 1
    path = _workdir("safetensors") / "model.safetensors"
    path.write_bytes(data)
    _check_header(path)


def test_real_safetensors_header_parses() -> None:
    path = _workdir("safetensors_real") / "model.safetensors"
    path.write_bytes(REAL_ST)
    tensors = _check_header(path)
    assert tensors is not None and set(tensors) == set(REAL_HEADER) - {"__metadata__"}


@FUZZ
@given(config_bytes(), safetensors_bytes(), st.booleans())
def test_fuzz_checkpoint_open(config: bytes, weights: bytes, with_weights: bool) -> None:
    CASES["checkpoint"] += 1
    d = _workdir("checkpoint")
    (d / "config.json").write_bytes(config)
    if with_weights:
        (d / "model.safetensors").write_bytes(weights)
    try:
        ckpt = Checkpoint.open(d)
        if ckpt.spec.num_hidden_layers <= 64:
            ckpt.validate()
    except QwenExportError as exc:
        _one_line(exc)


# ---------------------------------------------------------------- 4. chat templates
_LEAVES = [
    "{{ messages[0]['content'] }}", "{{ message }}", "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}", "{{ joiner.__init__.__globals__.os }}", "{{ lipsum.__globals__ }}",
    "{{ namespace.__init__ }}", "{{ self.__init__.__globals__ }}", "{{ dict.__class__ }}", "{{ dict(a=1).items() }}",
    "{{ dict.fromkeys([1, 2]) }}", "{{ raise_exception('boom\nsecond line') }}", "{{ raise_exception(messages) }}",
    "{{ strftime_now('%Y-%m-%d') }}", "{{ strftime_now('%') }}", "{{ strftime_now(1) }}", "{{ 1/0 }}", "{{ x.y.z }}",
    "{{ undefined_fn() }}", "{{ messages[999].content }}", "{{ tools | tojson }}", "{{ tools | tojson(indent=2) }}",
    "{{ messages | tojson }}", "{{ messages | map(attribute='__class__') | list }}", "{{ 'x' | attr('__class__') }}",
    "{{ '{0.__class__}'.format(1) }}", "{{ '%s' % messages }}", "{{ messages.append(1) }}", "{{ [].pop() }}",
    "{{ range.__self__ }}", "{{ (1).bit_length.__self__ }}", "{{ 'ab' * 50000 }}", "{{ 2**2**40 }}",
    "{% for i in range(10**9) %}{{ i }}{% endfor %}", "{% for i in range(100000) %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "{{ 10 ** (10 ** 9) }}",
    "{{ 'ab' * 50000000 }}", "{{ [0] * 10 ** 8 }}", "{{ " + "(" * 300 + "1" + ")" * 300 + " }}",
    "{% if 1 %}" * 120 + "x" + "{% endif %}" * 120,
    "{% include 'x.j2' %}", "{% extends 'base' %}", "{% import 'm' as m %}", "{% from 'm' import a %}",
    "{% set ns = namespace(a=1) %}{% set ns.a = 2 %}{{ ns.a }}", "{% set ns = namespace(_x=1) %}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}", "{{ namespace(__init__=1) }}",
    "{% macro r(n) %}{{ r(n + 1) }}{% endmacro %}{{ r(0) }}", "{% set v = 1 %}{{ v.__class__ }}",
    "{{ add_generation_prompt }}", "{{ enable_thinking }}", "{{ bos_token }}", "{% break %}", "{% continue %}",
    "{%", "{{", "{{ }}", "{% endfor %}", "{# comment #}", "{% raw %}{{ x }}{% endraw %}", "<|im_start|>", "\n",
    "{{ messages|selectattr('role', 'equalto', 'user')|list|length }}", "{{ (messages|last).content|trim }}",
    "{{ message.content.split('</think>')[-1] }}", "{{ message['tool_calls'][0]['function']['arguments']|tojson }}",
    "{%- if tools %}{{ tools[0].function.name }}{% endif -%}", "{{ documents }}", "{{ loop.index }}",
]  # fmt: skip
_CONDS = ["loop.first", "message.role == 'user'", "tools", "add_generation_prompt", "x is defined", "1/0", "messages"]
leaves = st.one_of(st.sampled_from(_LEAVES), st.text(alphabet="{}%#-+ ab'\"()[].|\n", max_size=12))


def _wrap(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    body = st.lists(children, min_size=0, max_size=3).map("".join)
    return st.one_of(
        body.map(lambda b: "{% for message in messages %}" + b + "{% endfor %}"),
        st.tuples(st.integers(0, 4), body).map(lambda t: f"{{% for i in range({t[0]}) %}}{t[1]}{{% endfor %}}"),
        st.tuples(st.sampled_from(_CONDS), body, body).map(
            lambda t: f"{{% if {t[0]} %}}{t[1]}{{% else %}}{t[2]}{{% endif %}}"
        ),
        body.map(lambda b: "{% macro m(a) %}" + b + "{% endmacro %}{{ m(1) }}"),
        body.map(lambda b: "{% set v %}" + b + "{% endset %}{{ v }}"),
        body,
    )


# Loop ranges in the structure stay small; the hostile leaves rely on chat.py's render budgets.
templates = st.recursive(leaves, _wrap, max_leaves=8)
contents = st.one_of(
    st.text(max_size=30),
    st.none(),
    st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image"]), "text": st.text(max_size=10)})),
    json_values,
)
messages_st = st.one_of(
    st.lists(
        st.fixed_dictionaries(
            {
                "role": st.one_of(st.sampled_from(["system", "user", "assistant", "tool"]), json_values),
                "content": contents,
            },
            optional={"reasoning_content": contents, "tool_calls": json_values, "name": json_values},
        ),
        min_size=1,
        max_size=4,
    ),
    json_values,  # not a list of dicts: OptionError
)
tools_st = st.one_of(
    st.none(),
    st.lists(
        st.fixed_dictionaries(
            {"type": st.just("function"), "function": st.fixed_dictionaries({"name": st.text(max_size=8)})}
        ),
        max_size=2,
    ),
    json_values,
)


@FUZZ
@given(templates, messages_st, tools_st, st.one_of(st.booleans(), json_values))
def test_fuzz_chat_template(source: str, messages: Any, tools: Any, add_generation_prompt: Any) -> None:
    CASES["chat"] += 1
    start = time.perf_counter()
    try:
        out = ChatTemplate(source).render(messages, tools, add_generation_prompt)
    except (ConfigError, OptionError) as exc:
        _one_line(exc)
    else:
        assert isinstance(out, str)
    assert time.perf_counter() - start < 5


#: hostile templates that once escaped the property (found by this harness; fixed in qwen_export/chat.py).
#: Each runs in a subprocess with a timeout so that a regression fails instead of hanging the suite.
HOSTILE_TEMPLATES = {
    "deep_parentheses": "{{ " + "(" * 300 + "1" + ")" * 300 + " }}",  # RecursionError from the Jinja parser
    "deep_nesting": "{% if 1 %}" * 120 + "x" + "{% endif %}" * 120,  # IndentationError from compile()
    "break_outside_loop": "{% break %}",  # SyntaxError from compile()
    "nested_max_ranges": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",  # CPU
    "huge_power": "{{ 10 ** (10 ** 9) }}",  # CPU: big-int power
    "huge_repeat": "{{ 'ab' * 50000000 }}",  # memory: a 100 MB string
}


@pytest.mark.parametrize("name", sorted(HOSTILE_TEMPLATES))
def test_hostile_chat_templates(name: str) -> None:
    import subprocess
    import sys

    code = (
        "import sys\nfrom qwen_export.runtime.chat import ChatTemplate\n"
        "from qwen_export.errors import QwenExportError\n"
        "try:\n    ChatTemplate(sys.argv[1]).render([{'role': 'user', 'content': 'hi'}])\n"
        "except QwenExportError as e:\n    assert '\\n' not in str(e)\n"
    )
    try:
        proc = subprocess.run([sys.executable, "-c", code, HOSTILE_TEMPLATES[name]], capture_output=True, timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name}: rendering did not finish within 5 s")
    assert proc.returncode == 0, proc.stderr.decode()[-300:]


#: target name -> property, for benchmarks/fuzz.py.
TARGETS = {
    "config": test_fuzz_config,
    "config_file": test_fuzz_config_file,
    "manifest": test_fuzz_manifest,
    "load_manifest": test_fuzz_load_manifest,
    "safetensors": test_fuzz_safetensors_header,
    "checkpoint": test_fuzz_checkpoint_open,
    "chat": test_fuzz_chat_template,
}


# ============================================================================ tool-call parsing
_call_fragments = st.sampled_from(
    [
        "<tool_call>",
        "</tool_call>",
        '{"name": "f", "arguments": {"x": 1}}',
        '{"name": ',
        '"arguments": "{\\"a\\": 2}"',
        "[1, 2]",
        "{",
        "}",
        "\n",
        "text ",
        "<tool_call>\n",
        "null",
        '{"name": 3}',
        "[" * 50,
    ]
)
tool_outputs = st.one_of(st.text(max_size=300), st.lists(_call_fragments, max_size=12).map("".join))


@FUZZ
@given(tool_outputs)
def test_fuzz_tool_call_parsing(text: str) -> None:
    """Model output is data: parsing never raises; each call has a name+arguments or an error."""
    CASES["tool_calls"] += 1
    content, calls = parse_tool_calls(text)
    assert isinstance(content, str) and "<tool_call>" not in content
    assert len(calls) == text.count("<tool_call>")
    for call in calls:
        if call.error is None:
            assert isinstance(call.name, str) and call.name and isinstance(call.arguments, dict)
            json.dumps(call.to_openai())
        else:
            assert "\n" not in call.error


# ============================================================================ GGUF header parsing
_SMALL_GGUF: list[bytes] = []


def _small_gguf() -> bytes:
    import gguf

    if _SMALL_GGUF:
        return _SMALL_GGUF[0]
    path = _workdir("gguf_source") / "small.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_context_length(64)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_tensor("token_embd.weight", np.arange(32 * 8, dtype=np.float32).reshape(32, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _SMALL_GGUF.append(path.read_bytes())
    return _SMALL_GGUF[0]


@st.composite
def gguf_bytes(draw: st.DrawFn) -> bytes:
    data = bytearray(_small_gguf())
    kind = draw(st.sampled_from(["flip", "truncate", "random", "splice"]))
    if kind == "random":
        return b"GGUF" + draw(st.binary(max_size=200))
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data)))])
    if kind == "splice":  # overwrite a run of bytes (counts, lengths, type codes) with extreme values
        at = draw(st.integers(4, len(data) - 8))
        data[at : at + 8] = draw(st.sampled_from([b"\xff" * 8, b"\x00" * 8, struct.pack("<q", -1), b"\x7f" * 8]))
        return bytes(data)
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
    return bytes(data)


@FUZZ
@given(gguf_bytes())
def test_fuzz_gguf_header(data: bytes) -> None:
    """Reading a hostile GGUF (header, metadata, tensor table) is a CheckpointError/ConfigError, nothing else."""
    from qwen_export.export.gguf_import import gguf_config, open_gguf

    CASES["gguf"] += 1
    path = _workdir("gguf") / "m.gguf"
    path.write_bytes(data)
    try:
        reader = open_gguf(path)
        gguf_config(reader, path)
    except QwenExportError as exc:
        _one_line(exc)


TARGETS.update(tool_calls=test_fuzz_tool_call_parsing, gguf=test_fuzz_gguf_header)


# ============================================================================ manifest field types (issue 20)
#: nested places the runtime, the engines and ``inspect`` read, each set to arbitrary JSON.
MANIFEST_PATHS = [
    ("spec",), ("io",), ("extra",), ("passes",), ("packages",), ("files",),
    *[("spec", f) for f in _SPEC.to_dict()], ("spec", "rope_scaling", "rope_type"), ("spec", "rope_scaling", "factor"),
    ("extra", "max_length"), ("extra", "kv_cache"), ("extra", "kv_cache", "layout"), ("extra", "kv_cache", "capacity"),
    ("extra", "kv_cache", "bytes_per_token"), ("extra", "quantization"), ("extra", "quantization", "weights"),
    ("extra", "tensorrt"), ("extra", "tensorrt", "capacity"),
    ("io", "inputs"), ("io", "inputs", "input_ids"), ("io", "inputs", "input_ids", "shape"),
    ("io", "inputs", "input_ids", "dtype"), ("io", "outputs", "logits"), ("passes", 0), ("passes", 0, "fired"),
]  # fmt: skip


def _set_path(data: Any, path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        if isinstance(data, dict):
            data = data.setdefault(key, {})
        elif isinstance(data, list) and isinstance(key, int) and key < len(data):
            data = data[key]
        else:
            return
    if isinstance(data, dict):
        data[path[-1]] = value
    elif isinstance(data, list) and isinstance(path[-1], int) and path[-1] < len(data):
        data[path[-1]] = value


@st.composite
def manifest_with_field_types(draw: st.DrawFn) -> str:
    data = json.loads(_valid_manifest())
    data["extra"] = {"max_length": 256, "kv_cache": {"layout": "shared", "capacity": 256, "bytes_per_token": 512}}
    for _ in range(draw(st.integers(1, 4))):
        value = copy.deepcopy(draw(st.one_of(json_values, special)))  # _SPECIAL's lists/dicts are shared
        _set_path(data, draw(st.sampled_from(MANIFEST_PATHS)), value)
    return json.dumps(data)


@FUZZ
@given(manifest_with_field_types())
def test_fuzz_manifest_fields(text: str) -> None:
    """A manifest either fails validation in one line, or every consumer of its fields works on it."""
    from qwen_export.runtime.bench import kv_bytes_per_token
    from qwen_export.runtime.inspection import kv_cache_summary, pass_summary
    from qwen_export.spec import DType, KVLayout, LogitsMode, Target

    CASES["manifest_fields"] += 1
    try:
        manifest = Manifest.from_json(text)
    except ArtifactError as exc:
        _one_line(exc)
        return
    spec = ModelSpec.from_dict(manifest.spec)
    assert spec.num_hidden_layers == len(spec.layer_types) and spec.vocab_size >= 1
    Target.parse(manifest.target), DType.parse(manifest.dtype), LogitsMode.parse(manifest.logits)
    assert 1 <= int(manifest.extra.get("max_length", spec.max_position_embeddings)) <= 10_000_000
    kv = manifest.extra.get("kv_cache") or {}
    if kv:
        KVLayout(kv["layout"])
        assert int(kv.get("capacity", 0)) >= 0
    kv_cache_summary(manifest.extra.get("kv_cache"))
    kv_bytes_per_token(manifest.spec, manifest.dtype)
    recipe = manifest.extra.get("tensorrt")
    if recipe is not None:  # what TensorRTEngine and build_engine read
        assert all(int(recipe[k]) >= 1 for k in ("capacity", "max_batch", "max_prompt"))
        assert len(recipe["profiles"]) == 2
    for record in manifest.passes:
        pass_summary(record)
    for direction in manifest.io.values():
        for info in direction.values():
            assert isinstance(info["dtype"], str) and isinstance(info["shape"], list)


# ============================================================================ artifact trees (issue 20)
_TREE_NAMES = ["model.onnx", "tokenizer.json", "chat_template.jinja", "sub/data.bin", "sub", "engines/x.plan"]
_TREE_KINDS = ["file", "file", "file", "link-inside", "link-outside", "link-dir", "dev-null", "fifo", "dir"]


def _outside() -> Path:
    path = _workdir("tree_outside")
    _write_scratch(path / "secret", _FILE_BYTES)
    return path


@st.composite
def artifact_trees(draw: st.DrawFn) -> tuple[dict[str, str], dict[str, str]]:
    """``(kinds, listing)``: what each path is, and the manifest's ``files`` (right or wrong digests)."""
    kinds = {name: draw(st.sampled_from(_TREE_KINDS)) for name in draw(st.sets(st.sampled_from(_TREE_NAMES)))}
    good = hashlib.sha256(_FILE_BYTES).hexdigest()
    listing = {
        name: draw(st.sampled_from([good, good, "0" * 64]))
        for name in draw(st.sets(st.sampled_from([*_TREE_NAMES, "absent.bin"])))
    }
    return kinds, listing


def _build_tree(root: Path, kinds: dict[str, str]) -> None:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    outside = _outside()
    for name, kind in sorted(kinds.items()):
        path = root / name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if kind == "file":
                _write_scratch(path, _FILE_BYTES)
            elif kind == "link-inside":
                _write_scratch(root / "target.bin", _FILE_BYTES)
                path.symlink_to(root / "target.bin")
            elif kind == "link-outside":
                path.symlink_to(outside / "secret")
            elif kind == "link-dir":
                path.symlink_to(outside, target_is_directory=True)
            elif kind == "dev-null":
                path.symlink_to("/dev/null")
            elif kind == "fifo":
                os.mkfifo(path)
            else:
                path.mkdir()
        except OSError:
            continue  # e.g. "sub" made a file before "sub/data.bin", or a path made a FIFO or link by another


class _Hang(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise _Hang("load_manifest blocked (a FIFO or device read?)")


@FUZZ
@given(artifact_trees(), st.booleans())
def test_fuzz_artifact_tree(tree: tuple[dict[str, str], dict[str, str]], verify: bool) -> None:
    """Links, FIFOs, devices, directories and unlisted files in an artifact: a one-line ArtifactError,
    never a hang or a read outside; accepted trees hold only regular, listed, hashed files."""
    import signal

    from qwen_export.safefs import read_inside

    CASES["artifact_tree"] += 1
    kinds, listing = tree
    root = _workdir("artifact_tree") / "art"
    _build_tree(root, kinds)
    (root / MANIFEST_NAME).write_text(_valid_manifest(listing or {"model.onnx": "0" * 64}))
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(5)
    try:
        manifest = load_manifest(root, verify=verify)
        for rel in manifest.files:
            read_inside(root, rel, 1 << 20)
    except ArtifactError as exc:
        _one_line(exc)
        return
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        assert not path.is_symlink(), rel
        assert path.is_dir() or path.is_file(), rel
        if path.is_file() and rel != MANIFEST_NAME and not rel.startswith("engines/"):
            assert rel in manifest.files, rel
    for rel, digest in manifest.files.items():
        assert (root / rel).is_file() and not (root / rel).is_symlink()
        if verify:
            assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == digest


TARGETS.update(manifest_fields=test_fuzz_manifest_fields, artifact_tree=test_fuzz_artifact_tree)
