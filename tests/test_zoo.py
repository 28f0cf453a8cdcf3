"""The continual baseline zoo: EWC, DER++, KD and HAT, each on a small model; every method that
keeps state killed and resumed, its state lost or damaged."""

import copy
from collections import Counter

import pytest
import torch
from accelerate import Accelerator
from transformers import BertConfig, BertForMaskedLM

from benchmark.basemodel import word_tokenizer
from benchmark.config import build_config
from benchmark.context import Context
from benchmark.dap import dap_step
from methods import build_method
from methods.buffer import ReservoirBuffer
from methods.ewc import diagonal_fisher
from methods.modeling import encoder_of, mlm_forward


@pytest.fixture
def ctx(tiny_suite, tmp_path):
    """A real context on the tiny suite with a small dropout-free BERT (deterministic passes)."""
    tokenizer = word_tokenizer(tiny_suite.vocabulary)
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=40, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0))
    cfg = build_config(tiny_suite.defaults, {"method": "ncl"})
    return Context(config=cfg, suite=tiny_suite, domains=tiny_suite.order(0), model=model,
                   tokenizer=tokenizer, accelerator=Accelerator(cpu=True), run_dir=tmp_path)


def train_steps(ctx, method, t: int, steps: int = 3, lr: float = 1e-2) -> list[float]:
    """A few DAP steps on domain t through the method's hooks, like `dap_train`."""
    ctx.t, ctx.total_steps = t, steps
    params = method.parameters(ctx)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=ctx.config.dap_weight_decay)
    batches = ctx.mlm_batches(ctx.corpus(t), seed=t)
    losses = []
    for step in range(steps):
        ctx.step = step
        loss = dap_step(lambda b: method.loss(ctx, b, mlm_forward(ctx.model, b)), next(batches),
                        params, optimizer, None, None,
                        after_backward=lambda: method.after_backward(ctx))
        losses.append(loss.item())
    return losses


def roundtrip(method_name: str, method, ctx, tmp_path):
    """Save the method's state as a checkpoint does and load it into a fresh instance."""
    method.save_state(tmp_path)
    fresh = build_method(method_name, vars(method.args))
    fresh.setup(ctx)
    fresh.load_state(tmp_path)
    return fresh


# -- EWC --------------------------------------------------------------------------------------
def test_ewc_penalty_zero_at_anchor_and_quadratic_away_from_it(ctx):
    ewc = build_method("ewc", {"fisher_sequences": 32})
    ewc.setup(ctx)
    ewc.after_domain(ctx, 0)
    ewc.before_domain(ctx, 1)
    assert ewc.penalty(ctx.model).item() == 0.0
    weight = ctx.model.bert.encoder.layer[0].intermediate.dense.weight
    direction = torch.randn_like(weight)
    penalties = []
    for scale in (1e-2, 2e-2, 4e-2):
        with torch.no_grad():
            weight.copy_(ewc.anchor["bert.encoder.layer.0.intermediate.dense.weight"]
                         + scale * direction)
        penalties.append(ewc.penalty(ctx.model).item())
    assert penalties[0] > 0
    assert penalties[1] / penalties[0] == pytest.approx(4.0, rel=1e-4)
    assert penalties[2] / penalties[0] == pytest.approx(16.0, rel=1e-4)


@pytest.mark.parametrize("merge", ["sum", "mean"])
def test_ewc_fisher_is_non_negative_and_accumulates_across_domains(ctx, tmp_path, merge):
    ewc = build_method("ewc", {"fisher_sequences": 32, "merge": merge,
                               "fisher_form": "per-sequence", "fisher_batch_size": 0})
    ewc.setup(ctx)
    ewc.after_domain(ctx, 0)
    first = {n: f.clone() for n, f in ewc.fisher.items()}
    assert all(bool((f >= 0).all()) for f in first.values())
    assert sum(float(f.sum()) for f in first.values()) > 0
    ewc.before_domain(ctx, 1)
    train_steps(ctx, ewc, 1)
    alone = diagonal_fisher(ctx, ctx.corpus(1), 32, seed=ctx.config.seed * 1009 + 1)
    ewc.after_domain(ctx, 1)
    for name, both in ewc.fisher.items():
        expected = first[name] + alone[name]
        torch.testing.assert_close(both, expected if merge == "sum" else expected / 2)
    restored = roundtrip("ewc", ewc, ctx, tmp_path)
    assert restored.domains == 2
    for name, value in ewc.fisher.items():
        assert torch.equal(restored.fisher[name], value)


