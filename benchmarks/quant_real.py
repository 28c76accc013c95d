"""Quantized artifacts of a real checkpoint vs onnxruntime-genai's int4: accuracy, size and speed.

One run on one checkpoint (default ``/work/real/ckpt``: Qwen2.5-Coder-1.5B-Instruct converted from
its GGUF by ``qwen-export convert-gguf``), CPU:

1. exports (each skipped when its directory already holds a matching artifact, unless ``--force``):

   * ``fp32`` (the reference): ``qwen-export export CKPT -o W/fp32-all --logits all``;
   * ``int8``: ``--weights int8 --algorithm rtn --logits all``;
   * ``int4-rtn``, ``int4-clip``, ``int4-awq``: ``--weights int4 --algorithm A --logits all``
     (``--block-size``, symmetric, accuracy level 4: the CLI's defaults; an algorithm the CLI
     rejects, e.g. awq before calibration exists, is reported as not available);
   * ``genai-int4``: ``python -m onnxruntime_genai.models.builder -i CKPT -o W/genai-int4 -p int4
     -e cpu -c W/genai-cache`` (the builder's defaults: every position's logits); what it built
     (MatMulNBits bits/block/accuracy level/zero points, the embedding's and lm_head's precision) is
     read back from its graph and genai_config.json;
   * for the speed runs (``--speed-logits last``, the default): last-position-logit twins of the
     measured artifacts, ours ``W/<label>-last`` (``--logits last``, the export's default) and the
     builder's ``W/genai-int4-prune`` (``--extra_options prune_lm_head=true``), so that neither
     side computes a ``[prompt, vocab]`` LM-head product at prefill. ``--speed-logits all`` measures
     the evaluation artifacts themselves (both sides compute every position's logits);

2. accuracy: one fixed text (built in: ``quant_real_text.txt``, ~600 tokens of code and English prose,
   or ``--text FILE``),
   tokenized once with the checkpoint's tokenizer (``qwen_export.runtime.tokenizer.Tokenizer``), fed to every
   model teacher-forced from an empty cache in consecutive ``--chunk`` (256) token chunks that
   continue the cache, every position's logits kept. Each model runs alone in a subprocess (the
   fp32 reference needs ~8 GB): ours through ``open_artifact(...).engine.forward``, genai's ONNX
   file through a plain ``onnxruntime.InferenceSession`` (its inputs fed by hand: ``input_ids``,
   ``attention_mask``, the past KV of the previous chunk, starting empty). Per position: KL(ref ||
   model) with ref = our fp32 artifact, both softmaxes in float64 over the full vocabulary; top-1
   agreement with ref; and each model's perplexity on the text (next-token NLL, positions 0..N-2);

3. on-disk size of each artifact's model files (``*.onnx``, ``*.onnx.data``, ``*.data``) and the
   ratio to genai's int4;

4. speed: ``--speed-artifacts`` (int8, int4-rtn) vs genai's int4 in worker subprocesses
   (``sessions.py``, ``--threads`` intra-op threads each), interleaved step by step as ``ort_vs_genai.py``
   measures (``interleave.measure_steps``): prefill of a
   ``--prompt-length`` (256) random-token prompt, then ``--new-tokens`` (64) greedy tokens, no early
   stop; ``--warmup`` + ``--repeats`` rounds plus ``--prefill-repeats`` prefill-only rounds. An int4
   artifact not timed whose graph equals a timed one's (same ops, MatMulNBits settings and model
   bytes; rtn, clip and awq differ in weight values only) is credited with its figures (marked);

5. prints one table (artifact x mean KL, top-1, ppl, size MiB, prefill tok/s, decode tok/s) and
   the target checks (int4 mean KL <= 0.5x genai int4's, int4 size <= 0.6x, int8 mean KL <= 0.005,
   int4 decode >= 1.0x genai int4's); ``--json-out FILE`` writes everything.

    .venv/bin/python benchmarks/quant_real.py [--checkpoint DIR] [--workdir DIR] [--force]
        [--algorithms default,rtn,rtn-asym,gptq-asym,awq-asym] [--text FILE] [--skip-speed] [--json-out FILE]

Exit status: 1 when an export, evaluation or worker failed (the error is printed), 2 with
``--check`` when a target was missed, else 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import accuracy
import harness
import interleave
import sessions
from artifacts import build, genai_builder_cmd, model_bytes, read_json
from harness import MiB, log

TARGET_INT4_KL_RATIO = 0.5
TARGET_INT4_SIZE_RATIO = 0.6
TARGET_INT8_KL = 0.005
TARGET_INT4_DECODE_RATIO = 1.0
GENAI = "genai-int4"

# A fixed evaluation text: Python, a shell session, JSON and English prose (about 600 Qwen tokens).
DEFAULT_TEXT_FILE = Path(__file__).with_name("quant_real_text.txt")


# ----------------------------------------------------------------------------- the plan
#: suffixes of an ``--algorithms`` entry (e.g. ``gptq-asym-e4``) and the export flags they add
VARIANT_FLAGS = {
    "asym": ["--asymmetric"],
    "sym": ["--symmetric"],
    "e4": ["--embedding-bits", "4"],
    "e8": ["--embedding-bits", "8"],
    "i4": ["--int8", "none"],  # every linear at 4 bits (no mixed precision)
    "attn8": ["--int8", "model.layers.*.self_attn.*"],
    "qkv8": ["--int8", "*.v_proj"],
    "o8": ["--int8", "*.o_proj"],
    "down8": ["--int8", "model.layers.*.mlp.down_proj"],
    "head8": ["--int8", "lm_head"],
}


def variant_flags(algorithm: str | None) -> tuple[str | None, list[str]]:
    """``("gptq", ["--asymmetric"])`` for ``"gptq-asym"``; ``"default"`` is the CLI's own default
    (no ``--algorithm`` flag: what a user running ``--weights int4`` gets)."""
    if algorithm is None:
        return None, []
    joined = algorithm.replace("awq-gptq", "awq_gptq")  # the one algorithm name with a dash
    name, *suffixes = joined.split("-")
    name = name.replace("awq_gptq", "awq-gptq")
    unknown = [x for x in suffixes if x not in VARIANT_FLAGS]
    if unknown:
        known = ", ".join(VARIANT_FLAGS)
        raise SystemExit(f"--algorithms {algorithm!r}: unknown suffix {unknown[0]!r} (known: {known})")
    flags = [f for x in suffixes for f in VARIANT_FLAGS[x]]
    return (None if name == "default" else name), flags


def ours_item(label: str, ckpt: Path, out: Path, weights: str, algorithm: str | None, logits: str, args: Any) -> dict:
    cmd = [harness.cli_path(), "export", str(ckpt), "-o", str(out), "--overwrite", "--logits", logits]
    if weights != "fp32":
        name, flags = variant_flags(algorithm)
        cmd += ["--weights", weights] + (["--algorithm", name] if name else []) + flags
        if args.block_size is not None:
            cmd += ["--block-size", str(args.block_size)]
        if args.accuracy_level is not None:
            cmd += ["--accuracy-level", str(args.accuracy_level)]
    if args.max_length is not None:
        cmd += ["--max-length", str(args.max_length)]
    want = {"weights": weights, "algorithm": algorithm, "logits": logits}
    return {"label": label, "kind": "ours", "dir": out, "command": cmd, "want": want}


def genai_item(label: str, ckpt: Path, out: Path, workdir: Path, prune: bool) -> dict:
    cmd = genai_builder_cmd(ckpt, out, "int4", workdir / "genai-cache", prune=prune)
    return {"label": label, "kind": "genai", "dir": out, "command": cmd, "want": {"prune": prune}}


def unavailable(result: dict[str, Any], algorithm: str) -> str | None:
    """The CLI's one-line reason when it rejected ``--algorithm`` (not a crash), else None."""
    if result.get("returncode") in (0, None) or result.get("reused"):
        return None
    text = (result.get("stderr_tail", "") + "\n" + result.get("stdout_tail", "")).strip()
    for line in text.splitlines()[::-1]:
        low = line.lower()
        if algorithm in low and ("error" in low or "not available" in low or "needs" in low or "unknown" in low):
            return line.strip()
    return None


