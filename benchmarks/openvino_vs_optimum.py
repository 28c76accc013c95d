"""Our OpenVINO target vs our ONNX Runtime target vs optimum-intel's export run in openvino-genai.

One run on one checkpoint, CPU, ``--threads`` (2) threads per engine:

1. artifacts (each reused when its directory already holds one, unless ``--force``):

   * ours, for each ``--weights`` (int4, int8): ``qwen-export export CKPT -o W/ov-<w> --target
     openvino --weights <w>`` and ``qwen-export export CKPT -o W/ort-<w> --weights <w>`` (the CLI's
     defaults: RTN, symmetric, block 32, int8 embedding, last-position logits);
   * a variant of ours: ``--export-args "ARGS" --tag T`` appends the (shlex-split) ARGS to both
     export commands and writes ``W/ov-<w>-T`` and ``W/ort-<w>-T`` instead (engine labels
     ``ours-ov@T``, ``ours-ort@T``, ``genai-ours@T``); the ARGS are recorded next to each artifact
     (``W/ov-<w>-T.export-args.json``) and a reused artifact made with other ARGS is an error;
     ``--baseline`` also measures the default ``W/ov-<w>`` as engine ``ours-ov`` in the same run
     (accuracy and speed), so variant, default and optimum are side by side;
   * the anchor: ``--anchors DIR/<prefix>-<w>``, made by ``optimum-cli export openvino --model CKPT
     --task text-generation-with-past --weight-format <w> OUT`` in optimum-intel's own virtual
     environment (see benchmarks/README.md); a missing anchor is reported, never silently skipped;

2. accuracy (``--reference-logits REF.npy --text-ids IDS.npy``, as written by quant_real.py: our
   fp32 artifact's every-position logits on a fixed text): each OpenVINO IR, ours and the anchor,
   is teacher-forced through the same raw OpenVINO code (a compiled stateful model fed
   ``input_ids``/``attention_mask``/``position_ids``/``beam_idx``; f32 inference, f32 KV cache, so
   the figure is the weights' accuracy), one token at a time for a last-position-logits IR; mean
   KL(ref || model), top-1 agreement and perplexity (``accuracy.compare``);

3. speed: every engine in its own worker process (``sessions.py``), generations interleaved (A, B, C, A, B, C, ...)
   on the same random prompts, ``--warmup`` + ``--repeats`` rounds per prompt length:

   * ``ours-ov``: our OpenVINOEngine (``open_artifact``) with ``attention=stateful`` (the IR as
     saved), greedy loop in Python; KV cache f32 (ours' default) unless ``--kv-cache``;
   * ``ours-paged``: the same artifact on our engine with ``attention=paged`` (PagedAttention over
     the engine's block cache, the model openvino-genai runs; the engine's default since
     2026-11-29 for models without sliding-window layers), same loop and KV-cache precision;
   * ``ours-ort``: our OnnxRuntimeEngine on the ONNX Runtime artifact of the same weights;
   * ``genai-ours`` and ``genai-optimum``: ``openvino_genai.LLMPipeline(IR, "CPU",
     INFERENCE_NUM_THREADS=T)`` with its defaults (u8 KV cache on x86), ``min_new_tokens =
     max_new_tokens`` so every run emits exactly ``--new-tokens``; TTFT and time per output token
     from its ``perf_metrics``.

   ``--prefill-repeats N`` adds N prefill-only rounds (one new token) per prompt length, the same
   rotation: a prefill is one multi-second shot that a slow spell of the shared machine can hit
   for one engine only, so more of them are needed than generations give. TTFT is the median over
   every timed prefill; the *paired* prefill ratio is the median over rounds of optimum's TTFT /
   the engine's TTFT in the same round (neighbours in time), printed with its range. "first TTFT"
   is each engine's first prefill after load (its one-time weight repacking included).

   TTFT is prefill + first token; prefill tok/s = prompt / TTFT; decode tok/s = 1 / median time
   per output token (ours: per step; genai: its TPOT per run, median over runs). ``--engines
   a,b`` keeps only those engines (a label, or its part before ``@``: ``ours-ov`` keeps
   ``ours-ov@T`` and the baseline ``ours-ov``); accuracy is measured for the kept OpenVINO IRs
   run by raw OpenVINO (``ours-ov*``, ``genai-optimum``); the ONNX Runtime artifact is exported only
   when ``ours-ort`` is kept (so ``--engines ours-ov --skip-speed`` exports just the IR).

4. prints one table per weight format (engine x mean KL, top-1, ppl, size MiB, load s, prefill and
   decode tok/s per prompt length) and the ratios of every engine to genai-optimum; targets for
   ours-ov: prefill >= 1.0x, decode >= 1.1x at equal or better mean KL. ``--json-out FILE`` writes
   everything (the export args and tag included).

    .venv/bin/python benchmarks/openvino_vs_optimum.py --checkpoint CKPT --anchors DIR --anchor-prefix ov-real
        [--workdir W] [--weights int4,int8] [--prompt-lengths 128,512] [--new-tokens 128]
        [--reference-logits REF.npy --text-ids IDS.npy] [--json-out FILE]
        [--export-args "--block-size 128 --asymmetric" --tag b128a [--baseline]] [--engines a,b]
        [--prefill-repeats N]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

import accuracy
import harness
import interleave
import sessions
from artifacts import build_ours, ir_bytes

TARGET_PREFILL = 1.0
TARGET_DECODE = 1.1
#: this script's worker kinds -> the sessions' kinds
SESSION_KINDS = {"engine": "ours", "engine-paged": "ours-paged", "genai": "ov-genai"}


def log(msg: str) -> None:
    harness.log(msg, file=sys.stderr)


# ----------------------------------------------------------------------------- one weight format
def build_all(args: Any, weights: str, export_args: list[str], keep: set[str]) -> dict[str, Any]:
    """Our artifacts for one weight format: the variant's (or default) IR, its ORT twin when ``ours-ort``
    is kept, and the default IR with --baseline."""
    suffix, at = (f"-{args.tag}", f"@{args.tag}") if args.tag else ("", "")
    workdir, ckpt = args.workdir, args.checkpoint
    builds = {
        f"ours-ov{at}": build_ours(
            ckpt, workdir / f"ov-{weights}{suffix}", "openvino", weights, workdir, args.force, export_args
        )
    }
    if not keep or f"ours-ort{at}" in keep or "ours-ort" in keep:  # only ours-ort runs the ORT artifact
        builds[f"ours-ort{at}"] = build_ours(
            ckpt, workdir / f"ort-{weights}{suffix}", "onnxruntime", weights, workdir, args.force, export_args
        )
    if args.baseline:  # the CLI defaults, kept (never --force'd) beside the variant
        builds["ours-ov"] = build_ours(ckpt, workdir / f"ov-{weights}", "openvino", weights, workdir, False)
    for label, b in builds.items():
        if b.get("error"):
            log(f"{label}: {b['error']}")
    return builds


def engine_paths(args: Any, weights: str, keep: set[str]) -> dict[str, Path]:
    """Engine label -> the artifact it runs (the anchor when present), filtered by --engines."""
    suffix, at = (f"-{args.tag}", f"@{args.tag}") if args.tag else ("", "")
    workdir = args.workdir
    anchor = args.anchors / f"{args.anchor_prefix}-{weights}"
    ours_ov = workdir / f"ov-{weights}{suffix}"
    paths = {
        f"ours-ov{at}": ours_ov,
        f"ours-paged{at}": ours_ov,
        f"ours-ort{at}": workdir / f"ort-{weights}{suffix}",
        f"genai-ours{at}": ours_ov,
    }
    if args.baseline:
        paths["ours-ov"] = workdir / f"ov-{weights}"
    if (anchor / "openvino_model.xml").is_file():
        paths["genai-optimum"] = anchor
    else:
        log(f"anchor {anchor} is missing: make it with optimum-cli (benchmarks/README.md); measuring ours only")
    if keep:
        paths = {label: path for label, path in paths.items() if label in keep or label.split("@")[0] in keep}
    return paths


def measure_speed(args: Any, paths: dict[str, Path], engines: dict[str, Any], lengths: list[int]) -> tuple[dict, bool]:
    """Every engine in a worker, generations interleaved; (speed per prompt length, failed)."""
    workers: list[harness.Worker] = []
    try:
        for label, path in paths.items():
            kind = "ov-genai" if label.startswith("genai") else "ours"
            kind = "ours-paged" if label.startswith("ours-paged") else kind
            w = sessions.start(label, kind, path, args.threads, args.workdir, kv_cache=args.kv_cache)
            engines[label]["load_s"] = w.ready["load_s"]
            workers.append(w)
        speed = interleave.measure_generations(
            workers, lengths, args.new_tokens, args.repeats, args.warmup, args.seed, args.prefill_repeats, args.gap_s
        )
        return speed, False
    except RuntimeError as exc:
        log(str(exc))
        return {}, True
    finally:
        for w in workers:
            if w.first_ttft_s is not None:
                engines[w.label]["first_ttft_ms"] = 1e3 * w.first_ttft_s
            w.close()


def speed_ratios(speed: dict[str, Any], at: str) -> dict[str, Any]:
    """Every engine / genai-optimum, per prompt length (and, as before, ours-ov's and genai-ours' at the top)."""
    ratios: dict[str, Any] = {}
    for n, per in speed.items():
        if "genai-optimum" not in per:
            continue
        base = per["genai-optimum"]
        each = {
            label: {
                "prefill": s["prefill_tokens_per_s"] / base["prefill_tokens_per_s"],
                "prefill_paired": interleave.paired_prefill(per, label, "genai-optimum"),
                "decode": s["decode_tokens_per_s"] / base["decode_tokens_per_s"],
            }
            for label, s in per.items()
            if label != "genai-optimum"
        }
        ratios[n] = {"engines": each}  # and, as before, ours-ov / genai-ours (the variant's, with --tag)
        if f"ours-ov{at}" in each:
            ratios[n].update(each[f"ours-ov{at}"])
        if f"genai-ours{at}" in each:
            ratios[n]["genai_prefill"] = each[f"genai-ours{at}"]["prefill"]
            ratios[n]["genai_decode"] = each[f"genai-ours{at}"]["decode"]
    return ratios


def run_weights(args: Any, weights: str, export_args: list[str], keep: set[str]) -> tuple[dict[str, Any] | None, bool]:
    """Build, evaluate and time one weight format; (its results, or None when a build failed; failed)."""
    builds = build_all(args, weights, export_args, keep)
    if any(b.get("returncode", 0) != 0 for b in builds.values()):
        return None, True
    paths = engine_paths(args, weights, keep)
    engines: dict[str, Any] = {
        label: {
            "path": str(path),
            "bytes": ir_bytes(path),
            "build": builds.get(label),
            "export_args": None if label == "genai-optimum" else (export_args if "@" in label else []),
        }
        for label, path in paths.items()
    }
    if args.reference_logits and args.text_ids:
        for label, path in paths.items():
            if label.startswith("ours-ov") or label == "genai-optimum":
                log(f"accuracy of {label} ({weights})")
                engines[label]["accuracy"] = accuracy.evaluate(
                    f"{label}-{weights}", "openvino", path, args.reference_logits, args.text_ids, args.workdir,
                    threads=args.threads,
                )  # fmt: skip
    speed, failed = ({}, False)
    if not args.skip_speed:
        lengths = [int(x) for x in args.prompt_lengths.split(",")]
        speed, failed = measure_speed(args, paths, engines, lengths)
    ratios = speed_ratios(speed, f"@{args.tag}" if args.tag else "")
    return {"engines": engines, "speed": speed, "ratios": ratios}, failed


# ----------------------------------------------------------------------------- report
def summary(report: dict[str, Any]) -> str:
    lines = [f"# OpenVINO vs ONNX Runtime vs optimum-intel/openvino-genai — {report['checkpoint']}",
             f"{report['machine']}; {report['threads']} threads; new tokens {report['new_tokens']}"]  # fmt: skip
    if report.get("tag"):
        lines.append(f"ours@{report['tag']}: qwen-export export ... {shlex.join(report['export_args'])}"
                     + ("; ours-ov: the CLI defaults" if report.get("baseline") else ""))  # fmt: skip
    else:
        lines.append("ours: the CLI defaults")
    lines.append("")
    for weights, block in report["results"].items():
        lines.append(f"## {weights}")
        lengths = list(block["speed"])
        head = (
            "| engine | mean KL | top-1 | ppl | size MiB | load s |"
            + "".join(f" prefill@{n} tok/s | decode@{n} tok/s |" for n in lengths)
            + " first TTFT ms |"
        )
        lines += [head, "|" + "---|" * (7 + 2 * len(lengths))]
        for label, info in block["engines"].items():
            acc = info.get("accuracy") or {}
            nan = float("nan")
            row = f"| {label} | {acc.get('mean_kl', nan):.4f} | {acc.get('top1', nan):.3f} |"
            row += f" {acc.get('ppl', nan):.3f} |"
            row += f" {info['bytes'] / 2**20:.0f} | {info.get('load_s', 0):.1f} |"
            for n in lengths:
                s = block["speed"][n].get(label, {})
                row += f" {s.get('prefill_tokens_per_s', nan):.1f} | {s.get('decode_tokens_per_s', nan):.2f} |"
            row += f" {info['first_ttft_ms']:.0f} |" if "first_ttft_ms" in info else " - |"
            lines.append(row)
        for n, r in block.get("ratios", {}).items():
            per = "; ".join(f"{label} prefill {x['prefill']:.2f}x (paired per round: median "
                            f"{x['prefill_paired']['median']:.2f}x, {x['prefill_paired']['min']:.2f}-"
                            f"{x['prefill_paired']['max']:.2f}x over {x['prefill_paired']['n']}), "
                            f"decode {x['decode']:.2f}x"
                            for label, x in r.get("engines", {}).items())  # fmt: skip
            lines.append(f"- {n}-token prompt, engine / genai-optimum (targets for ours-ov: prefill >= "
                         f"{TARGET_PREFILL}x, decode >= {TARGET_DECODE}x): {per}")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", nargs=2, metavar=("KIND", "PATH"))
    p.add_argument("--eval-worker", nargs=3, metavar=("IR", "IDS", "OUT"))
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--anchors", type=Path, default=Path("/work/anchors"))
    p.add_argument("--anchor-prefix", default="ov-real")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/qe-ov-bench"))
    p.add_argument("--weights", default="int4,int8")
    p.add_argument("--prompt-lengths", default="128,512")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prefill-repeats", type=int, default=0, help="extra prefill-only rounds per prompt length")
    p.add_argument(
        "--gap-s", type=float, default=0.0, help="idle seconds before each engine call (worker threads settle)"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv-cache", default=None, help="KV_CACHE_PRECISION for ours-ov (default f32) and genai")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference-logits", type=Path)
    p.add_argument("--text-ids", type=Path)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--force", action="store_true")
    p.add_argument("--json-out", type=Path)
    p.add_argument(
        "--export-args",
        default="",
        help="extra `qwen-export export` args (shlex-split), ov and ort; one flag alone: --export-args=--asymmetric",
    )
    p.add_argument("--tag", default="", help="artifact suffix for --export-args: W/ov-<w>-TAG, labels ours-ov@TAG")
    p.add_argument("--baseline", action="store_true", help="with --tag: also the default W/ov-<w> as engine ours-ov")
    p.add_argument("--engines", default="", help="comma-separated engine labels (or their part before @) to keep")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.worker:
        return sessions.serve(SESSION_KINDS[args.worker[0]], args.worker[1], args.threads, args.kv_cache)
    if args.eval_worker:
        return accuracy.eval_main("openvino", *args.eval_worker, threads=args.threads)
    if args.checkpoint is None:
        p.error("--checkpoint is required")
    export_args = shlex.split(args.export_args)
    if export_args and not args.tag:
        p.error("--export-args needs --tag (the default artifact directories hold the CLI defaults)")
    if args.baseline and not args.tag:
        p.error("--baseline needs --tag")
    if args.tag and not args.tag.replace("-", "").replace("_", "").isalnum():
        p.error("--tag: letters, digits, - and _ only")
    keep = {x for x in args.engines.split(",") if x}
    args.workdir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "checkpoint": str(args.checkpoint),
        "machine": harness.machine(),
        "loadavg_start": harness.loadavg(),
        "threads": args.threads,
        "new_tokens": args.new_tokens,
        "export_args": export_args,
        "tag": args.tag,
        "baseline": args.baseline,
        "results": {},
    }
    failed = False
    for weights in args.weights.split(","):
        block, weights_failed = run_weights(args, weights, export_args, keep)
        failed |= weights_failed
        if block is None:
            continue
        report["results"][weights] = block
        if args.json_out:
            harness.write_json(args.json_out, report)
    report["loadavg_end"] = harness.loadavg()
    print(summary(report))
    if args.json_out:
        harness.write_json(args.json_out, report)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
