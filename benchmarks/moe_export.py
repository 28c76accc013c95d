"""Export memory and decode speed of a few-layer slice of the real Qwen3-30B-A3B shape (MoE).

Writes a random-weight bf16 checkpoint with Qwen3-30B-A3B's exact per-layer shape (128 experts,
top-8, norm_topk_prob, hidden 2048, moe_intermediate 768, 32/4 heads, head_dim 128, vocab 151936,
untied) but only ``--layers`` layers (each count in its own checkpoint), streamed to disk one tensor
at a time by this script. For each count it then:

1. runs ``qwen-export export CKPT -o OUT --weights int4`` (RTN, the MoE default) through the
   harness launcher: wall time and peak RSS (``getrusage`` of the export process), beside the
   largest single tensor (fp32) and the checkpoint size: the peak should not grow with layers;
2. opens the artifact with our ONNX Runtime engine (one ``QMoE`` node per layer) and times 32
   greedy decode steps after a 16-token prompt (tokens/s, median of the per-step times as well);
   with ``--unfused`` the smallest slice is also exported ``--no-fuse`` (the traced standard-op
   form: every expert as its own NonZero/Gather/MatMulNBits/ScatterND group) and timed the same way.

``python benchmarks/moe_export.py --layers 2 4 --json-out /tmp/qe-moe/report.json``
(options: ``--workdir DIR`` (default /tmp/qe-moe), ``--weights int4|int8|fp32``, ``--keep``:
keep the checkpoints and artifacts). The 4-layer checkpoint is 6.3 GB on disk (bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any

import harness
import numpy as np

SHAPE = dict(
    vocab=151936, hidden=2048, heads=32, kv_heads=4, head_dim=128, experts=128, top_k=8, moe_inter=768, inter=6144
)


def config(layers: int) -> dict[str, Any]:
    s = SHAPE
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": s["vocab"],
        "hidden_size": s["hidden"],
        "intermediate_size": s["inter"],
        "moe_intermediate_size": s["moe_inter"],
        "num_hidden_layers": layers,
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"],
        "head_dim": s["head_dim"],
        "num_experts": s["experts"],
        "num_experts_per_tok": s["top_k"],
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "max_position_embeddings": 40960,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    }


def tensor_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    s = SHAPE
    h, q, kv, d = s["hidden"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"], s["head_dim"]
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (s["vocab"], h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
        out |= {p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h)}
        out |= {p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q)}
        out |= {p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)}
        out[p + "mlp.gate.weight"] = (s["experts"], h)
        for e in range(s["experts"]):
            for proj, shape in (
                ("gate", (s["moe_inter"], h)),
                ("up", (s["moe_inter"], h)),
                ("down", (h, s["moe_inter"])),
            ):
                out[f"{p}mlp.experts.{e}.{proj}_proj.weight"] = shape
    out |= {"model.norm.weight": (h,), "lm_head.weight": (s["vocab"], h)}
    return out


def write_checkpoint(directory: Path, layers: int, seed: int = 0) -> int:
    """A bf16 model.safetensors streamed tensor by tensor (rows in chunks); returns its size."""
    from qwen_export.export.tiny import TOKENIZER_FILES, default_tokenizer_dir

    directory.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes(layers)
    header: dict[str, Any] = {}
    offset = 0
    for name, shape in shapes.items():
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    rng = np.random.default_rng(seed)
    with open(directory / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape in shapes.items():
            if len(shape) == 1:
                values = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
                f.write((values.view(np.uint32) >> 16).astype("<u2").tobytes())
                continue
            scale = (0.5 if "embed" in name or "lm_head" in name else 1.0 / np.sqrt(shape[1])) / 1.0
            for start in range(0, shape[0], 16384):  # bounded memory for the 151936-row tables
                rows = min(16384, shape[0] - start)
                values = (scale * rng.standard_normal((rows, shape[1]), dtype=np.float32)).astype(np.float32)
                f.write((values.view(np.uint32) >> 16).astype("<u2").tobytes())
    (directory / "config.json").write_text(json.dumps(config(layers), indent=1))
    src = default_tokenizer_dir()
    if src is not None:
        for name in TOKENIZER_FILES:
            shutil.copyfile(src / name, directory / name)
    return (directory / "model.safetensors").stat().st_size


def decode_speed(artifact: Path, steps: int = 32, prompt: int = 16) -> dict[str, Any]:
    from qwen_export.runtime.loader import RuntimeOptions, open_artifact

    engine = open_artifact(artifact, RuntimeOptions()).engine
    ids = np.random.default_rng(1).integers(0, 151000, prompt)[None].astype(np.int64)
    t0 = time.perf_counter()
    logits = engine.forward(ids)
    prefill = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        token = np.array([[int(np.argmax(logits[0, -1]))]], np.int64)
        t0 = time.perf_counter()
        logits = engine.forward(token)
        times.append(time.perf_counter() - t0)
    return {
        "prompt_tokens": prompt,
        "prefill_s": prefill,
        "decode_steps": steps,
        "decode_tokens_per_s": steps / sum(times),
        "decode_step_ms_median": 1000 * statistics.median(times),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--weights", default="int4", choices=["int4", "int8", "fp32"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qe-moe"))
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument(
        "--unfused",
        action="store_true",
        help="also export the smallest slice --no-fuse (the per-expert standard-op form)",
    )
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"shape": SHAPE, "weights": args.weights, "host": harness.host(), "runs": []}
    report["versions"] = harness.versions(["onnxruntime", "torch", "numpy"])
    largest = SHAPE["vocab"] * SHAPE["hidden"] * 4
    for layers in args.layers:
        ckpt, out = args.workdir / f"ckpt-{layers}", args.workdir / f"art-{layers}"
        t0 = time.perf_counter()
        size = write_checkpoint(ckpt, layers)
        harness.log(f"{layers} layers: checkpoint {size / 2**30:.2f} GiB written in {time.perf_counter() - t0:.0f} s")
        cmd = [harness.cli_path(), "export", str(ckpt), "-o", str(out), "--overwrite"]
        if args.weights != "fp32":
            cmd += ["--weights", args.weights]
        run = harness.run_logged(f"export-{layers}", cmd, args.workdir)
        if run["returncode"] != 0:
            print(run["stderr_tail"], file=sys.stderr)
            return 1
        peak = run["peak_rss_bytes"] or 0
        entry = {
            "layers": layers,
            "experts_per_layer": SHAPE["experts"],
            "checkpoint_bytes": size,
            "export_wall_s": run["wall_s"],
            "export_peak_rss_bytes": peak,
            "largest_tensor_fp32_bytes": largest,
            "peak_over_largest": peak / largest,
            "artifact_bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
        }
        entry |= decode_speed(out)
        if args.unfused and layers == min(args.layers):  # the traced standard-op form, for comparison
            cmd_unfused = cmd[:4] + [str(out) + "-unfused", *cmd[5:], "--no-fuse"]
            unfused = harness.run_logged(f"export-{layers}-unfused", cmd_unfused, args.workdir)
            if unfused["returncode"] == 0:
                speed = decode_speed(Path(str(out) + "-unfused"))
                entry["unfused"] = {
                    "export_wall_s": unfused["wall_s"],
                    "export_peak_rss_bytes": unfused["peak_rss_bytes"],
                }
                entry["unfused"] |= speed
            shutil.rmtree(str(out) + "-unfused", ignore_errors=True)
        harness.log(json.dumps(entry))
        report["runs"].append(entry)
        if not args.keep:
            shutil.rmtree(ckpt, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
    report["loadavg_end"] = harness.loadavg()
    if args.json_out:
        harness.write_json(args.json_out, report)
    print(json.dumps(report["runs"], indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
