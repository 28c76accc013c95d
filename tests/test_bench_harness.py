"""The benchmark launcher's guards: a run past its time or its memory cap is killed and says so."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import harness  # noqa: E402


def test_run_logged_reports_exit_and_output(tmp_path: Path) -> None:
    result = harness.run_logged("ok", [sys.executable, "-c", "print('hi')"], tmp_path, quiet=True)
    assert result["returncode"] == 0 and result["stdout_tail"] == "hi"
    assert "stopped" not in result and result["peak_rss_bytes"] > 0


def test_run_logged_kills_a_run_past_its_timeout(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "import time; time.sleep(60)"]
    result = harness.run_logged("slow", cmd, tmp_path, quiet=True, timeout_s=1.0)
    assert result["returncode"] != 0
    assert result["stopped"].startswith("timeout")
    assert result["wall_s"] < 30


@pytest.mark.parametrize("cap_mib", [150])
def test_run_logged_kills_a_run_past_its_memory_cap(tmp_path: Path, cap_mib: int) -> None:
    # holds 600 MiB (touched), then sleeps: only the cap can end it before the timeout
    grow = "import time; b = bytearray(600 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(60)"
    cap = cap_mib * harness.MiB
    result = harness.run_logged(
        "big", [sys.executable, "-c", grow], tmp_path, quiet=True, rss_cap_bytes=cap, timeout_s=50, poll_interval=0.05
    )
    assert result["returncode"] != 0
    assert result["stopped"].startswith("memory"), result.get("stopped")
    assert result["wall_s"] < 40


def test_generation_case_keeps_every_rounds_decode_rate() -> None:
    """compare.py's JSON: the median decode rate and each round's own, so a spread can be read."""
    import interleave

    runs = {
        "a": [
            {"tpot_s": 0.04, "tokens": [1, 2]},
            {"tpot_s": 0.05, "tokens": [1, 2]},
            {"tpot_s": 0.02, "tokens": [1, 2]},
        ],
        "b": [{"tpot_s": 0.1, "tokens": [1, 3]}] * 3,
    }
    case = interleave._generation_case(128, {"a": [0.5, 0.4, 0.6], "b": [1.0, 1.0, 1.0]}, runs)
    assert case["a"]["decode_all_tok_s"] == [25.0, 20.0, 50.0]
    assert case["a"]["decode_tokens_per_s"] == pytest.approx(25.0)
    assert case["a"]["prefill_tokens_per_s"] == pytest.approx(128 / 0.5)
    assert case["b"]["decode_all_tok_s"] == [10.0] * 3 and case["b"]["greedy_tokens_matching_first_engine"] == [1] * 3


def test_compare_ratios_carry_their_round_by_round_spread() -> None:
    """compare.py's speed ratios: the median ratio and the lowest / highest of the same ratio taken
    round by round (the two engines' runs on one prompt), oriented alike (> 1: ours faster)."""
    import compare

    def row(label: str, family: str, ttfts: list[float], decode: list[float]) -> dict:
        speed = {
            "128": {
                "ttft_ms": sorted(ttfts)[1],
                "ttft_all_ms": ttfts,
                "prefill_tokens_per_s": 128e3 / sorted(ttfts)[1],
                "decode_tokens_per_s": sorted(decode)[1],
                "decode_all_tok_s": decode,
            }
        }
        return {"label": label, "family": family, "available": True, "bytes": 2**20, "speed": speed}

    rows = [
        row("ours", "ours", [100.0, 200.0, 100.0], [30.0, 20.0, 40.0]),
        row("anchor", "anchor", [200.0, 200.0, 400.0], [20.0, 20.0, 20.0]),
    ]
    ratios = compare.best_ratios(rows, [128])
    assert ratios["decode_tok_s@128"]["ratio"] == pytest.approx(1.5)
    assert ratios["decode_tok_s@128"]["rounds"] == {"median": 1.5, "min": 1.0, "max": 2.0, "n": 3}
    assert ratios["prefill_tok_s@128"]["rounds"] == {"median": 2.0, "min": 1.0, "max": 4.0, "n": 3}
    assert ratios["ttft_ms@128"]["rounds"] == {"median": 0.5, "min": 0.25, "max": 1.0, "n": 3}
    assert "rounds" not in ratios["size_mib"]
    assert compare.ratio_cell(ratios["decode_tok_s@128"]) == "1.50× (1.00-2.00)"
    assert compare.ratio_cell(ratios["size_mib"]) == "1.00×"
    # rounds that do not pair (an engine missed one) give the median ratio alone
    rows[1]["speed"]["128"]["decode_all_tok_s"] = [20.0, 20.0]
    assert "rounds" not in compare.best_ratios(rows, [128])["decode_tok_s@128"]


def test_compare_pools_the_rounds_of_several_worker_processes() -> None:
    """compare.py --processes K: every pass's rounds pooled in pass order, medians over all of them,
    and each pass's own decode median kept (how far one process differs from the next)."""
    import compare

    def case(ttfts: list[float], rates: list[float]) -> dict:
        return {
            "ttft_ms": sorted(ttfts)[len(ttfts) // 2],
            "ttft_all_ms": ttfts,
            "prefill_tokens_per_s": 0.0,
            "decode_tokens_per_s": sorted(rates)[len(rates) // 2],
            "decode_all_tok_s": rates,
            "greedy_tokens_matching_first_engine": [4] * len(rates),
        }

    passes = [
        {"128": {"ours": case([100.0, 110.0, 120.0], [10.0, 11.0, 12.0])}},
        {"128": {"ours": case([200.0, 210.0, 220.0], [20.0, 21.0, 22.0])}},
    ]
    pooled = compare.pool_passes(passes, "ours")["128"]
    assert pooled["ttft_all_ms"] == [100.0, 110.0, 120.0, 200.0, 210.0, 220.0]
    assert pooled["ttft_ms"] == pytest.approx(160.0)
    assert pooled["prefill_tokens_per_s"] == pytest.approx(128 / 0.160)
    assert pooled["decode_all_tok_s"] == [10.0, 11.0, 12.0, 20.0, 21.0, 22.0]
    assert pooled["decode_tokens_per_s"] == pytest.approx(1 / ((1 / 12 + 1 / 20) / 2))  # 1 / median step time
    assert pooled["decode_by_process"] == [11.0, 21.0]
    assert len(pooled["greedy_tokens_matching_first_engine"]) == 6
    one = compare.pool_passes(passes[:1], "ours")["128"]
    assert one is passes[0]["128"]["ours"]  # one pass: its figures as measured
    assert compare.pool_passes(passes, "absent") == {}
