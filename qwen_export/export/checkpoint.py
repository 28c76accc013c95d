"""Lazy, torch-free reader of Hugging Face safetensors checkpoints (single file or sharded).

The safetensors headers are parsed here (not by ``safetensors.safe_open``) so that every file is
checked at open time (truncation, offsets past the end, byte counts that do not match the shape)
and so that bfloat16, which numpy lacks, can be widened to float32 without torch or ml_dtypes.
Tensors are read one at a time, on request, and never cached (except, while :meth:`Checkpoint.read_rows`
streams a pre-quantized weight, that weight's packed tensors).

Pickle checkpoints (``pytorch_model.bin``, ``*.pt``) are refused: unpickling runs arbitrary code.

Pre-quantized checkpoints (AWQ / GPTQ, a ``quantization_config`` in config.json, see
:mod:`.prequant`) are read through a float view: each quantized linear's ``qweight``/``qzeros``/
``scales``/``g_idx`` are listed as the one ``<prefix>.weight`` [N, K] (dtype ``F32``) an unquantized
checkpoint would have, and :meth:`Checkpoint.read` returns its dequantized values; the stored
quantization itself is :meth:`Checkpoint.stored_quantization` (what the quantize pass keeps as is).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import stat
import struct
from pathlib import Path

import numpy as np

from qwen_export.errors import CheckpointError
from qwen_export.quant import prequant
from qwen_export.spec import ModelSpec, read_config_json
from qwen_export.vision import MultimodalSpec, parse_multimodal, text_config

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

#: safetensors dtype name -> (little-endian numpy dtype, bytes per element). BF16 is read as uint16.
_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("<f8", 8),
    "F32": ("<f4", 4),
    "F16": ("<f2", 2),
    "BF16": ("<u2", 2),
    "I64": ("<i8", 8),
    "I32": ("<i4", 4),
    "I16": ("<i2", 2),
    "I8": ("i1", 1),
    "U8": ("u1", 1),
    "BOOL": ("?", 1),
}
#: dtypes accepted for the weights of a model we export.
_VL_TEXT = re.compile(r"^model\.language_model\.")
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit
_SHOW = 5  # names listed in an error before "... (N in all)"


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype name, shape and absolute byte range in the file."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


class Checkpoint:
    """A Hugging Face checkpoint directory: ``config.json`` plus safetensors weights.

    ``prequantized``: the stored AWQ/GPTQ quantization (:class:`.prequant.Prequantized`), or None.
    """

    def __init__(
        self,
        directory: Path,
        spec: ModelSpec,
        tensors: dict[str, TensorInfo],
        prequantized: prequant.Prequantized | None = None,
    ) -> None:
        self.directory = directory
        self.spec = spec
        self._tensors = tensors  # what the files store
        self.prequantized = prequantized
        #: name prefixes of tensors outside the text decoder (a VL checkpoint's vision tower),
        #: checked by their own exporter rather than by :meth:`validate`
        self.other_parts: tuple[str, ...] = ()
        # what the exporter sees: pre-quantized linears as their float <prefix>.weight, parts hidden
        self._view = dict(tensors)
        self._rows_cache: tuple[str, prequant.PackedArrays] | None = None
        if prequantized is not None:
            for part in prequantized.parts:
                self._view.pop(part, None)
            for name, linear in prequantized.linears.items():
                q = tensors[linear.qweight]
                self._view[name] = TensorInfo(q.file, "F32", (linear.n, linear.k), q.start, q.end)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, directory: str | Path) -> Checkpoint:
        """Parse ``config.json`` and every safetensors header; raise CheckpointError on any defect."""
        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(f"{directory}: checkpoint directory not found")
        spec = ModelSpec.from_config_file(directory / "config.json")
        tensors = _read_tensors(directory)
        config = prequant.read_config(directory / "config.json")
        pre = None
        if config is not None:
            pre = prequant.plan(config, tensors, expected_tensors(spec), str(directory))
        return cls(directory, spec, tensors, pre)

    @classmethod
    def open_vl(cls, directory: str | Path) -> tuple[Checkpoint, MultimodalSpec]:
        """A vision-language checkpoint: its text decoder's spec (the plain Qwen2 fields of its
        config) and its :class:`MultimodalSpec`; every tensor, the vision tower's included."""
        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(f"{directory}: checkpoint directory not found")
        raw = read_config_json(directory / "config.json")
        multimodal = parse_multimodal(raw, str(directory / "config.json"))
        if multimodal is None:
            raise CheckpointError(f"{directory}: not a Qwen2-VL / Qwen2.5-VL checkpoint (config.json architectures)")
        spec = ModelSpec.from_config(text_config(raw), source=str(directory / "config.json"))
        spec = dataclasses.replace(spec, mrope_section=multimodal.mrope_section)
        # transformers 5 saves the decoder under model.language_model.; the released checkpoints
        # (and the text exporter) name it model.
        tensors = {_VL_TEXT.sub("model.", name): info for name, info in _read_tensors(directory).items()}
        checkpoint = cls(directory, spec, tensors)
        checkpoint.other_parts = ("visual.", "model.visual.")
        return checkpoint, multimodal

    # ------------------------------------------------------------------ queries
    def names(self) -> list[str]:
        """All tensor names, sorted (a pre-quantized linear as its ``<prefix>.weight``, not its parts)."""
        return sorted(self._view)

    def __contains__(self, name: object) -> bool:
        return name in self._view or name in self._tensors

    def info(self, name: str) -> TensorInfo:
        """Where a tensor lives. A pre-quantized ``<prefix>.weight`` has dtype ``F32`` (its dequantized
        view), its [N, K] shape and the file and byte range of its ``qweight``; the stored parts
        (``qweight``, ``qzeros``, ...) remain readable by name."""
        info = self._view.get(name) or self._tensors.get(name)
        if info is None:
            raise CheckpointError(f"checkpoint {self.directory} has no tensor {name}")
        return info

    def _linear(self, name: str) -> prequant.PackedLinear | None:
        return self.prequantized.linears.get(name) if self.prequantized is not None else None

    def stored_quantization(self, name: str) -> prequant.StoredLinear | None:
        """The stored quantization of weight ``name`` (HF name, [N, K]) of a pre-quantized checkpoint,
        as W^T [K, N] blocked along K; None when ``name`` is stored in float. Reads nothing yet."""
        linear = self._linear(name)
        return None if linear is None else prequant.StoredLinear(linear, self._read_stored)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> str:
        """The safetensors dtype name, e.g. ``"BF16"``, ``"F16"``, ``"F32"``."""
        return self.info(name).dtype

    @property
    def files(self) -> list[Path]:
        """The safetensors files holding the tensors, sorted."""
        return sorted({t.file for t in self._tensors.values()})

    # ------------------------------------------------------------------ reading
    def read(self, name: str) -> np.ndarray:
        """Read one tensor into a new writable array. BF16 is widened (exactly) to float32.

        A pre-quantized ``<prefix>.weight`` is dequantized: float32 [N, K] ``(q - z) * s``."""
        linear = self._linear(name)
        if linear is not None:
            return prequant.dequantize_weight(linear, self._read_stored)
        return self._read_stored(name)

    def _read_stored(self, name: str) -> np.ndarray:
        info = self._tensors.get(name)
        if info is None:
            raise CheckpointError(f"checkpoint {self.directory} has no tensor {name}")
        if info.dtype not in _DTYPES:
            raise CheckpointError(f"tensor {name} in {info.file} has dtype {info.dtype}, which is not supported")
        np_dtype, _ = _DTYPES[info.dtype]
        buf = bytearray(info.end - info.start)
        with open(info.file, "rb") as f:
            f.seek(info.start)
            got = f.readinto(buf)
        if got != len(buf):
            raise CheckpointError(f"tensor {name} in {info.file}: file is truncated (was it changed after opening?)")
        arr = np.frombuffer(buf, dtype=np_dtype).reshape(info.shape)
        if info.dtype == "BF16":  # bfloat16 is the top half of a float32
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        return arr

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of tensor ``name`` (first axis), widened like :meth:`read`.

        Lets writers stream a large tensor in bounded memory instead of reading it whole. For a
        pre-quantized weight, the packed tensors (1/8 of the float32 size for int4) are read once and
        held until the last row is served (or another weight is streamed); each call dequantizes its rows.
        """
        linear = self._linear(name)
        if linear is not None:
            if self._rows_cache is None or self._rows_cache[0] != name:
                self._rows_cache = None  # drop the previous weight first
                self._rows_cache = (name, prequant.PackedArrays.read(linear, self._read_stored))
            packed = self._rows_cache[1]
            if stop >= linear.n:
                self._rows_cache = None
            return prequant.dequantize_transposed(prequant.decode(packed, max(0, start), stop))
        info = self.info(name)
        if info.dtype not in _DTYPES:
            raise CheckpointError(f"tensor {name} in {info.file} has dtype {info.dtype}, which is not supported")
        np_dtype, itemsize = _DTYPES[info.dtype]
        rows = info.shape[0] if info.shape else 1
        start, stop = max(0, start), min(rows, stop)
        row_elems = math.prod(info.shape[1:]) if info.shape else 1
        buf = bytearray((stop - start) * row_elems * itemsize)
        with open(info.file, "rb") as f:
            f.seek(info.start + start * row_elems * itemsize)
            got = f.readinto(buf)
        if got != len(buf):
            raise CheckpointError(f"tensor {name} in {info.file}: file is truncated (was it changed after opening?)")
        arr = np.frombuffer(buf, dtype=np_dtype).reshape((stop - start, *info.shape[1:]))
        if info.dtype == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        return arr

    def expect(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Read ``name`` after checking that its shape is ``shape``."""
        info = self.info(name)
        if info.shape != tuple(shape):
            raise CheckpointError(_shape_message(name, info, tuple(shape)))
        return self.read(name)

    # ------------------------------------------------------------------ validation
    def validate(self, spec: ModelSpec | None = None) -> None:
        """Check names, shapes and dtypes against ``spec`` (default: config.json's) before any export work.

        Raises one CheckpointError listing every problem: missing tensors, wrong shapes, non-float
        dtypes and unexpected tensors (other than harmless ones such as ``rotary_emb.inv_freq``).
        """
        spec = spec or self.spec
        expected = expected_tensors(spec)
        if spec.tie_word_embeddings:  # tied checkpoints may still store the (identical) lm_head
            expected.setdefault("lm_head.weight", (spec.vocab_size, spec.hidden_size))
            optional = {"lm_head.weight"}
        else:
            optional = set()
        problems: list[str] = []
        missing = [n for n in expected if n not in self._view and n not in optional]
        if missing:
            problems.append(
                f"checkpoint {self.directory} is missing {len(missing)} expected tensor(s): {_some(missing)}"
            )
        for name, shape in expected.items():
            info = self._view.get(name)
            if info is None:
                continue
            if info.shape != shape:
                problems.append(_shape_message(name, info, shape))
            elif info.dtype not in FLOAT_DTYPES:
                problems.append(
                    f"tensor {name} in {info.file} has dtype {info.dtype}, expected one of {', '.join(FLOAT_DTYPES)}"
                    " (quantized weights are imported only with an AWQ or GPTQ quantization_config in config.json)"
                )
        extra = [
            n
            for n in self.names()
            if n not in expected and not n.endswith("rotary_emb.inv_freq") and not n.startswith(self.other_parts)
        ]
        if extra:
            problems.append(
                f"checkpoint {self.directory} has {len(extra)} unexpected tensor(s) for a "
                f"{spec.architecture.value} model: {_some(extra)} (quantized or a different architecture?)"
            )
        if not problems and self.prequantized is not None:
            for linear in self.prequantized.linears.values():  # act-order (desc_act): a few KiB each
                if linear.has_g_idx:
                    prequant.check_g_idx(linear, self._read_stored(linear.g_idx))
        if problems:
            raise CheckpointError("; ".join(problems))


