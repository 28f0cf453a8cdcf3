"""The zoo's baselines against the companion code: each test recomputes the reference's loss,
Fisher or buffer literally (plain torch on a small model) and compares it with the method's."""

import dataclasses
import json
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
)

from benchmark.basemodel import word_tokenizer
from benchmark.config import build_config
from benchmark.context import Context
from benchmark.dap import dap_step
from benchmark.finetune import task_model
from methods import build_method
from methods.modeling import encoder_of, mlm_forward


def small_bert(vocab: int, dropout: float = 0.0) -> BertForMaskedLM:
    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout))


@pytest.fixture
def ctx(tiny_suite, tmp_path):
    """The tiny suite, a dropout-free small BERT (so passes are deterministic), max_length 16."""
    tokenizer = word_tokenizer(tiny_suite.vocabulary)
    model = small_bert(len(tokenizer))
    cfg = build_config(tiny_suite.defaults, {"method": "ncl"})
    return Context(config=cfg, suite=tiny_suite, domains=tiny_suite.order(0), model=model,
                   tokenizer=tokenizer, accelerator=Accelerator(cpu=True), run_dir=tmp_path)


def train_steps(ctx, method, t: int, steps: int = 3, lr: float = 1e-2) -> None:
    """A few DAP steps on domain t through the method's hooks, like `dap_train`."""
    ctx.t, ctx.total_steps = t, steps
    params = method.parameters(ctx)
    optimizer = torch.optim.AdamW(params, lr=lr)
    batches = ctx.mlm_batches(ctx.corpus(t), seed=100 + t)
    for step in range(steps):
        ctx.step = step
        dap_step(lambda b: method.loss(ctx, b, method.forward(ctx, ctx.model, b)), next(batches),
                 params, optimizer, None, None, after_backward=lambda: method.after_backward(ctx))


def weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# -- 1. KD ------------------------------------------------------------------------------------
def companion_distill(model, teacher, ids, mask, temperature: float = 1.0) -> torch.Tensor:
    """networks/posttrain/model.py l.89–95 with utils/model.py DistillKL, written out."""
    student_ori = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    teacher_ori = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    y_s, y_t = teacher_ori.hidden_states[-1], student_ori.hidden_states[-1]  # its call order
    p_s = F.log_softmax(y_s / temperature, dim=1)
    p_t = F.softmax(y_t / temperature, dim=1)
    return F.kl_div(p_s, p_t, reduction="sum") * temperature**2 / y_s.shape[0]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_is_the_companion_distillation_on_the_unmasked_input(ctx, temperature):
    kd = build_method("kd", {"temperature": temperature})
    theta0 = weights(ctx.model)
    kd.before_domain(ctx, 0)
    # the teacher of the first domain is θ0, with dropout on and no gradient
    assert kd.teacher.training and not any(p.requires_grad for p in kd.teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(weights(kd.teacher), theta0, strict=True))
    train_steps(ctx, kd, 0)
    batch = next(ctx.mlm_batches(ctx.corpus(0), seed=7))
    # an unpadded batch (the companion code's chunks have no padding): the formula as written
    width = int(batch["attention_mask"].sum(1).min())
    clean = {"clean_input_ids": batch["clean_input_ids"][:, :width],
             "attention_mask": torch.ones_like(batch["clean_input_ids"][:, :width])}
    ours = kd.sequence_distillation(ctx.model, clean)
    reference = companion_distill(ctx.model, kd.teacher, clean["clean_input_ids"],
                                  clean["attention_mask"], temperature)
    assert ours.item() > 1e-4
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-7)
    ours_grad = torch.autograd.grad(ours, list(ctx.model.parameters()), allow_unused=True)
    ref_grad = torch.autograd.grad(reference, list(ctx.model.parameters()), allow_unused=True)
    for a, b in zip(ours_grad, ref_grad, strict=True):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
    # a padded batch: the mean over its sequences of each one's loss alone, unpadded
    ours = kd.sequence_distillation(ctx.model, batch)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) > 1
    alone = [companion_distill(ctx.model, kd.teacher, ids[None, :n], torch.ones(1, n).long(),
                               temperature)
             for ids, n in zip(batch["clean_input_ids"], lengths, strict=True)]
    torch.testing.assert_close(ours, torch.stack(alone).mean(), rtol=1e-4, atol=1e-6)
    # the loss the loop sees: L_mlm on the masked input + the term on the unmasked one
    outputs = mlm_forward(ctx.model, batch)
    torch.testing.assert_close(kd.loss(ctx, batch, outputs), outputs.loss + ours)


