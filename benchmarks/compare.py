"""One checkpoint through our targets and through the anchors a user would pick instead.

One command, one checkpoint, one weight format, CPU, ``--threads`` (2) threads per engine:

1. our artifacts, each built unless its directory already holds one (``qwen-export export CKPT -o
   W/ours-ort-<w> --weights <w>`` and ``--target openvino`` into ``W/ours-ov-<w>``);

2. the anchors, each only when it is there; otherwise its row says ``not available: <why, and how
   to set it up>`` (never silently skipped):

   * ``ort-genai-<w>``: onnxruntime-genai's model builder (``python -m
     onnxruntime_genai.models.builder -i CKPT -o W/genai-<w> -p <w> -e cpu -c W/genai-cache
     --extra_options prune_lm_head=true``, built unless present) run by its ``og.Generator``;
   * ``optimum-ov-<w>``: an ``optimum-cli export openvino --weight-format <w>`` IR (``--optimum-ir
     DIR``, made in optimum-intel's own venv; see benchmarks/README.md) run by
     ``openvino_genai.LLMPipeline``;
   * ``llama.cpp-<quant>``: a GGUF (``--gguf FILE``) run by llama-cpp-python in its own venv
     (``--llama-python``, default /work/anchors/llamacpp-venv/bin/python);

3. accuracy (``--reference-logits REF.npy --text-ids IDS.npy``, as written by quant_real.py: our fp32
   artifact's every-position logits on a fixed text): every engine's logits teacher-forced on the
   same ids by ``accuracy.py`` (ours-ort and ort-genai through ONNX Runtime, the OpenVINO IRs
   through raw OpenVINO, llama.cpp with ``logits_all=True``), then mean KL(ref || model),
   top-1 agreement and perplexity (``accuracy.compare``); each logits file is deleted after;

4. speed: every engine in its own worker process; for each prompt length ``--warmup`` (1) + ``--repeats``
   (2) rounds, each round one greedy generation of exactly ``--new-tokens`` tokens per engine on the
   same random prompt (ordinary token ids), engines interleaved A B C A B C with the first one rotated
   each round (``interleave.measure_generations``). TTFT (prefill + first token), prefill tok/s = prompt
   / TTFT, decode tok/s = 1 / median time per output token (medians over the measured rounds), load
   time, the worker's peak RSS (VmHWM) and the model files' size on disk; the JSON also keeps each
   round's TTFT and decode rate (``ttft_all_ms``, ``decode_all_tok_s``): the spread behind a median.
   ``--processes K`` (1) repeats this K times with fresh worker processes (other prompts each pass,
   ``--seed`` + pass) and pools the rounds: one process of an engine can run steadily faster or
   slower than the next (memory placement), which more rounds in one process cannot average out;
   the JSON keeps each pass's decode median (``decode_by_process``);

5. prints one markdown table (engines x mean KL, top-1, ppl, size MiB, load s, peak RSS MiB, and TTFT
   ms, prefill and decode tok/s per prompt length) with, for each figure, the ratio of our best engine
   to the best anchor (for speed also its lowest and highest round by round: the two engines' runs
   on one prompt; JSON ``ratios[...]["rounds"]``); ``--markdown-out``, ``--json-out``, ``--plot
   FILE.png`` (decode tok/s and TTFT against prompt length, one line per engine).

    .venv/bin/python benchmarks/compare.py --checkpoint CKPT --weights int4 [--gguf FILE] [--optimum-ir DIR]
        [--workdir W] [--prompt-lengths 128,512] [--new-tokens 64] [--repeats 2] [--threads 2]
        [--reference-logits REF.npy --text-ids IDS.npy] [--markdown-out F] [--json-out F] [--plot F.png]
    # accuracy and speed as two runs (e.g. at the same time), then one table:
    ... --skip-speed --json-out ACC.json;  ... (no --reference-logits) --json-out SPEED.json
    .venv/bin/python benchmarks/compare.py --from-report SPEED.json --reuse-accuracy ACC.json [--markdown-out F] ...

The accuracy of a llama.cpp row is a floor when the checkpoint was converted from that very GGUF (as
/work/real/ckpt was): llama.cpp then runs the reference weights, every other row re-quantizes them.

Exit status 1 when one of our builds or any worker failed, else 0 (an anchor that is not set up is a
row, not a failure).
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

import accuracy
import harness
import interleave
import sessions
from artifacts import build, build_ours, genai_builder_cmd, ir_bytes, model_bytes, read_json

MiB = harness.MiB
LLAMA_PYTHON = Path("/work/anchors/llamacpp-venv/bin/python")
OPTIMUM_VENV = "/work/anchors/optimum-venv"
LLAMA_SETUP = (
    "python3 -m venv /work/anchors/llamacpp-venv && /work/anchors/llamacpp-venv/bin/pip install "
    "--no-cache-dir llama-cpp-python==0.3.36"
)
# lower is better for these; higher for the rest (top-1, tok/s)
LOWER_IS_BETTER = ("mean_kl", "ppl", "size_mib", "load_s", "rss_mib", "ttft_ms")
#: this script's worker kinds -> the sessions' kinds
SESSION_KINDS = {"llama": "llama", "ortgenai": "og"}


def log(msg: str) -> None:
    harness.log(msg)


# ----------------------------------------------------------------------------- engines
def engine_row(label: str, family: str, runtime: str, path: Path | None, size: int | None, **extra: Any) -> dict:
    return {"label": label, "family": family, "runtime": runtime, "path": str(path) if path else None,
            "bytes": size, "available": True, **extra}  # fmt: skip


def unavailable(label: str, family: str, runtime: str, why: str) -> dict:
    log(f"{label}: not available: {why}")
    return {"label": label, "family": family, "runtime": runtime, "available": False, "why": why}


def config_mismatch(ckpt: Path, other: Path) -> str | None:
    """Why ``other``/config.json is not the checkpoint's architecture (None when it is)."""
    a, b = read_json(ckpt / "config.json"), read_json(other / "config.json")
    if not b:
        return f"{other} has no config.json"
    keys = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size")
    diff = [f"{k} {b.get(k)} != {a.get(k)}" for k in keys if a.get(k) != b.get(k)]
    return f"{other} is not this checkpoint's architecture ({', '.join(diff)})" if diff else None


