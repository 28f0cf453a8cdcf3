"""Where a sweep's cells run: `local` (a thread pool of cell processes), `slurm` (one submitit
job array) and `submitit-local` (submitit's local executor: real subprocesses).

Why submitit and not a scheduler of our own: it pickles the cell, writes the sbatch array,
requeues on preemption and collects logs; only the cell's command line is ours.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from benchmark.cells import CLAIMS, Cell, cell_status
from benchmark.grid import Grid, GridError
from benchmark.lock import RunLocked, is_locked, run_lock


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
