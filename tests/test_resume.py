"""Same seed, same numbers; a run killed anywhere and resumed ends with the same numbers; a
resume that cannot be right (another config, a missing or damaged file, edited data, a live
writer) is refused in one line, exit 2, nothing lost; a diverged domain never becomes a result.

Kills are made in this process (the crash hook raises `CrashPoint`, see conftest `killed_at`);
one test sends a real SIGKILL and one a real SIGINT to a subprocess."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST, NUMBERS

from benchmark.__main__ import main
from benchmark.atomic import write_json_atomic

ROOT = Path(__file__).parent.parent
ARGS = ("run", "--method", "ncl", "--profile", "tiny", "--order", "1", "--no-table", *FAST)
RUN_DIR = Path("syn6-tiny") / "ncl" / "order1" / "seed2021"


def cli(out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m benchmark run ...` in a subprocess (only where a real signal is the point)."""
    args = [sys.executable, "-m", "benchmark", *ARGS, "--out", str(out), *extra]
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, **(env or {})})


def args(out: Path, *extra: str) -> list[str]:
    return [*ARGS, "--out", str(out), *extra]


def result(out: Path) -> dict:
    return json.loads((out / RUN_DIR / "result.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted run every killed and resumed one must equal."""
    out = tmp_path_factory.mktemp("reference")
    assert main(args(out)) == 0
    return result(out)


def same_numbers(a: dict, b: dict) -> None:
    for key in NUMBERS:
        assert a[key] == b[key], key



def not_rebuilt(stderr: str) -> bool:
    """θ0 came from the shipped file or the session's cache, not pretrained again."""
    return "loaded the shipped base model" in stderr or "reusing cached base model" in stderr


def test_a_real_kill_9_resumes_to_the_same_numbers(tmp_path, reference):
    # the one test with a real SIGKILL, in a subprocess: after the second domain's checkpoint
    # and before its progress was written
    killed = tmp_path / "c"
    crash = cli(killed, env={"CDAP_CRASH_AT": "checkpoint:1"})
    assert crash.returncode == -signal.SIGKILL, crash.stderr[-2000:]
    assert not_rebuilt(crash.stderr)
    run_dir = killed / RUN_DIR
    assert not (run_dir / "result.json").exists()
    meta = json.loads((run_dir / "checkpoint" / "meta.json").read_text())
    assert meta["domain"] == 1
    assert len(json.loads((run_dir / "progress.json").read_text())["dap_steps"]) == 1
    refused = cli(killed)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = cli(killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    c = result(killed)
    assert c["resumed_at"] == [2]
    same_numbers(reference, c)  # and the same seed gave the same numbers in two processes


def test_a_real_ctrl_c_is_one_line_and_resume_ends_with_the_same_numbers(tmp_path, reference):
    # the one test with a real SIGINT, in a subprocess: the hook waits for its handler
    out = tmp_path / "i"
    proc = cli(out, env={"CDAP_CRASH_AT": "finetune:1", "CDAP_CRASH_SIGNAL": "INT"})
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not_rebuilt(proc.stderr)
    assert "--resume" in proc.stderr.strip().splitlines()[-1]
    assert main(args(out, "--resume")) == 0
    assert result(out)["resumed_at"] == [2]
    same_numbers(reference, result(out))


def test_kill_between_fine_tunings_resumes_without_redoing_finished_ones(tmp_path, killed_at):
    out = tmp_path / "k"
    killed_at(args(out), "finetune:1")
    progress = json.loads((out / RUN_DIR / "progress.json").read_text())
    assert [len(r) for r in progress["mf1"]] == [1, 1]
    assert main(args(out, "--resume")) == 0
    assert [len(r) for r in result(out)["mf1"]] == [1, 2, 3]


BOUNDARIES = [f"{stage}:{t}" for t in range(3) for stage in ("dap", "checkpoint", "finetune")]


@pytest.mark.slow
def test_killed_at_every_phase_boundary_resume_ends_with_the_same_numbers(tmp_path, reference,
                                                                          killed_at):
    out = tmp_path / "killed"
    # one run, killed at every boundary in turn: each --resume goes on to the next one
    for n, point in enumerate([*BOUNDARIES, "finish:2"]):
        killed_at(args(out, *(["--resume"] if n else [])), point)
    assert main(args(out, "--resume")) == 0
    c = result(out)
    assert c["resumed_at"] == [1, 1, 2, 2, 2, 3, 3]  # a kill in DAP loses its own append
    same_numbers(reference, c)
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("progress.json"))


def interrupted_run(tmp_path, monkeypatch) -> tuple[Path, list[str]]:
    """A tiny run stopped by a full disk when the second domain's checkpoint is written."""
    import benchmark.loop

    real = benchmark.loop.save_checkpoint

    def disk_full(run_dir, model, method, meta):
        if meta["domain"] == 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(run_dir / "checkpoint"))
        return real(run_dir, model, method, meta)

    args = ["run", "--method", "ncl", "--profile", "tiny", "--out", str(tmp_path / "out"),
            "--no-table", *FAST]
    with monkeypatch.context() as patch:
        patch.setattr(benchmark.loop, "save_checkpoint", disk_full)
        assert main(args) == 2
    return tmp_path / "out" / "syn6-tiny" / "ncl" / "order0" / "seed2021", args


def test_full_disk_then_bad_resumes_are_refused_and_a_good_one_finishes(tmp_path, capsys,
                                                                      monkeypatch):
    from benchmark.lock import run_lock

    run_dir, args = interrupted_run(tmp_path, monkeypatch)
    err = capsys.readouterr().err  # progress bars, then the one line
    assert "Traceback" not in err
    err = err.strip().splitlines()[-1]
    assert err.startswith("error: No space left on device") and "--resume" in err
    saved = {p.name: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}

    def refused(*extra: str) -> str:
        assert main([*args, *extra]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err.strip().splitlines()[-1]

    # another config than the stored one: the keys are named
    assert "dap_steps=3 (asked 4)" in refused("--resume", "--dap-steps", "4")
    # a live writer holds the folder
    with run_lock(run_dir):
        assert "another live process" in refused("--resume")
        assert "another live process" in refused("--overwrite")
    # damaged files of the interrupted run
    for name, damage in (("progress.json", b'{"suite": "syn'), ("meta.json", b""),
                         ("model.safetensors", b"\0" * 10)):
        path = next(run_dir.rglob(name))
        good = path.read_bytes()
        path.write_bytes(damage)
        assert f"{path} is damaged" in refused("--resume")
        path.write_bytes(good)
    assert {p.name: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == saved
    assert main([*args, "--resume"]) == 0
    done = json.loads((run_dir / "result.json").read_text())
    assert done["resumed_at"] == [1] and [len(r) for r in done["mf1"]] == [1, 2, 3]


def test_ctrl_c_is_one_line_saying_resume_continues(tmp_path, capsys, monkeypatch):
    import benchmark.loop

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(benchmark.loop, "finetune_and_test", interrupt)
    code = main(["run", "--method", "ncl", "--profile", "tiny", "--out", str(tmp_path),
                 "--no-table", *FAST])
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("interrupted; rerun the same command with "
                                                   "--resume")


def test_labels_that_sanitise_alike_get_their_own_folders(tmp_path):
    from benchmark.config import RunConfig
    from benchmark.loop import run_dir_for

    dirs = {run_dir_for(tmp_path, RunConfig(method="das", label=label))
            for label in ("das (fast)", "das [fast]", "das_fast_")}
    assert len(dirs) == 3
    assert run_dir_for(tmp_path, RunConfig(method="das")).parts[-3] == "das"


def test_a_finished_run_of_another_config_is_not_reported_as_this_one(tmp_path, capsys,
                                                                    monkeypatch):
    run_dir, args = interrupted_run(tmp_path, monkeypatch)
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)
    assert main([*args, "--resume", "--ft-epochs", "2"]) == 2
    assert "ft_epochs=1 (asked 2)" in capsys.readouterr().err


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


# -- a resume that cannot be fooled: damaged weights, a diverged domain, edited data ----------
def nan_bytes(path: Path) -> None:
    """256 bytes of the first float32 tensor's data in a safetensors file set to 0xFF (NaN)."""
    content = bytearray(path.read_bytes())
    size = int.from_bytes(content[:8], "little")
    header = json.loads(content[8:8 + size])
    start = min(v["data_offsets"][0] for k, v in header.items()
                if k != "__metadata__" and v["dtype"] == "F32")
    content[8 + size + start:8 + size + start + 256] = b"\xff" * 256
    path.write_bytes(bytes(content))


def test_damaged_weights_are_refused_and_never_become_a_result(tmp_path, capsys, monkeypatch):
    run_dir, args = interrupted_run(tmp_path, monkeypatch)
    capsys.readouterr()
    model, meta = run_dir / "checkpoint" / "model.safetensors", run_dir / "checkpoint" / "meta.json"
    nan_bytes(model)

    def refused() -> str:
        assert main([*args, "--resume"]) == 2
        assert not (run_dir / "result.json").exists()
        return capsys.readouterr().err.strip().splitlines()[-1]

    assert f"{model} is damaged (its sha256 differs" in refused()
    # a checkpoint that records no checksums (an older version's): the NaN weights are refused
    write_json_atomic(meta, {k: v for k, v in json.loads(meta.read_text()).items()
                             if k != "files"})
    assert f"{model} is damaged (non-finite values in " in refused()


@pytest.mark.parametrize("where", ["loss", "weight"])
def test_a_diverged_domain_stops_the_run_before_its_checkpoint(tmp_path, capsys, monkeypatch,
                                                               where):
    import torch

    import benchmark.loop

    real = benchmark.loop.dap_train

    def diverging(ctx, method, plan, t):
        losses = real(ctx, method, plan, t)
        if t == 1 and where == "loss":
            losses[-1] = float("nan")
        elif t == 1:
            with torch.no_grad():
                ctx.model.bert.encoder.layer[0].output.dense.weight[0, 0] = float("inf")
        return losses

    monkeypatch.setattr(benchmark.loop, "dap_train", diverging)
    out = tmp_path / "out"
    assert main(["run", "--method", "ncl", "--profile", "tiny", "--out", str(out), "--no-table",
                 *FAST]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "domain 1 (" in line and "not finite" in line
    if where == "weight":
        assert "bert.encoder.layer.0.output.dense.weight" in line
    run_dir = out / "syn6-tiny" / "ncl" / "order0" / "seed2021"
    assert not (run_dir / "result.json").exists()
    assert json.loads((run_dir / "checkpoint" / "meta.json").read_text())["domain"] == 0


def user_suite(root: Path) -> Path:
    """A two-domain suite YAML with its data files and a tiny local base model under `root`."""
    import torch
    import yaml
    from transformers import BertConfig, BertForMaskedLM

    from benchmark.basemodel import word_tokenizer

    words = [f"w{k}" for k in range(24)]
    tokenizer = word_tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=32,
                               max_position_embeddings=64)).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    domains = {}
    for d, name in enumerate(("news", "blogs")):
        own = words[12 * d:12 * d + 12]
        (root / f"{name}.txt").write_text("\n".join(
            " ".join(own[(k + j) % 12] for j in range(8)) for k in range(40)) + "\n")
        for split, n in (("train", 12), ("test", 6)):
            rows = [json.dumps({"text": " ".join(own[(k * 5 + j) % 12] for j in range(6)),
                                "label": ["yes", "no"][k % 2]}) for k in range(n)]
            (root / f"{name}-{split}.jsonl").write_text("\n".join(rows) + "\n")
        domains[name] = {"corpus": {"format": "text", "files": [f"{name}.txt"]},
                         "task": {"format": "scibert-jsonl", "labels": ["yes", "no"],
                                  "train": [f"{name}-train.jsonl"],
                                  "test": [f"{name}-test.jsonl"]}}
    spec = {"name": "mini", "base_model": str(root / "model"), "split": "standard",
            "defaults": {"dap_batch_size": 8, "max_length": 16, "ft_batch_size": 4,
                         "importance_batches": 2}, "domains": domains}
    path = root / "suite.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_data_edited_between_a_kill_and_resume_is_refused_naming_the_file(tmp_path, capsys,
                                                                          monkeypatch,
                                                                          killed_at):
    monkeypatch.setenv("CDAP_DATA_DIR", str(tmp_path / "data"))
    suite = user_suite(tmp_path)
    args = ["run", "--suite", str(suite), "--method", "ncl", "--out", str(tmp_path / "runs"),
            "--no-table", "--dap-steps", "2", "--ft-epochs", "1"]
    killed_at(args, "finetune:0")  # A[0][0] measured on the test set as it was
    test_file = tmp_path / "news-test.jsonl"
    kept = test_file.read_text()
    test_file.write_text(kept.replace('"label": "yes"', '"label": "maybe"').replace(
        '"label": "no"', '"label": "yes"').replace('"label": "maybe"', '"label": "no"'))
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "data news-test.jsonl changed since" in line and "--overwrite" in line
    assert not list((tmp_path / "runs").rglob("result.json"))
    test_file.write_text(kept)
    assert main([*args, "--resume"]) == 0
    done = json.loads(next((tmp_path / "runs").rglob("result.json")).read_text())
    assert done["resumed_at"] == [1] and [len(r) for r in done["mf1"]] == [1, 2]
