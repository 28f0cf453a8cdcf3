"""The method zoo: a registry mapping names to small `Method` classes.

Built-in methods register themselves with `@register("name")`. An outside package adds one
through the `benchmark.methods` entry-point group (`name = "package.module:Class"`).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import yaml

import benchmark.compat  # noqa: F401  (torchvision without its operators: see there)
from methods.base import DapPlan, Method, NoArgs

__all__ = [
    "DapPlan",
    "Method",
    "NoArgs",
    "MethodError",
    "available_methods",
    "build_method",
    "get_method_class",
    "method_defaults",
    "register",
]

_REGISTRY: dict[str, type[Method]] = {}
_SHARED_MODULES = {"base", "modeling", "gates", "buffer", "isolation"}
_loaded = False


class MethodError(ValueError):
    """An unknown method or a bad method argument; the message says what is valid."""


def register(name: str):
    """Class decorator: make a `Method` subclass available under `name`."""

    def wrap(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise MethodError(f"method name {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _SHARED_MODULES:
            importlib.import_module(f"methods.{info.name}")
    for entry in entry_points(group="benchmark.methods"):
        cls = entry.load()
        if entry.name not in _REGISTRY:
            register(entry.name)(cls)


def available_methods() -> dict[str, type[Method]]:
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def get_method_class(name: str) -> type[Method]:
    _load_all()
    if name not in _REGISTRY:
        raise MethodError(f"unknown method {name!r}; valid methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def method_defaults(cls: type[Method]) -> dict[str, Any]:
    """The method's own defaults: its `Args` dataclass overlaid by the YAML file beside it."""
    values = {f.name: f.default for f in dataclasses.fields(cls.Args)
              if f.default is not dataclasses.MISSING}
    module = importlib.import_module(cls.__module__)
    if module.__file__:
        path = Path(module.__file__).with_suffix(".yaml")
        if path.exists():
            loaded = yaml.safe_load(path.read_text()) or {}
            section = loaded.get(cls.name, loaded) if isinstance(loaded, dict) else {}
            values.update(section)
    return values


def build_method(name: str, overrides: dict[str, Any] | None = None) -> Method:
    """Instantiate a registered method with its defaults and `overrides` (checked by name)."""
    cls = get_method_class(name)
    values = method_defaults(cls)
    known = {f.name for f in dataclasses.fields(cls.Args)}
    for key, value in (overrides or {}).items():
        if key not in known:
            valid = ", ".join(sorted(known)) or "(none)"
            raise MethodError(f"unknown argument {key!r} for method {name!r}; valid: {valid}")
        values[key] = value
    unknown = set(values) - known
    if unknown:
        raise MethodError(f"method {name!r}: its YAML sets unknown argument(s) {sorted(unknown)}")
    return cls(cls.Args(**values))
