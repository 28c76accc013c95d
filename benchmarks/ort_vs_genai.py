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

3. measure every engine in its own long-lived worker subprocess (``--worker``; commands and replies
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

``benchmarks/quant_real.py`` imports this module for its speed comparison (``Worker``, ``measure``,
``ratios``, ``run_logged``, ``log``, ``cli_path``, ``mem_available_mib``, ``vm_hwm_mib``): keep their
signatures.

Exit status: 1 when a build, export or worker failed (the error is printed), 2 with ``--check`` when
a target was missed, else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: Prompt ids are drawn below this (ordinary BPE tokens, no special tokens).
ORDINARY_TOKENS = 151643
TARGET_DECODE = 1.1
TARGET_PREFILL = 1.3
MiB = 2**20

#: Runs argv[2:] and writes {"returncode", "maxrss_kb"} of it to argv[1]: the command's own peak RSS
#: (ru_maxrss of a direct child would start at the parent's high-water mark).
_LAUNCHER = """
import json, resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
with open(sys.argv[1], "w") as fh:
    json.dump({"returncode": rc, "maxrss_kb": kb, "platform": sys.platform}, fh)
sys.exit(rc)
"""

_BUILD = """
import sys
from qwen_export.export.tiny import QWEN25_05B_SHAPE, make_checkpoint
shape = dict(QWEN25_05B_SHAPE) if sys.argv[2] == "0.5b" else dict(dtype="bfloat16", max_positions=2048)
make_checkpoint(sys.argv[1], seed=int(sys.argv[3]), init="transformers", **shape)
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cli_path() -> str:
    local = Path(sys.executable).with_name("qwen-export")
    if local.is_file():
        return str(local)
    found = shutil.which("qwen-export")
    if not found:
        sys.exit("qwen-export not found next to this Python or on PATH")
    return found


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def vm_hwm_mib() -> float:
    """Peak RSS of this process so far (Linux VmHWM), MiB; NaN where unavailable."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return float("nan")


def mem_available_mib() -> float:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return float("nan")


# ----------------------------------------------------------------------------- build and export
def run_logged(name: str, cmd: list[str], workdir: Path) -> dict[str, Any]:
    """Run ``cmd`` through the launcher; wall time, peak RSS, exit status and the output's tail."""
    log(f"{name}: " + " ".join(cmd))
    out_path, err_path = workdir / f"{name}.stdout.log", workdir / f"{name}.stderr.log"
    rusage_path = workdir / f"{name}.rusage.json"
    rusage_path.unlink(missing_ok=True)
    env = dict(os.environ, TERM="dumb", COLUMNS="200")
    t0 = time.perf_counter()
    with open(out_path, "wb") as so, open(err_path, "wb") as se:
        rc = subprocess.call([sys.executable, "-c", _LAUNCHER, str(rusage_path), *cmd], stdout=so, stderr=se, env=env)
    wall = time.perf_counter() - t0
    peak = None
    try:
        usage = json.loads(rusage_path.read_text(encoding="utf-8"))
        kb = int(usage["maxrss_kb"])
        peak = kb if usage.get("platform") == "darwin" else kb * 1024
    except (OSError, ValueError, KeyError):
        pass
    result = {
        "command": cmd,
        "returncode": rc,
        "wall_s": wall,
        "peak_rss_bytes": peak,
        "stdout_tail": out_path.read_text(errors="replace")[-3000:].strip(),
        "stderr_tail": err_path.read_text(errors="replace")[-6000:].strip(),
        "logs": [str(out_path), str(err_path)],
    }
    if rc != 0:
        log(f"{name} FAILED (exit {rc}) after {wall:.1f} s; stderr tail:\n{result['stderr_tail']}")
    else:
        log(f"{name}: done in {wall:.1f} s, peak RSS {peak / MiB if peak else float('nan'):.0f} MiB")
    return result


def checkpoint_ready(ckpt: Path) -> bool:
    return (ckpt / "config.json").is_file() and any(ckpt.glob("*.safetensors")) and (ckpt / "tokenizer.json").is_file()


def cli_has_fuse_flag() -> bool:
    """Whether ``qwen-export export`` takes ``--fuse/--no-fuse`` (being added to the CLI)."""
    try:
        text = subprocess.run(
            [cli_path(), "export", "--help"],
            capture_output=True,
            text=True,
            env=dict(os.environ, TERM="dumb", COLUMNS="200"),
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
        cmd = [cli_path(), "export", str(ckpt), "-o", str(out), "--overwrite", *flags]
        if max_length is not None:
            cmd += ["--max-length", str(max_length)]
        plan.append({"label": label, "kind": "ours", "dir": out, "command": cmd, "max_length": max_length})
    for variant in genai_variants:
        label = "genai" if variant == "default" else f"genai-{variant.replace('_lm_head', '')}"
        out = workdir / label
        cmd = [
            sys.executable, "-m", "onnxruntime_genai.models.builder",
            "-i", str(ckpt), "-o", str(out), "-p", "fp32", "-e", "cpu", "-c", str(workdir / f"{label}_cache"),
        ]  # fmt: skip
        if variant == "prune_lm_head":
            cmd += ["--extra_options", "prune_lm_head=true"]
        elif variant != "default":
            raise SystemExit(f"unknown genai variant {variant!r} (default, prune_lm_head)")
        plan.append({"label": label, "kind": "genai", "dir": out, "command": cmd, "variant": variant})
    return plan


def build_artifact(item: dict[str, Any], workdir: Path, reuse: bool) -> dict[str, Any]:
    out: Path = item["dir"]
    if reuse and artifact_ready(item["kind"], out, item.get("max_length")):
        log(f"{item['label']}: reusing {out}")
        result: dict[str, Any] = {"command": item["command"], "returncode": 0, "reused": True}
    else:
        if item["kind"] == "genai" and out.exists():
            shutil.rmtree(out)  # the builder writes into an existing directory; start clean
        result = run_logged(f"export-{item['label']}", item["command"], workdir)
        cache = workdir / f"{item['label']}_cache"
        if cache.exists():
            shutil.rmtree(cache)
        if result["returncode"] == 0 and not artifact_ready(item["kind"], out, item.get("max_length")):
            result["returncode"] = -1
            result["error"] = f"exit 0 but {out} lacks model.onnx or its config"
            log(f"{item['label']} FAILED: {result['error']}")
    if result["returncode"] == 0:
        result["artifact_bytes"] = dir_bytes(out)
        result["files"] = sorted((str(p.relative_to(out)), p.stat().st_size) for p in out.rglob("*") if p.is_file())
        if item["kind"] == "ours":
            manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
            result["passes"] = [p.get("name") for p in manifest.get("passes", []) if isinstance(p, dict)]
            result["export_phases_s"] = manifest.get("extra", {}).get("export_seconds")
            result["max_length"] = manifest.get("extra", {}).get("max_length")
            result["kv_cache"] = manifest.get("extra", {}).get("kv_cache")
    return result


# ----------------------------------------------------------------------------- workers
class _OursSession:
    """Greedy generation on our Engine, one step per call (as ``qwen_export.runtime.bench.run_once`` times it)."""

    def __init__(self, path: str, threads: int) -> None:
        from qwen_export.runtime.loader import RuntimeOptions, open_artifact

        self.engine = open_artifact(path, RuntimeOptions(threads=threads)).engine
        self.context = self.engine.capabilities.max_context
        self.tokens: list[int] = []

    def prefill(self, prompt: list[int], new_tokens: int) -> float:
        import numpy as np

        ids = np.asarray(prompt, np.int64)[None, :]
        self.engine.reset()
        start = time.perf_counter()
        logits = self.engine.forward(ids)
        token = int(np.argmax(logits[0, -1]))
        elapsed = time.perf_counter() - start
        self.tokens = [token]
        return elapsed

    def step(self) -> float:
        import numpy as np

        ids = np.array([[self.tokens[-1]]], np.int64)
        start = time.perf_counter()
        logits = self.engine.forward(ids)
        token = int(np.argmax(logits[0, -1]))
        elapsed = time.perf_counter() - start
        self.tokens.append(token)
        return elapsed

    def finish(self) -> list[int]:
        self.engine.reset()
        return self.tokens


class _GenaiSession:
    """Greedy generation with onnxruntime-genai's Generator, one token per call."""

    def __init__(self, path: str, threads: int) -> None:
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(path)
        config.clear_providers()  # CPU
        options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1} if threads else {}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.model = og.Model(config)
        self.context = int(json.loads((Path(path) / "genai_config.json").read_text())["model"]["context_length"])
        self.gen: Any = None
        self.prompt_len = self.total = 0

    def prefill(self, prompt: list[int], new_tokens: int) -> float:
        import numpy as np

        og = self.og
        self.prompt_len, self.total = len(prompt), len(prompt) + new_tokens
        params = og.GeneratorParams(self.model)
        # min_length = max_length: exactly new_tokens tokens, whatever the random weights emit (EOS too)
        params.set_search_options(max_length=self.total, min_length=self.total, do_sample=False, batch_size=1)
        self.gen = og.Generator(self.model, params)
        ids = np.asarray(prompt, np.int32)
        start = time.perf_counter()
        self.gen.append_tokens(ids)  # the prefill forward
        self.gen.generate_next_token()  # picks token 1 from the prefill logits
        return time.perf_counter() - start

    def step(self) -> float:
        start = time.perf_counter()
        self.gen.generate_next_token()  # forward of the previous token, then pick the next
        return time.perf_counter() - start

    def finish(self) -> list[int]:
        seq = [int(t) for t in self.gen.get_sequence(0)]
        self.gen = None
        return seq[self.prompt_len :]


def worker_main(kind: str, path: str, threads: int) -> int:
    """Serve JSON-line commands: prefill {prompt, new_tokens} -> {s}; step -> {s}; finish -> {tokens}; quit."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the protocol

    def reply(obj: dict[str, Any]) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    try:
        t0 = time.perf_counter()
        session: Any = _OursSession(path, threads) if kind == "ours" else _GenaiSession(path, threads)
        load_s = time.perf_counter() - t0
        reply({"ok": True, "load_s": load_s, "context": session.context, "rss_hwm_mib": vm_hwm_mib()})
    except Exception as exc:  # report the load failure to the parent, in one line, then exit
        import traceback

        traceback.print_exc()
        reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        return 1

    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg.get("cmd")
        if cmd == "quit":
            break
        try:
            if cmd == "prefill":
                reply({"ok": True, "s": session.prefill(msg["prompt"], int(msg["new_tokens"]))})
            elif cmd == "step":
                reply({"ok": True, "s": session.step()})
            elif cmd == "finish":
                reply({"ok": True, "tokens": session.finish(), "rss_hwm_mib": vm_hwm_mib()})
            else:
                reply({"ok": False, "error": f"unknown command {cmd!r}"})
        except Exception as exc:
            import traceback

            traceback.print_exc()
            reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    return 0


class Worker:
    """One engine in its own process (its own ORT thread pools and peak-RSS accounting)."""

    def __init__(self, label: str, kind: str, path: Path, threads: int, workdir: Path) -> None:
        self.label, self.kind = label, kind
        self.stderr_path = workdir / f"worker-{label}.stderr.log"
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in close()
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, str(path), "--threads", str(threads)]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True, bufsize=1
        )
        self.ready = self.recv()

    def recv(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            tail = self.stderr_path.read_text(errors="replace")[-3000:].strip()
            raise RuntimeError(f"worker {self.label} exited (status {self.proc.returncode}); stderr tail:\n{tail}")
        msg = json.loads(line)
        if not msg.get("ok"):
            tail = self.stderr_path.read_text(errors="replace")[-3000:].strip()
            raise RuntimeError(f"worker {self.label}: {msg.get('error')}\n{tail}")
        return msg

    def call(self, cmd: str, **fields: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **fields}) + "\n")
        self.proc.stdin.flush()
        return self.recv()

    def close(self) -> None:
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired, ValueError):
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


# ----------------------------------------------------------------------------- measure
def generate_interleaved(workers: list[Worker], prompt: list[int], new_tokens: int) -> dict[str, dict[str, Any]]:
    """One greedy generation on every worker, interleaved step by step.

    Every engine prefills in turn, then each decode step runs on every engine in turn (A, B, C, A,
    B, C, ...), so that a slow spell of a shared machine (a few hundred ms) hits all engines alike.
    Times are taken inside the workers, around the compute only (no IPC).
    """
    out: dict[str, dict[str, Any]] = {w.label: {"steps_s": []} for w in workers}
    for w in workers:
        out[w.label]["ttft_s"] = w.call("prefill", prompt=prompt, new_tokens=new_tokens)["s"]
    for _ in range(new_tokens - 1):
        for w in workers:
            out[w.label]["steps_s"].append(w.call("step")["s"])
    for w in workers:
        out[w.label]["tokens"] = w.call("finish")["tokens"]
    return out


def measure(
    workers: list[Worker],
    lengths: list[int],
    new_tokens: int,
    repeats: int,
    warmup: int,
    seed: int,
    prefill_repeats: int = 0,
) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    cases: dict[str, Any] = {}
    for length in lengths:
        ttfts: dict[str, list[float]] = {w.label: [] for w in workers}
        steps: dict[str, list[float]] = {w.label: [] for w in workers}
        rates: dict[str, list[float]] = {w.label: [] for w in workers}
        agree: dict[str, list[int]] = {w.label: [] for w in workers}
        for i in range(warmup + repeats):
            prompt = [int(t) for t in rng.integers(0, ORDINARY_TOKENS, length)]
            runs = generate_interleaved(workers, prompt, new_tokens)
            kind = "warm-up" if i < warmup else "run"
            for w in workers:
                r = runs[w.label]
                mean_ms = 1e3 * statistics.fmean(r["steps_s"])
                ttft_ms = r["ttft_s"] * 1e3
                log(f"  {length}+{new_tokens} {kind} {i + 1} {w.label}: TTFT {ttft_ms:.1f} ms, {mean_ms:.2f} ms/token")
                if i < warmup:
                    continue
                ttfts[w.label].append(r["ttft_s"])
                steps[w.label] += r["steps_s"]
                rates[w.label].append(len(r["steps_s"]) / sum(r["steps_s"]))
                # leading greedy tokens shared with the first engine: a check that all run the same model
                a, b = runs[workers[0].label]["tokens"], r["tokens"]
                n = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
                agree[w.label].append(n)
        # A prefill is one multi-second shot per engine, so a slow spell can hit one engine's and
        # not the others'; extra prefill-only rounds (order rotated each round) steady its median.
        for i in range(prefill_repeats):
            prompt = [int(t) for t in rng.integers(0, ORDINARY_TOKENS, length)]
            order = workers[i % len(workers) :] + workers[: i % len(workers)]
            for w in order:
                ttfts[w.label].append(w.call("prefill", prompt=prompt, new_tokens=new_tokens)["s"])
                w.call("finish")
            log(
                f"  {length} prefill-only {i + 1}: "
                + ", ".join(f"{w.label} {ttfts[w.label][-1] * 1e3:.0f} ms" for w in workers)
            )
        per_engine = {}
        for w in workers:
            ttft = statistics.median(ttfts[w.label])
            all_steps = steps[w.label]
            per_engine[w.label] = {
                "runs": repeats,
                "prefill_samples": len(ttfts[w.label]),
                "ttft_ms": ttft * 1e3,
                "ttft_ms_min": min(ttfts[w.label]) * 1e3,
                "ttft_ms_runs": [t * 1e3 for t in ttfts[w.label]],
                "prefill_tokens_per_s": length / ttft,
                "decode_tokens_per_s": statistics.median(rates[w.label]),
                "decode_ms_per_token_mean": 1e3 * statistics.fmean(all_steps),
                "decode_ms_per_token_p50": 1e3 * statistics.median(all_steps),
                "decode_ms_per_token_p90": 1e3 * float(np.percentile(all_steps, 90)),
                "greedy_tokens_matching_first_engine": agree[w.label],
            }
        cases[str(length)] = per_engine
    return cases


def ratios(cases: dict[str, Any], base: str, others: list[str]) -> dict[str, Any]:
    """base/other for prefill tok/s and decode tok/s, per prompt length."""
    out: dict[str, Any] = {}
    for other in others:
        per_len = {}
        for length, engines in cases.items():
            if base not in engines or other not in engines:
                continue
            b, o = engines[base], engines[other]
            per_len[length] = {
                "prefill": b["prefill_tokens_per_s"] / o["prefill_tokens_per_s"],
                # the same from the fastest prefill of each (the least disturbed by other jobs)
                "prefill_best": o["ttft_ms_min"] / b["ttft_ms_min"],
                "decode": b["decode_tokens_per_s"] / o["decode_tokens_per_s"],
                # the same from the median step (robust to a few slow steps on a shared machine)
                "decode_p50": o["decode_ms_per_token_p50"] / b["decode_ms_per_token_p50"],
            }
        out[f"{base}/{other}"] = per_len
    return out


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


def main(argv: list[str] | None = None) -> int:
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
    args = ap.parse_args(argv)

    if args.worker:
        return worker_main(args.worker[0], args.worker[1], args.threads)

    workdir: Path = args.workdir or Path("/tmp/qe-bench-genai" + ("-tiny" if args.shape == "tiny" else ""))
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = workdir / "checkpoint"
    lengths = [int(v) for v in args.prompt_lengths.split(",") if v.strip()]
    variants = [v.strip() for v in args.genai_variants.split(",") if v.strip()]
    if args.repeats < 1 or min(args.warmup, args.prefill_repeats) < 0 or args.new_tokens < 2 or min(lengths or [0]) < 1:
        ap.error("need --repeats >= 1, --warmup/--prefill-repeats >= 0, --new-tokens >= 2, positive prompt lengths")
    report: dict[str, Any] = {
        "host": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "versions": {},
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
    for mod in ("onnxruntime", "onnxruntime_genai", "qwen_export"):
        try:
            report["versions"][mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            report["versions"][mod] = None
    failed = False

    if args.skip_build:
        if not checkpoint_ready(ckpt):
            sys.exit(f"--skip-build: no checkpoint in {ckpt} (run once without --skip-build)")
        log(f"reusing checkpoint {ckpt}")
        report["build"] = {"reused": True}
    else:
        if ckpt.exists():
            shutil.rmtree(ckpt)
        build_cmd = [sys.executable, "-c", _BUILD, str(ckpt), args.shape, str(args.seed)]
        report["build"] = run_logged("build", build_cmd, workdir)
        if report["build"]["returncode"] != 0:
            print(summary(report | {"exports": {}}), flush=True)
            return 1
    report["checkpoint_files"] = sorted(p.name for p in ckpt.iterdir())

    fuse_flag = cli_has_fuse_flag()
    report["cli_has_fuse_flag"] = fuse_flag
    if not fuse_flag:
        log("qwen-export export has no --fuse/--no-fuse yet: measuring one artifact ('ours', the default export)")
    plan = export_plan(ckpt, workdir, variants, fuse_flag, args.max_length)
    report["exports"] = {}
    for item in plan:
        report["exports"][item["label"]] = build_artifact(item, workdir, args.reuse_artifacts)
    ready = [item for item in plan if report["exports"][item["label"]]["returncode"] == 0]
    failed |= len(ready) < len(plan)

    report["workers"], report["cases"], report["ratios"] = {}, {}, {}
    workers: list[Worker] = []
    try:
        for item in ready:
            log(f"loading {item['label']} in a worker (MemAvailable {mem_available_mib():.0f} MiB)")
            try:
                w = Worker(item["label"], item["kind"], item["dir"], args.threads, workdir)
            except RuntimeError as exc:
                log(f"{item['label']}: worker FAILED to load: {exc}")
                report["workers"][item["label"]] = {"error": str(exc)}
                failed = True
                continue
            if w.ready["context"] < max(lengths) + args.new_tokens:
                log(f"{item['label']}: context {w.ready['context']} < {max(lengths) + args.new_tokens}; skipped")
                report["workers"][item["label"]] = {"error": f"context {w.ready['context']} too short"}
                w.close()
                failed = True
                continue
            workers.append(w)
            report["workers"][item["label"]] = {"load_s": w.ready["load_s"], "rss_load_mib": w.ready["rss_hwm_mib"]}
        if workers:
            log("measuring: " + ", ".join(w.label for w in workers) + " round-robin")
            report["cases"] = measure(
                workers, lengths, args.new_tokens, args.repeats, args.warmup, args.seed, args.prefill_repeats
            )
    except RuntimeError as exc:
        log(f"measurement FAILED: {exc}")
        report["measure_error"] = str(exc)
        failed = True
    finally:
        for w in workers:
            # VmHWM of the worker after all runs: ask /proc directly (the worker may be gone)
            try:
                with open(f"/proc/{w.proc.pid}/status", encoding="ascii") as fh:
                    for line in fh:
                        if line.startswith("VmHWM:"):
                            report["workers"][w.label]["rss_hwm_mib"] = int(line.split()[1]) / 1024
            except OSError:
                pass
            w.close()

    labels = [w.label for w in workers]
    # ratios of our best artifact: fused, else the flagless default export, else unfused (when the
    # fused export failed, so that its failure still leaves a comparison with genai)
    ours = [lab for lab in ("fused", "ours", "unfused") if lab in labels]
    genai = [lab for lab in labels if lab.startswith("genai")]
    missed = False
    if ours and report["cases"]:
        others = genai + (["unfused"] if "unfused" in labels and ours[0] == "fused" else [])
        report["ratios"] = ratios(report["cases"], ours[0], others)
        if "genai" in genai:
            for r in report["ratios"][f"{ours[0]}/genai"].values():
                missed |= r["prefill"] < TARGET_PREFILL or r["decode"] < TARGET_DECODE
    report["targets"] = {"decode_vs_genai": TARGET_DECODE, "prefill_vs_genai": TARGET_PREFILL, "missed": missed}

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
