"""The harness names no method: what a method class declares (table rank, DAP cost, artefact
figures) is read through the registry, and the views mark the seed protocol alike."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmark.estimate import estimate_seconds
from benchmark.method_info import declared
from benchmark.tables import build_compute_tables, build_mlm_tables, load_results, render
from methods import available_methods, get_method_class

CLIPPING = Path(__file__).parents[1] / "results" / "clipping"


def test_sorting_rows_imports_no_torch():
    code = ("import sys, benchmark.tables as t; "
            "print(t._row_key('das w/o contrast'), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["(160,", "'das", "w/o", "contrast')", "False"]


@pytest.mark.parametrize("attr, default", [("table_rank", None), ("dap_cost", ("ncl", 1.0)),
                                           ("needs_domain_id", False)])
def test_declarations_read_from_source_equal_the_imported_classes(attr, default):
    static = declared(attr, default)
    imported = {name: getattr(cls, attr) for name, cls in available_methods().items()}
    assert static == imported
    # inherited, not set on the class itself: read from the nearest base class that sets it
    if attr == "table_rank":
        assert "table_rank" not in vars(get_method_class("avl-ewc")) and static["avl-ewc"] == 145


def _estimate(method: str) -> float:
    task = SimpleNamespace(epochs=1, train=[0] * 16)
    suite = SimpleNamespace(order=lambda k: ["a", "b"], domains={"a": SimpleNamespace(task=task),
                                                                 "b": SimpleNamespace(task=task)})
    cfg = SimpleNamespace(suite="s", profile="p", order=0, method=method, dap_steps=10,
                          eval_matrix="full", ft_epochs=1, ft_batch_size=16)
    rates = {"ncl": 1.0, "das": 3.0, "ft": 0.0, "overhead": 0.0}
    return estimate_seconds(cfg, suite, get_method_class(method), rates)


def test_the_estimate_takes_each_methods_declared_dap_cost():
    assert _estimate("ncl") == 2 * 10 * 1.0
    assert _estimate("das") == _estimate("dga") == _estimate("dga-one") == 2 * 10 * 3.0
    assert _estimate("derpp") == pytest.approx(2 * 10 * 2.1)
    assert _estimate("base") == 0.0  # no DAP-training
    # the table the harness held before named dga but not dga-one, which fell back to ncl's
    assert _estimate("dga-one") != _estimate("ncl")


def test_mlm_and_compute_views_mark_rows_made_with_dap_seed():
    results = load_results(CLIPPING)
    assert results and all(r["config"].get("dap_seed") is None for r in results)
    marked = [{**r, "config": {**r["config"], "dap_seed": 7}} if r["row"].startswith("das")
              else r for r in results]
    for build in (build_mlm_tables, build_compute_tables):
        plain, once = render(build(results)), render(build(marked))
        assert "◦" not in plain
        assert "das, no clipping ◦7" in once and "ncl, no clipping ◦" not in once
        assert "DAP-trained once with dap_seed S" in once


def test_list_methods_args_prints_each_option_with_type_default_and_help(capsys):
    from benchmark.__main__ import main

    assert main(["list", "methods", "--args", "das"]) == 0
    out = capsys.readouterr().out
    assert "qkv_softmask: {rows,companion} = 'rows'\n    how a head's importance" in out
    assert "units: list of {head,intermediate,output} = ['head', 'intermediate', 'output']" in out
    assert main(["list", "methods", "--args", "dga"]) == 0  # a variant: its YAML's defaults
    assert "units: list of {head,intermediate,output} = ['head']" in capsys.readouterr().out
    assert main(["list", "methods", "--args", "nope"]) == 2


def test_every_method_option_has_help():
    from methods import describe_args

    missing = [f"{name}.{option}" for name, cls in available_methods().items()
               for option, _, _, text in describe_args(cls) if not text.strip()]
    assert missing == []


def test_run_and_sweep_expand_a_group_preset_alike(tmp_path):
    from benchmark.__main__ import _expand
    from benchmark.cells import _rows
    from benchmark.config import ConfigError
    from benchmark.grid import Grid, GridError

    (tmp_path / "a.yaml").write_text("method: ncl\nlabel: a\n")
    (tmp_path / "b.yaml").write_text("method: kd\n")
    group = tmp_path / "g.yaml"
    group.write_text(f"runs: [{tmp_path / 'a.yaml'}, {tmp_path / 'b.yaml'}]\n")
    run_rows = [(source, mapping) for mapping, source in _expand(str(group))]
    sweep_rows = [(entry, mapping) for entry, _, mapping in _rows(Grid(configs=[str(group)]))]
    assert run_rows == sweep_rows and [m["method"] for _, m in run_rows] == ["ncl", "kd"]
    nested = tmp_path / "n.yaml"
    nested.write_text(f"runs: [{group}]\n")  # a group of a group: refused by both
    for expand in (lambda: _expand(str(nested)), lambda: _rows(Grid(configs=[str(nested)]))):
        with pytest.raises(ConfigError, match="is itself a group"):
            expand()
    shared = tmp_path / "s.yaml"  # keys of the group's own: run applies them, a cell could not
    shared.write_text(f"runs: [{tmp_path / 'a.yaml'}]\ndap_steps: 3\n")
    assert _expand(str(shared))[0][0]["dap_steps"] == 3
    with pytest.raises(GridError, match="shared keys"):
        _rows(Grid(configs=[str(shared)]))