def eval_plan(args: Any, ckpt: Path, workdir: Path) -> list[dict]:
    """The reference (first) and every artifact to evaluate, with their export commands."""
    if args.ref is not None:
        ref_item = {"label": "fp32", "kind": "ours", "dir": args.ref, "command": ["(given: --ref)"], "want": None}
    else:
        ref_item = ours_item("fp32", ckpt, workdir / "fp32-all", "fp32", None, "all", args)
    evals = [ref_item]
    if not args.no_int8:
        evals.append(ours_item("int8", ckpt, workdir / "int8-rtn-all", "int8", "rtn", "all", args))
    for algo in algorithms(args):
        evals.append(ours_item(f"int4-{algo}", ckpt, workdir / f"int4-{algo}-all", "int4", algo, "all", args))
    evals.append(genai_item(GENAI, ckpt, workdir / "genai-int4", workdir, prune=False))
    return evals


def algorithms(args: Any) -> list[str]:
    return [a.strip() for a in args.algorithms.split(",") if a.strip()]


def export_all(evals: list[dict], args: Any, report: dict[str, Any]) -> tuple[list[dict], bool]:
    """Export (or reuse) every artifact of the plan; (those ready, whether one failed)."""
    report["exports"] = {}
    ready: list[dict] = []
    failed = False
    for item in evals:
        if item["want"] is None:  # --ref
            manifest = read_json(item["dir"] / "manifest.json")
            res: dict[str, Any] = {"command": item["command"], "returncode": 0 if manifest else -1, "reused": True}
            if manifest:
                res["model_bytes"] = model_bytes(item["dir"])
                res["logits"] = manifest.get("logits")
            else:
                res["error"] = f"{item['dir']}: no manifest.json"
        else:
            res = build(item, args.workdir, args.force)
        algo = item["want"]["algorithm"] if item["want"] and item["kind"] == "ours" else None
        if algo and (reason := unavailable(res, algo)):
            res["unavailable"] = reason
            log(f"{item['label']}: not available: {reason}")
            report["problems"].append(f"{item['label']}: not available ({reason})")
        elif res["returncode"] != 0:
            failed = True
            report["problems"].append(f"{item['label']}: export failed ({res.get('error') or 'see its log'})")
        report["exports"][item["label"]] = res
        if res["returncode"] == 0:
            ready.append(item)
    return ready, failed