def test_kd_teacher_is_the_previous_domains_model_and_the_token_form_stays(ctx):
    kd = build_method("kd")
    kd.before_domain(ctx, 0)
    train_steps(ctx, kd, 0)
    kd.after_domain(ctx, 0)
    end_of_0 = weights(ctx.model)
    kd.before_domain(ctx, 1)
    assert all(torch.equal(a, b) for a, b in zip(weights(kd.teacher), end_of_0, strict=True))
    token = build_method("kd", {"form": "token"})
    token.before_domain(ctx, 0)
    assert token.teacher is None  # the earlier form: no teacher on the first domain
    token.before_domain(ctx, 1)
    assert not token.teacher.training
    with pytest.raises(ValueError, match="target 'logits' needs form 'token'"):
        build_method("kd", {"target": "logits"})


# -- 2. EWC -----------------------------------------------------------------------------------
def companion_fisher(model, batches, n_batches: int, self_fisher=None, teacher=None,
                     lamb: float = 5000.0) -> dict[str, torch.Tensor]:
    """networks/baselines/ewc.py l.24–62 with the EWC penalty of posttrain/model.py l.100–110."""
    names = [n for n, _ in model.named_parameters()]
    fisher = {n: 0 * p.data for n, p in model.named_parameters()}
    model.train()
    for _ in range(n_batches):
        inputs = next(batches)
        model.zero_grad()
        sbatch = inputs["input_ids"].size(0)
        loss = mlm_forward(model, inputs).loss
        if self_fisher is not None:
            loss_reg = 0
            for (name, param), param_old in zip(model.named_parameters(), teacher, strict=True):
                loss_reg += torch.sum(self_fisher[name] * (param_old - param).pow(2)) / 2
            loss = loss + lamb * loss_reg
        loss.backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                fisher[n] += sbatch * p.grad.data.pow(2)
    for n in names:
        fisher[n] = fisher[n] / n_batches
    model.zero_grad(set_to_none=True)
    return fisher


def test_ewc_fisher_is_the_companion_fisher_with_penalty_and_running_mean(ctx):
    ewc = build_method("ewc", {"fisher_sequences": 48, "fisher_batch_size": 16})
    ewc.setup(ctx)
    seed = ctx.config.seed * 1009
    reference0 = companion_fisher(ctx.model, ctx.mlm_batches(ctx.corpus(0), seed, 16), 3)
    ewc.after_domain(ctx, 0)
    for name, value in reference0.items():
        torch.testing.assert_close(ewc.fisher[name], value)
    ewc.before_domain(ctx, 1)
    anchor = weights(ctx.model)
    train_steps(ctx, ewc, 1)
    fresh = companion_fisher(ctx.model, ctx.mlm_batches(ctx.corpus(1), seed + 1, 16), 3,
                             self_fisher=reference0, teacher=anchor)
    without = companion_fisher(ctx.model, ctx.mlm_batches(ctx.corpus(1), seed + 1, 16), 3)
    ewc.after_domain(ctx, 1)
    changed = 0
    for name, value in fresh.items():
        merged = (value + reference0[name] * 1) / (1 + 1)  # ewc.py l.62 with t = 1
        torch.testing.assert_close(ewc.fisher[name], merged, rtol=1e-4, atol=1e-9)
        changed += not torch.allclose(value, without[name], rtol=1e-3)
    assert changed  # the penalty's gradient is part of the companion Fisher


def test_ewc_per_sequence_form_divides_by_sequences(ctx):
    ewc = build_method("ewc", {"fisher_sequences": 48, "fisher_batch_size": 16,
                               "fisher_form": "per-sequence"})
    ewc.setup(ctx)
    seed = ctx.config.seed * 1009
    reference = companion_fisher(ctx.model, ctx.mlm_batches(ctx.corpus(0), seed, 16), 3)
    ewc.after_domain(ctx, 0)
    for name, value in reference.items():  # 3 batches of 16: Σ|B|g² / 48 = reference / 16
        torch.testing.assert_close(ewc.fisher[name], value / 16)


