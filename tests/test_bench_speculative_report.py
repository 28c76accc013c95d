"""benchmarks/speculative.py's report of where a speculative output first left plain decoding's."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import speculative  # noqa: E402


class _Engine:
    """Logits of the last fed token: a row whose two best values are 1.5 and 1.25 apart from
    position 4 on, 3.0 before."""

    def __init__(self) -> None:
        self.fed: list[list[int]] = []
        self.resets = 0

    def reset(self) -> None:
        self.resets += 1

    def forward(self, ids: np.ndarray) -> np.ndarray:
        self.fed.append(ids[0].tolist())
        row = np.zeros(8, np.float32)
        row[2], row[5] = (1.5, 1.25) if ids.shape[1] >= 4 else (3.0, 0.0)
        return row[None, None, :]


def test_divergence_names_the_first_differing_token_and_plain_decodings_gap() -> None:
    engine = _Engine()
    found = speculative.divergence(engine, [7, 8], [1, 2, 3, 4], [1, 2, 9, 4])
    assert found == {"token": 2, "plain_top2_gap": 0.25}
    assert engine.fed == [[7, 8, 1, 2]] and engine.resets == 2  # the cache is left empty


def test_divergence_of_a_shorter_output_is_where_it_stopped() -> None:
    engine = _Engine()
    found = speculative.divergence(engine, [7], [1, 2], [1])
    assert found["token"] == 1 and engine.fed == [[7, 1]] and found["plain_top2_gap"] == 3.0
