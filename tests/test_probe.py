"""The end-task protocols: the linear probe separates classes a frozen encoder tells apart; a
fine-tuning that predicts one class is detected, recorded per cell and marked in the table; the
protocol is in the record and the table caption; records made before schema 3 still load."""

import json
import logging
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from datasets import Dataset
from transformers import BertConfig, BertModel

from benchmark.__main__ import main
from benchmark.config import RunConfig
from benchmark.finetune import finetune_and_test
from benchmark.probe import probe_and_test
from benchmark.record import load

PAD, MARKERS = 0, (5, 6)


def _encoder() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, pad_token_id=PAD)
    return BertModel(config, add_pooling_layer=False)


def _split(n: int, seed: int, labels: tuple[int, ...] = (0, 1)) -> Dataset:
    """Sequences of random filler tokens; the class is which marker token one of them is."""
    rng = random.Random(seed)
    rows = {"input_ids": [], "label": []}
    for k in range(n):
        label = labels[k % len(labels)]
        ids = [rng.randrange(10, 100) for _ in range(rng.randrange(4, 9))]
        ids[rng.randrange(len(ids))] = MARKERS[label]
        rows["input_ids"].append([1, *ids, 2])
        rows["label"].append(label)
    return Dataset.from_dict(rows)


def _ctx(**config) -> SimpleNamespace:
    return SimpleNamespace(config=RunConfig(**config), tokenizer=SimpleNamespace(pad_token_id=PAD),
                           accelerator=Accelerator(cpu=True))


@pytest.mark.parametrize("pooling", ["mean", "first"])
def test_the_probe_separates_two_classes_a_frozen_encoder_tells_apart(pooling):
    encoder = _encoder()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    score = probe_and_test(_ctx(eval="probe", probe_pooling=pooling), encoder, _split(200, 1),
                           _split(120, 2), seed=0, desc="two markers")
    assert score.mf1 > 90 and score.acc > 90 and not score.collapsed
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in before.items()), "frozen"


def test_a_fine_tuning_that_predicts_one_class_is_detected():
    ctx = _ctx(ft_lr=1e-3, ft_epochs=2)
    # trained on one class only, it can only learn to predict that class
    collapsed = finetune_and_test(ctx, _encoder(), _split(32, 1, labels=(0,)), _split(40, 2),
                                  num_labels=2, seed=0, desc="one class")
    assert collapsed.collapsed and collapsed.acc == 50.0
    assert collapsed.mf1 == pytest.approx(100 * 2 / 3 / 2)  # F1 of the one class, over two
    healthy = finetune_and_test(_ctx(ft_lr=1e-3, ft_epochs=8), _encoder(), _split(200, 1),
                                _split(40, 2), num_labels=2, seed=0, desc="two classes")
    assert not healthy.collapsed and healthy.acc > 80


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory) -> Path:
    """The result file of one tiny `one` run under `--eval probe`."""
    out = tmp_path_factory.mktemp("probe-run")
    assert main(["run", "--profile", "tiny", "--method", "one", "--eval", "probe",
                 "--dap-steps", "2", "--out", str(out), "--no-table"]) == 0
    return next(out.rglob("result.json"))


def test_a_probe_run_records_its_protocol_and_the_table_names_it(probe_run, capsys):
    record = load(probe_run)
    assert record.protocol == "probe" and record.config["eval"] == "probe"
    assert record.schema == 3
    assert [len(row) for row in record.collapsed] == [len(row) for row in record.mf1]
    assert all(isinstance(v, bool) for row in record.collapsed for v in row)
    capsys.readouterr()
    assert main(["table", "--runs", str(probe_run.parents[4])]) == 0
    assert "A[T][i] by linear probe" in capsys.readouterr().out


def _write(tmp_path: Path, name: str, template: Path, drop: tuple[str, ...] = (),
           **changes) -> Path:
    data = {k: v for k, v in json.loads(template.read_text()).items() if k not in drop}
    path = tmp_path / name / "result.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({**data, **changes}))
    return path


def test_an_old_record_loads_as_fine_tuning_with_no_collapse_known(probe_run, tmp_path, capsys):
    # what files written before schema 3 hold: no protocol, no collapse flags
    old = _write(tmp_path, "old", probe_run, drop=("protocol", "collapsed"), schema=2)
    record = load(old)
    assert record.schema == 2 and record.protocol == "finetune"
    assert [len(row) for row in record.collapsed] == [len(row) for row in record.mf1]
    assert all(v is None for row in record.collapsed for v in row)
    assert main(["table", "--runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "A[T][i] by fine-tuning" in out and "ᶜ" not in out


def test_the_table_marks_a_collapsed_cell_and_says_what_it_means(probe_run, tmp_path, capsys):
    data = json.loads(probe_run.read_text())
    flags = [[False] * len(row) for row in data["mf1"]]
    flags[-1][1] = True  # the last row's second task collapsed in one of two seeds
    _write(tmp_path, "a", probe_run, collapsed=flags)
    _write(tmp_path, "b", probe_run, seed=1, collapsed=[[False] * len(r) for r in data["mf1"]])
    assert main(["table", "--runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| one"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2 + 1].endswith("ᶜ") and sum(c.endswith("ᶜ") for c in cells) == 1
    assert "every test prediction of the cell was one class" in out


def test_a_table_mixing_protocols_warns_and_says_so(probe_run, tmp_path, capsys, caplog):
    _write(tmp_path, "a", probe_run, protocol="finetune", row="one-finetuned")
    _write(tmp_path, "b", probe_run)
    with caplog.at_level(logging.WARNING):
        assert main(["table", "--runs", str(tmp_path)]) == 0
    assert any("mixes end-task protocols" in r.getMessage() for r in caplog.records)
    assert "MIXED protocols (fine-tuning, linear probe)" in capsys.readouterr().out


def test_collapse_flags_are_shaped_like_mf1_whatever_the_file_holds():
    """A progress file with fewer flag rows than mf1 rows (written while the package was
    upgraded under a running process) loads with None flags, so --resume can go on."""
    from benchmark.record import RunRecord

    base = {"suite": "syn6", "profile": "tiny", "synthetic": True, "method": "ncl", "row": "ncl",
            "order": 0, "seed": 1, "domains": ["a", "b"], "needs_domain_id": False,
            "config": {}, "schema": 3, "mf1": [[50.0], [40.0, None]],
            "acc": [[60.0], [50.0, None]]}
    for flags in ([], [[True]], [[True, False, True]]):
        record = RunRecord.from_dict({**base, "collapsed": flags})
        assert [len(row) for row in record.collapsed] == [1, 2]
    assert RunRecord.from_dict({**base, "collapsed": [[True]]}).collapsed == [[True], [None, None]]
