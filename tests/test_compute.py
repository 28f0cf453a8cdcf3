"""The compute record (`RunRecord.compute`): tokens and training FLOPs per phase, counted as a
run spends them, against a count by hand on the tiny profile; `table --compute` prints them."""

import json

import pytest
import torch

from benchmark.__main__ import main
from benchmark.atomic import DamagedFile
from benchmark.basemodel import load_base_model
from benchmark.data import dap_sequences, endless, mlm_loader
from benchmark.protocol import domain_seed
from benchmark.record import RunRecord

STEPS, BATCH, WIDTH, SEED = 3, 16, 16, 2021  # --dap-steps 3; tiny: dap_batch_size, max_length
IMPORTANCE_BATCHES, IMPORTANCE_BATCH = 2, 16  # tiny: importance_batches, importance_batch_size


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """ncl and das on tiny with grouped texts (every DAP sequence exactly 16 tokens): the
    output folder and the two records."""
    out = tmp_path_factory.mktemp("compute")
    records = {}
    for method in ("ncl", "das"):
        preset = out / f"{method}.yaml"
        preset.write_text(f"method: {method}\ngroup_texts: true\n")
        assert main(["run", "--config", str(preset), "--profile", "tiny", "--out", str(out),
                     "--dap-steps", str(STEPS), "--ft-epochs", "1", "--no-table"]) == 0
        path = out / "syn6-tiny" / method / "order0" / f"seed{SEED}" / "result.json"
        records[method] = json.loads(path.read_text())
    return out, records


@pytest.fixture(scope="module")
def hand(tiny_suite):
    """The FLOP formula written out for θ0's shape, and the tokenizer."""
    model, tokenizer, _ = load_base_model(tiny_suite, "", None)
    cfg = model.config
    layers, d, inner, vocab = (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size,
                               cfg.vocab_size)
    n_encoder = layers * (4 * d * d + 2 * d * inner)  # Q, K, V, O and the two FFN matrices
    n_head = d * d + d * vocab  # the head's dense layer and decoder

    def encoder(tokens: int, width: int) -> int:  # one pass with gradient
        return 6 * tokens * (n_encoder + 2 * layers * width * d)

    def head(rows: int) -> int:
        return 6 * rows * n_head

    return encoder, head, tokenizer


def masked_rows(tiny_suite, tokenizer, domain: str, seed: int, batch: int, batches: int) -> int:
    """Masked positions of the first `batches` batches a phase draws with `seed` (the masks are
    random, so the head's rows are recounted from the same stream)."""
    data = dap_sequences(tiny_suite.domains[domain].corpus, tokenizer, WIDTH, True)
    stream = endless(mlm_loader(data, tokenizer, batch, 0.15, seed))
    rows = 0
    for _ in range(batches):
        drawn = next(stream)
        assert drawn["input_ids"].shape == (batch, WIDTH)
        rows += int((drawn["labels"] != -100).sum())
    return rows


def test_ncl_records_the_hand_count(runs, hand, tiny_suite):
    encoder, head, tokenizer = hand
    record = runs[1]["ncl"]
    domains = record["domains"]
    assert record["compute"]["dap"]["tokens"] == 3 * STEPS * BATCH * WIDTH == 2304
    rows = sum(masked_rows(tiny_suite, tokenizer, name, domain_seed(SEED, 1, t), BATCH, STEPS)
               for t, name in enumerate(domains))
    expected = 3 * STEPS * encoder(BATCH * WIDTH, WIDTH) + head(rows)
    assert record["compute"]["dap"]["flops"] == expected
    # a wrong variant: the head over every position, as a stock forward runs it
    assert record["compute"]["dap"]["flops"] != 3 * STEPS * (encoder(BATCH * WIDTH, WIDTH)
                                                             + head(BATCH * WIDTH))
    assert "method" not in record["compute"] and "head_warmup" not in record["compute"]
    tune = record["compute"]["finetune"]  # end-task batches are padded to at most 16 tokens
    assert tune["tokens"] > 0
    assert encoder(tune["tokens"], 1) < tune["flops"] <= encoder(tune["tokens"], WIDTH)


