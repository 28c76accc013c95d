"""Static scales of an int8 KV cache (``export --kv-cache int8``, ONNX Runtime's GroupQueryAttention).

The cache stores ``clamp(rint(x / scale), -128, 127)`` with one fixed scale per (kv head, channel):
nothing adapts it at run time, so it is set at export from calibration maxima
(:func:`qwen_export.export.calibration.collect_kv_ranges`: the calibration text run through the
model layer by layer) times :data:`HEADROOM`:

- keys are stored after the rotary embedding, which rotates each channel pair (i, i + head_dim/2)
  by a position-dependent angle; a key channel's scale covers its pair's largest length, which no
  rotation changes, so a calibration key lands within range at every position;
- values: each channel's largest absolute value.

A key or value beyond ``127 x scale`` (text far from the calibration text, a context much longer
than its 512-token sequences) is clipped to it: the headroom is the margin against that, paid for
with a coarser step (``HEADROOM x max / 127``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: the scales cover this many times the calibration's largest magnitude (clipping margin)
HEADROOM = 1.25
QMAX = 127.0
#: the manifest's description of the scheme (``extra.kv_cache.quantization.scheme``)
SCHEME = "int8 symmetric, static per-channel scales"


def kv_scales(key_max: np.ndarray, value_max: np.ndarray, headroom: float = HEADROOM) -> tuple[np.ndarray, np.ndarray]:
    """(k_scale, v_scale), float32 ``[1, kv_heads, 1, head_dim]``, from one layer's calibration
    maxima ``[kv_heads, head_dim]`` (keys: pair lengths; values: absolute maxima). A channel the
    calibration never moved gets the smallest positive scale of its tensor (never 0)."""
    out = []
    for peak in (key_max, value_max):
        peak = np.asarray(peak, np.float64)
        if peak.ndim != 2 or not np.isfinite(peak).all():
            raise ValueError(f"calibration maxima must be a finite [kv_heads, head_dim] array, got {peak.shape}")
        scale = peak * headroom / QMAX
        positive = scale[scale > 0]
        floor = positive.min() if positive.size else 1.0
        out.append(np.maximum(scale, floor).astype(np.float32)[None, :, None, :])
    return out[0], out[1]


def record(tokens: int, source: str) -> dict[str, Any]:
    """``manifest.extra.kv_cache.quantization``: the scheme, its headroom and the calibration."""
    return {"scheme": SCHEME, "headroom": HEADROOM, "calibration": {"tokens": tokens, "source": source}}