# ----------------------------------------------------------------------------- accuracy
def eval_key(path: Path, ids: Any, chunk: int, ref_key: str | None) -> str:
    """What an evaluation depends on: the model file's identity, the token ids, the chunk, the reference."""
    import hashlib

    model = path / "model.onnx"
    st = model.stat() if model.is_file() else None
    ident = f"{path.resolve()}|{st.st_mtime_ns if st else 0}|{model_bytes(path) if st else 0}"
    digest = hashlib.sha256(ids.tobytes()).hexdigest()[:16]
    return f"{ident}|ids={digest}|chunk={chunk}|ref={ref_key}"


class Evaluation:
    """Every ready artifact's logits against the reference's, one model at a time (``W/eval-cache.json``
    reused with ``--reuse-eval``); fills ``table`` and ``report["eval"]``."""

    def __init__(self, ref_item: dict, ids: Any, ids_path: Path, args: Any, report: dict[str, Any]) -> None:
        self.ref_item, self.ids, self.ids_path, self.args, self.report = ref_item, ids, ids_path, args, report
        self.table: dict[str, dict[str, Any]] = {}
        self.ref_logits: Path | None = None
        self.cache_path = args.workdir / "eval-cache.json"
        self.cache = read_json(self.cache_path) if args.reuse_eval else {}
        self.failed = False
        report["eval"] = {}

    def run_eval(self, item: dict) -> dict[str, Any]:
        log(f"evaluating {item['label']} (MemAvailable {harness.mem_available_mib():.0f} MiB)")
        a = self.args
        return accuracy.run_eval(
            item["label"], item["kind"], item["dir"], self.ids_path, a.workdir, chunk=a.chunk, threads=a.threads
        )

    def problem(self, text: str) -> None:
        self.failed = True
        self.report["problems"].append(text)

    def run(self, ready: list[dict]) -> None:
        ref_key = None
        for item in ready:
            key = eval_key(item["dir"], self.ids, self.args.chunk, ref_key)
            if item is self.ref_item:
                ref_key = key
            if self.args.reuse_eval and key in self.cache:
                self.reuse(item, key)
                continue
            if self.ref_logits is None and item is not self.ref_item:
                ref_res = self.run_eval(self.ref_item)
                if ref_res["returncode"] != 0:
                    self.problem(f"reference evaluation failed: {ref_res['stderr_tail'][-400:]}")
                    break
                self.ref_logits = Path(ref_res["logits_path"])
            if not self.one(item, key) and item is self.ref_item:
                break

    def reuse(self, item: dict, key: str) -> None:
        res = dict(self.cache[key], reused=True)
        self.report["eval"][item["label"]] = res
        self.table[item["label"]] = dict(res["metrics"])
        m = res["metrics"]
        log(
            f"{item['label']}: reusing its evaluation: mean KL {m['mean_kl']:.5f}, top-1 {m['top1']:.2%}, "
            f"ppl {m['ppl']:.3f}"
        )

    def one(self, item: dict, key: str) -> bool:
        """Evaluate one artifact; False when its evaluation failed."""
        res = self.run_eval(item)
        self.report["eval"][item["label"]] = res
        if res["returncode"] != 0:
            self.problem(f"{item['label']}: evaluation failed: {res['stderr_tail'][-400:]}")
            return False
        path = Path(res["logits_path"])
        if item is self.ref_item:
            self.ref_logits = path
        assert self.ref_logits is not None
        metrics = accuracy.compare(self.ref_logits, path, self.ids)
        res["metrics"] = metrics
        self.table[item["label"]] = dict(metrics)
        keep = ("metrics", "load_s", "run_s", "rss_hwm_mib", "wall_s")
        self.cache[key] = {k: v for k, v in res.items() if k in keep}
        self.cache_path.write_text(json.dumps(self.cache, indent=1) + "\n", encoding="utf-8")
        log(
            f"{item['label']}: mean KL {metrics['mean_kl']:.5f}, top-1 {metrics['top1']:.2%}, "
            f"ppl {metrics['ppl']:.3f} (forward {res.get('run_s', float('nan')):.1f} s)"
        )
        if path != self.ref_logits and not self.args.keep_logits:
            path.unlink(missing_ok=True)
        return True