def test_das_records_its_views_and_importance_passes_on_top_of_ncl(runs, hand, tiny_suite):
    encoder, head, tokenizer = hand
    ncl, das = runs[1]["ncl"]["compute"], runs[1]["das"]["compute"]
    domains = runs[1]["das"]["domains"]
    # DAP: the same batches and masks; one encoder pass over [masked x; x; x; x] with gradient
    # for ncl's [masked x]: three more passes of the batch per step, the head as ncl's
    assert das["dap"]["tokens"] == ncl["dap"]["tokens"]
    assert das["dap"]["flops"] - ncl["dap"]["flops"] == 3 * STEPS * 3 * encoder(BATCH * WIDTH,
                                                                                 WIDTH)
    # importance: the KL proxy before domain 0 (2 batches of [x; x], no head), the MLM
    # importance after each domain (2 batches each, the head on the masked positions)
    kl = IMPORTANCE_BATCHES * encoder(2 * IMPORTANCE_BATCH * WIDTH, WIDTH)
    rows = sum(masked_rows(tiny_suite, tokenizer, name, SEED + 100 + t, IMPORTANCE_BATCH,
                           IMPORTANCE_BATCHES) for t, name in enumerate(domains))
    mlm = 3 * IMPORTANCE_BATCHES * encoder(IMPORTANCE_BATCH * WIDTH, WIDTH) + head(rows)
    assert das["method"]["flops"] == kl + mlm
    assert das["method"]["flops"] != mlm  # a wrong variant: the KL proxy not counted
    assert das["method"]["tokens"] == 4 * IMPORTANCE_BATCHES * IMPORTANCE_BATCH * WIDTH
    # the end tasks see the same batches in both rows
    assert das["finetune"] == ncl["finetune"]


def test_table_compute_prints_the_recorded_numbers(runs, capsys):
    out, records = runs
    assert main(["table", "--runs", str(out), "--compute"]) == 0
    text = capsys.readouterr().out
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    header = lines.pop("method")
    for method, record in records.items():
        cells = dict(zip(header, lines[method], strict=True))
        compute = record["compute"]
        total = sum(v["flops"] for v in compute.values())
        assert cells["DAP tokens"] == f"{compute['dap']['tokens']:,}"
        assert cells["DAP PFLOPs"] == f"{compute['dap']['flops'] / 1e15:.3g}"
        assert cells["total PFLOPs"] == f"{total / 1e15:.3g}"
        assert cells["total tokens"] == f"{sum(v['tokens'] for v in compute.values()):,}"
    cpt = {m: r["compute"]["dap"]["flops"] + r["compute"].get("method", {}).get("flops", 0)
           for m, r in records.items()}
    assert dict(zip(header, lines["das"], strict=True))["× ncl"] == \
        f"{cpt['das'] / cpt['ncl']:.2f}"


def test_records_without_compute_load_and_a_damaged_one_is_refused(runs):
    old = {k: v for k, v in runs[1]["ncl"].items() if k != "compute"}
    assert RunRecord.from_dict(old).compute == {}
    bad = {**runs[1]["ncl"], "compute": {"dap": {"tokens": -1, "flops": 1.0}}}
    with pytest.raises(DamagedFile, match="compute must be"):
        RunRecord.from_dict(bad)


def test_bench_and_the_record_share_one_counter():
    from benchmark import bench, compute

    assert bench.FlopCounter is compute.FlopCounter


def test_report_shows_the_compute_table(runs, tmp_path):
    pytest.importorskip("matplotlib")
    out, records = runs
    assert main(["report", "--runs", str(out), "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "index.html").read_text()
    section = page.split("<h2>Compute</h2>")[1].split("</section>")[0]
    for record in records.values():
        assert f"{record['compute']['dap']['tokens']:,}" in section
        assert f"{record['compute']['dap']['flops'] / 1e15:.3g}" in section


def test_counter_counts_copies_skips_evaluation_and_sums_processes_once_per_phase():
    import copy

    from benchmark.bench import random_roberta
    from benchmark.compute import Compute
    from methods.modeling import encoder_of

    model = random_roberta("tiny", vocab_size=100)  # 2 layers, d 64, FFN 128
    n_encoder, layers, d = 2 * (4 * 64 * 64 + 2 * 64 * 128), 2, 64
    calls = []

    def reduce(local):  # two processes that did the same work
        calls.append(local.clone())
        return 2 * local

    totals = {}
    compute = Compute(model, totals, reduce=reduce)
    ids = torch.full((3, 8), 5)
    with compute.phase("dap"):
        encoder_of(model)(input_ids=ids)  # with gradient: 6 per weight and token
        encoder_of(copy.deepcopy(model))(input_ids=ids)  # a teacher copy still counts
        with compute.phase(None), torch.no_grad():  # evaluation: not counted
            encoder_of(model)(input_ids=ids)
        compute.count(24)
        assert calls == []  # summed over processes once, when the phase ends
    one = 6 * 24 * (n_encoder + 2 * layers * 8 * d)
    assert totals == {"dap": {"tokens": 24, "flops": 2 * 2 * one}}
    assert len(calls) == 1
    encoder_of(model)(input_ids=ids)  # outside any phase
    assert totals["dap"]["flops"] == 4 * one
