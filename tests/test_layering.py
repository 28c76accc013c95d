"""The package's layers, checked on the source: imports run only downward.

    cli (and the package's public __init__)
      -> serve/                      (the HTTP server over the runtime)
        -> export/  and  runtime/    (runtime never imports export/)
          -> targets/                (one package per target, found through the registry)
            -> shared: errors, spec, artifact, onnx_writer, weights, quant/, passes/

Every import counts, module-level or inside a function. Size limits keep modules and functions
readable: no module over 600 lines, no function over 80.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qwen_export"
LAYERS = {"shared": 0, "targets": 1, "runtime": 2, "export": 2, "serve": 3, "cli": 4}
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 600, 80


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:  # qwen_export itself: the public API
        return "cli"
    return parts[1] if parts[1] in LAYERS else "shared"


def _module(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    module, found = _module(path), []
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            for alias in node.names:  # ``from qwen_export import targets`` imports a submodule
                if alias.name == "__version__":
                    continue
                sub = f"{base}.{alias.name}"
                is_module = (PACKAGE.parent / (sub.replace(".", "/") + ".py")).is_file()
                found.append((node.lineno, sub if is_module or _is_package(sub) else base))
    return found


def _own_imports(path: Path) -> list[tuple[int, str]]:
    return [(line, name) for line, name in _imports(path) if name.split(".")[0] == "qwen_export"]


def _is_package(module: str) -> bool:
    return (PACKAGE.parent / module.replace(".", "/") / "__init__.py").is_file()


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_imports_run_downward(path: Path) -> None:
    here = _layer(_module(path))
    wrong = []
    for line, name in _own_imports(path):
        there = _layer(name)
        sideways_ok = here == there or {here, there} == {"export", "runtime"} and here == "export"
        if LAYERS[there] > LAYERS[here] or (LAYERS[there] == LAYERS[here] and not sideways_ok):
            wrong.append(f"line {line}: {here} imports {name} ({there})")
    assert not wrong, "\n".join(wrong)


RUNTIME = [path for path in SOURCES if _layer(_module(path)) == "runtime"]
HEAVY = ("torch", "transformers", "onnxscript")


@pytest.mark.parametrize("path", RUNTIME, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_runtime_never_imports_torch_transformers_or_onnxscript(path: Path) -> None:
    wrong = [f"line {line}: {name}" for line, name in _imports(path) if name.split(".")[0] in HEAVY]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_module_and_function_sizes(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    lines = len(text.splitlines())
    assert lines <= MAX_MODULE_LINES, f"{lines} lines"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, ", ".join(long)
