"""What ``qwen-export inspect`` shows: op histogram, node count, file sizes, the passes that ran
(with how often each rule fired), the KV cache layout, the onnxruntime-genai config of an artifact
and, for a mixture-of-experts model, its experts, top-k and active parameters per token."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from qwen_export.artifact import Manifest, read_artifact_file
from qwen_export.errors import ArtifactError, QwenExportError
from qwen_export.onnx_writer import qualified_op
from qwen_export.quant.scheme import describe_weights


def describe(artifact: str | Path, manifest: Manifest) -> dict[str, Any]:
    """Op histogram of the engine graph (weights are not loaded), every file's size in bytes, one
    summary per pass, the KV cache (``None`` when the manifest does not record it) and the genai
    config's essentials (``None`` without ``genai_config.json``)."""
    import onnx

    root = Path(artifact)
    quantization = manifest.extra.get("quantization")
    info: dict[str, Any] = {
        "manifest": manifest.__dict__,
        "weights": describe_weights(manifest.dtype, quantization if isinstance(quantization, dict) else None),
        "files": {},
    }
    for name in sorted(manifest.files):
        info["files"][name] = (root / name).stat().st_size
    if "model.onnx" in manifest.files:
        model = onnx.load_model_from_string(read_artifact_file(root, manifest, "model.onnx", 2**31))
        ops = Counter(qualified_op(n.domain, n.op_type) for n in model.graph.node)
        info["ops"] = dict(ops.most_common())
        info["nodes"] = sum(ops.values())
        info["initializers"] = len(model.graph.initializer)
    ov_file = root / "openvino_model.xml"
    if "openvino_model.xml" in manifest.files:
        ops = _openvino_ops(ov_file)
        info["ops"] = dict(ops.most_common())
        info["nodes"] = sum(ops.values())
    info["passes"] = [pass_summary(record) for record in manifest.passes if isinstance(record, dict)]
    info["kv_cache"] = kv_cache_summary(manifest.extra.get("kv_cache"))
    info["genai"] = _genai_summary(root, manifest) if "genai_config.json" in manifest.files else None
    info["moe"] = moe_summary(manifest.spec)
    return info


def moe_summary(spec_dict: Any) -> dict[str, Any] | None:
    """An MoE model's experts, top-k, sparse layers, shared expert and parameter counts (total, and
    active per token: every weight a token reads, the embedding row table and lm_head included as
    the model cards count them); None for a dense model or an unreadable spec."""
    from qwen_export.spec import ModelSpec

    try:
        spec = ModelSpec.from_dict(spec_dict)
    except (QwenExportError, KeyError, TypeError, ValueError):
        return None
    moe = spec.moe
    if moe is None:
        return None
    h = spec.hidden_size
    attn = h * (spec.q_size + 2 * spec.kv_size) + spec.q_size * h + 2 * h
    attn += (spec.q_size + 2 * spec.kv_size) if spec.qkv_bias else 0
    attn += 2 * spec.head_dim if spec.qk_norm else 0
    dense_mlp = 3 * h * spec.intermediate_size
    sparse = sum(moe.sparse_layers)
    dense = spec.num_hidden_layers - sparse
    outside = spec.vocab_size * h * (1 if spec.tie_word_embeddings else 2) + h
    common = outside + spec.num_hidden_layers * attn + dense * dense_mlp
    return {
        "experts": moe.num_experts,
        "top_k": moe.top_k,
        "norm_topk_prob": moe.norm_topk_prob,
        "expert_intermediate_size": moe.intermediate_size,
        "shared_expert_intermediate_size": moe.shared_expert_intermediate_size,
        "sparse_layers": sparse,
        "dense_layers": dense,
        "total_params": common + sparse * moe.total_mlp_params(h),
        "active_params_per_token": common + sparse * moe.active_mlp_params(h),
    }


def _openvino_ops(path: Path) -> Counter[str]:
    """Layer types of an OpenVINO IR (``<layer type="..." version="opsetN">``), read without openvino."""
    from xml.etree import ElementTree

    ops: Counter[str] = Counter()
    for _, element in ElementTree.iterparse(path):
        if element.tag == "layer":
            ops[str(element.get("type"))] += 1
            element.clear()
    return ops


def pass_summary(record: dict[str, Any]) -> dict[str, Any]:
    """``{"name", "nodes": "before -> after", "rules": "rule x3, other x0", ...}`` of one manifest pass record."""
    fired = record.get("fired") if isinstance(record.get("fired"), dict) else {}
    rules = ", ".join(f"{rule} x{count}" for rule, count in fired.items()) or "-"
    return {
        "name": str(record.get("name", "?")),
        "changed": bool(record.get("changed", False)),
        "nodes": f"{record.get('nodes_before', '?')} -> {record.get('nodes_after', '?')}",
        "rules": rules,
        "fired": dict(fired),
    }


def kv_cache_summary(kv: Any) -> dict[str, Any] | None:
    """The manifest's ``extra["kv_cache"]`` plus ``bytes_per_sequence`` (capacity x bytes per token)."""
    if not isinstance(kv, dict):
        return None
    out = dict(kv)
    capacity, per_token = kv.get("capacity"), kv.get("bytes_per_token")
    if isinstance(capacity, int) and isinstance(per_token, int):
        out["bytes_per_sequence"] = capacity * per_token
    return out


def _genai_summary(root: Path, manifest: Manifest) -> dict[str, Any] | None:
    try:
        config = json.loads(read_artifact_file(root, manifest, "genai_config.json", 1 << 20).decode("utf-8"))
        return {
            "type": config["model"]["type"],
            "max_length": config["search"]["max_length"],
            "past_present_share_buffer": bool(config["search"].get("past_present_share_buffer", False)),
        }
    except (ArtifactError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError):
        return None
