"""Our ONNX Runtime artifacts vs onnxruntime-genai's model builder, same checkpoint, same machine.

One run, one checkpoint (random weights, Qwen2.5-0.5B shape by default, no download), fp32, CPU:

1. build (or reuse, ``--skip-build``) the checkpoint with ``qwen_export.export.tiny.make_checkpoint``
   (``init="transformers"``, bf16 safetensors + the Qwen tokenizer files and generation_config.json);
2. export it three ways, recording wall time, peak RSS and size on disk of each:

   * ``fused``: ``qwen-export export CKPT -o W/fused --fuse``;
   * ``unfused``: ``qwen-export export CKPT -o W/unfused --no-fuse``;
     (when this CLI has no ``--fuse/--no-fuse`` yet, one artifact ``ours`` of the default export);
   * ``genai``: ``python -m onnxruntime_genai.models.builder -i CKPT -o W/genai -p fp32 -e cpu
     -c W/genai_cache`` (the builder's defaults, which compute the logits of every prompt position at
     prefill), and ``genai-prune``: the same plus ``--extra_options prune_lm_head=true`` (last-position
     logits only, as our artifacts compute them); ``--genai-variants`` picks which;

3. measure every engine in its own long-lived worker subprocess (``sessions.py``; commands and replies
   are JSON lines on its stdin/stdout) with ``--threads`` intra-op threads: for each prompt length,
   ``--warmup`` unmeasured rounds then ``--repeats`` measured ones; a round is one greedy generation
   of exactly ``--new-tokens`` tokens (no stop token) per engine from the same random prompt,
   interleaved step by step: every engine prefills in turn, then every decode step runs on each
   engine in turn (fused, unfused, genai, fused, unfused, genai, ...), so that a slow spell of the
   shared machine hits all of them alike; times are taken inside the workers around the compute;
   then ``--prefill-repeats`` (4) prefill-only rounds (engine order rotated each round), since a
   prefill is one multi-second shot that a slow spell can hit for one engine only;

   * ours: ``open_artifact(dir, RuntimeOptions(threads=T)).engine``; TTFT = ``forward(prompt)`` +
     argmax, then ``forward([[token]])`` + argmax ``new_tokens - 1`` times (as ``qwen_export.runtime.bench``
     does);
   * genai: ``og.Config`` with ``session_options`` intra_op_num_threads = T (an overlay; the builder's
     genai_config.json is left as written), ``GeneratorParams`` with max_length = min_length =
     prompt + new tokens, greedy; TTFT = ``append_tokens(prompt)`` + the first
     ``generate_next_token()``, then ``generate_next_token()`` ``new_tokens - 1`` times (each runs the
     model on the previous token, then picks the next: the same work as one of our decode steps);

4. print engine x prompt length -> TTFT ms (median of all prefills), prefill tok/s, decode tok/s,
   mean and p50 ms per decode token, worker peak RSS (VmHWM), and the ratios fused/genai (targets:
   decode >= 1.1x, prefill >= 1.3x), fused/genai-prune and fused/unfused; ``--json-out FILE``
   writes everything.

    .venv/bin/python benchmarks/ort_vs_genai.py [--shape 0.5b|tiny] [--workdir DIR] [--skip-build]
        [--reuse-artifacts] [--repeats 3] [--json-out FILE]

The workers (``--worker``: ``sessions.py``), the interleaved measurement (``interleave``), the
launcher and the statistics (``harness``) are the benchmarks' shared ones.

Exit status: 1 when a build, export or worker failed (the error is printed), 2 with ``--check`` when
a target was missed, else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import harness
import interleave
import sessions
from artifacts import checkpoint_ready, dir_bytes, export_logged, genai_builder_cmd
from harness import MiB, log

TARGET_DECODE = 1.1
TARGET_PREFILL = 1.3
#: this script's worker kinds -> the sessions' kinds
SESSION_KINDS = {"ours": "ours", "genai": "og"}

_BUILD = """
import sys
from qwen_export.export.tiny import QWEN25_05B_SHAPE, make_checkpoint
shape = dict(QWEN25_05B_SHAPE) if sys.argv[2] == "0.5b" else dict(dtype="bfloat16", max_positions=2048)
make_checkpoint(sys.argv[1], seed=int(sys.argv[3]), init="transformers", **shape)
"""


# ----------------------------------------------------------------------------- build and export
def cli_has_fuse_flag() -> bool:
    """Whether ``qwen-export export`` takes ``--fuse/--no-fuse`` (being added to the CLI)."""
    try:
        text = subprocess.run(
            [harness.cli_path(), "export", "--help"],
            capture_output=True,
            text=True,
            env=dict(os.environ, **harness.PLAIN_ENV),
            timeout=120,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "--no-fuse" in text


def artifact_ready(kind: str, path: Path, max_length: int | None = None) -> bool:
    marker = "genai_config.json" if kind == "genai" else "manifest.json"
    if not ((path / marker).is_file() and (path / "model.onnx").is_file()):
        return False
    if kind == "ours" and max_length is not None:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        return manifest.get("extra", {}).get("max_length") == max_length
    return True


def export_plan(
    ckpt: Path, workdir: Path, genai_variants: list[str], fuse_flag: bool, max_length: int | None
) -> list[dict[str, Any]]:
    """(label, kind, directory, command) of every artifact to build, in measuring order."""
    plan = []
    ours = [("fused", ["--fuse"]), ("unfused", ["--no-fuse"])] if fuse_flag else [("ours", [])]
    for label, flags in ours:
        out = workdir / label
        cmd = [harness.cli_path(), "export", str(ckpt), "-o", str(out), "--overwrite", *flags]
        if max_length is not None:
            cmd += ["--max-length", str(max_length)]
        plan.append({"label": label, "kind": "ours", "dir": out, "command": cmd, "max_length": max_length})
    for variant in genai_variants:
        if variant not in ("default", "prune_lm_head"):
            raise SystemExit(f"unknown genai variant {variant!r} (default, prune_lm_head)")
        label = "genai" if variant == "default" else f"genai-{variant.replace('_lm_head', '')}"
        out = workdir / label
        cmd = genai_builder_cmd(ckpt, out, "fp32", workdir / f"{label}_cache", prune=variant == "prune_lm_head")
        plan.append({"label": label, "kind": "genai", "dir": out, "command": cmd, "variant": variant})
    return plan


def build_artifact(item: dict[str, Any], workdir: Path, reuse: bool) -> dict[str, Any]:
    out: Path = item["dir"]
    ready = artifact_ready(item["kind"], out, item.get("max_length"))
    if reuse and ready:
        log(f"{item['label']}: reusing {out}")
        result: dict[str, Any] = {"command": item["command"], "returncode": 0, "reused": True}
    else:
        result = export_logged(
            item["label"], f"export-{item['label']}", out, item["command"], workdir,
            lambda: (artifact_ready(item["kind"], out, item.get("max_length")), "lacks model.onnx or its config"),
            clean=item["kind"] == "genai", cache=workdir / f"{item['label']}_cache",
        )  # fmt: skip
    if result["returncode"] == 0:
        result["artifact_bytes"] = dir_bytes(out)
        result["files"] = sorted((str(p.relative_to(out)), p.stat().st_size) for p in out.rglob("*") if p.is_file())
        if item["kind"] == "ours":
            manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
            extra = manifest.get("extra", {})
            result["passes"] = [p.get("name") for p in manifest.get("passes", []) if isinstance(p, dict)]
            result["export_phases_s"] = extra.get("export_seconds")
            result["max_length"] = extra.get("max_length")
            result["kv_cache"] = extra.get("kv_cache")
    return result


def build_checkpoint(args: argparse.Namespace, ckpt: Path, workdir: Path, report: dict[str, Any]) -> bool:
    """Build (or, with --skip-build, check) the checkpoint; False when the build failed."""
    if args.skip_build:
        if not checkpoint_ready(ckpt):
            sys.exit(f"--skip-build: no checkpoint in {ckpt} (run once without --skip-build)")
        log(f"reusing checkpoint {ckpt}")
        report["build"] = {"reused": True}
        return True
    if ckpt.exists():
        shutil.rmtree(ckpt)
    build_cmd = [sys.executable, "-c", _BUILD, str(ckpt), args.shape, str(args.seed)]
    report["build"] = harness.run_logged("build", build_cmd, workdir)
    return report["build"]["returncode"] == 0


# ----------------------------------------------------------------------------- measure
def start_workers(
    ready: list[dict[str, Any]], args: argparse.Namespace, needed: int, workdir: Path, report: dict[str, Any]
) -> tuple[list[harness.Worker], bool]:
    """One worker per ready artifact whose context holds ``needed`` tokens; (workers, any failed)."""
    workers: list[harness.Worker] = []
    failed = False
    for item in ready:
        label = item["label"]
        log(f"loading {label} in a worker (MemAvailable {harness.mem_available_mib():.0f} MiB)")
        try:
            w = sessions.start(label, SESSION_KINDS[item["kind"]], item["dir"], args.threads, workdir)
        except RuntimeError as exc:
            log(f"{label}: worker FAILED to load: {exc}")
            report["workers"][label] = {"error": str(exc)}
            failed = True
            continue
        if w.ready["context"] < needed:
            log(f"{label}: context {w.ready['context']} < {needed}; skipped")
            report["workers"][label] = {"error": f"context {w.ready['context']} too short"}
            w.close()
            failed = True
            continue
        workers.append(w)
        report["workers"][label] = {"load_s": w.ready["load_s"], "rss_load_mib": w.ready["rss_hwm_mib"]}
    return workers, failed


def measure_all(
    ready: list[dict[str, Any]], args: argparse.Namespace, lengths: list[int], workdir: Path, report: dict[str, Any]
) -> tuple[list[str], bool]:
    """Workers, interleaved measurement, each worker's peak RSS; (labels measured, any failed)."""
    report["workers"], report["cases"], report["ratios"] = {}, {}, {}
    workers: list[harness.Worker] = []
    failed = False
    try:
        workers, failed = start_workers(ready, args, max(lengths) + args.new_tokens, workdir, report)
        if workers:
            log("measuring: " + ", ".join(w.label for w in workers) + " round-robin")
            report["cases"] = interleave.measure_steps(
                workers, lengths, args.new_tokens, args.repeats, args.warmup, args.seed, args.prefill_repeats
            )
    except RuntimeError as exc:
        log(f"measurement FAILED: {exc}")
        report["measure_error"] = str(exc)
        failed = True
    finally:
        for w in workers:
            # VmHWM of the worker after all runs: ask /proc directly (the worker may be gone)
            if (rss := w.peak_rss_mib()) is not None:
                report["workers"][w.label]["rss_hwm_mib"] = rss
            w.close()
    return [w.label for w in workers], failed


