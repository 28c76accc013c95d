"""The runtime side (load an artifact, generate) must not import torch, transformers or onnxscript,
nor the server's FastAPI/uvicorn (the ``serve`` extra)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_runtime_runs_without_importing_torch(export) -> None:
    art = export("qwen2_tied")
    code = textwrap.dedent(
        f"""
        import sys
        from qwen_export.runtime.loader import open_artifact
        from qwen_export.runtime.generation import Generator, GenerationConfig
        loaded = open_artifact({str(art)!r})
        ids = loaded.tokenizer.apply_chat_template_ids([{{"role": "user", "content": "hi"}}])
        result = Generator(loaded.engine, loaded.tokenizer).generate_text(ids, GenerationConfig(max_new_tokens=3))
        assert result.completion_tokens >= 1
        import qwen_export
        qwen_export.load  # the public API
        heavy = ("torch", "transformers", "onnxscript", "fastapi", "starlette", "uvicorn")
        heavy = sorted(m for m in heavy if m in sys.modules)
        print("HEAVY", heavy)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout
