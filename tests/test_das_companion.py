"""DAS as released: each companion-code option against the companion formula, recomputed literally.

The companion code is GitHub UIC-Liu-Lab/ContinualLM at commit 57e498c; each test rebuilds its
formula in plain torch on a tiny RoBERTa with 4 heads (with 2 heads the per-layer z-score makes
every head 0.6089, so head-importance errors could not show) and compares it with `methods.das`.
Its unit masks are rebuilt here the companion's way: HF's `head_mask` on the attention
probabilities, and `dense(h) * mask` on the FFN intermediate (before the activation) and output
dense (`networks/transformers/roberta.py` l.175-200), independently of `methods.gates`.
"""

import copy
from contextlib import contextmanager
from itertools import islice

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import RobertaConfig, RobertaForMaskedLM

from benchmark.basemodel import word_tokenizer
from benchmark.config import build_config, read_preset
from benchmark.context import Context
from benchmark.dap import dap_train
from benchmark.protocol import domain_seed
from methods import DapPlan, build_method
from methods.gates import FORMS, UnitGates, gate_gradients, normalize, softmask_gradients

HEADS = 4
COMPANION_PRESETS = [
    "das-companion", "dga-companion", "dga-one",
    *(f"rq3-companion-{m}" for m in ("no-softmask", "random-importance", "hard-mask",
                                     "heads-only", "ffn-only")),
    *(f"rq4-companion-{m}" for m in ("no-contrast", "past-only", "general-only", "contrast-0.1")),
    *(f"rq5-companion-{m}" for m in ("no-general", "general-mlm", "random-general")),
]


def tiny_roberta(vocab: int, pad: int, dropout: float = 0.1, seed: int = 0):
    torch.manual_seed(seed)
    config = RobertaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=HEADS, intermediate_size=48,
                           max_position_embeddings=64, pad_token_id=pad,
                           hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    config._attn_implementation = "eager"  # HF's head_mask needs the eager attention
    return RobertaForMaskedLM(config)


def make_ctx(suite, tmp_path, dropout: float = 0.1, **overrides) -> Context:
    tokenizer = word_tokenizer(suite.vocabulary)
    model = tiny_roberta(len(tokenizer), tokenizer.pad_token_id, dropout)
    cfg = build_config(suite.defaults, {"method": "das", **overrides})
    return Context(config=cfg, suite=suite, domains=suite.order(0), model=model,
                   tokenizer=tokenizer, accelerator=Accelerator(cpu=True), run_dir=tmp_path,
                   _base=copy.deepcopy(model))


def perturb(model, scale: float = 0.05, seed: int = 1) -> None:
    """Move the model away from θ0 (as after DAP-training), deterministically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def masks(layers: int = 2, requires_grad: bool = True):
    """`softmask.initial_impt` (softmask.py l.45-65): all-one masks that take gradients."""
    shapes = {"head": (layers, HEADS), "intermediate": (layers, 48), "output": (layers, 32)}
    return {k: torch.ones(s, requires_grad=requires_grad) for k, s in shapes.items()}


@contextmanager
def companion_ffn_masks(model, intermediate, output):
    """roberta.py l.175-177 and l.195-197: `self.dense(h) * mask` on both FFN denses."""
    handles = []
    for i, layer in enumerate(model.roberta.encoder.layer):
        handles.append(layer.intermediate.dense.register_forward_hook(
            lambda m, a, out, i=i: out * intermediate[i]))
        handles.append(layer.output.dense.register_forward_hook(
            lambda m, a, out, i=i: out * output[i]))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def companion_hidden(model, ids, attention_mask, m):
    with companion_ffn_masks(model, m["intermediate"], m["output"]):
        return model.roberta(input_ids=ids, attention_mask=attention_mask,
                             head_mask=m["head"]).last_hidden_state


def impt_norm(impt):
    """softmask.py l.35-42, literally."""
    impt = impt.clone()
    for layer in range(impt.size(0)):
        impt[layer] = (impt[layer] - impt[layer].mean()) / impt[layer].std()
    return torch.tanh(impt).abs()


def compute_impt(loss_fn, batches, m):
    """softmask.py l.73-98: the masks' `.grad` is never zeroed; running values are summed."""
    impt = {k: torch.zeros_like(v) for k, v in m.items()}
    tot_tokens = 0.0
    for batch in batches:
        loss_fn(batch, m).backward()
        for k in impt:
            impt[k] += m[k].grad.detach()
        tot_tokens += batch["attention_mask"].float().sum()
    return {k: v / tot_tokens for k, v in impt.items()}


