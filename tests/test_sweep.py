"""`benchmark sweep`: cells skipped when done, resumed when killed, one writer per cell, shards,
the submitit path through submitit's own local executor, clear errors for a bad grid file."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from benchmark.lock import is_locked, run_lock
from benchmark.sweep import Grid, expand, main, shard

ROOT = Path(__file__).parent.parent
# ncl and das × orders 0-1 × 2 seeds on the tiny profile, shortened further by run flags
GRID = {"methods": ["ncl", "das"], "profiles": ["tiny"], "orders": "0-1", "seeds": [2021, 111],
        "threads_per_job": 1, "jobs": 2,
        "run_args": ["--dap-steps", "2", "--ft-epochs", "1", "--eval-matrix", "diagonal"]}


def write_grid(path: Path, **changes) -> Path:
    path.write_text(yaml.safe_dump({**GRID, **changes}))
    return path


def sweep(*args: str, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "benchmark", "sweep", *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, **popen)


def finish(proc: subprocess.Popen, timeout: float = 2400) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def results(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("result.json")}


def midway(out: Path) -> list[str]:
    """Cells killed after a domain checkpoint: progress.json and checkpoint/ without a result."""
    return [str(p.parent.relative_to(out)) for p in out.rglob("progress.json")
            if (p.parent / "checkpoint" / "meta.json").exists()
            and not (p.parent / "result.json").exists()]


def table(runs: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "benchmark", "table", "--runs", str(runs)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_killed_sweep_reruns_only_missing_cells_and_equals_the_submitit_sweep(tmp_path):
    # ncl and das × order 0 × 2 seeds: 4 cells, two at a time (`jobs: 2`)
    grid = write_grid(tmp_path / "grid.yaml", orders=[0])
    killed, straight = tmp_path / "killed", tmp_path / "submitit"

    # the whole sweep (the sweep and its running cells) is killed once two cells have finished
    # and a later one is midway (its first domain checkpointed)
    proc = sweep(str(grid), "--out", str(killed), start_new_session=True)
    deadline = time.monotonic() + 900
    while (len(results(killed)) < 2 or not midway(killed)) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    before, partial = results(killed), midway(killed)
    assert 2 <= len(before) < 4 and partial

    code, out, err = finish(sweep(str(grid), "--out", str(killed)))
    print(f"killed after {len(before)} finished cells; rerun:\n{out}")
    assert code == 0, err[-3000:]
    assert f"4 cells, {len(before)} done, {4 - len(before)} to run" in out
    assert out.count(": ran in ") == 4 - len(before)
    after = results(killed)
    assert len(after) == 4
    assert all(after[name] == mtime for name, mtime in before.items())  # not rewritten
    for cell in partial:  # the killed cells continued from their checkpoint
        assert json.loads((killed / cell / "result.json").read_text())["resumed_at"], cell

    # the same grid straight through submitit's local executor (real subprocesses)
    code, out, err = finish(sweep(str(grid), "--out", str(straight), "--executor",
                                  "submitit-local"))
    print(f"submitit-local:\n{out}")
    assert code == 0, err[-3000:]
    assert out.count(": ran in ") == 4
    assert len(results(straight)) == 4
    assert list((straight / ".sweep" / "submitit").rglob("*_result.pkl"))  # submitit's own jobs
    assert table(killed) == table(straight)


def test_two_sweeps_on_one_cell_do_not_both_write_it(tmp_path):
    grid = write_grid(tmp_path / "grid.yaml", methods=["ncl"], orders=[0], seeds=[2021])
    out = tmp_path / "out"
    claim = out / ".sweep" / "syn6-tiny" / "ncl" / "order0" / "seed2021"
    first = sweep(str(grid), "--out", str(out))
    deadline = time.monotonic() + 600
    while not is_locked(claim) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert is_locked(claim), first.communicate()
    code, second_out, err = finish(sweep(str(grid), "--out", str(out), "--no-table"))
    assert code == 0, err[-2000:]
    assert "skipped: being written by another process" in second_out
    assert "0 ran" in second_out
    code, first_out, err = finish(first)
    assert code == 0, err[-2000:]
    assert "1 ran" in first_out
    log = (claim / "run.log").read_text()
    assert log.count("$ ") == 1  # one `run` process only
    assert len(results(out)) == 1


def test_a_cell_held_by_a_running_run_is_skipped(tmp_path, capsys):
    grid = write_grid(tmp_path / "grid.yaml", methods=["ncl"], orders=[0], seeds=[2021])
    out = tmp_path / "out"
    with run_lock(out / "syn6-tiny" / "ncl" / "order0" / "seed2021"):  # as `run` holds it
        assert main([str(grid), "--out", str(out), "--no-table"]) == 0
    printed = capsys.readouterr().out
    assert "held by a running `run`" in printed and "0 ran" in printed
    assert not results(out)


def test_shards_partition_the_cells(tmp_path):
    grid = Grid(methods=["ncl", "das"], profiles=["tiny"], orders=[0, 1], seeds=[2021, 111],
                out=str(tmp_path))
    cells = expand(grid)
    assert len(cells) == 8
    parts = [shard(cells, f"{i}/3") for i in range(3)]
    assert sorted(c.index for part in parts for c in part) == list(range(8))
    assert all(c.index % 3 == i for i, part in enumerate(parts) for c in part)
    assert [len(p) for p in parts] == [3, 3, 2]


def test_dry_run_lists_cells_and_counts_done(tmp_path, capsys):
    grid = write_grid(tmp_path / "grid.yaml")
    out = tmp_path / "out"
    done = out / "syn6-tiny" / "das" / "order1" / "seed111"
    done.mkdir(parents=True)
    (done / "result.json").write_text('{"finished": true}')
    killed = out / "syn6-tiny" / "ncl" / "order0" / "seed2021"
    killed.mkdir(parents=True)
    (killed / "progress.json").write_text("{}")
    assert main([str(grid), "--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "8 cells (2 rows × 1 suites × 1 profiles × 2 orders × 2 seeds); done 1, " \
           "killed (will resume) 1, running elsewhere 0, to run 6" in printed
    assert "syn6-tiny/ncl/order0/seed2021 | killed" in printed


def test_a_result_made_with_another_config_is_not_done_and_stops_the_sweep(tmp_path, capsys):
    # the defaults moved (say clipping): a cell whose finished result ran the old config is not
    # "done"; the sweep names it and runs nothing, as `run --resume` would refuse it
    grid = write_grid(tmp_path / "grid.yaml", methods=["ncl"], orders=[0], seeds=[2021])
    out = tmp_path / "out"
    [cell] = expand(Grid(**{**yaml.safe_load(grid.read_text()), "out": str(out)}))
    cell.run_dir.mkdir(parents=True)
    result = cell.run_dir / "result.json"
    result.write_text(json.dumps({"finished": True, "config": cell.config}))
    assert main([str(grid), "--out", str(out), "--dry-run"]) == 0
    assert "done 1," in capsys.readouterr().out
    result.write_text(json.dumps({"finished": True,
                                  "config": {**cell.config, "max_grad_norm": 1.0}}))
    assert main([str(grid), "--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "syn6-tiny/ncl/order0/seed2021 | other config" in printed
    assert "done 0," in printed and "1 hold a result made with another config" in printed
    assert main([str(grid), "--out", str(out)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "1 of the grid's cells already hold a result made with another config" in line
    assert "max_grad_norm=1.0 (asked 0.0)" in line and str(result) in line
    assert json.loads(result.read_text())["config"]["max_grad_norm"] == 1.0  # left as it was


def test_dry_run_scales_the_estimate_by_what_finished_cells_took(tmp_path, capsys):
    """The s/step model comes from another machine; the finished cells' recorded wall time
    against their estimate rescales what is left."""
    grid = write_grid(tmp_path / "grid.yaml", methods=["ncl"], orders=[0])
    out = tmp_path / "out"
    rates = ["--s-per-step", "ncl=1,das=1,ft=0,overhead=0"]  # tiny ncl: 3 domains x 2 steps = 6 s
    done = out / "syn6-tiny" / "ncl" / "order0" / "seed2021"
    done.mkdir(parents=True)
    (done / "result.json").write_text('{"finished": true, "timings": {"total_s": 3.0}}')
    assert main([str(grid), "--out", str(out), "--dry-run", *rates]) == 0
    printed = capsys.readouterr().out
    assert "estimated time of the cells left: 0.0 h" in printed
    assert "the 1 finished cells took ×0.50 their estimate" in printed


def test_paper_grid_has_every_row_on_five_orders_and_three_seeds(tmp_path):
    from benchmark.sweep import load_grid

    grid = load_grid("paper-grid")
    grid.out = str(tmp_path)
    cells = expand(grid)
    rows = {c.run_dir.parent.parent.name for c in cells}
    # a row name that is not a plain folder name gets a hash of itself appended (loop.run_dir_for)
    plain = {r.split("-")[0] if r.startswith("demix_mixture-") else r for r in rows}
    assert {"base", "one", "pool", "ncl", "das", "ewc", "kd", "derpp", "hat", "dga",
            "adapter-one", "demix", "demix_mixture"} <= plain
    assert len(cells) == len(rows) * 5 * 3


@pytest.mark.parametrize("text, key", [
    ("orders: [0, x]\nmethods: [ncl]\n", "orders"),
    ("ordrs: [0]\nmethods: [ncl]\n", "ordrs"),
    ("jobs: many\nmethods: [ncl]\n", "jobs"),
    ("executor: pbs\nmethods: [ncl]\n", "executor"),
    ("methods: [ncl]\nrun_args: [--seed, '3']\n", "run_args"),
    ("methods: [ncl]\nrun_args: [--no-such-flag, '3']\n", "run_args"),
    ("methods: [ncl]\nrun_args: [--dap-steps, many]\n", "run_args"),
    # `run`'s own parser says why (raised by it, not read back from its stderr)
    ("methods: [ncl]\nrun_args: [--dap-steps, many]\n", "invalid int value: 'many'"),
    ("methods: [ncl]\nrun_args: [--eval-matrix, sideways]\n", "invalid choice: 'sideways'"),
])
def test_bad_grid_file_is_one_clear_line_and_exit_2(tmp_path, capsys, text, key):
    grid = tmp_path / "bad.yaml"
    grid.write_text(text)
    out = tmp_path / "out"
    assert main([str(grid), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0], err
    assert str(grid) in err[0]
    assert not out.exists()