def add_sizes(table: dict[str, dict[str, Any]], ready: list[dict], report: dict[str, Any]) -> None:
    for item in ready:
        row = table.setdefault(item["label"], {})
        size = report["exports"][item["label"]].get("model_bytes")
        row["size_mib"] = size / MiB if size else None
    gsize = table.get(GENAI, {}).get("size_mib")
    for row in table.values():
        row["size_ratio"] = row["size_mib"] / gsize if row.get("size_mib") and gsize else None


# ----------------------------------------------------------------------------- speed
def speed_plan(args: Any, ready: list[dict], table: dict, report: dict[str, Any]) -> tuple[list[dict], bool]:
    """The artifacts to time (their last-position-logit twins with --speed-logits last, built here)."""
    int4_labels = [f"int4-{a}" for a in algorithms(args) if f"int4-{a}" in table]
    wanted: list[str] = []
    for s in (x.strip() for x in args.speed_artifacts.split(",")):
        if s == "int4":
            wanted += int4_labels
        elif s and s in table:
            wanted.append(s)
    by_label = {item["label"]: item for item in ready}
    speed_items: list[dict] = []
    failed = False
    workdir = args.workdir
    for label in wanted + [GENAI]:
        item = by_label.get(label)
        if item is None:
            continue
        if args.speed_logits == "last":
            if item["kind"] == "genai":
                item = genai_item(GENAI, args.checkpoint, workdir / "genai-int4-prune", workdir, prune=True)
            else:
                w = item["want"]
                item = ours_item(label, args.checkpoint, workdir / f"{item['dir'].name.removesuffix('-all')}-last",
                                 w["weights"], w["algorithm"], "last", args)  # fmt: skip
            res = build(item, workdir, args.force)
            report["exports"][f"{label} (speed)"] = res
            if res["returncode"] != 0:
                failed = True
                report["problems"].append(f"{label}: speed export failed")
                continue
        speed_items.append(item)
    return speed_items, failed


def speed_rows(cases: dict[str, Any], args: Any, speed_items: list[dict], table: dict, report: dict) -> None:
    """Ratios to genai-int4 and the table's speed columns from the measured cases."""
    engines = cases[str(args.prompt_length)]
    if GENAI in engines:
        report["speed"]["ratios"] = {}
        for lab in engines:
            if lab != GENAI:
                report["speed"]["ratios"].update(interleave.step_ratios(cases, lab, [GENAI]))
    for lab, r in engines.items():
        row = table.setdefault(lab, {})
        row["prefill_tok_s"] = r["prefill_tokens_per_s"]
        row["decode_tok_s"] = r["decode_tokens_per_s"]
        if GENAI in engines and lab != GENAI:
            row["decode_ratio"] = r["decode_tokens_per_s"] / engines[GENAI]["decode_tokens_per_s"]
            row["prefill_ratio"] = r["prefill_tokens_per_s"] / engines[GENAI]["prefill_tokens_per_s"]
        row["speed_artifact"] = str(next(i["dir"] for i in speed_items if i["label"] == lab))
        row["greedy_tokens_matching_first"] = r["greedy_tokens_matching_first_engine"]


def measure_speed(speed_items: list[dict], args: Any, table: dict, report: dict[str, Any]) -> bool:
    """Every speed artifact in a worker, interleaved step by step; whether something failed."""
    workers: list[harness.Worker] = []
    failed = False
    try:
        for item in speed_items:
            mem = harness.mem_available_mib()
            log(f"loading {item['label']} ({item['dir']}) in a worker (MemAvailable {mem:.0f} MiB)")
            try:
                kind = "og" if item["kind"] == "genai" else "ours"
                workers.append(sessions.start(item["label"], kind, item["dir"], args.threads, args.workdir))
            except RuntimeError as exc:
                log(f"{item['label']}: worker FAILED to load: {exc}")
                report["problems"].append(f"{item['label']}: speed worker failed to load")
                failed = True
        if workers:
            log("measuring: " + ", ".join(w.label for w in workers) + " round-robin")
            cases = interleave.measure_steps(
                workers, [args.prompt_length], args.new_tokens, args.repeats, args.warmup, args.seed,
                args.prefill_repeats,
            )  # fmt: skip
            report["speed"]["cases"] = cases
            speed_rows(cases, args, speed_items, table, report)
    except RuntimeError as exc:
        log(f"speed measurement FAILED: {exc}")
        report["problems"].append(f"speed measurement failed: {exc}")
        failed = True
    finally:
        for w in workers:
            if (rss := w.peak_rss_mib()) is not None:
                report["speed"].setdefault("rss_hwm_mib", {})[w.label] = rss
            w.close()
    return failed