def batches_of(ctx, seed: int, n: int):
    it = ctx.mlm_batches(ctx.corpus(0), seed)
    return [next(it) for _ in range(n)]


# 1. contrast pairing ------------------------------------------------------------------------
def sequence_level_contrast(z2, z1, z3, temp=0.05):
    """simcse.py l.123-171 on one process: note the parameter order (z2, z1, z3)."""
    cos = F.cosine_similarity(z1.unsqueeze(1), z2.unsqueeze(0), dim=-1) / temp
    cos = torch.cat([cos, F.cosine_similarity(z1.unsqueeze(1), z3.unsqueeze(0), dim=-1) / temp], 1)
    return F.cross_entropy(cos, torch.arange(cos.size(0)))


def paper_info_nce(z1, z2, z3, tau: float = 0.05):
    """The paper's contrast (DAS §3.3, InfoNCE with cosine similarity), written out: for anchor
    z1_i, −log( e^{cos(z1_i, z2_i)/τ} / (Σ_j e^{cos(z1_i, z2_j)/τ} + Σ_j e^{cos(z1_i, z3_j)/τ}) ),
    averaged over i (in float64)."""
    z1, z2, z3 = z1.double(), z2.double(), z3.double()
    total = 0.0
    for i in range(len(z1)):
        def e(a, b):
            return torch.exp(F.cosine_similarity(a, b, dim=0) / tau)
        positive = e(z1[i], z2[i])
        denominator = (sum(e(z1[i], z2[j]) for j in range(len(z2)))
                       + sum(e(z1[i], z3[j]) for j in range(len(z3))))
        total = total - torch.log(positive / denominator)
    return total / len(z1)


def stacked_pass(model, rows, attention, gated_from: int, view):
    """One pass over `rows` (as a DAS step runs [masked x; x; x; x]), rows from `gated_from` on
    gated by `view` the companion's way: HF's head_mask per row ([layers, rows, heads, 1, 1],
    on the attention probabilities after dropout) and `dense(h) * mask` on the FFN denses."""
    n_rows, layers = len(rows), model.config.num_hidden_layers

    def per_row(kind, width):
        gates = torch.ones(n_rows, layers, width)
        if kind in view:
            gates[gated_from:] = view[kind]
        return gates

    head = per_row("head", HEADS).permute(1, 0, 2)[..., None, None]
    intermediate, output = per_row("intermediate", 48), per_row("output", 32)
    handles = []
    for i, layer in enumerate(model.roberta.encoder.layer):
        handles.append(layer.intermediate.dense.register_forward_hook(
            lambda m, a, out, i=i: out * intermediate[:, i].unsqueeze(1)))
        handles.append(layer.output.dense.register_forward_hook(
            lambda m, a, out, i=i: out * output[:, i].unsqueeze(1)))
    try:
        return model.roberta(input_ids=rows, attention_mask=attention,
                             head_mask=head).last_hidden_state
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("pairs", ["companion", "dropout"])
def test_contrast_pairs_match_the_reference_under_dropout(tiny_suite, tmp_path, pairs):
    """Train mode, dropout on (as DAP runs): both reference losses are computed from the same
    dropout masks as the step (one stacked pass, the same seed), so they compare exactly."""
    ctx = make_ctx(tiny_suite, tmp_path)
    das = build_method("das", {"contrast_pairs": pairs, "intermediate_gate": "pre"})
    das.setup(ctx)
    das.before_domain(ctx, 0)  # the gated view: I_≤t−1 = the KL-proxy importance
    model = ctx.model.train()
    torch.manual_seed(5)
    n, length = 6, 10  # no padding, as in the companion code's 164-token chunks
    clean = torch.randint(5, len(ctx.tokenizer), (n, length))
    picked = torch.rand(n, length) < 0.3
    ids = torch.where(picked, torch.full_like(clean, ctx.tokenizer.mask_token_id), clean)
    labels = torch.where(picked, clean, torch.full_like(clean, -100))
    attention = torch.ones_like(clean)
    batch = {"input_ids": ids, "clean_input_ids": clean, "labels": labels,
             "attention_mask": attention}
    torch.manual_seed(11)
    ours = das.loss(ctx, batch, das.forward(ctx, model, batch))

    torch.manual_seed(11)
    view = {k: v.detach() for k, v in das.importance.items()}  # I_≤0, every kind (das)
    hidden = stacked_pass(model, torch.cat([ids, clean, clean, clean]), attention.repeat(4, 1),
                          3 * n, view)
    logits = model.lm_head(hidden[:n])
    mlm = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
    z1, z2, z3 = (hidden[n * k:n * (k + 1)].mean(dim=1) for k in (1, 2, 3))
    assert not torch.allclose(z1, z2, atol=1e-4)  # dropout on: two different views of x
    paper = mlm + paper_info_nce(z1, z2, z3)
    # model.py l.199-222: rows [x; x] viewed as (-1, 2, L, H), pairs of rows (2i, 2i+1)
    outputs_ori_hidden_state = hidden[n:3 * n].view(-1, 2, length, 32)
    mean_z1 = torch.mean(outputs_ori_hidden_state[:, 0], dim=1)
    mean_z2 = torch.mean(outputs_ori_hidden_state[:, 1], dim=1)
    companion = mlm + sequence_level_contrast(mean_z1, mean_z2, z3)
    reference, other = (companion, paper) if pairs == "companion" else (paper, companion)
    torch.testing.assert_close(ours.double(), reference.double(), rtol=1e-4, atol=1e-4)
    assert (ours.double() - other.double()).abs() > 1e-2  # the other pairing is rejected


