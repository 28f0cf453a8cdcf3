"""`python -m benchmark sweep`: a grid of runs, resumable, on this machine or a cluster.

A grid is rows (presets or methods) × suites × profiles × orders × seeds. Each cell of it is an
ordinary `python -m benchmark run ... --resume` in its own process, so it writes its usual
`result.json`, `table` and `plot` read it unchanged, a finished cell is skipped (its
`result.json`), and a killed one resumes from its last checkpoint (its `progress.json`).

Executors: `local` (a thread pool of `--jobs` cell processes, each with its own thread budget or
GPUs), `slurm` (one submitit job array) and `submitit-local` (the same submitit path with
submitit's local executor: real subprocesses, for a machine without SLURM and for the tests).
`--shard i/n` keeps the cells k with k mod n = i, for any other scheduler.

Concurrency: a sweep claims a cell with a flock on `OUT/.sweep/<cell>/.lock` (released with its
holder, see `benchmark.lock`) and never starts a cell whose run directory is locked by a live
`run`; a cell claimed or locked by another process is skipped with a message (or waited for,
`--wait-lock`). Its process output goes to `OUT/.sweep/<cell>/run.log`.

This module is the command; the grid file is `benchmark.grid`, its cells `benchmark.cells`, the
cost estimate `benchmark.estimate` and the executors `benchmark.executors`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from benchmark.cells import Cell, cell_status, expand, shard
from benchmark.config import ConfigError
from benchmark.estimate import dry_run, parse_rates
from benchmark.executors import Outcome, run_local, run_submitit
from benchmark.grid import (
    GRID_FIELDS,
    SWEEP_OWNED,
    Grid,
    GridError,
    available_grids,
    check,
    load_grid,
)
from benchmark.loop import RESULT, config_differences

__all__ = ["Cell", "Grid", "GridError", "expand", "load_grid", "main", "shard"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmark sweep", allow_abbrev=False,
        description="Run a grid of cells (rows × suites × profiles × orders × seeds), each an "
                    "ordinary `run --resume`. Flags override the grid file's keys; the flags of "
                    "`run` are passed to every cell's `run` (e.g. --eval-matrix diagonal).",
        epilog="grid presets: " + ", ".join(available_grids()))
    p.add_argument("grid", nargs="?", help="a grid YAML file or a grid preset (e.g. paper-grid)")
    p.add_argument("--config", "--configs", dest="configs", help="presets/groups, comma separated")
    p.add_argument("--methods", "--method", dest="methods", help="methods, comma separated")
    p.add_argument("--suite", "--suites", dest="suites", help="suites, comma separated")
    p.add_argument("--profile", "--profiles", dest="profiles", help="profiles, comma separated")
    p.add_argument("--orders", "--order", dest="orders", help="e.g. 0-4 or 0,2")
    p.add_argument("--seeds", "--seed", dest="seeds", help="e.g. 2021,111,222")
    p.add_argument("--out", help=GRID_FIELDS["out"].metadata["help"])
    p.add_argument("--executor", help=GRID_FIELDS["executor"].metadata["help"])
    for key in ("jobs", "threads_per_job", "gpus_per_job", "time_min", "cpus_per_task", "mem_gb"):
        p.add_argument("--" + key.replace("_", "-"), dest=key, type=int,
                       help=GRID_FIELDS[key].metadata["help"])
    p.add_argument("--wait-lock", dest="wait_lock", type=float,
                   help=GRID_FIELDS["wait_lock"].metadata["help"])
    p.add_argument("--partition", help=GRID_FIELDS["partition"].metadata["help"])
    p.add_argument("--folder", help=GRID_FIELDS["folder"].metadata["help"])
    p.add_argument("--shard", help="i/n: run only the cells k with k mod n = i")
    p.add_argument("--dry-run", action="store_true",
                   help="list the cells, their state and cost estimate; run nothing")
    p.add_argument("--s-per-step", type=parse_rates,
                   help="override the measured figures: ncl=S,das=S,ft=S[,overhead=S]")
    p.add_argument("--no-table", action="store_true", help="do not print the table at the end")
    run = p.add_argument_group("flags of `run`, passed to every cell (added to the grid's "
                               "run_args)")
    for action in _run_actions():
        kwargs: dict[str, Any] = {"dest": RUN_DEST + action.dest, "help": action.help}
        names = action.option_strings
        if isinstance(action, argparse._StoreTrueAction):
            kwargs.update(action="store_true", default=None)
        elif isinstance(action, argparse.BooleanOptionalAction):  # it adds the --no- form
            kwargs["action"], names = argparse.BooleanOptionalAction, names[:1]
        else:  # the value is kept as given; each cell's `run` parses (and expand checks) it
            kwargs.update(metavar=action.metavar or action.dest.upper(), choices=action.choices)
            if action.choices:
                kwargs["metavar"] = "{" + ",".join(map(str, action.choices)) + "}"
        run.add_argument(*names, **kwargs)
    return p


RUN_DEST = "run:"  # namespace prefix of the flags that go to every cell's `run`


def _run_actions() -> list[argparse.Action]:
    """The options of `run` the sweep passes through: all but those it sets itself."""
    from benchmark.__main__ import parser as cli_parser

    sub = next(a for a in cli_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return [a for a in sub.choices["run"]._actions
            if a.option_strings and a.dest not in SWEEP_OWNED and a.dest != "help"]


def _passed_run_args(args: argparse.Namespace) -> list[str]:
    """The `run` flags given to the sweep, as `run` arguments (`--flag value`)."""
    out: list[str] = []
    for action in _run_actions():
        value = getattr(args, RUN_DEST + action.dest, None)
        flag = action.option_strings[0]
        if value is None:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            out.append(flag if value else "--no-" + flag[2:])
        elif isinstance(action, argparse._StoreTrueAction):
            out.append(flag)
        else:
            out += [flag, value]
    return out


def resolve(args: argparse.Namespace, extra: list[str] | None = None) -> Grid:
    """The grid file's keys, then the flags given (the run flags are added to run_args)."""
    grid = load_grid(args.grid) if args.grid else Grid()
    changes = {}
    if args.configs is not None or args.methods is not None:  # the flags' rows replace the file's
        changes["configs"] = args.configs or []
        changes["methods"] = args.methods or []
    for key in GRID_FIELDS:
        if key not in ("configs", "methods") and getattr(args, key, None) is not None:
            changes[key] = getattr(args, key)
    checked = {k: check(k, v, "command line") for k, v in changes.items() if v != []}
    checked.update({k: [] for k, v in changes.items() if v == []})
    grid = dataclasses.replace(grid, **checked)
    extra = [*_passed_run_args(args), *(extra or [])]
    if extra:
        grid = dataclasses.replace(grid, run_args=[*grid.run_args, *extra])
    return grid


