"""Probe: does ONNX Runtime's CPU ``com.microsoft.QMoE`` compute Qwen's MoE block?

Builds one QMoE node (8 experts, top-2, hidden 64, expert intermediate 32) with blocked (32) asymmetric
int4 or int8 weights in the MatMulNBits layout ([E, N, K*bits/8] codes, [E, N, K/32] scales, packed
zero points), interleaved SwiGLU (``swiglu_fusion=1``: the CPU kernel's only SwiGLU form) with
alpha 1 and beta 0 (= ``silu(gate) * up``), and compares it with Qwen's block in numpy on the
dequantized weights: softmax over the router logits, top-k, renormalised when ``norm_topk_prob``.

``python benchmarks/moe_ort_qmoe_probe.py`` prints the max |QMoE - reference| per case.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

E, K, H, INTER, T, BLOCK = 8, 2, 64, 32, 5, 32


def quantize(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric blocked codes, scales, zero points (packed as MatMulNBits packs them), dequantized."""
    n, k = w.shape
    blocks, qmax = k // BLOCK, 2**bits - 1
    wb = w.reshape(n, blocks, BLOCK)
    lo, hi = np.minimum(wb.min(-1), 0), np.maximum(wb.max(-1), 0)
    scale = (hi - lo) / qmax
    scale[scale == 0] = 1
    zp = np.clip(np.round(-lo / scale), 0, qmax)
    q = np.clip(np.round(wb / scale[..., None] + zp[..., None]), 0, qmax).astype(np.uint8)
    deq = ((q - zp[..., None]) * scale[..., None]).reshape(n, k).astype(np.float32)
    codes, zq = q.reshape(n, k), zp.astype(np.uint8)
    if bits == 4:
        codes = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
        zq = np.pad(zq, ((0, 0), (0, blocks % 2)))
        zq = (zq[:, 0::2] | (zq[:, 1::2] << 4)).astype(np.uint8)
    return codes, scale.astype(np.float32), zq, deq


def probe(bits: int, norm: bool, rng: np.random.Generator) -> float:
    w_gate = rng.standard_normal((E, INTER, H)).astype(np.float32) / 8
    w_up = rng.standard_normal((E, INTER, H)).astype(np.float32) / 8
    w_down = rng.standard_normal((E, H, INTER)).astype(np.float32) / 6
    fc1 = np.empty((E, 2 * INTER, H), np.float32)
    fc1[:, 0::2], fc1[:, 1::2] = w_gate, w_up  # interleaved gate/up rows
    parts = {name: [quantize(w[e], bits) for e in range(E)] for name, w in (("fc1", fc1), ("fc2", w_down))}
    inits = [
        onnx.numpy_helper.from_array(np.stack([p[i] for p in ps]), f"{name}_{suffix}")
        for name, ps in parts.items()
        for i, suffix in enumerate(("weights", "scales", "zp"))
    ]
    inputs = ["x", "logits", "fc1_weights", "fc1_scales", "", "fc2_weights", "fc2_scales", "", "", "", ""]
    node = helper.make_node(
        "QMoE",
        [*inputs, "fc1_zp", "fc2_zp"],
        ["y"],
        domain="com.microsoft",
        k=K,
        expert_weight_bits=bits,
        block_size=BLOCK,
        activation_type="swiglu",
        swiglu_fusion=1,
        activation_alpha=1.0,
        activation_beta=0.0,
        normalize_routing_weights=int(norm),
    )
    graph = helper.make_graph(
        [node],
        "qmoe",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [T, H]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [T, E]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [T, H])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((T, H)).astype(np.float32)
    logits = rng.standard_normal((T, E)).astype(np.float32) * 2
    got = session.run(None, {"x": x, "logits": logits})[0]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    chosen = np.argsort(-p, -1, kind="stable")[:, :K]
    weights = np.take_along_axis(p, chosen, -1)
    if norm:
        weights = weights / weights.sum(-1, keepdims=True)
    deq = {name: np.stack([p[3] for p in ps]) for name, ps in parts.items()}
    ref = np.zeros_like(x)
    for t in range(T):
        for j, e in enumerate(chosen[t]):
            gate_up = deq["fc1"][e] @ x[t]
            gate, up = gate_up[0::2], gate_up[1::2]
            ref[t] += weights[t, j] * (deq["fc2"][e] @ (gate / (1 + np.exp(-gate)) * up))
    return float(np.abs(got - ref).max())


def main() -> None:
    print(f"onnxruntime {ort.__version__}")
    for bits in (4, 8):
        for norm in (True, False):
            err = probe(bits, norm, np.random.default_rng(0))
            print(f"int{bits} norm_topk_prob={norm}: max |QMoE - Qwen block| = {err:.2e}")


if __name__ == "__main__":
    main()
