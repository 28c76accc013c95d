"""Qwen2.5-VL at the real Qwen2.5-VL-3B shape (random weights written by this script): export time
and peak RSS, image-encode time for a 448x448 and a 1024x768 image, TTFT and decode tokens/s of a
chat turn with the image; beside openvino-genai's ``VLMPipeline`` on optimum-intel's export of the
same checkpoint when ``--anchor-ir DIR`` is given (optimum-intel 2.2 exports Qwen2.5-VL only with
transformers <= 5.0: make that IR in a venv of its own, see benchmarks/README.md).

    .venv/bin/python benchmarks/vl_bench.py --workdir W [--weights int4] [--algorithm rtn]
        [--target onnxruntime|openvino] [--vision-weights fp32|int8] [--prefill none|int8]
        [--layers 36] [--new-tokens 32] [--repeats 2]
        [--anchor-ir DIR] [--json-out F]

Every step runs in its own process (its peak RSS is its own): the checkpoint is made once
(``W/ckpt``, bf16, about 7.5 GB at 36 layers), our artifact is exported once (``W/ours-<weights>``),
each engine runs in a worker. Images are deterministic gradients with shapes (no download).
Rounds: one warm-up, then ``--repeats`` measured chat turns per image size, each on a fresh
conversation (``LLM.reset()``: nothing reused from the cache, the image encoded again, so TTFT
includes the encode); figures are medians with the range.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import harness

SIZES = ((448, 448), (1024, 768))
PROMPT = "Describe this image in detail."


def image(width: int, height: int) -> Any:
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), ((x // 32 + y // 32) % 2) * 180], -1)
    rgb[(x - width // 3) ** 2 + (y - height // 2) ** 2 < (min(width, height) // 5) ** 2] = (230, 50, 40)
    return Image.fromarray(rgb.astype(np.uint8))


def make_checkpoint(out: Path, layers: int) -> None:
    from qwen_export.export.tiny_vl import QWEN25_VL_3B_SHAPE, make_vl_checkpoint

    make_vl_checkpoint(out, **{**QWEN25_VL_3B_SHAPE, "layers": layers}, seed=0)


# ----------------------------------------------------------------------------- workers
def ours_worker(artifact: Path, new_tokens: int, repeats: int) -> dict[str, Any]:
    """Our runtime: per image size, the encode time of the vision session alone, then chat turns."""
    import qwen_export
    from qwen_export.runtime.vision_input import encoder_feeds

    t0 = time.perf_counter()
    llm = qwen_export.load(artifact)
    out: dict[str, Any] = {"load_s": time.perf_counter() - t0, "sizes": {}}
    mm = llm.multimodal
    for width, height in SIZES:
        picture = image(width, height)
        patches = mm.prepare_images([picture])[0]
        feeds, _ = encoder_feeds(patches, mm.spec.vision)
        encode, turns = [], []
        for _ in range(1 + repeats):
            t = time.perf_counter()
            llm.engine.encode_image(feeds)
            encode.append(time.perf_counter() - t)
            llm.reset()
            messages = [
                {"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": PROMPT}]}
            ]
            result = llm.chat(messages, max_tokens=new_tokens, temperature=0)  # random weights: eos is unlikely
            timings = result.timings
            decode = (result.completion_tokens - 1) / timings.decode_s if timings.decode_s > 0 else float("nan")
            turns.append((result.prompt_tokens, timings.time_to_first_token_s, decode))
            completion = result.completion_tokens
        out["sizes"][f"{width}x{height}"] = {
            "grid": list(patches.grid_thw),
            "image_tokens": patches.num_tokens(mm.spec.vision.spatial_merge_size),
            "prompt_tokens": turns[-1][0],
            "new_tokens": completion,
            "encode_s": encode[1:],
            "ttft_s": [t[1] for t in turns[1:]],
            "decode_tok_s": [t[2] for t in turns[1:]],
        }
    out["peak_rss_mib"] = harness.peak_rss_mib()
    return out


def anchor_worker(ir: Path, new_tokens: int, repeats: int) -> dict[str, Any]:
    """openvino-genai's VLMPipeline on optimum-intel's IR (CPU, its defaults)."""
    import numpy as np
    import openvino as ov
    import openvino_genai

    t0 = time.perf_counter()
    pipe = openvino_genai.VLMPipeline(str(ir), "CPU")
    out: dict[str, Any] = {"load_s": time.perf_counter() - t0, "sizes": {}}
    config = openvino_genai.GenerationConfig()
    config.max_new_tokens, config.min_new_tokens = new_tokens, new_tokens
    for width, height in SIZES:
        tensor = ov.Tensor(np.asarray(image(width, height))[None])
        ttft, decode = [], []
        for _ in range(1 + repeats):
            result = pipe.generate(PROMPT, images=[tensor], generation_config=config)
            metrics = result.perf_metrics
            ttft.append(metrics.get_ttft().mean / 1e3)
            decode.append(metrics.get_throughput().mean)
        out["sizes"][f"{width}x{height}"] = {"ttft_s": ttft[1:], "decode_tok_s": decode[1:]}
    out["peak_rss_mib"] = harness.peak_rss_mib()
    return out


def run_worker(kind: str, path: Path, args: Any) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", kind, str(path), "--new-tokens", str(args.new_tokens),
           "--repeats", str(args.repeats)]  # fmt: skip
    harness.log(f"{kind}: {path}")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main
def export(args: Any, ckpt: Path) -> tuple[Path, dict[str, Any]]:
    tower = "-v8" if args.vision_weights == "int8" else ""
    prefill = "-pf8" if args.prefill == "int8" else ""
    target = "" if args.target == "onnxruntime" else f"-{args.target}"
    out = args.workdir / f"ours{target}-{args.weights}{'-' + args.algorithm if args.algorithm else ''}{tower}{prefill}"
    if (out / "manifest.json").is_file():
        harness.log(f"reusing {out}")
        return out, {"reused": True}
    cmd = [harness.cli_path(), "export", str(ckpt), "-o", str(out), "--weights", args.weights]
    cmd += ["--algorithm", args.algorithm] if args.algorithm else []
    cmd += ["--vision-weights", args.vision_weights, "--target", args.target]
    cmd += ["--prefill", args.prefill] if args.target == "onnxruntime" else []
    result = harness.run_logged("export", cmd, args.workdir)
    if result["returncode"] != 0:
        sys.exit(f"export failed: {result['stderr_tail'][-500:]}")
    return out, {"wall_s": result["wall_s"], "peak_rss_mib": (result["peak_rss_bytes"] or 0) / harness.MiB}


def table(report: dict[str, Any]) -> str:
    def fig(values: list[float], fmt: str) -> str:
        return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})" if values else "-"

    lines = [
        "| engine | image | image tokens | encode s | TTFT s | decode tok/s | peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, rows in (("ours", report.get("ours") or {}), ("openvino-genai VLMPipeline", report.get("anchor") or {})):
        for size, row in (rows.get("sizes") or {}).items():
            lines.append(
                f"| {name} | {size} | {row.get('image_tokens', '-')} | {fig(row.get('encode_s', []), '.2f')} | "
                f"{fig(row['ttft_s'], '.2f')} | {fig(row['decode_tok_s'], '.2f')} | {rows.get('peak_rss_mib', 0):.0f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    p.add_argument("--make-checkpoint", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/qe-vl-bench"))
    p.add_argument("--weights", default="int4")
    p.add_argument("--algorithm", default=None, help="export --algorithm (default: the weights' default)")
    p.add_argument("--vision-weights", default="fp32", help="export --vision-weights: fp32 (default) | int8")
    p.add_argument("--prefill", default="none", help="export --prefill: none (default) | int8 (an int8 prompt graph)")
    p.add_argument("--target", default="onnxruntime", help="export --target: onnxruntime (default) | openvino")
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--anchor-ir", type=Path, default=None)
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.worker:
        kind, path = args.worker
        fn = ours_worker if kind == "ours" else anchor_worker
        print(json.dumps(fn(Path(path), args.new_tokens, args.repeats)))
        return 0
    if args.make_checkpoint:
        make_checkpoint(args.make_checkpoint, args.layers)
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt = args.workdir / "ckpt"
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": harness.machine(),
                              "loadavg_start": harness.loadavg(), "layers": args.layers}  # fmt: skip
    if not (ckpt / "config.json").is_file():
        made = harness.run_logged("checkpoint", [sys.executable, __file__, "--make-checkpoint", str(ckpt),
                                                 "--layers", str(args.layers)], args.workdir)  # fmt: skip
        if made["returncode"] != 0:
            sys.exit(f"checkpoint failed: {made['stderr_tail'][-500:]}")
    artifact, report["export"] = export(args, ckpt)
    report["ours"] = run_worker("ours", artifact, args)
    if args.anchor_ir is not None:
        report["anchor"] = run_worker("anchor", args.anchor_ir, args)
    report["loadavg_end"] = harness.loadavg()
    report["markdown"] = table(report)
    print(report["markdown"])
    print(json.dumps({k: v for k, v in report.items() if k != "markdown"}, indent=1))
    if args.json_out:
        harness.write_json(args.json_out, report)
    return 0 if "error" not in report["ours"] and "error" not in (report.get("anchor") or {}) else 1


if __name__ == "__main__":
    sys.exit(main())