def main(argv: list[str] | None = None) -> int:
    """The sweep; bad input, an unwritable `--out` and Ctrl-C are one line (exit 2, 130)."""
    from benchmark.__main__ import degrade_output, os_error_line

    degrade_output()
    args = build_parser().parse_args(argv)
    try:
        return _sweep(args)
    except OSError as err:  # a full disk, a read-only --out, ...
        line = os_error_line(err)
        if line is None:
            raise
        print(f"{line}; then rerun the same sweep to continue (finished cells are skipped, "
              "killed ones resume)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = "" if args.dry_run else ("; rerun the same sweep to continue (finished cells "
                                         "are skipped, killed ones resume)")
        print(f"interrupted{again}", file=sys.stderr)
        return 130


def _sweep(args: argparse.Namespace) -> int:
    from benchmark.config import check_writable
    from methods import MethodError
    from tasks import SuiteError

    try:
        grid = resolve(args)
        cells = expand(grid, estimate=args.dry_run, rates=args.s_per_step)
        if args.shard:
            cells = shard(cells, args.shard)
        if args.dry_run:
            print(dry_run(cells, grid, max(1, grid.jobs), args.s_per_step))
            return 0
        statuses = [cell_status(c) for c in cells]
        stale = [c for c, status in zip(cells, statuses, strict=True) if status == "other config"]
        if stale:
            pairs = config_differences(json.loads((stale[0].run_dir / RESULT).read_text())[
                "config"], stale[0].config)
            raise GridError(
                f"{len(stale)} of the grid's cells already hold a result made with another "
                f"config, e.g. {stale[0].run_dir / RESULT}: {pairs}; a run would refuse them: "
                "sweep into another --out, or delete those results")
        todo = [c for c, status in zip(cells, statuses, strict=True) if status != "done"]
        if todo:
            check_writable(Path(grid.out), "--out")
        print(f"{len(cells)} cells, {len(cells) - len(todo)} done, {len(todo)} to run "
              f"(executor {grid.executor}, out {grid.out})")
        if not todo:
            outcomes: list[Outcome] | None = []
        elif grid.executor == "local":
            outcomes = run_local(todo, grid)
        else:
            outcomes = run_submitit(todo, grid)
    except (GridError, ConfigError, MethodError, SuiteError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if outcomes is None:
        return 0
    counts = {s: sum(o.status == s for o in outcomes) for s in ("ran", "done", "locked", "failed")}
    print(f"sweep: {counts['ran']} ran, {len(cells) - len(todo) + counts['done']} already done, "
          f"{counts['locked']} skipped (held by another process), {counts['failed']} failed")
    if not args.no_table and counts["ran"] + len(cells) - len(todo):
        from benchmark.tables import build_tables, load_results, render

        results = load_results(Path(grid.out))
        if results:
            print(render(build_tables(results)))
    return 1 if counts["failed"] else 0