# the gated view: kinds a row does not act on stay ungated -------------------------------------
def companion_layer_masks(head_impt_accumlate, intermediate_impt_accumlate,
                          output_impt_accumlate, layer_to_mask):
    """approaches/before_posttrain.py l.27-29 and l.88-93, literally."""
    head_impt = None
    intermediate_impt = None
    output_impt = None
    if 'head_mask' in layer_to_mask:
        head_impt = head_impt_accumlate
    if 'intermediate_mask' in layer_to_mask:
        intermediate_impt = intermediate_impt_accumlate
    if 'output_mask' in layer_to_mask:
        output_impt = output_impt_accumlate
    return head_impt, intermediate_impt, output_impt


def companion_pre_hidden(model, ids, attention_mask, head_mask, intermediate_mask, output_mask):
    """`outputs_pre` of networks/posttrain/model.py l.207-211: a `None` mask is skipped
    (networks/transformers/roberta.py l.176-179, 196-199, 339-341; HF's head_mask=None)."""
    handles = []
    for i, layer in enumerate(model.roberta.encoder.layer):
        if intermediate_mask is not None:
            handles.append(layer.intermediate.dense.register_forward_hook(
                lambda m, a, out, i=i: out * intermediate_mask[i]))
        if output_mask is not None:
            handles.append(layer.output.dense.register_forward_hook(
                lambda m, a, out, i=i: out * output_mask[i]))
    try:
        return model.roberta(input_ids=ids, attention_mask=attention_mask,
                             head_mask=head_mask).last_hidden_state
    finally:
        for h in handles:
            h.remove()


VIEW_ROWS = [  # preset, the companion's layer_to_mask for that row
    ("dga", "head_mask"),
    ("rq3-heads-only", "head_mask"),
    ("rq3-ffn-only", "intermediate_mask_output_mask"),
    ("rq3-companion-heads-only", "head_mask"),
    ("das", "head_mask_intermediate_mask_output_mask"),
    ("rq5-no-general", "head_mask_intermediate_mask_output_mask"),  # nothing accumulated yet
]


