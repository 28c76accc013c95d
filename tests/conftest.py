"""Shared fixtures: tiny seeded Qwen checkpoints, built once per test session (no download).

Every fixture returns the checkpoint directory. They are shared by all tests: treat them as
read-only and copy one (``shutil.copytree``) before modifying it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import noise
import pytest

from qwen_export.cpuinfo import (  # the CPU features that change the engines' kernels (and rounding)
    KERNEL_FLAGS,
    cpu_model_and_flags,
)
from qwen_export.export.tiny import make_checkpoint
from qwen_export.export.trace import TRACE_CACHE_ENV

# The CLI prints with rich, which wraps at 80 columns when stdout is not a terminal (CliRunner):
# a long temporary path then splits the phrases the CLI tests look for. Tests read one line each.
os.environ.setdefault("COLUMNS", "240")


def cpu_description() -> str:
    """``<model name>; flags: avx2 avx512f ...`` (the kernel-relevant ones) from /proc/cpuinfo."""
    model, flags = cpu_model_and_flags()
    present = [flag for flag in KERNEL_FLAGS if flag in flags]
    return f"{model}; {os.cpu_count()} cores; flags: {' '.join(present) or 'none of ' + ' '.join(KERNEL_FLAGS)}"


def pytest_configure(config: pytest.Config) -> None:
    """One traced-graph cache for the whole run (the controller makes it; xdist workers and the CLI
    subprocesses tests start inherit the variable): each tiny model shape and trace option set is
    traced once per run instead of once per process (export.trace.TRACE_CACHE_ENV). Removed at the
    end of the run; a run given its own directory keeps it."""
    if hasattr(config, "workerinput") or os.environ.get(TRACE_CACHE_ENV):
        return
    directory = tempfile.mkdtemp(prefix="qwen-export-traces-")
    os.environ[TRACE_CACHE_ENV] = directory
    config.add_cleanup(lambda: (shutil.rmtree(directory, ignore_errors=True), os.environ.pop(TRACE_CACHE_ENV, None)))


def pytest_report_header(config: pytest.Config) -> str:
    return f"cpu: {cpu_description()}"


#: engine labels of the parity suite -> the xdist group that also runs that engine's own module
_ENGINE_GROUPS = {"openvino": "openvino", "openvino-stateful": "openvino", "tensorrt": "tensorrt"}
_MODULE_GROUPS = {
    "test_openvino": "openvino",
    "test_tensorrt_engine": "tensorrt",
    "test_tensorrt_target": "tensorrt",
    "test_serve": "test_llm",  # the server's tests reuse test_llm's export of the tiny Qwen2
    "test_batching": "test_llm",
    "test_vl_artifact": "test_vl_vision",  # both use the session's VL artifacts
}


#: The parity suite's engine x model-family matrix in the default run: every family on ONNX Runtime
#: (the reference target) and, on the other engines, the families whose exports their own modules
#: make anyway plus the code paths only they lower (MoE, sliding windows); the rest of the matrix
#: (each a fresh trace and export, 10-45 s) is marked ``matrix``, which ``.ci/run`` runs after the
#: default suite (``-m matrix``).
PARITY_DEFAULT_CASES = {
    "openvino": {"qwen2_tied", "qwen2_untied", "qwen2_yarn_bf16_sharded", "qwen3", "qwen2_sliding", "qwen2_moe"},
    "openvino-stateful": {"qwen2_tied", "qwen2_untied", "qwen2_sliding", "qwen2_moe"},
    "tensorrt": {"qwen2_tied", "qwen2_untied", "qwen2_moe"},
}
#: parity tests of one export per engine that the default run keeps for these engines only
PARITY_DEFAULT_SINGLE = {
    "test_full_logits_artifact_matches_every_position": {"onnxruntime", "openvino", "openvino-stateful"},
}


#: Modules of one engine, quantizer or model family whose exports take long (each 40-220 s of test
#: time): marked ``extended``, which ``.ci/run`` runs after the default suite (``-m "matrix or
#: extended"``), so that the default run stays near 10 minutes on 2 cores. The parity suite keeps
#: every engine and family in the default run (see PARITY_DEFAULT_CASES).
EXTENDED_MODULES = frozenset(
    {
        "test_openvino",
        "test_vl_artifact",
        "test_vl_vision",
        "test_quant_gptq",
        "test_quant_awq",
        "test_moe",
        "test_prefill_int8",
        "test_kv_int8",
        "test_gguf_import",
        "test_tensorrt_engine",
    }
)


def _in_matrix_only(item: pytest.Item) -> bool:
    """Whether a parity test belongs to the rest of the matrix (see :data:`PARITY_DEFAULT_CASES`)."""
    params = item.callspec.params if hasattr(item, "callspec") else {}
    engine, case = params.get("target"), params.get("case")
    if engine is None or engine == "onnxruntime":
        return False
    name = item.originalname if isinstance(item, pytest.Function) else item.name
    if name in PARITY_DEFAULT_SINGLE:
        return engine not in PARITY_DEFAULT_SINGLE[name]
    return case is not None and case not in PARITY_DEFAULT_CASES.get(engine, set())


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With ``-n N --dist loadgroup`` (the README's command) a group runs on one worker, so the
    session-scoped exports a group needs are made once: a module is a group, except that the parity
    suite is split by engine and each engine's part joins that engine's own module (so does
    test_long_context, which reuses the parity suite's YaRN exports)."""
    for item in items:
        module = item.module.__name__ if item.module is not None else item.nodeid
        group = _MODULE_GROUPS.get(module, module)
        if module in ("test_parity", "test_speculative", "test_long_context"):  # reuse the parity exports
            engine = item.callspec.params.get("target") if hasattr(item, "callspec") else None
            group = _ENGINE_GROUPS.get(engine, "parity-onnxruntime")
        if module == "test_parity" and _in_matrix_only(item):
            item.add_marker(pytest.mark.matrix)
        if module in EXTENDED_MODULES:
            item.add_marker(pytest.mark.extended)
        item.add_marker(pytest.mark.xdist_group(group))
        _join_group(config, item, group)