def expected_tensors(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor names and shapes of a Qwen2/Qwen3 decoder described by ``spec``.

    ``lm_head.weight`` is listed only for untied embeddings.
    """
    h, q, kv, inter = spec.hidden_size, spec.q_size, spec.kv_size, spec.intermediate_size
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (spec.vocab_size, h)}
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
        for proj, rows in (("q", q), ("k", kv), ("v", kv)):
            out[f"{p}self_attn.{proj}_proj.weight"] = (rows, h)
            if spec.qkv_bias:
                out[f"{p}self_attn.{proj}_proj.bias"] = (rows,)
        out[p + "self_attn.o_proj.weight"] = (h, q)
        if spec.o_bias:
            out[p + "self_attn.o_proj.bias"] = (h,)
        if spec.qk_norm:
            out[p + "self_attn.q_norm.weight"] = (spec.head_dim,)
            out[p + "self_attn.k_norm.weight"] = (spec.head_dim,)
        if spec.is_sparse_layer(i):
            out.update(_moe_tensors(spec, p + "mlp."))
        else:
            out[p + "mlp.gate_proj.weight"] = (inter, h)
            out[p + "mlp.up_proj.weight"] = (inter, h)
            out[p + "mlp.down_proj.weight"] = (h, inter)
    out["model.norm.weight"] = (h,)
    if not spec.tie_word_embeddings:
        out["lm_head.weight"] = (spec.vocab_size, h)
    return out


def _moe_tensors(spec: ModelSpec, p: str) -> dict[str, tuple[int, ...]]:
    """A sparse layer's MLP (transformers' per-expert checkpoint names): router, experts, shared expert."""
    moe, h = spec.moe, spec.hidden_size
    assert moe is not None
    out: dict[str, tuple[int, ...]] = {p + "gate.weight": (moe.num_experts, h)}
    for e in range(moe.num_experts):
        out[f"{p}experts.{e}.gate_proj.weight"] = (moe.intermediate_size, h)
        out[f"{p}experts.{e}.up_proj.weight"] = (moe.intermediate_size, h)
        out[f"{p}experts.{e}.down_proj.weight"] = (h, moe.intermediate_size)
    if moe.has_shared_expert:
        inter = moe.shared_expert_intermediate_size
        out[p + "shared_expert.gate_proj.weight"] = (inter, h)
        out[p + "shared_expert.up_proj.weight"] = (inter, h)
        out[p + "shared_expert.down_proj.weight"] = (h, inter)
        out[p + "shared_expert_gate.weight"] = (1, h)
    return out


def _read_tensors(directory: Path) -> dict[str, TensorInfo]:
    index = directory / INDEX_FILE
    single = directory / SINGLE_FILE
    if index.is_file():
        return _open_sharded(index)
    if single.is_file():
        return read_header(single)
    raise CheckpointError(_no_weights_message(directory))


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check one safetensors file's header; byte ranges in the result are absolute."""
    try:
        info = path.stat()
        size = info.st_size
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(f"{path} is not a regular file; a safetensors file is expected")
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is truncated or not a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(
                    f"{path} is truncated or not a safetensors file: header length {n} runs past the end "
                    f"of the file ({size} bytes)"
                )
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:  # bad UTF-8/JSON, an integer over 4300 digits, absurd nesting
        raise CheckpointError(f"{path} has a corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header (not a JSON object)")
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
            continue
        info = _entry(path, name, entry, base)
        if info.end > size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name} ends at byte {info.end} but the file has {size} bytes"
            )
        out[name] = info
    _check_layout(path, out, base, size)
    return out


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key!r} appears twice")
        out[key] = value
    return out


