"""Imports run downwards only, lazy ones included (docs/architecture.md): between the layers, and between
the rooms inside a layer.

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
# layer -> room (a sub-package, or a module) -> the rooms of the same layer it may import (itself always); "" is
# the layer's own other top-level modules. A layer not listed, and its top-level modules, may import any of its rooms.
# A room may have rooms of its own ("export.model"), held to the same rule among themselves.
ROOMS = {
    "export": {"core": set(), "model": {"core"}, "graphs": {"core", "model"}, "engines": {"core", "model", "graphs"}},
    # the model's interface (dims, signatures, settings, inputs, the family and attachment classes) < the attachments
    # < the families (and their lookups) < reading checkpoint folders < writing seeded ones
    "export.model": {"": set(), "attachments": {""}, "families": {"", "attachments"},
                     "checkpoint": {"", "attachments", "families"}, "random_init": {"", "checkpoint", "families"}},
    "runtime": {"schedulers": set(), "backends": set()},  # leaves: the pipeline's modules build on them
    "triton_models": {"": set(), "models": {""}},  # the python models build on the generator's interface
    "app": {"serving": set(), "measure": {"serving"}, "cli": {"measure", "serving"}},
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
                # `from diffsr.export.model import families` imports diffsr.export.model.families: each name is
                # held as a module below the package (an attribute's extra part changes no room)
                diffsr = node.module == "diffsr" or (node.module or "").startswith("diffsr.")
                names = [alias.name for alias in node.names] if diffsr else [""]
                found += [(node.lineno, ".".join(filter(None, (node.module, name)))) for name in names]
        elif (isinstance(node, ast.Call) and _callee(node.func) in ("import_module", "__import__")
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
    return found


def _callee(func: ast.expr) -> str | None:
    """`import_module` for importlib.import_module(...), import_module(...) and the like."""
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None


def room_of(layer: str, parts: list[str]) -> str | None:
    """The room of a module path inside `layer` (parts after the layer's name; the last is the module's own
    name or a package's), "" for the layer's top-level modules, None where the layer has no room rules."""
    rooms = ROOMS.get(layer)
    if rooms is None or not parts:
        return None
    return parts[0] if parts[0] in rooms else ""


def violations(layer: str, path: Path) -> list[str]:
    bad = []
    inside = list(path.relative_to(ROOT / layer).with_suffix("").parts) if path.is_relative_to(ROOT / layer) else []
    own_room = room_of(layer, inside if len(inside) > 1 else [""])
    bad += _inner_violations(layer, own_room, inside, path)
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
            elif target == layer and own_room is not None:
                room = room_of(layer, parts[2:])
                allowed = ROOMS[layer].get(own_room, set(ROOMS[layer]) | {""})
                if room is not None and room != own_room and room not in allowed:
                    bad.append(f"{where}: {layer}.{own_room or '(top level)'} imports {module} ({room or 'the top level'} "
                               f"is not among {sorted(allowed) or 'none'})")
    return bad


def _inner_violations(layer: str, room: str | None, inside: list[str], path: Path) -> list[str]:
    """Imports between the rooms of a room (`ROOMS["export.model"]`)."""
    rooms = ROOMS.get(f"{layer}.{room}")
    if rooms is None or len(inside) < 2:
        return []
    own = inside[1] if inside[1] in rooms else ""
    bad = []
    for line, module in imported_modules(path.read_text()):
        parts = module.split(".")
        if parts[:3] != ["diffsr", layer, room] or len(parts) < 4:
            continue
        target = parts[3] if parts[3] in rooms else ""
        if target != own and target not in rooms[own]:
            bad.append(f"{path.relative_to(ROOT)}:{line}: {layer}.{room}.{own or '(interface)'} imports {module} "
                       f"({target or 'the interface'} is not among {sorted(rooms[own]) or 'none'})")
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


def test_the_check_catches_a_room_importing_upwards(tmp_path):
    """Planted in rooms: export's model reading a graph module, runtime's schedulers reading the pipeline, app's
    serving reading a measurement; and what is allowed (a room below, a top-level module of runtime)."""
    global ROOT
    saved, ROOT = ROOT, tmp_path
    planted = {
        "export/model/x.py": "from diffsr.export.graphs.manifest import read_manifest\nfrom diffsr.export.core import errors\n",
        # the model's interface reading a family module (either form of the import), and the attachments reading
        # checkpoint folders: upwards; the interface reading its own dims: allowed
        "export/model/y.py": "from diffsr.export.model.families import sd\nfrom diffsr.export.model import dims\n"
                             "from diffsr.export.model import random_init\n",
        "export/model/attachments/y.py": "from diffsr.export.model.checkpoint import open_checkpoint\n"
                                         "from diffsr.export.model.family import Attachment\n",
        "runtime/schedulers/x.py": "from diffsr.runtime.pipeline import Pipeline\n",
        "runtime/x.py": "from diffsr.runtime.schedulers import make_scheduler\n",
        "app/serving/x.py": "import diffsr.app.measure.bench\nfrom diffsr.export.model import family\n",
        "app/cli/x.py": "from diffsr.app.measure import bench\n",
    }
    try:
        found = {}
        for rel, source in planted.items():
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / rel).write_text(source)
            found[rel] = violations(rel.split("/")[0], tmp_path / rel)
    finally:
        ROOT = saved
    assert len(found["export/model/x.py"]) == 1 and "graphs" in found["export/model/x.py"][0]
    assert len(found["export/model/y.py"]) == 2 and "families" in found["export/model/y.py"][0]
    assert "random_init" in found["export/model/y.py"][1]
    assert len(found["export/model/attachments/y.py"]) == 1 and "checkpoint" in found["export/model/attachments/y.py"][0]
    assert len(found["runtime/schedulers/x.py"]) == 1 and "the top level" in found["runtime/schedulers/x.py"][0]
    assert len(found["app/serving/x.py"]) == 1 and "measure" in found["app/serving/x.py"][0]
    assert found["runtime/x.py"] == found["app/cli/x.py"] == []
