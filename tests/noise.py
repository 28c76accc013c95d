"""The noise model every logit comparison in the test suite uses (parity, engine equalities).

Two fp32 computations of the same network differ only by rounding. A different summation order
(kernel blocking and vector width: AVX2, AVX-512 or AMX tiles; a prompt run in one chunk or two; a
fused kernel against transformers' eager ops) changes each dot product by a few units of fp32
rounding (``u = 2**-24``, about 6e-8) times the size of the terms it sums, and the lm_head turns the
last hidden state's error into logit errors proportional to the size of the logits. So a logit's
error scales with the logit vector's magnitude ``S = max |ref|`` of its row, not with a fixed
absolute size, and a bound is ``floor + rel * S`` per row:

- ``REPEAT``: the same engine on the same inputs and shapes (a reset, a reload from OpenVINO's
  cache): the same kernels in the same order. Bound ``1e-6 + 1e-6 * S``.
- ``REORDERED``: the same engine on the same tokens split differently (truncate then re-feed, a
  prompt in two chunks): the kernels may block the sums differently (e.g. AMX tiles for a long
  chunk, AVX-512 for a short one). Measured up to ``1.8e-6 * S`` (OpenVINO on an AMX Xeon);
  bound ``1e-6 + 1e-5 * S``.
- ``CROSS``: two implementations of the same fp32 math (an engine against transformers fp32
  eager, the paged against the stateful OpenVINO engine). Bound ``2e-5 + 2e-5 * S``.

A real error is orders of magnitude above these: a stale or misplaced KV position moves logits by
tenths of ``S``, and even rounding the logits alone to fp16 (a half-precision stage where fp32 is
promised) moves them by up to ``2**-11 * S`` (about ``4.9e-4 * S``), 25 times ``CROSS``'s slope.
``tests/test_noise_model.py`` shows such outputs rejected. The largest observed error as a
fraction of its bound is printed at the end of the run (``noise model:`` in pytest's summary), so
the headroom on each CPU is visible (rejected comparisons are not counted).
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np


@dataclasses.dataclass(frozen=True)
class Bound:
    floor: float
    rel: float

    def tolerance(self, ref: np.ndarray) -> np.ndarray:
        """Per-row tolerance (shape ``ref.shape[:-1] + (1,)``) for logits ``ref`` [..., vocab]."""
        scale = np.abs(ref).max(axis=-1, keepdims=True) if ref.ndim else np.abs(ref)
        return self.floor + self.rel * scale


class Noise(enum.Enum):
    REPEAT = Bound(floor=1e-6, rel=1e-6)
    REORDERED = Bound(floor=1e-6, rel=1e-5)
    CROSS = Bound(floor=2e-5, rel=2e-5)


#: the largest error / bound of a passing comparison, per noise kind (reported in pytest's summary)
WORST: dict[Noise, float] = {}


def check_logits(
    got: np.ndarray, ref: np.ndarray, noise: Noise = Noise.CROSS, what: str = "", record: bool = True
) -> None:
    """Assert ``got`` equals ``ref`` (logits [..., vocab]) within ``noise``'s bound, row by row.
    ``record=False``: a synthetic check, left out of the headroom the summary reports."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    assert np.isfinite(got).all(), f"{what}: non-finite logits"
    error = np.abs(got - ref)
    tolerance = noise.value.tolerance(ref)
    ratio = float((error / tolerance).max()) if error.size else 0.0
    if ratio > 1.0:
        worst = tuple(int(i) for i in np.unravel_index(int(np.argmax(error / tolerance)), error.shape))
        raise AssertionError(
            f"{what or 'logits'} differ beyond the {noise.name} noise bound "
            f"({noise.value.floor:g} + {noise.value.rel:g} * max|ref|): error {error[worst]:.3g} at {worst}, "
            f"bound {np.broadcast_to(tolerance, error.shape)[worst]:.3g} ({ratio:.2f}x); "
            f"max |ref| {np.abs(ref).max():.3g}"
        )
    if record:
        WORST[noise] = max(WORST.get(noise, 0.0), ratio)


def summary() -> str:
    parts = [f"{noise.name} {WORST[noise]:.3f}" for noise in Noise if noise in WORST]
    return "noise model: largest error / bound: " + (", ".join(parts) or "no logits compared")
