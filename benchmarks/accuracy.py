"""Accuracy against reference logits: teacher-forced logits in a subprocess, then KL / top-1 / ppl.

Each model runs alone in its own process (:func:`run_eval`, through :func:`harness.run_logged`: wall
time and peak RSS recorded; an fp32 reference of a 1.5B needs ~8 GB), fed the same token ids from an
empty cache, every position's logits saved as a float32 ``.npy``; :func:`compare` then reads two of
them block by block. Kinds:

* ``ours``: our artifact, ``open_artifact(...).engine.forward`` in ``--chunk``-token chunks that
  continue the cache (a last-position-logits artifact: one token at a time);
* ``genai``: onnxruntime-genai's ``model.onnx`` through a plain ``onnxruntime.InferenceSession``, its
  inputs fed by hand (``input_ids``, ``attention_mask``, the previous chunk's KV, starting empty);
* ``openvino``: an OpenVINO IR (ours or optimum-intel's) compiled stateful, f32 inference and f32 KV
  cache (so the figure is the weights' accuracy), fed ``input_ids``/``attention_mask``/
  ``position_ids``/``beam_idx``, one token at a time for a last-position-logits IR;
* ``llama``: a GGUF through llama-cpp-python with ``logits_all=True`` and one ``eval(ids)`` (run with
  that venv's Python: only the standard library is imported at the top).

Entry point (what :func:`run_eval` runs); prints one JSON line ``{"load_s", "run_s", "rss_hwm_mib"}``::

    python benchmarks/accuracy.py KIND PATH IDS.npy OUT.npy [--chunk 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import harness

KINDS = ("ours", "genai", "openvino", "llama")


# ----------------------------------------------------------------------------- in the subprocess
def _out(out_path: str, n: int, vocab: int) -> Any:
    import numpy as np

    return np.lib.format.open_memmap(out_path, mode="w+", dtype=np.float32, shape=(n, vocab))


def eval_ours(path: str, ids: Any, out_path: str, chunk: int, threads: int) -> tuple[Any, float]:
    from qwen_export.runtime.loader import RuntimeOptions, open_artifact

    t0 = time.perf_counter()
    engine = open_artifact(path, RuntimeOptions(threads=threads)).engine
    out = _out(out_path, len(ids), engine.capabilities.vocab_size)
    load_s = time.perf_counter() - t0
    engine.reset()
    if engine.capabilities.full_logits:
        for a in range(0, len(ids), chunk):
            out[a : a + chunk] = engine.forward(ids[None, a : a + chunk])[0]
    else:  # a last-position-logits artifact: one token at a time
        for a in range(len(ids)):
            out[a] = engine.forward(ids[None, a : a + 1])[0, -1]
    return out, load_s


def eval_genai(path: str, ids: Any, out_path: str, chunk: int, threads: int) -> tuple[Any, float]:
    import numpy as np
    import onnxruntime as ort
    from artifacts import read_json

    t0 = time.perf_counter()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(Path(path) / "model.onnx"), so, providers=["CPUExecutionProvider"])
    config = read_json(Path(path) / "genai_config.json")
    head = int(config["model"]["decoder"]["head_size"])
    inputs = {i.name: i for i in sess.get_inputs()}
    past_names = sorted(
        (k for k in inputs if k.startswith("past_key_values.")),
        key=lambda k: (int(k.split(".")[1]), k.split(".")[2]),
    )
    present_names = ["present." + k[len("past_key_values.") :] for k in past_names]
    kv_heads = inputs[past_names[0]].shape[1]
    fdtype = np.float16 if "float16" in inputs[past_names[0]].type else np.float32
    out = _out(out_path, len(ids), int(config["model"]["vocab_size"]))
    load_s = time.perf_counter() - t0
    past = {k: np.zeros((1, int(kv_heads), 0, head), fdtype) for k in past_names}
    done = 0
    while done < len(ids):
        step = ids[done : done + chunk]
        feed: dict[str, Any] = {"input_ids": step[None, :], "attention_mask": np.ones((1, done + len(step)), np.int64)}
        if "position_ids" in inputs:
            feed["position_ids"] = np.arange(done, done + len(step), dtype=np.int64)[None, :]
        feed.update(past)
        res = sess.run(["logits", *present_names], feed)
        logits = res[0][0]
        if logits.shape[0] != len(step):
            raise RuntimeError(f"{path}: logits for {logits.shape[0]} positions, fed {len(step)} (pruned lm_head?)")
        out[done : done + len(step)] = logits.astype(np.float32)
        past = dict(zip(past_names, res[1:], strict=True))
        done += len(step)
    return out, load_s


def eval_openvino(path: str, ids: Any, out_path: str, chunk: int, threads: int) -> tuple[Any, float]:
    import numpy as np
    import openvino as ov

    t0 = time.perf_counter()
    core = ov.Core()
    props = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32", "INFERENCE_NUM_THREADS": threads}
    compiled = core.compile_model(str(Path(path) / "openvino_model.xml"), "CPU", props)
    request = compiled.create_infer_request()
    request.reset_state()
    load_s = time.perf_counter() - t0
    n, out, done = len(ids), None, 0
    positions = compiled.output("logits").get_partial_shape()[1]  # ours: 1 (or 0..1), optimum's: any
    chunk = 1 if positions.get_max_length() == 1 else 256
    while done < n:
        step = ids[done : done + chunk]
        request.infer({
            "input_ids": step[None, :],
            "attention_mask": np.ones((1, done + len(step)), np.int64),
            "position_ids": np.arange(done, done + len(step), dtype=np.int64)[None, :],
            "beam_idx": np.zeros(1, np.int32),
        })  # fmt: skip
        logits = request.get_tensor("logits").data[0]
        if out is None:
            out = _out(out_path, n, logits.shape[-1])
        out[done + len(step) - logits.shape[0] : done + len(step)] = logits
        done += len(step)
    assert out is not None
    return out, load_s


def eval_llama(path: str, ids: Any, out_path: str, chunk: int, threads: int) -> tuple[Any, float]:
    import numpy as np
    from llama_cpp import Llama

    n = len(ids)
    t0 = time.perf_counter()
    llm = Llama(
        model_path=path, n_ctx=n + 16, n_batch=512, n_threads=threads, n_threads_batch=threads,
        logits_all=True, verbose=False,
    )  # fmt: skip
    load_s = time.perf_counter() - t0
    llm.eval([int(t) for t in ids])
    out = _out(out_path, n, llm.n_vocab())
    out[:] = np.asarray(llm.scores[:n], np.float32)
    return out, load_s


def eval_main(kind: str, path: str, ids_path: str, out_path: str, chunk: int = 256, threads: int = 2) -> int:
    """Teacher-force the ids in ``ids_path`` through one model; save every position's logits (float32 .npy)."""
    import numpy as np

    run = {"ours": eval_ours, "genai": eval_genai, "openvino": eval_openvino, "llama": eval_llama}[kind]
    ids = np.load(ids_path).astype(np.int64)
    t0 = time.perf_counter()
    out, load_s = run(path, ids, out_path, chunk, threads)
    run_s = time.perf_counter() - t0 - load_s
    out.flush()
    del out
    print(json.dumps({"load_s": load_s, "run_s": run_s, "rss_hwm_mib": harness.peak_rss_mib()}), flush=True)
    return 0


