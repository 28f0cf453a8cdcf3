"""`python -m benchmark sweep`: a grid of runs, resumable, on this machine or a cluster.

A grid is rows (presets or methods) × suites × profiles × orders × seeds. Each cell of it is an
ordinary `python -m benchmark run ... --resume` in its own process, so it writes its usual
`result.json`, `table` and `plot` read it unchanged, a finished cell is skipped (its
`result.json`), and a killed one resumes from its last checkpoint (its `progress.json`).

Executors: `local` (a thread pool of `--jobs` cell processes, each with its own thread budget or
GPUs), `slurm` (one submitit job array) and `submitit-local` (the same submitit path with
submitit's local executor: real subprocesses, for a machine without SLURM and for the tests).
`--shard i/n` keeps the cells k with k mod n = i, for any other scheduler.

Why submitit and not a scheduler of our own: it pickles the cell, writes the sbatch array,
requeues on preemption and collects logs; only the cell's command line is ours.

Concurrency: a sweep claims a cell with a flock on `OUT/.sweep/<cell>/.lock` (released with its
holder, see `benchmark.lock`) and never starts a cell whose run directory is locked by a live
`run`; a cell claimed or locked by another process is skipped with a message (or waited for,
`--wait-lock`). Its process output goes to `OUT/.sweep/<cell>/run.log`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import queue
import socket
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from benchmark.config import (
    ConfigError,
    RunConfig,
    build_config,
    described_yamls,
    read_preset,
    read_yaml,
)
from benchmark.lock import RunLocked, is_locked, run_lock
from benchmark.loop import PROGRESS, RESULT, run_dir_for
from benchmark.protocol import Protocol

log = logging.getLogger(__name__)
GRID_DIR = Path(__file__).parent / "grids"
CLAIMS = ".sweep"  # OUT/.sweep/<suite-profile>/<row>/orderK/seedS/{.lock,run.log}
EXECUTORS = ("local", "slurm", "submitit-local")
DEFAULT_SEEDS = [2021, 111, 222]

# ---------------------------------------------------------------- cost estimate
# Seconds per step on this machine, a 2-core CPU shared with other jobs (load average 12-14 while
# measuring; the README's quiet-machine `bench` at 2 threads: ncl 0.151, das 0.430), 1 thread.
# DAP (batch 64 × 16 tokens, syn6 default), measured 2026-11-30 23:30-23:45 UTC with
#   OMP_NUM_THREADS=1 python -m benchmark bench --steps 10 --repeats 3
#   -> ncl 1.5805 s/step, das 4.7095 s/step (2.98×)
# Fine-tuning (batch 16) and the per-run overhead (base model load, tokenisation, general-corpus
# MLM evaluations), from the timings of a `base` run (no DAP: all of it is fine-tuning),
# measured 2026-11-30 with
#   OMP_NUM_THREADS=1 python -m benchmark run --method base --ft-epochs 3 --out CALIB
#   -> ft = Σ finetune_s / Σ fine-tuning steps = 107.8 s / 162 = 0.665 s/step; overhead = the
#   command's wall time − Σ finetune_s = 202 s − 108 s = 94 s (process start and imports 49 s)
# Other machines: `--s-per-step ncl=...,das=...,ft=...,overhead=...` (e.g. from `bench` there).
MEASURED: dict[str, dict[str, float]] = {
    "syn6/default": {"ncl": 1.5805, "das": 4.7095, "ft": 0.665, "overhead": 94.0},
}
MEASURED_NOTE = "2026-11-30, 1 thread, 2-core CPU at load average ~12"
# DAP cost of a method as the s/step figure it uses and a factor on it. DER++ replays a batch of
# earlier sequences beside each new one: its DAP took 345 s against 162 s for EWC and KD in
# results/syn6/syn6-default/{derpp,ewc,kd}/order0/seed2021/result.json (timings.dap_s): 2.1×.
DAP_COST = {"das": ("das", 1.0), "dga": ("das", 1.0), "derpp": ("ncl", 2.1)}


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


def _check(key: str, value: Any, source: str) -> Any:
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
        values[key] = _check(key, value, str(path))
    if values.get("run_args"):
        _run_flags(values["run_args"], f"{path}: run_args")
    return Grid(**values)


# ---------------------------------------------------------------- cells


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
    """done (result.json), running (a live process holds it), killed (progress left), todo."""
    result = cell.run_dir / RESULT
    if result.exists():
        try:
            if json.loads(result.read_text()).get("finished"):
                return "done"
        except (OSError, json.JSONDecodeError):
            pass
    if is_locked(cell.run_dir) or is_locked(cell.claim_dir):
        return "running"
    if (cell.run_dir / PROGRESS).exists() or (cell.run_dir / "checkpoint").exists():
        return "killed"
    return "todo"


SWEEP_OWNED = {"method", "suite", "profile", "order", "seed", "seeds", "config", "out", "resume",
               "overwrite", "no_table"}


def _run_flags(run_args: list[str], source: str = "run_args") -> dict[str, Any]:
    """The config values that `run` would take from these extra flags (checked by its parser)."""
    from benchmark.__main__ import parser as cli_parser

    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            ns, unknown = cli_parser().parse_known_args(["run", *run_args])
    except SystemExit:
        reason = (said.getvalue().strip().splitlines() or ["rejected"])[-1]
        raise GridError(f"{source}: {' '.join(run_args)}: {reason.split('error: ')[-1]}") from None
    if unknown:
        raise GridError(f"{source}: `benchmark run` has no flag(s) {' '.join(unknown)}")
    defaults = cli_parser().parse_args(["run"])
    clash = sorted(k for k in SWEEP_OWNED if getattr(ns, k, None) != getattr(defaults, k, None))
    if clash:
        raise GridError(f"{source}: {', '.join(clash)} set by the sweep itself (grid keys "
                        "configs, methods, suites, profiles, orders, seeds, out)")
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    return {k: v for k, v in vars(ns).items() if k in fields and v is not None}


def _rows(grid: Grid) -> list[tuple[str, bool, dict]]:
    """[(entry, is_preset, preset mapping)]: groups expanded into their members, in order."""
    rows = []
    for name in grid.configs:
        preset = read_preset(name)
        members = preset.pop("runs", None)
        if members is None:
            rows.append((name, True, preset))
            continue
        if preset:
            raise GridError(f"config {name!r}: a group with shared keys {sorted(preset)} cannot "
                            "be split into cells; put those keys in the grid's run_args")
        for member in members:
            sub = read_preset(member)
            if "runs" in sub:
                raise GridError(f"config {name!r}: member {member!r} is itself a group")
            rows.append((member, True, sub))
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

    flags = _run_flags(grid.run_args, "run flags")
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
                                          order, seed, out, run_dir, tuple(grid.run_args), cost))
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


# ---------------------------------------------------------------- estimate


def estimate_seconds(cfg: RunConfig, suite, method, rates: dict[str, float] | None) -> float | None:
    """Seconds one cell should take here: DAP steps × s/step + fine-tuning steps × s/step + the
    per-run overhead, with the figures measured for its suite/profile (None: none measured)."""
    rate = rates or MEASURED.get(f"{cfg.suite}/{cfg.profile}")
    if not rate:
        return None
    names = suite.order(cfg.order)
    n = len(names)
    figure, factor = DAP_COST.get(cfg.method, ("ncl", 1.0))
    dap = 0.0 if cfg.method == "base" else n * cfg.dap_steps * rate[figure] * factor
    ft_steps = 0
    for _, i in Protocol(n, cfg.eval_matrix).evaluated(method.past_tasks_unchanged):
        task = suite.domains[names[i]].task
        epochs = task.epochs or cfg.ft_epochs
        ft_steps += epochs * math.ceil(len(task.train) / cfg.ft_batch_size)
    return dap + ft_steps * rate["ft"] + rate.get("overhead", 0.0)


def _total_seconds(cell: Cell) -> float | None:
    """The wall time a finished cell's run recorded (`timings.total_s`), if it did."""
    try:
        timings = json.loads((cell.run_dir / RESULT).read_text()).get("timings") or {}
    except (OSError, json.JSONDecodeError):
        return None
    total = timings.get("total_s")
    return float(total) if isinstance(total, (int, float)) and total > 0 else None


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


