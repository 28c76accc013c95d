"""genai_config.json: its fields, and onnxruntime-genai generating the same greedy tokens as our engine."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from qwen_export.errors import ArtifactError
from qwen_export.spec import Architecture, ModelSpec
from qwen_export.targets.onnxruntime.genai_config import GENAI_CONFIG_NAME, genai_config, write_genai_config

CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 1000,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "eos_token_id": 7,
    "bos_token_id": 5,
}


def _spec(**changes) -> ModelSpec:
    return ModelSpec.from_config({**CONFIG, **changes})


def _io(layers: int, position_ids: bool) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "attention_mask"] + (["position_ids"] if position_ids else [])
    inputs += [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    outputs = ["logits"] + [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return inputs, outputs


@pytest.mark.parametrize("shared", [True, False])
def test_fields(shared: bool) -> None:
    spec = _spec()
    inputs, outputs = _io(3, position_ids=not shared)
    config = genai_config(
        spec,
        max_length=300,
        kv_layout_shared=shared,
        input_names=inputs,
        output_names=outputs,
        eos_token_ids=[7, 9],
        bos_token_id=5,
        pad_token_id=None,
    )
    model, decoder, search = config["model"], config["model"]["decoder"], config["search"]
    assert model["type"] == "qwen2" and model["vocab_size"] == 1000 and model["context_length"] == 300
    assert model["eos_token_id"] == [7, 9] and model["bos_token_id"] == 5 and model["pad_token_id"] == 7
    assert decoder["filename"] == "model.onnx"
    assert (decoder["head_size"], decoder["hidden_size"]) == (16, 64)
    assert (decoder["num_attention_heads"], decoder["num_key_value_heads"], decoder["num_hidden_layers"]) == (4, 2, 3)
    expected_inputs = {
        "input_ids": "input_ids",
        "attention_mask": "attention_mask",
        "past_key_names": "past_key_values.%d.key",
        "past_value_names": "past_key_values.%d.value",
    }
    if not shared:
        expected_inputs["position_ids"] = "position_ids"
    assert decoder["inputs"] == expected_inputs
    assert decoder["outputs"] == {
        "logits": "logits",
        "present_key_names": "present.%d.key",
        "present_value_names": "present.%d.value",
    }
    assert decoder["session_options"] == {"log_id": "onnxruntime-genai", "provider_options": []}
    assert search["max_length"] == 300 and search["past_present_share_buffer"] is shared
    assert search["num_beams"] == 1 and search["do_sample"] is False
    json.dumps(config)  # JSON-able


def test_qwen3_type_sampling_defaults_and_single_eos() -> None:
    spec = dataclasses.replace(_spec(), architecture=Architecture.QWEN3)
    inputs, outputs = _io(3, position_ids=False)
    config = genai_config(
        spec,
        max_length=64,
        kv_layout_shared=True,
        input_names=inputs,
        output_names=outputs,
        eos_token_ids=[7],
        generation={"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05},
    )
    assert config["model"]["type"] == "qwen3" and config["model"]["eos_token_id"] == 7
    search = config["search"]
    assert (search["do_sample"], search["temperature"], search["top_k"], search["top_p"]) == (True, 0.7, 20, 0.8)
    assert search["repetition_penalty"] == 1.05


def test_refuses_graphs_genai_cannot_drive() -> None:
    spec = _spec()
    inputs, outputs = _io(2, position_ids=False)  # the spec has 3 layers
    with pytest.raises(ArtifactError, match="past_key_values.2.key"):
        genai_config(
            spec, max_length=8, kv_layout_shared=True, input_names=inputs, output_names=outputs, eos_token_ids=[7]
        )
    inputs, outputs = _io(3, position_ids=False)
    with pytest.raises(ArtifactError, match="beam_idx"):
        genai_config(
            spec,
            max_length=8,
            kv_layout_shared=True,
            input_names=[*inputs, "beam_idx"],
            output_names=outputs,
            eos_token_ids=[7],
        )
    with pytest.raises(ArtifactError, match="eos"):
        genai_config(
            spec, max_length=8, kv_layout_shared=True, input_names=inputs, output_names=outputs, eos_token_ids=[]
        )


def test_write_reads_generation_config_for_ids_and_sampling(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [11, 7], "pad_token_id": 3, "do_sample": True, "temperature": 0.6})
    )
    inputs, outputs = _io(3, position_ids=False)
    path = write_genai_config(
        tmp_path, _spec(), max_length=128, kv_layout_shared=True, input_names=inputs, output_names=outputs
    )
    assert path == tmp_path / GENAI_CONFIG_NAME
    config = json.loads(path.read_text())
    assert config["model"]["eos_token_id"] == [11, 7]  # generation_config's, then config.json's 7 (deduplicated)
    assert config["model"]["pad_token_id"] == 3 and config["model"]["bos_token_id"] == 5
    assert config["search"]["do_sample"] is True and config["search"]["temperature"] == 0.6
    with pytest.raises(ArtifactError, match="model.onnx"):
        write_genai_config(tmp_path, _spec(), max_length=128, kv_layout_shared=True)  # no graph to read names from


# ----------------------------------------------------------------------------- onnxruntime-genai runs the artifact
def _genai_artifact(art: Path, tmp_path: Path) -> Path:
    """``art`` itself when the export wrote genai_config.json, else a copy with one written for it."""
    if (art / GENAI_CONFIG_NAME).is_file():
        return art
    from qwen_export.artifact import load_manifest

    manifest = load_manifest(art, verify=False)
    copy = shutil.copytree(art, tmp_path / art.name)
    shared = (manifest.extra.get("kv_cache") or {}).get("layout") == "shared"
    from qwen_export.runtime.tokenizer import Tokenizer

    write_genai_config(
        copy,
        ModelSpec.from_dict(manifest.spec),
        max_length=manifest.extra["max_length"],
        kv_layout_shared=shared,
        turn_end_token_id=Tokenizer.from_dir(copy).eos_token_id,
    )
    return copy


def _greedy_both(art: Path, new_tokens: int) -> tuple[list[int], list[int], dict]:
    import numpy as np

    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    from qwen_export.runtime.generation import GenerationConfig, Generator
    from qwen_export.runtime.loader import open_artifact

    loaded = open_artifact(art)
    prompt = loaded.tokenizer.encode("The quick brown fox jumps over the lazy dog. Once upon a time")
    stop = set(loaded.stop_token_ids) | ({loaded.tokenizer.eos_token_id} - {None})
    ours = Generator(loaded.engine, loaded.tokenizer).generate_text(
        prompt, GenerationConfig(max_new_tokens=new_tokens, temperature=0.0, stop_token_ids=tuple(sorted(stop)))
    )

    config = json.loads((art / GENAI_CONFIG_NAME).read_text())
    assert set(np.atleast_1d(config["model"]["eos_token_id"]).tolist()) == stop  # genai stops where we stop
    model = og.Model(str(art))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray([prompt], dtype=np.int32))
    theirs: list[int] = []
    while not generator.is_done():
        generator.generate_next_token()
        theirs.append(int(generator.get_next_tokens()[0]))
    return list(ours.token_ids), theirs, config


@pytest.mark.parametrize(("case", "fuse"), [("qwen2_tied", True), ("qwen3", True), ("qwen2_tied", False)])
def test_onnxruntime_genai_generates_our_greedy_tokens(export, tmp_path: Path, case: str, fuse: bool) -> None:
    """Fused (one shared KV buffer, no position_ids) and unfused (concatenated KV, position_ids)."""
    from qwen_export.artifact import load_manifest

    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    source = export(case, fuse=fuse)
    manifest = load_manifest(source, verify=False)
    art = _genai_artifact(source, tmp_path)
    ours, theirs, config = _greedy_both(art, new_tokens=12)
    assert config["model"]["type"] == case[:5]
    assert config["search"]["past_present_share_buffer"] is fuse
    assert manifest.extra["kv_cache"]["layout"] == ("shared" if fuse else "concat")
    assert ("position_ids" in config["model"]["decoder"]["inputs"]) == ("position_ids" in manifest.io["inputs"])
    assert len(ours) >= 2 and theirs == ours