@pytest.mark.parametrize(("preset", "layer_to_mask"), VIEW_ROWS)
def test_gated_view_leaves_the_kinds_not_acted_on_ungated_as_the_companion(
        tiny_suite, tmp_path, preset, layer_to_mask):
    settings = read_preset(preset)
    args = {**settings.get("method_args", {}), "intermediate_gate": "pre"}
    ctx = make_ctx(tiny_suite, tmp_path, importance_batches=1)
    method = build_method(settings["method"], args)
    method.setup(ctx)
    method.before_domain(ctx, 0)  # the view of domain 0: I_≤0 = the general importance
    model = ctx.model.eval()
    torch.manual_seed(5)
    clean = torch.randint(5, len(ctx.tokenizer), (4, 10))  # no padding, as the 164-token chunks
    attention = torch.ones_like(clean)
    batch = {"input_ids": clean, "clean_input_ids": clean, "attention_mask": attention,
             "labels": torch.full_like(clean, -100)}
    ours = method.forward(ctx, model, batch).extra["views"][2]  # z3, the gated view

    # softmask.accumulate_impt (softmask.py l.147-158): None while nothing was saved
    none = method.args.general_importance == "none"
    accumulated = [None if none else method.importance[k].detach() for k in
                   ("head", "intermediate", "output")]
    with torch.no_grad():
        reference = companion_pre_hidden(
            model, clean, attention,
            *companion_layer_masks(*accumulated, layer_to_mask)).mean(dim=1)
        torch.testing.assert_close(ours.detach(), reference, rtol=1e-5, atol=1e-5)
        # the former view: every kind the row does not act on (all, before any importance)
        # multiplied by 0
        zeroed = {k: (torch.zeros_like(v) if none or k not in method.args.units else v)
                  for k, v in method.mask().items()}
        wrong = companion_pre_hidden(model, clean, attention, zeroed["head"],
                                     zeroed["intermediate"], zeroed["output"]).mean(dim=1)
    if none or set(method.args.units) != {"head", "intermediate", "output"}:
        assert not torch.allclose(wrong, reference, atol=1e-3)
    # soft-masking leaves the kinds not acted on (1 − 0), everything before any importance
    for kind, values in method._mask.items():
        if none or kind not in method.args.units:
            assert not values.any(), kind


# 2. KL proxy -------------------------------------------------------------------------------
def distill_kl(y_s, y_t, T=1.0):
    """utils/model.py l.217-222, called as kd_loss(teacher, student) (model.py l.66)."""
    p_s = F.log_softmax(y_s / T, dim=1)
    p_t = F.softmax(y_t / T, dim=1)
    return F.kl_div(p_s, p_t, reduction="sum") * (T ** 2) / y_s.shape[0]


def test_kl_proxy_companion_matches_before_distill(tiny_suite, tmp_path):
    ctx = make_ctx(tiny_suite, tmp_path, importance_batches=2)
    perturb(ctx.model)  # student ≠ θ0 so the loss is not 0 (see the next test)
    das = build_method("das", {"kl_proxy": "companion", "importance_form": "companion-cumulative",
                               "intermediate_gate": "pre"})
    das.setup(ctx)
    ours = das._compute(ctx, ctx.corpus(0), "kl", seed=11)
    assert ctx.model.training  # the mode is restored

    student, teacher = ctx.model.eval(), ctx.base_model().eval()

    def before_distill(batch, m):  # model.py l.53-66: masked input, same masks for both
        ids, mask = batch["input_ids"], batch["attention_mask"]
        return distill_kl(companion_hidden(teacher, ids, mask, m),
                          companion_hidden(student, ids, mask, m))

    raw = compute_impt(before_distill, batches_of(ctx, 11, 2), masks())
    for kind in ours:
        torch.testing.assert_close(ours[kind], impt_norm(raw[kind]), rtol=1e-4, atol=1e-4)
    dropout_form = build_method("das", {"intermediate_gate": "pre"})
    dropout_form.setup(ctx)
    paper = dropout_form._compute(ctx, ctx.corpus(0), "kl", seed=11)
    assert not torch.allclose(paper["head"], ours["head"], atol=1e-2)


