"""Real-size check (marked slow; run with ``pytest -m slow``): a random-weight checkpoint with the
Qwen2.5-0.5B shape exports with fp32 parity against transformers within 1e-3 on the logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from qwen_export.export.pipeline import ExportOptions, export
from qwen_export.export.tiny import QWEN25_05B_SHAPE, make_checkpoint
from qwen_export.runtime.loader import open_artifact

pytestmark = pytest.mark.slow


def test_qwen25_05b_shape_fp32_parity(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", init="transformers", **QWEN25_05B_SHAPE)
    out = tmp_path / "art"
    export(ckpt, out, ExportOptions())
    engine = open_artifact(out).engine
    prompt = np.random.default_rng(0).integers(0, 151643, 32, dtype=np.int64)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(ckpt), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ids = torch.tensor(prompt[None])
    logits = engine.forward(prompt[None])[0, -1]
    for step in range(5):
        with torch.no_grad():
            expected = ref(ids).logits[0, -1].numpy()
        np.testing.assert_allclose(logits, expected, atol=1e-3, rtol=0, err_msg=f"step {step}")
        token = int(np.argmax(expected))
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        logits = engine.forward(np.array([[token]], np.int64))[0, -1]
