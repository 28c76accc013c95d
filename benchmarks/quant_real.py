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

2. accuracy: one fixed text (built in, ~600 tokens of code and English prose, or ``--text FILE``),
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

4. speed: ``--speed-artifacts`` (int8, int4-rtn) vs genai's int4 in worker subprocesses of
   ``ort_vs_genai.py`` (``--threads`` intra-op threads each), interleaved step by step: prefill of a
   ``--prompt-length`` (256) random-token prompt, then ``--new-tokens`` (64) greedy tokens, no early
   stop; ``--warmup`` + ``--repeats`` rounds plus ``--prefill-repeats`` prefill-only rounds. An int4
   artifact not timed whose graph equals a timed one's (same ops, MatMulNBits settings and model
   bytes; rtn, clip and awq differ in weight values only) is credited with its figures (marked);

5. prints one table (artifact x mean KL, top-1, ppl, size MiB, prefill tok/s, decode tok/s) and
   the target checks (int4 mean KL <= 0.5x genai int4's, int4 size <= 0.6x, int8 mean KL <= 0.005,
   int4 decode >= 1.0x genai int4's); ``--json-out FILE`` writes everything.

    .venv/bin/python benchmarks/quant_real.py [--checkpoint DIR] [--workdir DIR] [--force]
        [--algorithms rtn,clip,awq] [--text FILE] [--skip-speed] [--json-out FILE]

Exit status: 1 when an export, evaluation or worker failed (the error is printed), 2 with
``--check`` when a target was missed, else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ort_vs_genai as ovg  # noqa: E402  (workers, run_logged, measure: the fp32 comparison's machinery)

MiB = 2**20
TARGET_INT4_KL_RATIO = 0.5
TARGET_INT4_SIZE_RATIO = 0.6
TARGET_INT8_KL = 0.005
TARGET_INT4_DECODE_RATIO = 1.0
GENAI = "genai-int4"
MODEL_SUFFIXES = (".onnx", ".onnx.data", ".data")

# A fixed evaluation text: Python, a shell session, JSON and English prose (about 600 Qwen tokens).
DEFAULT_TEXT = '''\
import heapq
from dataclasses import dataclass, field


@dataclass(order=True)
class Task:
    priority: int
    name: str = field(compare=False)
    retries: int = field(default=0, compare=False)


class Scheduler:
    """Runs tasks by priority; a failed task is retried up to max_retries times."""

    def __init__(self, max_retries: int = 3) -> None:
        self.queue: list[Task] = []
        self.max_retries = max_retries
        self.done: list[str] = []

    def submit(self, name: str, priority: int = 10) -> None:
        heapq.heappush(self.queue, Task(priority, name))

    def run(self, handler) -> int:
        failures = 0
        while self.queue:
            task = heapq.heappop(self.queue)
            try:
                handler(task.name)
            except Exception as exc:
                failures += 1
                if task.retries < self.max_retries:
                    task.retries += 1
                    heapq.heappush(self.queue, Task(task.priority + 1, task.name, task.retries))
                else:
                    print(f"giving up on {task.name}: {exc}")
            else:
                self.done.append(task.name)
        return failures


def fibonacci(n: int) -> list[int]:
    a, b = 0, 1
    out = []
    for _ in range(n):
        out.append(a)
        a, b = b, a + b
    return out

$ git log --oneline -3
4f2a1c9 Fix off-by-one in the window slicing
$ python -m pytest -q tests/test_scheduler.py
....                                                                     [100%]
4 passed in 0.12s

{"name": "scheduler", "version": "1.4.2", "dependencies": {"numpy": ">=1.24"}, "license": "MIT"}

The river had been rising for three days before anyone in the village took it seriously. On the
first morning the water was only a little browner than usual, and the children threw sticks from
the bridge to see how fast they would travel. By the second evening the lower field was a shallow
lake, and the old miller, who had seen two floods in his lifetime, walked along the bank with a
lantern, measuring the height of the water against the stones he had marked years ago. He said
nothing at supper, but he moved the flour sacks to the upper floor before he went to bed.

A good benchmark answers one question and states it plainly. Before measuring anything, decide
what would change your mind: if the new method were ten percent slower, would you still use it?
Run every variant on the same machine, in the same order, many times, and report the spread as
well as the median. Most surprising results are explained by something mundane, such as a cold
cache, a background job, or a different input size, rather than by the idea being tested.
'''


def log(msg: str) -> None:
    ovg.log(msg)


def model_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.name.endswith(MODEL_SUFFIXES))


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


