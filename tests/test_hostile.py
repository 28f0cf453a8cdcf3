"""Bad input a hostile but realistic user gives: duplicated YAML keys, sweep flags, malformed
result files, duplicated runs, failing writes, interrupts, odd stdout encodings, odd data files.

Each test feeds the bad input and expects one line naming the file (exit 2, or 130 for Ctrl-C),
or a view that skips the bad file with one warning and still shows the good ones."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from benchmark.__main__ import main

DUPLICATED_SUITE = """\
name: dup
base_model: unused-here
domains:
  news:
    corpus: {format: text, files: [a.txt]}
    task: {format: scibert-jsonl, labels: [x, y], train: [a-train.jsonl], test: [a-test.jsonl]}
  news:
    corpus: {format: text, files: [b.txt]}
    task: {format: scibert-jsonl, labels: [x, y], train: [b-train.jsonl], test: [b-test.jsonl]}
"""


def _one_line_error(capsys, after_progress: bool = False) -> str:
    """The error line on stderr, its only line (`after_progress`: after progress bars)."""
    err = capsys.readouterr().err.strip()
    if after_progress:
        assert "Traceback" not in err, err
        err = err.splitlines()[-1]
    assert err.startswith("error: ") and "\n" not in err, err
    return err


# ---------------------------------------------------------------- duplicated YAML keys

def test_the_yaml_reader_refuses_a_duplicated_key_naming_file_and_line(tmp_path):
    from benchmark.config import ConfigError, read_yaml

    path = tmp_path / "x.yaml"
    path.write_text("a: 1\nb:\n  c: 2\n  c: 3\n")
    assert yaml.safe_load(path.read_text()) == {"a": 1, "b": {"c": 3}}  # PyYAML keeps the last
    with pytest.raises(ConfigError, match=rf"^{path}: malformed YAML at line 4: duplicate key "
                                          r"'c' \(first at line 3\)$"):
        read_yaml(path)
    path.write_text("a: 1\nb:\n  c: 2\n  d: 3\nlist: [{c: 1}, {c: 2}]\n")  # the same key in
    assert read_yaml(path)["list"] == [{"c": 1}, {"c": 2}]  # two mappings is fine


def test_a_suite_naming_a_domain_twice_is_refused(tmp_path, capsys):
    suite = tmp_path / "suite.yaml"
    suite.write_text(DUPLICATED_SUITE)
    assert main(["data", "check", str(suite)]) == 2
    err = _one_line_error(capsys)
    assert f"{suite}: malformed YAML at line 7: duplicate key 'news' (first at line 4)" in err


def test_a_run_config_and_a_grid_with_a_duplicated_key_are_refused(tmp_path, capsys):
    from benchmark.sweep import main as sweep

    config = tmp_path / "cfg.yaml"
    config.write_text("method: ncl\ndap_steps: 2\nmethod: das\n")
    assert main(["run", "--config", str(config), "--profile", "tiny",
                 "--out", str(tmp_path / "runs")]) == 2
    assert f"{config}: malformed YAML at line 3: duplicate key 'method'" in _one_line_error(capsys)
    grid = tmp_path / "grid.yaml"
    grid.write_text("methods: [ncl]\nseeds: [1]\nseeds: [2]\n")
    assert sweep([str(grid), "--dry-run"]) == 2
    assert f"{grid}: malformed YAML at line 3: duplicate key 'seeds'" in _one_line_error(capsys)
    assert not (tmp_path / "runs").exists()


def test_an_order_naming_a_domain_twice_is_refused(tmp_path, capsys):
    suite = tmp_path / "suite.yaml"
    text = DUPLICATED_SUITE.replace("  news:\n    corpus: {format: text, files: [b.txt]}",
                                    "  sports:\n    corpus: {format: text, files: [b.txt]}")
    suite.write_text(text + "orders: [[news, sports, news]]\n")
    assert main(["run", "--suite", str(suite), "--out", str(tmp_path / "runs")]) == 2
    err = _one_line_error(capsys)
    assert f"{suite}: order 0 names domain(s) ['news'] more than once" in err
    from tasks import SuiteError
    from tasks.registry import Suite

    suite = Suite("s", "default", {"a": None, "b": None}, [["a", "b"], ["a", "b", "a"]], "m")
    assert suite.order(0) == ["a", "b"]
    with pytest.raises(SuiteError, match=r"order 1 of suite 's' names domain\(s\) \['a'\] more"):
        suite.order(1)


# ---------------------------------------------------------------- sweep takes run's flags

def _sample(action) -> str:
    """A valid value for one of `run`'s options."""
    if action.choices:
        return str(list(action.choices)[-1])
    if action.dest == "report_to":
        return "tensorboard"
    return {int: "3", float: "0.5"}.get(action.type, "some-text")


