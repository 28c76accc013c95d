"""``python -m qwen_export.cli``: the ``qwen-export`` command."""

from qwen_export.cli import main

main()
