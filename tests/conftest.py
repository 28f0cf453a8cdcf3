import json
import os
from pathlib import Path

import pytest

from benchmark.kernels import PINNED, wanted

# the kernels `python -m benchmark` runs (benchmark/kernels.py), set before torch starts, so the
# runs made in this process and in the subprocesses some tests start compute alike
if wanted():
    os.environ.update(PINNED)

import benchmark.compat  # noqa: E402, F401  (before any test imports transformers)

# the short end-to-end run of the resume tests: few DAP steps, one fine-tuning epoch
FAST = ("--dap-steps", "3", "--ft-epochs", "1")
# what a resumed run must give exactly as an uninterrupted one
NUMBERS = ("mf1", "acc", "dap_loss", "general_mlm_loss", "dap_steps", "base_fingerprint",
           "mlm_loss", "compute")


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """One syn-base cache per test session, never the user's own: θ0 is pretrained once and
    every run, in this process or a subprocess, loads it."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["CDAP_CACHE"] = str(path)
    yield path


@pytest.fixture(scope="session")
def tiny_suite():
    from tasks import load_suite

    return load_suite("syn6", "tiny")


@pytest.fixture
def killed_at(monkeypatch):
    """`killed_at(args, point)`: `python -m benchmark ARGS` in this process, stopped at crash
    point `point` (`stage:t`, see `benchmark.loop._crash_point`) as a kill stops it: the hook
    raises `CrashPoint`, nothing after the point runs, no file is left half-written."""
    from benchmark.__main__ import main
    from benchmark.loop import CrashPoint

    def kill(args: list[str], point: str) -> None:
        with monkeypatch.context() as patch:
            patch.setenv("CDAP_CRASH_AT", point)
            patch.setenv("CDAP_CRASH_SIGNAL", "RAISE")
            with pytest.raises(CrashPoint):
                main(args)

    return kill


def flipped(content: bytes) -> bytes:
    """`content` with 16 bytes in its middle inverted (a damaged disk block)."""
    data = bytearray(content)
    mid = len(data) // 2
    data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])
    return bytes(data)


@pytest.fixture
def kill_resume_and_lose_state(tmp_path, killed_at, capsys):
    """`check(method, state=None)`: a run of `method` killed after domain 1's checkpoint is
    refused by `--resume` in one line naming the file, exit 2, when any file of the method's
    state (`state`, relative to the checkpoint; default every file but the model and
    meta.json) is deleted or damaged; with the files restored it resumes to the numbers of an
    uninterrupted run."""
    from benchmark.__main__ import main

    def check(method: str, state: list[str] | None = None) -> None:
        def args(out: Path, *extra: str) -> list[str]:
            return ["run", "--method", method, "--profile", "tiny", "--out", str(out),
                    "--no-table", *FAST, *extra]

        def refused(*expected: str) -> None:
            assert main(args(killed, "--resume")) == 2
            err = capsys.readouterr().err
            assert "Traceback" not in err
            line = err.strip().splitlines()[-1]
            assert line.startswith("error: ") and all(e in line for e in expected), line

        whole, killed = tmp_path / "whole", tmp_path / "killed"
        assert main(args(whole)) == 0
        killed_at(args(killed), "finetune:1")
        checkpoint = next(killed.rglob("checkpoint"))
        state = state or sorted(
            p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*")
            if p.is_file() and p.name not in ("meta.json", "model.safetensors"))
        assert state, f"{method} saved no state of its own"
        capsys.readouterr()
        for name in state:
            path = checkpoint / name
            good = path.read_bytes()
            path.unlink()
            refused(str(path), "is missing")
            path.write_bytes(flipped(good))
            refused(str(path), "is damaged")
            path.write_bytes(good)
        assert main(args(killed, "--resume")) == 0
        a, b = (json.loads(next(out.rglob("result.json")).read_text()) for out in (whole, killed))
        assert b["resumed_at"] == [2]
        for key in NUMBERS:
            assert a[key] == b[key], key

    return check