def test_kl_proxy_companion_importance_at_theta0_is_rounding_noise(tiny_suite, tmp_path,
                                                                  monkeypatch):
    """Before domain 0 the student is θ0: in eval mode the KL and its gradient are 0 up to
    rounding, so the companion code's general importance is z-scored rounding noise. The
    project's raw gate gradients (before the normalisation) against `compute_impt` literally:
    both ~0 at θ0; off θ0 equal and far from 0, where a teacher that follows the student (a
    copy of the current model in place of θ0) would still give ~0."""
    import methods.das as das_module

    raw = []
    monkeypatch.setattr(das_module, "normalize", lambda r: raw.append(r) or normalize(r))
    ctx = make_ctx(tiny_suite, tmp_path, importance_batches=2)
    das = build_method("das", {"kl_proxy": "companion", "importance_form": "companion-cumulative",
                               "intermediate_gate": "pre"})
    das.setup(ctx)

    def before_distill(student, teacher):  # model.py l.53-66: masked input, the same masks
        def loss(batch, m):
            ids, mask = batch["input_ids"], batch["attention_mask"]
            return distill_kl(companion_hidden(teacher, ids, mask, m),
                              companion_hidden(student, ids, mask, m))
        return loss

    def largest(importance):
        return max(float(v.abs().max()) for v in importance.values())

    das._compute(ctx, ctx.corpus(0), "kl", seed=11)  # at θ0
    teacher = ctx.base_model()
    at_theta0 = compute_impt(before_distill(ctx.model.eval(), teacher.eval()),
                             batches_of(ctx, 11, 2), masks())
    dropout_on = compute_impt(before_distill(ctx.model.train(), teacher.train()),
                              batches_of(ctx, 11, 2), masks())  # the scale of a real gradient
    scale = largest(dropout_on)
    assert largest(raw[0]) < 1e-6 * scale and largest(at_theta0) < 1e-6 * scale

    perturb(ctx.model)  # as after DAP-training: the student is no longer θ0
    das._compute(ctx, ctx.corpus(0), "kl", seed=11)
    off_theta0 = compute_impt(before_distill(ctx.model.eval(), teacher.eval()),
                              batches_of(ctx, 11, 2), masks())
    for kind in off_theta0:
        torch.testing.assert_close(raw[1][kind], off_theta0[kind], rtol=1e-3,
                                   atol=1e-6 * scale)
    assert largest(raw[1]) > 1e-3 * scale
    following = copy.deepcopy(ctx.model).eval()  # the wrong teacher: the student itself
    wrong = compute_impt(before_distill(ctx.model.eval(), following), batches_of(ctx, 11, 2),
                         masks())
    assert largest(wrong) < 1e-6 * scale


# 3. gradient aggregation ------------------------------------------------------------------
def test_companion_cumulative_counts_batch_j_n_minus_j_plus_1_times(tiny_suite, tmp_path):
    ctx = make_ctx(tiny_suite, tmp_path)
    model = ctx.model.eval()
    gates = UnitGates(model, intermediate="pre")
    batches = batches_of(ctx, 4, 3)
    ours = gate_gradients(gates, lambda b: model(input_ids=b["input_ids"],
                                                 attention_mask=b["attention_mask"],
                                                 labels=b["labels"]).loss,
                          batches, form="companion-cumulative")

    def mlm(batch, m):
        with companion_ffn_masks(model, m["intermediate"], m["output"]):
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"], head_mask=m["head"]).loss

    reference = compute_impt(mlm, batches, masks())
    for kind in ours:
        torch.testing.assert_close(ours[kind], reference[kind], rtol=1e-4, atol=1e-9)
    signed = gate_gradients(gates, lambda b: model(**{k: b[k] for k in
                                                      ("input_ids", "attention_mask", "labels")}
                                                   ).loss, batches, form="signed")
    assert not torch.allclose(ours["head"] / ours["head"].norm(),
                              signed["head"] / signed["head"].norm(), atol=1e-3)
    assert set(FORMS) == {"abs", "signed", "companion-cumulative"}


def test_importance_pass_sees_importance_batches_of_importance_batch_size(tiny_suite, tmp_path,
                                                                        monkeypatch):
    import methods.das as das_module

    # the companion's importance loader (posttrain.py l.204-209): batch_size=100
    assert build_config({}, {}).importance_batch_size == 100
    ctx = make_ctx(tiny_suite, tmp_path, importance_batches=3, importance_batch_size=5,
                   dap_batch_size=16)
    seen = []
    real = das_module.gate_gradients

    def spy(gates, loss_fn, batches, form):
        batches = list(batches)
        seen.extend(b["input_ids"].shape[0] for b in batches)
        return real(gates, loss_fn, batches, form=form)

    monkeypatch.setattr(das_module, "gate_gradients", spy)
    das = build_method("das")
    das.setup(ctx)
    das._compute(ctx, ctx.corpus(0), "kl", seed=1)
    das._compute(ctx, ctx.corpus(0), "mlm", seed=2)
    assert seen == [5] * 6  # not the DAP batch size (16)