@pytest.mark.parametrize("spelling", ["--flag value", "--flag=value"])
def test_every_run_flag_passes_through_sweep(spelling):
    """Each option of `run` (but those the sweep sets per cell) reaches every cell's `run`
    with the value `run` itself would parse; a value is never taken for the grid."""
    import argparse

    from benchmark.__main__ import parser
    from benchmark.grid import run_flags
    from benchmark.sweep import _run_actions, build_parser, resolve

    actions = _run_actions()
    assert {"eval_matrix", "dap_steps", "group_texts", "keep_checkpoint", "data_dir",
            "cache_dir", "report_to", "base_model"} <= {a.dest for a in actions}
    for action in actions:
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            variants = [[flag], ["--no-" + flag[2:]]]
        elif isinstance(action, argparse._StoreTrueAction):
            variants = [[flag]]
        elif spelling == "--flag=value":
            variants = [[f"{flag}={_sample(action)}"]]
        else:
            variants = [[flag, _sample(action)]]
        for argv in variants:
            args = build_parser().parse_args(["--methods", "ncl", *argv])
            assert args.grid is None, argv
            grid = resolve(args)
            run = parser().parse_args(["run", *argv])
            assert getattr(parser().parse_args(["run", *grid.run_args]), action.dest) == \
                getattr(run, action.dest), argv
            flags = run_flags(grid.run_args)
            assert flags.get(action.dest) == getattr(run, action.dest) or \
                action.dest not in flags, argv


