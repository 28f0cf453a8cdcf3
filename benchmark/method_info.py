"""What a method class declares for the harness, read without importing it (no torch).

`table` sorts rows by each method's `table_rank` (`methods.base.Method`); importing the method
zoo to read it would import torch, PEFT and the adapters. The class attributes are plain
literals, so they are read from the source instead: the built-in modules of `methods/` and the
modules of the `benchmark.methods` entry points, each class's attribute from itself or the
nearest base class that sets it (as Python would). `tests/test_sweep.py` checks the result
equals the imported classes' attributes for every registered method.
"""

from __future__ import annotations

import ast
from functools import cache
from importlib.metadata import entry_points
from importlib.util import find_spec
from pathlib import Path
from typing import Any

_Class = tuple[list[str], dict[str, Any]]  # base class names, literal class attributes


def _classes(path: Path) -> tuple[dict[str, _Class], dict[str, str]]:
    """({class name: (base names, literal attributes)}, {registered name: class name})."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    classes: dict[str, _Class] = {}
    registered: dict[str, str] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        attrs: dict[str, Any] = {}
        for item in node.body:
            targets = ([item.target] if isinstance(item, ast.AnnAssign) and item.value
                       else item.targets if isinstance(item, ast.Assign) else [])
            for target in targets:
                if isinstance(target, ast.Name):
                    try:
                        attrs[target.id] = ast.literal_eval(item.value)
                    except ValueError:
                        pass  # not a literal: not a declaration this module reads
        classes[node.name] = ([b.id if isinstance(b, ast.Name) else getattr(b, "attr", "")
                               for b in node.bases], attrs)
        for deco in node.decorator_list:
            if (isinstance(deco, ast.Call) and getattr(deco.func, "id", "") == "register"
                    and deco.args and isinstance(deco.args[0], ast.Constant)):
                registered[deco.args[0].value] = node.name
    return classes, registered


def _attribute(name: str, attr: str, local: dict[str, _Class], shared: dict[str, _Class],
               default: Any) -> Any:
    seen: set[str] = set()
    pending = [name]
    while pending:
        current = pending.pop(0)
        if current in seen:
            continue
        seen.add(current)
        bases, attrs = local.get(current) or shared.get(current) or ([], {})
        if attr in attrs:
            return attrs[attr]
        pending += bases
    return default


@cache
def declared(attr: str, default: Any = None) -> dict[str, Any]:
    """{method name: its class's `attr`} for every built-in and entry-point method."""
    spec = find_spec("methods")
    shared: dict[str, _Class] = {}
    modules = []
    for folder in spec.submodule_search_locations if spec else []:
        for path in sorted(Path(folder).glob("*.py")):
            classes, registered = _classes(path)
            shared.update(classes)
            modules.append((classes, registered))
    out = {}
    for classes, registered in modules:
        for method, cls in registered.items():
            out[method] = _attribute(cls, attr, classes, shared, default)
    for entry in entry_points(group="benchmark.methods"):
        if entry.name in out:
            continue
        module, _, cls = entry.value.partition(":")
        found = find_spec(module)
        if found is None or not found.origin:
            continue
        classes, _ = _classes(Path(found.origin))
        out[entry.name] = _attribute(cls, attr, classes, shared, default)
    return out