def credit_twins(table: dict[str, dict[str, Any]], report: dict[str, Any]) -> None:
    """An int4 artifact not timed whose graph equals a timed one's runs the same kernels on the same
    shapes (only the weight values differ): credit it with that one's speed, marked as such."""

    def signature(label: str) -> str | None:
        ex = report["exports"].get(label) or {}
        graph = ex.get("graph")
        if not graph or "error" in graph or not ex.get("model_bytes"):
            return None
        return json.dumps([graph, ex["model_bytes"]], sort_keys=True, default=str)

    timed = [lab for lab, row in table.items() if row.get("decode_tok_s") is not None and lab != GENAI]
    for label, row in table.items():
        if row.get("decode_tok_s") is not None or label == GENAI or signature(label) is None:
            continue
        twin = next((t for t in timed if signature(t) == signature(label)), None)
        if twin:
            for key in ("prefill_tok_s", "decode_tok_s", "decode_ratio", "prefill_ratio"):
                if key in table[twin]:
                    row[key] = table[twin][key]
            row["speed_from"] = twin


# ----------------------------------------------------------------------------- report
def fmt(value: Any, spec: str, width: int) -> str:
    if value is None:
        return f"{'-':>{width}}"
    return f"{value:{width}{spec}}"


def summary(report: dict[str, Any]) -> str:
    lines = [
        f"quantized artifacts vs onnxruntime-genai int4: {report['checkpoint']}",
        f"text: {report['text']['source']}, {report['text']['tokens']} tokens, teacher-forced in chunks of "
        f"{report['chunk']}; KL(ref || model) with ref = {report['reference']}",
        f"speed: {report['threads']} threads, prompt {report['prompt_length']} + {report['new_tokens']} greedy "
        f"tokens, {report['repeats']} runs (+{report['warmup']} warm-up) + {report['prefill_repeats']} "
        f"prefill-only rounds, logits={report['speed_logits']} on both sides",
        "",
        "exports:",
    ]
    for name, ex in report["exports"].items():
        if ex.get("unavailable"):
            lines.append(f"  {name:22} NOT AVAILABLE: {ex['unavailable']}")
            continue
        if ex["returncode"] != 0:
            why = ex.get("error") or ex.get("stderr_tail", "")[-600:]
            lines.append(f"  {name:22} FAILED (exit {ex['returncode']}): {why}")
            continue
        wall = "reused" if ex.get("reused") else f"{ex['wall_s']:.0f} s"
        peak = f", peak RSS {ex['peak_rss_bytes'] / MiB:.0f} MiB" if ex.get("peak_rss_bytes") else ""
        g = ex.get("graph") or {}
        what = (
            f"; MatMulNBits {g.get('matmulnbits') or '-'}; embedding {g.get('embedding', '?')}; "
            f"lm_head {g.get('lm_head', '?')}"
        )
        lines.append(f"  {name:22} {wall}{peak}, {ex['model_bytes'] / MiB:.0f} MiB model files{what}")
    header = (
        f"{'artifact':12} {'mean KL':>9} {'p99 KL':>8} {'top-1':>7} {'ppl':>8} {'size MiB':>9} {'x genai':>7} "
        f"{'prefill tok/s':>13} {'decode tok/s':>12}"
    )
    lines += ["", header, "-" * len(header)]
    shared = []
    for label, row in report["table"].items():
        mark = "*" if row.get("speed_from") else " "
        if row.get("speed_from"):
            shared.append(f"{label} <- {row['speed_from']}")
        lines.append(
            f"{label + mark:12} {fmt(row.get('mean_kl'), '.5f', 9)} {fmt(row.get('p99_kl'), '.4f', 8)} "
            f"{fmt(row.get('top1'), '.2%', 7)} {fmt(row.get('ppl'), '.3f', 8)} {fmt(row.get('size_mib'), '.0f', 9)} "
            f"{fmt(row.get('size_ratio'), '.3f', 7)} {fmt(row.get('prefill_tok_s'), '.1f', 13)} "
            f"{fmt(row.get('decode_tok_s'), '.2f', 12)}"
        )
    if shared:
        lines.append(
            "* speed not timed separately: the same graph (ops, MatMulNBits settings, model bytes; only the "
            "weight values differ) as a timed artifact, whose figures are shown: " + ", ".join(shared)
        )
    lines.append("")
    for check in report["targets"]:
        value = "-" if check["value"] is None else f"{check['value']:.4g}"
        state = {True: "met", False: "MISSED", None: "not measured"}[check["met"]]
        lines.append(f"  {check['name']:52} {value:>9} (target {check['target']})  {state}")
    if report.get("speed", {}).get("ratios"):
        lines.append("")
        for name, per_len in report["speed"]["ratios"].items():
            for r in per_len.values():
                lines.append(
                    f"  {name:28} prefill {r['prefill']:.2f}x (best {r['prefill_best']:.2f}x), "
                    f"decode {r['decode']:.2f}x (p50 {r['decode_p50']:.2f}x)"
                )
    if report.get("problems"):
        lines.append("")
        lines += [f"problem: {p}" for p in report["problems"]]
    return "\n".join(lines)