# 4. domain-importance input ---------------------------------------------------------------
@pytest.mark.parametrize("given", ["unmasked", "masked"])
def test_domain_importance_on_unmasked_input_matches_after_mlm(tiny_suite, tmp_path, given):
    # dropout 0: the pass runs in train mode (as the companion's after_mlm does), deterministic
    ctx = make_ctx(tiny_suite, tmp_path, dropout=0.0, importance_batches=2)
    das = build_method("das", {"domain_importance_input": given, "intermediate_gate": "pre",
                               "importance_form": "companion-cumulative"})
    das.setup(ctx)
    ours = das._compute(ctx, ctx.corpus(0), "mlm", seed=21)
    model = ctx.model

    def after_mlm(batch, m):  # model.py l.68-74: inputs_ori_ids with the MLM labels
        with companion_ffn_masks(model, m["intermediate"], m["output"]):
            return model(input_ids=batch["clean_input_ids"], labels=batch["labels"],
                         attention_mask=batch["attention_mask"], head_mask=m["head"]).loss

    raw = compute_impt(after_mlm, batches_of(ctx, 21, 2), masks())
    same = all(torch.allclose(ours[k], impt_norm(raw[k]), rtol=1e-4, atol=1e-4) for k in ours)
    assert same == (given == "unmasked")


# 5. intermediate gate placement ------------------------------------------------------------
def test_intermediate_gate_pre_matches_roberta_py(tiny_suite, tmp_path):
    ctx = make_ctx(tiny_suite, tmp_path)
    perturb(ctx.model, scale=0.5)  # pre-activations well outside GELU's near-linear range
    model = ctx.model.eval()
    batch = batches_of(ctx, 5, 1)[0]
    ids, mask = batch["clean_input_ids"], batch["attention_mask"]
    torch.manual_seed(9)
    values = {k: torch.rand(v.shape) for k, v in masks(requires_grad=False).items()}
    reference = companion_hidden(model, ids, mask, values)
    results = {}
    for placement in ("pre", "post"):
        gates = UnitGates(model, intermediate=placement)
        with gates.applied(values):
            results[placement] = model.roberta(input_ids=ids, attention_mask=mask).last_hidden_state
        gates.remove()
    torch.testing.assert_close(results["pre"], reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(results["post"], reference, atol=1e-3)


# 6. soft-masking of Q/K/V -----------------------------------------------------------------
def soft_mask_gradient(model, head_impt, intermediate_impt, output_impt):
    """softmask.py l.177-210, literally (`model_ori.model.roberta` is `model.roberta` here)."""
    n_layers = model.config.num_hidden_layers
    head_size = int(model.config.hidden_size / model.config.num_attention_heads)
    for layer in range(n_layers):
        head_mask = 1 - head_impt[layer].unsqueeze(-1).repeat((1, head_size)).flatten()
        block = model.roberta.encoder.layer[layer]
        for linear in (block.attention.self.query, block.attention.self.key,
                       block.attention.self.value, block.attention.output.dense):
            linear.weight.grad *= head_mask
            linear.bias.grad *= head_mask
        intermediate_mask = 1 - intermediate_impt[layer]
        block.intermediate.dense.weight.grad *= intermediate_mask.unsqueeze(1)
        block.intermediate.dense.bias.grad *= intermediate_mask
        output_mask = 1 - output_impt[layer]
        block.output.dense.weight.grad *= output_mask.unsqueeze(1)
        block.output.dense.bias.grad *= output_mask


@pytest.mark.parametrize("qkv", ["companion", "rows"])
def test_qkv_softmask_companion_matches_soft_mask_gradient(tiny_suite, tmp_path, qkv):
    ctx = make_ctx(tiny_suite, tmp_path)
    batch = batches_of(ctx, 6, 1)[0]
    ours, reference = ctx.model, copy.deepcopy(ctx.model)
    for model in (ours, reference):
        torch.manual_seed(0)
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              labels=batch["labels"]).loss.backward()
    torch.manual_seed(7)
    importance = {k: torch.rand(v.shape) for k, v in masks(requires_grad=False).items()}
    softmask_gradients(UnitGates(ours), importance, qkv=qkv)
    soft_mask_gradient(reference, importance["head"], importance["intermediate"],
                       importance["output"])
    same = all(torch.equal(p.grad, q.grad) for p, q in
               zip(ours.parameters(), reference.parameters(), strict=True) if p.grad is not None)
    assert same == (qkv == "companion")


# 7. no gradient clipping ------------------------------------------------------------------
@pytest.mark.parametrize(("preset", "norm", "clips"),
                         [("das", None, 0), ("das-companion", None, 0), ("das", 1.0, 2)])
