"""``genai_config.json``: what lets onnxruntime-genai (``og.Model(artifact_dir)``) load an artifact.

The layout follows what onnxruntime-genai's own model builder writes
(``onnxruntime_genai/models/builders/base.py``, ``make_genai_config``), restricted to the keys its
config parser knows (it rejects unknown ones):

- ``model.type``: ``qwen2`` or ``qwen3`` (both are model types of the genai runtime);
- ``model.decoder``: file name, head/hidden sizes, head counts, layers, and the graph's input and
  output names (``position_ids`` only when the graph has that input: the fused graph derives
  positions from the attention mask and has none);
- ``search``: ``max_length`` = the artifact's context, ``past_present_share_buffer`` = whether the
  graph reads and writes one preallocated KV buffer (the fused GroupQueryAttention layout), plus the
  checkpoint's sampling defaults from ``generation_config.json``.

What genai feeds (onnxruntime-genai 0.18, CPU): ``attention_mask`` always grows, ``[batch, past +
new]`` (the static ``[batch, max_length]`` mask is only used with graph capture or on devices that
ask for it); with ``past_present_share_buffer`` the past/present KV tensors are one buffer of
``[batch, kv_heads, search.max_length, head_dim]`` bound as both input and output from the first
run; without it, past starts at ``[batch, kv_heads, 0, head_dim]`` and present is past + new.

This module is pure Python (json only), like :mod:`qwen_export.spec`.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

from qwen_export.errors import ArtifactError
from qwen_export.spec import Architecture, ModelSpec

GENAI_CONFIG_NAME = "genai_config.json"
PAST_KEY = "past_key_values.%d.key"
PAST_VALUE = "past_key_values.%d.value"
PRESENT_KEY = "present.%d.key"
PRESENT_VALUE = "present.%d.value"

#: genai's model type for each architecture (qwen2 and qwen3 are in the runtime's list of
#: decoder-only types; the MoE graphs are ordinary decoder graphs to it: same IO, the experts inside)
MODEL_TYPES = {
    Architecture.QWEN2: "qwen2",
    Architecture.QWEN3: "qwen3",
    Architecture.QWEN2_MOE: "qwen2",
    Architecture.QWEN3_MOE: "qwen3",
}

#: generation_config.json keys copied into genai's ``search`` section (same names in both files).
_SEARCH_KEYS = {"do_sample": bool, "temperature": float, "top_k": int, "top_p": float, "repetition_penalty": float}


def genai_config(
    spec: ModelSpec,
    *,
    max_length: int,
    kv_layout_shared: bool,
    input_names: Collection[str],
    output_names: Collection[str],
    eos_token_ids: Iterable[int],
    bos_token_id: int | None = None,
    pad_token_id: int | None = None,
    generation: Mapping[str, Any] | None = None,
    filename: str = "model.onnx",
) -> dict[str, Any]:
    """The ``genai_config.json`` contents for a decoder graph with these input/output names.

    Raises :class:`ArtifactError` when the graph lacks an input or output genai needs (a genai
    config that names tensors the graph does not have would only fail later, inside genai).
    """
    eos = [int(e) for e in eos_token_ids]
    if not eos:
        raise ArtifactError("genai_config.json needs at least one eos token id; the checkpoint names none")
    if max_length < 1:
        raise ArtifactError(f"genai_config.json: max_length must be positive, got {max_length}")
    _check_graph_io(spec, input_names, output_names)
    inputs: dict[str, str] = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if "position_ids" in input_names:
        inputs["position_ids"] = "position_ids"
    inputs.update(past_key_names=PAST_KEY, past_value_names=PAST_VALUE)

    search = _search(generation or {}, max_length, kv_layout_shared)
    return {
        "model": {
            "bos_token_id": int(bos_token_id) if bos_token_id is not None else eos[0],
            "context_length": int(max_length),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": spec.head_dim,
                "hidden_size": spec.hidden_size,
                "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": PRESENT_KEY, "present_value_names": PRESENT_VALUE},
                "num_attention_heads": spec.num_attention_heads,
                "num_hidden_layers": spec.num_hidden_layers,
                "num_key_value_heads": spec.num_key_value_heads,
            },
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": int(pad_token_id) if pad_token_id is not None else eos[0],
            "type": MODEL_TYPES[spec.architecture],
            "vocab_size": spec.vocab_size,
        },
        "search": search,
    }


def _check_graph_io(spec: ModelSpec, input_names: Collection[str], output_names: Collection[str]) -> None:
    """The graph has every tensor genai feeds and reads, and no input genai would not feed."""
    layers = range(spec.num_hidden_layers)
    needed_inputs = ["input_ids", "attention_mask"] + [p % i for i in layers for p in (PAST_KEY, PAST_VALUE)]
    needed_outputs = ["logits"] + [p % i for i in layers for p in (PRESENT_KEY, PRESENT_VALUE)]
    missing = [n for n in needed_inputs if n not in input_names] + [n for n in needed_outputs if n not in output_names]
    if missing:
        raise ArtifactError(f"cannot write genai_config.json: the graph has no {', '.join(missing[:4])}")
    known_inputs = set(needed_inputs) | {"position_ids"}
    extra = sorted(set(input_names) - known_inputs)
    if extra:
        raise ArtifactError(f"cannot write genai_config.json: genai would not feed graph input(s) {extra}")


def _search(generation: Mapping[str, Any], max_length: int, kv_layout_shared: bool) -> dict[str, Any]:
    """genai's ``search`` section: its defaults, with generation_config.json's sampling values."""
    gen = dict(generation or {})
    search: dict[str, Any] = {
        "diversity_penalty": 0.0,
        "do_sample": False,
        "early_stopping": True,
        "length_penalty": 1.0,
        "max_length": int(max_length),
        "min_length": 0,
        "no_repeat_ngram_size": 0,
        "num_beams": 1,
        "num_return_sequences": 1,
        "past_present_share_buffer": bool(kv_layout_shared),
        "repetition_penalty": 1.0,
        "temperature": 1.0,
        "top_k": 50,
        "top_p": 1.0,
    }
    for key, kind in _SEARCH_KEYS.items():
        value = gen.get(key)
        if isinstance(value, (int, float)) and not (isinstance(value, bool) and kind is not bool):
            search[key] = kind(value)
    return search


def write_genai_config(
    out_dir: str | Path,
    spec: ModelSpec,
    *,
    max_length: int,
    kv_layout_shared: bool,
    input_names: Collection[str] | None = None,
    output_names: Collection[str] | None = None,
    eos_token_ids: Iterable[int] | None = None,
    bos_token_id: int | None = None,
    pad_token_id: int | None = None,
    filename: str = "model.onnx",
    turn_end_token_id: int | None = None,
) -> Path:
    """Write ``out_dir/genai_config.json`` for the decoder ``out_dir/filename``; return its path.

    Call it after the model and the tokenizer/generation files are in ``out_dir``. Defaults:

    - ``input_names``/``output_names``: read from ``out_dir/filename`` (graph only, no weights);
    - ``eos_token_ids``: generation_config.json's ``eos_token_id``, then the spec's, then
      ``turn_end_token_id`` (the tokenizer's ``eos_token``: ``<|im_end|>`` for Qwen instruct), without
      duplicates: the ids our own generator stops at;
    - ``bos_token_id``/``pad_token_id``: generation_config.json, then the spec, then the first eos id;
    - sampling defaults (``do_sample``, ``temperature``, ``top_k``, ``top_p``,
      ``repetition_penalty``): generation_config.json.
    """
    root = Path(out_dir)
    if input_names is None or output_names is None:
        graph_inputs, graph_outputs = _graph_io_names(root / filename)
        input_names = graph_inputs if input_names is None else input_names
        output_names = graph_outputs if output_names is None else output_names
    generation = _read_json_object(root / "generation_config.json")
    if eos_token_ids is None:
        eos_token_ids = _default_eos(generation, spec, turn_end_token_id)
    if bos_token_id is None:
        bos_token_id = _int_or_none(generation.get("bos_token_id"), spec.bos_token_id)
    if pad_token_id is None:
        pad_token_id = _int_or_none(generation.get("pad_token_id"), spec.pad_token_id)
    config = genai_config(
        spec,
        max_length=max_length,
        kv_layout_shared=kv_layout_shared,
        input_names=input_names,
        output_names=output_names,
        eos_token_ids=eos_token_ids,
        bos_token_id=bos_token_id,
        pad_token_id=pad_token_id,
        generation=generation,
        filename=filename,
    )
    path = root / GENAI_CONFIG_NAME
    path.write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- helpers
def _graph_io_names(model_file: Path) -> tuple[list[str], list[str]]:
    import onnx

    if not model_file.is_file():
        raise ArtifactError(f"cannot write genai_config.json: {model_file} does not exist")
    graph = onnx.load(str(model_file), load_external_data=False).graph
    return [v.name for v in graph.input], [v.name for v in graph.output]


def _read_json_object(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ArtifactError(f"{path}: invalid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def _ids(value: Any) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _int_or_none(*candidates: Any) -> int | None:
    for value in candidates:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _default_eos(generation: Mapping[str, Any], spec: ModelSpec, turn_end: int | None) -> list[int]:
    ids = _ids(generation.get("eos_token_id")) + list(spec.eos_token_ids)
    if turn_end is not None:
        ids.append(turn_end)
    return list(dict.fromkeys(ids))