def judge(report: dict[str, Any], labels: list[str]) -> bool:
    """Ratios of our best artifact to the others; whether a target vs genai was missed."""
    # our best artifact: fused, else the flagless default export, else unfused (when the fused export
    # failed, so that its failure still leaves a comparison with genai)
    ours = [lab for lab in ("fused", "ours", "unfused") if lab in labels]
    genai = [lab for lab in labels if lab.startswith("genai")]
    missed = False
    if ours and report["cases"]:
        others = genai + (["unfused"] if "unfused" in labels and ours[0] == "fused" else [])
        report["ratios"] = interleave.step_ratios(report["cases"], ours[0], others)
        if "genai" in genai:
            for r in report["ratios"][f"{ours[0]}/genai"].values():
                missed |= r["prefill"] < TARGET_PREFILL or r["decode"] < TARGET_DECODE
    report["targets"] = {"decode_vs_genai": TARGET_DECODE, "prefill_vs_genai": TARGET_PREFILL, "missed": missed}
    return missed


# ----------------------------------------------------------------------------- report
def summary(report: dict[str, Any]) -> str:
    lines = [
        f"ours vs onnxruntime-genai: {report['shape']} shape, fp32, CPU, {report['threads']} threads, "
        f"{report['new_tokens']} new tokens, {report['repeats']} runs (+{report['warmup']} warm-up) per case, "
        f"{report['prefill_repeats']} extra prefill-only rounds"
    ]
    lines.append("")
    lines.append("exports:")
    for label, ex in report["exports"].items():
        if ex["returncode"] != 0:
            why = ex.get("error") or ex["stderr_tail"][-600:]
            lines.append(f"  {label:12} FAILED (exit {ex['returncode']}): {why}")
            continue
        wall = "reused" if ex.get("reused") else f"{ex['wall_s']:.1f} s"
        peak = f", peak RSS {ex['peak_rss_bytes'] / MiB:.0f} MiB" if ex.get("peak_rss_bytes") else ""
        passes = f", passes {','.join(ex['passes'])}" if ex.get("passes") is not None else ""
        lines.append(f"  {label:12} {wall}{peak}, {ex['artifact_bytes'] / MiB:.0f} MiB on disk{passes}")
    if not report.get("cases"):
        lines.append("\nno measurements")
        return "\n".join(lines)
    header = (
        f"{'engine':12} {'prompt':>6} {'TTFT ms':>9} {'prefill tok/s':>13} {'decode tok/s':>12} "
        f"{'ms/tok mean':>11} {'p50':>7} {'peak RSS MiB':>12}"
    )
    lines += ["", header, "-" * len(header)]
    for length, engines in report["cases"].items():
        for label, r in engines.items():
            rss = report["workers"][label].get("rss_hwm_mib", float("nan"))
            lines.append(
                f"{label:12} {length:>6} {r['ttft_ms']:9.1f} {r['prefill_tokens_per_s']:13.1f} "
                f"{r['decode_tokens_per_s']:12.2f} {r['decode_ms_per_token_mean']:11.2f} "
                f"{r['decode_ms_per_token_p50']:7.2f} {rss:12.0f}"
            )
    lines.append("")
    for name, per_len in report["ratios"].items():
        vs_genai = name.split("/")[1].startswith("genai")
        for length, r in per_len.items():
            text = (
                f"{name:19} prompt {length:>4}: prefill {r['prefill']:.2f}x (best {r['prefill_best']:.2f}x), "
                f"decode {r['decode']:.2f}x (p50 {r['decode_p50']:.2f}x)"
            )
            if vs_genai:
                ok_p = "met" if r["prefill"] >= TARGET_PREFILL else "MISSED"
                ok_d = "met" if r["decode"] >= TARGET_DECODE else "MISSED"
                text += f"   (targets prefill >= {TARGET_PREFILL}x {ok_p}, decode >= {TARGET_DECODE}x {ok_d})"
            lines.append(text)
    agree = []
    for length, engines in report["cases"].items():
        for label, r in engines.items():
            agree.append(f"{label}@{length}: {min(r['greedy_tokens_matching_first_engine'])}")
    lines.append("")
    first = next(iter(report["cases"].values()))
    lines.append(
        f"leading greedy tokens equal to {next(iter(first))}'s (min over runs, of {report['new_tokens']}): "
        + ", ".join(agree)
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument(
        "--shape",
        choices=("0.5b", "tiny"),
        default="0.5b",
        help="Qwen2.5-0.5B shape (default) or make_checkpoint's tiny 2-layer shape (a quick end-to-end check)",
    )
    ap.add_argument("--workdir", type=Path, default=None, help="default /tmp/qe-bench-genai (tiny: ...-tiny)")
    ap.add_argument("--skip-build", action="store_true", help="reuse WORKDIR/checkpoint (must exist)")
    ap.add_argument("--reuse-artifacts", action="store_true", help="skip an export whose output directory is complete")
    ap.add_argument(
        "--genai-variants",
        default="default,prune_lm_head",
        help="comma-separated builder variants to measure: default (the builder's defaults: logits of every "
        "prompt position at prefill), prune_lm_head (last-position logits, like ours)",
    )
    ap.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="pass --max-length N to our exports (the context, and the fused artifact's KV buffer capacity; "
        "default: the exporter's, min(config, 32768)); genai sizes its buffer per generation (prompt + new)",
    )
    ap.add_argument("--prompt-lengths", default="128,512")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--prefill-repeats",
        type=int,
        default=4,
        help="extra prefill-only rounds per prompt length (interleaved; TTFT is the median over these and the runs)",
    )
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of every engine")
    ap.add_argument("--seed", type=int, default=0, help="weights seed (build) and prompt seed")
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--check", action="store_true", help="exit 2 when a target vs genai is missed")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.worker:
        return sessions.serve(SESSION_KINDS[args.worker[0]], args.worker[1], args.threads)

    workdir: Path = args.workdir or Path("/tmp/qe-bench-genai" + ("-tiny" if args.shape == "tiny" else ""))
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = workdir / "checkpoint"
    lengths = [int(v) for v in args.prompt_lengths.split(",") if v.strip()]
    variants = [v.strip() for v in args.genai_variants.split(",") if v.strip()]
    if args.repeats < 1 or min(args.warmup, args.prefill_repeats) < 0 or args.new_tokens < 2 or min(lengths or [0]) < 1:
        ap.error("need --repeats >= 1, --warmup/--prefill-repeats >= 0, --new-tokens >= 2, positive prompt lengths")
    report: dict[str, Any] = {
        "host": harness.host(),
        "versions": harness.versions(("onnxruntime", "onnxruntime_genai", "qwen_export")),
        "loadavg_start": harness.loadavg(),
        "workdir": str(workdir),
        "shape": args.shape,
        "threads": args.threads,
        "prompt_lengths": lengths,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "prefill_repeats": args.prefill_repeats,
        "seed": args.seed,
        "max_length": args.max_length,
    }
    if not build_checkpoint(args, ckpt, workdir, report):
        print(summary(report | {"exports": {}}), flush=True)
        return 1
    report["checkpoint_files"] = sorted(p.name for p in ckpt.iterdir())

    fuse_flag = cli_has_fuse_flag()
    report["cli_has_fuse_flag"] = fuse_flag
    if not fuse_flag:
        log("qwen-export export has no --fuse/--no-fuse yet: measuring one artifact ('ours', the default export)")
    plan = export_plan(ckpt, workdir, variants, fuse_flag, args.max_length)
    report["exports"] = {item["label"]: build_artifact(item, workdir, args.reuse_artifacts) for item in plan}
    ready = [item for item in plan if report["exports"][item["label"]]["returncode"] == 0]
    labels, failed = measure_all(ready, args, lengths, workdir, report)
    failed |= len(ready) < len(plan)
    missed = judge(report, labels)
    report["loadavg_end"] = harness.loadavg()

    print("\n" + summary(report), flush=True)
    if args.json_out:
        harness.write_json(args.json_out, report)
        log(f"wrote {args.json_out}")
    if failed:
        return 1
    return 2 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