# -- 3. prompts -------------------------------------------------------------------------------
@contextmanager
def without_hooks(module):
    """Run `module` as the stock class, its forward hooks set aside."""
    pre, post = dict(module._forward_pre_hooks), dict(module._forward_hooks)
    module._forward_pre_hooks.clear()
    module._forward_hooks.clear()
    try:
        yield
    finally:
        module._forward_pre_hooks.update(pre)
        module._forward_hooks.update(post)


# DGA c074732 networks/prompt.py l.48-67 and l.91-102, transcribed literally (`.cuda()` left
# out). `model` is a stand-in whose `roberta.embeddings` is the word-embedding layer: the one
# documented departure (`SoftPrompts`: DGA embeds the real tokens with the whole embedding layer
# and then the model embeds them again; ContinualLM networks/prompt/tuning.py l.26 and peft use
# the word embeddings).
def cat_learned_embedding_to_input(model, input_ids, t):
    inputs_embeds = getattr(model, 'roberta').embeddings(input_ids)  # noqa: B009 (literal)

    if len(list(inputs_embeds.shape)) == 2:
        inputs_embeds = inputs_embeds.unsqueeze(0)

    # [batch_size, n_tokens, n_embed]
    learned_embeds = model.prompt_embed_pool[t].weight.repeat(inputs_embeds.size(0), 1, 1)

    # X: n * e, P: p * e -> [P; X]: (p+n) * e
    inputs_embeds = torch.cat([inputs_embeds, learned_embeds], dim=1)  # add at the end

    return inputs_embeds


def extend_attention_mask(model, attention_mask):
    if len(list(attention_mask.shape)) == 1:
        attention_mask = attention_mask.unsqueeze(0)

    n_batches = attention_mask.shape[0]
    return torch.cat(
        [attention_mask, torch.full((n_batches, model.n_tokens), 1)],
        dim=1,
    )


def dga_stand_in(encoder, prompts: list[torch.Tensor]):
    """What the two functions read of DGA's model, taken from `encoder` and the prompts."""
    pool = [SimpleNamespace(weight=p) for p in prompts]
    return SimpleNamespace(roberta=SimpleNamespace(embeddings=encoder.embeddings.word_embeddings),
                           prompt_embed_pool=pool, n_tokens=prompts[0].shape[0])


def stock(encoder, embeds, mask):
    with without_hooks(encoder):
        return encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state


def test_prompt_is_dgas_cat_learned_embedding_to_input(ctx):
    method = build_method("prompt-one")
    method.setup(ctx)
    info = json.loads((ctx.artifacts_dir / "isolation.json").read_text())
    assert info["num_virtual_tokens"] == 48  # 64 positions − max_length 16; 100 do not fit
    assert info["requested_virtual_tokens"] == 100
    encoder = encoder_of(ctx.model)
    prompts = [method.modules.parameters(d)[0] for d in ctx.domains[:2]]
    assert prompts[0].shape == (48, 32) and float(prompts[0].detach().abs().max()) <= 0.5
    batch = next(ctx.mlm_batches(ctx.corpus(0), seed=3))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    length = ids.shape[1]
    method.modules.activate(ctx.domains[1])  # task t = 1: the second prompt of the pool
    ours = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    assert ours.shape == (*ids.shape, 32)
    # the companion tokenises with padding="max_length": every sequence is 16 long
    padded = F.pad(ids, (0, 16 - length), value=ctx.tokenizer.pad_token_id)
    padded_mask = F.pad(mask, (0, 16 - length))
    model = dga_stand_in(encoder, prompts)
    embeds = cat_learned_embedding_to_input(model, padded, 1)
    full_mask = extend_attention_mask(model, padded_mask)
    reference = stock(encoder, embeds, full_mask)[:, :length]
    torch.testing.assert_close(ours, reference)
    # rejected: the prompt prepended ([P; X], the real tokens read at positions 48…)
    prepended = torch.cat([embeds[:, 16:], embeds[:, :16]], dim=1)
    wrong = stock(encoder, prepended, torch.cat([full_mask[:, 16:], full_mask[:, :16]], 1))
    assert not torch.allclose(ours, wrong[:, 48:48 + length], atol=1e-3)
    # rejected: the mask not extended over the prompt (zeros: the prompt is not attended)
    unattended = torch.cat([padded_mask, torch.zeros(ids.shape[0], 48, dtype=mask.dtype)], 1)
    wrong = stock(encoder, embeds, unattended)[:, :length]
    assert not torch.allclose(ours, wrong, atol=1e-3)
    # rejected: another domain's prompt
    assert not torch.allclose(ours, stock(encoder, cat_learned_embedding_to_input(
        model, padded, 0), full_mask)[:, :length], atol=1e-3)