def _join_group(config: pytest.Config, item: pytest.Item, group: str) -> None:
    """Put ``@group`` at the end of the item's node id, which is what xdist's loadgroup scheduler
    groups by. xdist 3.8 does this itself by setting ``item._nodeid``, which pytest 9 no longer
    reads (its node id is the structured ``item._id``), so without this every test would be
    scheduled alone and each worker would make its own copy of every export."""
    if not getattr(config.option, "loadgroup", False) or not hasattr(item, "_id") or "@" in str(item._id):
        return
    grouped = dataclasses.replace(item._id)
    object.__setattr__(grouped, "_str_cache", f"{item._id}@{group}")  # its str(), cached
    item._id = grouped


def pytest_sessionfinish(session: pytest.Session) -> None:
    """An xdist worker hands its noise-model headroom to the controller, which prints the summary."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["noise_worst"] = {kind.name: worst for kind, worst in noise.WORST.items()}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    for name, worst in getattr(node, "workeroutput", {}).get("noise_worst", {}).items():
        kind = noise.Noise[name]
        noise.WORST[kind] = max(noise.WORST.get(kind, 0.0), worst)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    terminalreporter.write_line(f"cpu: {cpu_description()}")
    terminalreporter.write_line(noise.summary())


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def qwen2_tied(tiny_root: Path) -> Path:
    """Qwen2, tied embeddings, fp32, single model.safetensors, real vocab + tokenizer."""
    return make_checkpoint(tiny_root / "qwen2_tied", "qwen2", tied=True)


@pytest.fixture(scope="session")
def qwen2_untied(tiny_root: Path) -> Path:
    """Qwen2, separate lm_head, fp32, single file."""
    return make_checkpoint(tiny_root / "qwen2_untied", "qwen2", tied=False)


@pytest.fixture(scope="session")
def qwen2_yarn_bf16_sharded(tiny_root: Path) -> Path:
    """Qwen2, untied, YaRN (factor 4, original 64, max 256), bfloat16, several shards + index."""
    return make_checkpoint(
        tiny_root / "qwen2_yarn_bf16_sharded", "qwen2", tied=False, yarn=True, dtype="bfloat16", shards=2
    )


@pytest.fixture(scope="session")
def qwen3(tiny_root: Path) -> Path:
    """Qwen3, untied, q_norm/k_norm, explicit head_dim 32 (hidden 64 / 4 heads would give 16)."""
    return make_checkpoint(tiny_root / "qwen3", "qwen3", tied=False, head_dim=32)


#: the MoE fields of the tiny MoE checkpoints (4 or 8 experts, top-2)
QWEN2_MOE = dict(
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
    norm_topk_prob=False,
    mlp_only_layers=[1],
)
QWEN3_MOE = dict(
    num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True, decoder_sparse_step=2
)


@pytest.fixture(scope="session")
def qwen2_moe(tiny_root: Path) -> Path:
    """Qwen2-MoE, 3 layers: sparse, dense (mlp_only_layers=[1]), sparse; 4 experts, top-2, no
    renormalisation, a shared expert with its sigmoid gate; untied."""
    return make_checkpoint(tiny_root / "qwen2_moe", "qwen2_moe", tied=False, layers=3, moe=QWEN2_MOE)


@pytest.fixture(scope="session")
def qwen3_moe(tiny_root: Path) -> Path:
    """Qwen3-MoE, 3 layers with decoder_sparse_step 2 (dense, sparse, dense); 8 experts, top-2,
    norm_topk_prob; no shared expert; q/k norms; untied."""
    return make_checkpoint(tiny_root / "qwen3_moe", "qwen3_moe", tied=False, layers=3, moe=QWEN3_MOE)


@dataclass
class ModuleScratch:
    """Directories and cached builds that live for one test module, then are deleted.

    The suite exports dozens of tiny models (each ~40 MB: the real 151,936-token vocabulary);
    keeping every module's builds until the session ends needed >5 GB of disk, more than some
    CI machines have free. Session-wide builds stay in ``tmp_path_factory``.
    """

    factory: pytest.TempPathFactory
    cache: dict[Any, Any] = field(default_factory=dict)
    made: list[Path] = field(default_factory=list)

    def mkdir(self, name: str) -> Path:
        path = self.factory.mktemp(name)
        self.made.append(path)
        return path

    def release(self) -> None:
        self.cache.clear()
        for path in self.made:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def module_scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleScratch]:
    scratch = ModuleScratch(tmp_path_factory)
    yield scratch
    scratch.release()


# Exports of the fixtures above, shared by the parity, engine and CLI tests.
from export_fixtures import export, qwen2_sliding  # noqa: E402,F401


@pytest.fixture(scope="session", params=["qwen2_vl", "qwen2_5_vl"])
def vl_artifact(request: pytest.FixtureRequest, tiny_root: Path) -> tuple[Path, Path]:
    """(checkpoint, fp32 artifact) of a tiny seeded Qwen2-VL / Qwen2.5-VL, exported once per session."""
    from qwen_export.export.pipeline import ExportOptions
    from qwen_export.export.pipeline import export as run_export
    from qwen_export.export.tiny_vl import make_vl_checkpoint

    ckpt = make_vl_checkpoint(tiny_root / request.param, request.param, seed=3)
    out = tiny_root / f"{request.param}-artifact"
    if not out.exists():
        run_export(ckpt, out, ExportOptions())
    return ckpt, out
