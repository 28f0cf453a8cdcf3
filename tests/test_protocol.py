"""The run protocol: every seed stream keeps the integer the committed results were made with,
and one schedule decides which end-task cells a run evaluates."""

import zlib
from types import SimpleNamespace

import pytest

from benchmark.context import Context
from benchmark.protocol import SEED_STREAMS, Protocol, domain_seed, stream_seed


def reference_domain_seed(seed, *parts):
    # the phase seed every committed result.json was made with, transcribed
    value = seed
    for part in parts:
        value = (value * 1_000_003 + part + 1) % (2**31 - 1)
    return value


# the formulas the methods and the loop wrote inline before the table existed, transcribed
REFERENCE = {
    "before_domain": lambda s, t: reference_domain_seed(s, 0, t),
    "dap": lambda s, t: reference_domain_seed(s, 1, t),
    "after_domain": lambda s, t: reference_domain_seed(s, 3, t),
    "fisher": lambda s, t: s * 1009 + t,  # ewc, hat, avl-*
    "derpp_replay": lambda s, t: s * 7919 + t,  # derpp
    "buffer": lambda s, t: s,  # derpp's reservoir
    "module_init": lambda s, t: s,  # isolation rows
    "importance_general": lambda s, t: s + 7,  # das
    "importance_domain": lambda s, t: s + 100 + t,  # das
    "importance_dga": lambda s, t: s + 7 + t,  # dga
    "importance_permute": lambda s, t: t + 1,  # das, len(history) + 1
    "replay_masks": lambda s, t: reference_domain_seed(
        s, 16 + zlib.crc32(b"replay") % 1_000_000, 0) + 1,  # replay's collator: seed + 1
    "eval_masks": lambda s, t: 0,
    "expert_scoring": lambda s, t: 0,
    "theta0": lambda s, t: 0,
    "head_warmup": lambda s, t: 0,
}


@pytest.mark.parametrize("seed", [2021, 111, 222, 0])
@pytest.mark.parametrize("t", [0, 1, 5])
def test_every_stream_returns_the_integer_the_committed_results_were_made_with(seed, t):
    assert set(REFERENCE) | {"finetune"} == set(SEED_STREAMS)
    for name, formula in REFERENCE.items():
        assert stream_seed(name, seed, t) == formula(seed, t), name
    for i in range(t + 1):
        assert stream_seed("finetune", seed, t, i) == reference_domain_seed(seed, 2, t, i)
    # wrong variants: ewc's Fisher seed is not DER++'s, the DAP stream is not fine-tuning's
    assert stream_seed("fisher", seed, t) != seed * 7919 + t or seed == 0
    assert stream_seed("dap", seed, t) != reference_domain_seed(seed, 2, t)


def test_a_name_outside_the_table_gets_its_own_crc_stream():
    stream = 16 + zlib.crc32(b"my-method") % 1_000_000
    assert stream_seed("my-method", 2021, 3) == reference_domain_seed(2021, stream, 3)
    assert stream_seed("my-method", 2021, 3) != stream_seed("my-methot", 2021, 3)
    assert domain_seed(2021, 1, 4) == reference_domain_seed(2021, 1, 4)


def test_context_draws_fine_tuning_from_the_run_seed_and_the_rest_from_the_dap_seed():
    ctx = Context(config=SimpleNamespace(seed=7, eval_matrix="full"), suite=None,
                  domains=["a", "b"], model=None, tokenizer=None, accelerator=None,
                  run_dir=None, run_seed=2021)
    assert ctx.seed_for("finetune", 1, 0) == reference_domain_seed(2021, 2, 1, 0)
    assert ctx.seed_for("dap", 1) == reference_domain_seed(7, 1, 1)
    assert ctx.seed_for("fisher", 1) == 7 * 1009 + 1
    # the wrong variant: fine-tuning from the DAP seed
    assert ctx.seed_for("finetune", 1, 0) != reference_domain_seed(7, 2, 1, 0)


@pytest.mark.parametrize(("matrix", "unchanged", "count"), [
    ("full", False, 21), ("diagonal", False, 11), ("full", True, 6), ("diagonal", True, 6)])
def test_the_cells_a_run_evaluates(matrix, unchanged, count):
    protocol = Protocol(6, matrix)
    cells = protocol.evaluated(unchanged)
    assert len(cells) == count
    assert all((t, t) in cells for t in range(6))  # the diagonal always
    if matrix == "diagonal" and not unchanged:
        assert [(5, i) for i in range(6)] == [c for c in cells if c[0] == 5]  # the last row
        assert protocol.cell(3, 1) == "skip"
    if unchanged:
        assert protocol.cell(3, 1, True) == ("skip" if matrix == "diagonal" else "copy")
        assert protocol.cell(5, 1, True) == "copy"


def test_record_updates_append_rounded_cells_and_open_a_row():
    record = SimpleNamespace(dap_loss=[], dap_steps=[], general_mlm_loss=[], mf1=[], acc=[],
                             collapsed=[], mlm_loss=[], timings={"dap_s": [], "finetune_s": []})
    Protocol.record_domain(record, [4.5], 8, 3.25, 1.23456)
    Protocol.record_cell(record, 0, 12.345678, 50.0, False, 0.98765)
    Protocol.record_cell(record, 0, None, None, None, 0.0)
    Protocol.record_mlm_row(record, [3.1234567], 0.5)
    assert record.dap_loss == [[4.5]] and record.dap_steps == [8]
    assert record.general_mlm_loss == [3.25] and record.timings["dap_s"] == [1.235]
    assert record.mf1 == [[12.3457, None]] and record.acc == [[50.0, None]]
    assert record.collapsed == [[False, None]]
    assert record.timings["finetune_s"] == [[0.988, 0.0]]
    assert record.mlm_loss == [[3.12346]] and record.timings["mlm_loss_s"] == [0.5]


def test_a_resumed_run_does_not_evaluate_theta0_again(tmp_path, killed_at, monkeypatch):
    import json

    from conftest import FAST

    from benchmark import loop
    from benchmark.__main__ import main

    args = ["run", "--method", "ncl", "--profile", "tiny", "--order", "1", "--no-table", *FAST,
            "--out", str(tmp_path)]
    killed_at(args, "checkpoint:0")
    rows: list[int] = []
    real = loop.record_mlm_losses
    monkeypatch.setattr(loop, "record_mlm_losses", lambda ctx, record, row, *rest:
                        rows.append(row) or real(ctx, record, row, *rest))
    assert main([*args, "--resume"]) == 0
    # the wrong variant, θ0's row evaluated again before the stored record replaces it: [0, 2, 3]
    assert rows == [2, 3]
    record = json.loads(next(tmp_path.rglob("result.json")).read_text())
    assert len(record["mlm_loss"]) == 4 and len(record["general_mlm_loss"]) == 4
