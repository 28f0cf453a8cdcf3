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


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
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