# ----------------------------------------------------------------------------- the plan
def ours_item(label: str, ckpt: Path, out: Path, weights: str, algorithm: str | None, logits: str, args: Any) -> dict:
    cmd = [ovg.cli_path(), "export", str(ckpt), "-o", str(out), "--overwrite", "--logits", logits]
    if weights != "fp32":
        cmd += ["--weights", weights, "--algorithm", algorithm or "rtn"]
        if args.block_size is not None:
            cmd += ["--block-size", str(args.block_size)]
        if args.accuracy_level is not None:
            cmd += ["--accuracy-level", str(args.accuracy_level)]
    if args.max_length is not None:
        cmd += ["--max-length", str(args.max_length)]
    want = {"weights": weights, "algorithm": algorithm, "logits": logits}
    return {"label": label, "kind": "ours", "dir": out, "command": cmd, "want": want}


def genai_item(label: str, ckpt: Path, out: Path, workdir: Path, prune: bool) -> dict:
    cmd = [
        sys.executable, "-m", "onnxruntime_genai.models.builder",
        "-i", str(ckpt), "-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(workdir / "genai-cache"),
    ]  # fmt: skip
    if prune:
        cmd += ["--extra_options", "prune_lm_head=true"]
    return {"label": label, "kind": "genai", "dir": out, "command": cmd, "want": {"prune": prune}}


def artifact_matches(item: dict) -> tuple[bool, str]:
    """Whether ``item['dir']`` already holds the artifact ``item`` describes (and why not)."""
    out: Path = item["dir"]
    if item["kind"] == "genai":
        if not ((out / "genai_config.json").is_file() and (out / "model.onnx").is_file()):
            return False, "no genai_config.json/model.onnx"
        return True, ""
    manifest = read_json(out / "manifest.json")
    if not manifest or not (out / "model.onnx").is_file():
        return False, "no manifest.json/model.onnx"
    want = item["want"]
    if manifest.get("logits") != want["logits"]:
        return False, f"logits={manifest.get('logits')}, want {want['logits']}"
    quant = (manifest.get("extra") or {}).get("quantization") or {}
    weights = quant.get("weights", manifest.get("dtype", "fp32"))
    if weights != want["weights"]:
        return False, f"weights={weights}, want {want['weights']}"
    if want["algorithm"] and quant.get("algorithm") != want["algorithm"]:
        return False, f"algorithm={quant.get('algorithm')}, want {want['algorithm']}"
    return True, ""


