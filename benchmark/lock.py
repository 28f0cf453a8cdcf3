"""One writer per run directory: an advisory file lock that dies with the process holding it.

`fcntl.flock` (not a lock file whose existence is the lock) so that a run killed by SIGKILL, a
scheduler or a power cut never leaves a stale lock behind: the kernel releases it with the
process. Used by `benchmark run` for each run directory and by `benchmark sweep` for each cell.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".lock"


class RunLocked(RuntimeError):
    """Another live process holds the run directory's lock."""


@contextmanager
def run_lock(run_dir: Path, wait: float = 0.0) -> Iterator[Path]:
    """Hold `run_dir/.lock` for the block; raise `RunLocked` if another process holds it.

    `wait` seconds to keep trying before giving up (0: fail at once). The directory is created
    if missing; the lock file stays (empty) after release, which is harmless.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RunLocked(
                        f"{run_dir} is being written by another live process (lock {path}); "
                        "wait for it to finish or stop it first") from None
                time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def is_locked(run_dir: Path) -> bool:
    """Whether a live process holds `run_dir`'s lock right now (no lock file: False)."""
    path = Path(run_dir) / LOCK_NAME
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
