"""Avalanche plugins as zoo rows (methods/avalanche.py) and the compatibility module.

The tests marked `avalanche` need the `[avalanche]` extra and run in `tox -e avalanche`; the
default environment skips them (and runs the two that need no Avalanche).
"""

import importlib.util
import sys
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from transformers import BertConfig, BertForMaskedLM

import benchmark.compat as compat
from benchmark.basemodel import word_tokenizer
from benchmark.config import build_config
from benchmark.context import Context
from benchmark.dap import dap_step
from methods import MethodError, build_method
from methods.ewc import diagonal_fisher

HAS_AVALANCHE = importlib.util.find_spec("avalanche") is not None


def needs_avalanche(test):
    """Marked `avalanche` (selected by `tox -e avalanche`) and skipped where it is missing."""
    skip = pytest.mark.skipif(not HAS_AVALANCHE,
                              reason="needs the [avalanche] extra (tox -e avalanche)")
    return pytest.mark.avalanche(skip(test))

ROWS = ["avl-mas", "avl-si", "avl-rwalk", "avl-agem", "avl-gem", "avl-ewc"]


# -- without Avalanche ----------------------------------------------------------------------
def test_missing_avalanche_is_one_line_naming_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "avalanche.training", None)  # import fails
    with pytest.raises(MethodError) as err:
        build_method("avl-mas")
    message = str(err.value)
    assert "\n" not in message
    assert "pip install -e '.[avalanche]'" in message and "avl-mas" in message


def test_compat_does_nothing_where_torchvision_loads(monkeypatch, tmp_path):
    fake = tmp_path / "_C.so"
    fake.touch()
    monkeypatch.setattr(compat, "_library", None)
    monkeypatch.setattr(compat, "torchvision_library", lambda: fake)
    loaded = []
    monkeypatch.setattr(torch.ops, "load_library", loaded.append)
    assert compat.ensure_torchvision_importable() is False
    assert loaded == [str(fake)] and compat._library is None
    monkeypatch.setattr(compat, "torchvision_library", lambda: None)  # not installed
    assert compat.ensure_torchvision_importable() is False


# -- with Avalanche -------------------------------------------------------------------------
def make_ctx(suite, tmp_path, dropout: float = 0.0) -> Context:
    tokenizer = word_tokenizer(suite.vocabulary)
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=40, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout))
    cfg = build_config(suite.defaults, {"method": "ncl"})
    return Context(config=cfg, suite=suite, domains=suite.order(0), model=model,
                   tokenizer=tokenizer, accelerator=Accelerator(cpu=True), run_dir=tmp_path)


@pytest.fixture
def ctx(tiny_suite, tmp_path):
    return make_ctx(tiny_suite, tmp_path)


def train_domain(ctx, method, t: int, steps: int = 3, lr: float = 1e-2, seen=None) -> list:
    """Domain t through the method's hooks, in `dap_train`'s order; the losses."""
    ctx.t, ctx.total_steps = t, steps
    ctx.model.train()
    method.before_domain(ctx, t)
    params = method.parameters(ctx)
    optimizer = torch.optim.AdamW(params, lr=lr)
    batches = ctx.mlm_batches(ctx.corpus(t), seed=t)
    losses = []
    for step in range(steps):
        ctx.step = step

        def loss_of(batch):
            outputs = method.forward(ctx, ctx.model, batch)
            if seen is not None:
                seen.append(ctx.model.training)
            return method.loss(ctx, batch, outputs)

        loss = dap_step(loss_of, next(batches), params, optimizer, None, None,
                        after_backward=lambda: method.after_backward(ctx),
                        after_step=lambda: method.after_step(ctx))
        losses.append(loss.item())
    method.after_domain(ctx, t)
    return losses


@needs_avalanche
@pytest.mark.parametrize("row", ROWS)
def test_row_trains_two_domains_and_resumes_from_its_state(row, ctx, tmp_path):
    overrides = {"sequences": 32} if "sequences" in build_method(row).args.__dict__ else {}
    method = build_method(row, overrides)
    method.setup(ctx)
    first = train_domain(ctx, method, 0)
    second = train_domain(ctx, method, 1)
    assert all(torch.isfinite(torch.tensor(first + second)))
    # the checkpoint's state: a fresh instance loaded from it gives the same domain-2 loss
    batch = next(ctx.mlm_batches(ctx.corpus(2), seed=5))
    (tmp_path / "ck").mkdir()
    method.save_state(tmp_path / "ck")
    fresh = build_method(row, overrides)
    fresh.setup(ctx)
    fresh.load_state(tmp_path / "ck")
    assert fresh.strategy.clock.train_exp_counter == 2
    if row == "avl-gem":
        assert torch.equal(fresh.plugin.memory_x[1], method.plugin.memory_x[1])
    if row == "avl-agem":
        assert [len(b) for b in fresh.plugin.buffers] == [len(b) for b in method.plugin.buffers]
        assert len(fresh.plugin.buffers) == 2 and next(fresh.plugin.buffer_dliter) is not None
    losses = []
    for m in (method, fresh):
        torch.manual_seed(1)
        m.before_domain(ctx, 2)
        out = m.forward(ctx, ctx.model, batch)
        losses.append(m.loss(ctx, batch, out).item())
        ctx.model.zero_grad(set_to_none=True)
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


