"""The one check of ``manifest.json``'s fields (types and ranges) before anything uses them.

An artifact is untrusted input: a manifest shipped with matching hashes can still hold a string
where a count belongs, a negative capacity or a 4000-digit integer. :func:`validate_manifest` checks
every field the runtime, the engines and ``inspect`` read, so later code can index and convert
without guarding; a failure is one :class:`~qwen_export.errors.ArtifactError` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from qwen_export.errors import ArtifactError
from qwen_export.safefs import check_relative
from qwen_export.spec import Architecture, DType, KVCacheDType, KVLayout, LayerType, LogitsMode, RopeType, Target

__all__ = ["validate_manifest", "MAX_COUNT"]

MAX_COUNT = 10_000_000  # sizes, lengths, capacities: the same bound config.json parsing uses
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SPEC_INTS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
)
_SPEC_BOOLS = ("tie_word_embeddings", "qkv_bias", "o_bias", "qk_norm")
_ROPE_FLOATS = ("factor", "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")


class _Fields:
    """Typed reads of one JSON object, errors naming ``where.key``."""

    def __init__(self, data: Any, where: str, source: str) -> None:
        if not isinstance(data, dict):
            raise ArtifactError(f"{source}: {where} must be a JSON object, found {type(data).__name__}")
        self.data, self.where, self.source = data, where, source

    def fail(self, key: str, wants: str) -> ArtifactError:
        value = repr(self.data.get(key))
        value = value if len(value) <= 60 else value[:57] + "..."
        return ArtifactError(f"{self.source}: {self.where}.{key} = {value} must be {wants}; re-export the artifact")

    def int(
        self, key: str, low: int = 1, high: int = MAX_COUNT, optional: bool = False, nullable: bool = False
    ) -> None:
        """``optional``: the key may be absent; ``nullable``: it may be null (readers then use None)."""
        value = self.data.get(key)
        if key not in self.data and optional or value is None and nullable:
            return
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise self.fail(key, f"an integer in [{low}, {high}]")

    def real(self, key: str, positive: bool = True, optional: bool = False, nullable: bool = False) -> None:
        value = self.data.get(key)
        if key not in self.data and optional or value is None and nullable:
            return
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (positive and not 0 < value < 1e300):
            raise self.fail(key, "a finite positive number" if positive else "a finite number")

    def bool(self, key: str) -> None:
        if not isinstance(self.data.get(key), bool):
            raise self.fail(key, "true or false")

    def choice(self, key: str, choices: Any, optional: bool = False) -> None:
        value = self.data.get(key)
        if value is None and optional:
            return
        allowed = sorted(c.value for c in choices)
        if value not in allowed:
            raise self.fail(key, f"one of {', '.join(allowed)}")

    def kind(self, key: str, kind: type, optional: bool = True) -> None:
        value = self.data.get(key)
        if (value is None and optional and key not in self.data) or isinstance(value, kind):
            return
        raise self.fail(key, f"a {'JSON object' if kind is dict else kind.__name__}")


def _check_spec(spec: Any, source: str) -> None:
    from qwen_export.spec import ModelSpec

    f = _Fields(spec, "spec", source)
    known = {field.name for field in dataclasses.fields(ModelSpec)}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ArtifactError(f"{source}: spec has unknown fields {unknown[:5]}; was it written by a newer version?")
    f.choice("architecture", Architecture)
    for key in _SPEC_INTS:
        f.int(key)
    f.real("rms_norm_eps")
    f.real("rope_theta")
    for key in _SPEC_BOOLS:
        f.bool(key)
    f.int("sliding_window", optional=True, nullable=True)
    f.kind("torch_dtype", str)
    for key in ("bos_token_id", "pad_token_id"):
        f.int(key, low=0, optional=True, nullable=True)
    layers = spec.get("layer_types")
    allowed = {t.value for t in LayerType}
    if (
        not isinstance(layers, list)
        or len(layers) != spec["num_hidden_layers"]
        or not all(isinstance(t, str) and t in allowed for t in layers)
    ):
        raise f.fail("layer_types", f"a list of num_hidden_layers values from {sorted(allowed)}")
    eos = spec.get("eos_token_ids", [])
    if not isinstance(eos, list) or len(eos) > 64 or not all(_is_id(e) for e in eos):
        raise f.fail("eos_token_ids", "a list of token ids")
    if spec["num_attention_heads"] % spec["num_key_value_heads"] or spec["head_dim"] % 2:
        raise f.fail("num_key_value_heads", "a divisor of num_attention_heads (and head_dim even)")
    rope = spec.get("rope_scaling")
    if rope is not None:
        r = _Fields(rope, "spec.rope_scaling", source)
        unknown = sorted(set(rope) - {field.name for field in dataclasses.fields(_rope_class())})
        if unknown:
            raise ArtifactError(f"{source}: spec.rope_scaling has unknown fields {unknown[:5]}")
        r.choice("rope_type", RopeType)
        for key in _ROPE_FLOATS:
            r.real(key, optional=True, nullable=key in ("attention_factor", "mscale", "mscale_all_dim"))
        r.int("original_max_position_embeddings", optional=True, nullable=True)
        if "truncate" in rope:
            r.bool("truncate")
    if spec.get("moe") is not None:
        _check_moe(spec["moe"], spec["num_hidden_layers"], source)


def _check_moe(moe: Any, layers: int, source: str) -> None:
    """``spec.moe`` (:class:`qwen_export.moe.MoESpec`): its fields, types and ranges."""
    import dataclasses as dc

    from qwen_export.moe import MoESpec

    m = _Fields(moe, "spec.moe", source)
    fields = {field.name for field in dc.fields(MoESpec)}
    unknown, missing = sorted(set(moe) - fields), sorted(fields - set(moe))
    if unknown or missing:
        raise ArtifactError(f"{source}: spec.moe has unknown fields {unknown[:5]} or lacks {missing[:5]}")
    for key in ("num_experts", "top_k", "intermediate_size"):
        m.int(key)
    m.int("shared_expert_intermediate_size", low=0)
    m.bool("norm_topk_prob")
    sparse = moe.get("sparse_layers")
    if not isinstance(sparse, list) or len(sparse) != layers or not all(isinstance(x, bool) for x in sparse):
        raise m.fail("sparse_layers", "a list of num_hidden_layers true/false values")
    if moe["top_k"] > moe["num_experts"]:
        raise m.fail("top_k", "at most num_experts")


def _rope_class() -> type:
    from qwen_export.spec import RopeScaling

    return RopeScaling


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT


def _check_io(io: Any, source: str) -> None:
    _Fields(io, "io", source)
    for direction, tensors in io.items():
        if direction not in ("inputs", "outputs"):
            raise ArtifactError(f"{source}: io has an unknown key {direction!r} (expected inputs, outputs)")
        _Fields(tensors, f"io.{direction}", source)
        for name, info in tensors.items():
            t = _Fields(info, f"io.{direction}[{name!r}]", source)
            t.kind("dtype", str, optional=False)
            shape = info.get("shape")
            dims_ok = isinstance(shape, list) and len(shape) <= 8
            if not dims_ok or not all(isinstance(d, str) and len(d) <= 100 or _is_id(d) for d in shape):
                raise t.fail("shape", "a list of dimensions (non-negative integers or names)")


def _check_extra(extra: Any, source: str) -> None:
    e = _Fields(extra, "extra", source)
    e.int("max_length", optional=True)
    kv = extra.get("kv_cache")
    if kv is not None:
        k = _Fields(kv, "extra.kv_cache", source)
        k.choice("layout", KVLayout)
        k.int("capacity", low=0, optional=True)
        k.int("bytes_per_token", low=0, high=2**40, optional=True)
        k.choice("dtype", KVCacheDType, optional=True)
        k.kind("quantization", dict)
    context = extra.get("context")
    if context is not None:  # the chosen context and the model's own (readers use max_length)
        c = _Fields(context, "extra.context", source)
        c.int("max_length", optional=True)
        c.int("trained", optional=True)
        c.kind("chosen_by", str)
        if context.get("rope_override") is not None:
            c.kind("rope_override", str)
    quant = extra.get("quantization")
    if quant is not None:
        q = _Fields(quant, "extra.quantization", source)
        q.kind("weights", str, optional=False)
    for key in ("tensorrt", "export_seconds"):
        e.kind(key, dict)
    e.kind("last_k_logits", bool)
    trt = extra.get("tensorrt")
    if trt is not None:
        t = _Fields(trt, "extra.tensorrt", source)
        for key in ("capacity", "max_batch", "max_prompt"):
            t.int(key)
        t.int("workspace", high=2**50, optional=True)
        t.choice("precision", DType)
        t.kind("onnx", str)
        profiles = trt.get("profiles")
        if not isinstance(profiles, list) or len(profiles) != 2 or not all(isinstance(p, dict) for p in profiles):
            raise t.fail("profiles", "a list of two profile objects (prefill, decode)")
    e.kind("source", str)


def validate_manifest(data: dict[str, Any], source: str) -> None:
    """Check every manifest field the runtime reads; :class:`ArtifactError` naming the first bad one."""
    top = _Fields(data, "manifest", source)
    top.choice("target", Target)
    top.choice("dtype", DType)
    top.choice("logits", LogitsMode)
    _check_spec(data.get("spec"), source)
    _check_io(data.get("io"), source)
    _check_extra(data.get("extra"), source)
    passes = data.get("passes")
    if not isinstance(passes, list) or not all(isinstance(p, dict) for p in passes):
        raise top.fail("passes", "a list of JSON objects")
    files = data.get("files")
    if not isinstance(files, dict) or not files:
        raise top.fail("files", "a non-empty JSON object of file -> sha256 (every file of the artifact)")
    for rel, digest in files.items():
        check_relative(rel, source)
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise ArtifactError(f"{source}: files[{rel!r}] is not a sha256 hex digest; re-export the artifact")
    packages = data.get("packages")
    if not isinstance(packages, dict) or not all(isinstance(v, str) for v in packages.values()):
        raise top.fail("packages", "a JSON object of package -> version string")