def dry_run(cells: list[Cell], grid: Grid, jobs: int, rates: dict | None = None) -> str:
    from tabulate import tabulate

    rows, counts = [], {"done": 0, "running": 0, "killed": 0, "todo": 0}
    left = unknown = 0.0
    took, foreseen, timed = 0.0, 0.0, 0  # finished cells: their wall time and their estimate
    for cell in cells:
        status = cell_status(cell)
        counts[status] += 1
        est = cell.estimate_s
        if status == "done" and est:
            seconds = _total_seconds(cell)
            if seconds:
                took, foreseen, timed = took + seconds, foreseen + est, timed + 1
        if status != "done":
            if est is None:
                unknown += 1
            else:
                left += est
        rows.append([cell.index, cell.name, status,
                     "?" if est is None else f"{est / 60:.1f}"])
    text = tabulate(rows, headers=["#", "cell (OUT/...)", "status", "est. min"], tablefmt="github")
    shape = (f"{len({(c.entry) for c in cells})} rows × {len(grid.suites)} suites × "
             f"{len(grid.profiles)} profiles × {len(grid.orders)} orders × {len(grid.seeds)} seeds")
    lines = [text, "",
             f"{len(cells)} cells ({shape}); done {counts['done']}, killed (will resume) "
             f"{counts['killed']}, running elsewhere {counts['running']}, to run {counts['todo']}"]
    if left:
        source = "--s-per-step" if rates else f"measured {MEASURED_NOTE} (sweep.py MEASURED)"
        lines.append(f"estimated time of the cells left: {_hours(left)} of cell time at the "
                     f"s/step {source}; {_hours(left / max(1, jobs))} wall at --jobs {jobs}")
        if timed:
            # this machine, as loaded as it was: what the finished cells took against their
            # estimate scales the rest (a model of s/step only holds on the machine it came from)
            ratio = took / foreseen
            lines.append(f"the {timed} finished cells took ×{ratio:.2f} their estimate: "
                         f"{_hours(left * ratio)} of cell time left at that pace, "
                         f"{_hours(left * ratio / max(1, jobs))} wall at --jobs {jobs}")
    if unknown:
        lines.append(f"{int(unknown)} cells have no estimate: no s/step measured for their "
                     "suite/profile (pass --s-per-step ncl=..,das=..,ft=..)")
    return "\n".join(lines)


