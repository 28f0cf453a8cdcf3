"""The command line: runs, result files, tables, and one clear line for every bad input."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmark.__main__ import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmark", *args], capture_output=True,
                          text=True, cwd=Path(__file__).parent.parent, timeout=600)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--method", "nope"], "unknown method 'nope'; valid methods:"),
        (["--suite", "nope"], "unknown suite 'nope'; valid suites: das6, real6, syn6, syn6v2"),
        (["--order", "7"], "order 7 does not exist for suite 'syn6'; valid orders: 0..4"),
        (["--dap-steps", "0"], "dap_steps must be a positive integer, got 0"),
        (["--profile", "huge"], "unknown profile 'huge' for suite 'syn6'"),
        (["--config", "no-such-preset"], "unknown config 'no-such-preset'"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(tmp_path, capsys, args, expected):
    out = tmp_path / "runs"
    assert main(["run", "--profile", "tiny", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1
    assert not out.exists(), "nothing may be written for bad input"


def test_bad_input_from_the_shell_has_no_traceback(tmp_path):
    proc = run_cli("run", "--method", "nope", "--out", str(tmp_path / "runs"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: unknown method 'nope'")


def test_malformed_yaml_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: ncl\ndap_steps: [1,\n")
    assert main(["run", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "malformed YAML at line" in err


def test_unknown_config_key_is_named(tmp_path, capsys):
    bad = tmp_path / "typo.yaml"
    bad.write_text("method: ncl\ndap_stepz: 3\n")
    assert main(["run", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown config key(s) ['dap_stepz']" in err and "dap_steps" in err


def test_unknown_precision_is_named_with_its_file(tmp_path, capsys):
    bad = tmp_path / "fp8.yaml"
    bad.write_text("method: ncl\nmixed_precision: fp8\n")
    assert main(["run", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "mixed_precision must be one of 'no', 'fp16', 'bf16'" in err


def test_mixed_precision_changes_the_dap_losses_and_stays_finite(tmp_path):
    # subprocesses: Accelerate fixes the precision once per process
    losses = {}
    for precision in ("no", "bf16"):
        out = tmp_path / precision
        proc = run_cli("run", "--method", "das", "--profile", "tiny", "--dap-steps", "2",
                       "--ft-epochs", "1", "--mixed-precision", precision, "--out", str(out),
                       "--no-table")
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(next(out.rglob("result.json")).read_text())
        assert result["config"]["mixed_precision"] == precision
        losses[precision] = [loss for domain in result["dap_loss"] for loss in domain]
    assert all(math.isfinite(loss) for loss in losses["bf16"])
    assert losses["bf16"] != losses["no"]
    assert losses["bf16"] == pytest.approx(losses["no"], rel=0.05)


def test_unknown_method_argument_is_named(tmp_path, capsys):
    bad = tmp_path / "arg.yaml"
    bad.write_text("method: ncl\nmethod_args: {lambda: 3}\n")
    code = main(["run", "--config", str(bad), "--profile", "tiny", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "method 'ncl': unknown key(s) ['lambda']" in capsys.readouterr().err


def test_list_commands(capsys):
    assert main(["list", "methods"]) == 0
    names = capsys.readouterr().out
    for name in ("base", "one", "pool", "ncl"):
        assert f"\n{name} " in "\n" + names
    assert main(["list", "suites"]) == 0
    assert "syn6" in capsys.readouterr().out


def test_run_writes_result_and_table_rebuilds_it(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["run", "--method", "ncl", "--profile", "tiny", "--out", str(out),
                 "--no-table"]) == 0
    path = out / "syn6-tiny" / "ncl" / "order0" / "seed2021" / "result.json"
    result = json.loads(path.read_text())
    assert result["finished"] and result["domains"] == ["restaurant", "acl", "ai"]
    assert [len(row) for row in result["mf1"]] == [1, 2, 3]
    assert result["config"]["method"] == "ncl" and result["versions"]["torch"]
    assert len(result["general_mlm_loss"]) == 4  # θ0 and after each domain
    # the final checkpoint is dropped once the result is safely written, unless kept
    assert not (path.parent / "checkpoint").exists()
    capsys.readouterr()
    formats = (("markdown", "| ncl"), ("csv", "method,seeds"), ("latex", "\\begin{tabular}"))
    for fmt, marker in formats:
        assert main(["table", "--runs", str(out), "--format", fmt]) == 0
        assert marker in capsys.readouterr().out
    assert main(["table", "--runs", str(out), "--timings", "--format", "csv"]) == 0
    heading, header, ncl_row = capsys.readouterr().out.splitlines()[:3]
    assert "wall time per run" in heading and header.endswith("× ncl")
    assert ncl_row.startswith("ncl,1,") and ncl_row.endswith(",1.00")  # ncl against itself
    # the DAP loss view: the tiny profile's 8 steps log steps 0 and 7; the last 20 % is step 7
    assert main(["table", "--runs", str(out), "--dap-loss", "--format", "csv"]) == 0
    heading, header, ncl_row = capsys.readouterr().out.splitlines()[:3]
    assert "DAP training loss" in heading and header == "method,seeds,restaurant,acl,ai"
    assert ncl_row.split(",")[2:] == [f"{losses[-1]:.3f}" for losses in result["dap_loss"]]
    # a second run into the same place is refused rather than overwritten
    assert main(["run", "--method", "ncl", "--profile", "tiny", "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_table_without_results_is_a_clear_error(tmp_path, capsys):
    assert main(["table", "--runs", str(tmp_path)]) == 2
    assert "no finished result.json" in capsys.readouterr().err


def test_diagonal_eval_matrix_gives_the_full_runs_numbers_with_fewer_finetunings(tmp_path):
    from benchmark.tables import build_tables, load_results

    results = {}
    for schedule in ("full", "diagonal"):
        out = tmp_path / schedule
        assert main(["run", "--method", "ncl", "--profile", "tiny", "--eval-matrix", schedule,
                     "--out", str(out), "--no-table"]) == 0
        results[schedule] = load_results(out)[0]
    full, diagonal = results["full"], results["diagonal"]
    for metric in ("mf1", "acc"):
        assert diagonal[metric][-1] == full[metric][-1]
        assert [row[t] for t, row in enumerate(diagonal[metric])] == \
               [row[t] for t, row in enumerate(full[metric])]
        assert diagonal[metric][1][0] is None and full[metric][1][0] is not None
    assert sum(s > 0 for row in diagonal["timings"]["finetune_s"] for s in row) == 5  # not 6
    tables = [build_tables([results[s]])[0][1].drop(columns="method") for s in results]
    assert tables[0].equals(tables[1])


def test_every_shipped_preset_and_group_resolves_to_a_run_config():
    from benchmark.__main__ import _expand
    from benchmark.config import available_configs, build_config
    from methods import build_method
    from tasks import load_suite

    suite = load_suite("syn6", "tiny")
    for name in available_configs():
        for preset, source in _expand(name):
            cfg = build_config(suite.defaults, preset, {"suite": "syn6"}, preset_source=source)
            if cfg.method.startswith("avl-") and importlib.util.find_spec("avalanche") is None:
                continue  # the [avalanche] extra's rows (tests/test_avalanche.py)
            build_method(cfg.method, cfg.method_args)  # unknown method arguments raise here


def test_table_rows_follow_the_methods_table_rank(monkeypatch):
    """Row order comes from each method's `table_rank` (tables.py names no method): a method
    an outside package registers with a rank sits where its rank says; variants sit with their
    method; labels of unknown or unranked methods come last, by label."""
    import methods
    from benchmark.record import load
    from benchmark.tables import build_tables

    class Mine(methods.Method):
        table_rank = 15  # between base (10) and one (20)

    monkeypatch.setitem(methods._REGISTRY, "mine", Mine)
    runs = Path(__file__).parent.parent / "results" / "das-fidelity"
    record = load(next(runs.rglob("ncl/**/result.json"))).to_dict()
    labels = ["zz-unknown", "das w/o contrast", "one", "mine", "das", "base", "avl-si"]
    results = [dict(record, row=label, method=label.split()[0]) for label in labels]
    rows = list(build_tables(results)[0][1]["method"])
    assert rows == ["base", "mine", "one", "avl-si", "das", "das w/o contrast", "zz-unknown"]


def test_final_dap_loss_averages_the_losses_logged_in_the_last_fifth_of_the_steps():
    from benchmark.tables import final_dap_loss

    # 100 steps log steps 0, 10, ..., 90 and 99: the last fifth is steps 80, 90, 99
    losses = [float(k) for k in range(11)]
    assert final_dap_loss(losses, 100) == pytest.approx((8 + 9 + 10) / 3)
    assert final_dap_loss([], 0) is None  # a row that does not DAP-train (base)
    # a list another writer logged differently: the last fifth of its entries
    assert final_dap_loss([5.0, 4.0, 3.0, 2.0, 1.0], 100) == 1.0
