"""The target registry: every registered backend implements the whole TargetBackend protocol, and
looking targets up imports no engine SDK, torch or onnxscript."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qwen_export import targets
from qwen_export.spec import Target
from qwen_export.targets.protocol import TargetBackend

MEMBERS = sorted(name for name in {*TargetBackend.__annotations__, *vars(TargetBackend)} if not name.startswith("_"))


@pytest.mark.parametrize("target", list(Target), ids=lambda t: t.value)
def test_every_target_is_registered_and_complete(target: Target) -> None:
    backend = targets.get(target)
    assert backend.target is target and backend is targets.get(target.value)
    missing = [name for name in MEMBERS if not hasattr(backend, name)]
    assert not missing, f"{target.value} lacks {missing}"
    assert backend.engines[0] is target and backend.cpu_runs()


def test_looking_targets_up_imports_no_engine() -> None:
    code = (
        "import sys\nfrom qwen_export import targets\n"
        "[(b.cache_io, b.engines, b.graph_dtype) for b in targets.registered()]\n"
        "heavy = [m for m in ('torch', 'onnxscript', 'onnxruntime', 'openvino', 'tensorrt') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout
