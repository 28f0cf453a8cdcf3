"""Parameter isolation (adapters, prompts, LoRA, DEMix): the LM stays θ0, each module is its own."""

import copy
import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from datasets import Dataset
from transformers import BertConfig, BertForMaskedLM

from benchmark import finetune
from benchmark.basemodel import word_tokenizer
from benchmark.checkpoint import load_checkpoint, save_checkpoint
from benchmark.config import RunConfig
from benchmark.context import Context
from benchmark.dap import dap_train
from benchmark.data import tokenize_task
from benchmark.finetune import task_model
from methods import build_method

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [f"w{i}" for i in range(40)]
DOMAINS = ["d0", "d1", "d2"]


def make_ctx(tmp_path, seed: int = 0) -> Context:
    """Three domains over disjoint word ranges, a 2-layer BERT, three DAP steps per domain."""
    torch.manual_seed(seed)
    tokenizer = word_tokenizer(SPECIALS + WORDS)
    domains = {}
    for k, name in enumerate(DOMAINS):
        words = WORDS[k * 12:(k + 1) * 12]
        texts = [" ".join(words[(i + j) % 12] for j in range(6)) for i in range(24)]
        domains[name] = SimpleNamespace(corpus=Dataset.from_dict({"text": texts}))
    suite = SimpleNamespace(domains=domains, general_corpus=None)
    model = BertForMaskedLM(BertConfig(
        vocab_size=len(SPECIALS) + len(WORDS), hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, max_position_embeddings=64))
    config = RunConfig(dap_steps=3, dap_batch_size=8, max_length=16, dap_lr=1e-2, seed=seed)
    return Context(config=config, suite=suite, domains=list(DOMAINS), model=model,
                   tokenizer=tokenizer, accelerator=Accelerator(cpu=True), run_dir=tmp_path,
                   _base=copy.deepcopy(model))


def snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def train_domain(ctx: Context, method, t: int) -> None:
    ctx.t = t
    method.before_domain(ctx, t)
    dap_train(ctx, method, method.dap_plan(ctx, t), t)
    method.after_domain(ctx, t)


def lm_params(method, ctx) -> list[torch.Tensor]:
    """Every parameter of the (possibly wrapped) masked LM that belongs to no module."""
    modules = {id(p) for n in method.names for p in method.modules.parameters(n)}
    return [p for p in ctx.model.parameters() if id(p) not in modules]


@pytest.mark.parametrize("name", ["adapter-one", "prompt-one", "lora-one", "demix"])
def test_lm_is_bit_identical_and_earlier_modules_stay_untouched(tmp_path, name):
    ctx = make_ctx(tmp_path)
    method = build_method(name)
    method.setup(ctx)
    lm_before = snapshot(lm_params(method, ctx))
    trained = {}
    for t, domain in enumerate(DOMAINS):
        before = {n: snapshot(method.modules.parameters(n)) for n in DOMAINS}
        train_domain(ctx, method, t)
        assert same(lm_before, snapshot(lm_params(method, ctx))), f"LM changed on domain {t}"
        after = {n: snapshot(method.modules.parameters(n)) for n in DOMAINS}
        assert not same(before[domain], after[domain]), f"module {domain} did not train"
        for n in DOMAINS:
            if n != domain:
                assert same(before[n], after[n]), f"module {n} changed while {domain} trained"
        trained[domain] = after[domain]
    for domain, weights in trained.items():  # each module still holds what its domain taught it
        assert same(weights, snapshot(method.modules.parameters(domain)))


@pytest.mark.parametrize("name", ["ncl-adapter", "ncl-lora"])
def test_shared_module_trains_on_every_domain_and_lm_stays(tmp_path, name):
    ctx = make_ctx(tmp_path)
    method = build_method(name)
    method.setup(ctx)
    lm_before = snapshot(lm_params(method, ctx))
    for t in range(len(DOMAINS)):
        before = snapshot(method.modules.parameters("shared"))
        train_domain(ctx, method, t)
        assert not same(before, snapshot(method.modules.parameters("shared")))
    assert same(lm_before, snapshot(lm_params(method, ctx)))
    assert not method.needs_domain_id and not method.past_tasks_unchanged


MODULE_NAMES = {"adapter-one": "adapters.", "lora-one": "lora_", "prompt-one": "soft_prompts."}
MODULE_D0 = {"adapter-one": "adapters.d0.", "lora-one": ".d0.", "prompt-one": "prompts.d0"}


@pytest.mark.parametrize("name", sorted(MODULE_NAMES))
@pytest.mark.parametrize("ft_train_lm", [None, True])
def test_end_task_fine_tuning_freezes_the_lm_unless_asked(tmp_path, monkeypatch, name,
                                                          ft_train_lm):
    """Default (ContinualLM utils/model.py l.373-380, l.415): after fine-tuning the LM is what
    DAP left, the module and the classifier changed; `ft_train_lm: true`: the LM changed too."""
    ctx = make_ctx(tmp_path)
    method = build_method(name, {} if ft_train_lm is None else {"ft_train_lm": ft_train_lm})
    method.setup(ctx)
    train_domain(ctx, method, 0)
    built = []

    def keep(encoder, num_labels):  # the model finetune_and_test trains, and its start
        model = task_model(encoder, num_labels)
        built.append((model, {n: p.detach().clone() for n, p in model.named_parameters()}))
        return model

    monkeypatch.setattr(finetune, "task_model", keep)
    texts = ["w1 w2 w3", "w13 w14", "w4 w5 w6 w7", "w15 w16 w17", "w2 w9", "w20 w21 w22"]
    split = tokenize_task(Dataset.from_dict({"text": texts, "label": [0, 1] * 3}),
                          ctx.tokenizer, 16)
    finetune.finetune_and_test(ctx, method.model_for_task(ctx, 0), split, split, 2, seed=0,
                               desc="test", epochs=2)
    model, start = built[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}
    modules = {n for n in start if MODULE_NAMES[name] in n}
    module = {n for n in modules if MODULE_D0[name] in n}  # task 0's own
    head = {n for n in start if "classifier" in n}
    lm = set(start) - modules - head - {n for n in start if ".pooler." in n}
    assert module and head and lm and modules - module
    # (a bottleneck of one unit may be dead on [CLS] in the last layer: some, not all, move)
    assert module & changed and head <= changed and not (modules - module) & changed
    if ft_train_lm:
        assert lm & changed
    else:
        assert not lm & changed, sorted(lm & changed)


@pytest.mark.parametrize("ft_train_lm", [True, False])
def test_end_task_encoder_uses_module_i_and_trains_what_the_config_says(tmp_path, ft_train_lm):
    ctx = make_ctx(tmp_path)
    method = build_method("prompt-one", {"ft_train_lm": ft_train_lm})
    method.setup(ctx)
    for t in range(2):
        train_domain(ctx, method, t)
    encoder = method.model_for_task(ctx, 0)
    own = {id(p) for p in method.modules.parameters("d0")}
    others = {id(p) for n in ("d1", "d2") for p in method.modules.parameters(n)}
    for p in encoder.parameters():
        if id(p) in own:
            assert p.requires_grad
        elif id(p) in others:
            assert not p.requires_grad
        else:
            assert p.requires_grad == ft_train_lm
    batch = ctx.tokenizer(["w1 w2 w3", "w4 w5"], padding=True, return_tensors="pt")
    hidden = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    # the virtual tokens are dropped: one state per real token, [CLS] first
    assert hidden.last_hidden_state.shape[:2] == batch["input_ids"].shape
    other = method.model_for_task(ctx, 1)(input_ids=batch["input_ids"],
                                          attention_mask=batch["attention_mask"])
    assert not torch.allclose(hidden.last_hidden_state, other.last_hidden_state)


def test_too_long_input_with_prompt_fails_clearly(tmp_path):
    ctx = make_ctx(tmp_path)
    method = build_method("prompt-one")
    method.setup(ctx)
    ids = torch.full((1, 17), 5)  # max_length is 16
    with pytest.raises(ValueError, match="17 tokens exceed the 16 positions"):
        method.modules.encoder()(input_ids=ids, attention_mask=torch.ones_like(ids))
    ctx.config = dataclasses.replace(ctx.config, max_length=64)  # 64 positions: none left
    with pytest.raises(ValueError, match="max_length 64 leaves no position for a prompt"):
        build_method("prompt-one").setup(ctx)