def targets(table: dict[str, dict[str, Any]], int4_labels: list[str]) -> list[dict[str, Any]]:
    g = table.get(GENAI, {})
    checks: list[dict[str, Any]] = []

    def add(name: str, value: float | None, target: str, ok: bool | None) -> None:
        checks.append({"name": name, "value": value, "target": target, "met": ok})

    for label in int4_labels:
        row = table.get(label, {})
        kl = row.get("mean_kl")
        ratio = kl / g["mean_kl"] if kl is not None and g.get("mean_kl") else None
        add(
            f"{label} mean KL / genai-int4's",
            ratio,
            f"<= {TARGET_INT4_KL_RATIO}",
            None if ratio is None else ratio <= TARGET_INT4_KL_RATIO,
        )
        size = row.get("size_ratio")
        add(
            f"{label} size / genai-int4's",
            size,
            f"<= {TARGET_INT4_SIZE_RATIO}",
            None if size is None else size <= TARGET_INT4_SIZE_RATIO,
        )
        dec = row.get("decode_ratio")
        via = f" (= {row['speed_from']}'s)" if row.get("speed_from") else ""
        add(
            f"{label} decode tok/s / genai-int4's{via}",
            dec,
            f">= {TARGET_INT4_DECODE_RATIO}",
            None if dec is None else dec >= TARGET_INT4_DECODE_RATIO,
        )
    kl8 = table.get("int8", {}).get("mean_kl")
    add("int8 mean KL", kl8, f"<= {TARGET_INT8_KL}", None if kl8 is None else kl8 <= TARGET_INT8_KL)
    return checks


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--eval-worker", nargs=4, metavar=("KIND", "PATH", "IDS", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", type=Path, default=Path("/work/real/ckpt"))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qe-quant-real"))
    ap.add_argument("--force", action="store_true", help="re-export even when a matching artifact exists")
    ap.add_argument(
        "--algorithms",
        default="default,rtn,rtn-asym,gptq-asym,awq-asym",
        help="int4 variants, comma-separated: rtn|clip|awq|gptq|default (the CLI's default), each with optional "
        "suffixes -asym, -sym, -e4, -e8 (--asymmetric, --symmetric, --embedding-bits 4|8), -i4 (--int8 none), "
        "-attn8, -qkv8, -o8, -down8, -head8 (--int8 of those modules)",
    )
    ap.add_argument("--no-int8", action="store_true", help="skip the int8 artifact")
    ap.add_argument("--block-size", type=int, default=None, help="pass --block-size N (default: the CLI's, 32)")
    ap.add_argument("--accuracy-level", type=int, default=None, help="pass --accuracy-level N (default: the CLI's, 4)")
    ap.add_argument("--max-length", type=int, default=None, help="pass --max-length N to our exports")
    ap.add_argument(
        "--ref",
        type=Path,
        default=None,
        help="use this fp32 artifact of ours as the reference instead of exporting W/fp32-all "
        "(a last-logits artifact is fed one token at a time)",
    )
    ap.add_argument("--text", type=Path, default=None, help="evaluation text file (default: the built-in text)")
    ap.add_argument("--chunk", type=int, default=256, help="teacher-forcing chunk (tokens per forward)")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument(
        "--speed-logits",
        choices=("last", "all"),
        default="last",
        help="last: time last-position-logit twins (ours --logits last, genai prune_lm_head=true); "
        "all: time the evaluation artifacts (both compute every position's logits)",
    )
    ap.add_argument(
        "--speed-artifacts",
        default="int8,int4-rtn",
        help="ours to time vs genai-int4, comma-separated labels; int4 = every algorithm. An int4 artifact "
        "not timed whose graph equals a timed one's (same ops, quantization settings and model bytes: "
        "only the weight values differ) is credited with that one's speed, marked in the table",
    )
    ap.add_argument("--prompt-length", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prefill-repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="seed of the speed runs' random prompts")
    ap.add_argument(
        "--reuse-eval",
        action="store_true",
        help="reuse W/eval-cache.json's metrics of an artifact whose model files, text ids, chunk and "
        "reference are unchanged (a re-run for the speed part)",
    )
    ap.add_argument("--keep-logits", action="store_true", help="keep W/logits/*.npy (default: only the reference's)")
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--check", action="store_true", help="exit 2 when a target is missed")
    return ap


