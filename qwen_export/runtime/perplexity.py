"""Reference-free evaluation of an artifact: perplexity on a text (as llama.cpp's llama-perplexity),
and the teacher-forced logits that parity checks compare (torch-free: numpy and the engine only).

The text is cut into windows of ``window`` tokens; each window starts from an empty cache and is fed
one token at a time (the path generation uses, so prefill and every decode step are covered). Every
token of a window but the first is scored: its negative log-likelihood under the artifact given the
tokens before it in the window. Perplexity is ``exp(mean NLL)``; its standard error is estimated from
the spread of the per-token NLL (``ppl * std(NLL) / sqrt(n)``, as llama-perplexity prints ``±``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from qwen_export.errors import OptionError
from qwen_export.targets.base import Engine

__all__ = ["PerplexityReport", "artifact_logits", "log_softmax", "perplexity"]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def artifact_logits(engine: Engine, ids: Sequence[int]) -> np.ndarray:
    """[T, V] logits of the artifact for every position, fed one token at a time."""
    engine.reset()
    out = []
    for token in ids:
        logits = engine.forward(np.array([[token]], np.int64))
        out.append(logits[0, -1])
    engine.reset()
    return np.stack(out)


@dataclasses.dataclass(frozen=True)
class PerplexityReport:
    tokens: int  # tokens scored
    windows: int
    window: int  # tokens per window (the last may be shorter)
    mean_nll: float
    perplexity: float
    perplexity_stderr: float

    def rows(self) -> list[tuple[str, str]]:
        return [
            ("tokens scored", f"{self.tokens} in {self.windows} window(s) of up to {self.window}"),
            ("mean NLL (nats/token)", f"{self.mean_nll:.4f}"),
            ("perplexity", f"{self.perplexity:.3f} ± {self.perplexity_stderr:.3f}"),
        ]


def perplexity(engine: Engine, ids: Sequence[int], window: int) -> PerplexityReport:
    """Perplexity of ``engine`` on token ids ``ids`` (see the module docstring)."""
    context = engine.capabilities.max_context
    if not 2 <= window <= context:
        raise OptionError(f"the window must be 2 to the artifact's context ({context}) tokens, got {window}")
    ids = [int(i) for i in ids]
    if len(ids) < 2:
        raise OptionError(f"the text must have at least 2 tokens, got {len(ids)}")
    nll: list[np.ndarray] = []
    windows = 0
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            break
        logp = log_softmax(artifact_logits(engine, chunk)[:-1])
        nll.append(-logp[np.arange(len(chunk) - 1), chunk[1:]])
        windows += 1
    values = np.concatenate(nll)
    mean = float(values.mean())
    ppl = math.exp(mean)
    stderr = ppl * float(values.std(ddof=1)) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return PerplexityReport(
        tokens=len(values), windows=windows, window=window, mean_nll=mean, perplexity=ppl, perplexity_stderr=stderr
    )