# ---------------------------------------------------------------- execution


@dataclass(frozen=True)
class Outcome:
    cell: Cell
    status: str  # ran | done | locked | failed
    seconds: float = 0.0
    returncode: int | None = None
    log: str = ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cell_command(cell: Cell, gpus: int) -> list[str]:
    """The cell's command: `python -m benchmark run ...`, through `accelerate launch` on several
    GPUs (as README's multi-GPU `run` is launched)."""
    if gpus > 1:
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                "--num_processes", str(gpus), "--main_process_port", str(_free_port()),
                "-m", "benchmark", *cell.run_argv()]
    return [sys.executable, "-m", "benchmark", *cell.run_argv()]


def execute_cell(cell: Cell, threads: int = 0, gpus: int = 0, devices: str | None = None,
                 wait_lock: float = 0.0) -> Outcome:
    """Claim the cell, skip it if done or held elsewhere, else run it to the end in a subprocess.

    Runs in the sweep's worker thread (local) or on the submitit/SLURM node."""
    try:
        with run_lock(cell.claim_dir, wait=wait_lock):
            if cell_status(cell) == "done":
                return Outcome(cell, "done")
            if is_locked(cell.run_dir):
                return Outcome(cell, "locked", log=f"{cell.run_dir} is held by a running `run`")
            env = dict(os.environ)
            if threads:
                env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
            if devices is not None:
                env["CUDA_VISIBLE_DEVICES"] = devices
            logfile = cell.claim_dir / "run.log"
            start = time.perf_counter()
            with open(logfile, "a") as fh:
                fh.write(f"\n$ {' '.join(cell_command(cell, gpus))}\n")
                fh.flush()
                code = subprocess.run(cell_command(cell, gpus), stdout=fh,
                                      stderr=subprocess.STDOUT, env=env).returncode
            seconds = time.perf_counter() - start
            if code == 0:
                return Outcome(cell, "ran", seconds, code, str(logfile))
            if is_locked(cell.run_dir):  # a `run` outside any sweep took it meanwhile
                return Outcome(cell, "locked", seconds, code, str(logfile))
            return Outcome(cell, "failed", seconds, code, str(logfile))
    except RunLocked:
        return Outcome(cell, "locked", log=f"claimed by another sweep ({cell.claim_dir}/.lock)")


def _report(outcome: Outcome, bar: tqdm | None = None) -> None:
    c = outcome.cell
    msg = {"ran": f"ran in {outcome.seconds:.0f} s",
           "done": "already done, skipped",
           "locked": f"skipped: being written by another process: {outcome.log}",
           "failed": f"FAILED (exit {outcome.returncode}); log: {outcome.log}"}[outcome.status]
    (bar.write if bar else print)(f"[cell {c.index}] {c.name}: {msg}")