def evaluation_text(args: Any, report: dict[str, Any]) -> tuple[Any, Path]:
    """The evaluation text's token ids (and the .npy they are saved to, for the workers)."""
    import numpy as np

    from qwen_export.runtime.tokenizer import Tokenizer

    text = (args.text or DEFAULT_TEXT_FILE).read_text(encoding="utf-8")
    ids = np.asarray(Tokenizer.from_dir(args.checkpoint).encode(text), np.int64)
    ids_path = args.workdir / "text_ids.npy"
    np.save(ids_path, ids)
    report["text"] = {
        "source": str(args.text) if args.text else "built-in",
        "tokens": int(len(ids)),
        "chars": len(text),
    }
    log(f"evaluation text: {len(ids)} tokens")
    return ids, ids_path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.eval_worker:
        kind, path, ids, out = args.eval_worker
        return accuracy.eval_main(kind, path, ids, out, args.chunk, args.threads)

    ckpt: Path = args.checkpoint
    if not (ckpt / "config.json").is_file():
        sys.exit(f"{ckpt}: no config.json (convert the GGUF first: qwen-export convert-gguf)")
    workdir: Path = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "host": harness.host(),
        "versions": harness.versions(("onnxruntime", "onnxruntime_genai", "qwen_export")),
        "loadavg_start": harness.loadavg(),
        "checkpoint": str(ckpt),
        "workdir": str(workdir),
        "chunk": args.chunk,
        "threads": args.threads,
        "prompt_length": args.prompt_length,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "prefill_repeats": args.prefill_repeats,
        "speed_logits": args.speed_logits,
        "problems": [],
    }
    ids, ids_path = evaluation_text(args, report)

    evals = eval_plan(args, ckpt, workdir)
    ready, failed = export_all(evals, args, report)
    report["reference"] = f"ours fp32 ({evals[0]['dir']})"
    evaluation = Evaluation(evals[0], ids, ids_path, args, report)
    evaluation.run(ready)  # one model at a time
    failed |= evaluation.failed
    table = evaluation.table
    add_sizes(table, ready, report)

    report["speed"] = {}
    if not args.skip_speed:
        speed_items, speed_failed = speed_plan(args, ready, table, report)
        failed |= speed_failed
        failed |= measure_speed(speed_items, args, table, report)
    credit_twins(table, report)
    order = ["fp32", "int8", *[f"int4-{a}" for a in algorithms(args)], GENAI]
    report["table"] = {k: table[k] for k in order if k in table}
    int4_labels = [f"int4-{a}" for a in algorithms(args) if f"int4-{a}" in table]
    report["targets"] = targets(table, int4_labels)
    missed = any(c["met"] is False for c in report["targets"])
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