# ContinualLM 57e498c networks/prompt/tuning.py l.6-9, l.25-40, l.54-63, transcribed literally
# (the `one` branch; `.to(self.device)` left out): the companion's fine-tuning prompt.
class CompanionPromptTuning:
    def __init__(self, encoder, n_tokens):
        self.roberta = encoder
        self.prompt_embedding = torch.nn.parameter.Parameter(
            self.roberta.embeddings.word_embeddings.weight[:n_tokens].clone().detach())

    def _cat_prompt_embedding_to_input(self, input_ids):
        inputs_embeds = self.roberta.embeddings.word_embeddings(input_ids)

        if len(list(inputs_embeds.shape)) == 2:
            ie = inputs_embeds.unsqueeze(0)
        else:
            ie = inputs_embeds

        prompt_embedding = self.prompt_embedding

        inputs_embeds = torch.cat([prompt_embedding.repeat(ie.size(0), 1, 1),
                                   ie],
                                  dim=1)

        return inputs_embeds

    def _extend_attention_mask(self, attention_mask):
        n_tokens = self.prompt_embedding.shape[-2]

        if len(list(attention_mask.shape)) == 1:
            am = attention_mask.unsqueeze(0)
        else:
            am = attention_mask

        n_batches = am.shape[0]
        return torch.cat([torch.full((n_batches, n_tokens), 1), am], dim=1)


def test_prompt_finetune_companion_is_continuallms_prompt_tuning(ctx):
    method = build_method("prompt-one", {"prompt_finetune": "companion"})
    method.setup(ctx)
    encoder = method.model_for_task(ctx, 0)
    fresh = encoder.soft_prompts.prompts["finetune"]
    trainable = [n for n, p in encoder.named_parameters() if p.requires_grad]
    assert trainable == ["soft_prompts.prompts.finetune"]  # the LM and the DAP prompts frozen
    batch = next(ctx.mlm_batches(ctx.corpus(0), seed=3))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ours = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    companion = CompanionPromptTuning(encoder_of(ctx.model), 48)
    torch.testing.assert_close(fresh, companion.prompt_embedding)
    embeds = companion._cat_prompt_embedding_to_input(ids)
    reference = stock(encoder, embeds, companion._extend_attention_mask(mask))
    torch.testing.assert_close(ours, reference)  # every state: the head reads the prompt's first
    # rejected: the fresh prompt appended instead ([X; P])
    appended = torch.cat([embeds[:, 48:], embeds[:, :48]], dim=1)
    wrong = stock(encoder, appended, torch.cat([mask, torch.ones(ids.shape[0], 48).long()], 1))
    assert not torch.allclose(ours[:, 48:], wrong[:, : ids.shape[1]], atol=1e-3)
    # rejected: the domain's DAP-trained prompt prepended in its place
    dap = method.modules.parameters(ctx.domains[0])[0].detach()
    wrong = stock(encoder, torch.cat([dap.expand(ids.shape[0], -1, -1), embeds[:, 48:]], 1),
                  companion._extend_attention_mask(mask))
    assert not torch.allclose(ours, wrong, atol=1e-3)


def test_prompt_finetune_companion_refuses_the_probe(ctx):
    ctx.config = dataclasses.replace(ctx.config, eval="probe")
    with pytest.raises(ValueError, match="prompt_finetune: companion"):
        build_method("prompt-one", {"prompt_finetune": "companion"}).setup(ctx)


def test_prompt_length_is_the_companion_100_where_max_length_leaves_room(ctx):
    ctx.model = BertForMaskedLM(BertConfig(
        vocab_size=len(ctx.tokenizer), hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=16, max_position_embeddings=128))
    method = build_method("prompt-one")
    method.setup(ctx)
    assert method.modules.describe()["num_virtual_tokens"] == 100
    ctx.config = dataclasses.replace(ctx.config, max_length=100)
    roberta = RobertaForMaskedLM(RobertaConfig(
        vocab_size=len(ctx.tokenizer), hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=16, max_position_embeddings=130,
        pad_token_id=0))
    ctx.model = roberta
    method = build_method("prompt-one")
    method.setup(ctx)  # RoBERTa's positions start after the padding index: 130 − 1 − 100
    assert method.modules.describe()["num_virtual_tokens"] == 29