def _check_layout(path: Path, tensors: dict[str, TensorInfo], base: int, size: int) -> None:
    """The safetensors format's own rule (what the ``safetensors`` library enforces): the tensors'
    byte ranges, in offset order, tile the data buffer exactly: no overlap or aliasing (two tensors
    sharing bytes), no gap, nothing after the last one."""
    position, previous = base, None
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if info.start != position:
            what = f"overlaps {previous}" if info.start < position else f"leaves a gap of {info.start - position} bytes"
            raise CheckpointError(
                f"{path} is not a valid safetensors file: tensor {name} (bytes {info.start - base}..{info.end - base}) "
                f"{what}; re-save it with the safetensors library"
            )
        position, previous = info.end, name
    if position != size:
        raise CheckpointError(
            f"{path} is not a valid safetensors file: {size - position} bytes after the last tensor; "
            "re-save it with the safetensors library"
        )


# ---------------------------------------------------------------------- helpers
def _entry(path: Path, name: str, entry: object, base: int) -> TensorInfo:
    bad = f"{path} has a corrupt header entry for tensor {name}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{bad}: not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise CheckpointError(f"{bad}: dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{bad}: shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointError(f"{bad}: data_offsets {offsets!r}")
    if dtype in _DTYPES:
        need = math.prod(shape) * _DTYPES[dtype][1]
        if need != offsets[1] - offsets[0]:
            raise CheckpointError(
                f"{bad}: dtype {dtype} shape {shape} needs {need} bytes but data_offsets span {offsets[1] - offsets[0]}"
            )
    return TensorInfo(path, dtype, tuple(shape), base + offsets[0], base + offsets[1])


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _open_sharded(index: Path) -> dict[str, TensorInfo]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{index} is not a readable JSON index ({exc})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no weight_map object")
    headers: dict[str, dict[str, TensorInfo]] = {}
    out: dict[str, TensorInfo] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise CheckpointError(f"{index} maps tensor {name} to an invalid file name {shard!r}")
        if shard not in headers:
            path = index.parent / shard
            if not path.is_file():
                raise CheckpointError(f"shard {shard} named in {index} is missing (needed for tensor {name})")
            headers[shard] = read_header(path)
        info = headers[shard].get(name)
        if info is None:
            raise CheckpointError(
                f"{index} maps tensor {name} to {shard}, but {index.parent / shard} has no such tensor"
            )
        out[name] = info
    return out


def _no_weights_message(directory: Path) -> str:
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        return (
            f"{directory} holds only pickle checkpoints ({', '.join(pickles[:_SHOW])}); they are refused for safety "
            "because loading a pickle can run arbitrary code. If you trust the file, convert it once with "
            f"transformers: AutoModelForCausalLM.from_pretrained('{directory}')"
            f".save_pretrained('{directory}-safetensors', safe_serialization=True), then use {directory}-safetensors"
        )
    others = sorted(p.name for p in directory.glob("*.safetensors"))
    if others:
        return (
            f"{directory} has {', '.join(others[:_SHOW])} but neither {SINGLE_FILE} nor {INDEX_FILE}; "
            "a Hugging Face checkpoint names its weights one of those"
        )
    return f"{directory} has no weights: expected {SINGLE_FILE} or {INDEX_FILE}"


def _shape_message(name: str, info: TensorInfo, expected: tuple[int, ...]) -> str:
    return f"tensor {name} in {info.file} has shape {list(info.shape)}, expected {list(expected)}"


def _some(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOW])
    return shown if len(names) <= _SHOW else f"{shown}, ... ({len(names)} in all)"