@needs_avalanche
@pytest.mark.slow
@pytest.mark.parametrize("row", ROWS)
def test_kill_and_resume_gives_the_uninterrupted_numbers_and_refuses_lost_state(
        kill_resume_and_lose_state, row):
    # the row's own file (methods/avalanche.py STATE_FILE), written by its `save_state`
    kill_resume_and_lose_state(row, ["avalanche_state.pt"])


@needs_avalanche
@pytest.mark.parametrize("row", ["avl-mas", "avl-si", "avl-rwalk", "avl-ewc"])
def test_regularisers_penalise_moving_away_from_the_last_domain(row, ctx):
    method = build_method(row, {"sequences": 32} if row in ("avl-mas", "avl-ewc") else {})
    method.setup(ctx)
    train_domain(ctx, method, 0, steps=4)
    method.before_domain(ctx, 1)
    batch = next(ctx.mlm_batches(ctx.corpus(1), seed=3))
    out = method.forward(ctx, ctx.model, batch)
    assert method.loss(ctx, batch, out).item() == pytest.approx(out.loss.item())  # at θ*
    with torch.no_grad():
        for p in ctx.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = method.forward(ctx, ctx.model, batch)
    assert method.loss(ctx, batch, out).item() > out.loss.item() + 1e-6


@needs_avalanche
def test_si_patch_makes_importance_non_zero_on_cpu(ctx):
    patched = build_method("avl-si")
    patched.setup(ctx)
    train_domain(ctx, patched, 0)
    importance = torch.cat([p.data for p in patched.plugin.ewc_data[1].values()])
    assert importance.abs().sum() > 0
    # the plugin as shipped: snapshots alias the live weights, the importance stays 0
    unpatched = build_method("avl-si")
    unpatched.patches = ("restore_train_mode",)
    unpatched.setup(ctx)
    train_domain(ctx, unpatched, 0)
    importance = torch.cat([p.data for p in unpatched.plugin.ewc_data[1].values()])
    assert importance.abs().sum() == 0


@needs_avalanche
def test_si_parameter_cache_walks_the_module_tree_once_per_call(ctx, monkeypatch):
    from avalanche.training.plugins import synaptic_intelligence

    walks = []
    original = synaptic_intelligence.get_layers_and_params
    monkeypatch.setattr(synaptic_intelligence, "get_layers_and_params",
                        lambda model: walks.append(1) or original(model))
    counts = {}
    for patches in (("restore_train_mode", "si_copy_snapshots", "si_cache_parameters"),
                    ("restore_train_mode", "si_copy_snapshots")):
        method = build_method("avl-si")
        method.patches = patches
        method.setup(ctx)
        walks.clear()
        train_domain(ctx, method, 0, steps=2)
        counts[len(patches)] = len(walks)
    assert counts[3] < counts[2]
    assert counts[3] <= 2 * 5 + 3  # at most one walk per plugin callback


@needs_avalanche
def test_rwalk_trains_with_dropout_on(tiny_suite, tmp_path):
    ctx = make_ctx(tiny_suite, tmp_path, dropout=0.1)
    method = build_method("avl-rwalk")
    method.setup(ctx)
    seen = []
    train_domain(ctx, method, 0, steps=2, seen=seen)
    assert seen == [True, True]
    # the plugin as shipped leaves the model in eval() mode for the step
    method = build_method("avl-rwalk")
    method.patches = ()
    method.setup(ctx)
    seen = []
    train_domain(ctx, method, 0, steps=2, seen=seen)
    assert seen == [False, False]


@needs_avalanche
@pytest.mark.parametrize("row", ["avl-agem", "avl-gem", "avl-mas", "avl-rwalk", "avl-ewc"])
def test_own_backward_plugins_refuse_several_processes(row, ctx):
    method = build_method(row)
    ctx.accelerator = SimpleNamespace(num_processes=2, device=torch.device("cpu"))
    with pytest.raises(MethodError, match="one process"):
        method.setup(ctx)


@needs_avalanche
def test_agem_projects_a_conflicting_gradient(ctx):
    method = build_method("avl-agem", {"sequences": 32, "patterns_per_experience": 16,
                                       "sample_size": 16})
    method.setup(ctx)
    train_domain(ctx, method, 0)
    method.before_domain(ctx, 1)
    batch = next(ctx.mlm_batches(ctx.corpus(1), seed=3))
    out = method.forward(ctx, ctx.model, batch)  # computes the reference gradient
    reference = method.plugin.reference_gradients
    assert reference.abs().sum() > 0
    method.loss(ctx, batch, out).backward()
    # make the step's gradient conflict with the memory: g = −ref + noise
    params = list(method.strategy.model.parameters())
    flat = -reference + 0.01 * torch.randn_like(reference)
    offset = 0
    for p in params:
        if p.grad is not None:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
    method.after_backward(ctx)
    projected = torch.cat([p.grad.reshape(-1) if p.grad is not None
                           else torch.zeros(p.numel()) for p in params])
    assert torch.dot(projected, reference).item() == pytest.approx(0.0, abs=1e-4)