# -- 4. DER++ ---------------------------------------------------------------------------------
def test_derpp_fills_after_each_domain_from_its_final_model(ctx):
    derpp = build_method("derpp", {"buffer_share": 0.05})
    derpp.setup(ctx)
    sizes = [len(ctx.corpus(t)) for t in range(len(ctx.domains))]
    assert derpp.buffer.size == round(0.05 * sum(sizes))
    train_steps(ctx, derpp, 0)
    assert len(derpp.buffer) == 0  # nothing of the domain being trained
    derpp.after_domain(ctx, 0)
    assert len(derpp.buffer) == derpp.buffer.size
    assert set(derpp.buffer.data["domain"].tolist()) == {0}
    # the stored targets are the final model's last hidden states on the stored masked input
    # (memory.py add_from_loader l.127–136: `model(batch).hidden_states[-1]`)
    stored = derpp.buffer.data
    output = ctx.model(input_ids=stored["input_ids"], attention_mask=stored["attention_mask"],
                       output_hidden_states=True)
    valid = stored["attention_mask"].bool()
    torch.testing.assert_close(stored["target"][valid], output.hidden_states[-1][valid])
    assert (stored["labels"][valid] != -100).any()  # masked inputs with their MLM labels
    before = {k: v.clone() for k, v in stored.items()}
    train_steps(ctx, derpp, 1)  # domain 1 replays domain 0 and adds nothing
    assert all(torch.equal(before[k], v) for k, v in derpp.buffer.data.items())
    derpp.after_domain(ctx, 1)
    held = derpp.buffer.data["domain"].tolist()
    assert set(held) == {0, 1} and 0.3 < held.count(1) / len(held) < 0.7
    record = json.loads((ctx.artifacts_dir / "derpp.json").read_text())
    after = record["after_domain"][ctx.domains[1]]
    assert record["buffer_size"] == derpp.buffer.size
    assert after["seen_sequences"] == sizes[0] + sizes[1]
    assert after["share_of_seen"] == pytest.approx(len(held) / (sizes[0] + sizes[1]), abs=1e-6)
    assert sum(after["per_domain"].values()) == len(held)


def companion_replay(model, replay_batch, replay_alpha: float, replay_beta: float):
    """approaches/compute_gradient.py l.22-27, literally: one replay batch, one forward pass,
    `replay_beta` on its MLM loss and `replay_alpha` on the MSE of its last hidden states to the
    stored ones (`self.mse`, which the companion's Appr never defines: nn.MSELoss() as its
    MyModel defines it, networks/posttrain/model.py l.21, the mean over every element)."""
    mse = torch.nn.MSELoss()
    replay_outputs = model(input_ids=replay_batch["input_ids"],
                           attention_mask=replay_batch["attention_mask"],
                           labels=replay_batch["labels"], output_hidden_states=True)
    loss = 0.0
    loss += replay_outputs.loss * replay_beta
    loss += mse(replay_outputs.hidden_states[-1], replay_batch["logits"]) * replay_alpha
    return loss


