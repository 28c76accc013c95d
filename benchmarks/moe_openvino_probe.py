"""Probe: does OpenVINO's CPU plugin fuse a vectorized MoE block into its ``MOE`` op?

Builds, with the openvino opsets, the "vectorized" expert form that OpenVINO's
``FuseVectorizedMOE3GEMM`` matches (Reshape -> Tile [E, T, H] -> gate/up MatMuls with stacked
[E, I, H] weights (transpose_b) -> Swish * up -> down MatMul -> Reshape, times the routing weights
scattered to [E, B, S, 1] by ScatterElementsUpdate of the top-k, ReduceSum over experts), compiles
it for the CPU and prints the compiled model's layer types. On OpenVINO 2026.4 the CPU runtime
model has no ``MOE`` layer: the fusion belongs to the GPU plugin (gated on systolic-array support),
and the CPU would run the form densely (every expert on every token). qwen-export's OpenVINO
artifacts therefore keep the sparse per-expert form (tests/test_openvino.py checks it compiles as
such).

``python benchmarks/moe_openvino_probe.py``
"""

from __future__ import annotations

import collections

import numpy as np
import openvino as ov
import openvino.opset12 as op12
import openvino.opset13 as op

E, K, H, INTER = 8, 2, 64, 32


def i64(values: list[int] | int) -> ov.Node:
    return op.constant(np.array(values, np.int64))


def vectorized_moe() -> ov.Model:
    rng = np.random.default_rng(0)

    def weight(*shape: int) -> ov.Node:
        return op.constant(rng.standard_normal(shape).astype(np.float32))

    x = op.parameter([-1, -1, H], np.float32, name="x")
    flat = op.reshape(x, i64([-1, H]), False)
    probs = op.softmax(op.matmul(flat, weight(H, E), False, False), 1)
    topk = op.topk(probs, i64(K), 1, "max", "value", "i64")
    weights = op.divide(topk.output(0), op.reduce_sum(topk.output(0), i64([1]), True))
    routing = op12.scatter_elements_update(
        op.broadcast(op.constant(np.float32(0)), op.shape_of(probs)), topk.output(1), weights, i64(1)
    )
    batch_seq = op.gather(op.shape_of(x), i64([0, 1]), i64(0))
    routing = op.unsqueeze(
        op.reshape(op.transpose(routing, i64([1, 0])), op.concat([i64([E]), batch_seq], 0), False), i64([-1])
    )
    tiled = op.reshape(op.tile(flat, i64([E, 1])), i64([E, -1, H]), False)
    gate = op.swish(op.matmul(tiled, weight(E, INTER, H), False, True))
    up = op.matmul(tiled, weight(E, INTER, H), False, True)
    down = op.matmul(op.multiply(gate, up), weight(E, H, INTER), False, True)
    down = op.reshape(down, op.concat([i64([E]), batch_seq, i64([H])], 0), False)
    return ov.Model([op.reduce_sum(op.multiply(down, routing), i64([0]), False)], [x])


def main() -> None:
    compiled = ov.Core().compile_model(vectorized_moe(), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    kinds = collections.Counter(
        n.get_rt_info()["layerType"].astype(str) for n in compiled.get_runtime_model().get_ops()
    )
    print(f"openvino {ov.get_version()}")
    print(f"MOE layer in the compiled CPU model: {'MOE' in kinds}")
    print(dict(kinds))


if __name__ == "__main__":
    main()
