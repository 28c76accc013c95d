"""Long fuzzing runs of the properties in ``tests/test_fuzz.py``.

The default test run keeps each property short and derandomized; this script runs the same properties
with fresh random seeds for many more examples or for a time budget, and prints per target how many
cases ran and which distinct failures were found::

    .venv/bin/python benchmarks/fuzz.py --minutes 10            # budget split evenly over the targets
    .venv/bin/python benchmarks/fuzz.py --examples 20000 --targets config chat
    .venv/bin/python benchmarks/fuzz.py --engine atheris --minutes 5   # coverage-guided, needs `pip install atheris`

Exit status 0 when no failure was found, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import harness

ROOT = harness.REPO_ROOT
TEST_FILE = ROOT / "tests" / "test_fuzz.py"
BATCH = 500  # examples per hypothesis run; each run draws a fresh seed


def _load_tests():  # noqa: ANN202 - a module
    spec = importlib.util.spec_from_file_location("qwen_export_test_fuzz", TEST_FILE)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def _failure_key(exc: BaseException) -> str:
    """A short, stable description of a failure (exception type and the innermost frame in qwen_export)."""
    excs = list(getattr(exc, "exceptions", None) or [exc])  # an ExceptionGroup holds several
    keys = []
    for e in excs:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if "qwen_export" in f.filename]
        where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
        keys.append(f"{type(e).__name__}{where}: {str(e).splitlines()[0][:160] if str(e) else ''}")
    return " | ".join(keys)


def run_hypothesis(targets: list[str], examples: int | None, seconds_per_target: float | None) -> int:
    from hypothesis import settings

    tests = _load_tests()
    failed = 0
    print(f"{'target':<14} {'cases':>9} {'seconds':>8}  failures")
    for name in targets:
        test = tests.TARGETS[name]
        base = settings.get_profile("qwen-export-fuzz")
        failures: dict[str, str] = {}
        start = time.monotonic()
        before = tests.CASES[name]
        while True:
            ran = tests.CASES[name] - before
            if examples is not None and ran >= examples:
                break
            if seconds_per_target is not None and time.monotonic() - start >= seconds_per_target:
                break
            batch = BATCH if examples is None else min(BATCH, examples - ran)
            # Re-point the @given test at new settings (the module fixes derandomize=True for CI).
            test._hypothesis_internal_use_settings = settings(base, max_examples=batch, derandomize=False)
            try:
                test()
            except Exception as exc:  # a property failed: hypothesis has shrunk it and printed the example
                key = _failure_key(exc)
                if key not in failures:
                    failures[key] = "".join(traceback.format_exception(exc))[-3000:]
                if len(failures) >= 5:
                    break
        elapsed = time.monotonic() - start
        print(f"{name:<14} {tests.CASES[name] - before:>9} {elapsed:>8.1f}  {len(failures) or 'none'}", flush=True)
        for key, text in failures.items():
            failed += 1
            print(f"  FAILURE {key}\n" + "\n".join("    " + line for line in text.splitlines()[-40:]), flush=True)
    return 1 if failed else 0


def run_atheris_child(target: str, libfuzzer_args: list[str]) -> None:
    import atheris

    with atheris.instrument_imports():
        pass
    tests = _load_tests()
    test = tests.TARGETS[target]
    atheris.Setup([sys.argv[0], *libfuzzer_args], test.hypothesis.fuzz_one_input)
    atheris.Fuzz()


def run_atheris(targets: list[str], examples: int | None, seconds_per_target: float | None) -> int:
    try:
        import atheris  # noqa: F401
    except ImportError as exc:
        print(f"atheris is not installed ({exc}); use --engine hypothesis")
        return 2
    failed = 0
    print(f"{'target':<14} {'cases':>9} {'seconds':>8}  result")
    for name in targets:
        args = [f"-max_total_time={int(seconds_per_target or 60)}", "-rss_limit_mb=4096", "-timeout=10"]
        if examples is not None:
            args.append(f"-runs={examples}")
        workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"qwen-export-atheris-{name}"
        workdir.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        proc = subprocess.run(
            [sys.executable, __file__, "--atheris-child", name, "--", *args, f"-artifact_prefix={workdir}/"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        elapsed = time.monotonic() - start
        out = proc.stdout + proc.stderr
        runs = re.findall(r"Done (\d+) runs", out) or re.findall(r"#(\d+)\s", out)
        result = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}; crash input under {workdir})"
        print(f"{name:<14} {runs[-1] if runs else '?':>9} {elapsed:>8.1f}  {result}", flush=True)
        if proc.returncode != 0:
            failed += 1
            print("\n".join("    " + line for line in out.splitlines()[-40:]), flush=True)
    return 1 if failed else 0


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--atheris-child":
        rest = sys.argv[3:]
        run_atheris_child(sys.argv[2], rest[1:] if rest[:1] == ["--"] else rest)
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, help="cases per target (default 20000 unless --minutes is given)")
    parser.add_argument("--minutes", type=float, help="total time budget, split evenly over the targets")
    parser.add_argument("--targets", nargs="+", help="subset of targets (default: all)")
    parser.add_argument("--engine", choices=["hypothesis", "atheris"], default="hypothesis")
    args = parser.parse_args()
    tests_targets = list(_load_tests().TARGETS)
    targets = args.targets or tests_targets
    unknown = set(targets) - set(tests_targets)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; valid: {', '.join(tests_targets)}")
    examples = args.examples if args.examples is not None or args.minutes is not None else 20000
    per_target = args.minutes * 60 / len(targets) if args.minutes is not None else None
    run = run_atheris if args.engine == "atheris" else run_hypothesis
    start = time.monotonic()
    status = run(targets, examples, per_target)
    print(f"total {time.monotonic() - start:.0f} s; {'no failures' if status == 0 else 'FAILURES FOUND'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
