"""The benchmarks' shared harness: launching and measuring processes, workers, statistics, output.

Convention: every script in ``benchmarks/`` runs as a file, ``.venv/bin/python benchmarks/<script>.py``
(from any directory). Python puts the script's own directory first on ``sys.path``, so the shared
modules import by their plain names (``import harness``), with no ``sys.path`` edits; worker and
evaluation subprocesses are started the same way (``python benchmarks/sessions.py ...``).
``benchmarks/`` is not a package: ``python -m benchmarks.x`` is not supported.

The shared modules:

* ``harness`` (this one): log lines and JSON reports, host facts and versions, load average,
  spread statistics, peak RSS (``/proc`` VmHWM, ``getrusage`` through a launcher, psutil polling),
  ``run_logged`` (a command in its own process, its own peak RSS) and the JSON-line worker protocol
  (``Worker`` on the parent's side, ``serve`` on the worker's);
* ``sessions``: the engines a worker runs (ours, onnxruntime-genai, openvino-genai, llama.cpp);
* ``interleave``: the interleaved speed measurements over several workers;
* ``accuracy``: teacher-forced logits in a subprocess, KL / top-1 / perplexity against a reference;
* ``artifacts``: exports (ours, onnxruntime-genai's builder) and what they hold.

Top-level imports here are the standard library only: a worker may run in another virtual
environment (llama.cpp's) that has neither numpy nor qwen_export.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

MiB = 2**20
#: Prompt ids are drawn below this (ordinary BPE tokens, no special tokens).
ORDINARY_TOKENS = 151643
BENCHMARKS = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS.parent
#: Set for every launched command: no colour codes, wide help and progress text.
PLAIN_ENV = {"TERM": "dumb", "COLUMNS": "200"}


# ----------------------------------------------------------------------------- output
def log(msg: str, *, file: IO[str] | None = None) -> None:
    """``[HH:MM:SS] msg`` on stdout (or ``file``), flushed."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=file or sys.stdout, flush=True)


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON (anything else as its str) to ``path``, creating its directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")


