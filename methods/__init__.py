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
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import benchmark.compat  # noqa: F401  (torchvision without its operators: see there)
from benchmark.config import knob, non_negative, positive, read_yaml, validate
from methods.base import Context, DapPlan, Method, NoArgs

__all__ = [
    "Context",
    "DapPlan",
    "Method",
    "NoArgs",
    "MethodError",
    "available_methods",
    "build_method",
    "describe_args",
    "get_method_class",
    "knob",
    "non_negative",
    "positive",
    "method_defaults",
    "register",
]

_REGISTRY: dict[str, type[Method]] = {}
_SHARED_MODULES = {"base", "modeling", "gates", "buffer", "isolation", "importance_figures"}
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
    """The values a variant's YAML beside its module sets (`methods/dga.yaml`), else {}.

    A method's defaults live in its `Args` dataclass alone; a YAML file is only for a registered
    variant that reuses another method's class with other defaults."""
    module = importlib.import_module(cls.__module__)
    path = Path(module.__file__).with_suffix(".yaml") if module.__file__ else None
    if path is None or not path.exists():
        return {}
    loaded = read_yaml(path) or {}
    section = loaded.get(cls.name, loaded) if isinstance(loaded, dict) else None
    if not isinstance(section, dict):
        raise MethodError(f"{path}: must be a mapping of {cls.name}'s arguments to values")
    validate(cls.Args, section, str(path), f"method {cls.name!r}: ")
    return section


def describe_args(cls: type[Method]) -> list[tuple[str, str, str, str]]:
    """[(option, type, default, help)] of a method's `Args`, in declaration order: what
    `python -m benchmark list methods --args NAME` prints. The defaults are the ones the method
    runs with (a variant's YAML beside its module included)."""
    hints = get_type_hints(cls.Args)
    defaults = vars(cls.Args())
    defaults.update(method_defaults(cls))
    return [(f.name, _type_name(hints[f.name]), repr(defaults[f.name]), f.metadata.get("help", ""))
            for f in dataclasses.fields(cls.Args)]


def _type_name(hint: Any) -> str:
    if get_origin(hint) is Literal:
        return "{" + ",".join(str(a) for a in get_args(hint)) + "}"
    if get_origin(hint) in (list, tuple, dict):
        return f"{get_origin(hint).__name__} of " + ", ".join(_type_name(a) for a in get_args(hint))
    if get_origin(hint) in (Union, UnionType):
        return " | ".join(_type_name(a) for a in get_args(hint))
    return getattr(hint, "__name__", str(hint))


def build_method(name: str, overrides: dict[str, Any] | None = None,
                 source: str = "method_args") -> Method:
    """Instantiate a registered method with its defaults and `overrides`, each checked against
    the type and check its `Args` declares (a bad one raises `ConfigError`, naming `source`)."""
    cls = get_method_class(name)
    values = {**method_defaults(cls), **(overrides or {})}
    return cls(validate(cls.Args, values, source, f"method {name!r}: "))