# ----------------------------------------------------------------------------- in the parent
def run_eval(
    label: str,
    kind: str,
    path: Path,
    ids_path: Path,
    workdir: Path,
    *,
    chunk: int = 256,
    threads: int = 2,
    python: str | None = None,
) -> dict[str, Any]:
    """Logits of one model on the ids, in a subprocess: ``workdir/logits/LABEL.npy`` (``logits_path``
    in the result, with the worker's load_s/run_s/rss_hwm_mib and :func:`harness.run_logged`'s facts)."""
    out = workdir / "logits" / f"{label}.npy"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        python or sys.executable, str(Path(__file__).resolve()), kind, str(path), str(ids_path), str(out),
        "--chunk", str(chunk), "--threads", str(threads),
    ]  # fmt: skip
    result = harness.run_logged(f"eval-{label}", cmd, workdir)
    if result["returncode"] == 0:
        try:
            result.update(json.loads(result["stdout_tail"].strip().splitlines()[-1]))
        except (ValueError, IndexError):
            pass
        result["logits_path"] = str(out)
    return result


def compare(ref_path: Path, path: Path, ids: Any, block: int = 32) -> dict[str, Any]:
    """Mean/max KL(ref || model), top-1 agreement with ref, and the model's perplexity on ``ids``."""
    import numpy as np

    ref = np.load(ref_path, mmap_mode="r")
    mod = np.load(path, mmap_mode="r")
    if ref.shape != mod.shape:
        raise RuntimeError(f"{path}: logits {mod.shape}, reference {ref.shape}")
    n = ref.shape[0]
    kls, top1, nll = [], [], []
    for a in range(0, n, block):
        r = np.asarray(ref[a : a + block], np.float64)
        m = np.asarray(mod[a : a + block], np.float64)
        lr = r - r.max(-1, keepdims=True)
        lr -= np.log(np.exp(lr).sum(-1, keepdims=True))
        lm = m - m.max(-1, keepdims=True)
        lm -= np.log(np.exp(lm).sum(-1, keepdims=True))
        kls.append((np.exp(lr) * (lr - lm)).sum(-1))
        top1.append(r.argmax(-1) == m.argmax(-1))
        pos = np.arange(a, min(a + block, n - 1))
        if len(pos):
            nll.append(-lm[pos - a, ids[pos + 1]])
    kl = np.concatenate(kls)
    nll_all = np.concatenate(nll)
    return {
        "positions": int(n),
        "mean_kl": float(kl.mean()),
        "median_kl": float(np.median(kl)),
        "p99_kl": float(np.percentile(kl, 99)),
        "max_kl": float(kl.max()),
        "top1": float(np.concatenate(top1).mean()),
        "ppl": float(np.exp(nll_all.mean())),
    }


