"""Same seed, same numbers; a run killed mid-sequence and resumed ends with the same numbers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
NUMBERS = ("mf1", "acc", "dap_loss", "general_mlm_loss", "dap_steps")


def cli(out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "benchmark", "run", "--method", "ncl", "--profile", "tiny",
            "--order", "1", "--out", str(out), "--no-table", *extra]
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, **(env or {})})


def result(out: Path) -> dict:
    path = out / "syn6-tiny" / "ncl" / "order1" / "seed2021" / "result.json"
    return json.loads(path.read_text())


def test_same_seed_twice_gives_identical_numbers_and_kill_then_resume_matches(tmp_path):
    first, second, killed = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert cli(first).returncode == 0
    assert cli(second).returncode == 0
    a, b = result(first), result(second)
    for key in NUMBERS:
        assert a[key] == b[key], key

    # killed during the third domain's DAP-training (after its steps, before its checkpoint)
    crash = cli(killed, env={"CDAP_CRASH_AT": "dap:2"})
    assert crash.returncode == 137
    run_dir = killed / "syn6-tiny" / "ncl" / "order1" / "seed2021"
    assert not (run_dir / "result.json").exists()
    meta = json.loads((run_dir / "checkpoint" / "meta.json").read_text())
    assert meta["domain"] == 1
    refused = cli(killed)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = cli(killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    c = result(killed)
    assert c["resumed_at"] == [2]
    for key in NUMBERS:
        assert c[key] == a[key], key


def test_kill_between_fine_tunings_resumes_without_redoing_finished_ones(tmp_path):
    out = tmp_path / "k"
    crash = cli(out, env={"CDAP_CRASH_AT": "finetune:1"})
    assert crash.returncode == 137
    progress = json.loads(
        (out / "syn6-tiny" / "ncl" / "order1" / "seed2021" / "progress.json").read_text())
    assert [len(r) for r in progress["mf1"]] == [1, 1]
    assert cli(out, "--resume").returncode == 0
    assert [len(r) for r in result(out)["mf1"]] == [1, 2, 3]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["das", "derpp"])
def test_two_processes_share_batches_and_stay_in_sync(tmp_path, method):
    # torchrun on CPU (gloo); the loop raises if the processes' models differ after a domain,
    # which they do as soon as one gradient is left out of the average
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "benchmark", "run", "--method", method, "--profile", "tiny", "--dap-steps", "3",
         "--ft-epochs", "1", "--out", str(tmp_path), "--no-table"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = list(tmp_path.rglob("result.json"))
    assert len(results) == 1 and not list(tmp_path.rglob("*.tmp"))
    result = json.loads(results[0].read_text())
    assert result["finished"] and [len(row) for row in result["mf1"]] == [1, 2, 3]
