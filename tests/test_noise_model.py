"""The noise model (tests/noise.py) is loose enough for every CPU's kernels and strict enough to
reject real errors: each test here feeds it a deliberately broken engine output."""

from __future__ import annotations

import numpy as np
import pytest
from noise import Noise, check_logits

from qwen_export.runtime.loader import open_artifact


def test_bound_scales_with_the_logits_magnitude() -> None:
    ref = np.array([[10.0, -3.0, 0.0], [0.1, -0.2, 0.0]])
    bound = Noise.CROSS.value
    ok = ref + np.array([[0.9, 0, 0], [0, 0, 0.9]])[..., :] * bound.tolerance(ref)
    check_logits(ok, ref, Noise.CROSS, record=False)
    off = ref.copy()
    off[1, 2] += 1.1 * (bound.floor + bound.rel * 0.2)  # over the small row's bound, under the big row's
    with pytest.raises(AssertionError, match=r"error .* at \(1, 2\)"):
        check_logits(off, ref, Noise.CROSS)
    with pytest.raises(AssertionError, match="non-finite"):
        check_logits(np.full_like(ref, np.nan), ref)


@pytest.fixture(scope="module")
def refeed(export) -> tuple[object, np.ndarray, np.ndarray]:
    """The engine, a 10-token prompt and its last logits from one fresh run."""
    engine = open_artifact(export("qwen2_tied")).engine
    prompt = np.random.default_rng(5).integers(0, 151643, 10)
    engine.reset()
    return engine, prompt, engine.forward(prompt[None])[0, -1]


def test_genuine_truncate_and_refeed_passes(refeed) -> None:
    engine, prompt, first = refeed
    engine.reset()
    engine.forward(prompt[None])
    engine.forward(np.array([[1, 2, 3]], np.int64))
    engine.truncate(6)
    check_logits(engine.forward(prompt[None, 6:])[0, -1], first, Noise.REORDERED)


@pytest.mark.parametrize("keep", [5, 7, 13], ids=["one-token-short", "one-token-long", "stale-tail-kept"])
def test_misplaced_kv_is_rejected(refeed, keep: int) -> None:
    """A truncate one position off, or none at all (three stale tokens left in the cache)."""
    engine, prompt, first = refeed
    engine.reset()
    engine.forward(prompt[None])
    engine.forward(np.array([[1, 2, 3]], np.int64))
    engine.truncate(keep)
    with pytest.raises(AssertionError, match="noise bound"):
        check_logits(engine.forward(prompt[None, 6:])[0, -1], first, Noise.REORDERED)


@pytest.mark.parametrize("noise", list(Noise))
def test_fp16_rounded_logits_are_rejected_by_every_bound(refeed, noise: Noise) -> None:
    """Only the logits rounded to fp16 (a half-precision stage where fp32 is promised)."""
    _, _, first = refeed
    with pytest.raises(AssertionError, match="noise bound"):
        check_logits(first.astype(np.float16).astype(np.float32), first, noise)