def run_local(cells: list[Cell], grid: Grid) -> list[Outcome]:
    """`jobs` cells at once, each a subprocess with its thread budget and its own GPUs."""
    jobs = max(1, grid.jobs)
    threads = grid.threads_per_job or max(1, (os.cpu_count() or 1) // jobs)
    devices: queue.Queue[str] = queue.Queue()
    if grid.gpus_per_job:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(_gpu_count())]
        if len(ids) < jobs * grid.gpus_per_job:
            raise GridError(f"--jobs {jobs} × --gpus-per-job {grid.gpus_per_job} needs "
                            f"{jobs * grid.gpus_per_job} GPUs; {len(ids)} visible")
        for j in range(jobs):
            devices.put(",".join(ids[j * grid.gpus_per_job:(j + 1) * grid.gpus_per_job]))

    def one(cell: Cell) -> Outcome:
        dev = devices.get() if grid.gpus_per_job else None
        try:
            return execute_cell(cell, threads, grid.gpus_per_job, dev, grid.wait_lock)
        finally:
            if dev is not None:
                devices.put(dev)

    outcomes = []
    with ThreadPoolExecutor(max_workers=jobs) as pool, \
            tqdm(total=len(cells), desc="sweep", unit="cell") as bar:
        futures = [pool.submit(one, cell) for cell in cells]
        try:
            for future in _as_done(futures):
                outcomes.append(future.result())
                _report(outcomes[-1], bar)
                bar.update()
        except KeyboardInterrupt:  # start no further cell; the running ones got the signal too
            for future in futures:
                future.cancel()
            raise
    return outcomes


def _as_done(futures):
    pending = set(futures)
    while pending:
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        yield from done


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def run_submitit(cells: list[Cell], grid: Grid) -> list[Outcome] | None:
    """Cells as submitit jobs: a SLURM job array, or local subprocesses (`submitit-local`).

    SLURM: submits and returns None (the array runs on; rerun the sweep or `--dry-run` to see
    where it stands). Local: `jobs` at a time, waited for with one progress bar."""
    try:
        import submitit
    except ImportError:
        raise GridError("executor slurm/submitit-local needs submitit: "
                        "pip install 'cdap-bench[cluster]'") from None
    folder = Path(grid.folder or Path(grid.out) / CLAIMS / "submitit" / "%j")
    cluster = "slurm" if grid.executor == "slurm" else "local"
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    params: dict[str, Any] = {"timeout_min": grid.time_min, "gpus_per_node": grid.gpus_per_job,
                              "tasks_per_node": 1, "nodes": 1, "name": "cdap-sweep"}
    threads = grid.threads_per_job or grid.cpus_per_task
    if cluster == "slurm":
        params["slurm_additional_parameters"] = grid.slurm_args
        if grid.jobs:
            params["slurm_array_parallelism"] = grid.jobs
        if grid.partition:
            params["slurm_partition"] = grid.partition
        if grid.cpus_per_task:
            params["cpus_per_task"] = grid.cpus_per_task
        if grid.mem_gb:
            params["mem_gb"] = grid.mem_gb
    executor.update_parameters(**params)
    args = [(c, threads, grid.gpus_per_job, None, grid.wait_lock) for c in cells]
    if cluster == "slurm":
        jobs = executor.map_array(execute_cell, *zip(*args, strict=True))
        print(f"submitted {len(jobs)} cells as SLURM job array {jobs[0].job_id.split('_')[0]}; "
              f"logs in {folder}; rerun this sweep with --dry-run to see their state")
        return None
    outcomes: list[Outcome] = []
    pending = list(args)
    running: dict[Any, Cell] = {}
    with tqdm(total=len(cells), desc="sweep (submitit)", unit="cell") as bar:
        try:
            while pending or running:
                while pending and len(running) < max(1, grid.jobs):
                    a = pending.pop(0)
                    running[executor.submit(execute_cell, *a)] = a[0]
                time.sleep(0.5)
                for job in [j for j in running if j.done()]:
                    cell = running.pop(job)
                    try:
                        outcome = job.result()
                    except Exception as err:  # the job died (killed, timed out): say so, go on
                        outcome = Outcome(cell, "failed",
                                          log=f"submitit job {job.job_id}: {err}")
                    outcomes.append(outcome)
                    _report(outcome, bar)
                    bar.update()
        except KeyboardInterrupt:  # stop the running cells (they resume on the next sweep)
            for job in running:
                with contextlib.suppress(Exception):
                    job.cancel(check=False)
            raise
    return outcomes


# ---------------------------------------------------------------- command line


def _rates(text: str) -> dict[str, float]:
    try:
        rates = {k.strip(): float(v) for k, v in (p.split("=") for p in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--s-per-step takes name=seconds pairs, e.g. ncl=0.15,das=0.43,ft=0.01; got {text!r}"
        ) from None
    missing = {"ncl", "das", "ft"} - set(rates)
    if missing:
        raise argparse.ArgumentTypeError(f"--s-per-step is missing {', '.join(sorted(missing))}")
    return rates


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
    p.add_argument("--s-per-step", type=_rates,
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
    checked = {k: _check(k, v, "command line") for k, v in changes.items() if v != []}
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
        todo = [c for c in cells if cell_status(c) != "done"]
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