def gguf_arch_mismatch(ckpt: Path, gguf: Path) -> str | None:
    try:
        from qwen_export.export.gguf_import import gguf_config, open_gguf  # our reader: the header, no weights read

        cfg = gguf_config(open_gguf(gguf), gguf)
    except Exception as exc:  # a record, not a reason to refuse: llama.cpp reads it or says why
        reader = "qwen_export.export.gguf_import"
        log(f"could not read {gguf}'s header with {reader} ({type(exc).__name__}: {exc}); not checked")
        return None
    a = read_json(ckpt / "config.json")
    keys = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads")
    diff = [f"{k} {cfg.get(k)} != {a.get(k)}" for k in keys if k in cfg and cfg.get(k) != a.get(k)]
    return f"{gguf} is not this checkpoint's architecture ({', '.join(diff)})" if diff else None


def ours_rows(args: Any, workdir: Path, builds: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """Our two artifacts (built unless present): (rows, whether a build failed or holds something else)."""
    ckpt, w = args.checkpoint, args.weights
    rows, failed = [], False
    for target, tag, size_of in (("onnxruntime", "ort", model_bytes), ("openvino", "ov", ir_bytes)):
        label = f"ours-{tag}-{w}"
        out = workdir / label
        res = build_ours(ckpt, out, target, w, workdir, args.force)
        builds[label] = res
        manifest = read_json(out / "manifest.json")
        quant = (manifest.get("extra") or {}).get("quantization") or {}
        have = quant.get("weights", manifest.get("dtype"))
        if res.get("returncode", 0) != 0 or not manifest:
            failed = True
            rows.append(unavailable(label, "ours", target, f"export failed: {res.get('stderr_tail', '')[-300:]}"))
        elif have != w or manifest.get("target") != target:
            failed = True
            rows.append(unavailable(label, "ours", target, f"{out} holds {manifest.get('target')}/{have}, not {w}"))
        else:
            rows.append(engine_row(label, "ours", f"qwen-export ({target})", out, size_of(out), quantization=quant))
    return rows, failed


def extra_row(out: Path) -> dict[str, Any]:
    """A prebuilt artifact of ours given by --extra-ours (another layout of the same checkpoint)."""
    manifest = read_json(out / "manifest.json")
    if not manifest:
        return unavailable(f"ours-{out.name}", "ours", "?", f"{out} holds no qwen-export artifact")
    target = manifest.get("target", "onnxruntime")
    label = f"ours-{'ov' if target == 'openvino' else 'ort'}-{out.name}"
    quant = (manifest.get("extra") or {}).get("quantization") or {}
    size = ir_bytes(out) if target == "openvino" else model_bytes(out)
    return engine_row(label, "ours", f"qwen-export ({target})", out, size, quantization=quant)


def genai_row(args: Any, workdir: Path, builds: dict[str, Any]) -> dict[str, Any]:
    """onnxruntime-genai's builder output (built unless present, prune_lm_head=true)."""
    w = args.weights
    label = f"ort-genai-{w}"
    out = workdir / f"genai-{w}"
    if w not in ("int4", "int8", "fp16", "fp32"):
        return unavailable(label, "anchor", "onnxruntime-genai", f"the builder has no -p {w}")
    cmd = genai_builder_cmd(args.checkpoint, out, w, workdir / "genai-cache", prune=True)
    item = {"label": label, "kind": "genai", "dir": out, "command": cmd, "want": {"prune": True}}
    try:
        import onnxruntime_genai  # noqa: F401

        res = build(item, workdir, args.force)
    except ImportError as exc:
        res = {"returncode": -1, "stderr_tail": f"{exc}: pip install onnxruntime-genai==0.18.0"}
    builds[label] = res
    if res.get("returncode") == 0:
        return engine_row(label, "anchor", "onnxruntime-genai og.Generator", out, model_bytes(out))
    why = res.get("error") or res.get("stderr_tail", "")[-300:]
    return unavailable(label, "anchor", "onnxruntime-genai", f"builder failed: {why}")


def optimum_row(args: Any) -> dict[str, Any]:
    """optimum-intel's IR (--optimum-ir) run by openvino-genai."""
    ckpt, w = args.checkpoint, args.weights
    label = f"optimum-ov-{w}"
    how = (
        f"make it with `{OPTIMUM_VENV}/bin/optimum-cli export openvino --model {ckpt} --task "
        f"text-generation-with-past --weight-format {w} DIR` (optimum-intel's own venv, see benchmarks/README.md) "
        "and pass --optimum-ir DIR"
    )
    ir, rt = args.optimum_ir, "openvino-genai LLMPipeline"
    if ir is None:
        return unavailable(label, "anchor", rt, f"no optimum-intel IR given; {how}")
    if not (ir / "openvino_model.xml").is_file():
        return unavailable(label, "anchor", rt, f"{ir} has no openvino_model.xml; {how}")
    if why := config_mismatch(ckpt, ir):
        return unavailable(label, "anchor", rt, why)
    opt = read_json(ir / "openvino_config.json")
    return engine_row(label, "anchor", rt, ir, ir_bytes(ir), optimum_version=opt.get("optimum_version"))


def llama_row(args: Any) -> dict[str, Any]:
    """The checkpoint's GGUF (--gguf) run by llama-cpp-python in its own venv (--llama-python)."""
    gguf, py, rt = args.gguf, args.llama_python, "llama-cpp-python"
    quant_name = gguf.stem.rsplit("-", 1)[-1].upper() if gguf else "gguf"
    label = f"llama.cpp-{quant_name}"
    if gguf is None:
        return unavailable(label, "anchor", rt, "no GGUF for this checkpoint (pass --gguf FILE)")
    if not gguf.is_file():
        return unavailable(label, "anchor", rt, f"{gguf} does not exist")
    if not py.is_file():
        return unavailable(label, "anchor", rt, f"{py} missing; set it up: {LLAMA_SETUP}")
    probe = subprocess.run(
        [str(py), "-c", "import llama_cpp; print(llama_cpp.__version__)"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        why = f"`import llama_cpp` fails in {py} ({probe.stderr.strip()[-200:]}); set it up: {LLAMA_SETUP}"
        return unavailable(label, "anchor", rt, why)
    if why := gguf_arch_mismatch(args.checkpoint, gguf):
        return unavailable(label, "anchor", rt, why)
    version = probe.stdout.strip()
    return engine_row(label, "anchor", f"{rt} {version}", gguf, gguf.stat().st_size, llama_cpp_version=version)


def plan_engines(args: Any, workdir: Path) -> tuple[list[dict[str, Any]], dict[str, Any], bool]:
    """Every engine's row (available or why not), the builds, and whether one of ours failed."""
    builds: dict[str, Any] = {}
    rows, failed = ours_rows(args, workdir, builds)
    rows += [extra_row(d) for d in args.extra_ours or ()]
    rows += [genai_row(args, workdir, builds), optimum_row(args), llama_row(args)]
    return rows, builds, failed


def start_worker(row: dict[str, Any], args: Any, workdir: Path, n_ctx: int) -> harness.Worker:
    label, path = row["label"], Path(row["path"])
    if label.startswith("ours-"):
        return sessions.start(label, "ours-default", path, args.threads, workdir)  # what users run
    if label.startswith("optimum-"):
        return sessions.start(label, "ov-genai", path, args.threads, workdir, kv_cache=args.kv_cache)
    if label.startswith("llama.cpp"):
        return sessions.start(label, "llama", path, args.threads, workdir, n_ctx=n_ctx, python=str(args.llama_python))
    return sessions.start(label, "og", path, args.threads, workdir)


def evaluate(row: dict[str, Any], args: Any, workdir: Path) -> dict[str, Any]:
    """Teacher-forced logits of one engine on --text-ids, compared with --reference-logits, then deleted."""
    label, path = row["label"], Path(row["path"])
    log(f"accuracy of {label} (MemAvailable {harness.mem_available_mib():.0f} MiB)")
    python = None
    if "-ov-" in label:  # ours-ov / optimum-ov: raw OpenVINO, f32 inference and KV cache
        kind, chunk = "openvino", 256
    elif label.startswith("llama.cpp"):
        kind, chunk, python = "llama", 256, str(args.llama_python)
    else:  # ours-ort (last-position logits: one token at a time) / ort-genai (pruned lm_head: chunk 1)
        kind = "ours" if label.startswith("ours-") else "genai"
        chunk = 256 if kind == "ours" else 1
    return accuracy.evaluate(
        label, kind, path, args.reference_logits, args.text_ids, workdir,
        chunk=chunk, threads=args.threads, python=python,
    )  # fmt: skip


# ----------------------------------------------------------------------------- table
def figures(row: dict[str, Any], lengths: list[int]) -> dict[str, float | None]:
    acc = row.get("accuracy") or {}
    f: dict[str, float | None] = {
        "mean_kl": acc.get("mean_kl"),
        "top1": acc.get("top1"),
        "ppl": acc.get("ppl"),
        "size_mib": row["bytes"] / MiB if row.get("bytes") else None,
        "load_s": row.get("load_s"),
        "rss_mib": row.get("rss_mib"),
    }
    for n in lengths:
        s = (row.get("speed") or {}).get(str(n)) or {}
        f[f"ttft_ms@{n}"] = s.get("ttft_ms")
        f[f"prefill_tok_s@{n}"] = s.get("prefill_tokens_per_s")
        f[f"decode_tok_s@{n}"] = s.get("decode_tokens_per_s")
    return f


def best_ratios(rows: list[dict[str, Any]], lengths: list[int]) -> dict[str, dict[str, Any]]:
    """Per figure: our best engine / the best anchor (> 1 means ours is bigger: better for top-1 and tok/s)."""
    out: dict[str, dict[str, Any]] = {}
    keys = list(figures(rows[0], lengths)) if rows else []
    for key in keys:
        lower = key.split("@")[0] in LOWER_IS_BETTER
        pick = min if lower else max
        cand: dict[str, list[tuple[float, str]]] = {"ours": [], "anchor": []}
        for row in rows:
            v = figures(row, lengths)[key] if row["available"] else None
            if v is not None and v == v:
                cand[row["family"]].append((v, row["label"]))
        if cand["ours"] and cand["anchor"]:
            o, a = pick(cand["ours"]), pick(cand["anchor"])
            ratio = o[0] / a[0] if a[0] else None
            out[key] = {"ratio": ratio, "ours": o[1], "anchor": a[1], "lower_is_better": lower}
            by_label = {row["label"]: row for row in rows}
            rounds = round_ratios(by_label[o[1]], by_label[a[1]], key)
            if rounds:
                out[key]["rounds"] = harness.spread(rounds)
    return out


def round_ratios(ours: dict[str, Any], anchor: dict[str, Any], key: str) -> list[float]:
    """A speed figure's ratio round by round (the two engines' runs on the same prompt, neighbours in
    time), oriented as the median ratio is; [] for other figures or when the rounds do not pair."""
    name, _, length = key.partition("@")
    per = [((row.get("speed") or {}).get(length) or {}) for row in (ours, anchor)]
    field = "decode_all_tok_s" if name == "decode_tok_s" else "ttft_all_ms"
    o, a = (p.get(field) or [] for p in per)
    if not length or len(o) != len(a) or not all(o) or not all(a):
        return []
    if name == "prefill_tok_s":  # tokens per second: the inverse of TTFT's ratio
        return [y / x for x, y in zip(o, a, strict=True)]
    return [x / y for x, y in zip(o, a, strict=True)]


def fmt_value(key: str, v: float | None) -> str:
    if v is None or v != v:
        return "-"
    if key == "mean_kl":
        return f"{v:.4f}"
    if key == "top1":
        return f"{100 * v:.2f}%"
    if key == "ppl":
        return f"{v:.3f}"
    if key.startswith(("size", "rss", "ttft")):
        return f"{v:.0f}"
    if key == "load_s":
        return f"{v:.1f}"
    return f"{v:.1f}" if key.startswith("prefill") else f"{v:.2f}"


def processes_note(report: dict[str, Any]) -> str:
    k = report.get("processes") or 1
    return f" in each of {k} passes with fresh worker processes" if k > 1 else ""


def ratio_cell(r: dict[str, Any] | None) -> str:
    if not r or r["ratio"] is None:
        return "-"
    rounds = r.get("rounds")
    spread = f" ({rounds['min']:.2f}-{rounds['max']:.2f})" if rounds else ""
    return f"{r['ratio']:.2f}×{spread}"


def markdown(report: dict[str, Any]) -> str:
    lengths = report["prompt_lengths"]
    rows = report["engines"]
    keys = list(figures(rows[0], lengths))
    names = {"mean_kl": "mean KL", "top1": "top-1", "ppl": "ppl", "size_mib": "size MiB", "load_s": "load s",
             "rss_mib": "peak RSS MiB"}  # fmt: skip
    for n in lengths:
        names |= {f"ttft_ms@{n}": f"TTFT ms @{n}", f"prefill_tok_s@{n}": f"prefill tok/s @{n}",
                  f"decode_tok_s@{n}": f"decode tok/s @{n}"}  # fmt: skip
    lines = [
        f"`{report['checkpoint']}`, weights {report['weights']}, {report['threads']} threads, "
        f"{report['new_tokens']} new tokens, {report['repeats']} runs (+{report['warmup']} warm-up) per prompt "
        f"length{processes_note(report)}, interleaved; {report['machine']}",
        "",
        "| engine | runtime | " + " | ".join(names[k] for k in keys) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in keys) + " |",
    ]
    for row in rows:
        if not row["available"]:
            why = row["why"].replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {row['label']} | **not available**: {why} | " + " | ".join("-" for _ in keys) + " |")
            continue
        f = figures(row, lengths)
        lines.append(f"| {row['label']} | {row['runtime']} | " + " | ".join(fmt_value(k, f[k]) for k in keys) + " |")
    ratios = report.get("ratios") or {}
    cells = []
    for k in keys:
        cells.append(ratio_cell(ratios.get(k)))
    lines.append("| **ours best / best anchor** | | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Ratio = our best engine's figure ÷ the best anchor's (best = lowest for KL, ppl, size, load, RSS, "
        "TTFT; highest for top-1 and tok/s): below 1 is better for the first group, above 1 for the second. "
        "In brackets, for speed: the lowest and highest of the same ratio taken round by round (the two "
        "engines' runs on one prompt): the spread behind the median ratio."
    )
    pairs = [f"{names[k]}: {r['ours']} vs {r['anchor']}" for k, r in ratios.items()]
    if pairs:
        lines.append("Pairs: " + "; ".join(pairs) + ".")
    for row in rows:
        acc = row.get("accuracy") or {}
        if "error" in acc:
            lines.append(f"- {row['label']}: accuracy FAILED: {acc['error'][-300:]}")
        if row.get("speed_error"):
            lines.append(f"- {row['label']}: speed FAILED: {row['speed_error'][-300:]}")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = report["prompt_lengths"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for row in report["engines"]:
        speed = row.get("speed") or {}
        xs = [n for n in lengths if str(n) in speed]
        if not xs:
            continue
        style = "-o" if row["family"] == "ours" else "--s"
        ax1.plot(xs, [speed[str(n)]["decode_tokens_per_s"] for n in xs], style, label=row["label"])
        ax2.plot(xs, [speed[str(n)]["ttft_ms"] for n in xs], style, label=row["label"])
    ax1.set(xlabel="prompt tokens", ylabel="decode tok/s (median)", title="decode")
    ax2.set(xlabel="prompt tokens", ylabel="TTFT ms (median)", title="time to first token")
    for ax in (ax1, ax2):
        ax.set_xticks(lengths)
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    fig.suptitle(f"{Path(report['checkpoint']).name}, {report['weights']}, {report['threads']} threads", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    log(f"wrote {path}")


def save(report: dict[str, Any], args: Any) -> None:
    if args.json_out:
        harness.write_json(args.json_out, report)


def finish(report: dict[str, Any], args: Any) -> None:
    report["ratios"] = best_ratios(report["engines"], report["prompt_lengths"])
    table = markdown(report)
    report["markdown"] = table
    print("\n" + table, flush=True)
    if args.markdown_out:
        args.markdown_out.parent.mkdir(parents=True, exist_ok=True)
        args.markdown_out.write_text(table, encoding="utf-8")
    if args.plot and any(r.get("speed") for r in report["engines"]):
        plot(report, args.plot)
    save(report, args)


def render_merged(args: Any) -> int:
    """--from-report SPEED.json --reuse-accuracy ACC.json: one table from two runs of the same engines."""
    report = json.loads(args.from_report.read_text(encoding="utf-8"))
    acc = json.loads(args.reuse_accuracy.read_text(encoding="utf-8")) if args.reuse_accuracy else {}
    by_key = {(r["label"], r.get("path"), r.get("bytes")): r for r in acc.get("engines", [])}
    for row in report["engines"]:
        old = by_key.get((row["label"], row.get("path"), row.get("bytes"))) or {}
        if old.get("accuracy"):
            row["accuracy"] = old["accuracy"]
    report["accuracy_from"] = str(args.reuse_accuracy)
    for key in ("reference_logits", "text_ids"):
        report[key] = acc.get(key)
    finish(report, args)
    return 0


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    p.add_argument("--llama-eval", nargs=3, metavar=("GGUF", "IDS", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--n-ctx", type=int, default=2048, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--weights", default="int4", help="int4 (default), int8, fp16 or fp32")
    p.add_argument("--gguf", type=Path, default=None, help="the checkpoint's GGUF, for the llama.cpp anchor")
    p.add_argument("--optimum-ir", type=Path, default=None, help="optimum-cli export openvino output for CKPT")
    p.add_argument("--llama-python", type=Path, default=LLAMA_PYTHON, help="python of the llama-cpp-python venv")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/qe-compare"))
    p.add_argument("--prompt-lengths", default="128,512")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--processes", type=int, default=1,
        help="speed passes, each with fresh worker processes (--warmup + --repeats rounds each, pooled): "
        "one process of an engine can run steadily faster or slower than the next",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv-cache", default=None, help="KV_CACHE_PRECISION for the openvino-genai anchor (its default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference-logits", type=Path)
    p.add_argument("--text-ids", type=Path)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument(
        "--reuse-accuracy",
        type=Path,
        help="a previous --json-out: take an engine's accuracy from it when its label, path, size and the "
        "reference/ids are the same (e.g. after a --skip-speed run)",
    )
    p.add_argument(
        "--from-report",
        type=Path,
        help="re-render a previous --json-out (its speed figures) with the accuracy of --reuse-accuracy FILE: "
        "for a speed run and an accuracy run made separately (e.g. at the same time)",
    )
    p.add_argument(
        "--extra-ours",
        type=Path,
        action="append",
        metavar="DIR",
        help="also run this prebuilt artifact of ours (repeatable), e.g. another --int8/--block layout",
    )
    p.add_argument("--force", action="store_true", help="rebuild our artifacts and genai's even when present")
    p.add_argument("--markdown-out", type=Path)
    p.add_argument("--json-out", type=Path)
    p.add_argument("--plot", type=Path)
    return p


def run_accuracy(report: dict[str, Any], ready: list[dict[str, Any]], args: Any, workdir: Path) -> bool:
    """Every ready engine's accuracy (reused from --reuse-accuracy where it is the same); whether one failed."""
    previous = {}
    if args.reuse_accuracy and args.reuse_accuracy.is_file():
        old = json.loads(args.reuse_accuracy.read_text(encoding="utf-8"))
        same_ref = (old.get("reference_logits"), old.get("text_ids")) == (
            str(args.reference_logits), str(args.text_ids))  # fmt: skip
        previous = {(r["label"], r.get("path"), r.get("bytes")): r for r in old.get("engines", []) if same_ref}
    report |= {"reference_logits": str(args.reference_logits), "text_ids": str(args.text_ids)}
    failed = False
    for row in ready:
        old_row = previous.get((row["label"], row["path"], row["bytes"])) or {}
        if (old_row.get("accuracy") or {}).get("mean_kl") is not None:
            row["accuracy"] = old_row["accuracy"] | {"reused_from": str(args.reuse_accuracy)}
            log(f"{row['label']}: accuracy reused from {args.reuse_accuracy}")
            continue
        row["accuracy"] = evaluate(row, args, workdir)
        failed |= "error" in row["accuracy"]
        log(f"{row['label']}: {row['accuracy']}")
        save(report, args)
    return failed


def run_speed(report: dict[str, Any], ready: list[dict[str, Any]], args: Any, workdir: Path) -> bool:
    """Every ready engine in a worker, generations interleaved, ``--processes`` times with fresh
    workers (the rounds of every pass pooled); whether something failed."""
    passes: list[dict[str, Any]] = []
    failed = False
    for k in range(args.processes):
        if args.processes > 1:
            log(f"pass {k + 1} of {args.processes}: fresh workers")
        cases, error = speed_pass(ready, args, workdir, report["prompt_lengths"], args.seed + k)
        failed |= error is not None or any(row.get("speed_error") for row in ready)
        if error is not None:
            report["speed_error"] = error
        passes.append(cases)
    if any(passes):
        for row in ready:
            per_pass = [cases for cases in passes if cases]
            row["speed"] = pool_passes(per_pass, row["label"])
    return failed


def speed_pass(
    ready: list[dict[str, Any]], args: Any, workdir: Path, lengths: list[int], seed: int
) -> tuple[dict[str, Any], str | None]:
    """One pass: a worker per engine, ``--warmup`` + ``--repeats`` interleaved rounds per prompt
    length; the cases (``interleave.measure_generations``) and the measurement's error, if any (a
    worker that does not start is its row's ``speed_error``)."""
    n_ctx = max(lengths) + args.new_tokens + 16
    workers: list[harness.Worker] = []
    error, cases = None, {}
    for row in ready:
        log(f"loading {row['label']} (MemAvailable {harness.mem_available_mib():.0f} MiB)")
        try:
            w = start_worker(row, args, workdir, n_ctx)
        except RuntimeError as exc:
            row["speed_error"] = str(exc)
            continue
        row.setdefault("load_all_s", []).append(w.ready["load_s"])
        row["load_s"] = row["load_all_s"][0]
        workers.append(w)
    try:
        if workers:
            log("measuring " + ", ".join(w.label for w in workers) + " interleaved")
            cases = interleave.measure_generations(workers, lengths, args.new_tokens, args.repeats, args.warmup, seed)
    except RuntimeError as exc:
        log(f"measurement FAILED: {exc}")
        error = str(exc)
    finally:
        by_label = {r["label"]: r for r in ready}
        for w in workers:
            row = by_label[w.label]
            row["rss_mib"] = max(row.get("rss_mib") or 0, w.peak_rss_mib() or 0) or None
            w.close()
    return cases, error


def pool_passes(passes: list[dict[str, Any]], label: str) -> dict[str, Any]:
    """One engine's speed over every pass: each length's rounds pooled in pass order, the medians
    taken over all of them, and each pass's own median decode rate (``decode_by_process``): how far
    one process differs from the next."""
    out: dict[str, Any] = {}
    for length in passes[0] if passes else {}:
        runs = [cases[length][label] for cases in passes if label in cases.get(length, {})]
        if not runs:
            continue
        if len(runs) == 1:
            out[length] = runs[0]
            continue
        ttfts = [t for r in runs for t in r["ttft_all_ms"]]
        rates = [x for r in runs for x in r["decode_all_tok_s"]]
        ttft = statistics.median(ttfts)
        out[length] = {
            "ttft_ms": ttft,
            "ttft_all_ms": ttfts,
            "prefill_tokens_per_s": int(length) * 1e3 / ttft,
            "decode_tokens_per_s": 1.0 / statistics.median(1.0 / x for x in rates) if rates else float("nan"),
            "decode_all_tok_s": rates,
            "decode_by_process": [r["decode_tokens_per_s"] for r in runs],
            "greedy_tokens_matching_first_engine": [
                n for r in runs for n in r.get("greedy_tokens_matching_first_engine", [])
            ],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.worker:
        return sessions.serve(SESSION_KINDS[args.worker[0]], args.worker[1], args.threads, n_ctx=args.n_ctx)
    if args.llama_eval:
        return accuracy.eval_main("llama", *args.llama_eval, threads=args.threads)
    if args.from_report:
        return render_merged(args)
    if args.checkpoint is None:
        p.error("--checkpoint is required")
    if args.processes < 1:
        p.error(f"--processes must be at least 1, got {args.processes}")
    if bool(args.reference_logits) != bool(args.text_ids):
        p.error("--reference-logits and --text-ids go together")
    workdir: Path = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": [sys.executable, *sys.argv],
        "checkpoint": str(args.checkpoint),
        "weights": args.weights,
        "machine": harness.machine(),
        "loadavg_start": harness.loadavg(),
        "versions": harness.versions(("qwen_export", "onnxruntime", "onnxruntime_genai", "openvino", "openvino_genai")),
        "threads": args.threads,
        "prompt_lengths": [int(x) for x in args.prompt_lengths.split(",") if x.strip()],
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "processes": args.processes,
        "warmup": args.warmup,
        "seed": args.seed,
    }
    rows, report["builds"], failed = plan_engines(args, workdir)
    report["engines"] = rows
    ready = [r for r in rows if r["available"]]
    save(report, args)
    if args.reference_logits:
        failed |= run_accuracy(report, ready, args, workdir)
    if not args.skip_speed and ready:
        failed |= run_speed(report, ready, args, workdir)
    report["loadavg_end"] = harness.loadavg()
    finish(report, args)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
