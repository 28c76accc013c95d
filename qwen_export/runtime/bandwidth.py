"""How close decode runs to the machine's memory bandwidth.

Decoding one token reads every weight of the model once (batch 1: the matrix-vector products are
bound by memory, not compute), so ``weight bytes per token x decode tokens/s`` is the bandwidth the
engine achieves. :func:`copy_bandwidth` measures what the machine can move (a multi-threaded
``memcpy`` of buffers much larger than the caches, counted as bytes read + bytes written, the way
STREAM's *copy* counts, and a multi-threaded read of the same buffer, which is what a decode step
does with its weights), and :func:`decode_bandwidth` puts them side by side.

Weight bytes per token (:func:`decode_weight_bytes`) are the artifact's weight files as loaded
(float16- or log8-stored scales counted at float32, :func:`compact_scale_bytes`; on x86, the float32 sum
ONNX Runtime's int8-activation kernels keep per block of an accuracy-level-4 ``MatMulNBits``,
:func:`prepacked_sum_bytes`), less the embedding table
when only one row of it is read per token (a table that is not also the lm_head). An ONNX Runtime
artifact's int8 prompt graph (``export --prefill int8``: ``prefill.onnx`` + ``prefill.onnx.data``)
is not read by decode steps and is not counted. The KV cache read per token is added separately (it
grows with the context).
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from qwen_export.artifact import Manifest

#: Suffixes of the files that hold an artifact's weights (ONNX, its external data, OpenVINO IR
#: weights, a TensorRT plan).
WEIGHT_SUFFIXES = (".onnx", ".data", ".bin", ".plan", ".engine")
#: Default buffer size of :func:`copy_bandwidth` (well above any last-level cache here).
COPY_BYTES = 256 * 2**20


@dataclasses.dataclass(frozen=True)
class CopyBandwidth:
    """The machine's copy bandwidth: bytes read + written per second, best and median of the repeats;
    ``read_gbs``: the best rate of reading alone (a sum over the buffer), what a decode step does
    with its weights (0.0: not measured)."""

    best_gbs: float
    median_gbs: float
    threads: int
    buffer_mib: int
    read_gbs: float = 0.0


@dataclasses.dataclass(frozen=True)
class DecodeBandwidth:
    """One decode measurement against the copy bandwidth."""

    weight_bytes_per_token: int
    kv_bytes_per_token_read: int  # KV cache read by one step at that context
    achieved_gbs: float  # (weight + KV bytes per token) x decode tokens/s
    copy_gbs: float
    fraction_of_copy: float  # achieved / copy (best)
    fraction_of_read: float = 0.0  # achieved / read (best): 1.0 is the machine's limit (0.0: not measured)


def copy_bandwidth(threads: int = 1, nbytes: int = COPY_BYTES, repeats: int = 3) -> CopyBandwidth:
    """Copy ``nbytes`` between two buffers ``repeats`` times with ``threads`` threads (each its own
    slice; numpy releases the GIL while copying); GB/s = 2 x nbytes / seconds (read + write)."""
    if threads < 1 or nbytes < 2**20 or repeats < 1:
        raise ValueError(f"need threads >= 1, nbytes >= 1 MiB, repeats >= 1; got {threads}, {nbytes}, {repeats}")
    src = np.ones(nbytes // 8, np.float64)
    dst = np.zeros_like(src)
    bounds = np.linspace(0, src.size, threads + 1).astype(int)
    slices = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def part(s: slice) -> None:
        np.copyto(dst[s], src[s])

    def read(s: slice) -> None:
        src[s].sum()

    rates, reads = [], []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(part, slices))  # touch every page once before timing
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(part, slices))
            rates.append(2 * src.nbytes / (time.perf_counter() - start) / 1e9)
            start = time.perf_counter()
            list(pool.map(read, slices))
            reads.append(src.nbytes / (time.perf_counter() - start) / 1e9)
    return CopyBandwidth(float(max(rates)), float(np.median(rates)), threads, nbytes // 2**20, float(max(reads)))


#: Weight files that only prompts read (ONNX Runtime's int8 prefill graph), not decode steps.
PROMPT_ONLY_FILES = ("prefill.onnx", "prefill.onnx.data")


def weight_files_bytes(root: str | Path, manifest: Manifest) -> int:
    """Bytes of the artifact's weight files a decode step can read (the manifest's files with a
    weight suffix, less :data:`PROMPT_ONLY_FILES`)."""
    names = [name for name in manifest.files if name.endswith(WEIGHT_SUFFIXES) and name not in PROMPT_ONLY_FILES]
    return sum((Path(root) / name).stat().st_size for name in names)


def gathered_embedding_bytes(manifest: Manifest) -> int:
    """Bytes of an embedding table read one row per token: 0 when the table is also the lm_head
    (tied and shared: every row is read by the head). Codes at the manifest's embedding bits (the
    graph dtype when not quantized) plus one float32 scale per block and, asymmetric, one zero point."""
    spec = manifest.spec
    quant: dict[str, Any] = manifest.extra.get("quantization") or {}
    vocab, hidden = int(spec["vocab_size"]), int(spec["hidden_size"])
    if spec.get("tie_word_embeddings"):
        return 0
    bits = quant.get("embedding_bits")
    if not bits:
        return vocab * hidden * (2 if manifest.dtype in ("fp16", "bf16") else 4)
    block = int(quant.get("block_size") or hidden)
    blocks = vocab * -(-hidden // block)
    zero = 0 if quant.get("symmetric", True) else blocks * int(bits) // 8
    return vocab * hidden * int(bits) // 8 + 4 * blocks + zero


def compact_scale_bytes(manifest: Manifest) -> int:
    """Bytes the engine adds to the files when it loads them: ONNX Runtime artifacts store large
    quantization scales as float16 (the ``matmulnbits`` pass record's ``compact_scale_values``) or
    as ``log8`` bytes (``log8_scale_values``) and compute float32 ones once, at session creation."""
    added = {"compact_scale_values": 2, "log8_scale_values": 3}
    count = 0
    for record in manifest.passes:
        fired = record.get("fired") if isinstance(record, dict) else None
        for key, extra in added.items():
            value = fired.get(key) if isinstance(fired, dict) else None
            count += extra * value if isinstance(value, int) and value > 0 else 0
    return count


def prepacked_sum_bytes(root: str | Path, manifest: Manifest, machine: str | None = None) -> int:
    """Bytes ONNX Runtime adds when it prepacks an artifact's ``MatMulNBits`` weights for its
    int8-activation kernels (accuracy level 4, x86): a float32 sum per block beside the codes and
    scales (MLAS's ``QuantBBlkSum``), read with them by every step. 0 for other targets, other
    machines, or a graph that cannot be read (its ops are then not known)."""
    import platform

    machine = (machine or platform.machine()).lower()
    if manifest.target != "onnxruntime" or machine not in ("x86_64", "amd64", "i686", "x86"):
        return 0
    try:
        import onnx

        graph = onnx.load(Path(root) / "model.onnx", load_external_data=False).graph
    except Exception:  # noqa: BLE001 - not a readable graph: nothing known to add
        return 0
    total = 0
    for node in graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: a.i for a in node.attribute}
        if attrs.get("accuracy_level") == 4 and attrs.get("block_size", 0) > 0:
            total += 4 * attrs.get("N", 0) * -(-attrs.get("K", 0) // attrs["block_size"])
    return total


def decode_weight_bytes(root: str | Path, manifest: Manifest) -> int:
    """Weight bytes one decode step reads (see the module docstring)."""
    loaded = weight_files_bytes(root, manifest) + compact_scale_bytes(manifest) + prepacked_sum_bytes(root, manifest)
    return max(0, loaded - gathered_embedding_bytes(manifest))


def decode_bandwidth(
    weight_bytes: int, kv_bytes_per_token: int, context: int, tokens_per_s: float, copy: CopyBandwidth
) -> DecodeBandwidth:
    """Achieved bandwidth of a decode at ``tokens_per_s`` whose steps see ``context`` cached tokens."""
    kv_read = kv_bytes_per_token * context
    achieved = (weight_bytes + kv_read) * tokens_per_s / 1e9
    of_read = achieved / copy.read_gbs if copy.read_gbs > 0 else 0.0
    return DecodeBandwidth(weight_bytes, kv_read, achieved, copy.best_gbs, achieved / copy.best_gbs, of_read)