@pytest.mark.parametrize("replay_batches", ["one", "two"])
def test_derpp_replay_loss_is_the_companions_on_one_batch(ctx, replay_batches):
    derpp = build_method("derpp", {"buffer_size": 8, "alpha": 0.3, "beta": 0.7,
                                   "replay_batches": replay_batches})
    derpp.setup(ctx)
    # a tiny buffer of 8 full-length masked sequences (no padding, as the companion's 164-token
    # chunks), their targets the hidden states of a model other than the one now replaying
    torch.manual_seed(3)
    width = ctx.config.max_length
    clean = torch.randint(5, len(ctx.tokenizer), (8, width))
    picked = torch.rand(8, width) < 0.3
    picked[:, 0] = True
    batch = {"input_ids": torch.where(picked, ctx.tokenizer.mask_token_id, clean),
             "attention_mask": torch.ones_like(clean),
             "labels": torch.where(picked, clean, -100)}
    other = small_bert(len(ctx.tokenizer))
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    rows, slots = derpp.buffer.reserve(8)
    derpp.store(ctx, batch, rows, slots, mlm_forward(other, batch).hidden, 0)
    drawn = []
    sample = derpp.buffer.sample
    derpp.buffer.sample = lambda n: drawn.append(sample(n)) or drawn[-1]
    ours = derpp.replay_loss(ctx.model, 3)
    first = {**drawn[0], "logits": drawn[0]["target"]}
    reference = companion_replay(ctx.model, first, replay_alpha=0.3, replay_beta=0.7)
    swapped = companion_replay(ctx.model, first, replay_alpha=0.7, replay_beta=0.3)
    assert not torch.allclose(swapped, reference, atol=1e-3)  # α and β tell apart
    if replay_batches == "one":
        assert len(drawn) == 1
        torch.testing.assert_close(ours, reference)
    else:  # Mammoth models/derpp.py l.41-51: the β term on a second, independent batch
        assert len(drawn) == 2 and not torch.equal(drawn[0]["input_ids"], drawn[1]["input_ids"])
        second = {**drawn[1], "logits": drawn[1]["target"]}
        mammoth = (0.3 * companion_replay(ctx.model, first, 1.0, 0.0)
                   + 0.7 * companion_replay(ctx.model, second, 0.0, 1.0))
        torch.testing.assert_close(ours, mammoth)
        assert not torch.allclose(ours, reference, atol=1e-3)


def test_derpp_stream_form_stores_while_training(ctx):
    derpp = build_method("derpp", {"fill": "stream", "buffer_size": 24})
    derpp.setup(ctx)
    train_steps(ctx, derpp, 0)
    assert len(derpp.buffer) == 24 and set(derpp.buffer.data["domain"].tolist()) == {0}


# -- 6. the end-task head -------------------------------------------------------------------
def bert_head_by_hand(hidden, pooler_w, pooler_b, classifier_w, classifier_b):
    """BERT's sequence classifier (Devlin et al. 2019 §4.1; HF BertPooler + BertForSequence-
    Classification, dropout off): the final hidden state of [CLS], a dense layer with tanh (the
    pooler), then a linear classifier."""
    pooled = torch.tanh(hidden[:, 0] @ pooler_w.T + pooler_b)
    return pooled @ classifier_w.T + classifier_b


def test_end_task_model_is_the_stock_bert_head_on_the_shared_encoder(ctx):
    encoder = encoder_of(ctx.model)
    model = task_model(encoder, num_labels=3).eval()
    assert isinstance(model, BertForSequenceClassification)
    assert model.bert.encoder is encoder  # the DAP-trained encoder itself, not a copy
    batch = next(ctx.mlm_batches(ctx.corpus(0), seed=0))
    ids, mask = batch["clean_input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, attention_mask=mask).logits
    hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    weights = [t.detach() for t in (model.bert.pooler.dense.weight, model.bert.pooler.dense.bias,
                                    model.classifier.weight, model.classifier.bias)]
    torch.testing.assert_close(logits, bert_head_by_hand(hidden, *weights))
    # a wrong readout (the mean over tokens in place of [CLS]) is told apart
    mean_read = bert_head_by_hand(hidden.mean(1, keepdim=True), *weights)
    assert not torch.allclose(logits, mean_read, atol=1e-4)


def roberta_classification_head(features, dense_w, dense_b, out_w, out_b):
    """RobertaClassificationHead.forward as the companion code runs it (its
    MyRobertaForSequenceClassification, networks/transformers/roberta.py l.676, imports the
    class from transformers, l.35), dropout off: x = features[:, 0, :] (<s>); dense; tanh;
    out_proj."""
    x = features[:, 0, :]
    x = x @ dense_w.T + dense_b
    x = torch.tanh(x)
    return x @ out_w.T + out_b


def test_end_task_model_is_the_stock_roberta_head_on_the_shared_encoder():
    torch.manual_seed(0)
    lm = RobertaForMaskedLM(RobertaConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=40, pad_token_id=1))
    model = task_model(lm.roberta, num_labels=4).eval()
    assert isinstance(model, RobertaForSequenceClassification)
    assert model.roberta.encoder is lm.roberta  # the shared encoder itself
    ids = torch.randint(3, 40, (2, 6))
    hidden = lm.roberta.eval()(input_ids=ids).last_hidden_state
    head = model.classifier
    with torch.no_grad():  # weights large enough for tanh to be far from linear
        for p in head.parameters():
            p.normal_(std=1.0)
    weights = [t.detach() for t in (head.dense.weight, head.dense.bias, head.out_proj.weight,
                                    head.out_proj.bias)]
    logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, roberta_classification_head(hidden, *weights))
    # a head without the tanh (a plain two-layer linear readout of <s>) is told apart
    no_tanh = hidden[:, 0] @ weights[0].T + weights[1]
    assert not torch.allclose(logits, no_tanh @ weights[2].T + weights[3], atol=1e-2)


