"""`dap_seed`: the companion's seed protocol (DAP once with one seed, seeds vary fine-tuning)."""

import pytest
import torch
from accelerate import Accelerator

from benchmark import loop
from benchmark.basemodel import load_base_model
from benchmark.config import ConfigError, build_config
from benchmark.data import tokenize_task
from benchmark.finetune import CellScore
from benchmark.record import RunRecord
from benchmark.tables import build_tables
from methods import build_method


def two_domains(tiny_suite, tmp_path, monkeypatch, seed: int, dap_seed: int | None) -> dict:
    """DER++ (DAP-time draws: buffer, replay) on two domains through the loop's own functions;
    the DAP losses, the weights after DAP and the seeds fine-tuning got."""
    flags = {"method": "derpp", "seed": seed, "dap_seed": dap_seed, "eval_matrix": "diagonal"}
    cfg = build_config(tiny_suite.defaults, None, flags)
    names = tiny_suite.order(0)[:2]
    model, tokenizer, _ = load_base_model(tiny_suite)
    ctx = loop.context_for(cfg, tiny_suite, names, model, tokenizer, Accelerator(cpu=True),
                           tmp_path / f"{seed}-{dap_seed}")
    method = build_method("derpp")
    method.setup(ctx)
    record = RunRecord(suite="syn6", profile="tiny", synthetic=True, method="derpp", row="derpp",
                       order=0, seed=seed, domains=names, needs_domain_id=False,
                       config=cfg.to_dict(), timings={"dap_s": [], "finetune_s": []})
    seeds = []

    def finetune(ctx, encoder, train, test, num_labels, seed, desc, epochs=None):
        seeds.append(seed)
        return CellScore(0.0, 0.0, 0.0, False)

    monkeypatch.setattr(loop, "finetune_and_test", finetune)
    task = tiny_suite.domains[names[0]].task
    splits = [(tokenize_task(task.train, tokenizer, 16), None)] * 2
    for t in range(2):
        ctx.t = t
        loop.train_domain(ctx, method, record, None, t)
        loop.fine_tune_cell(ctx, method, record, splits, [task, task], t, t)
    return {"dap_loss": record.dap_loss, "seeds": seeds,
            "weights": [p.detach().clone() for p in ctx.model.parameters()]}


def test_dap_seed_shares_dap_across_seeds_and_fine_tuning_still_varies(
        tiny_suite, tmp_path, monkeypatch):
    a = two_domains(tiny_suite, tmp_path, monkeypatch, 1, 111)
    b = two_domains(tiny_suite, tmp_path, monkeypatch, 2, 111)
    assert a["dap_loss"] == b["dap_loss"]  # replay draws included (domain 1)
    assert all(torch.equal(x, y) for x, y in zip(a["weights"], b["weights"], strict=True))
    assert a["seeds"] != b["seeds"]  # fine-tuning follows the run's seed
    c = two_domains(tiny_suite, tmp_path, monkeypatch, 1, None)
    d = two_domains(tiny_suite, tmp_path, monkeypatch, 2, None)
    assert c["dap_loss"] != d["dap_loss"]  # the default: DAP per seed
    assert c["seeds"] == a["seeds"] and d["seeds"] == b["seeds"]
    # dap_seed = the run's seed is the default protocol for that seed
    e = two_domains(tiny_suite, tmp_path, monkeypatch, 1, 1)
    assert e["dap_loss"] == c["dap_loss"]


def test_dap_seed_is_checked_and_parsed_from_the_command_line(tiny_suite):
    assert build_config(tiny_suite.defaults, None, {"dap_seed": "111"}).dap_seed == 111
    with pytest.raises(ConfigError, match="dap_seed must not be negative"):
        build_config(tiny_suite.defaults, None, {"dap_seed": -1})


def test_tables_mark_rows_made_with_a_dap_seed_and_leave_the_others_as_they_were():
    def result(row, seed, dap_seed=None, with_field=True):
        config = {"dap_seed": dap_seed} if with_field else {}
        return {"suite": "syn6", "profile": "tiny", "order": 0, "domains": ["a", "b"],
                "row": row, "seed": seed, "synthetic": True, "needs_domain_id": False,
                "config": config, "mf1": [[50.0], [50.0, 60.0]], "acc": [[50.0], [50.0, 60.0]],
                "general_mlm_loss": []}

    old = [result("ncl", 1, with_field=False), result("das", 1, with_field=False)]
    new = [result("ncl", 1), result("das", 1)]  # the field recorded, unset
    assert [(h, f.to_dict()) for h, f in build_tables(old)] == \
        [(h, f.to_dict()) for h, f in build_tables(new)]
    heading, frame = build_tables(new + [result("das once", 1, 111), result("das once", 2, 111),
                                         result("das mix", 1, 111), result("das mix", 2)])[0]
    labels = list(frame["method"])
    assert "das once ◦111" in labels and "das mix ◦mixed" in labels and "ncl" in labels
    assert "◦S: DAP-trained once with dap_seed S" in heading
    assert "◦" not in build_tables(new)[0][0]
