"""The engines a benchmark worker runs, one per process, behind :func:`harness.serve`.

A session answers the worker commands: step-wise ones ``prefill(prompt, new_tokens)`` -> ``{"s"}``
(prefill + picking token 1), ``step()`` -> ``{"s"}`` (one forward of the previous token + picking the
next), ``finish()`` -> ``{"tokens"}``; and ``generate(prompt, new_tokens)`` -> ``{"ttft_s", "tpot_s",
"tokens"}``, one whole greedy generation of exactly ``new_tokens`` tokens (no stop token). Times are
taken here, around the compute only (no IPC). Kinds:

* ``ours``: our Engine (``open_artifact``; an OpenVINO artifact with ``attention=stateful`` and an f32
  KV cache unless ``--kv-cache``), TTFT = ``forward(prompt)`` + argmax, a step = ``forward([[token]])``
  + argmax (as ``qwen_export.runtime.bench`` times it); ``ours-paged``: the same with
  ``attention=paged``; ``ours-default``: the engine's own defaults, what ``load()`` and the CLI run
  (for OpenVINO: paged attention and, on CPUs with bf16, split precision with a u8 cache);
* ``og``: onnxruntime-genai's ``Generator`` (``og.Config`` with an overlay setting the decoder's
  intra-op threads; the builder's genai_config.json stays as written), ``min_length = max_length``;
  TTFT = ``append_tokens(prompt)`` + the first ``generate_next_token()``;
* ``ov-genai``: ``openvino_genai.LLMPipeline(IR, "CPU", INFERENCE_NUM_THREADS=T)``, generations only,
  TTFT and time per output token from its ``perf_metrics``;
* ``llama``: llama.cpp through llama-cpp-python, ``eval(prompt)`` + argmax, then ``eval([token])`` +
  argmax per step (run with the llama-cpp-python venv's Python: this module and ``harness`` import
  the standard library only at the top).

Worker entry point (what :func:`start` runs)::

    python benchmarks/sessions.py KIND PATH [--threads N] [--kv-cache P] [--n-ctx N]
"""

from __future__ import annotations

import abc
import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import harness

KINDS = ("ours", "ours-paged", "ours-default", "og", "ov-genai", "llama")


class StepSession(abc.ABC):
    """A step-wise session; ``generate`` is its prefill, ``new_tokens - 1`` steps and finish."""

    info: dict[str, Any] = {}

    def generate(self, prompt: list[int], new_tokens: int) -> dict[str, Any]:
        ttft = self.prefill(prompt, new_tokens)["s"]
        steps = [self.step()["s"] for _ in range(new_tokens - 1)]
        tpot = statistics.median(steps) if steps else None
        return {"ttft_s": ttft, "tpot_s": tpot, "tokens": self.finish()["tokens"]}

    @abc.abstractmethod
    def prefill(self, prompt: list[int], new_tokens: int) -> dict[str, float]:
        """Run the prompt; ``{"s": seconds}``."""

    @abc.abstractmethod
    def step(self) -> dict[str, float]:
        """One decode step; ``{"s": seconds}``."""

    @abc.abstractmethod
    def finish(self) -> dict[str, list[int]]:
        """End the generation; ``{"tokens": generated ids}``."""


class OursSession(StepSession):
    """Greedy generation on our Engine, one step per call."""

    def __init__(self, path: str, threads: int, kv_cache: str | None = None, attention: str | None = None) -> None:
        from qwen_export.runtime.llm import runtime_options
        from qwen_export.runtime.loader import open_artifact

        manifest = json.loads((Path(path) / "manifest.json").read_text())
        if attention == "default":
            options = runtime_options(threads, kv_cache=kv_cache)
        elif manifest["target"] == "openvino":
            options = runtime_options(threads, kv_cache=kv_cache or "f32", attention=attention or "stateful")
        else:
            options = runtime_options(threads)
        self.engine = open_artifact(path, options).engine
        self.info = {"context": self.engine.capabilities.max_context}
        self.tokens: list[int] = []

    def _forward(self, ids: Any) -> tuple[int, float]:
        import numpy as np

        start = time.perf_counter()
        logits = self.engine.forward(ids)
        token = int(np.argmax(logits[0, -1]))
        return token, time.perf_counter() - start

    def prefill(self, prompt: list[int], new_tokens: int) -> dict[str, float]:
        import numpy as np

        ids = np.asarray(prompt, np.int64)[None, :]
        self.engine.reset()
        token, elapsed = self._forward(ids)
        self.tokens = [token]
        return {"s": elapsed}

    def step(self) -> dict[str, float]:
        import numpy as np

        token, elapsed = self._forward(np.array([[self.tokens[-1]]], np.int64))
        self.tokens.append(token)
        return {"s": elapsed}

    def finish(self) -> dict[str, list[int]]:
        self.engine.reset()
        return {"tokens": self.tokens}