# -- DER++ ------------------------------------------------------------------------------------
def test_reservoir_never_exceeds_its_size_and_keeps_domains_in_proportion():
    buffer = ReservoirBuffer(120, seed=0)
    for domain, count in enumerate((600, 1200, 1800)):
        for _ in range(count // 50):
            buffer.add({"domain": torch.full((50,), domain), "x": torch.randn(50, 4)})
            assert len(buffer) <= 120 and buffer.data["x"].shape[0] == 120
    shares = Counter(buffer.data["domain"].tolist())
    assert sum(shares.values()) == 120
    for domain, share in ((0, 1 / 6), (1, 2 / 6), (2, 3 / 6)):
        assert abs(shares[domain] / 120 - share) < 0.1, shares


def test_reservoir_stores_each_example_whole_when_a_batch_draws_a_slot_twice():
    # with 2 slots and 64 offers per batch, slots are drawn repeatedly within one batch; an
    # indexed write with repeated slots used to store one example's ids with another's targets
    buffer = ReservoirBuffer(2, seed=0)
    for step in range(30):
        rows, slots = buffer.reserve(64)
        assert len(set(slots)) == len(slots)
        ids = torch.arange(64) + 64 * step
        buffer.write(slots, {"ids": ids[rows], "copy": ids[rows].clone().float()})
        assert torch.equal(buffer.data["ids"].float(), buffer.data["copy"])


def test_derpp_buffer_is_bounded_and_replay_is_zero_for_an_unchanged_model(ctx, tmp_path):
    derpp = build_method("derpp", {"buffer_size": 24, "beta": 0.0, "alpha": 1.0,
                                   "fill": "stream"})
    derpp.setup(ctx)
    for t in (0, 1):
        ctx.t = t
        batches = ctx.mlm_batches(ctx.corpus(t), seed=t)
        for step in range(5):
            ctx.step = step
            batch = next(batches)
            derpp.loss(ctx, batch, mlm_forward(ctx.model, batch))
            assert len(derpp.buffer) <= 24
    assert all(v.shape[0] == 24 for v in derpp.buffer.data.values())
    assert set(derpp.buffer.data["domain"].tolist()) == {0, 1}
    assert derpp.replay_loss(ctx.model, 16).item() < 1e-10
    with torch.no_grad():
        ctx.model.bert.encoder.layer[0].intermediate.dense.weight.normal_()
    assert derpp.replay_loss(ctx.model, 16).item() > 1e-3
    restored = roundtrip("derpp", derpp, ctx, tmp_path)
    assert restored.buffer.seen == derpp.buffer.seen
    for key, value in derpp.buffer.data.items():
        assert torch.equal(restored.buffer.data[key], value)
    assert torch.equal(restored.buffer.sample(8)["input_ids"], derpp.buffer.sample(8)["input_ids"])


def test_derpp_rejects_an_unknown_target():
    with pytest.raises(ValueError, match="method 'derpp': target must be one of"):
        build_method("derpp", {"target": "attention"})


# -- KD ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("form,target", [("sequence", "hidden"), ("token", "hidden"),
                                         ("token", "logits")])
def test_kd_term_is_zero_when_student_and_teacher_share_weights(ctx, form, target):
    kd = build_method("kd", {"form": form, "target": target})
    kd.setup(ctx)
    batch = next(ctx.mlm_batches(ctx.corpus(0), seed=0))
    outputs = mlm_forward(ctx.model, batch)
    kd.before_domain(ctx, 0)
    if form == "token":
        assert kd.loss(ctx, batch, outputs) is outputs.loss  # no teacher for the first domain
        kd.before_domain(ctx, 1)

    def term():
        if form == "sequence":
            return kd.sequence_distillation(ctx.model, batch)
        return kd.distillation(ctx.model, batch, mlm_forward(ctx.model, batch).hidden)

    assert term().item() == pytest.approx(0, abs=1e-7)
    train_steps(ctx, kd, 1)
    assert term().item() > 1e-4
    assert all(not p.requires_grad for p in kd.teacher.parameters())


