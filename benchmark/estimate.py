"""The cost estimate of `sweep --dry-run`: seconds per cell from measured seconds per step.

A cell costs its DAP steps × the s/step of the figure its method declares (`Method.dap_cost`),
plus its fine-tuning steps × the fine-tuning s/step, plus a per-run overhead. The figures
measured for a suite/profile ship in `benchmark/data/timings.yaml` (how each was measured is
written there); `--s-per-step ncl=...,das=...,ft=...,overhead=...` replaces them (e.g. from
`bench` on another machine).
"""

from __future__ import annotations

import argparse
import json
import math
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmark.config import RunConfig, read_yaml
from benchmark.loop import RESULT
from benchmark.protocol import Protocol

if TYPE_CHECKING:
    from benchmark.cells import Cell
    from benchmark.grid import Grid

TIMINGS = Path(__file__).parent / "data" / "timings.yaml"


@cache
def measured() -> dict[str, Any]:
    """The shipped timings: {"note": ..., "measured": {"suite/profile": {figure: s/step}}}."""
    return read_yaml(TIMINGS)


def estimate_seconds(cfg: RunConfig, suite, method, rates: dict[str, float] | None) -> float | None:
    """Seconds one cell should take here: DAP steps × s/step + fine-tuning steps × s/step + the
    per-run overhead, with the figures measured for its suite/profile (None: none measured)."""
    rate = rates or measured()["measured"].get(f"{cfg.suite}/{cfg.profile}")
    if not rate:
        return None
    names = suite.order(cfg.order)
    n = len(names)
    dap = 0.0
    if method.dap_cost is not None:
        figure, factor = method.dap_cost
        dap = n * cfg.dap_steps * rate[figure] * factor
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

    from benchmark.cells import cell_status

    rows, counts = [], {"done": 0, "other config": 0, "running": 0, "killed": 0, "todo": 0}
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
             f"{counts['killed']}, running elsewhere {counts['running']}, to run {counts['todo']}"
             + (f"; {counts['other config']} hold a result made with another config (a run "
                "refuses them: use another --out)" if counts["other config"] else "")]
    if left:
        source = ("--s-per-step" if rates
                  else f"measured {measured()['note']} (benchmark/data/timings.yaml)")
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


def parse_rates(text: str) -> dict[str, float]:
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