def test_presets_never_clip_unless_asked(tiny_suite, tmp_path, monkeypatch, preset, norm, clips):
    settings = read_preset(preset)
    if norm is not None:
        settings["max_grad_norm"] = norm
    ctx = make_ctx(tiny_suite, tmp_path, **{k: v for k, v in settings.items() if k != "method"},
                   dap_steps=2)
    das = build_method("das", ctx.config.method_args)
    das.setup(ctx)
    das.before_domain(ctx, 0)
    calls = []
    monkeypatch.setattr(ctx.accelerator, "clip_grad_norm_", lambda *a, **k: calls.append(a))
    dap_train(ctx, das, DapPlan(data=ctx.corpus(0), steps=2), 0)
    # the companion code steps right after backward and masking (update_model.py l.15-19)
    assert len(calls) == clips


def adamw_by_hand(model, batches, lr: float, max_norm: float) -> None:
    """`len(batches)` DAP steps of plain MLM: torch.optim.AdamW's update written out (betas 0.9,
    0.999, eps 1e-8, no weight decay), a linear decay without warm-up, and, when max_norm > 0,
    clip_grad_norm_'s rescaling (coef = max_norm / (‖g‖₂ + 1e-6), at most 1)."""
    params = [p for p in model.parameters() if p.requires_grad]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    steps = len(batches)
    for k, batch in enumerate(batches, start=1):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        if max_norm > 0:
            total = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in grads if g is not None]))
            coef = min(1.0, max_norm / (float(total) + 1e-6))
            grads = [None if g is None else g * coef for g in grads]
        step_lr = lr * (steps - (k - 1)) / steps
        with torch.no_grad():
            for p, g, m_, v_ in zip(params, grads, m, v, strict=True):
                if g is None:
                    continue
                m_.mul_(0.9).add_(0.1 * g)
                v_.mul_(0.999).add_(0.001 * g * g)
                m_hat, v_hat = m_ / (1 - 0.9 ** k), v_ / (1 - 0.999 ** k)
                p.sub_(step_lr * m_hat / (v_hat.sqrt() + 1e-8))


def test_dap_step_clips_only_when_max_grad_norm_is_set(tiny_suite, tmp_path):
    assert build_config({}, {}).max_grad_norm == 0  # the reference's default: no clipping
    results, by_hand = {}, {}
    for norm in (0.0, 0.05):
        ctx = make_ctx(tiny_suite, tmp_path, dropout=0.0, dap_warmup=0.0, max_grad_norm=norm)
        perturb(ctx.model, scale=0.3)  # far from θ0: a gradient norm well above 0.05
        reference = copy.deepcopy(ctx.model)
        ncl = build_method("ncl")
        ncl.setup(ctx)
        dap_train(ctx, ncl, DapPlan(data=ctx.corpus(0), steps=3), 0)
        results[norm] = ctx.model
        seed = domain_seed(ctx.config.seed, 1, 0)  # the DAP batches dap_train draws
        set_seed(seed)
        stream = ctx.mlm_batches(ctx.corpus(0), seed)
        adamw_by_hand(reference, [next(stream) for _ in range(3)], ctx.config.dap_lr, norm)
        by_hand[norm] = reference
    for norm in results:
        for (name, p), q in zip(results[norm].named_parameters(), by_hand[norm].parameters(),
                                strict=True):
            if name.endswith("key.bias"):  # its exact gradient is 0 (softmax is shift-invariant);
                continue  # Adam scales the rounding noise up to ±lr, differently per loss form
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    # the clipped update is a different one
    assert max((p - q).abs().max() for p, q in zip(by_hand[0.0].parameters(),
                                                   by_hand[0.05].parameters(),
                                                   strict=True)) > 1e-4


# presets ----------------------------------------------------------------------------------
def test_every_companion_preset_carries_all_seven_choices():
    reference = read_preset("das-companion")
    assert reference["max_grad_norm"] == 0 and len(reference["method_args"]) == 6
    for name in COMPANION_PRESETS:
        preset = read_preset(name)
        assert preset["max_grad_norm"] == 0, name
        for key, value in reference["method_args"].items():
            assert preset["method_args"][key] == value, (name, key)
        build_method(preset["method"], preset["method_args"])  # every value is valid
    pairs = read_preset("das-companion-pairs")
    assert pairs["method_args"] == {"contrast_pairs": "companion"} and "max_grad_norm" not in pairs
    groups = {g: read_preset(f"{g}-companion")["runs"] for g in ("rq3", "rq4", "rq5")}
    for group, runs in groups.items():
        published = read_preset(group)["runs"]
        assert len(runs) == len(published) and runs[0] == "das-companion", group


