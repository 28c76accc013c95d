"""ModelSpec: parsing real config.json files and agreeing with transformers on RoPE and layer types."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from qwen_export.errors import ConfigError
from qwen_export.export.trace import rope_inv_freq_and_scale
from qwen_export.spec import Architecture, LayerType, ModelSpec, RopeType

TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def _spec(config: transformers.PretrainedConfig) -> ModelSpec:
    raw = config.to_dict()
    raw["architectures"] = [config.__class__.__name__.replace("Config", "ForCausalLM")]
    return ModelSpec.from_config(raw)


# transformers computes inverse frequencies in float32 (pow, reciprocal and the YaRN blend each round);
# the spec rounds each of those steps to float32 too. torch's float32 pow is not correctly rounded
# everywhere, so the exporter takes ``base ** (2i / dim)`` from torch (export.trace): its tables are
# equal to transformers' bit for bit; the torch-free spec's are within one float32 ulp.
def _tables(spec: ModelSpec) -> tuple[list[float], float]:
    """The exporter's inverse frequencies and scale (checked against the torch-free spec's)."""
    inv, scale = rope_inv_freq_and_scale(spec)
    pure, pure_scale = spec.rope_inv_freq_and_scale()
    np.testing.assert_allclose(pure, inv, rtol=float(np.finfo(np.float32).eps), atol=0)
    assert pure_scale == scale
    return inv, scale


def _close(ours: list[float], theirs: Any) -> None:
    """Bit for bit."""
    theirs = np.asarray(theirs, dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(ours, dtype=np.float32), theirs)
    np.testing.assert_array_equal(np.asarray(ours, dtype=np.float64), theirs.astype(np.float64))


# ---------------------------------------------------------------------- fixtures' config.json
def test_qwen2_tied_config(qwen2_tied: Path) -> None:
    s = ModelSpec.from_config_file(qwen2_tied)  # a directory is accepted too
    assert s.architecture is Architecture.QWEN2
    assert (s.vocab_size, s.hidden_size, s.intermediate_size, s.num_hidden_layers) == (151936, 64, 128, 2)
    assert (s.num_attention_heads, s.num_key_value_heads, s.head_dim, s.kv_groups) == (4, 2, 16, 2)
    assert s.tie_word_embeddings and s.qkv_bias and not s.o_bias and not s.qk_norm
    assert s.rope_scaling is None and s.rope_theta == 10000.0 and s.max_position_embeddings == 256
    assert s.layer_types == (LayerType.FULL, LayerType.FULL) and s.sliding_window is None
    assert s.torch_dtype == "float32" and s.bos_token_id == 151643 and s.eos_token_ids == (151645,)
    assert ModelSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_qwen2_untied_config(qwen2_untied: Path) -> None:
    assert not ModelSpec.from_config_file(qwen2_untied / "config.json").tie_word_embeddings


def test_yarn_bf16_config(qwen2_yarn_bf16_sharded: Path) -> None:
    s = ModelSpec.from_config_file(qwen2_yarn_bf16_sharded / "config.json")
    assert s.torch_dtype == "bfloat16"
    rs = s.rope_scaling
    assert rs is not None and rs.rope_type is RopeType.YARN
    assert (rs.factor, rs.original_max_position_embeddings, s.max_position_embeddings) == (4.0, 64, 256)
    assert ModelSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_qwen3_config(qwen3: Path) -> None:
    s = ModelSpec.from_config_file(qwen3 / "config.json")
    assert s.architecture is Architecture.QWEN3
    assert s.head_dim == 32 and s.q_size == 128 and s.kv_size == 64
    assert s.qk_norm and not s.qkv_bias and not s.o_bias and not s.tie_word_embeddings


# ---------------------------------------------------------------------- RoPE vs transformers
def test_yarn_fixture_matches_transformers(qwen2_yarn_bf16_sharded: Path) -> None:
    config = transformers.AutoConfig.from_pretrained(qwen2_yarn_bf16_sharded)
    inv, scale = _tables(ModelSpec.from_config_file(qwen2_yarn_bf16_sharded))
    ref_inv, ref_scale = ROPE_INIT_FUNCTIONS["yarn"](config)
    _close(inv, ref_inv)
    assert scale == ref_scale and scale > 1


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"beta_fast": 16.0, "beta_slow": 2.0},
        {"attention_factor": 0.8},
        {"mscale": 1.0, "mscale_all_dim": 0.5},
        {"truncate": False},
    ],
)
def test_yarn_variants_match_transformers(extra: dict[str, Any]) -> None:
    # Qwen2.5 long-context settings: head_dim 128, theta 1e6, factor 4 over 32768 positions.
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1e6, **extra}
    config = transformers.Qwen2Config(
        **{**TINY, "hidden_size": 512}, max_position_embeddings=131072, rope_parameters=rope
    )
    inv, scale = _tables(_spec(config))
    ref_inv, ref_scale = ROPE_INIT_FUNCTIONS["yarn"](config)
    _close(inv, ref_inv)
    assert scale == ref_scale


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_default_rope_matches_transformers(arch: str) -> None:
    if arch == "qwen2":
        config = transformers.Qwen2Config(**TINY, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
        fn = transformers.models.qwen2.modeling_qwen2.Qwen2RotaryEmbedding.compute_default_rope_parameters
    else:
        config = transformers.Qwen3Config(**TINY, head_dim=32)
        fn = transformers.models.qwen3.modeling_qwen3.Qwen3RotaryEmbedding.compute_default_rope_parameters
    inv, scale = _tables(_spec(config))
    ref_inv, ref_scale = fn(config)
    assert len(inv) == len(ref_inv)
    _close(inv, ref_inv)
    assert scale == ref_scale == 1.0


def test_qwen3_head_dim_default_matches_transformers() -> None:
    raw = {**TINY, "architectures": ["Qwen3ForCausalLM"]}  # no head_dim: transformers uses 128
    assert ModelSpec.from_config(raw).head_dim == transformers.Qwen3Config(**TINY).head_dim == 128


def test_rope_parameters_and_legacy_spelling_agree() -> None:
    base = {**TINY, "architectures": ["Qwen2ForCausalLM"], "max_position_embeddings": 256}
    legacy = ModelSpec.from_config(
        {
            **base,
            "rope_theta": 1e6,
            "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
        }
    )
    new = ModelSpec.from_config(
        {
            **base,
            "rope_parameters": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 64,
                "rope_theta": 1e6,
            },
        }
    )
    assert legacy == new and new.rope_theta == 1e6
    plain = ModelSpec.from_config({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    assert plain.rope_scaling is None and plain.rope_theta == 5e5


# ---------------------------------------------------------------------- errors
def test_unsupported_architecture() -> None:
    with pytest.raises(ConfigError) as err:
        ModelSpec.from_config({**TINY, "architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    msg = str(err.value)
    assert "LlamaForCausalLM" in msg and "Qwen2ForCausalLM" in msg and "Qwen3ForCausalLM" in msg


def test_heads_not_divisible() -> None:
    raw = {**TINY, "architectures": ["Qwen2ForCausalLM"]}
    with pytest.raises(ConfigError, match="num_attention_heads=4 is not a multiple of num_key_value_heads=3"):
        ModelSpec.from_config({**raw, "num_key_value_heads": 3})
    with pytest.raises(ConfigError, match="hidden_size=66 is not divisible by num_attention_heads=4"):
        ModelSpec.from_config({**raw, "hidden_size": 66})


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        ModelSpec.from_config_file(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ConfigError, match="invalid JSON at line 1"):
        ModelSpec.from_config_file(tmp_path)


# ---------------------------------------------------------------------- sliding window
@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
@pytest.mark.parametrize(
    "settings",
    [
        {"use_sliding_window": False},
        {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2},
        {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0},
        {"use_sliding_window": True, "sliding_window": 16},  # default max_window_layers 28 > 4 layers
        {"use_sliding_window": False, "sliding_window": 16, "max_window_layers": 1},
        {"use_sliding_window": False, "sliding_window": 8, "layer_types": ["sliding_attention"] * 4},
        {
            "use_sliding_window": True,
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        },
    ],
)
def test_layer_types_match_transformers(arch: str, settings: dict[str, Any]) -> None:
    cls = transformers.Qwen2Config if arch == "qwen2" else transformers.Qwen3Config
    extra = {"head_dim": 16} if arch == "qwen3" else {}
    config = cls(**TINY, **extra, **settings)
    spec = _spec(config)
    assert [t.value for t in spec.layer_types] == config.layer_types or (
        config.sliding_window is None and all(t is LayerType.FULL for t in spec.layer_types)
    )
    assert spec.sliding_window == config.sliding_window
    assert spec.has_sliding_layers == ("sliding_attention" in config.layer_types and config.sliding_window is not None)


def test_sliding_fixture_roundtrip(tmp_path: Path) -> None:
    from qwen_export.export.tiny import make_checkpoint

    d = make_checkpoint(tmp_path / "sw", layers=3, vocab=512, sliding=True, sliding_window=8)
    config = transformers.AutoConfig.from_pretrained(d)
    spec = ModelSpec.from_config_file(d)
    assert (
        [t.value for t in spec.layer_types]
        == config.layer_types
        == ["full_attention", "sliding_attention", "sliding_attention"]
    )
    assert spec.sliding_window == config.sliding_window == 8
