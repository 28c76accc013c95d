"""Artifacts for the benchmarks: our exports, onnxruntime-genai's builder, what they hold and weigh.

Every export runs through :func:`harness.run_logged` (its own process: wall time, peak RSS, logs in
the work directory) and is reused when its directory already holds a matching artifact.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness

MODEL_SUFFIXES = (".onnx", ".onnx.data", ".data")


# ----------------------------------------------------------------------------- facts
def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; {} when it is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def model_bytes(path: Path) -> int:
    """Size of an ONNX artifact's model files (``*.onnx``, ``*.onnx.data``, ``*.data``)."""
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.name.endswith(MODEL_SUFFIXES))


def ir_bytes(path: Path) -> int:
    """Size of an artifact's model files, OpenVINO IR (``openvino_model.*``) or ONNX (``model.onnx*``)."""
    return sum(p.stat().st_size for p in path.iterdir() if p.name.startswith(("openvino_model", "model.onnx")))


def checkpoint_ready(ckpt: Path) -> bool:
    return (ckpt / "config.json").is_file() and any(ckpt.glob("*.safetensors")) and (ckpt / "tokenizer.json").is_file()


def graph_summary(path: Path) -> dict[str, Any]:
    """What the ONNX graph computes with: quantized ops and their settings, the embedding, lm_head, logits."""
    import onnx

    graph = onnx.load(str(path / "model.onnx"), load_external_data=False).graph
    inits = {t.name: t for t in graph.initializer}
    ops: dict[str, int] = {}
    nbits: dict[str, int] = {}
    out: dict[str, Any] = {}
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMulNBits":
            zp = len(node.input) > 3 and bool(node.input[3])
            key = (
                f"bits={attrs.get('bits')} block={attrs.get('block_size')} "
                f"acc={attrs.get('accuracy_level', 0)} {'asym' if zp else 'sym'}"
            )
            nbits[key] = nbits.get(key, 0) + 1
            if "lm_head" in (node.name + node.input[1]).lower():
                out["lm_head"] = f"MatMulNBits {key}"
        if node.op_type in ("Gather", "GatherBlockQuantized") and node.input and node.input[0] in inits:
            t = inits[node.input[0]]
            if len(t.dims) == 2 or node.op_type == "GatherBlockQuantized":
                dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name
                bits = attrs.get("bits")
                out["embedding"] = f"{node.op_type} {dtype}" + (
                    f" bits={bits} block={attrs.get('block_size')}" if bits else ""
                )
        if node.op_type in ("MatMul", "Gemm") and "lm_head" in (node.name + "".join(node.input)).lower():
            out["lm_head"] = node.op_type + " (float)"
    out["matmulnbits"] = nbits
    out["ops"] = dict(sorted(ops.items()))
    for o in graph.output:
        if o.name == "logits":
            out["logits_shape"] = [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
    return out


# ----------------------------------------------------------------------------- exporting
def genai_builder_cmd(ckpt: Path, out: Path, precision: str, cache: Path, *, prune: bool = False) -> list[str]:
    """``python -m onnxruntime_genai.models.builder`` for CPU (``prune``: last-position logits only)."""
    cmd = [
        sys.executable, "-m", "onnxruntime_genai.models.builder",
        "-i", str(ckpt), "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(cache),
    ]  # fmt: skip
    return cmd + (["--extra_options", "prune_lm_head=true"] if prune else [])


def export_logged(
    label: str,
    name: str,
    out: Path,
    command: list[str],
    workdir: Path,
    check: Callable[[], tuple[bool, str]],
    *,
    clean: bool = False,
    cache: Path | None = None,
) -> dict[str, Any]:
    """Run one export (:func:`harness.run_logged` as ``name``), then ``check()`` -> (ok, why) its output:
    exit 0 without a complete artifact is a failure (returncode -1, ``error``). ``clean``: delete ``out``
    first (the genai builder writes into an existing directory); ``cache``: deleted after."""
    if clean and out.exists():
        shutil.rmtree(out)
    result = harness.run_logged(name, command, workdir)
    if cache is not None and cache.exists():
        shutil.rmtree(cache)
    if result["returncode"] == 0:
        ok, why = check()
        if not ok:
            result["returncode"] = -1
            result["error"] = f"exit 0 but {out}: {why}"
            harness.log(f"{label} FAILED: {result['error']}")
    return result


def artifact_matches(item: dict) -> tuple[bool, str]:
    """Whether ``item['dir']`` already holds the artifact ``item`` describes (and why not).

    ``item``: ``label``, ``kind`` (ours or genai), ``dir``, ``command``, ``want`` (ours: weights,
    algorithm, logits)."""
    out: Path = item["dir"]
    if item["kind"] == "genai":
        if not ((out / "genai_config.json").is_file() and (out / "model.onnx").is_file()):
            return False, "no genai_config.json/model.onnx"
        return True, ""
    manifest = read_json(out / "manifest.json")
    if not manifest or not (out / "model.onnx").is_file():
        return False, "no manifest.json/model.onnx"
    want = item["want"]
    if manifest.get("logits") != want["logits"]:
        return False, f"logits={manifest.get('logits')}, want {want['logits']}"
    quant = (manifest.get("extra") or {}).get("quantization") or {}
    weights = quant.get("weights", manifest.get("dtype", "fp32"))
    if weights != want["weights"]:
        return False, f"weights={weights}, want {want['weights']}"
    algorithm = (want["algorithm"] or "").split("-")[0]  # "gptq-asym": gptq (the suffixes are flags)
    if algorithm and algorithm != "default" and quant.get("algorithm") != algorithm:
        return False, f"algorithm={quant.get('algorithm')}, want {algorithm}"
    return True, ""


def _onnx_facts(item: dict) -> dict[str, Any]:
    out: Path = item["dir"]
    facts: dict[str, Any] = {
        "model_bytes": model_bytes(out),
        "files": sorted((p.name, p.stat().st_size) for p in out.iterdir() if p.is_file()),
    }
    try:
        facts["graph"] = graph_summary(out)
    except Exception as exc:  # the summary is a record, never a reason to fail
        facts["graph"] = {"error": f"{type(exc).__name__}: {exc}"}
    if item["kind"] == "ours":
        extra = read_json(out / "manifest.json").get("extra") or {}
        facts["quantization"] = extra.get("quantization")
        facts["max_length"] = extra.get("max_length")
    else:
        config = read_json(out / "genai_config.json")
        model = config.get("model") or {}
        decoder = model.get("decoder") or {}
        facts["genai_config"] = {
            "context_length": model.get("context_length"),
            "session_options": decoder.get("session_options"),
            "inputs": decoder.get("inputs"),
            "past_present_share_buffer": (config.get("search") or {}).get("past_present_share_buffer"),
        }
    return facts


def build(item: dict, workdir: Path, force: bool) -> dict[str, Any]:
    """Export ``item`` (see :func:`artifact_matches`) unless its directory matches; with the model files'
    size, file list, graph summary and quantization or genai_config."""
    out: Path = item["dir"]
    ok, why = artifact_matches(item)
    if ok and not force:
        harness.log(f"{item['label']}: reusing {out}")
        result: dict[str, Any] = {"command": item["command"], "returncode": 0, "reused": True}
    else:
        if out.exists() and not ok and why and (out / "model.onnx").exists():
            harness.log(f"{item['label']}: {out} does not match ({why}); rebuilding")
        harness.log(f"{item['label']}: exporting (MemAvailable {harness.mem_available_mib():.0f} MiB)")
        result = export_logged(
            item["label"], f"export-{out.name}", out, item["command"], workdir, lambda: artifact_matches(item),
            clean=item["kind"] == "genai", cache=workdir / "genai-cache",
        )  # fmt: skip
    if result["returncode"] == 0:
        result |= _onnx_facts(item)
    return result


def build_ours(
    ckpt: Path, out: Path, target: str, weights: str, workdir: Path, force: bool, extra: list[str] | None = None
) -> dict[str, Any]:
    """Export (or reuse) one artifact; ``extra`` args go after the defaults and are recorded beside it."""
    extra = list(extra or [])
    record = out.with_name(out.name + ".export-args.json")  # outside the artifact: its manifest lists files
    if (out / "manifest.json").is_file() and not force:
        recorded = json.loads(record.read_text())["export_args"] if record.is_file() else []
        if recorded != extra:
            error = f"{out} was exported with {recorded}, not {extra}: use --force or another --tag"
            return {"reused": True, "path": str(out), "returncode": 2, "error": error}
        return {"reused": True, "path": str(out), "export_args": extra}
    cmd = [harness.cli_path(), "export", str(ckpt), "-o", str(out), "--target", target, "--weights", weights, *extra]
    if force:
        cmd.append("--overwrite")
    result = harness.run_logged(f"export-{out.name}", cmd, workdir)
    result["path"], result["export_args"] = str(out), extra
    if result["returncode"] == 0 and extra:
        record.write_text(json.dumps({"export_args": extra, "command": cmd}, indent=2))
    elif result["returncode"] == 0:
        record.unlink(missing_ok=True)
    return result