class OgSession(StepSession):
    """Greedy generation with onnxruntime-genai's Generator, one token per call."""

    def __init__(self, path: str, threads: int) -> None:
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(path)
        config.clear_providers()  # CPU
        options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1} if threads else {}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.model = og.Model(config)
        context = int(json.loads((Path(path) / "genai_config.json").read_text())["model"]["context_length"])
        self.info = {"context": context}
        self.gen: Any = None
        self.prompt_len = self.total = 0

    def prefill(self, prompt: list[int], new_tokens: int) -> dict[str, float]:
        import numpy as np

        og = self.og
        self.prompt_len, self.total = len(prompt), len(prompt) + new_tokens
        params = og.GeneratorParams(self.model)
        # min_length = max_length: exactly new_tokens tokens, whatever the random weights emit (EOS too)
        params.set_search_options(max_length=self.total, min_length=self.total, do_sample=False, batch_size=1)
        self.gen = og.Generator(self.model, params)
        ids = np.asarray(prompt, np.int32)
        start = time.perf_counter()
        self.gen.append_tokens(ids)  # the prefill forward
        self.gen.generate_next_token()  # picks token 1 from the prefill logits
        return {"s": time.perf_counter() - start}

    def step(self) -> dict[str, float]:
        start = time.perf_counter()
        self.gen.generate_next_token()  # forward of the previous token, then pick the next
        return {"s": time.perf_counter() - start}

    def finish(self) -> dict[str, list[int]]:
        seq = [int(t) for t in self.gen.get_sequence(0)]
        self.gen = None
        return {"tokens": seq[self.prompt_len :]}


class OvGenaiSession:
    """openvino-genai's LLMPipeline with its defaults; whole generations only."""

    info: dict[str, Any] = {}

    def __init__(self, path: str, threads: int, kv_cache: str | None) -> None:
        import openvino as ov
        import openvino_genai

        self.ov, self.og = ov, openvino_genai
        props: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads} if threads else {}
        if kv_cache:
            props["KV_CACHE_PRECISION"] = kv_cache
        self.pipe = openvino_genai.LLMPipeline(path, "CPU", **props)

    def generate(self, prompt: list[int], new_tokens: int) -> dict[str, Any]:
        import numpy as np

        config = self.og.GenerationConfig()
        config.max_new_tokens = config.min_new_tokens = new_tokens
        config.do_sample = False
        config.ignore_eos = True
        ids = np.asarray([prompt], np.int64)
        res = self.pipe.generate(
            self.og.TokenizedInputs(self.ov.Tensor(ids), self.ov.Tensor(np.ones_like(ids))), config
        )
        metrics = res.perf_metrics
        return {
            "ttft_s": metrics.get_ttft().mean / 1e3,
            "tpot_s": metrics.get_tpot().mean / 1e3 if new_tokens > 1 else None,
            "tokens": [int(t) for t in res.tokens[0]],
        }


class LlamaSession:
    """llama.cpp through llama-cpp-python: eval(prompt) + argmax, then eval([token]) + argmax per step.

    Not ``Llama.generate``: its sampler chain and Python-side bookkeeping would be timed too; this is
    the same work per step as our greedy loop (one decode of one token, argmax of its logits).
    """

    def __init__(self, path: str, threads: int, n_ctx: int) -> None:
        import llama_cpp
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=path, n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
            logits_all=False, verbose=False,
        )  # fmt: skip
        self.vocab = self.llm.n_vocab()
        self.info = {"version": getattr(llama_cpp, "__version__", None)}

    def _next(self) -> int:
        import numpy as np

        # with logits_all=False, eval() keeps no scores: read the last position's logits from the context
        return int(np.argmax(np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.vocab,))))

    def generate(self, prompt: list[int], new_tokens: int) -> dict[str, Any]:
        llm = self.llm
        llm.reset()  # n_tokens = 0: the next eval drops the KV cache
        start = time.perf_counter()
        llm.eval(prompt)
        token = self._next()
        ttft = time.perf_counter() - start
        steps, tokens = [], [token]
        for _ in range(new_tokens - 1):
            t0 = time.perf_counter()
            llm.eval([token])
            token = self._next()
            steps.append(time.perf_counter() - t0)
            tokens.append(token)
        return {"ttft_s": ttft, "tpot_s": statistics.median(steps) if steps else None, "tokens": tokens}


def open_session(kind: str, path: str, threads: int, kv_cache: str | None = None, n_ctx: int = 2048) -> Any:
    if kind in ("ours", "ours-paged", "ours-default"):
        attention = {"ours": "stateful", "ours-paged": "paged", "ours-default": "default"}[kind]
        return OursSession(path, threads, kv_cache, attention)
    if kind == "og":
        return OgSession(path, threads)
    if kind == "ov-genai":
        return OvGenaiSession(path, threads, kv_cache)
    if kind == "llama":
        return LlamaSession(path, threads, n_ctx)
    raise ValueError(f"unknown session kind {kind!r} (valid: {', '.join(KINDS)})")


def serve(kind: str, path: str, threads: int, kv_cache: str | None = None, n_ctx: int = 2048) -> int:
    """Run one engine as a worker on this process's stdin/stdout (:func:`harness.serve`)."""
    return harness.serve(lambda: open_session(kind, path, threads, kv_cache, n_ctx))


def start(
    label: str,
    kind: str,
    path: Path,
    threads: int,
    workdir: Path,
    *,
    kv_cache: str | None = None,
    n_ctx: int | None = None,
    python: str | None = None,
) -> harness.Worker:
    """Start a worker process running ``kind`` on ``path`` (``python``: another venv's interpreter)."""
    argv = [python or sys.executable, str(Path(__file__).resolve()), kind, str(path), "--threads", str(threads)]
    if kv_cache:
        argv += ["--kv-cache", kv_cache]
    if n_ctx is not None:
        argv += ["--n-ctx", str(n_ctx)]
    return harness.Worker(label, argv, workdir)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Serve one engine as a benchmark worker (JSON lines on stdin/stdout).")
    p.add_argument("kind", choices=KINDS)
    p.add_argument("path")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv-cache", default=None)
    p.add_argument("--n-ctx", type=int, default=2048)
    args = p.parse_args(argv)
    return serve(args.kind, args.path, args.threads, args.kv_cache, args.n_ctx)


if __name__ == "__main__":
    sys.exit(main())
