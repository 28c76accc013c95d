"""A bounded soak (about 10 s): multi-turn generation with resets must not leak memory, and every
reset must leave the engine exactly as a freshly opened one. The long run is benchmarks/soak.py."""

from __future__ import annotations

import gc
import time

import numpy as np
import psutil
from noise import Noise, check_logits

from qwen_export.runtime.generation import GenerationConfig, Generator
from qwen_export.runtime.loader import open_artifact

SECONDS = 6.0  # measured, after a warm-up conversation per question
MAX_GROWTH_MIB = 20.0
QUESTIONS = ["Write a quicksort in Python.", "Name three prime numbers."]


def _rss_mib() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def _probe(engine, ids: list[int]) -> np.ndarray:
    logits = np.array(engine.forward(np.asarray([ids], np.int64)), copy=True)
    engine.reset()
    return logits


def test_generation_soak_is_leak_free_and_resets_are_clean(export) -> None:
    art = export("qwen2_tied")
    loaded = open_artifact(art)
    tok, engine = loaded.tokenizer, loaded.engine
    probe = tok.encode("The quick brown fox jumps over the lazy dog.")
    fresh = _probe(open_artifact(art).engine, probe)
    generator = Generator(engine, tok)
    rng = np.random.default_rng(0)
    greedy: dict[int, tuple[int, ...]] = {}
    baseline, start, conversations, tokens, reused = None, 0.0, 0, 0, 0

    while baseline is None or time.perf_counter() - start < SECONDS:
        generator.reset()
        check_logits(_probe(engine, probe), fresh, Noise.REPEAT, "after a reset")
        q = conversations % len(QUESTIONS)
        messages = [{"role": "user", "content": QUESTIONS[q]}]
        for turn in range(3):
            ids = tok.apply_chat_template_ids(messages)
            if turn == 0:
                config = GenerationConfig(max_new_tokens=32, temperature=0.0)
            else:
                config = GenerationConfig(
                    max_new_tokens=int(rng.integers(16, 33)),
                    temperature=0.8,
                    top_k=40,
                    top_p=0.95,
                    min_p=0.02,
                    repetition_penalty=1.1,
                    seed=turn + conversations,
                )
            result = generator.generate_text(ids, config)
            if turn == 0:
                assert result.token_ids == greedy.setdefault(q, result.token_ids)  # same prompt, same tokens
            else:
                assert result.reused_tokens > 0  # the earlier turns came from the cache
                reused += result.reused_tokens
            tokens += result.completion_tokens
            messages += [{"role": "assistant", "content": result.text}, {"role": "user", "content": "And then?"}]
        conversations += 1
        if baseline is None and conversations >= len(QUESTIONS):  # warm-up: every prompt once
            baseline, start = _rss_mib(), time.perf_counter()

    growth = _rss_mib() - baseline
    assert conversations > len(QUESTIONS) and tokens > 0 and reused > 0
    assert growth < MAX_GROWTH_MIB, f"RSS grew {growth:.1f} MiB over {conversations} conversations"
