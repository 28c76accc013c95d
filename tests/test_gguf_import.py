"""GGUF import: tiny seeded Qwen2/Qwen3 checkpoints written as GGUF files (gguf.GGUFWriter, with
llama.cpp's own HF->GGUF tensor name map) and converted back by ``qwen_export.export.gguf_import``."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from conftest import ModuleScratch
from noise import Noise, check_logits
from safetensors import safe_open
from typer.testing import CliRunner

from qwen_export.cli import app
from qwen_export.errors import CheckpointError, ConfigError
from qwen_export.export.checkpoint import Checkpoint
from qwen_export.export.gguf_import import convert_gguf, float32_to_bfloat16_bits, hf_tensor_name
from qwen_export.export.pipeline import ExportOptions
from qwen_export.export.pipeline import export as run_export
from qwen_export.export.tiny import default_tokenizer_dir
from qwen_export.runtime.loader import open_artifact
from qwen_export.spec import ModelSpec

Q8 = gguf.GGMLQuantizationType.Q8_0
#: quantized in the "mixed" GGUF (as a Q4_K_M file quantizes some tensors and keeps norms in F32).
QUANTIZED = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight")
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


# ------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="session")
def gguf_tokens() -> list[str]:
    """The Qwen token strings by id, padded to 151,936 like llama.cpp pads them."""
    import tokenizers

    src = default_tokenizer_dir()
    assert src is not None
    vocab = tokenizers.Tokenizer.from_file(str(src / "tokenizer.json")).get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    return [by_id.get(i, f"[PAD{i}]") for i in range(151936)]


def _tensors(checkpoint: Path) -> dict[str, np.ndarray]:
    with safe_open(str(checkpoint / "model.safetensors"), framework="np") as f:
        return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118


def write_gguf(
    checkpoint: Path,
    out: Path,
    tokens: list[str] | None,
    *,
    arch: str | None = None,
    quantize: dict[str, gguf.GGMLQuantizationType] | None = None,
    float_type: type = np.float32,
    raw: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]] | None = None,
) -> Path:
    """Write ``checkpoint`` as a GGUF file the way llama.cpp's convert_hf_to_gguf.py lays it out."""
    config = json.loads((checkpoint / "config.json").read_text())
    model_arch = config["model_type"]
    arch = arch or model_arch
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if model_arch == "qwen3":
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    if tokens is not None:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(tokens)
        writer.add_bos_token_id(151643)
        writer.add_eos_token_id(151645)
        writer.add_pad_token_id(151643)
        writer.add_add_bos_token(False)
        writer.add_chat_template(CHAT_TEMPLATE)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[model_arch.upper()], config["num_hidden_layers"])
    for name, array in _tensors(checkpoint).items():
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gname is not None, name
        qtype = (quantize or {}).get(name)
        if qtype is not None:
            writer.add_tensor(gname, gguf.quants.quantize(array.astype(np.float32), qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gname, array.astype(float_type if array.ndim > 1 else np.float32))
    for gname, (data, qtype) in (raw or {}).items():
        writer.add_tensor(gname, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def qwen2_gguf(qwen2_tied: Path, gguf_tokens: list[str], module_scratch: ModuleScratch) -> Path:
    return write_gguf(qwen2_tied, module_scratch.mkdir("gguf") / "qwen2.gguf", gguf_tokens)


@pytest.fixture(scope="module")
def qwen2_converted(qwen2_gguf: Path, module_scratch: ModuleScratch) -> Path:
    return convert_gguf(qwen2_gguf, module_scratch.mkdir("conv") / "ckpt", dtype="fp32")


def _spec_without_dtype(path: Path) -> ModelSpec:
    return dataclasses.replace(ModelSpec.from_config_file(path / "config.json"), torch_dtype="-")


# ------------------------------------------------------------------------------------ round trips
def test_name_mapping() -> None:
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("blk.17.attn_q.bias") == "model.layers.17.self_attn.q_proj.bias"
    assert hf_tensor_name("blk.3.attn_output.weight") == "model.layers.3.self_attn.o_proj.weight"
    assert hf_tensor_name("blk.0.attn_k_norm.weight") == "model.layers.0.self_attn.k_norm.weight"
    assert hf_tensor_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    assert hf_tensor_name("rope_freqs.weight") is None


def test_qwen2_f32_round_trip_is_exact(qwen2_tied: Path, qwen2_converted: Path) -> None:
    original, converted = Checkpoint.open(qwen2_tied), Checkpoint.open(qwen2_converted)
    converted.validate()
    assert converted.names() == original.names()
    for name in original.names():
        np.testing.assert_array_equal(converted.read(name), original.read(name), err_msg=name)
    assert _spec_without_dtype(qwen2_converted) == _spec_without_dtype(qwen2_tied)
    assert converted.spec.tie_word_embeddings
    assert json.loads((qwen2_converted / "generation_config.json").read_text())["eos_token_id"] == [151645, 151643]
    tok_config = json.loads((qwen2_converted / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == CHAT_TEMPLATE
    assert tok_config["eos_token"] == "<|im_end|>" and tok_config["pad_token"] == "<|endoftext|>"
    assert not list(qwen2_converted.parent.glob(".*tmp*"))


def test_export_of_converted_checkpoint_matches_transformers(qwen2_converted: Path, tmp_path: Path) -> None:
    run_export(qwen2_converted, tmp_path / "onnx", ExportOptions())
    engine = open_artifact(tmp_path / "onnx").engine
    prompt = np.random.default_rng(0).integers(0, 151643, 24, dtype=np.int64)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(qwen2_converted), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        expected = model(torch.tensor(prompt[None])).logits[0, -1].numpy()
    check_logits(engine.forward(prompt[None])[0, -1], expected, Noise.CROSS)


def test_qwen3_mixed_q8_f16_to_bf16(qwen3: Path, gguf_tokens: list[str], tmp_path: Path) -> None:
    path = write_gguf(
        qwen3, tmp_path / "qwen3.gguf", gguf_tokens, quantize=dict.fromkeys(QUANTIZED, Q8), float_type=np.float16
    )
    out = convert_gguf(path, tmp_path / "ckpt", dtype="bf16", max_shard_bytes=8 << 20)
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    original, converted = Checkpoint.open(qwen3), Checkpoint.open(out)
    converted.validate()
    assert converted.names() == original.names()
    assert {converted.dtype(n) for n in converted.names()} == {"BF16"}
    assert _spec_without_dtype(out) == _spec_without_dtype(qwen3)
    assert converted.spec.head_dim == 32 and converted.spec.qk_norm and not converted.spec.tie_word_embeddings
    for name in original.names():
        ref = original.read(name)
        if name in QUANTIZED:  # Q8_0: one fp16 scale per 32 values, |error| <= scale / 2
            blocks = np.abs(ref.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
            bound = np.broadcast_to(blocks * 0.51, (blocks.shape[0], 32)).reshape(ref.shape)
            err = np.abs(converted.read(name) - ref)
            assert np.all(err <= bound + np.abs(ref) * 2**-8 + 1e-6), name  # plus the bf16 rounding
            assert err.max() > 0
            continue
        stored = ref.astype(np.float16).astype(np.float32) if ref.ndim > 1 else ref
        want = torch.from_numpy(stored).to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(converted.read(name), want, err_msg=name)


def test_bfloat16_rounding_matches_torch() -> None:
    rng = np.random.default_rng(1)
    values = np.concatenate(
        [
            rng.standard_normal(10000).astype(np.float32) * 10,
            np.array([0, -0.0, np.inf, -np.inf, 1e-40, 3.4e38], np.float32),
        ]
    )
    want = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(float32_to_bfloat16_bits(values), want)
    nan = float32_to_bfloat16_bits(np.array([np.nan], np.float32))
    assert np.isnan((nan.astype(np.uint32) << 16).view(np.float32)).all()


def test_cli_convert_then_overwrite(qwen2_gguf: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "ckpt"
    result = runner.invoke(app, ["convert-gguf", str(qwen2_gguf), "-o", str(out), "--dtype", "fp16"])
    assert result.exit_code == 0, result.output
    assert Checkpoint.open(out).dtype("model.embed_tokens.weight") == "F16"
    again = runner.invoke(app, ["convert-gguf", str(qwen2_gguf), "-o", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    bad = runner.invoke(app, ["convert-gguf", str(qwen2_gguf), "-o", str(tmp_path / "x"), "--dtype", "int8"])
    assert bad.exit_code == 2 and "valid values" in bad.output


# ------------------------------------------------------------------------------------ errors
def _error(path: Path, out: Path, **kwargs: object) -> str:
    with pytest.raises((CheckpointError, ConfigError)) as info:
        convert_gguf(path, out, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))
    return message


def test_missing_and_not_gguf(tmp_path: Path, qwen2_tied: Path) -> None:
    assert "not found" in _error(tmp_path / "nope.gguf", tmp_path / "out")
    assert "is not a GGUF file" in _error(qwen2_tied / "model.safetensors", tmp_path / "out")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert "is not a GGUF file" in _error(empty, tmp_path / "out")


def test_truncated(qwen2_tied: Path, tmp_path: Path) -> None:
    full = write_gguf(qwen2_tied, tmp_path / "full.gguf", None).read_bytes()
    for cut in (10, 200, len(full) - 4096):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(full[:cut])
        assert "truncated or corrupt GGUF" in _error(path, tmp_path / "out")


def test_unsupported_architecture(qwen2_tied: Path, tmp_path: Path) -> None:
    path = write_gguf(qwen2_tied, tmp_path / "llama.gguf", None, arch="llama")
    message = _error(path, tmp_path / "out")
    assert "'llama' is not supported" in message and "qwen2" in message and "qwen3" in message


def test_unsupported_quant_type(qwen2_tied: Path, tmp_path: Path) -> None:
    block = np.zeros((4, 292), np.uint8)  # Q8_K: 256 values in 292 bytes
    path = write_gguf(
        qwen2_tied, tmp_path / "q8k.gguf", None, raw={"blk.9.ffn_up.weight": (block, gguf.GGMLQuantizationType.Q8_K)}
    )
    message = _error(path, tmp_path / "out")
    assert "blk.9.ffn_up.weight" in message and "Q8_K" in message


def test_vocabulary_mismatch(qwen2_tied: Path, gguf_tokens: list[str], tmp_path: Path) -> None:
    tokens = list(gguf_tokens)
    tokens[100], tokens[101] = tokens[101], tokens[100]
    path = write_gguf(qwen2_tied, tmp_path / "swapped.gguf", tokens)
    message = _error(path, tmp_path / "out")
    assert "id 100" in message and "--tokenizer-dir" in message
    nodir = tmp_path / "notok"
    nodir.mkdir()
    assert "tokenizer.json" in _error(path, tmp_path / "out", tokenizer_dir=nodir)


def test_refuses_to_replace_a_non_checkpoint(qwen2_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="refusing"):
        convert_gguf(qwen2_gguf, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me"
    shutil.rmtree(out)


# ------------------------------------------------------------------ benchmarks/hf_to_gguf.py (the reverse)
def test_benchmark_writer_round_trips_through_the_importer(qwen2_tied: Path, qwen2_gguf: Path, tmp_path: Path) -> None:
    """``benchmarks/hf_to_gguf.py`` (a checkpoint as a float16 GGUF for the llama.cpp anchor) writes what
    the importer reads back: every tensor under its llama.cpp name, the config, the vocabulary."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import hf_to_gguf

    out = tmp_path / "written.gguf"
    hf_to_gguf.write_f16(qwen2_tied, out, qwen2_gguf)
    back = convert_gguf(out, tmp_path / "ckpt", dtype="fp32")
    original, converted = Checkpoint.open(qwen2_tied), Checkpoint.open(back)
    assert converted.names() == original.names()
    for name in original.names():
        expected = original.read(name).astype(np.float32)
        if expected.ndim == 2:  # written as float16
            expected = expected.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(converted.read(name), expected, err_msg=name)
    assert _spec_without_dtype(back) == _spec_without_dtype(qwen2_tied)
    assert json.loads((back / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    with pytest.raises(SystemExit, match="does not exist"):
        hf_to_gguf.write_f16(qwen2_tied, tmp_path / "a.gguf", tmp_path / "missing.gguf")
    no_vocab = write_gguf(qwen2_tied, tmp_path / "no-vocab.gguf", None)
    with pytest.raises(SystemExit, match="no tokenizer.ggml.tokens"):
        hf_to_gguf.write_f16(qwen2_tied, tmp_path / "b.gguf", no_vocab)