# -- 6. HAT (Serrà et al. 2018; code joansj/hat 6fd0b9d) --------------------------------------
def hat_view(gfc_post, gfc_pre, weight):
    """src/networks/mlp_hat.py l.84-87 (`fc2.weight`), literally."""
    post = gfc_post.data.view(-1, 1).expand_as(weight)
    pre = gfc_pre.data.view(1, -1).expand_as(weight)
    return torch.min(post, pre)


def hat_mask_back(model, a, head_dim: int, combine=torch.min) -> dict[str, torch.Tensor]:
    """mask_back = 1 − view per parameter (src/approaches/hat.py l.98-102), the views of
    mlp_hat.py l.80-95 on each layer: a gated output and an ungated input as `fc1` (l.80-83),
    a gated output and a gated input as `fc2` (l.84-89), an ungated output (the attention-output
    dense, whose output joins the ungated residual stream) by the input's gate alone."""
    back = {}
    for index, layer in enumerate(encoder_of(model).encoder.layer):
        prefix = f"bert.encoder.layer.{index}."
        head = a["head"][index].repeat_interleave(head_dim)
        inter, out = a["intermediate"][index], a["output"][index]
        for name in ("query", "key", "value"):
            weight = getattr(layer.attention.self, name).weight
            back[f"{prefix}attention.self.{name}.weight"] = 1 - head.view(-1, 1).expand_as(weight)
            back[f"{prefix}attention.self.{name}.bias"] = 1 - head.view(-1)
        weight = layer.attention.output.dense.weight
        back[f"{prefix}attention.output.dense.weight"] = 1 - head.view(1, -1).expand_as(weight)
        weight = layer.intermediate.dense.weight
        back[f"{prefix}intermediate.dense.weight"] = 1 - inter.view(-1, 1).expand_as(weight)
        back[f"{prefix}intermediate.dense.bias"] = 1 - inter.view(-1)
        weight = layer.output.dense.weight
        view = hat_view(out, inter, weight) if combine is torch.min else combine(
            out.view(-1, 1).expand_as(weight), inter.view(1, -1).expand_as(weight))
        back[f"{prefix}output.dense.weight"] = 1 - view
        back[f"{prefix}output.dense.bias"] = 1 - out.view(-1)
    return back


def hat_with_gradients(ctx, args: dict | None = None):
    """HAT on domain 1 with a^{<1} drawn in (0, 1) and a random gradient on every parameter;
    returns the method and the gradients before `after_backward`."""
    hat = build_method("hat", args or {})
    hat.setup(ctx)
    ctx.t, ctx.step, ctx.total_steps = 1, 2, 10
    hat.batches_per_epoch = 5
    hat.before_domain(ctx, 1)
    generator = torch.Generator().manual_seed(0)
    hat.masks[0] = {k: torch.rand(s, generator=generator) for k, s in hat.gates.shapes.items()}
    if hat.args.form == "binary":  # what its `after_domain` stores
        hat.masks[0] = {k: (v > 0.5).float() for k, v in hat.masks[0].items()}
    for p in hat.parameters(ctx):
        p.grad = torch.randn(p.shape, generator=generator)
    grads = {n: p.grad.clone() for n, p in ctx.model.named_parameters()}
    grads.update({f"e.{k}": e.grad.clone() for k, e in hat.embeddings[1].items()})
    hat.after_backward(ctx)
    return hat, grads


