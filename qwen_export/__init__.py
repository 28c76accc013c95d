"""qwen-export: compile Qwen checkpoints into verified engines and run them.

Importing this package does not import torch or any engine SDK.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