def graph_summary(path: Path) -> dict[str, Any]:
    """What the ONNX graph computes with: quantized ops and their settings, the embedding, lm_head, logits."""
    import onnx

    model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    ops: dict[str, int] = {}
    nbits: dict[str, int] = {}
    out: dict[str, Any] = {}
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMulNBits":
            zp = len(node.input) > 3 and bool(node.input[3])
            key = (
                f"bits={attrs.get('bits')} block={attrs.get('block_size')} "
                f"acc={attrs.get('accuracy_level', 0)} {'asym' if zp else 'sym'}"
            )
            nbits[key] = nbits.get(key, 0) + 1
            if "lm_head" in (node.name + node.input[1]).lower():
                out["lm_head"] = f"MatMulNBits {key}"
        if node.op_type in ("Gather", "GatherBlockQuantized") and node.input and node.input[0] in inits:
            t = inits[node.input[0]]
            if len(t.dims) == 2 or node.op_type == "GatherBlockQuantized":
                dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name
                bits = attrs.get("bits")
                out["embedding"] = f"{node.op_type} {dtype}" + (
                    f" bits={bits} block={attrs.get('block_size')}" if bits else ""
                )
        if node.op_type in ("MatMul", "Gemm") and "lm_head" in (node.name + "".join(node.input)).lower():
            out["lm_head"] = node.op_type + " (float)"
    out["matmulnbits"] = nbits
    out["ops"] = dict(sorted(ops.items()))
    for o in graph.output:
        if o.name == "logits":
            out["logits_shape"] = [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
    return out


def build(item: dict, workdir: Path, force: bool) -> dict[str, Any]:
    out: Path = item["dir"]
    ok, why = artifact_matches(item)
    if ok and not force:
        log(f"{item['label']}: reusing {out}")
        result: dict[str, Any] = {"command": item["command"], "returncode": 0, "reused": True}
    else:
        if out.exists() and not ok and why and (out / "model.onnx").exists():
            log(f"{item['label']}: {out} does not match ({why}); rebuilding")
        if item["kind"] == "genai" and out.exists():
            shutil.rmtree(out)  # the builder writes into an existing directory; start clean
        log(f"{item['label']}: exporting (MemAvailable {ovg.mem_available_mib():.0f} MiB)")
        result = ovg.run_logged(f"export-{out.name}", item["command"], workdir)
        cache = workdir / "genai-cache"
        if cache.exists():
            shutil.rmtree(cache)
        if result["returncode"] == 0:
            ok, why = artifact_matches(item)
            if not ok:
                result["returncode"] = -1
                result["error"] = f"exit 0 but {out}: {why}"
                log(f"{item['label']} FAILED: {result['error']}")
    if result["returncode"] == 0:
        result["model_bytes"] = model_bytes(out)
        result["files"] = sorted((p.name, p.stat().st_size) for p in out.iterdir() if p.is_file())
        try:
            result["graph"] = graph_summary(out)
        except Exception as exc:  # the summary is a record, never a reason to fail
            result["graph"] = {"error": f"{type(exc).__name__}: {exc}"}
        if item["kind"] == "ours":
            manifest = read_json(out / "manifest.json")
            result["quantization"] = (manifest.get("extra") or {}).get("quantization")
            result["max_length"] = (manifest.get("extra") or {}).get("max_length")
        else:
            config = read_json(out / "genai_config.json")
            decoder = (config.get("model") or {}).get("decoder") or {}
            result["genai_config"] = {
                "context_length": (config.get("model") or {}).get("context_length"),
                "session_options": decoder.get("session_options"),
                "inputs": decoder.get("inputs"),
                "past_present_share_buffer": (config.get("search") or {}).get("past_present_share_buffer"),
            }
    return result


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


# ----------------------------------------------------------------------------- evaluation worker
def eval_worker(kind: str, path: str, ids_path: str, out_path: str, chunk: int, threads: int) -> int:
    """Teacher-force the ids in ``ids_path`` through one model; save every position's logits (float32 .npy)."""
    import numpy as np

    ids = np.load(ids_path).astype(np.int64)
    n = len(ids)
    t0 = time.perf_counter()
    if kind == "ours":
        from qwen_export.runtime.loader import RuntimeOptions, open_artifact

        engine = open_artifact(path, RuntimeOptions(threads=threads)).engine
        full = engine.capabilities.full_logits
        vocab = engine.capabilities.vocab_size
        load_s = time.perf_counter() - t0
        out = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.float32, shape=(n, vocab))
        engine.reset()
        t1 = time.perf_counter()
        if full:
            for a in range(0, n, chunk):
                out[a : a + chunk] = engine.forward(ids[None, a : a + chunk])[0]
        else:  # a last-position-logits artifact: one token at a time
            for a in range(n):
                out[a] = engine.forward(ids[None, a : a + 1])[0, -1]
    else:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(Path(path) / "model.onnx"), so, providers=["CPUExecutionProvider"])
        config = read_json(Path(path) / "genai_config.json")
        head = int(config["model"]["decoder"]["head_size"])
        inputs = {i.name: i for i in sess.get_inputs()}
        past_names = sorted(
            (k for k in inputs if k.startswith("past_key_values.")),
            key=lambda k: (int(k.split(".")[1]), k.split(".")[2]),
        )
        present_names = ["present." + k[len("past_key_values.") :] for k in past_names]
        kv_heads = inputs[past_names[0]].shape[1]
        fdtype = np.float16 if "float16" in inputs[past_names[0]].type else np.float32
        vocab = int(config["model"]["vocab_size"])
        load_s = time.perf_counter() - t0
        out = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.float32, shape=(n, vocab))
        past = {k: np.zeros((1, int(kv_heads), 0, head), fdtype) for k in past_names}
        t1 = time.perf_counter()
        done = 0
        while done < n:
            step = ids[done : done + chunk]
            feed: dict[str, Any] = {
                "input_ids": step[None, :],
                "attention_mask": np.ones((1, done + len(step)), np.int64),
            }
            if "position_ids" in inputs:
                feed["position_ids"] = np.arange(done, done + len(step), dtype=np.int64)[None, :]
            feed.update(past)
            res = sess.run(["logits", *present_names], feed)
            logits = res[0][0]
            if logits.shape[0] != len(step):
                raise RuntimeError(f"{path}: logits for {logits.shape[0]} positions, fed {len(step)} (pruned lm_head?)")
            out[done : done + len(step)] = logits.astype(np.float32)
            past = dict(zip(past_names, res[1:], strict=True))
            done += len(step)
    run_s = time.perf_counter() - t1
    out.flush()
    del out
    print(json.dumps({"load_s": load_s, "run_s": run_s, "rss_hwm_mib": ovg.vm_hwm_mib()}), flush=True)
    return 0


def run_eval(label: str, kind: str, path: Path, ids_path: Path, workdir: Path, chunk: int, threads: int) -> dict:
    out = workdir / "logits" / f"{label}.npy"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, os.path.abspath(__file__), "--eval-worker", kind, str(path), str(ids_path), str(out),
        "--chunk", str(chunk), "--threads", str(threads),
    ]  # fmt: skip
    log(f"evaluating {label} (MemAvailable {ovg.mem_available_mib():.0f} MiB)")
    result = ovg.run_logged(f"eval-{label}", cmd, workdir)
    if result["returncode"] == 0:
        try:
            result.update(json.loads(result["stdout_tail"].strip().splitlines()[-1]))
        except (ValueError, IndexError):
            pass
        result["logits_path"] = str(out)
    return result


def eval_key(path: Path, ids: Any, chunk: int, ref_key: str | None) -> str:
    """What an evaluation depends on: the model file's identity, the token ids, the chunk, the reference."""
    import hashlib

    model = path / "model.onnx"
    st = model.stat() if model.is_file() else None
    ident = f"{path.resolve()}|{st.st_mtime_ns if st else 0}|{model_bytes(path) if st else 0}"
    digest = hashlib.sha256(ids.tobytes()).hexdigest()[:16]
    return f"{ident}|ids={digest}|chunk={chunk}|ref={ref_key}"


