"""The 2024+ default baselines: the DAP learning-rate schedules, `replay` and `joint`."""

import copy
import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from transformers import (
    BertConfig,
    BertForMaskedLM,
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
    get_wsd_schedule,
)

import methods.replay as replay_module
from benchmark.basemodel import word_tokenizer
from benchmark.config import ConfigError, RunConfig, build_config
from benchmark.context import Context
from benchmark.dap import dap_train
from benchmark.schedule import dap_schedule, lr_factor
from methods import build_method
from methods.replay import replay_rows, source_rows

REPO = Path(__file__).parent.parent
MIRROR = Path(os.environ.get("CDAP_DATA_MIRROR") or REPO.parent / "shared" / "data" / "mirror")
WIKITEXT = MIRROR / "github/pytorch/examples/word_language_model/data/wikitext-2"


# -- the learning-rate schedules ---------------------------------------------------------------
def curve(scheduler_of, steps: int) -> list[float]:
    """The learning rate of each of `steps` optimiser steps (peak lr 1)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = scheduler_of(optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def ours(steps: int, t: int = 0, domains: int = 1, **cfg) -> list[float]:
    config = dataclasses.replace(RunConfig(), dap_steps=steps, **cfg)
    return curve(lambda opt: dap_schedule(opt, config, steps, t, domains), steps)


def test_the_default_schedule_is_transformers_linear_one_float_for_float():
    """Every committed row used `get_linear_schedule_with_warmup(⌈0.1 S⌉, S)` per domain."""
    for steps in (1, 4, 8, 37, 60, 100, 150):
        reference = curve(lambda opt, s=steps: get_linear_schedule_with_warmup(
            opt, math.ceil(0.1 * s), s), steps)
        assert ours(steps) == reference, steps
        for t in (1, 5):  # re-warmed: every domain the same curve
            assert ours(steps, t=t, domains=6) == reference


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant", "wsd"])
def test_each_schedule_follows_its_formula_at_chosen_steps(schedule):
    """S = 20, W = ⌈0.1 S⌉ = 2, D = ⌈0.1 S⌉ = 2; each formula written out, and Transformers'
    own scheduler of that shape as a second reference."""
    S, W, D = 20, 2, 2
    formula = {
        "linear": lambda s: s / W if s < W else (S - s) / (S - W),
        "cosine": lambda s: s / W if s < W else 0.5 * (1 + math.cos(math.pi * (s - W) / (S - W))),
        "constant": lambda s: s / W if s < W else 1.0,
        "wsd": lambda s: s / W if s < W else (1.0 if s < S - D else (S - s) / D),
    }[schedule]
    library = {
        "linear": lambda opt: get_linear_schedule_with_warmup(opt, W, S),
        "cosine": lambda opt: get_cosine_schedule_with_warmup(opt, W, S),
        "constant": lambda opt: get_constant_schedule_with_warmup(opt, W),
        "wsd": lambda opt: get_wsd_schedule(opt, W, D, num_training_steps=S,
                                            decay_type="linear"),
    }[schedule]
    got = ours(S, dap_schedule=schedule)
    for s in (0, 1, 2, 5, 10, 17, 18, 19):
        assert got[s] == pytest.approx(formula(s), abs=1e-12), (schedule, s)
    assert got == pytest.approx(curve(library, S), abs=1e-12)
    # a wrong variant is told apart: every other shape differs somewhere after the warm-up
    for other in {"linear", "cosine", "constant", "wsd"} - {schedule}:
        assert ours(S, dap_schedule=other) != pytest.approx(got, abs=1e-6), other


def test_without_rewarm_one_schedule_spans_the_sequence():
    """dap_rewarm false: domain t runs steps t·S … (t+1)·S − 1 of one T·S-step schedule, with
    the warm-up (W = ⌈0.1 S⌉) only at its start."""
    S, T, W = 10, 3, 1
    N = T * S
    whole = [s / W if s < W else 0.5 * (1 + math.cos(math.pi * (s - W) / (N - W)))
             for s in range(N)]
    for t in range(T):
        got = ours(S, t=t, domains=T, dap_schedule="cosine", dap_rewarm=False)
        assert got == pytest.approx(whole[t * S:(t + 1) * S], abs=1e-12)
    assert whole[S] == pytest.approx(0.78059, abs=1e-5)  # domain 1 starts where 0 ended
    # the wrong variant: re-warming starts domain 1 at 0 again
    assert ours(S, t=1, domains=T, dap_schedule="cosine", dap_rewarm=True)[0] == 0.0
    # lr_factor is the formula at any step
    assert [lr_factor("cosine", s, W, N, 1) for s in range(N)] == pytest.approx(whole, abs=1e-12)


def test_a_schedule_that_does_not_exist_or_cannot_span_the_sequence_is_refused():
    with pytest.raises(ConfigError, match="dap_schedule must be one of 'linear'"):
        build_config({}, {"dap_schedule": "step"})
    config = dataclasses.replace(RunConfig(), dap_steps=10, dap_rewarm=False)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="dap_rewarm: false"):
        dap_schedule(optimizer, config, 20, 1, 6)  # joint trains (t + 1) · dap_steps


# -- replay ----------------------------------------------------------------------------------
def make_ctx(suite, tmp_path, **config) -> Context:
    tokenizer = word_tokenizer(suite.vocabulary)
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=40))
    cfg = build_config(suite.defaults, {"method": "replay", **config})
    return Context(config=cfg, suite=suite, domains=suite.order(0), model=model,
                   tokenizer=tokenizer, accelerator=Accelerator(cpu=True), run_dir=tmp_path,
                   _base=copy.deepcopy(model))


def test_replay_rows_round_half_up_with_at_least_one_and_one_current_row_kept():
    assert [replay_rows(r, 64) for r in (0.0, 0.01, 0.05, 0.25)] == [0, 1, 3, 16]
    assert [replay_rows(r, 16) for r in (0.01, 0.05, 0.25)] == [1, 1, 4]
    assert replay_rows(0.99, 4) == 3 and replay_rows(0.125, 4) == 1
    assert source_rows("both", 5, 0) == (5, 0) and source_rows("both", 5, 2) == (3, 2)
    assert source_rows("past", 5, 0) == (0, 0) and source_rows("general", 5, 3) == (5, 0)


@pytest.mark.parametrize("source", ["general", "past", "both"])
def test_a_tiny_runs_batches_counted_by_source(tiny_suite, tmp_path, monkeypatch, source):
    """Every row the DAP forward pass sees is looked up in the corpora: per step B − n rows of
    the current domain, n replayed from the sources named, none from the held-out general
    corpus, and the batch size stays B (ncl's compute)."""
    ctx = make_ctx(tiny_suite, tmp_path, dap_steps=3, dap_batch_size=16,
                   method_args={"share": 0.25, "source": source})
    method = build_method("replay", ctx.config.method_args)
    method.setup(ctx)
    pools = {"general": ctx.replay_corpus(), "heldout": ctx.general_corpus(),
             **{str(d): ctx.corpus(d) for d in range(3)}}
    where: dict[tuple, set] = {}
    for name, data in pools.items():
        for ids in data["input_ids"]:
            where.setdefault(tuple(ids), set()).add(name)
    seen = []
    forward = replay_module.mlm_forward
    monkeypatch.setattr(replay_module, "mlm_forward",
                        lambda model, batch: seen.append(batch) or forward(model, batch))
    pad = ctx.tokenizer.pad_token_id
    for t in range(3):
        ctx.t = t
        method.before_domain(ctx, t)
        seen.clear()
        dap_train(ctx, method, method.dap_plan(ctx, t), t)
        n_general, n_past = source_rows(source, 4, t)
        assert len(seen) == 3
        for batch in seen:
            assert batch["input_ids"].shape[0] == 16
            rows = [tuple(i for i in row if i != pad) for row in batch["clean_input_ids"].tolist()]
            names = [where.get(row, {"?"}) for row in rows]
            assert not any("heldout" in n for n in names)
            current = sum(str(t) in n for n in names[:16 - n_general - n_past])
            assert current == 16 - n_general - n_past
            replayed = names[16 - n_general - n_past:]
            assert sum("general" in n for n in replayed[:n_general]) == n_general
            assert all(n & {str(d) for d in range(t)} for n in replayed[n_general:])
            assert len(replayed) == n_general + n_past
        method.after_domain(ctx, t)
    record = json.loads((tmp_path / "artifacts" / "replay.json").read_text())
    assert record["replayed_rows_per_step"] == 4
    for t, name in enumerate(ctx.domains[:3]):
        n_general, n_past = source_rows(source, 4, t)
        rows = record["after_domain"][name]["rows"]
        assert rows["current"] == 3 * (16 - n_general - n_past)
        assert rows.get("general", 0) == 3 * n_general
        assert sum(rows.get(d, 0) for d in ctx.domains[:t]) == 3 * n_past


def test_the_held_out_general_corpus_never_meets_a_dap_or_replay_batch(tiny_suite, tmp_path):
    """syn6's generator repeats general sentences across θ0's pre-training corpus and the
    held-out one (17 of 704 on tiny): the replay pool drops them, the domains have none."""
    from benchmark.data import dap_sequences

    ctx = make_ctx(tiny_suite, tmp_path, method_args={"source": "general"})
    heldout = {tuple(ids) for ids in ctx.general_corpus()["input_ids"]}
    replayable = [tuple(ids) for ids in ctx.replay_corpus()["input_ids"]]
    assert not heldout & set(replayable)
    raw = dap_sequences(tiny_suite.pretrain_corpus, ctx.tokenizer, ctx.config.max_length, False)
    unfiltered = [tuple(ids) for ids in raw["input_ids"]]
    assert sum(ids in heldout for ids in unfiltered) == len(unfiltered) - len(replayable) > 0
    for t in range(len(ctx.domains)):
        assert not heldout & {tuple(ids) for ids in ctx.corpus(t)["input_ids"]}


def test_the_sampler_resumes_identically_after_a_kill(tiny_suite, tmp_path):
    """Draw, save the method state as a checkpoint does, rebuild the method, load it: the next
    mixed batches equal the uninterrupted ones; a fresh sampler's differ."""
    ctx = make_ctx(tiny_suite, tmp_path, method_args={"share": 0.25, "source": "both"})
    ctx.t = 2
    batch = next(ctx.mlm_batches(ctx.corpus(2), seed=0))

    def fresh():
        method = build_method("replay", ctx.config.method_args)
        method.setup(ctx)
        return method

    method = fresh()
    for _ in range(5):
        method.mix(ctx, batch)
    method.save_state(tmp_path)
    uninterrupted = [method.mix(ctx, batch) for _ in range(3)]
    resumed = fresh()
    resumed.load_state(tmp_path)
    restarted = fresh()  # the wrong variant: the stream begun again
    for want in uninterrupted:
        got, other = resumed.mix(ctx, batch), restarted.mix(ctx, batch)
        assert all(torch.equal(got[k], want[k]) for k in want)
        assert not all(other[k].shape == want[k].shape and torch.equal(other[k], want[k])
                       for k in want)


def test_joint_retrains_from_theta0_on_the_union_with_t_plus_one_budgets(tiny_suite, tmp_path):
    ctx = make_ctx(tiny_suite, tmp_path, dap_steps=5)
    method = build_method("joint")
    theta0 = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    for p in ctx.model.parameters():
        p.data.add_(1.0)
    method.before_domain(ctx, 2)
    assert all(torch.equal(v, theta0[k]) for k, v in ctx.model.state_dict().items())
    plan = method.dap_plan(ctx, 2)
    assert plan.steps == 15
    assert len(plan.data) == sum(len(ctx.corpus(i)) for i in range(3))
    assert not method.past_tasks_unchanged


@pytest.mark.parametrize("method", ["joint", "pool"])
def test_a_method_that_cannot_span_one_schedule_is_refused_before_writing(method, tmp_path,
                                                                            capsys):
    from benchmark.__main__ import main

    out = tmp_path / "runs"
    assert main(["run", "--method", method, "--profile", "tiny", "--no-dap-rewarm", "--out",
                 str(out), "--no-table"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"method {method}:" in line and "use dap_rewarm: true" in line
    assert not out.exists()


# -- the general corpus of real data ---------------------------------------------------------
@pytest.mark.skipif(not WIKITEXT.is_dir(), reason=f"no data mirror at {MIRROR}")
def test_real6_general_text_is_wikitext_with_a_held_out_slice_no_replay_draws(tmp_path):
    from tasks.build import build_general
    from tasks.files import DataDirs, SuiteFiles
    from tasks.formats import corpus_wikitext
    from tasks.spec import load_manifest

    # the mirror's manifest counts 1,841 and 2,183 paragraphs (headings and blanks left out)
    assert len(corpus_wikitext(WIKITEXT / "valid.txt")) == 1841
    assert len(corpus_wikitext(WIKITEXT / "test.txt")) == 2183
    for name in ("real6", "das6"):
        spec = load_manifest(name)
        files = SuiteFiles(spec, DataDirs(tmp_path / "data", MIRROR))
        heldout, replay = build_general(spec, files, {"corpus": 300})
        assert len(heldout) == len(replay) == 300
        assert not set(heldout["text"]) & set(replay["text"])
        roles = {e.role for e in spec.files.values() if e.domain == "general"}
        assert roles == {"general-heldout", "general-replay"}
    spec = load_manifest("real6")
    heldout, replay = build_general(spec, SuiteFiles(spec, DataDirs(tmp_path / "all", MIRROR)),
                                    {})
    assert (len(heldout), len(replay)) == (1837, 2115)  # distinct paragraphs, none shared


def test_a_bad_general_entry_is_one_line_naming_the_file_and_key():
    from tasks.registry import SuiteError
    from tasks.spec import parse_spec

    domain = {"corpus": {"format": "text", "files": "c.txt"},
              "task": {"format": "scibert-jsonl", "labels": ["a", "b"], "train": "tr.jsonl",
                       "test": "te.jsonl"}}
    good = {"heldout": {"format": "wikitext", "files": "valid.txt"},
            "replay": [{"format": "wikitext", "files": "test.txt"}], "note": "stand-in"}
    spec = parse_spec({"name": "s", "domains": {"d": domain}, "general": good}, "s.yaml", None)
    assert spec.files["valid.txt"].role == "general-heldout"
    assert spec.files["test.txt"].role == "general-replay"
    bad = [("valid.txt", "s.yaml: general: expected a mapping of heldout, replay"),
           ({"replay": good["replay"]}, "s.yaml: general: expected a mapping"),
           ({**good, "replay": good["heldout"]}, r"general: file\(s\) \['valid.txt'\] are both"),
           ({"heldout": {"format": "nope", "files": "v"}},
            "s.yaml: general: heldout source 1: unknown corpus format 'nope'")]
    for value, message in bad:
        with pytest.raises(SuiteError, match=message):
            parse_spec({"name": "s", "domains": {"d": domain}, "general": value}, "s.yaml", None)
