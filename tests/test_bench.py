"""`python -m benchmark bench`: the FLOP count against torch's counter, the report, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from torch.utils.flop_counter import FlopCounterMode

from benchmark.bench import FlopCounter, main, random_corpus, random_roberta, random_tokenizer
from benchmark.config import build_config
from benchmark.context import Context
from benchmark.dap import dap_train
from methods import DapPlan, build_method


@pytest.fixture
def reset_accelerator():
    """One Accelerate state per process: reset it around runs at another precision."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("method,passes", [("ncl", 1.0), ("das", 4.0)])
def test_flop_count_matches_torchs_counter(tmp_path, method, passes, reset_accelerator):
    # eager attention: torch's counter sees its matmuls (CPU SDPA kernels are not registered)
    model = random_roberta("tiny", vocab_size=1000, attn="eager")
    tokenizer = random_tokenizer(1000)
    cfg = build_config({}, {}, {"method": method, "dap_batch_size": 4, "max_length": 24,
                                "importance_batches": 1, "dap_steps": 1})
    ctx = Context(config=cfg, suite=None, domains=["random"], model=model, tokenizer=tokenizer,
                  accelerator=Accelerator(), run_dir=tmp_path, _base=model,
                  _corpora={0: random_corpus(16, 24, 1000)})
    impl = build_method(method)
    impl.setup(ctx)
    impl.before_domain(ctx, 0)
    ours = FlopCounter(model)
    with FlopCounterMode(display=False) as reference:
        dap_train(ctx, impl, DapPlan(ctx.corpus(0), 1), 0)
    assert ours.encoder_flops == pytest.approx(passes * ours.one_pass(4 * 24, 24))
    # torch counts every matmul, forward and backward; ours leaves out only InfoNCE's tiny
    # similarity matrix (das)
    assert ours.flops == pytest.approx(reference.get_total_flops(), rel=0.002)


def test_bench_reports_every_figure(tmp_path, capsys, reset_accelerator):
    out = tmp_path / "bench.json"
    assert main(["--suite", "das6", "--random-init", "--size", "tiny", "--steps", "2",
                 "--repeats", "1", "--batch", "4", "--seq-len", "16", "--importance-batches",
                 "1", "--peak-tflops", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for figure in ("s/step", "tokens/s", "TFLOP/s", "MFU", "peak RSS", "das / ncl",
                   "KL proxy", "importance share", "6-domain sequence (2580 steps"):
        assert figure in text, figure
    res = json.loads(out.read_text())
    ncl, das = res["methods"]["ncl"], res["methods"]["das"]
    assert (ncl["passes"], das["passes"]) == (pytest.approx(1.0), pytest.approx(4.0))
    assert ncl["tokens_per_step"] == das["tokens_per_step"] == 4 * 16
    # same seeds, same masks: das adds three encoder passes (the views) and nothing else
    extra = das["flops_per_step"] - ncl["flops_per_step"]
    assert extra == pytest.approx(3 * ncl["encoder_flops_per_step"])
    assert res["importance_batches"] == 100 and res["importance_timed"] == 1  # das6's count
    assert das["importance"]["kl_proxy_s"] == pytest.approx(100 * das["before_domain_s"])
    assert res["versions"]["torch"] and res["command"].startswith("python -m benchmark bench")


def test_fp16_on_a_cpu_says_it_ran_in_fp32(capsys, reset_accelerator):
    assert main(["--suite", "das6", "--random-init", "--size", "tiny", "--methods", "ncl",
                 "--steps", "1", "--repeats", "1", "--batch", "2", "--seq-len", "8",
                 "--mixed-precision", "fp16"]) == 0
    assert "fp16 (NOT available on this device: ran in fp32)" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--methods", "ncl,nope"], "unknown method(s) ['nope']"),
    (["--batch", "0"], "--batch must be a positive integer"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_gpu_script_refuses_a_machine_without_cuda():
    import subprocess

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    script = Path(__file__).resolve().parent.parent / "scripts" / "gpu_bench.sh"
    done = subprocess.run(["bash", str(script), "unused-out"], capture_output=True, text=True)
    assert done.returncode == 2 and "no CUDA device" in done.stderr
    assert not Path("unused-out").exists()


def test_padding_in_one_copy_equals_row_by_row():
    import random

    from benchmark.data import pad

    rng = random.Random(0)
    rows = [[rng.randrange(50) for _ in range(rng.randint(1, 20))] for _ in range(30)]
    ids, mask = pad(rows, pad_id=1)
    for row, seq in enumerate(rows):
        assert ids[row, :len(seq)].tolist() == seq and set(ids[row, len(seq):].tolist()) <= {1}
        assert mask[row].tolist() == [1] * len(seq) + [0] * (ids.shape[1] - len(seq))
    assert ids.dtype == mask.dtype == torch.long and ids.shape == (30, max(map(len, rows)))
