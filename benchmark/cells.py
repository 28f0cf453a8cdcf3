"""The cells of a sweep: one `python -m benchmark run ... --resume` per row × suite × profile ×
order × seed of a grid, each resolved and checked as `run` would before anything runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmark.config import ConfigError, build_config, expand_preset
from benchmark.estimate import estimate_seconds
from benchmark.grid import Grid, GridError, run_flags
from benchmark.lock import is_locked
from benchmark.loop import PROGRESS, RESULT, config_differences, run_dir_for

CLAIMS = ".sweep"  # OUT/.sweep/<suite-profile>/<row>/orderK/seedS/{.lock,run.log}


@dataclass(frozen=True)
class Cell:
    """One run of the grid: `python -m benchmark run` with these arguments."""

    index: int  # position in the full grid (shards use it)
    entry: str  # a preset name/path, or a method name
    is_preset: bool
    suite: str
    profile: str
    order: int
    seed: int
    out: Path
    run_dir: Path
    run_args: tuple[str, ...] = ()
    estimate_s: float | None = None
    config: dict[str, Any] | None = None  # the run config the cell asks for (its to_dict())

    @property
    def name(self) -> str:
        return str(self.run_dir.relative_to(self.out))

    @property
    def claim_dir(self) -> Path:
        return self.out / CLAIMS / self.run_dir.relative_to(self.out)

    def run_argv(self) -> list[str]:
        what = ["--config", self.entry] if self.is_preset else ["--method", self.entry]
        return ["run", *what, "--suite", self.suite, "--profile", self.profile,
                "--order", str(self.order), "--seed", str(self.seed), "--out", str(self.out),
                "--resume", "--no-table", *self.run_args]


def cell_status(cell: Cell) -> str:
    """done (result.json), other config (a finished result.json made with another config than
    the cell asks for: the defaults or the preset moved since), running (a live process holds
    it), killed (progress left), todo."""
    result = cell.run_dir / RESULT
    if result.exists():
        try:
            record = json.loads(result.read_text())
            if record.get("finished"):
                if cell.config is not None and "config" in record and config_differences(
                        record["config"], cell.config):
                    return "other config"
                return "done"
        except (OSError, json.JSONDecodeError, AttributeError, TypeError):
            pass
    if is_locked(cell.run_dir) or is_locked(cell.claim_dir):
        return "running"
    if (cell.run_dir / PROGRESS).exists() or (cell.run_dir / "checkpoint").exists():
        return "killed"
    return "todo"


def _rows(grid: Grid) -> list[tuple[str, bool, dict]]:
    """[(entry, is_preset, preset mapping)]: groups expanded into their members, in order (as
    `run --config` expands them); each cell runs `run --config MEMBER`, so a group with keys of
    its own cannot be split into cells."""
    rows = []
    for name in grid.configs:
        members, shared = expand_preset(name)
        if shared:
            raise GridError(f"config {name!r}: a group with shared keys {sorted(shared)} cannot "
                            "be split into cells; put those keys in the grid's run_args")
        rows += [(source, True, mapping) for mapping, source in members]
    rows += [(m, False, {"method": m}) for m in grid.methods]
    if not rows:
        raise GridError("the grid has no rows: give configs (--config) or methods (--methods)")
    return rows


def expand(grid: Grid, estimate: bool = False,
           rates: dict[str, float] | None = None) -> list[Cell]:
    """Every cell of the grid, each config resolved and checked as `run` would, nothing written.

    Two entries resolving to the same run directory and config (a row in two groups) are one
    cell; resolving to the same directory with different configs is an error."""
    from benchmark.basemodel import check_base_model
    from methods import available_methods, build_method
    from tasks import load_suite

    flags = run_flags(grid.run_args, "run flags")
    out = Path(grid.out).resolve()
    checked_models: set[str] = set()
    methods = available_methods()
    cells: list[Cell] = []
    seen: dict[Path, tuple[str, dict]] = {}
    suites: dict[tuple[str, str], Any] = {}
    for entry, is_preset, preset in _rows(grid):
        for suite_name in grid.suites:
            for profile in grid.profiles:
                key = (suite_name, profile)
                suite = suites[key] = suites.get(key) or load_suite(suite_name, profile)
                for order in grid.orders:
                    suite.order(order)
                    for seed in grid.seeds:
                        cfg = build_config(suite.defaults, preset, {
                            **flags, "suite": suite.name, "profile": profile, "order": order,
                            "seed": seed}, entry)
                        if cfg.method not in methods:
                            raise ConfigError(f"{entry}: unknown method {cfg.method!r}; valid "
                                              f"methods: {', '.join(methods)}")
                        method = build_method(cfg.method, cfg.method_args)
                        model = cfg.base_model or suite.base_model
                        if str(model) not in checked_models:  # as `run` checks it
                            check_base_model(model)
                            checked_models.add(str(model))
                        run_dir = run_dir_for(out, cfg)
                        if run_dir in seen:
                            if seen[run_dir][1] != cfg.to_dict():
                                raise GridError(f"{entry} and {seen[run_dir][0]} both write "
                                                f"{run_dir} with different configs; give one "
                                                "of them a label")
                            continue
                        seen[run_dir] = (entry, cfg.to_dict())
                        cost = (estimate_seconds(cfg, suite, method, rates)
                                if estimate else None)
                        cells.append(Cell(len(cells), entry, is_preset, suite_name, profile,
                                          order, seed, out, run_dir, tuple(grid.run_args), cost,
                                          cfg.to_dict()))
    return cells


def shard(cells: list[Cell], spec: str) -> list[Cell]:
    """`i/n`: the cells k with k mod n = i (k: the cell's index in the whole grid)."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise GridError(f"--shard: expected i/n like 0/4, got {spec!r}") from None
    if n < 1 or not 0 <= i < n:
        raise GridError(f"--shard {spec}: needs n ≥ 1 and 0 ≤ i < n")
    return [c for c in cells if c.index % n == i]
