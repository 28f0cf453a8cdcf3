"""DAS and its shared machinery: unit gates, importance, soft-masking, contrast, resume."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import BertConfig, BertForMaskedLM, RobertaConfig, RobertaForMaskedLM

from benchmark.basemodel import word_tokenizer
from benchmark.config import build_config
from benchmark.context import Context
from methods import build_method
from methods.das import info_nce
from methods.gates import KINDS, UnitGates, accumulate, normalize, softmask_gradients


def small_mlm(kind: str = "bert", vocab: int = 60):
    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=48, max_position_embeddings=40)
    if kind == "bert":
        return BertForMaskedLM(BertConfig(**common))
    return RobertaForMaskedLM(RobertaConfig(**common, pad_token_id=1))


@pytest.fixture
def ctx(tiny_suite, tmp_path):
    tokenizer = word_tokenizer(tiny_suite.vocabulary)
    model = small_mlm(vocab=len(tokenizer))
    cfg = build_config(tiny_suite.defaults, {"method": "das"})
    return Context(config=cfg, suite=tiny_suite, domains=tiny_suite.order(0), model=model,
                   tokenizer=tokenizer, accelerator=Accelerator(cpu=True), run_dir=tmp_path)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_gates_at_one_leave_outputs_bit_identical(kind):
    model = small_mlm(kind).eval()
    ids = torch.randint(3, 60, (3, 9))
    mask = torch.ones_like(ids)
    reference = model(input_ids=ids, attention_mask=mask).logits
    gates = UnitGates(model)
    with gates.applied(gates.ones()):
        gated = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(reference, gated)
    closed = gates.ones()
    closed["head"][1, 2] = 0.0
    with gates.applied(closed):
        assert not torch.equal(reference, model(input_ids=ids, attention_mask=mask).logits)


def test_per_example_gates_equal_separate_passes():
    model = small_mlm().eval()
    ids = torch.randint(3, 60, (2, 7))
    mask = torch.ones_like(ids)
    gates = UnitGates(model)
    values = {k: torch.rand(s) for k, s in gates.shapes.items()}
    with gates.applied(values):
        alone = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    ungated = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    stacked = {k: torch.stack([torch.ones_like(v)] * 2 + [v] * 2) for k, v in values.items()}
    with gates.applied(stacked):
        both = model.bert(input_ids=torch.cat([ids, ids]),
                          attention_mask=torch.cat([mask, mask])).last_hidden_state
    torch.testing.assert_close(both[:2], ungated)
    torch.testing.assert_close(both[2:], alone)


def unit_parameters(model, layer: int, unit: int):
    """(weight rows, bias) of FFN intermediate neuron `unit` in `layer`."""
    dense = model.bert.encoder.layer[layer].intermediate.dense
    return dense.weight[unit].detach().clone(), dense.bias[unit].detach().clone()


def sgd_step(importance_value: float | None):
    model = small_mlm()
    ids = torch.randint(3, 60, (4, 8))
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    loss.backward()
    gates = UnitGates(model)
    grad_before = model.bert.encoder.layer[0].intermediate.dense.weight.grad[5].clone()
    if importance_value is not None:
        importance = gates.zeros()
        importance["intermediate"][0, 5] = importance_value
        softmask_gradients(gates, importance)
    grad_after = model.bert.encoder.layer[0].intermediate.dense.weight.grad[5].clone()
    before = unit_parameters(model, 0, 5)
    torch.optim.SGD(model.parameters(), lr=0.5, weight_decay=0.0).step()
    after = unit_parameters(model, 0, 5)
    return before, after, grad_before, grad_after, model


def test_softmask_importance_one_freezes_zero_leaves_half_halves():
    before, after, _, _, _ = sgd_step(1.0)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    unmasked = sgd_step(None)
    zero = sgd_step(0.0)
    assert torch.equal(unmasked[1][0], zero[1][0]) and torch.equal(unmasked[1][1], zero[1][1])
    _, _, grad_before, grad_after, _ = sgd_step(0.5)
    assert grad_before.abs().sum() > 0
    torch.testing.assert_close(grad_after, grad_before * 0.5)


def test_softmask_covers_head_slices_and_not_other_heads():
    model = small_mlm()
    ids = torch.randint(3, 60, (4, 8))
    model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
    gates = UnitGates(model)
    importance = gates.zeros()
    importance["head"][1, 2] = 1.0
    softmask_gradients(gates, importance)
    layer = model.bert.encoder.layer[1]
    width = gates.head_dim
    attention = layer.attention.self
    for linear in (attention.query, attention.key, attention.value):
        assert linear.weight.grad[2 * width:3 * width].abs().sum() == 0
        assert linear.bias.grad[2 * width:3 * width].abs().sum() == 0
        assert linear.weight.grad[:2 * width].abs().sum() > 0
    out = layer.attention.output.dense.weight.grad
    assert out[:, 2 * width:3 * width].abs().sum() == 0 and out[:, :width].abs().sum() > 0


def test_kl_proxy_importance_is_finite_nonzero_and_normalised(ctx):
    das = build_method("das")
    das.setup(ctx)
    ctx.model.eval()  # the method must switch dropout on itself
    importance = das._compute(ctx, ctx.corpus(0), "kl", seed=1)
    for kind in KINDS:
        values = importance[kind]
        assert torch.isfinite(values).all() and values.sum() > 0
        assert values.min() >= 0 and values.max() < 1
    assert not ctx.model.training


def test_normalise_is_per_layer_tanh_of_zscore():
    raw = {"head": torch.tensor([[1.0, 2.0, 3.0], [10.0, 10.0, 40.0]])}
    out = normalize(raw)["head"]
    row = torch.tensor([10.0, 10.0, 40.0])
    expected = torch.tanh((row - row.mean()) / row.std()).abs()
    torch.testing.assert_close(out[1], expected)
    assert out.min() >= 0 and out.max() < 1


def test_accumulation_is_elementwise_max():
    old = {"head": torch.tensor([[0.1, 0.9], [0.5, 0.2]])}
    new = {"head": torch.tensor([[0.4, 0.3], [0.5, 0.7]])}
    torch.testing.assert_close(accumulate(old, new)["head"],
                               torch.tensor([[0.4, 0.9], [0.5, 0.7]]))


def test_info_nce_matches_hand_computation():
    torch.manual_seed(3)
    z1, z2, z3 = torch.randn(3, 5), torch.randn(3, 5), torch.randn(3, 5)
    tau = 0.05
    total = 0.0
    for i in range(3):
        cos = [F.cosine_similarity(z1[i], z2[j], dim=0) / tau for j in range(3)]
        cos += [F.cosine_similarity(z1[i], z3[j], dim=0) / tau for j in range(3)]
        logits = torch.stack(cos)
        total += -(logits[i] - torch.logsumexp(logits, 0))
    torch.testing.assert_close(info_nce(z1, z2, z3, tau), total / 3)


def test_das_loss_adds_weighted_contrast(ctx):
    das = build_method("das", {"contrast_weight": 0.5})
    das.setup(ctx)
    das.before_domain(ctx, 0)
    batch = next(ctx.mlm_batches(ctx.corpus(0), seed=0, batch_size=4))
    out = das.forward(ctx, ctx.model, batch)
    z1, z2, z3 = out.extra["views"]
    assert z1.shape == z2.shape == z3.shape == (4, 32)
    expected = out.loss + 0.5 * info_nce(z1, z2, z3, 0.05)
    torch.testing.assert_close(das.loss(ctx, batch, out), expected)


def test_resume_mid_sequence_reloads_the_same_importance(tmp_path, killed_at):
    from benchmark.__main__ import main

    out = tmp_path / "runs"
    args = ["run", "--method", "das", "--profile", "tiny", "--out", str(out), "--no-table"]
    killed_at(args, "finetune:1")
    run_dir = out / "syn6-tiny" / "das" / "order0" / "seed2021"
    saved = load_file(str(run_dir / "checkpoint" / "method_state.safetensors"))
    accumulated = load_file(str(run_dir / "artifacts" / "importance_accumulated1.safetensors"))
    for kind in KINDS:
        assert torch.equal(saved[f"accumulated.{kind}"], accumulated[kind])
    assert main([*args, "--resume"]) == 0
    result = json.loads((run_dir / "result.json").read_text())
    assert result["resumed_at"] == [2] and len(result["mf1"]) == 3
    # the resumed domain's accumulation starts from the reloaded importance
    domain2 = load_file(str(run_dir / "artifacts" / "importance_domain2_ai.safetensors"))
    final = load_file(str(run_dir / "artifacts" / "importance_accumulated2.safetensors"))
    for kind in KINDS:
        assert torch.equal(final[kind], torch.maximum(accumulated[kind], domain2[kind]))
    assert math.isfinite(result["mf1"][-1][-1])


def test_bad_das_argument_fails_before_anything_is_written(tmp_path, capsys):
    from benchmark.__main__ import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("method: das\nmethod_args: {contrast: sideways}\n")
    out = tmp_path / "runs"
    assert main(["run", "--config", str(bad), "--profile", "tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "'das': contrast must be one of 'full', 'past-only', 'general-only', 'none'" in err
    assert not out.exists()


def test_same_seed_twice_gives_identical_das_numbers(tmp_path):
    # the KL proxy runs with dropout before the first DAP step: its randomness must be seeded
    from benchmark.__main__ import main

    results = []
    for name in ("a", "b"):  # in one process: an unseeded draw would differ between the two
        assert main(["run", "--method", "das", "--profile", "tiny", "--out", str(tmp_path / name),
                     "--no-table"]) == 0
        path = tmp_path / name / "syn6-tiny" / "das" / "order0" / "seed2021" / "result.json"
        results.append(json.loads(path.read_text()))
    for key in ("mf1", "acc", "dap_loss", "general_mlm_loss"):
        assert results[0][key] == results[1][key], key


def test_importance_artifacts_round_trip_and_bad_names_are_refused(ctx):
    from safetensors.torch import load_file

    importance = {"head": torch.rand(2, 4), "intermediate": torch.rand(2, 8)}
    ctx.save_artifact("importance_x.safetensors", importance)
    ctx.save_artifact("record.json", {"a": 1})
    files = sorted(p.name for p in ctx.artifacts_dir.iterdir())
    assert files == ["importance_x.safetensors", "record.json"]  # no temporary left behind
    loaded = load_file(str(ctx.artifacts_dir / "importance_x.safetensors"))
    assert all(torch.equal(loaded[k], v) for k, v in importance.items())
    with pytest.raises(ValueError, match="'notes.txt'"):
        ctx.save_artifact("notes.txt", {"a": 1})