@needs_avalanche
def test_avl_ewc_agrees_with_our_ewc(ctx):
    """Same sequences and masks: Avalanche's Fisher (eval mode, dropout-free model here) equals
    our `diagonal_fisher`, and its penalty with λ/2 equals our λ/2 · Σ F (θ − θ*)²."""
    from avalanche.training.utils import copy_params_dict

    from methods.avalanche import avalanche_dataset, to_avalanche

    ours = build_method("ewc", {"fisher_sequences": 32})
    ours.setup(ctx)
    theirs = build_method("avl-ewc", {"sequences": 32})
    theirs.setup(ctx)
    size = ctx.config.dap_batch_size
    batches = ctx.mlm_batches(ctx.corpus(0), 7, size)
    items = [to_avalanche(next(batches))[:2] for _ in range(2)]
    x = torch.cat([torch.nn.functional.pad(i[0], (0, 16 - i[0].shape[-1]), value=0)
                   for i in items])
    y = torch.cat([torch.nn.functional.pad(i[1], (0, 16 - i[1].shape[-1]), value=-100)
                   for i in items])
    # pad id 0 beyond each batch's width: attention masks equal ours
    assert ctx.tokenizer.pad_token_id == 0
    s = theirs.strategy
    fisher_avl = theirs.plugin.compute_importances(
        s.model, s._criterion, s.optimizer, avalanche_dataset(x, y), s.device,
        size)
    fisher_ours = diagonal_fisher(ctx, ctx.corpus(0), 32, seed=7)
    for name, f in fisher_ours.items():
        assert torch.allclose(fisher_avl[f"mlm.{name}"].data, f, rtol=1e-4, atol=1e-10), name
    # penalties: install the same Fisher and anchor in both, move the weights, compare
    ours.fisher = {n: f.clone() for n, f in fisher_ours.items()}
    ours.before_domain(ctx, 1)
    theirs.plugin.importances[0] = fisher_avl
    theirs.plugin.saved_params[0] = copy_params_dict(s.model)
    s.clock.train_exp_counter = 1
    with torch.no_grad():
        for p in ctx.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    s.loss = torch.zeros(())
    theirs.call("before_backward")
    assert s.loss.item() == pytest.approx(ours.penalty(ctx.model).item(), rel=1e-4)
    assert s.loss.item() > 0


@needs_avalanche
def test_rwalk_penalty_stays_finite_in_a_domain_shorter_than_delta_t(ctx):
    for patches, finite in ((("restore_train_mode", "rwalk_finite_penalty"), True),
                            (("restore_train_mode",), False)):
        method = build_method("avl-rwalk", {"delta_t": 10})
        method.patches = patches
        method.setup(ctx)
        train_domain(ctx, method, 0, steps=3)  # 3 < delta_t: no score update
        losses = train_domain(ctx, method, 1, steps=1)
        assert bool(torch.isfinite(torch.tensor(losses)).all()) is finite


@needs_avalanche
def test_as_benchmark_and_evaluator_give_our_result_file(tmp_path):
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    from benchmark.avalanche import CdapEvaluator, as_benchmark, masked_cross_entropy
    from benchmark.tables import build_tables, load_results

    bench = as_benchmark("syn6", "tiny", order=0)
    assert len(bench.train_stream) == len(bench.domains) == 3
    x, y, t = bench.train_stream[0].dataset[0]
    assert x.shape == (2, bench.config.max_length) and int(t) == 0
    assert torch.equal(x[1].bool(), y != -100) and (y != -100).any()
    model = bench.base_model()
    strategy = Naive(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                     criterion=masked_cross_entropy, train_mb_size=16, train_epochs=1,
                     device="cpu", evaluator=EvaluationPlugin(loggers=[]),
                     plugins=[CdapEvaluator(bench, tmp_path, row="avalanche naive")])
    before = [p.detach().clone() for p in model.parameters()]
    for experience in bench.train_stream:
        strategy.train(experience)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    results = load_results(tmp_path)
    assert len(results) == 1
    result = results[0]
    assert [len(row) for row in result["mf1"]] == [1, 2, 3]
    assert result["row"] == "avalanche naive" and result["profile"] == "tiny"
    assert len(result["general_mlm_loss"]) == 4 and all(s > 0 for s in result["dap_steps"])
    table = build_tables(results)[0][1]
    assert "avalanche naive" in table.iloc[:, 0].tolist()