def test_published_defaults_are_unchanged():
    das = build_method("das")
    a = das.args
    assert (a.contrast_pairs, a.kl_proxy, a.importance_form, a.domain_importance_input,
            a.intermediate_gate, a.qkv_softmask) == ("dropout", "dropout", "abs", "masked",
                                                     "post", "rows")
    assert build_method("dga").args.units == ["head"]
    assert build_method("dga-one").args.softmask_units == ["head"]


def paper_kl_importance(model, batches):
    """The paper's general-importance proxy (DAS §3.1, DGA §3), written out: per batch, the
    model (dropout on) runs x twice in one pass over [x; x]; L = KL(softmax(h1) ‖ softmax(h2))
    of the two mean-pooled last hidden layers, / B; I = (1/N) Σ_n |∂L/∂g| with a gate g per head
    (HF's head_mask), per intermediate activation and per output neuron; then softmask.py's
    impt_norm (z-score per layer, tanh, |·|)."""
    layers = model.config.num_hidden_layers
    total = {k: torch.zeros(v.shape) for k, v in masks(layers, requires_grad=False).items()}
    count = 0
    for batch in batches:
        m = masks(layers)
        handles = []
        for i, layer in enumerate(model.roberta.encoder.layer):
            handles.append(layer.intermediate.register_forward_hook(  # after the activation
                lambda mod, a, out, g=m["intermediate"][i]: out * g))
            handles.append(layer.output.dense.register_forward_hook(
                lambda mod, a, out, g=m["output"][i]: out * g))
        ids, mask = batch["clean_input_ids"], batch["attention_mask"]
        hidden = model.roberta(input_ids=torch.cat([ids, ids]),
                               attention_mask=torch.cat([mask, mask]),
                               head_mask=m["head"]).last_hidden_state
        for h in handles:
            h.remove()
        weights = torch.cat([mask, mask]).unsqueeze(-1).float()
        h1, h2 = ((hidden * weights).sum(1) / weights.sum(1)).chunk(2)
        loss = (F.softmax(h1, -1) * (F.log_softmax(h1, -1) - F.log_softmax(h2, -1))).sum()
        loss = loss / len(h1)
        grads = torch.autograd.grad(loss, [m[k] for k in total])
        for k, g in zip(total, grads, strict=True):
            total[k] += g.abs()
        count += 1
    return {k: impt_norm(v / count) for k, v in total.items()}


def test_dga_one_starts_every_domain_from_theta0_with_that_domains_importance(tiny_suite,
                                                                           tmp_path):
    ctx = make_ctx(tiny_suite, tmp_path)
    dga = build_method("dga-one")
    dga.setup(ctx)
    perturb(ctx.model)  # as if domain 0 had been trained
    torch.manual_seed(0)  # the KL proxy's dropout
    dga.before_domain(ctx, 1)
    for p, q in zip(ctx.model.parameters(), ctx.base_model().parameters(), strict=True):
        assert torch.equal(p, q)
    cfg = ctx.config

    def reference(t: int):
        torch.manual_seed(0)
        stream = ctx.mlm_batches(ctx.corpus(t), cfg.seed + 7 + 1, cfg.importance_batch_size)
        return paper_kl_importance(ctx.model.train(), islice(stream, cfg.importance_batches))

    expected = reference(1)  # domain 1's corpus, θ0, the seed of domain 1
    torch.testing.assert_close(dga.importance["head"], expected["head"], rtol=1e-4, atol=1e-5)
    # the wrong variant, the general importance of the first domain's corpus, is rejected
    assert not torch.allclose(dga.importance["head"], reference(0)["head"], atol=1e-3)
    assert dga.importance["intermediate"].abs().sum() == 0  # heads only
    assert (ctx.run_dir / "artifacts" / f"importance_general1_{ctx.domains[1]}.safetensors"
            ).exists()
    dga.after_domain(ctx, 1)  # no MLM importance is accumulated after a domain
    for kind in expected:
        assert torch.equal(dga.importance[kind], dga.general[kind])
    dga.save_state(tmp_path)  # the domain checkpoint holds the state
    assert (tmp_path / "method_state.safetensors").exists()