def compare(ref_path: Path, path: Path, ids: Any, block: int = 32) -> dict[str, Any]:
    """Mean/max KL(ref || model), top-1 agreement with ref, and the model's perplexity on ``ids``."""
    import numpy as np

    ref = np.load(ref_path, mmap_mode="r")
    mod = np.load(path, mmap_mode="r")
    if ref.shape != mod.shape:
        raise RuntimeError(f"{path}: logits {mod.shape}, reference {ref.shape}")
    n = ref.shape[0]
    kls, top1, nll = [], [], []
    for a in range(0, n, block):
        r = np.asarray(ref[a : a + block], np.float64)
        m = np.asarray(mod[a : a + block], np.float64)
        lr = r - r.max(-1, keepdims=True)
        lr -= np.log(np.exp(lr).sum(-1, keepdims=True))
        lm = m - m.max(-1, keepdims=True)
        lm -= np.log(np.exp(lm).sum(-1, keepdims=True))
        kls.append((np.exp(lr) * (lr - lm)).sum(-1))
        top1.append(r.argmax(-1) == m.argmax(-1))
        pos = np.arange(a, min(a + block, n - 1))
        if len(pos):
            nll.append(-lm[pos - a, ids[pos + 1]])
    kl = np.concatenate(kls)
    nll_all = np.concatenate(nll)
    return {
        "positions": int(n),
        "mean_kl": float(kl.mean()),
        "median_kl": float(np.median(kl)),
        "p99_kl": float(np.percentile(kl, 99)),
        "max_kl": float(kl.max()),
        "top1": float(np.concatenate(top1).mean()),
        "ppl": float(np.exp(nll_all.mean())),
    }


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
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--eval-worker", nargs=4, metavar=("KIND", "PATH", "IDS", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", type=Path, default=Path("/work/real/ckpt"))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qe-quant-real"))
    ap.add_argument("--force", action="store_true", help="re-export even when a matching artifact exists")
    ap.add_argument("--algorithms", default="rtn,clip,awq", help="int4 algorithms (comma-separated)")
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
    args = ap.parse_args(argv)

    if args.eval_worker:
        kind, path, ids, out = args.eval_worker
        return eval_worker(kind, path, ids, out, args.chunk, args.threads)

    import numpy as np

    from qwen_export.runtime.tokenizer import Tokenizer

    ckpt: Path = args.checkpoint
    if not (ckpt / "config.json").is_file():
        sys.exit(f"{ckpt}: no config.json (convert the GGUF first: qwen-export convert-gguf)")
    workdir: Path = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "host": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "versions": {},
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
    for mod in ("onnxruntime", "onnxruntime_genai", "qwen_export"):
        try:
            report["versions"][mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            report["versions"][mod] = None
    failed = False

    # -- text
    text = args.text.read_text(encoding="utf-8") if args.text else DEFAULT_TEXT
    ids = np.asarray(Tokenizer.from_dir(ckpt).encode(text), np.int64)
    ids_path = workdir / "text_ids.npy"
    np.save(ids_path, ids)
    report["text"] = {
        "source": str(args.text) if args.text else "built-in",
        "tokens": int(len(ids)),
        "chars": len(text),
    }
    log(f"evaluation text: {len(ids)} tokens")

    # -- exports for the evaluation
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    evals: list[dict] = []
    if args.ref is not None:
        ref_item = {"label": "fp32", "kind": "ours", "dir": args.ref, "command": ["(given: --ref)"], "want": None}
    else:
        ref_item = ours_item("fp32", ckpt, workdir / "fp32-all", "fp32", None, "all", args)
    evals.append(ref_item)
    if not args.no_int8:
        evals.append(ours_item("int8", ckpt, workdir / "int8-rtn-all", "int8", "rtn", "all", args))
    for algo in algorithms:
        evals.append(ours_item(f"int4-{algo}", ckpt, workdir / f"int4-{algo}-all", "int4", algo, "all", args))
    evals.append(genai_item(GENAI, ckpt, workdir / "genai-int4", workdir, prune=False))

    report["exports"] = {}
    ready: list[dict] = []
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
            res = build(item, workdir, args.force)
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
    report["reference"] = f"ours fp32 ({ref_item['dir']})"

    # -- accuracy, one model at a time
    table: dict[str, dict[str, Any]] = {}
    report["eval"] = {}
    ref_logits = None
    cache_path = workdir / "eval-cache.json"
    cache = read_json(cache_path) if args.reuse_eval else {}
    ref_key = None
    for item in ready:
        key = eval_key(item["dir"], ids, args.chunk, ref_key)
        if item is ref_item:
            ref_key = key
        if args.reuse_eval and key in cache:
            res = dict(cache[key], reused=True)
            report["eval"][item["label"]] = res
            table[item["label"]] = dict(res["metrics"])
            m = res["metrics"]
            log(
                f"{item['label']}: reusing its evaluation: mean KL {m['mean_kl']:.5f}, top-1 {m['top1']:.2%}, "
                f"ppl {m['ppl']:.3f}"
            )
            continue
        if ref_logits is None and item is not ref_item:
            ref_res = run_eval(
                ref_item["label"], ref_item["kind"], ref_item["dir"], ids_path, workdir, args.chunk, args.threads
            )
            if ref_res["returncode"] != 0:
                failed = True
                report["problems"].append(f"reference evaluation failed: {ref_res['stderr_tail'][-400:]}")
                break
            ref_logits = Path(ref_res["logits_path"])
        res = run_eval(item["label"], item["kind"], item["dir"], ids_path, workdir, args.chunk, args.threads)
        report["eval"][item["label"]] = res
        if res["returncode"] != 0:
            failed = True
            report["problems"].append(f"{item['label']}: evaluation failed: {res['stderr_tail'][-400:]}")
            if item is ref_item:
                break
            continue
        path = Path(res["logits_path"])
        if item is ref_item:
            ref_logits = path
        assert ref_logits is not None
        metrics = compare(ref_logits, path, ids)
        res["metrics"] = metrics
        table[item["label"]] = dict(metrics)
        cache[key] = {k: v for k, v in res.items() if k in ("metrics", "load_s", "run_s", "rss_hwm_mib", "wall_s")}
        cache_path.write_text(json.dumps(cache, indent=1) + "\n", encoding="utf-8")
        log(
            f"{item['label']}: mean KL {metrics['mean_kl']:.5f}, top-1 {metrics['top1']:.2%}, "
            f"ppl {metrics['ppl']:.3f} (forward {res.get('run_s', float('nan')):.1f} s)"
        )
        if path != ref_logits and not args.keep_logits:
            path.unlink(missing_ok=True)
    for item in ready:
        row = table.setdefault(item["label"], {})
        size = report["exports"][item["label"]].get("model_bytes")
        row["size_mib"] = size / MiB if size else None
    gsize = table.get(GENAI, {}).get("size_mib")
    for row in table.values():
        row["size_ratio"] = row["size_mib"] / gsize if row.get("size_mib") and gsize else None

    # -- speed
    report["speed"] = {}
    int4_labels = [f"int4-{a}" for a in algorithms if f"int4-{a}" in table]
    if not args.skip_speed:
        wanted: list[str] = []
        for s in (x.strip() for x in args.speed_artifacts.split(",")):
            if s == "int4":
                wanted += int4_labels
            elif s and s in table:
                wanted.append(s)
        by_label = {item["label"]: item for item in ready}
        speed_items: list[dict] = []
        for label in wanted + [GENAI]:
            item = by_label.get(label)
            if item is None:
                continue
            if args.speed_logits == "last":
                if item["kind"] == "genai":
                    item = genai_item(GENAI, ckpt, workdir / "genai-int4-prune", workdir, prune=True)
                else:
                    w = item["want"]
                    item = ours_item(label, ckpt, workdir / f"{item['dir'].name.removesuffix('-all')}-last",
                                     w["weights"], w["algorithm"], "last", args)  # fmt: skip
                res = build(item, workdir, args.force)
                report["exports"][f"{label} (speed)"] = res
                if res["returncode"] != 0:
                    failed = True
                    report["problems"].append(f"{label}: speed export failed")
                    continue
            speed_items.append(item)
        workers: list[ovg.Worker] = []
        try:
            for item in speed_items:
                log(
                    f"loading {item['label']} ({item['dir']}) in a worker "
                    f"(MemAvailable {ovg.mem_available_mib():.0f} MiB)"
                )
                try:
                    w = ovg.Worker(item["label"], item["kind"], item["dir"], args.threads, workdir)
                except RuntimeError as exc:
                    log(f"{item['label']}: worker FAILED to load: {exc}")
                    report["problems"].append(f"{item['label']}: speed worker failed to load")
                    failed = True
                    continue
                workers.append(w)
            if len(workers) >= 1:
                log("measuring: " + ", ".join(w.label for w in workers) + " round-robin")
                cases = ovg.measure(
                    workers, [args.prompt_length], args.new_tokens, args.repeats, args.warmup, args.seed,
                    args.prefill_repeats,
                )  # fmt: skip
                report["speed"]["cases"] = cases
                engines = cases[str(args.prompt_length)]
                labels = [w.label for w in workers]
                if GENAI in labels:
                    report["speed"]["ratios"] = {}
                    for lab in labels:
                        if lab != GENAI:
                            report["speed"]["ratios"].update(ovg.ratios(cases, lab, [GENAI]))
                for lab, r in engines.items():
                    row = table.setdefault(lab, {})
                    row["prefill_tok_s"] = r["prefill_tokens_per_s"]
                    row["decode_tok_s"] = r["decode_tokens_per_s"]
                    if GENAI in engines and lab != GENAI:
                        row["decode_ratio"] = r["decode_tokens_per_s"] / engines[GENAI]["decode_tokens_per_s"]
                        row["prefill_ratio"] = r["prefill_tokens_per_s"] / engines[GENAI]["prefill_tokens_per_s"]
                    row["speed_artifact"] = str(next(i["dir"] for i in speed_items if i["label"] == lab))
                    row["greedy_tokens_matching_first"] = r["greedy_tokens_matching_first_engine"]
        except RuntimeError as exc:
            log(f"speed measurement FAILED: {exc}")
            report["problems"].append(f"speed measurement failed: {exc}")
            failed = True
        finally:
            for w in workers:
                try:
                    with open(f"/proc/{w.proc.pid}/status", encoding="ascii") as fh:
                        for line in fh:
                            if line.startswith("VmHWM:"):
                                report["speed"].setdefault("rss_hwm_mib", {})[w.label] = int(line.split()[1]) / 1024
                except OSError:
                    pass
                w.close()

    # an int4 artifact not timed whose graph equals a timed one's runs the same kernels on the same
    # shapes (only the weight values differ): credit it with that one's speed, marked as such
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
    order = ["fp32", "int8", *[f"int4-{a}" for a in algorithms], GENAI]
    report["table"] = {k: table[k] for k in order if k in table}
    report["targets"] = targets(table, int4_labels)
    missed = any(c["met"] is False for c in report["targets"])

    print("\n" + summary(report), flush=True)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        log(f"wrote {args.json_out}")
    if failed:
        return 1
    return 2 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
