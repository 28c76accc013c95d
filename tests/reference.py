"""The transformers reference (fp32 eager, or another dtype), loaded once per checkpoint and dtype
for the whole test session, and its greedy logits memoised: the parity suite runs every engine
against the same reference outputs, so each is computed once. Treat what it returns as read-only.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import transformers


@functools.cache
def model(checkpoint: Path, dtype: torch.dtype = torch.float32) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(checkpoint), dtype=dtype, attn_implementation="eager"
    ).eval()


def prompt(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 151643, n, dtype=np.int64)


def greedy_steps(checkpoint: Path, ids: np.ndarray, steps: int) -> list[np.ndarray]:
    """Reference logits: prefill (last position) then ``steps`` greedy decode steps with its KV cache."""
    return list(_greedy_steps(checkpoint, tuple(int(i) for i in ids), steps))


@functools.cache
def _greedy_steps(checkpoint: Path, ids: tuple[int, ...], steps: int) -> tuple[np.ndarray, ...]:
    reference, out = model(checkpoint), []
    with torch.no_grad():
        res = reference(torch.tensor([ids]), use_cache=True)
        logits, cache = res.logits[0, -1], res.past_key_values
        out.append(logits.numpy())
        for _ in range(steps):
            token = torch.argmax(logits).view(1, 1)
            res = reference(token, past_key_values=cache, use_cache=True)
            logits, cache = res.logits[0, -1], res.past_key_values
            out.append(logits.numpy())
    for array in out:
        array.flags.writeable = False
    return tuple(out)


def steps_following(checkpoint: Path, dtype: torch.dtype, ids: np.ndarray, tokens: list[int]) -> list[np.ndarray]:
    """Reference logits (as float32) in ``dtype`` along a given token path."""
    return list(_steps_following(checkpoint, dtype, tuple(int(i) for i in ids), tuple(tokens)))


@functools.cache
def _steps_following(
    checkpoint: Path, dtype: torch.dtype, ids: tuple[int, ...], tokens: tuple[int, ...]
) -> tuple[np.ndarray, ...]:
    reference, out = model(checkpoint, dtype), []
    with torch.no_grad():
        res = reference(torch.tensor([ids]), use_cache=True)
        out.append(res.logits[0, -1].float().numpy())
        cache = res.past_key_values
        for token in tokens:
            res = reference(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            out.append(res.logits[0, -1].float().numpy())
            cache = res.past_key_values
    for array in out:
        array.flags.writeable = False
    return tuple(out)
