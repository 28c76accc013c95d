"""`qwen-export bench` with several artifacts (interleaved), JSON, --plot, --sweep; runtime.bench helpers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from test_cli import _one_line_error, invoke

from qwen_export.errors import OptionError
from qwen_export.runtime import bench as bench_mod
from qwen_export.runtime import bench_run
from qwen_export.targets.base import EngineCapabilities

FAST = ("--new-tokens", "3", "--repeats", "1", "--warmup", "0")


class FakeEngine:
    """Enough of the Engine protocol for bench_many: logits of zeros, a token counter."""

    def __init__(self, context: int = 64, vocab: int = 32) -> None:
        self.capabilities = EngineCapabilities("fake", context, 1, ("cpu",), False, vocab)
        self.cached = 0
        self.prompts: list[np.ndarray] = []

    @property
    def num_cached_tokens(self) -> int:
        return self.cached

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        if self.cached == 0:
            self.prompts.append(input_ids[0].copy())
        self.cached += input_ids.shape[1]
        return np.zeros((1, 1, self.capabilities.vocab_size), np.float32)

    def reset(self) -> None:
        self.cached = 0

    def truncate(self, num_tokens: int) -> None:
        self.cached = min(self.cached, num_tokens)


# ----------------------------------------------------------------------------- library
def test_bench_many_interleaves_on_the_same_prompts() -> None:
    a, b = FakeEngine(), FakeEngine()
    targets = [bench_mod.BenchTarget("A", a, 10), bench_mod.BenchTarget("B", b)]
    cases = [bench_mod.BenchCase(4, 2), bench_mod.BenchCase(8, 2)]
    runs: list[bench_mod.BenchRun] = []
    results = bench_mod.bench_many(targets, cases, repeats=2, warmup=1, on_run=runs.append)
    assert [r.label for r in runs] == ["A", "B"] * 6
    assert [(r.case.prompt_tokens, r.round, r.warmup) for r in runs[::2]] == [
        (4, 0, True), (4, 1, False), (4, 2, False), (8, 0, True), (8, 1, False), (8, 2, False)
    ]  # fmt: skip
    assert all(np.array_equal(p, q) for p, q in zip(a.prompts, b.prompts, strict=True))
    assert len({p.tobytes() for p in a.prompts}) > 1  # fresh random prompt each round
    assert [[r.prompt_tokens for r in rs] for rs in results] == [[4, 8], [4, 8]]
    assert results[0][1].kv_cache_mb == pytest.approx(10 * (8 + 2) / 2**20)
    assert results[1][0].kv_cache_mb is None and results[0][0].runs == 2


def test_bench_many_checks_every_case_before_running() -> None:
    small, big = FakeEngine(context=16), FakeEngine(context=64)
    runs: list[bench_mod.BenchRun] = []
    targets = [bench_mod.BenchTarget("big", big), bench_mod.BenchTarget("small", small)]
    with pytest.raises(OptionError, match="context of small"):
        bench_mod.bench_many(targets, [bench_mod.BenchCase(4, 2), bench_mod.BenchCase(15, 2)], 1, 0, on_run=runs.append)
    assert runs == []
    with pytest.raises(OptionError, match="repeats"):
        bench_mod.bench_many(targets, [bench_mod.BenchCase(4, 2)], 0, 0)


def test_single_engine_bench_still_works() -> None:
    calls = []
    results = bench_mod.bench(FakeEngine(), [bench_mod.BenchCase(4, 3)], 2, 1, on_run=lambda: calls.append(1))
    assert len(calls) == 3 and results[0].decode_tokens_per_s > 0


def test_sweep_lengths_and_kv_bytes() -> None:
    assert bench_mod.sweep_lengths(8192) == [128, 256, 512, 1024, 2048, 4096, 8192]
    assert bench_mod.sweep_lengths(1000) == [128, 256, 512, 1000]
    assert bench_mod.sweep_lengths(60) == [60]
    with pytest.raises(OptionError):
        bench_mod.sweep_lengths(0)
    spec = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
    assert bench_mod.kv_bytes_per_token(spec, "fp32") == 2 * 2 * 2 * 16 * 4
    assert bench_mod.kv_bytes_per_token(spec, "fp16") == 2 * 2 * 2 * 16 * 2


def test_bench_run_settings_plan_and_report() -> None:
    """The bench orchestration without the CLI: settings from option values, a sweep planned from the
    smallest context, a report whose JSON has ratios against the first artifact and no NaN."""
    with pytest.raises(OptionError, match="--sweep-max needs --sweep"):
        bench_run.bench_settings(sweep_max=64)
    with pytest.raises(OptionError, match="--new-tokens"):
        bench_run.bench_settings(new_tokens="2,x")
    assert bench_run.bench_settings(prompt_lengths=[4, 8], new_tokens=[2]) == bench_run.bench_settings(
        prompt_lengths="4,8", new_tokens="2"
    )
    settings = bench_run.bench_settings(new_tokens="2", repeats=1, warmup=0, sweep=True)
    assert settings.prompt_lengths is None and settings.new_tokens == (2,)
    targets = [bench_mod.BenchTarget("A", FakeEngine(context=200)), bench_mod.BenchTarget("B", FakeEngine())]
    prompts, cases = bench_run.plan_cases(settings, targets)
    assert prompts == [62] and cases == [bench_mod.BenchCase(62, 2)]  # min context 64 - 2 new tokens
    loads = [bench_run.ArtifactLoad(t.label, t.label, "fp32", "fp32", 0, 64, 0.1, 1.0, 2.0, 8) for t in targets]
    runs: list[bench_mod.BenchRun] = []
    report = bench_run.measure(settings, targets, loads, prompts, cases, on_run=runs.append)
    assert len(runs) == bench_run.total_runs(settings, targets, cases) == 2
    payload = report.to_json()
    assert payload["sweep"] is True and payload["prompt_lengths"] == [62] and payload["new_tokens"] == [2]
    assert [a["label"] for a in payload["artifacts"]] == ["A", "B"]
    assert payload["artifacts"][0]["results"][0]["decode_vs_first"] == 1
    assert json.loads(json.dumps(payload, allow_nan=False)) == payload
    assert bench_run.finite({"x": [float("nan"), 1.0]}) == {"x": [None, 1.0]}
    assert bench_run.labels([Path("a/x"), Path("b/x")]) == ["a/x", "b/x"]


# ----------------------------------------------------------------------------- CLI
def test_two_artifacts_interleaved_json(export, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = export("qwen2_tied"), export("qwen2_tied", dtype="fp16")
    order: list[int] = []
    real = bench_mod.run_once

    def recording(engine, prompt, new_tokens):
        order.append(id(engine))
        return real(engine, prompt, new_tokens)

    monkeypatch.setattr(bench_mod, "run_once", recording)
    result = invoke("bench", a, b, "--prompt-lengths", "4,8", *FAST, "--repeats", "2", "--json")
    assert result.exit_code == 0, result.output
    first, second = order[0], order[1]
    assert first != second and order == [first, second] * 4  # A, B, A, B: 2 cases x 2 repeats

    payload = json.loads(result.stdout)
    assert payload["order"] == "interleaved" and payload["repeats"] == 2 and payload["warmup"] == 0
    assert [x["artifact"] for x in payload["artifacts"]] == [str(a), str(b)]
    assert "results" not in payload and "artifact" not in payload  # each artifact's results, listed once
    machine = payload["machine"]
    assert machine["logical_cores"] >= 1 and machine["cpu"] and "onnxruntime" in machine["packages"]
    assert [x["threads"] for x in payload["artifacts"]] == [0, 0]
    assert payload["peak_rss_mb"] > 0 and "share one process" in payload["rss_note"]
    fp32, fp16 = payload["artifacts"]
    assert (fp32["dtype"], fp16["dtype"]) == ("fp32", "fp16")
    assert (fp32["weights"], fp16["weights"]) == ("fp32", "fp16")  # the weight scheme (quantized: its phrase)
    assert fp32["kv_bytes_per_token"] == 2 * fp16["kv_bytes_per_token"]
    for art in payload["artifacts"]:
        assert art["load_s"] > 0 and art["disk_mb"] > 0 and "rss_load_mb" in art
        assert [(r["prompt_tokens"], r["new_tokens"]) for r in art["results"]] == [(4, 3), (8, 3)]
        for r in art["results"]:  # two runs: the spread is defined
            assert r["ttft_ms_min"] <= r["ttft_ms"] <= r["ttft_ms_max"] and r["ttft_ms_std"] >= 0
            assert r["decode_tokens_per_s_min"] <= r["decode_tokens_per_s"] <= r["decode_tokens_per_s_max"]
            assert r["decode_tokens_per_s_std"] >= 0 and r["prefill_tokens_per_s_std"] >= 0
            assert r["ttft_ms"] > 0 and r["decode_tokens_per_s"] > 0 and r["peak_rss_mb"] > 0
            assert r["token_latency_ms_p10"] <= r["token_latency_ms_p50"] <= r["token_latency_ms_p90"]
            assert r["kv_cache_mb"] == pytest.approx(art["kv_bytes_per_token"] * (r["prompt_tokens"] + 3) / 2**20)
    assert all(r["decode_vs_first"] == 1.0 for r in fp32["results"])
    assert all(r["ttft_vs_first"] > 0 for r in fp16["results"])
    # decode bandwidth against the machine's copy bandwidth, and what the engine chose
    copy = payload["copy_bandwidth"]
    assert copy["best_gbs"] >= copy["median_gbs"] > 0 and copy["threads"] >= 1 and copy["read_gbs"] > 0
    for art in payload["artifacts"]:
        assert art["kernels"]["threads"].isdigit() and art["kernels"]["kv cache"] in ("fp32", "fp16")
        assert 0 < art["weight_bytes_per_token"] <= art["disk_mb"] * 2**20
        for r in art["results"]:
            bw = r["decode_bandwidth"]
            expect = (bw["weight_bytes_per_token"] + bw["kv_bytes_per_token_read"]) * r["decode_tokens_per_s"] / 1e9
            assert bw["achieved_gbs"] == pytest.approx(expect) and bw["fraction_of_copy"] > 0
            assert bw["fraction_of_read"] == pytest.approx(bw["achieved_gbs"] / copy["read_gbs"])
    assert fp32["weight_bytes_per_token"] > fp16["weight_bytes_per_token"]


def test_table_has_ratio_columns(export) -> None:
    a, b = export("qwen2_tied"), export("qwen2_tied", dtype="fp16")
    result = invoke("bench", a, b, "--prompt-lengths", "4", *FAST)
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "interleaved" in text and "first" in text and "1.00" in text
    assert "VmHWM" in text and "share one process" in text.replace("\n", " ")
    assert "copy bandwidth" in text and "GB/s" in text and "engine chose" in text


def test_markdown_csv_and_a_thread_sweep(export) -> None:
    art = export("qwen2_tied")
    args = ("bench", art, "--prompt-lengths", "4", *FAST, "--repeats", "2", "--threads", "1,2")
    markdown = invoke(*args, "--format", "markdown")
    assert markdown.exit_code == 0, markdown.output
    lines = markdown.stdout.strip().splitlines()
    assert lines[0].startswith("| artifact | weights | threads | prompt | new | TTFT ms |") and len(lines) == 4
    assert [line.split(" | ")[2] for line in lines[2:]] == ["1", "2"] and " ± " in lines[2]
    assert f"| {art.name} @1t | fp32 |" in lines[2]
    csv_text = invoke(*args, "--format", "csv").stdout.splitlines()
    assert csv_text[0].startswith("artifact,weights,threads,prompt,new,runs,ttft_ms,ttft_ms_std,")
    assert len(csv_text) == 3 and csv_text[1].split(",")[2] == "1"
    _one_line_error(invoke("bench", art, "--format", "xml"), "--format")
    _one_line_error(invoke("bench", art, "--threads", "1,x"), "--threads")


def test_plot_file(export, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (the plot extra)")
    a, b = export("qwen2_tied"), export("qwen2_tied", dtype="fp16")
    out = tmp_path / "bench.png"
    result = invoke("bench", a, b, "--prompt-lengths", "4,8", *FAST, "--plot", out)
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 1000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib(export, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = invoke("bench", export("qwen2_tied"), *FAST, "--plot", tmp_path / "x.png")
    _one_line_error(result, "pip install matplotlib")
    assert not (tmp_path / "x.png").exists()


def test_sweep(export) -> None:
    art = export("qwen2_tied")  # context 256
    result = invoke("bench", art, "--sweep", "--sweep-max", "200", *FAST, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["sweep"] is True and payload["prompt_lengths"] == [128, 200]
    rows = payload["artifacts"][0]["results"]
    assert [r["prompt_tokens"] for r in rows] == [128, 200]
    assert rows[1]["kv_cache_mb"] > rows[0]["kv_cache_mb"] > 0

    # default maximum: the context (256) minus the new tokens (3)
    result = invoke("bench", art, "--sweep", *FAST, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["prompt_lengths"] == [128, 253]

    result = invoke("bench", art, "--sweep", "--sweep-max", "16", *FAST)
    assert result.exit_code == 0, result.output
    assert "KV cache" in result.stdout and "context sweep" in result.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--prompt-lengths", "8,x"), "--prompt-lengths"),
        (("--prompt-lengths", "0"), "--prompt-lengths"),
        (("--new-tokens", ""), "--new-tokens"),
        (("--prompt-lengths", "300"), "context"),
        (("--repeats", "0"), "repeats"),
        (("--warmup", "-1"), "warmup"),
        (("--sweep-max", "64"), "--sweep"),
        (("--sweep", "--prompt-lengths", "8"), "--prompt-lengths"),
        (("--sweep", "--sweep-max", "0"), "--sweep-max"),
        (("--sweep", "--sweep-max", "250", "--new-tokens", "8"), "context"),
        (("--sweep", "--new-tokens", "256"), "no room"),
        (("--plot", "out.txt"), ".png"),
        (("--plot", "/nonexistent/dir/x.png"), "does not exist"),
    ],
)
def test_bad_inputs_are_one_line_errors(export, args: tuple[str, ...], fragment: str) -> None:
    _one_line_error(invoke("bench", export("qwen2_tied"), *args), fragment)


def test_bad_artifact_paths(export, tmp_path: Path) -> None:
    _one_line_error(invoke("bench", export("qwen2_tied"), tmp_path / "missing"), "not an artifact directory")
    _one_line_error(invoke("bench", tmp_path), "manifest")


def test_decode_weight_bytes_leave_out_a_gathered_table(tmp_path: Path) -> None:
    """Weight bytes per decode step: the weight files, less an embedding table that is only
    gathered (untied); a tied table is the lm_head too and is read whole."""
    from qwen_export.artifact import Manifest
    from qwen_export.runtime import bandwidth

    (tmp_path / "model.onnx").write_bytes(b"x" * 1000)
    (tmp_path / "model.onnx.data").write_bytes(b"x" * 10**6)
    (tmp_path / "tokenizer.json").write_bytes(b"x" * 500)
    files = {"model.onnx": "", "model.onnx.data": "", "tokenizer.json": ""}
    spec = {"vocab_size": 100, "hidden_size": 64, "tie_word_embeddings": True}
    quant = {"weights": "int4", "embedding_bits": 8, "block_size": 32, "symmetric": False}
    tied = Manifest("onnxruntime", "fp32", "last", spec, files=files, extra={"quantization": quant})
    assert bandwidth.decode_weight_bytes(tmp_path, tied) == 10**6 + 1000
    untied = Manifest(
        "onnxruntime",
        "fp32",
        "last",
        {**spec, "tie_word_embeddings": False},
        files=files,
        extra={"quantization": quant},
    )
    table = 100 * 64 + 4 * 200 + 200  # int8 codes, one fp32 scale and one int8 zero point per block
    assert bandwidth.gathered_embedding_bytes(untied) == table
    assert bandwidth.decode_weight_bytes(tmp_path, untied) == 10**6 + 1000 - table
    compact = Manifest(  # 300 scale values stored as float16 in the file, float32 once loaded
        "onnxruntime",
        "fp32",
        "last",
        spec,
        files=files,
        passes=[{"name": "matmulnbits", "fired": {"matmulnbits": 3, "compact_scale_values": 300}}],
        extra={"quantization": quant},
    )
    assert bandwidth.decode_weight_bytes(tmp_path, compact) == 10**6 + 1000 + 600
    plain = Manifest("onnxruntime", "fp16", "last", {**spec, "tie_word_embeddings": False}, files=files)
    assert bandwidth.gathered_embedding_bytes(plain) == 100 * 64 * 2
    achieved = bandwidth.decode_bandwidth(10**9, 1000, 24, 2.0, bandwidth.CopyBandwidth(8.0, 7.0, 2, 256))
    assert achieved.achieved_gbs == pytest.approx(2 * (10**9 + 24000) / 1e9)
    assert achieved.fraction_of_copy == pytest.approx(achieved.achieved_gbs / 8.0) and achieved.fraction_of_read == 0
    read = bandwidth.decode_bandwidth(10**9, 0, 0, 2.0, bandwidth.CopyBandwidth(8.0, 7.0, 2, 256, read_gbs=10.0))
    assert read.fraction_of_read == pytest.approx(0.2)
    with pytest.raises(ValueError, match="threads >= 1"):
        bandwidth.copy_bandwidth(threads=0)


def test_decode_weight_bytes_count_the_prepacked_block_sums(qwen2_tied: Path, tmp_path: Path) -> None:
    """On x86, ONNX Runtime's int8-activation MatMulNBits keeps a float32 sum per weight block beside
    what the file holds: 4 bytes per block of every linear and of the tied head, counted from the
    model's shapes here (and nothing on another machine, or at accuracy level 1)."""
    from qwen_export.artifact import load_manifest
    from qwen_export.export.pipeline import ExportOptions
    from qwen_export.export.pipeline import export as run_export
    from qwen_export.quant.scheme import QuantAlgorithm, QuantScheme, WeightFormat
    from qwen_export.runtime import bandwidth
    from qwen_export.spec import ModelSpec

    scheme = QuantScheme(WeightFormat.INT4, 32, symmetric=False, algorithm=QuantAlgorithm.RTN, embedding_bits=4)
    sums = {}
    for level in (4, 1):
        out = tmp_path / f"level{level}"
        run_export(qwen2_tied, out, ExportOptions(quant=scheme, accuracy_level=level, max_length=64))
        manifest = load_manifest(out)
        sums[level] = bandwidth.prepacked_sum_bytes(out, manifest, machine="x86_64")
        assert bandwidth.prepacked_sum_bytes(out, manifest, machine="aarch64") == 0
    spec = ModelSpec.from_dict(manifest.spec)
    h, i, q, kv = spec.hidden_size, spec.intermediate_size, spec.num_attention_heads, spec.num_key_value_heads
    d = spec.head_dim
    per_layer = (q + 2 * kv) * d * h + h * q * d + 2 * i * h + h * i  # qkv, o, gate, up, down: N x K weights
    blocks = (spec.num_hidden_layers * per_layer + spec.vocab_size * h) // 32  # + the tied head
    assert sums == {4: 4 * blocks, 1: 0}
