"""An int8 KV cache for ONNX Runtime artifacts (``export --kv-cache int8``).

ONNX Runtime's CPU ``com.microsoft::GroupQueryAttention`` (``contrib_ops/cpu/bert/
group_query_attention.cc``, ``gqa_attention_base.h``, MLAS ``qkv_quant.cpp``) keeps a quantized
cache when ``k_quant_type``/``v_quant_type`` are set (the CPU kernel wants both equal),
``kv_cache_bit_width`` = 8 and the inputs ``k_scale``/``v_scale`` (float) are given:

- ``past_key``/``past_value``/``present_*`` are **int8** (8-bit uint8 is refused by the kernel;
  4-bit packs two values in a uint8, not used here);
- every new key (after the rotary embedding the op applies itself) and value is written as
  ``clamp(rint(x / scale), -128, 127)``: symmetric, round half to even, saturating; attention reads
  ``q * scale`` back for every cached token, the new ones included (prefill is quantized too);
- the scales are **static** inputs: ``PER_TENSOR`` one float, ``PER_CHANNEL`` ``kv_heads x
  head_dim`` floats (``[1, kv_heads, 1, head_dim]``). Nothing adapts them at run time, so a value
  beyond ``127 x scale`` is clipped.
- an fp16 graph (``T = float16``) takes the same int8 cache in the installed 1.32 (probed: the
  same codes as from fp32 keys and values); an fp16 cache under fp32 compute is not among the
  kernel's type constraints (``T_CACHE`` float16 pairs with ``T`` float16 only).

So the scales are fixed at export (:mod:`qwen_export.quant.kv_cache`), per channel, from the
calibration text run through the model layer by layer.

``onnxruntime`` is imported lazily (:func:`int8_kv_unavailable`).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from qwen_export.passes.base import MS_DOMAIN, FusionError, GraphPass

RULE = "int8_kv_cache"


@functools.cache
def int8_kv_unavailable() -> str:
    """Why the installed ONNX Runtime cannot run an int8 KV cache ("" when it can): one
    GroupQueryAttention with an int8 cache, run once on a tiny input."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError as exc:  # pragma: no cover - core dependencies
        return f"{exc.name} is not installed"
    heads, dim = 2, 8
    io = [
        helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 1, 3 * heads * dim]),
        helper.make_tensor_value_info("past", TensorProto.INT8, [1, heads, 4, dim]),
        helper.make_tensor_value_info("past_v", TensorProto.INT8, [1, heads, 4, dim]),
    ]
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [1, heads, 1, dim], [0.01] * (heads * dim))
    lens = helper.make_tensor("lens", TensorProto.INT32, [1], [0])
    total = helper.make_tensor("total", TensorProto.INT32, [], [1])
    node = helper.make_node(
        "GroupQueryAttention",
        ["q", "", "", "past", "past_v", "lens", "total", "", "", "", "", "", "scale", "scale"],
        ["out", "present", "present_v"],
        domain=MS_DOMAIN,
        num_heads=heads,
        kv_num_heads=heads,
        k_quant_type="PER_CHANNEL",
        v_quant_type="PER_CHANNEL",
        kv_cache_bit_width=8,
    )
    outputs = [
        helper.make_tensor_value_info(name, kind, None)
        for name, kind in (("out", TensorProto.FLOAT), ("present", TensorProto.INT8), ("present_v", TensorProto.INT8))
    ]
    graph = helper.make_graph([node], "probe", io, outputs, [scale, lens, total])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS_DOMAIN, 1)])
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        cache = np.zeros((1, heads, 4, dim), np.int8)
        session.run(None, {"q": np.ones((1, 1, 3 * heads * dim), np.float32), "past": cache, "past_v": cache})
    except Exception as exc:  # noqa: BLE001 - ORT's own exception types
        return f"onnxruntime {ort.__version__}: {str(exc).splitlines()[0][:200]}"
    return ""


def check_int8_kv_support() -> None:
    """OptionError naming the fix when the installed ONNX Runtime lacks the int8-cache kernel."""
    from qwen_export.errors import OptionError

    why = int8_kv_unavailable()
    if why:
        raise OptionError(
            "--kv-cache int8 needs ONNX Runtime's CPU GroupQueryAttention with a quantized cache "
            f"(k_scale/v_scale, kv_cache_bit_width), which this installation lacks ({why}); upgrade "
            "onnxruntime or export without --kv-cache"
        )


class Int8KVCache(GraphPass):
    """Every layer's GroupQueryAttention keeps an int8 cache with the given static scales; the
    ``past_key_values.*`` inputs and ``present.*`` outputs become int8. Runs after
    :class:`~qwen_export.targets.onnxruntime.kv_io.SharedKVBuffer`.

    ``scales``: per layer ``(k_scale, v_scale)`` from :func:`qwen_export.quant.kv_cache.kv_scales`.
    """

    name = "int8_kv_cache"
    requires_ops = ("com.microsoft::GroupQueryAttention",)

    def __init__(self, scales: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
        self.scales = list(scales)
        self.strict = True

    def rewrite(self, model: ir.Model) -> dict[str, int]:
        outputs = {v.name: v for v in model.graph.outputs}
        for i, (k_scale, v_scale) in enumerate(self.scales):
            present = outputs.get(f"present.{i}.key")
            node = present.producer() if present is not None else None
            if node is None or node.op_type != "GroupQueryAttention" or node.domain != MS_DOMAIN:
                raise FusionError(
                    f"--kv-cache int8: present.{i}.key is not a GroupQueryAttention output (attention left "
                    "unfused); export with --strict, or without --kv-cache int8"
                )
            if len(node.inputs) < 14:
                node.resize_inputs(14)
            node.replace_input_with(12, _initializer(model.graph, f"kv_quant.{i}.k_scale", k_scale))
            node.replace_input_with(13, _initializer(model.graph, f"kv_quant.{i}.v_scale", v_scale))
            for key, value in (("k_quant_type", "PER_CHANNEL"), ("v_quant_type", "PER_CHANNEL")):
                node.attributes[key] = ir.AttrString(key, value)
            node.attributes["kv_cache_bit_width"] = ir.AttrInt64("kv_cache_bit_width", 8)
            for slot in (3, 4):
                past = node.inputs[slot]
                assert past is not None  # SharedKVBuffer checked every layer's past
                past.type = ir.TensorType(ir.DataType.INT8)
            for out in node.outputs[1:3]:
                out.type = ir.TensorType(ir.DataType.INT8)
        return {RULE: len(self.scales)}

    def modified(self, before: Counter[str], after: Counter[str]) -> bool:
        return bool(self.scales)  # the IO types, attributes and scale inputs changed, not the ops


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    array = np.ascontiguousarray(array, np.float32)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT))
    value.const_value = ir.tensor(array, name=name)
    graph.register_initializer(value)
    return value