def test_an_unknown_sweep_flag_is_refused_not_taken_for_a_grid(capsys):
    from benchmark.sweep import main as sweep

    with pytest.raises(SystemExit) as stop:
        sweep(["--methods", "ncl", "--eval-matrx", "diagonal", "--dry-run"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --eval-matrx" in err and "unknown grid" not in err


# ---------------------------------------------------------------- the README's commands

ROOT = Path(__file__).parent.parent
# the runs of results/syn6 copied for the README's views: order 0 of ncl, das and one row of
# rq3 (`plot` and `report` on all of syn6 draw 83 figures: minutes)
README_ROWS = ("ncl", "das", "das_w_o_softmask-5ee0184b")


def _docs() -> str:
    """The README and the pages under docs/, one text."""
    return "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted(ROOT.glob("docs/*.md"))])


def readme_commands() -> list[list[str]]:
    """Every `python -m benchmark ...` line of the bash blocks of the README and docs/,
    continuation lines joined, comments dropped, shell variables of the same block substituted."""
    import re
    import shlex

    commands = []
    text = _docs()
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        variables: dict[str, str] = {}
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if len(words) == 1 and re.fullmatch(r"[A-Z]+=.*", words[0]):
                name, value = words[0].split("=", 1)
                variables[name] = value
                continue
            for name, value in variables.items():
                line = line.replace(f"${name}", value)
            words = shlex.split(line, comments=True)
            if words[:3] == ["python", "-m", "benchmark"]:
                commands.append(words[3:])
    return commands


def _readme_mix(tmp: Path) -> None:
    """mix.yaml as the docs show it (the comment lines under `--config mix.yaml`)."""
    lines = _docs().splitlines()
    start = next(k for k, line in enumerate(lines) if "--config mix.yaml" in line)
    body = []
    for line in lines[start + 1:]:
        if not line.startswith("#   "):
            break
        body.append(line[4:])
    (tmp / "mix.yaml").write_text("\n".join(body) + "\n")


def test_the_readme_commands_run(tmp_path, monkeypatch, capsys):
    """Each README command that runs without the network or a data mirror, on this machine:
    `table`, `plot`, `report`, `list` as written (plot and report on a few rows of
    results/syn6); `sweep` with --dry-run; `run` up to its plan (every config, method, order
    and folder checked, nothing trained); `bench` --help. Real-data commands are skipped."""
    import importlib.util

    from benchmark.__main__ import parser, plan_runs

    syn6 = tmp_path / "results" / "syn6"
    for path in (ROOT / "results" / "syn6").rglob("result.json"):
        rel = path.relative_to(ROOT / "results" / "syn6")
        if rel.parts[1] in README_ROWS and rel.parts[2] == "order0":
            (syn6 / rel).parent.mkdir(parents=True, exist_ok=True)
            record = json.loads(path.read_text())
            # the committed rows predate the MLM-loss matrix; `table --mlm` needs one: a
            # stand-in of the recorded shape (θ0's row, then one per domain)
            T = len(record["domains"])
            record["mlm_loss"] = [[2.5 - 0.1 * t + 0.01 * (i + record["seed"] % 7)
                                   for i in range(T)] for t in range(T + 1)]
            (syn6 / rel).write_text(json.dumps(record))
    (tmp_path / "results" / "runs").symlink_to(syn6)
    (tmp_path / "results" / "real6").symlink_to(ROOT / "results" / "real6")
    _readme_mix(tmp_path)
    (tmp_path / "my-grid.yaml").write_text("methods: [ncl]\nprofiles: [tiny]\n")
    monkeypatch.chdir(tmp_path)
    commands = readme_commands()
    assert ["sweep", "--methods", "ncl,das", "--profile", "tiny", "--orders", "0-1", "--seeds",
            "2021,111", "--eval-matrix", "diagonal"] in commands
    ran = []
    for argv in commands:
        if argv[0] == "data" or {"real6", "das6"} & set(argv) and argv[0] == "run":
            continue  # the network, a data mirror or the companion archive
        if any(w.startswith("avl") for w in argv) and not importlib.util.find_spec("avalanche"):
            continue  # the avalanche extra
        if "runs/avl-example" in argv:
            continue  # made by examples/avalanche_strategy.py (training: minutes)
        if argv[0] == "run":
            plan_runs(parser().parse_args(argv))
        elif argv[0] == "bench":
            with pytest.raises(SystemExit) as stop:
                main([*argv, "--help"])
            assert stop.value.code == 0
        else:
            if argv[0] == "sweep" and "--dry-run" not in argv:
                argv = [*argv, "--dry-run"]
            assert main(argv) == 0, (argv, capsys.readouterr().err[-2000:])
        ran.append(argv[0])
    assert sorted(set(ran)) == ["bench", "list", "plot", "report", "run", "sweep", "table"]
    assert (tmp_path / "report" / "index.html").exists()


# ---------------------------------------------------------------- malformed result files

DOMAINS = ["restaurant", "acl", "ai"]


def _record(row: str, seed: int, shift: float = 0.0) -> dict:
    """A finished result record of 3 domains, as `loop.run` writes it."""
    from benchmark.config import RunConfig

    mf1 = [[50.0 + shift + seed % 7 + t + i for i in range(t + 1)] for t in range(3)]
    return {"suite": "syn6", "profile": "tiny", "synthetic": True, "method": row, "row": row,
            "order": 0, "seed": seed, "domains": DOMAINS, "needs_domain_id": False,
            "config": {**RunConfig(method=row, seed=seed, profile="tiny").to_dict()},
            "versions": {"torch": "x"}, "git_commit": "abc", "threads": 1, "cpu": "cpu",
            "base_fingerprint": "f" * 64, "mf1": mf1, "acc": [[v + 1 for v in r] for r in mf1],
            "protocol": "finetune", "collapsed": [[False] * (t + 1) for t in range(3)],
            "dap_loss": [[2.0, 1.5]] * 3, "dap_steps": [2, 2, 2],
            "general_mlm_loss": [2.0, 2.1, 2.2, 2.3], "head_warmup_loss": [],
            "timings": {"base_model_s": 0.0, "dap_s": [1.0] * 3,
                        "finetune_s": [[1.0] * (t + 1) for t in range(3)], "total_s": 9.0},
            "resumed_at": [], "finished": True, "schema": 3}


def _write_runs(root: Path, records: list[dict]) -> list[Path]:
    paths = []
    for rec in records:
        path = root / f"{rec['row']}-{rec['seed']}" / "result.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec))
        paths.append(path)
    return paths


GOOD = [_record(row, seed, shift) for row, shift in (("ncl", 0.0), ("das", 3.0))
        for seed in (2021, 111)]


def _malform(kind: str) -> dict:
    rec = json.loads(json.dumps(_record("ncl", 222, 40.0)))
    if kind == "short row":
        rec["mf1"][2].pop()
    elif kind == "missing row":
        rec["mf1"].pop()
    elif kind == "null cell":
        rec["mf1"][2][1] = None
    elif kind == "mf1 null":
        rec["mf1"] = None
    elif kind == "string number":
        rec["mf1"][2][0] = "51.0"
    elif kind == "string schema":
        rec["schema"] = "3"
    elif kind == "extra cell":
        rec["mf1"][2].append(900.0)
    elif kind == "config null":
        rec["config"] = None
    elif kind == "acc short":
        rec["acc"][1] = [1.0]
    elif kind == "compute damaged":
        rec["compute"] = {"dap": {"tokens": "many", "flops": 1.0}}
    return rec


MALFORMED = ["short row", "missing row", "null cell", "mf1 null", "string number",
             "string schema", "extra cell", "config null", "acc short", "compute damaged"]


def _skipped(caplog, path: Path) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "skipped" in r.getMessage() and str(path) in
            r.getMessage()]


@pytest.mark.parametrize("kind", MALFORMED)
def test_a_malformed_result_is_skipped_by_every_table_naming_it(tmp_path, capsys, caplog, kind):
    good = tmp_path / "good"
    _write_runs(good, GOOD)
    runs = tmp_path / "runs"
    _write_runs(runs, GOOD)
    bad = _write_runs(runs, [_malform(kind)])[0]
    for view in ([], ["--pooled"], ["--diagonal"], ["--paper-metrics"], ["--timings"],
                 ["--dap-loss"], ["--vs", "ncl"], ["--compute"]):
        caplog.clear()
        assert main(["table", "--runs", str(good), *view]) == 0
        expected = capsys.readouterr().out
        assert main(["table", "--runs", str(runs), *view]) == 0, view
        assert capsys.readouterr().out == expected, view  # the good rows, unchanged
        assert len(_skipped(caplog, bad)) == 1, view
        assert "not a valid result record" in _skipped(caplog, bad)[0] or \
            "not a result record" in _skipped(caplog, bad)[0]


def test_plot_and_report_skip_malformed_results_naming_each(tmp_path, caplog):
    runs = tmp_path / "runs"
    _write_runs(runs, GOOD)
    bad = []
    for k, kind in enumerate(MALFORMED):
        rec = _malform(kind)
        rec["seed"] = 500 + k
        bad += _write_runs(runs, [rec])
    assert main(["plot", "--runs", str(runs), "--out", str(tmp_path / "fig")]) == 0
    assert all(len(_skipped(caplog, path)) == 1 for path in bad)
    assert (tmp_path / "fig" / "syn6-tiny-order0" / "A_mf1-das.png").exists()
    caplog.clear()
    assert main(["report", "--runs", str(runs), "--out", str(tmp_path / "rep")]) == 0
    assert all(len(_skipped(caplog, path)) == 1 for path in bad)
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "4 finished runs" in page and "seeds 111, 2021" in page


# ---------------------------------------------------------------- the same run twice

def test_a_copy_of_the_runs_is_counted_once_with_one_warning(tmp_path, capsys, caplog):
    runs = tmp_path / "runs"
    _write_runs(runs, GOOD)
    assert main(["table", "--runs", str(runs)]) == 0
    alone = capsys.readouterr().out
    assert "| ncl      | 2 " in alone
    _write_runs(runs / "backup", GOOD)  # a backup copy inside the runs folder
    other = json.loads(json.dumps(GOOD[0]))
    other["config"]["dap_steps"] = 7  # not a copy: another config of the same row and seed
    _write_runs(runs / "other", [other])
    caplog.clear()
    assert main(["table", "--runs", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "| ncl      | 3 " in out and "| das      | 2 " in out  # not 4 + 1 and 4
    warned = [r.getMessage() for r in caplog.records if "duplicate" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("ignored 4 duplicate run(s)")
    assert str(runs / "das-111" / "result.json") in warned[0]
    for view in (["--vs", "ncl"], ["--pooled"], ["--diagonal"]):
        (runs / "other" / "ncl-2021" / "result.json").unlink(missing_ok=True)
        assert main(["table", "--runs", str(runs), *view]) == 0
        copied = capsys.readouterr().out
        assert main(["table", "--runs", str(runs / "backup"), *view]) == 0
        assert copied == capsys.readouterr().out, view


# ---------------------------------------------------------------- writes that fail midway

def _full_disk_on(monkeypatch, fragment: str) -> None:
    """Every file opened for writing whose name contains `fragment` takes half of what it is
    given, then fails as a full disk does (`open` and `io.open`, so `Path.write_text` too)."""
    import builtins
    import errno
    import io

    real = builtins.open

    class Half:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            self.handle.write(data[: len(data) // 2])
            self.handle.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    def failing(file, mode="r", *args, **kwargs):
        handle = real(file, mode, *args, **kwargs)
        if fragment in str(file) and any(m in mode for m in "wax"):
            return Half(handle)
        return handle

    monkeypatch.setattr(builtins, "open", failing)
    monkeypatch.setattr(io, "open", failing)


def test_a_report_that_hits_a_full_disk_keeps_the_old_page(tmp_path, monkeypatch, capsys):
    runs, out = tmp_path / "runs", tmp_path / "report"
    _write_runs(runs, GOOD)
    assert main(["report", "--runs", str(runs), "--out", str(out)]) == 0
    index = out / "index.html"
    before = index.read_bytes()
    figure = out / "figures" / "syn6-tiny-order0" / "summary_bars.png"
    assert figure.exists()
    _write_runs(runs, [_record("kd", 2021)])  # the new page would differ
    capsys.readouterr()
    with monkeypatch.context() as patch:
        _full_disk_on(patch, "index.html")
        assert main(["report", "--runs", str(runs), "--out", str(out)]) == 2
    err = _one_line_error(capsys)
    assert err == f"error: No space left on device ({index})"
    assert index.read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["figures", "index.html"]  # no temporary
    figure_before = figure.read_bytes()
    with monkeypatch.context() as patch:
        _full_disk_on(patch, "summary_bars")
        assert main(["plot", "--runs", str(runs), "--out", str(out / "figures")]) == 2
    assert _one_line_error(capsys) == f"error: No space left on device ({figure})"
    assert figure.read_bytes() == figure_before
    assert not [p for p in figure.parent.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- full disks, Ctrl-C

def test_a_full_disk_during_a_checkpoint_is_an_os_error_naming_it(tmp_path, monkeypatch):
    """safetensors raises `SafetensorError` (not an OSError) when its write fails: the
    checkpoint says which file and why, as an OSError, and the previous checkpoint stays."""
    import errno

    from safetensors import SafetensorError
    from torch import nn

    from benchmark import checkpoint
    from benchmark.__main__ import os_error_line

    class Stateless:
        def save_state(self, folder):
            pass

    model = nn.Linear(2, 2)
    first = checkpoint.save_checkpoint(tmp_path, model, Stateless(), {"domain": 0})
    kept = (first / "model.safetensors").read_bytes()

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: I/O error: No space left on device '
                              '(os error 28) at path "/x/.tmpAbc"')

    monkeypatch.setattr(checkpoint, "save_model", full)
    with pytest.raises(OSError) as raised:
        checkpoint.save_checkpoint(tmp_path, model, Stateless(), {"domain": 1})
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(first)
    assert os_error_line(raised.value) == f"error: No space left on device ({first})"
    assert (first / "model.safetensors").read_bytes() == kept
    assert checkpoint.read_json(first / "meta.json")["domain"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no temporary


def test_run_stops_on_a_full_disk_at_its_checkpoint_with_one_line(tmp_path, monkeypatch,
                                                                  capsys):
    from safetensors import SafetensorError

    from benchmark import checkpoint

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    monkeypatch.setattr(checkpoint, "save_model", full)
    out = tmp_path / "runs"
    assert main(["run", "--profile", "tiny", "--dap-steps", "1", "--ft-epochs", "1",
                 "--out", str(out), "--no-table"]) == 2
    err = _one_line_error(capsys, after_progress=True)
    assert err.startswith("error: No space left on device (") and "checkpoint)" in err
    assert err.endswith("; then rerun with --resume to continue")


def _grid(tmp_path: Path) -> list[str]:
    return ["--methods", "ncl", "--profile", "tiny", "--out", str(tmp_path / "runs"),
            "--dap-steps", "1"]


def test_sweep_on_an_unwritable_out_is_one_line(tmp_path, monkeypatch, capsys):
    import errno
    import os

    from benchmark import executors, sweep

    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).startswith(
        str(tmp_path)) else real_access(p, mode))  # root writes anywhere: as a user would see it
    assert sweep.main(_grid(tmp_path)) == 2
    assert f"--out {tmp_path / 'runs'}: {tmp_path} is not writable" in _one_line_error(capsys)
    monkeypatch.setattr(os, "access", real_access)

    def refused(path, wait=0.0):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(executors, "run_lock", refused)  # writable at the check, not a moment later
    assert sweep.main(_grid(tmp_path)) == 2
    err = _one_line_error(capsys, after_progress=True)
    assert err.startswith(f"error: Permission denied ({tmp_path / 'runs' / '.sweep'}")
    assert err.endswith("; then rerun the same sweep to continue (finished cells are skipped, "
                        "killed ones resume)")


def test_ctrl_c_on_a_sweep_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    from benchmark import executors, sweep

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(sweep, "dry_run", interrupt)
        assert sweep.main([*_grid(tmp_path), "--dry-run"]) == 130
    assert capsys.readouterr().err == "interrupted\n"
    with monkeypatch.context() as patch:
        patch.setattr(executors, "execute_cell", interrupt)
        assert sweep.main(_grid(tmp_path)) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        "interrupted; rerun the same sweep to continue (finished cells are skipped, killed ones "
        "resume)")


def test_ctrl_c_on_a_submitit_local_sweep_cancels_its_jobs(tmp_path, monkeypatch, capsys):
    import submitit

    from benchmark import executors, sweep

    cancelled = []

    class Job:
        job_id = "1"

        def done(self):
            return False

        def cancel(self, check=True):
            cancelled.append(self)

    class Executor:
        def __init__(self, folder, cluster):
            pass

        def update_parameters(self, **params):
            pass

        def submit(self, fn, *args):
            return Job()

    def interrupt(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(submitit, "AutoExecutor", Executor)
    monkeypatch.setattr(executors.time, "sleep", interrupt)
    argv = [*_grid(tmp_path), "--executor", "submitit-local", "--seeds", "1,2", "--jobs", "2"]
    assert sweep.main(argv) == 130
    assert len(cancelled) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("interrupted; rerun the same")


# ---------------------------------------------------------------- smaller ones

def test_sweep_checks_the_base_model_before_any_cell(tmp_path, monkeypatch, capsys):
    from benchmark import executors, sweep

    def never(*args, **kwargs):
        raise AssertionError("a cell started")

    monkeypatch.setattr(executors, "execute_cell", never)
    missing = tmp_path / "no-model"
    for extra in ([], ["--dry-run"]):
        assert sweep.main([*_grid(tmp_path), "--base-model", str(missing), *extra]) == 2
        assert f"base model folder {missing} does not exist" in _one_line_error(capsys)


def test_an_ascii_stdout_gets_escapes_not_a_crash(tmp_path, monkeypatch, capsys):
    import io
    import sys

    from benchmark import sweep

    runs = tmp_path / "runs"
    _write_runs(runs, GOOD)
    for argv, run in ((["table", "--runs", str(runs)], main),
                      ([*_grid(tmp_path), "--dry-run"], sweep.main)):
        raw = io.BytesIO()
        stream = io.TextIOWrapper(raw, encoding="ascii")  # PYTHONIOENCODING=ascii
        monkeypatch.setattr(sys, "stdout", stream)
        assert run(argv) == 0
        stream.flush()
        text = raw.getvalue().decode("ascii")
        assert ("\\xb1" if run is main else "\\xd7") in text  # ± in the table, × in the plan
        monkeypatch.undo()


def test_a_very_long_corpus_line_is_cut_with_one_warning(tmp_path, monkeypatch, caplog):
    from tasks import formats

    monkeypatch.setattr(formats, "MAX_DOC_CHARS", 100)
    path = tmp_path / "corpus.txt"
    path.write_text("short one\n" + "w " * 400 + "\n" + "x" * 150 + "\nlast\n")
    with caplog.at_level(logging.WARNING):
        docs = formats.read_corpus_files("text", [(path, "utf-8")])
    assert [len(d) for d in docs] == [9, 100, 100, 4]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [f"{path}: 2 document(s) longer than 100 characters cut to that length "
                      "(the first: document 2, 799 characters)"]


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_directory_or_fifo_for_a_data_file_says_what_it_is(tmp_path, capsys, kind):
    import os

    root = tmp_path / "mydata"
    root.mkdir()
    for split in ("train", "test"):
        (root / f"news-{split}.jsonl").write_text(
            "\n".join(json.dumps({"text": f"t {k}", "label": "x"}) for k in range(4)) + "\n")
    corpus = root / "news.txt"
    if kind == "directory":
        corpus.mkdir()
    else:
        os.mkfifo(corpus)  # reading it would wait for a writer forever
    suite = root / "suite.yaml"
    suite.write_text(yaml.safe_dump({"name": "mini", "base_model": "unused-here", "domains": {
        "news": {"corpus": {"format": "text", "files": ["news.txt"]},
                 "task": {"format": "scibert-jsonl", "labels": ["x", "y"],
                          "train": ["news-train.jsonl"], "test": ["news-test.jsonl"]}}}}))
    monkey = {"directory": "is a directory", "fifo": "is a FIFO (named pipe)"}[kind]
    assert main(["run", "--suite", str(suite), "--out", str(tmp_path / "runs")]) == 2
    err = _one_line_error(capsys)
    assert f"data file {corpus} (news corpus) {monkey}" in err and "missing" not in err
