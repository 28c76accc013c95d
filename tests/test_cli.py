"""The qwen-export CLI through typer's CliRunner, plus one run of the installed entry point."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qwen_export.cli import app
from qwen_export.export import pipeline

runner = CliRunner()


def invoke(*args: str, input: str | None = None):  # noqa: A002 - CliRunner's name
    return runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)


def _one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    error_lines = [line for line in lines if line.startswith("error:")]
    assert len(error_lines) == 1, result.output
    for fragment in fragments:
        assert fragment in result.output.replace("\n", " "), result.output


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------- export
def test_export_inspect_generate(qwen2_tied: Path, tmp_path: Path) -> None:
    out = tmp_path / "art"
    result = invoke("export", qwen2_tied, "-o", out)
    assert result.exit_code == 0, result.output
    assert "exported" in result.output
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "model.onnx.data", "manifest.json", "tokenizer.json", "chat_template.jinja"} <= names
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == names - {"manifest.json"}
    # fused by default: one KV buffer of the artifact's capacity, shared by past and present
    assert manifest["io"]["inputs"]["past_key_values.0.key"]["shape"] == ["batch", 2, "max_sequence_length", 16]
    assert manifest["extra"]["kv_cache"]["layout"] == "shared"

    result = invoke("inspect", out)
    assert result.exit_code == 0, result.output
    assert "MatMul" in result.output and "present.1.value" in result.output

    result = invoke("inspect", out, "--json")
    info = json.loads(result.stdout)
    assert info["ops"]["com.microsoft::GroupQueryAttention"] == 2 and info["ops"]["MatMul"] >= 2 * 5

    result = invoke("generate", out, "Hello", "--max-new-tokens", "5", "--temperature", "0")
    assert result.exit_code == 0, result.output
    assert "5 new tokens" in result.output and "finish: length" in result.output


def test_export_refuses_existing_output_and_overwrites_on_request(
    qwen2_tied: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "art"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    with monkeypatch.context() as patch:  # the output is refused before the exporter is even imported
        patch.setitem(sys.modules, "qwen_export.export.options", None)
        _one_line_error(invoke("export", qwen2_tied, "-o", out), "exists", "--overwrite")
        _one_line_error(
            invoke("export", qwen2_tied, "-o", tmp_path / "new", "--symmetric", "--asymmetric"),
            "--symmetric or --asymmetric, not both",
        )
    assert (out / "manifest.json").read_text() == "{}"
    assert invoke("export", qwen2_tied, "-o", out, "--overwrite").exit_code == 0
    assert (out / "model.onnx").is_file()


@pytest.mark.parametrize(
    ("option", "value", "fragment"),
    [("--dtype", "int3", "fp32, fp16"), ("--target", "tflite", "onnxruntime"), ("--logits", "some", "last, all")],
)
def test_export_unknown_option_values(qwen2_tied: Path, tmp_path: Path, option: str, value: str, fragment: str) -> None:
    out = tmp_path / "art"
    _one_line_error(invoke("export", qwen2_tied, "-o", out, option, value), value, fragment)
    assert not out.exists()


def _broken_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    ("breakage", "fragments"),
    [
        ("arch", ("LlamaForCausalLM", "Qwen2ForCausalLM")),
        ("heads", ("num_attention_heads",)),
        ("truncate", ("model.safetensors",)),
        ("shape", ("model.norm.weight",)),
        ("no_tokenizer", ("tokenizer.json",)),
        ("pickle", ("safetensors",)),
    ],
)
def test_bad_checkpoints_fail_cleanly(
    qwen2_tied: Path, tmp_path: Path, breakage: str, fragments: tuple[str, ...]
) -> None:
    ckpt = _broken_copy(qwen2_tied, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    if breakage == "arch":
        config["architectures"] = ["LlamaForCausalLM"]
        config["model_type"] = "llama"
    elif breakage == "heads":
        config["num_key_value_heads"] = 3
    elif breakage == "truncate":
        data = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif breakage == "shape":
        import numpy as np
        from safetensors.numpy import load_file, save_file

        tensors = load_file(str(ckpt / "model.safetensors"))
        tensors["model.norm.weight"] = np.ones(65, np.float32)
        save_file(tensors, str(ckpt / "model.safetensors"))
    elif breakage == "no_tokenizer":
        (ckpt / "tokenizer.json").unlink()
    elif breakage == "pickle":
        (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    (ckpt / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    _one_line_error(invoke("export", ckpt, "-o", out), *fragments)
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_interrupted_export_leaves_nothing(qwen2_tied: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qwen_export.targets.onnxruntime import engine as ort_target

    real_emit = ort_target.emit

    def emit_then_interrupt(model, out_dir, progress=None):
        real_emit(model, out_dir, progress)
        assert (out_dir / "model.onnx.data").is_file()  # half-way: weights written, manifest not
        raise KeyboardInterrupt

    monkeypatch.setattr(ort_target, "emit", emit_then_interrupt)
    out = tmp_path / "out"
    result = invoke("export", qwen2_tied, "-o", out)
    assert result.exit_code == 130
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- run an artifact
def test_generate_errors(export, tmp_path: Path) -> None:
    art = export("qwen2_tied")
    long_prompt = "word " * 400  # the tiny model's context is 256
    _one_line_error(invoke("generate", art, long_prompt, "--raw"), "context is 256")
    _one_line_error(invoke("generate", art, "hi", "--top-p", "1.5"), "top_p")
    _one_line_error(invoke("generate", art, "hi", "--temperature", "-1"), "temperature")
    _one_line_error(invoke("generate", tmp_path / "nope", "hi"), "nope")


def test_tampered_artifact_is_refused(export, tmp_path: Path) -> None:
    art = shutil.copytree(export("qwen2_tied"), tmp_path / "art")
    with open(art / "model.onnx.data", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    _one_line_error(invoke("generate", art, "hi"), "model.onnx.data", "modified")
    art2 = shutil.copytree(export("qwen2_tied"), tmp_path / "art2")
    (art2 / "tokenizer.json").unlink()
    _one_line_error(invoke("inspect", art2), "tokenizer.json")


def test_generate_streams_with_stop_string_and_sampling(export) -> None:
    art = export("qwen2_tied")
    sampling = ["--max-new-tokens", "8", "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9"]
    sampling += ["--min-p", "0.01", "--repetition-penalty", "1.1", "--seed", "7"]
    result = invoke("generate", art, "Hello", *sampling)
    assert result.exit_code == 0, result.output
    again = invoke("generate", art, "Hello", *sampling)
    assert again.stdout == result.stdout  # seeded: same text
    greedy = invoke("generate", art, "Hello", "--max-new-tokens", "12", "--temperature", "0").stdout.strip()
    assert len(greedy) > 6
    stop = greedy[4:6]
    cut = invoke("generate", art, "Hello", "--max-new-tokens", "12", "--temperature", "0", "--stop", stop)
    assert cut.stdout.strip() == greedy[: greedy.index(stop)].strip()
    assert "finish: stop_string" in cut.output


def test_chat_reuses_the_cache_across_turns(export) -> None:
    result = invoke(
        "chat", export("qwen2_tied"), "--max-new-tokens", "4", "--temperature", "0", input="hello\nand again\n/exit\n"
    )
    assert result.exit_code == 0, result.output
    turns = re.findall(r"\((\d+) of (\d+) prompt tokens reused from the cache\)", result.output)
    assert len(turns) == 2, result.output
    (reused1, prompt1), (reused2, prompt2) = [(int(a), int(b)) for a, b in turns]
    # the whole first prompt is still cached when the second turn starts
    assert reused1 == 0 and prompt1 <= reused2 < prompt2, result.output


def test_chat_ctrl_c_reset_json_stop_and_raw(export, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import jsonschema

    from qwen_export.cli.chat import enable_line_editing
    from qwen_export.runtime.llm import LLM

    art = export("qwen2_tied")
    real = LLM.chat_stream
    calls = []

    class Interrupted:  # Ctrl-C arrives after the first piece of the first reply
        def __init__(self, stream) -> None:
            self.stream, self.result, self.seen = stream, None, 0

        def __iter__(self):
            return self

        def __next__(self):
            if self.seen == 1:
                raise KeyboardInterrupt
            self.seen += 1
            return next(self.stream)

        def close(self) -> None:
            self.stream.close()

    def chat_stream(self, *args, **kwargs):
        calls.append(kwargs)
        stream = real(self, *args, **kwargs)
        return Interrupted(stream) if len(calls) == 1 else stream

    with monkeypatch.context() as patch:
        patch.setattr(LLM, "chat_stream", chat_stream)
        args = ("chat", art, "--max-new-tokens", "8", "--temperature", "0", "--stop", "zzz", "--no-think")
        result = invoke(*args, input="hello\nagain\n/reset\n/exit\n")
    assert result.exit_code == 0, result.output
    assert "(reply stopped)" in result.output and "conversation reset" in result.output
    assert len(re.findall(r"reused from the cache", result.output)) == 1  # the second turn ran (lock released)
    assert calls[1]["stop_strings"] == ("zzz",) and calls[1]["enable_thinking"] is False
    schema = {"type": "object", "properties": {"n": {"enum": [1, 2]}}, "required": ["n"], "additionalProperties": False}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    result = invoke("chat", art, "--json-schema", tmp_path / "s.json", "--max-new-tokens", "20", input="pick\n")
    assert result.exit_code == 0, result.output
    jsonschema.validate(json.loads(result.stdout.splitlines()[0].removeprefix("> ")), schema)
    result = invoke("chat", art, "--raw", "--max-new-tokens", "3", "--temperature", "0", input="Once upon\na time\n")
    assert result.exit_code == 0 and len(re.findall(r"reused from the cache", result.output)) == 2, result.output
    _one_line_error(invoke("chat", art, "--raw", "--system", "x"), "--raw")
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    assert enable_line_editing() and "readline" in sys.modules


def test_check_passes_and_reports_json(export, qwen2_tied: Path) -> None:
    art = export("qwen2_tied")
    result = invoke("check", art, "--reference", qwen2_tied, "--max-tokens", "24", "--greedy-tokens", "4")
    assert result.exit_code == 0, result.output
    assert "top-1 agreement" in result.output and "PASS" in result.output
    result = invoke("check", art, "--reference", qwen2_tied, "--max-tokens", "24", "--greedy-tokens", "4", "--json")
    report = json.loads(result.stdout)
    assert report["passed"] and report["top1_agreement"] == 1.0 and report["max_abs_logit_error"] < 1e-3


def test_check_fails_against_a_different_checkpoint(export, qwen2_untied: Path) -> None:
    # same shapes except lm_head, different weights: parity must fail with exit 1
    result = invoke(
        "check", export("qwen2_tied"), "--reference", qwen2_untied, "--max-tokens", "16", "--greedy-tokens", "2"
    )
    assert result.exit_code == 1, result.output
    assert "FAILED" in result.output


def test_bench_reports_figures(export) -> None:
    art = export("qwen2_tied")
    result = invoke(
        "bench", art, "--prompt-lengths", "8,16", "--new-tokens", "4", "--repeats", "1", "--warmup", "0", "--json"
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert "results" not in payload  # listed once, under their artifact
    assert [r["prompt_tokens"] for r in payload["artifacts"][0]["results"]] == [8, 16]
    for r in payload["artifacts"][0]["results"]:
        assert r["ttft_ms"] > 0 and r["decode_tokens_per_s"] > 0 and r["peak_rss_mb"] > 0
    _one_line_error(invoke("bench", art, "--prompt-lengths", "8,x"), "--prompt-lengths")
    _one_line_error(invoke("bench", art, "--prompt-lengths", "300"), "context")


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    result = invoke("demo", "--workdir", tmp_path / "demo", "--max-new-tokens", "4")
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output and "assistant:" in result.output
    assert "5. quantization is not part of the demo: this is a 64-wide model" in result.output


def test_installed_entry_point() -> None:
    exe = Path(sys.executable).parent / "qwen-export"
    if not exe.is_file():
        pytest.skip(f"qwen-export is not installed next to {sys.executable} (pip install -e .)")
    proc = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "qwen-export" in proc.stdout
    proc = subprocess.run(
        [str(exe), "export", "/nonexistent", "-o", "/tmp/x"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:")


def test_max_length_option_and_default(qwen2_tied: Path) -> None:
    from qwen_export.export.checkpoint import Checkpoint

    spec = Checkpoint.open(qwen2_tied).spec
    assert pipeline.ExportOptions().resolved_max_length(spec) == 256  # the model's context
    assert pipeline.ExportOptions(max_length=64).resolved_max_length(spec) == 64
    big = dataclasses.replace(spec, max_position_embeddings=32768)
    assert pipeline.ExportOptions().resolved_max_length(big) == 32768  # no cap: the KV cache grows with use


def test_generate_with_json_schema_and_chat_with_tools(export, tmp_path: Path) -> None:
    import jsonschema

    art = export("qwen2_tied")
    schema = {
        "type": "object",
        "properties": {
            "colour": {"enum": ["red", "green", "blue"]},
            "n": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["colour", "n"],
        "additionalProperties": False,
    }
    (tmp_path / "s.json").write_text(json.dumps(schema))
    result = invoke("generate", art, "Pick a colour", "--json-schema", tmp_path / "s.json", "--max-new-tokens", "40")
    assert result.exit_code == 0, result.output
    jsonschema.validate(json.loads(result.stdout), schema)
    cut = invoke("generate", art, "Pick a colour", "--json-schema", tmp_path / "s.json", "--max-new-tokens", "3")
    assert cut.exit_code == 1, cut.output  # the document did not close: not a success
    assert "finish: length" in cut.stderr and "error: the JSON document is incomplete" in cut.stderr
    thinking = invoke("generate", art, "Pick a colour", "--max-new-tokens", "1")
    quiet = invoke("generate", art, "Pick a colour", "--max-new-tokens", "1", "--no-think")
    prompt_tokens = [int(re.search(r"(\d+) prompt \+", r.stderr).group(1)) for r in (thinking, quiet)]
    assert prompt_tokens[1] == prompt_tokens[0] + 4  # Qwen3 template: "<think>", "\n\n", "</think>", "\n\n"
    _one_line_error(invoke("generate", art, "x", "--raw", "--think"), "--raw")
    _one_line_error(invoke("generate", art, "x", "--json-schema", tmp_path / "nope.json"), "nope.json")
    _one_line_error(
        invoke("generate", art, "x", "--json-schema", tmp_path / "s.json", "--json-mode"),
        "--json-schema",
        "--json-mode",
    )
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    (tmp_path / "tools.json").write_text(json.dumps(tools))
    result = invoke("chat", art, "--tools", tmp_path / "tools.json", "--max-new-tokens", "4", input="hi\n/exit\n")
    assert result.exit_code == 0, result.output
    assert "reused from the cache" in result.output
    (tmp_path / "bad.json").write_text('{"not": "a list"}')
    _one_line_error(invoke("chat", art, "--tools", tmp_path / "bad.json"), "list of tool specs")


# ----------------------------------------------------------------------------- fusion options, KV cache, inspect
def _fake_export(calls: list, extra: dict):
    """A stand-in for pipeline.export that records its options and writes a one-file artifact."""
    from qwen_export.artifact import Manifest

    def run(checkpoint, out, options, hooks=None):
        calls.append(options)
        Path(out).mkdir()
        (Path(out) / "model.onnx").write_bytes(b"x")
        return Manifest(target="onnxruntime", dtype="fp32", logits="last", spec={}, extra=extra)

    return run


def test_export_passes_fusion_options_and_prints_kv_cache(
    qwen2_tied: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list = []
    kv = {"layout": "shared", "capacity": 4096, "bytes_per_token": 12 * 1024}
    monkeypatch.setattr(pipeline, "export", _fake_export(calls, {"max_length": 4096, "kv_cache": kv}))
    result = invoke("export", qwen2_tied, "-o", tmp_path / "a")
    assert result.exit_code == 0, result.output
    options = calls[-1]
    assert (options.fuse, options.strict, options.explain, options.dump_dir) == (True, True, False, None)
    assert "KV cache: up to 4096 tokens x 12.0 KiB = 48.0 MiB per sequence, allocated as tokens arrive" in result.output

    dump = tmp_path / "dump"
    args = ("--no-fuse", "--no-strict", "--dump-dir", dump)
    monkeypatch.setattr(pipeline, "export", _fake_export(calls, {"max_length": 64}))
    result = invoke("export", qwen2_tied, "-o", tmp_path / "b", *args)
    assert result.exit_code == 0, result.output
    options = calls[-1]
    assert (options.fuse, options.strict, options.explain, options.dump_dir) == (False, False, False, dump)
    assert "KV cache" not in result.output  # the manifest does not record one

    result = invoke("export", qwen2_tied, "-o", tmp_path / "c", "--explain")
    assert result.exit_code == 0, result.output
    assert calls[-1].explain is True
    _one_line_error(invoke("export", qwen2_tied, "-o", tmp_path / "d", "--no-fuse", "--explain"), "--explain")
    (tmp_path / "file").write_text("")
    _one_line_error(invoke("export", qwen2_tied, "-o", tmp_path / "e", "--dump-dir", tmp_path / "file"), "--dump-dir")


def test_toy_model_note() -> None:
    from qwen_export.export.parity import toy_model_note

    assert toy_model_note({"hidden_size": 64}, None) is None  # not quantized: the fp32 thresholds hold
    assert toy_model_note({"hidden_size": 896}, {"weights": "int4"}) is None  # a real width
    note = toy_model_note({"hidden_size": 64}, {"weights": "int4"})
    assert note is not None and note.startswith("note: this is a 64-wide model") and "int4" in note


def test_weight_scheme_phrase_and_short_help() -> None:
    from qwen_export.quant.scheme import describe_weights

    record = {"weights": "int4", "block_size": 32, "symmetric": False, "algorithm": "gptq", "keep": ["lm_head"]}
    record |= {"embedding_bits": 4, "keep_layers": [0, 23]}
    assert describe_weights("fp16", record) == (
        "int4 gptq b32 asym, embedding int4, lm_head fp16, layers 0,23 fp16, fp16 activations"
    )
    assert describe_weights("fp32", None) == "fp32"
    for args in (["-h"], ["export", "-h"], ["generate", "-h"]):
        result = invoke(*args)
        assert result.exit_code == 0 and "Usage:" in result.output, result.output


def test_untracked_steps_spin_and_piped_output_is_not_wrapped(export) -> None:
    import os

    from qwen_export.cli.common import byte_progress

    progress = byte_progress()
    task = progress.add_task("tracing", total=None)
    column = progress.columns[2]
    assert "bytes" not in str(column.render(progress.tasks[0])) and "?" not in str(column.render(progress.tasks[0]))
    progress.update(task, completed=2**20, total=2**21)
    assert "MB" in str(column.render(progress.tasks[0]))
    art = export("qwen2_tied")
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}  # a pipe: rich's 80 columns
    proc = subprocess.run(
        [sys.executable, "-m", "qwen_export.cli", "inspect", str(art)], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert len(first) > 80 and str(art) in first and "schema=" in first  # one line, not wrapped


def test_export_takes_a_hugging_face_model_id_from_the_cache(
    qwen2_tied: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline, against a cache laid out here as huggingface_hub lays it out (refs/main -> snapshot)."""
    from qwen_export.errors import CheckpointError
    from qwen_export.export.hub import resolve_checkpoint

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--Org--Tiny-Qwen"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for file in qwen2_tied.iterdir():
        (snapshot / file.name).symlink_to(file)  # the Hub's cache links snapshot files to blobs
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_checkpoint("Org/Tiny-Qwen") == snapshot
    assert resolve_checkpoint(qwen2_tied) == qwen2_tied  # a directory stays itself
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        resolve_checkpoint("Org/Missing")
    seen: list = []

    def fake(checkpoint, out, options, hooks=None):
        seen.append(Path(checkpoint))
        return _fake_export([], {"max_length": 256})(checkpoint, out, options, hooks)

    monkeypatch.setattr(pipeline, "export", fake)
    result = invoke("export", "Org/Tiny-Qwen", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert seen == [snapshot]
    _one_line_error(invoke("export", "Org/Missing", "-o", tmp_path / "out2"), "Org/Missing", "HF_HUB_OFFLINE")


def test_kv_cache_line() -> None:
    from qwen_export.cli.common import kv_cache_line

    assert kv_cache_line(None) is None and kv_cache_line({"layout": "shared"}) is None
    line = kv_cache_line({"layout": "concat", "capacity": 32768, "bytes_per_token": 12288})
    assert line is not None and line.startswith("KV cache: up to 32768 tokens x 12.0 KiB = 384.0 MiB per sequence")
    line = kv_cache_line({"layout": "shared", "capacity": 256, "bytes_per_token": 512})
    assert line is not None and line.startswith("KV cache: up to 256 tokens x 0.5 KiB = 128.0 KiB per sequence")


def test_fusion_error_is_one_line(qwen2_tied: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qwen_export.passes.rmsnorm import FusionError

    def fail(*args, **kwargs):
        raise FusionError("rmsnorm pass fused 3 RMSNorms, expected 5:\n the subgraph changed; rerun with --explain")

    monkeypatch.setattr(pipeline, "export", fail)
    out = tmp_path / "art"
    _one_line_error(invoke("export", qwen2_tied, "-o", out), "fused 3 RMSNorms, expected 5", "--explain")
    assert not out.exists()


def test_real_export_with_fusion_options(qwen2_tied: Path, tmp_path: Path) -> None:
    out, dump = tmp_path / "art", tmp_path / "dump"
    result = invoke("export", qwen2_tied, "-o", out, "--no-fuse", "--no-strict", "--dump-dir", dump)
    assert result.exit_code == 0, result.output
    assert dump.is_dir() and any(dump.iterdir())
    kv = json.loads((out / "manifest.json").read_text())["extra"]["kv_cache"]
    assert kv["layout"] == "concat" and kv["capacity"] == 256
    assert f"KV cache: up to 256 tokens x {kv['bytes_per_token'] / 1024:.1f} KiB" in result.output

    result = invoke("export", qwen2_tied, "-o", tmp_path / "fused", "--explain", "--max-length", "64")
    assert result.exit_code == 0, result.output
    assert "nearest misses" in result.output  # the fusion passes' reports, printed by the CLI
    kv = json.loads((tmp_path / "fused" / "manifest.json").read_text())["extra"]["kv_cache"]
    assert kv["layout"] == "shared" and kv["capacity"] == 64
    assert f"KV cache: up to 64 tokens x {kv['bytes_per_token'] / 1024:.1f} KiB" in result.output


def test_inspect_shows_passes_and_kv_cache(export) -> None:
    art = export("qwen2_tied")
    manifest = json.loads((art / "manifest.json").read_text())
    result = invoke("inspect", art)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    pass_lines = [x for x in lines if x.startswith("pass ")]
    assert len(pass_lines) == len(manifest["passes"])  # one line per pass, in order (cleanup runs twice)
    for record, line in zip(manifest["passes"], pass_lines, strict=True):
        assert line.startswith(f"pass {record['name']}: ")
        assert f"nodes {record['nodes_before']} -> {record['nodes_after']}" in line
        for rule, count in record["fired"].items():
            assert f"{rule} x{count}" in line
    assert " weights: fp32; " in lines[0]  # the weight scheme, not a bare dtype
    kv = manifest["extra"]["kv_cache"]  # the fused ONNX Runtime export records its KV cache and genai config
    assert any(x.startswith("KV cache: ") for x in lines)
    assert f"KV cache: up to {kv['capacity']} tokens x" in result.output
    info = json.loads(invoke("inspect", art, "--json").stdout)
    assert [p["name"] for p in info["passes"]] == [r["name"] for r in manifest["passes"]]
    assert [p["fired"] for p in info["passes"]] == [r["fired"] for r in manifest["passes"]]
    assert info["kv_cache"]["bytes_per_sequence"] == kv["capacity"] * kv["bytes_per_token"]
    assert (art / "genai_config.json").is_file()
    assert "onnxruntime-genai: genai_config.json" in result.output
    assert not any(x.startswith("tensorrt: ") for x in lines)  # a target's own lines only for its artifacts


def test_inspect_adds_the_tensorrt_recipe(export) -> None:
    art = export("qwen2_tied", target="tensorrt")
    result = invoke("inspect", art)
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("tensorrt: "))
    assert "max batch 1" in line and "engines built: none (run build-engine)" in line


def test_commands_are_listed_in_order() -> None:
    """One module per command, registered in the order --help has always listed them."""
    from qwen_export import cli

    assert callable(cli.main) and cli.app is cli.common.app
    want = ["export", "build-engine", "convert-gguf", "generate", "chat", "check", "inspect", "bench", "serve", "demo"]
    help_text = invoke("--help").output
    assert [help_text.index(f" {n} ") for n in want] == sorted(help_text.index(f" {n} ") for n in want)
