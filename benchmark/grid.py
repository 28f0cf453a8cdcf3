"""The sweep's grid file: every key with its type, default and meaning, and its checks.

A grid is rows (presets or methods) × suites × profiles × orders × seeds, plus how to run it;
`python -m benchmark sweep` reads one (`load_grid`), its flags override the file's keys.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmark.config import RunConfig, described_yamls, read_yaml

GRID_DIR = Path(__file__).parent / "grids"
EXECUTORS = ("local", "slurm", "submitit-local")

class GridError(ValueError):
    """A grid file or sweep flag that cannot be used; the message names the file and key."""


def _int_list(value: Any, key: str, source: str) -> list[int]:
    """`[0, 1]`, `3`, `"0-4"` or `"2021,111"` -> a list of ints."""
    items = value if isinstance(value, list) else [value]
    out: list[int] = []
    for item in items:
        if isinstance(item, bool):
            raise GridError(f"{source}: {key}: expected integers, got {item!r}")
        if isinstance(item, int):
            out.append(item)
            continue
        for part in str(item).split(","):
            part = part.strip()
            try:
                if "-" in part[1:]:
                    lo, hi = part.split("-", 1) if not part.startswith("-") else (part, part)
                    out.extend(range(int(lo), int(hi) + 1))
                else:
                    out.append(int(part))
            except ValueError:
                raise GridError(f"{source}: {key}: expected integers or a range like 0-4, "
                                f"got {item!r}") from None
    if not out:
        raise GridError(f"{source}: {key}: needs at least one value")
    return out


def _str_list(value: Any, key: str, source: str) -> list[str]:
    items = value if isinstance(value, list) else str(value).split(",")
    if not all(isinstance(i, str | int) and not isinstance(i, bool) for i in items):
        raise GridError(f"{source}: {key}: expected names, got {value!r}")
    return [str(i).strip() for i in items if str(i).strip()]


@dataclass
class Grid:
    """A sweep: every grid file key with its type, default and meaning (the flags mirror it)."""

    configs: list[str] = field(default_factory=list, metadata={
        "help": "presets or group presets (see `list configs`); a group adds each member",
        "kind": "names"})
    methods: list[str] = field(default_factory=list, metadata={
        "help": "plain method names (see `list methods`), beside or instead of configs",
        "kind": "names"})
    suites: list[str] = field(default_factory=lambda: ["syn6"], metadata={
        "help": "suites (names or suite YAML paths)", "kind": "names"})
    profiles: list[str] = field(default_factory=lambda: ["default"], metadata={
        "help": "suite profiles", "kind": "names"})
    orders: list[int] = field(default_factory=lambda: [0], metadata={
        "help": "domain orders: a list, or a range like 0-4", "kind": "ints"})
    seeds: list[int] = field(default_factory=lambda: [2021], metadata={
        "help": "seeds: a list, or comma separated", "kind": "ints"})
    out: str = field(default="results/runs", metadata={
        "help": "the runs' --out (results land in OUT/SUITE-PROFILE/ROW/orderK/seedS)"})
    run_args: list[str] = field(default_factory=list, metadata={
        "help": "extra `run` flags for every cell, e.g. [--eval-matrix, diagonal]",
        "kind": "names"})
    executor: str = field(default="local", metadata={"help": "local | slurm | submitit-local"})
    jobs: int = field(default=0, metadata={
        "help": "cells at once (local, submitit-local; 0: one); slurm: the array's parallelism "
                "(0: no cap)"})
    threads_per_job: int = field(default=0, metadata={
        "help": "OMP_NUM_THREADS of each cell (0: the cores divided by --jobs; slurm: "
                "cpus_per_task)"})
    gpus_per_job: int = field(default=0, metadata={
        "help": "GPUs per cell; more than one launches the cell through `accelerate launch`"})
    wait_lock: float = field(default=0.0, metadata={
        "help": "seconds to wait for a cell another process holds before skipping it"})
    partition: str = field(default="", metadata={"help": "slurm: partition"})
    time_min: int = field(default=240, metadata={"help": "slurm/submitit: time limit per cell"})
    cpus_per_task: int = field(default=0, metadata={"help": "slurm: CPUs per cell (0: unset)"})
    mem_gb: int = field(default=0, metadata={"help": "slurm: memory per cell in GB (0: unset)"})
    slurm_args: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "slurm: further sbatch options, e.g. {account: abc, qos: high}", "kind": "map"})
    folder: str = field(default="", metadata={
        "help": "submitit's job folder (default OUT/.sweep/submitit)"})


GRID_FIELDS = {f.name: f for f in dataclasses.fields(Grid)}


def check(key: str, value: Any, source: str) -> Any:
    """One grid value, coerced to its declared type; a bad one names the source and key."""
    kind = GRID_FIELDS[key].metadata.get("kind")
    if kind == "ints":
        return _int_list(value, key, source)
    if kind == "names":
        return _str_list(value, key, source)
    if kind == "map":
        if not isinstance(value, dict):
            raise GridError(f"{source}: {key}: expected a mapping, got {value!r}")
        return dict(value)
    default = GRID_FIELDS[key].default
    try:
        if isinstance(default, bool) or isinstance(value, bool | list | dict):
            raise ValueError
        value = type(default)(value)
    except (TypeError, ValueError):
        raise GridError(f"{source}: {key}: expected {type(default).__name__}, "
                        f"got {value!r}") from None
    if key == "executor" and value not in EXECUTORS:
        raise GridError(f"{source}: executor: expected one of {', '.join(EXECUTORS)}, "
                        f"got {value!r}")
    if isinstance(value, int | float) and value < 0 or key == "time_min" and value < 1:
        raise GridError(f"{source}: {key}: out of range: {value!r}")
    return value


def available_grids() -> dict[str, str]:
    """Grid preset name -> its first comment line."""
    return described_yamls(GRID_DIR)


def load_grid(name_or_path: str) -> Grid:
    """A grid file (or a shipped grid preset by name), every key checked."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        path = GRID_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise GridError(f"unknown grid {name_or_path!r}: no such file, and no grid preset of "
                            f"that name; valid presets: {', '.join(available_grids())}")
    data = read_yaml(path, GridError)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise GridError(f"{path}: a grid must be a mapping of keys to values")
    data.pop("description", None)
    values = {}
    for key, value in data.items():
        if key not in GRID_FIELDS:
            raise GridError(f"{path}: unknown key {key!r}; valid keys: {', '.join(GRID_FIELDS)}")
        values[key] = check(key, value, str(path))
    if values.get("run_args"):
        run_flags(values["run_args"], f"{path}: run_args")
    return Grid(**values)


SWEEP_OWNED = {"method", "suite", "profile", "order", "seed", "seeds", "config", "out", "resume",
               "overwrite", "no_table"}


def run_flags(run_args: list[str], source: str = "run_args") -> dict[str, Any]:
    """The config values that `run` would take from these extra flags (checked by its parser)."""
    from benchmark.__main__ import parser as cli_parser

    class Refusing(argparse.ArgumentParser):
        def error(self, message: str):  # argparse's own message, raised instead of printed
            raise GridError(f"{source}: {' '.join(run_args)}: {message}")

    ns, unknown = cli_parser(Refusing).parse_known_args(["run", *run_args])
    if unknown:
        raise GridError(f"{source}: `benchmark run` has no flag(s) {' '.join(unknown)}")
    defaults = cli_parser().parse_args(["run"])
    clash = sorted(k for k in SWEEP_OWNED if getattr(ns, k, None) != getattr(defaults, k, None))
    if clash:
        raise GridError(f"{source}: {', '.join(clash)} set by the sweep itself (grid keys "
                        "configs, methods, suites, profiles, orders, seeds, out)")
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    return {k: v for k, v in vars(ns).items() if k in fields and v is not None}
