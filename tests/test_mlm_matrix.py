"""The LM's own forgetting matrix L[t][i]: every domain's held-out MLM loss at θ0 and after each
domain (benchmark/loop.py `record_mlm_losses`), its held-out text (benchmark/context.py
`heldout_corpus`, tasks/synthetic.py `_heldout`) and its table (benchmark/tables.py
`build_mlm_tables`)."""

import json
from pathlib import Path

import numpy as np
import pytest

from benchmark.__main__ import main
from benchmark.atomic import DamagedFile
from benchmark.record import RunRecord

FAST = ("--dap-steps", "3", "--ft-epochs", "1", "--eval-matrix", "diagonal")


def _run(out: Path, method: str, *extra: str) -> dict:
    assert main(["run", "--method", method, "--profile", "tiny", "--out", str(out),
                 "--no-table", *FAST, *extra]) == 0
    return json.loads(next(out.rglob("result.json")).read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`base` and `ncl` on tiny, the DAP batches of `ncl` recorded (input ids as trained, the
    masked positions restored from the labels, padding dropped)."""
    from benchmark.context import Context

    out = tmp_path_factory.mktemp("mlm")
    seen: list[tuple[int, ...]] = []
    original = Context.mlm_batches

    def recording(self, data, seed, batch_size=None, shuffle=True):
        for batch in original(self, data, seed, batch_size, shuffle):
            ids = batch["input_ids"].clone()
            masked = batch["labels"] != -100
            ids[masked] = batch["labels"][masked]
            for row, keep in zip(ids.tolist(), batch["attention_mask"].bool().tolist(),
                                 strict=True):
                seen.append(tuple(v for v, k in zip(row, keep, strict=True) if k))
            yield batch

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Context, "mlm_batches", recording)
        ncl = _run(out / "ncl", "ncl")
    return {"base": _run(out / "base", "base"), "ncl": ncl, "dap_batches": seen}


def test_matrix_has_theta0_row_and_every_domain_and_its_cost(runs):
    ncl = runs["ncl"]
    size = len(ncl["domains"])
    matrix = np.asarray(ncl["mlm_loss"])
    assert matrix.shape == (size + 1, size)  # θ0's row, one row per domain, every domain
    assert np.isfinite(matrix).all()
    assert len(ncl["timings"]["mlm_loss_s"]) == size + 1
    # row 0 is θ0's: the same in every run from the same θ0
    assert runs["base"]["mlm_loss"][0] == ncl["mlm_loss"][0]


def test_base_matrix_is_constant_along_t(runs):
    base = np.asarray(runs["base"]["mlm_loss"])
    assert (base == base[0]).all()
    # the check rejects a row that trains: ncl's matrix moves along t
    ncl = np.asarray(runs["ncl"]["mlm_loss"])
    assert not (ncl == ncl[0]).all()


def test_a_domains_loss_drops_after_its_own_dap_phase(runs):
    for name in ("ncl", "base"):
        matrix = np.asarray(runs[name]["mlm_loss"])
        # row t + 1 is after domain t, row t before it
        drops = [matrix[t + 1, t] < matrix[t, t] for t in range(matrix.shape[1])]
        assert all(drops) == (name == "ncl"), (name, matrix)


def test_the_heldout_text_never_meets_a_dap_batch(runs, tiny_suite):
    from datasets import Dataset

    trained = set(runs["dap_batches"])
    ctx = _context(tiny_suite)
    corpus = {tuple(ids) for t in range(len(ctx.domains)) for ids in ctx.corpus(t)["input_ids"]}
    assert trained and trained <= corpus  # the recorder saw ncl's DAP batches, all corpus text
    heldout = {tuple(ids) for i in range(len(ctx.domains))
               for ids in ctx.heldout_corpus(i)["input_ids"]}
    assert heldout and not heldout & trained
    # the filter is what keeps it so: held-out text that repeats corpus text (five corpus
    # sentences put in front) comes back without them; unfiltered, they would be DAP batches
    domain = tiny_suite.domains[ctx.domains[0]]
    saved = domain.heldout
    leaky = _context(tiny_suite)
    try:
        domain.heldout = Dataset.from_dict({"text": list(domain.corpus["text"][:5]) +
                                                    list(saved["text"])})
        kept = [tuple(ids) for ids in leaky.heldout_corpus(0)["input_ids"]]
    finally:
        domain.heldout = saved
    assert not set(kept) & corpus
    assert kept == [tuple(ids) for ids in ctx.heldout_corpus(0)["input_ids"]]
    assert {tuple(ids) for ids in ctx.corpus(0).select(range(5))["input_ids"]} & trained


def test_a_pair_tasks_held_out_text_is_its_sentences_not_its_aspect_terms(tiny_suite):
    # aspect sentiment rows are (aspect term, review sentence): the domain's text is the
    # sentence, each once; the term alone ("calamari") is no text to measure a domain on
    import dataclasses

    from datasets import Dataset

    ctx = _context(tiny_suite)
    domain = tiny_suite.domains[ctx.domains[1]]
    sentences = list(domain.task.test["text"])[:6]
    terms = [s.split()[1] for s in sentences]
    pairs = Dataset.from_dict({"text": terms + terms[:2], "text_pair": sentences + sentences[:2],
                               "label": [0] * 8})
    saved = domain.heldout, domain.task
    try:
        domain.heldout, domain.task = None, dataclasses.replace(domain.task, test=pairs)
        got = [list(ids) for ids in ctx.heldout_corpus(1)["input_ids"]]
        tokenise = lambda texts: ctx.tokenizer(texts, truncation=True,  # noqa: E731
                                               max_length=ctx.config.max_length)["input_ids"]
        assert got == tokenise(list(dict.fromkeys(sentences)))  # each sentence once, in order
        assert not any(ids in tokenise(terms) for ids in got)
    finally:
        domain.heldout, domain.task = saved


def test_real_suites_fall_back_to_the_end_task_test_texts(tiny_suite):
    ctx = _context(tiny_suite)
    domain = tiny_suite.domains[ctx.domains[1]]
    saved = domain.heldout
    try:
        domain.heldout = None
        texts = ctx.tokenizer(list(domain.task.test["text"]), truncation=True,
                              max_length=ctx.config.max_length)["input_ids"]
        got = [list(ids) for ids in ctx.heldout_corpus(1)["input_ids"]]
        assert got and all(ids in texts for ids in got)
    finally:
        domain.heldout = saved


def test_syn6_heldout_sentences_leave_corpus_and_tasks_unchanged(tiny_suite):
    """The held-out sentences come from their own seed after the corpus: the data every DAP
    batch and fine-tuning reads is as generated without them (digest of 2026-12-07's code)."""
    from tasks.synthetic import PROFILES, build_suite

    plain = build_suite("syn6", PROFILES["tiny"].__class__(
        **{**PROFILES["tiny"].__dict__, "heldout_mentions_per_entity": 0}), "tiny")
    names = tiny_suite.order(0)
    def without_heldout(digest):
        return {k: v for k, v in digest.items() if not k.endswith("heldout")}

    assert without_heldout(plain.data_digest(names)) == without_heldout(
        tiny_suite.data_digest(names))
    for name in names:
        assert len(plain.domains[name].heldout) == 0
        held = set(tiny_suite.domains[name].heldout["text"])
        assert held and not held & set(tiny_suite.domains[name].corpus["text"])


def test_resume_ends_with_the_same_matrix(tmp_path, killed_at, runs):
    args = ["run", "--method", "ncl", "--profile", "tiny", "--out", str(tmp_path),
            "--no-table", *FAST]
    killed_at(args, "checkpoint:1")
    assert main(args + ["--resume"]) == 0
    resumed = json.loads(next(tmp_path.rglob("result.json")).read_text())
    assert resumed["resumed_at"] == [2]
    assert resumed["mlm_loss"] == runs["ncl"]["mlm_loss"]


# -- the record: old files load, a damaged matrix is refused ----------------------------------

def _record(**changes) -> dict:
    record = {"suite": "syn6", "profile": "tiny", "synthetic": True, "method": "ncl",
              "row": "ncl", "order": 0, "seed": 1, "domains": ["a", "b", "c"],
              "needs_domain_id": False, "config": {}, "mf1": [[1.0], [None, 2.0], [3.0, 4.0, 5.0]],
              "acc": [[1.0], [None, 2.0], [3.0, 4.0, 5.0]], "finished": True,
              "general_mlm_loss": [3.0, 3.1, 3.2, 3.3],
              "mlm_loss": [[5.0, 5.0, 5.0], [4.0, 4.5, 4.9], [4.2, 3.9, 4.6], [4.3, 4.1, 3.0]]}
    record.update(changes)
    return record


def test_old_records_without_the_matrix_still_load():
    old = _record()
    del old["mlm_loss"]
    assert RunRecord.from_dict(old).mlm_loss == []
    assert RunRecord.from_dict(_record()).mlm_loss[3] == [4.3, 4.1, 3.0]


@pytest.mark.parametrize("matrix", [[[5.0, 5.0]], [[5.0, 5.0, "x"]], [[5.0, 5.0, 5.0]] * 5,
                                    [[5.0, 5.0, 5.0]] * 2])
def test_a_damaged_matrix_is_refused(matrix):
    with pytest.raises(DamagedFile, match="mlm_loss"):
        RunRecord.from_dict(_record(mlm_loss=matrix))


# -- the table, recomputed by hand ------------------------------------------------------------

def test_mlm_table_numbers_recomputed_by_hand():
    from benchmark.tables import build_mlm_tables, build_vs_tables, with_mlm_matrix

    seed1 = _record()
    seed2 = _record(seed=2, general_mlm_loss=[3.0, 3.0, 3.0, 3.5],
                    mlm_loss=[[5.0, 5.0, 5.0], [4.2, 4.7, 4.9], [4.4, 4.1, 4.6],
                              [4.5, 4.3, 3.2]])
    old = _record(seed=3)
    del old["mlm_loss"]  # recorded no matrix: left out of the seeds
    base = _record(row="base", method="base", seed=1,
                   mlm_loss=[[5.0, 5.0, 5.0]] * 4)
    base2 = _record(row="base", method="base", seed=2, mlm_loss=[[5.0, 5.0, 5.0]] * 4)
    [(heading, frame)] = build_mlm_tables([seed1, seed2, old, base, base2])
    row = frame.set_index("method").loc["ncl"]
    assert row["seeds"] == 2
    # L[T][i] per domain: seed 1 (4.3, 4.1, 3.0), seed 2 (4.5, 4.3, 3.2); std ddof 1 = 0.1414
    assert [row["a"], row["b"], row["c"]] == ["4.400 ± 0.141", "4.200 ± 0.141",
                                              "3.100 ± 0.141"]
    # Avg: seed 1 11.4 / 3 = 3.8, seed 2 12.0 / 3 = 4.0
    assert row["Avg L"] == "3.900 ± 0.141"
    # diagonal: seed 1 (4.0 + 3.9 + 3.0) / 3 = 3.6333, seed 2 (4.2 + 4.1 + 3.2) / 3 = 3.8333
    assert row["mean L[t][t]"] == "3.733 ± 0.141"
    # forgetting, i < T: seed 1 ((4.3 − 4.0) + (4.1 − 3.9)) / 2 = 0.25, seed 2 ((4.5 − 4.2) +
    # (4.3 − 4.1)) / 2 = 0.25
    assert row["Forg."] == "+0.250 ± 0.000"
    # FWT, i > 0: seed 1 ((5.0 − 4.5) + (5.0 − 4.6)) / 2 = 0.45, seed 2 ((5 − 4.7) + (5 − 4.6))
    # / 2 = 0.35
    assert row["FWT"] == "+0.400 ± 0.071"
    # gain vs θ0: 5 − Avg: 1.2 and 1.0
    assert row["gain vs θ0"] == "+1.100 ± 0.141"
    assert row["general L"] == "3.400 ± 0.141"
    # a wrong variant, forgetting against the row before the domain's phase (L_{i−1}[i], as
    # if the matrix had no θ0 row), gives another number
    wrong = np.mean([4.3 - 5.0, 4.1 - 4.5])
    assert f"{wrong:+.3f}" not in row["Forg."]
    assert frame.set_index("method").loc["base"]["Forg."] == "+0.000 ± 0.000"
    # --vs base: the average loss, paired by seed: (3.8 − 5) and (4.0 − 5), mean −1.1, t(1) =
    # 12.706 × 0.1414 / √2 = 1.2706
    [(_, vs)] = build_vs_tables(with_mlm_matrix([seed1, seed2, old, base, base2]), "base",
                                None, "mlm", "held-out MLM loss", digits=3)
    got = vs.set_index("method").loc["ncl"]
    assert got["Δ Avg held-out MLM loss"] == "-1.100"
    assert got["95 % interval"] == "[-2.371, +0.171]"
    assert got["interval"] == "paired t"


def test_table_mlm_cli_and_old_runs(tmp_path, capsys):
    runs = tmp_path / "runs"
    for k, record in enumerate([_record(), _record(row="base", method="base",
                                                   mlm_loss=[[5.0, 5.0, 5.0]] * 4)]):
        (runs / str(k)).mkdir(parents=True)
        (runs / str(k) / "result.json").write_text(json.dumps(record))
    assert main(["table", "--runs", str(runs), "--mlm"]) == 0
    out = capsys.readouterr().out
    assert "held-out MLM loss" in out and "| ncl " in out and "+0.250" in out
    old = _record()
    del old["mlm_loss"]
    (runs / "0" / "result.json").write_text(json.dumps(old))
    (runs / "1" / "result.json").write_text(json.dumps({**old, "row": "base"}))
    assert main(["table", "--runs", str(runs), "--mlm"]) == 2
    assert "recorded the MLM-loss matrix" in capsys.readouterr().err


def _context(suite):
    from accelerate import Accelerator

    from benchmark.basemodel import load_base_model
    from benchmark.config import RunConfig
    from benchmark.context import Context

    cfg = RunConfig(suite="syn6", profile="tiny", **{
        k: v for k, v in suite.defaults.items() if k in RunConfig.__dataclass_fields__})
    model, tokenizer, _ = load_base_model(suite, "", None)
    return Context(config=cfg, suite=suite, domains=suite.order(0), model=model,
                   tokenizer=tokenizer, accelerator=Accelerator(), run_dir=Path("."))


def test_plot_and_report_show_the_matrix_where_recorded(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmark.plot import plot_runs
    from benchmark.report import build_report

    old = _record(row="base", method="base")
    del old["mlm_loss"]  # made before the matrix: no heatmap, no failure
    runs = tmp_path / "runs"
    for k, record in enumerate([_record(), _record(seed=2), old]):
        (runs / str(k)).mkdir(parents=True)
        (runs / str(k) / "result.json").write_text(json.dumps(record))
    from benchmark.tables import load_results

    written = {p.name for p in plot_runs(load_results(runs), runs, tmp_path / "fig")}
    assert "L_mlm-ncl.png" in written and "L_mlm-base.png" not in written
    assert (tmp_path / "fig" / "syn6-tiny-order0" / "L_mlm-ncl.png").read_bytes()[:4] == \
        b"\x89PNG"
    page = build_report(runs, tmp_path / "report").read_text()
    assert "Held-out MLM loss (the LM&#x27;s own forgetting)" in page or \
        "Held-out MLM loss (the LM's own forgetting)" in page
    assert "L_mlm-ncl" in page


def test_a_run_resumed_from_a_record_without_the_matrix_records_none():
    """A checkpoint written before the matrix existed has no θ0 row: the resumed run leaves the
    matrix empty instead of recording rows that would sit under the wrong domains."""
    from benchmark.loop import record_mlm_losses

    record = RunRecord.from_dict(_record(finished=False, mlm_loss=[]))
    record_mlm_losses(None, record, 2)  # the context is not even read
    assert record.mlm_loss == [] and "mlm_loss_s" not in record.timings


def test_the_data_digest_covers_held_out_and_general_text(tiny_suite):
    # an edit to any text a run reads (held-out slices, replay, θ0's corpus) must stop a resume
    import copy

    from datasets import Dataset

    names = tiny_suite.order(0)
    before = tiny_suite.data_digest(names)
    edited = copy.copy(tiny_suite)
    edited.domains = dict(tiny_suite.domains)
    domain = copy.copy(tiny_suite.domains[names[1]])
    domain.heldout = Dataset.from_dict({"text": list(domain.heldout["text"])[:-1]})
    edited.domains[names[1]] = domain
    edited.pretrain_corpus = Dataset.from_dict(
        {"text": list(tiny_suite.pretrain_corpus["text"])[1:]})
    after = edited.data_digest(names)
    changed = sorted(k for k in before if before[k] != after.get(k))
    assert changed == [f"syn6 domain {names[1]!r} heldout", "syn6 pre-training corpus"]


def test_a_domain_without_dap_copies_the_last_rows_which_recomputing_gives(runs, tmp_path,
                                                                          monkeypatch):
    # base never changes θ0: its rows after θ0 are copied, not evaluated again; recomputing
    # them (every domain's weights taken for new) gives the same numbers
    import itertools

    import benchmark.loop as loop
    from benchmark.context import Context

    calls = []
    evaluate = Context.mlm_eval_loss
    monkeypatch.setattr(Context, "mlm_eval_loss",
                        lambda self, *a, **k: calls.append(1) or evaluate(self, *a, **k))
    copied = _run(tmp_path / "copied", "base")
    size = len(copied["domains"])
    assert len(calls) == size + 1  # θ0's row and θ0's general loss, nothing after
    counter = itertools.count()
    monkeypatch.setattr(loop, "fingerprint", lambda model: f"new {next(counter)}")
    recomputed = _run(tmp_path / "recomputed", "base")
    assert len(calls) == 2 * (size + 1) + size * (size + 1)
    assert copied["mlm_loss"] == recomputed["mlm_loss"] == runs["base"]["mlm_loss"]
    assert copied["general_mlm_loss"] == recomputed["general_mlm_loss"]
