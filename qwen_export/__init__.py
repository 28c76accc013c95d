"""qwen-export: compile Qwen checkpoints into verified engines and run them.

The runtime API is :func:`load` -> :class:`LLM` (``generate``, ``stream``, ``chat`` with tools and
JSON-constrained output). Importing this package imports neither torch nor an engine SDK: the
engine a given artifact needs is imported when it is loaded.
"""

from __future__ import annotations

__version__ = "0.1.0"

from qwen_export.errors import (
    ArtifactError,
    CheckpointError,
    ConfigError,
    GenerationError,
    OptionError,
    QwenExportError,
)
from qwen_export.runtime.chat import ToolCall, parse_tool_calls  # noqa: E402
from qwen_export.runtime.generation import FinishReason, GenerationConfig, GenerationResult  # noqa: E402
from qwen_export.runtime.llm import LLM, ChatResult, TextStream, load  # noqa: E402
from qwen_export.runtime.speculative import Speculation, SpeculationKind  # noqa: E402

__all__ = [
    "LLM",
    "ArtifactError",
    "ChatResult",
    "CheckpointError",
    "ConfigError",
    "FinishReason",
    "GenerationConfig",
    "GenerationError",
    "GenerationResult",
    "OptionError",
    "QwenExportError",
    "Speculation",
    "SpeculationKind",
    "TextStream",
    "ToolCall",
    "__version__",
    "load",
    "parse_tool_calls",
]