def test_hat_scales_gradients_by_one_minus_min_of_the_cumulative_attention(ctx):
    hat, grads = hat_with_gradients(ctx)
    a = hat.masks[0]
    back = hat_mask_back(ctx.model, a, head_dim=8)
    for n, p in ctx.model.named_parameters():  # hat.py l.133-135: p.grad *= mask_back[n]
        expected = grads[n] * back[n] if n in back else grads[n]
        torch.testing.assert_close(p.grad, expected, msg=n)
    # hat.py l.138-142: the embedding gradients compensated for the annealing
    s, smax = hat.slope(ctx), 400.0
    for kind, p in hat.embeddings[1].items():
        num = torch.cosh(torch.clamp(s * p.data, -50, 50)) + 1
        den = torch.cosh(p.data) + 1
        torch.testing.assert_close(p.grad, grads[f"e.{kind}"] * smax / s * num / den)
    # rejected: max instead of min for the FFN output dense (input and output both gated)
    wrong = hat_mask_back(ctx.model, a, head_dim=8, combine=torch.max)
    name = "bert.encoder.layer.0.output.dense.weight"
    assert not torch.allclose(dict(ctx.model.named_parameters())[name].grad,
                              grads[name] * wrong[name])


def test_hat_binary_form_blocks_rows_and_is_not_the_paper(ctx):
    hat, grads = hat_with_gradients(ctx, {"form": "binary"})
    back = hat_mask_back(ctx.model, hat.masks[0], head_dim=8)
    params = dict(ctx.model.named_parameters())
    name = "bert.encoder.layer.1.output.dense.weight"
    assert not torch.allclose(params[name].grad, grads[name] * back[name])
    used = hat.masks[0]["output"][1]  # binarised, the output rows only
    assert set(used.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(params[name].grad, grads[name] * (1 - used).view(-1, 1))


@pytest.mark.parametrize("form", ["paper", "binary"])
def test_hat_domain_attention_is_sigmoid_at_s_max_and_accumulates_by_max(ctx, form):
    hat = build_method("hat", {"form": form})
    hat.setup(ctx)
    for t in range(2):
        hat.before_domain(ctx, t)
        hat.after_domain(ctx, t)
    a = [{k: torch.sigmoid(400 * e.detach()) for k, e in hat.embeddings[t].items()}
         for t in range(2)]  # hat.py l.88 (mask(t, s=smax)), l.91-95 (max)
    if form == "binary":
        a = [{k: (v > 0.5).float() for k, v in m.items()} for m in a]
    for kind in a[0]:
        torch.testing.assert_close(hat.masks[1][kind], a[1][kind])
        torch.testing.assert_close(hat.cumulative(2)[kind],
                                   torch.maximum(a[0][kind], a[1][kind]))
    binary = any(((v > 0) & (v < 1)).any() for v in hat.masks[0].values())
    assert binary == (form == "paper")  # the paper's attention is not binarised


@pytest.mark.parametrize("anneal", ["paper", "code", "domain"])
def test_hat_slope_is_annealed_per_batch_as_the_paper_says(ctx, anneal):
    ctx.config = dataclasses.replace(ctx.config, dap_batch_size=4)
    hat = build_method("hat", {"anneal": anneal})
    hat.setup(ctx)
    batches = len(ctx.corpus(0)) // 4  # B: batches of one epoch (the stream drops a partial one)
    hat.dap_plan(ctx, 0)
    assert hat.batches_per_epoch == batches and batches >= 4
    smax, steps = 400.0, 2 * batches + 3
    ctx.total_steps = steps
    for step in (0, 1, batches - 2, batches - 1, batches, batches + 1, steps - 1):
        ctx.step = step
        b = step % batches + 1
        paper = 1 / smax + (smax - 1 / smax) * (b - 1) / (batches - 1)  # §2.4
        # ContinualLM approaches/compute_loss.py l.18 (step counts batches within an epoch)
        code = (smax - 1 / smax) * (step % batches) / batches + 1 / smax
        domain = 1 / smax + (smax - 1 / smax) * step / (steps - 1)
        expected = {"paper": paper, "code": code, "domain": domain}[anneal]
        assert hat.slope(ctx) == pytest.approx(expected, rel=1e-12)
    ctx.step = batches - 1  # the last batch of the first epoch
    assert hat.slope(ctx) == pytest.approx(smax) if anneal == "paper" else \
        hat.slope(ctx) < smax - 1  # rejected: the code's /B never reaches s_max
