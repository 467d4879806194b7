"""Imports run downwards only, lazy ones included (README, "Architecture").

Every import statement in the package's files, at any depth (module level, in a function, under
`if TYPE_CHECKING`), and every `importlib.import_module("...")` with a literal name, is held to the
layer table. Bare top-level names (`import export`) are refused too: the package is `diffsr`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# layer -> the layers it may import (itself always)
ALLOWED = {
    "export": set(),
    "runtime": {"export"},
    "calib": {"runtime", "export"},
    "triton_models": {"runtime", "export"},
    "app": {"triton_models", "calib", "runtime", "export"},
}


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file; relative imports are refused."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.append((node.lineno, "." * node.level + (node.module or "")))
            else:
                names = [alias.name for alias in node.names] if node.module == "diffsr" else [""]
                found += [(node.lineno, ".".join(filter(None, (node.module, name)))) for name in names]
        elif (isinstance(node, ast.Call) and _callee(node.func) in ("import_module", "__import__")
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
    return found


def _callee(func: ast.expr) -> str | None:
    """`import_module` for importlib.import_module(...), import_module(...) and the like."""
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None


def violations(layer: str, path: Path) -> list[str]:
    bad = []
    for line, module in imported_modules(path.read_text()):
        where = f"{path.relative_to(ROOT)}:{line}"
        parts = module.split(".")
        if module.startswith("."):
            bad.append(f"{where}: relative import {module!r}: write diffsr.<layer>.<module>")
        elif parts[0] in ALLOWED:
            bad.append(f"{where}: bare {module!r}: the package is diffsr.{parts[0]}")
        elif parts[0] == "diffsr" and len(parts) > 1:
            target = parts[1]
            if target != layer and target not in ALLOWED[layer]:
                bad.append(f"{where}: {layer} imports {module} ({target} is above it)")
    return bad


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_downwards(layer):
    files = sorted((ROOT / layer).rglob("*.py"))
    assert files, f"no files in {layer}/"
    bad = [v for path in files for v in violations(layer, path)]
    assert not bad, "\n".join(bad)


def test_the_check_catches_lazy_and_hidden_imports(tmp_path):
    """Planted violations of every form the check claims to catch."""
    planted = tmp_path / "planted.py"
    planted.write_text(
        "import importlib\nfrom importlib import import_module\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from diffsr.runtime.pipeline import Pipeline\n"
        "def f():\n    from diffsr.app import cli\n    import diffsr.calib.fp16\n"
        "    importlib.import_module('diffsr.triton_models.repository')\n"
        "    from export.config import ModelConfig\n"
        "    from .signatures import Signature\n"
        "    import_module('diffsr.app.cli.main')\n"
        "from diffsr.export.core.errors import DiffsrError\n"
    )
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = violations("export", planted)
    finally:
        ROOT = saved
    assert len(found) == 7, found
    for text in ("diffsr.runtime.pipeline", "diffsr.app", "diffsr.app.cli.main", "diffsr.calib.fp16", "diffsr.triton_models.repository",
                 "bare 'export.config'", "relative import '.signatures'"):
        assert any(text in v for v in found), text