def host() -> dict[str, Any]:
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def versions(modules: Iterable[str]) -> dict[str, str | None]:
    """``__version__`` of each module, None when it does not import or has none."""
    out: dict[str, str | None] = {}
    for mod in modules:
        try:
            out[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            out[mod] = None
    return out


def loadavg() -> tuple[float, float, float] | None:
    """The 1-, 5- and 15-minute load averages now (None where the platform has none).

    Record it before and after a run (``loadavg_start``/``loadavg_end``): on a shared machine it
    says how much other jobs competed with the measurement."""
    try:
        return os.getloadavg()
    except OSError:
        return None


# ----------------------------------------------------------------------------- statistics
def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile, linear interpolation between closest ranks (numpy's default)."""
    data = sorted(values)
    if not data:
        raise ValueError("percentile of no values")
    pos = (len(data) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def spread(values: Sequence[float]) -> dict[str, float]:
    """min / median / max and the count: how far repeated measurements of one figure disagree."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def leading_agreement(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two greedy continuations share (a check that two engines run one model)."""
    return next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


# ----------------------------------------------------------------------------- memory
def _status_kib(pid: int | str, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def peak_rss_mib(pid: int | str = "self") -> float | None:
    """Peak RSS so far of a process (Linux VmHWM), MiB; None where unavailable (or the process is gone)."""
    kib = _status_kib(pid, "VmHWM")
    return None if kib is None else kib / 1024


def mem_available_mib() -> float:
    """MemAvailable of the machine, MiB; NaN where unavailable."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return float("nan")


def maxrss_bytes(who: int) -> int:
    """``getrusage(who).ru_maxrss`` in bytes (KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(who).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def rss_mib() -> float:
    """Current RSS of this process after a garbage collection (psutil), MiB."""
    import gc

    import psutil

    gc.collect()
    return psutil.Process().memory_info().rss / MiB


class TreePoller:
    """Sample the summed RSS of a process and its descendants (a cross-check of getrusage)."""

    def __init__(self, pid: int, interval: float = 0.05, cap_bytes: int | None = None) -> None:
        self.pid, self.interval = pid, interval
        self.peak_bytes = 0
        # cap_bytes: kill the whole tree once its summed RSS passes this (a run that would take the
        # machine's memory); capped_bytes is the sample that did it
        self.cap_bytes, self.capped_bytes = cap_bytes, 0
        # sampled peaks of one process's RssAnon (heap, anonymous mappings) and RssFile (mapped files:
        # page cache the kernel can drop), the largest in the tree (not summed: a forked child shares
        # its parent's pages): an engine that mmaps its weights shows up in the second
        self.peak_anon_bytes = self.peak_file_bytes = 0
        self.samples = 0
        self.max_procs = 0
        # (seconds since start, summed tree RSS MiB, root VmHWM MiB): shows when the peak happens and
        # whether it is a spike too short for polling (VmHWM jumps while sampled RSS stays low).
        self.timeline: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreePoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        t0 = time.perf_counter()
        while not self._stop.is_set():
            total = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            anon = max((_status_kib(p.pid, "RssAnon") or 0) * 1024 for p in procs)
            mapped = max((_status_kib(p.pid, "RssFile") or 0) * 1024 for p in procs)
            self.peak_anon_bytes = max(self.peak_anon_bytes, anon)
            self.peak_file_bytes = max(self.peak_file_bytes, mapped)
            self.samples += 1
            self.max_procs = max(self.max_procs, len(procs))
            self.peak_bytes = max(self.peak_bytes, total)
            hwm = max((_status_kib(p.pid, "VmHWM") or 0) * 1024 for p in procs[1:] or procs)  # the launched
            self.timeline.append((round(time.perf_counter() - t0, 3), round(total / MiB, 1), round(hwm / MiB, 1)))
            if self.cap_bytes and total > self.cap_bytes:
                self.capped_bytes = total
                kill_tree(procs)
                break
            self._stop.wait(self.interval)

    def facts(self, min_jump_mib: float = 200.0) -> dict[str, Any]:
        """The poll's figures for a report, and the moments VmHWM rose by >= min_jump_mib between samples."""
        jumps = [
            {"t_s": t_b, "hwm_before_mib": h_a, "hwm_after_mib": h_b, "sampled_rss_mib": rss_b}
            for (_, _, h_a), (t_b, rss_b, h_b) in zip(self.timeline[:-1], self.timeline[1:], strict=True)
            if h_b - h_a >= min_jump_mib
        ]
        return {
            "peak_rss_psutil_tree_bytes": self.peak_bytes,
            "peak_rss_anon_bytes": self.peak_anon_bytes,
            "peak_rss_file_bytes": self.peak_file_bytes,
            "psutil_samples": self.samples,
            "max_processes_in_tree": self.max_procs,
            "vm_hwm_last_sample_bytes": int(self.timeline[-1][2] * MiB) if self.timeline else 0,
            "vm_hwm_jumps": jumps,
            "rss_timeline": self.timeline,
        }


def kill_tree(procs: Sequence[Any]) -> None:
    """SIGKILL every psutil process in ``procs`` (children first); gone ones are skipped."""
    import psutil

    for p in reversed(procs):
        try:
            p.kill()
        except psutil.Error:
            pass


# ----------------------------------------------------------------------------- launching
#: Runs argv[2:] and writes {"returncode", "maxrss_kb", "platform"} of it to argv[1] as JSON: the
#: command's own peak RSS. A child spawned directly from a large process starts with ru_maxrss = that
#: process's high-water RSS (Linux carries maxrss over fork/vfork + execve); spawned from this small
#: launcher, the command's ru_maxrss is its own.
_LAUNCHER = """
import json, resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
with open(sys.argv[1], "w") as fh:
    json.dump({"returncode": rc, "maxrss_kb": kb, "platform": sys.platform}, fh)
sys.exit(rc)
"""


def cli_path() -> str:
    """The ``qwen-export`` next to this Python, else the one on PATH."""
    local = Path(sys.executable).with_name("qwen-export")
    if local.is_file():
        return str(local)
    found = shutil.which("qwen-export")
    if not found:
        sys.exit("qwen-export not found next to this Python or on PATH")
    return found


def _launcher_peak(rusage_path: Path) -> int | None:
    try:
        usage = json.loads(rusage_path.read_text(encoding="utf-8"))
        kb = int(usage["maxrss_kb"])
    except (OSError, ValueError, KeyError):
        return None
    return kb if usage.get("platform") == "darwin" else kb * 1024


def _wait(proc: subprocess.Popen, timeout_s: float | None) -> tuple[int, bool]:
    """``proc``'s exit status, killing its tree after ``timeout_s``; (status, whether it timed out)."""
    import psutil

    try:
        return proc.wait(timeout=timeout_s), False
    except subprocess.TimeoutExpired:
        root = psutil.Process(proc.pid)
        kill_tree([root, *root.children(recursive=True)])
        return proc.wait(), True


def run_logged(
    name: str,
    cmd: list[str],
    workdir: Path,
    *,
    poll: bool = False,
    quiet: bool = False,
    rss_cap_bytes: int | None = None,
    timeout_s: float | None = None,
    poll_interval: float = 0.05,
) -> dict[str, Any]:
    """Run ``cmd`` through the launcher: wall time, peak RSS, exit status and the output's tail.

    stdout and stderr go to ``workdir/NAME.stdout.log`` / ``.stderr.log``. ``poll``: also sample the
    process tree's RSS with psutil (``TreePoller.facts`` in the result; its peak stands in when the
    launcher's report is missing). ``quiet``: no log lines (the caller writes its own).
    ``rss_cap_bytes`` (implies ``poll``) / ``timeout_s``: kill the run when its tree's RSS passes the
    cap / after that many seconds; ``stopped`` in the result says which ended it."""
    poll = poll or rss_cap_bytes is not None
    if not quiet:
        log(f"{name}: " + " ".join(cmd))
    out_path, err_path = workdir / f"{name}.stdout.log", workdir / f"{name}.stderr.log"
    rusage_path = workdir / f"{name}.rusage.json"
    rusage_path.unlink(missing_ok=True)
    argv = [sys.executable, "-c", _LAUNCHER, str(rusage_path), *cmd]
    t0 = time.perf_counter()
    with open(out_path, "wb") as so, open(err_path, "wb") as se:
        proc = subprocess.Popen(argv, stdout=so, stderr=se, env=dict(os.environ, **PLAIN_ENV))
        if poll:
            with TreePoller(proc.pid, poll_interval, rss_cap_bytes) as poller:
                rc, timed_out = _wait(proc, timeout_s)
        else:
            rc, timed_out = _wait(proc, timeout_s)
    wall = time.perf_counter() - t0
    peak = _launcher_peak(rusage_path)
    result: dict[str, Any] = {
        "command": cmd,
        "returncode": rc,
        "wall_s": wall,  # includes the launcher's Python start-up (~0.05 s)
        "peak_rss_bytes": peak,
        "peak_rss_source": "getrusage(RUSAGE_CHILDREN) in a launcher process",
        "stdout_tail": out_path.read_text(errors="replace")[-3000:].strip(),
        "stderr_tail": err_path.read_text(errors="replace")[-6000:].strip(),
        "logs": [str(out_path), str(err_path)],
    }
    if timed_out:
        result["stopped"] = f"timeout: killed after {timeout_s:.0f} s"
    elif poll and poller.capped_bytes:
        result["stopped"] = f"memory: killed at {poller.capped_bytes / MiB:.0f} MiB RSS (cap {rss_cap_bytes / MiB:.0f})"
    if poll:
        result |= poller.facts()
        if peak is None:
            result["peak_rss_bytes"] = poller.peak_bytes
            result["peak_rss_source"] = "psutil polling (launcher report missing)"
    if not quiet and rc != 0:
        log(f"{name} FAILED (exit {rc}) after {wall:.1f} s; stderr tail:\n{result['stderr_tail']}")
    elif not quiet:
        log(f"{name}: done in {wall:.1f} s, peak RSS {peak / MiB if peak else float('nan'):.0f} MiB")
    return result


# ----------------------------------------------------------------------------- workers
#: The commands a worker answers (methods of its session); "quit" (or EOF) ends it.
COMMANDS = ("prefill", "step", "finish", "generate")


class Worker:
    """One engine in its own process (its own thread pools and peak-RSS accounting), JSON lines on its
    stdin/stdout: started by ``argv`` (a script that calls :func:`serve`), its first line is the ready
    message ``{"ok", "load_s", "rss_hwm_mib", ...}`` (kept as ``ready``), then one reply per command."""

    def __init__(self, label: str, argv: list[str], workdir: Path) -> None:
        self.label = label
        self.first_ttft_s: float | None = None  # its first prefill after load (set by interleave)
        self.stderr_path = workdir / f"worker-{label}.stderr.log"
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True, bufsize=1
        )
        try:
            self.ready = self.recv()
        except RuntimeError:
            self.close()
            raise

    def _stderr_tail(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-3000:].strip()

    def recv(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(
                f"worker {self.label} exited (status {self.proc.returncode}); stderr tail:\n{self._stderr_tail()}"
            )
        msg = json.loads(line)
        if not msg.get("ok"):
            raise RuntimeError(f"worker {self.label}: {msg.get('error')}\n{self._stderr_tail()}")
        return msg

    def call(self, cmd: str, **fields: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **fields}) + "\n")
        self.proc.stdin.flush()
        return self.recv()

    def generate(self, prompt: list[int], new_tokens: int) -> dict[str, Any]:
        """One whole greedy generation: ``{"ttft_s", "tpot_s", "tokens"}``."""
        return self.call("generate", prompt=prompt, new_tokens=new_tokens)

    def peak_rss_mib(self) -> float | None:
        """The worker's VmHWM now (read before close(): a finished process has none)."""
        return peak_rss_mib(self.proc.pid)

    def close(self) -> None:
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
            self.proc.wait(timeout=120)
        except (OSError, subprocess.TimeoutExpired, ValueError):
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


def serve(open_session: Callable[[], Any]) -> int:
    """The worker's side of :class:`Worker`: open the session, send the ready line (with the session's
    ``info`` dict), then answer each ``{"cmd": C, **fields}`` line with ``{"ok": True, **session.C(**fields)}``
    (C in :data:`COMMANDS`) or ``{"ok": False, "error"}``; "quit" or EOF ends it. Anything a library
    prints goes to stderr, never into the protocol."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def reply(obj: dict[str, Any]) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    t0 = time.perf_counter()
    try:
        session = open_session()
    except Exception as exc:  # report the load failure to the parent, in one line, then exit
        traceback.print_exc()
        reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        return 1
    info = getattr(session, "info", {})
    reply({"ok": True, "load_s": time.perf_counter() - t0, "rss_hwm_mib": peak_rss_mib(), **info})
    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg.pop("cmd", None)
        if cmd == "quit":
            break
        method = getattr(session, cmd, None) if cmd in COMMANDS else None
        if method is None:
            reply({"ok": False, "error": f"unknown command {cmd!r}"})
            continue
        try:
            reply({"ok": True, **method(**msg)})
        except Exception as exc:
            traceback.print_exc()
            reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    return 0