def _pad_vocab(path: Path, width: int) -> None:
    """Widen a logits file to ``width`` columns with -inf (a model whose vocabulary lists fewer ids)."""
    import numpy as np

    mod = np.load(path, mmap_mode="r")
    if mod.shape[1] < width:
        padded = np.full((mod.shape[0], width), -np.inf, np.float32)
        padded[:, : mod.shape[1]] = mod
        del mod
        np.save(path, padded)


def evaluate(
    label: str,
    kind: str,
    path: Path,
    reference: Path,
    ids_path: Path,
    workdir: Path,
    *,
    chunk: int = 256,
    threads: int = 2,
    python: str | None = None,
) -> dict[str, Any]:
    """:func:`run_eval` then :func:`compare` with ``reference`` (a narrower vocabulary padded with
    -inf, like absent ids); the logits file is deleted after ([tokens, vocab] float32: hundreds of
    MB). The metrics, or ``{"error"}``."""
    import numpy as np

    res = run_eval(label, kind, path, ids_path, workdir, chunk=chunk, threads=threads, python=python)
    out = workdir / "logits" / f"{label}.npy"
    try:
        if res["returncode"] != 0:
            return {"error": res["stderr_tail"][-500:]}
        _pad_vocab(out, np.load(reference, mmap_mode="r").shape[1])
        return compare(reference, out, np.load(ids_path).astype(np.int64))
    except (RuntimeError, ValueError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        out.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Teacher-forced logits of one model on token ids (.npy).")
    p.add_argument("kind", choices=KINDS)
    p.add_argument("path")
    p.add_argument("ids")
    p.add_argument("out")
    p.add_argument("--chunk", type=int, default=256, help="tokens per forward (ours, genai)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    return eval_main(args.kind, args.path, args.ids, args.out, args.chunk, args.threads)


if __name__ == "__main__":
    sys.exit(main())