@pytest.mark.parametrize("good", [0, 1])
def test_demix_starts_a_new_expert_from_the_lowest_perplexity_one(tmp_path, good):
    ctx = make_ctx(tmp_path)
    method = build_method("demix")
    method.setup(ctx)
    bad = 1 - good
    with torch.no_grad():  # expert `bad` scrambles every hidden state; `good` is the identity
        for p in method.modules.parameters(DOMAINS[bad]):
            p.copy_(torch.randn_like(p) * 3.0)
        for p in method.modules.parameters(DOMAINS[good]):
            p.zero_()
    expected = snapshot(method.modules.parameters(DOMAINS[good]))
    ctx.t = 2
    method.before_domain(ctx, 2)
    assert same(snapshot(method.modules.parameters("d2")), expected)
    record = json.loads((ctx.artifacts_dir / "demix.json").read_text())["d2"]
    assert record["init_from"] == DOMAINS[good]
    assert record["perplexity"][DOMAINS[good]] < record["perplexity"][DOMAINS[bad]]


def test_demix_mixture_needs_no_domain_id_and_weights_experts_per_input(tmp_path):
    ctx = make_ctx(tmp_path)
    method = build_method("demix", {"mixture": True})
    assert not method.needs_domain_id and not method.past_tasks_unchanged
    assert build_method("demix").needs_domain_id
    method.setup(ctx)
    for t in range(3):
        train_domain(ctx, method, t)
    mixture = method.model_for_task(ctx, 0)
    batch = ctx.tokenizer(["w1 w2 w3 w4", "w30 w31 w32"], padding=True, return_tensors="pt")
    weights = mixture.posterior(batch["input_ids"], batch["attention_mask"])
    assert weights.shape == (2, 3)
    assert torch.allclose(weights.sum(-1), torch.ones(2))
    assert ((weights.max(-1).values - weights.min(-1).values) > 1e-4).all()  # not a plain mean
    out = mixture(batch["input_ids"], batch["attention_mask"]).last_hidden_state
    assert out.shape == (*batch["input_ids"].shape, 16)
    out.sum().backward()  # the LM and every expert get a gradient; the scorer stays frozen
    assert all(p.grad is not None for n in DOMAINS for p in method.modules.parameters(n))
    assert all(not p.requires_grad for p in mixture.scorer.parameters())


@pytest.mark.parametrize("name,files", [
    ("adapter-one", ["adapter/d1/adapter_config.json", "adapter/d1/adapter.safetensors"]),
    ("prompt-one", ["prompt/d1.safetensors"]),
    ("ncl-lora", ["lora/shared/adapter_config.json", "lora/shared/adapter_model.safetensors"]),
])
def test_modules_are_saved_in_the_library_format_and_reload(tmp_path, name, files):
    ctx = make_ctx(tmp_path / "run")
    method = build_method(name)
    method.setup(ctx)
    for t in range(2):
        train_domain(ctx, method, t)
    path = save_checkpoint(tmp_path / "run", ctx.model, method, {"domain": 1})
    for file in files:
        assert (path / file).is_file(), file
    saved = {n: snapshot(method.modules.parameters(n)) for n in method.names}

    # the library files alone restore the modules ...
    fresh_ctx = make_ctx(tmp_path / "fresh")
    fresh = build_method(name)
    fresh.setup(fresh_ctx)
    assert not all(same(saved[n], snapshot(fresh.modules.parameters(n))) for n in fresh.names)
    fresh.load_state(path)
    for n in fresh.names:
        assert same(saved[n], snapshot(fresh.modules.parameters(n))), n
    # ... and the loop's own resume path restores the whole model
    again_ctx = make_ctx(tmp_path / "again")
    again = build_method(name)
    again.setup(again_ctx)
    assert load_checkpoint(path, again_ctx.model, again)["domain"] == 1
    for (key, a), b in zip(ctx.model.state_dict().items(),
                           again_ctx.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