# -- HAT --------------------------------------------------------------------------------------
def intermediate_rows(model, layer: int, unit: int) -> torch.Tensor:
    dense = model.bert.encoder.layer[layer].intermediate.dense
    return dense.weight[unit]


def test_hat_unit_claimed_by_domain_1_gets_no_gradient_in_domain_2(ctx, tmp_path):
    hat = build_method("hat")
    hat.setup(ctx)
    hat.before_domain(ctx, 0)
    with torch.no_grad():  # domain 1 claims intermediate neuron 3 of layer 0, and only it
        for e in hat.embeddings[0].values():
            e.fill_(-6.0)
        hat.embeddings[0]["intermediate"][0, 3] = 6.0
    hat.after_domain(ctx, 0)
    assert float(hat.masks[0]["intermediate"].sum()) == 1.0
    hat.before_domain(ctx, 1)
    with torch.no_grad():  # domain 2 wants every unit, neuron 3 included
        for e in hat.embeddings[1].values():
            e.fill_(3.0)
    claimed = intermediate_rows(ctx.model, 0, 3).detach().clone()
    free = intermediate_rows(ctx.model, 0, 4).detach().clone()
    ctx.t, ctx.step, ctx.total_steps = 1, 5, 10
    batch = next(ctx.mlm_batches(ctx.corpus(1), seed=1))
    loss = hat.loss(ctx, batch, mlm_forward(ctx.model, batch))
    loss.backward()
    hat.after_backward(ctx)
    dense = ctx.model.bert.encoder.layer[0].intermediate.dense
    assert torch.count_nonzero(dense.weight.grad[3]) == 0 and dense.bias.grad[3] == 0
    assert torch.count_nonzero(dense.weight.grad[4]) > 0
    ctx.model.zero_grad(set_to_none=True)
    train_steps(ctx, hat, 1)
    assert torch.equal(intermediate_rows(ctx.model, 0, 3), claimed)
    assert not torch.equal(intermediate_rows(ctx.model, 0, 4), free)
    hat.after_domain(ctx, 1)
    restored = roundtrip("hat", hat, ctx, tmp_path)
    for kind, mask in hat.masks[0].items():
        assert torch.equal(restored.masks[0][kind], mask)
    assert torch.equal(restored.cumulative(2)["head"], hat.cumulative(2)["head"])


def test_hat_end_task_encoder_applies_its_domain_mask(ctx):
    hat = build_method("hat")
    assert hat.needs_domain_id
    hat.setup(ctx)
    hat.before_domain(ctx, 0)
    with torch.no_grad():
        for e in hat.embeddings[0].values():
            e.fill_(6.0)
        hat.embeddings[0]["head"][1, 2] = -6.0  # domain 1 leaves head 2 of layer 1 out
    hat.after_domain(ctx, 0)
    ids = next(ctx.mlm_batches(ctx.corpus(0), seed=0))["clean_input_ids"]
    encoder = hat.model_for_task(ctx, 0)
    masked = encoder(input_ids=ids).last_hidden_state
    plain = encoder_of(ctx.model)(input_ids=ids).last_hidden_state
    assert not torch.allclose(masked, plain)  # the ungated model is unchanged by the mask
    with hat.gates.applied(hat.masks[0]):
        torch.testing.assert_close(masked, encoder_of(ctx.model)(input_ids=ids).last_hidden_state)
    # a copy (the loop fine-tunes one) is still gated: head 2's value weights no longer matter
    clone = copy.deepcopy(encoder)
    with torch.no_grad():
        clone.encoder.layer[1].attention.self.value.weight[16:24].normal_()
    torch.testing.assert_close(clone(input_ids=ids).last_hidden_state, masked)


# -- resume, end to end ----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method,state", [
    ("ewc", None), ("derpp", None), ("hat", None), ("das", None), ("dga", None), ("demix", None),
    ("replay", None),
    ("kd", ["model.safetensors"]),  # KD's teacher is the model a domain starts from
])
def test_kill_and_resume_gives_the_uninterrupted_numbers_and_refuses_lost_state(
        kill_resume_and_lose_state, method, state):
    kill_resume_and_lose_state(method, state)
