"""DAS (Ke et al., ICLR 2023): soft-masking by unit importance + contrastive knowledge integration.

Before the first domain, the KL proxy (the model against itself under two dropout masks) gives
the importance of every unit for general knowledge. While training domain t, each unit's
parameter gradients are scaled by (1 − I_≤t−1); the MLM loss is joined by an InfoNCE loss that
contrasts the full model's representation with the "previous knowledge" model (every unit of
the kinds in `units` multiplied by its importance, the other kinds left ungated). After domain
t, the MLM loss gives the domain's importance, accumulated by element-wise max. The arguments
express the paper's ablations (RQ3–RQ5).

DAS as published vs as released. The authors' companion code (GitHub UIC-Liu-Lab/ContinualLM,
commit 57e498c) differs from the method as the paper describes it (Ke et al. 2023, §3) in
seven places; each is an argument here whose default is the published form, so any mix runs
(the preset `das-companion` sets all seven; the seventh, no clipping, is the run default):

1. `contrast_pairs`: "dropout" (the paper: the positive is a second dropout view of the same
   sequence) or "companion": the clean batch tiled with `repeat(2, 1)` and its last hidden states
   viewed as `(-1, 2, L, H)` pair rows (2i, 2i+1) of the tiled batch, then passed positionally to
   `sequence_level_contrast(z2, z1, z3)` (`networks/posttrain/model.py` l.199-222,
   `networks/baselines/simcse.py` l.123-171): the anchor is x_(2i+1 mod B) and its "positive"
   x_(2i mod B), a different sequence. τ 0.05, no projection, gated view as extra negatives,
   weight 1 from the first domain on (`approaches/compute_gradient.py` l.30-32) are as here.
   The companion code's mean runs over all positions (`torch.mean(z, dim=1)`); its 164-token
   chunks have no padding, so this project's mean over non-padding tokens is the same there.
2. `kl_proxy`: "dropout" (the paper: the model against itself under two dropout masks, clean
   input) or "companion" (`approaches/before_posttrain.py` l.62-71, `networks/posttrain/model.py`
   l.53-66, `utils/model.py` l.210-222 `DistillKL`): the model stays in eval mode (set by
   `from_pretrained`; `softmask.py` l.70 keeps `model.train()` commented out), the student and
   a frozen copy of θ0 both see the *masked* input with the same gates, loss
   `kl_div(log_softmax(teacher, 1), softmax(student, 1), sum) / B` over dimension 1 of [B, L, H]
   (the token axis; `kd_loss(teacher, student)` binds y_s to the teacher). Measured here: when
   student and teacher are the same θ0 in eval mode, this loss is 0 up to rounding and so is its
   gradient (~1e-10 against ~1e-3 with dropout on), so the normalised "general importance" is
   the per-layer z-score of rounding noise.
3. `importance_form`: "abs" (the paper), "signed", or "companion-cumulative" (see
   `methods.gates.gate_gradients`; `networks/baselines/softmask.py` l.77-98).
4. `domain_importance_input`: "masked" (the paper: the MLM loss of the masked input) or
   "unmasked": the MLM loss on the clean input ids with the MLM labels (`approaches/
   after_posttrain.py` l.54-58, `networks/posttrain/model.py` l.68-74); it applies to every MLM
   importance pass (the domain's, and `general_importance: mlm`, the companion's `before_mlm`).
5. `intermediate_gate`: "post" (the paper) or "pre" (`networks/transformers/roberta.py`
   l.195-200, see `methods.gates.UnitGates`).
6. `qkv_softmask`: "rows" (the paper) or "companion" (`networks/baselines/softmask.py`
   l.183-197, see `methods.gates.softmask_gradients`).
7. Gradient clipping: the run config's `max_grad_norm` (0, the default, turns it off); the
   companion code never clips (`approaches/update_model.py` l.15-19 steps right after backward
   and masking).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmark.protocol import stream_seed
from methods import Method, knob, positive, register
from methods.gates import (
    KINDS,
    Form,
    Importance,
    Kind,
    Placement,
    QkvSoftmask,
    UnitGates,
    accumulate,
    gate_gradients,
    normalize,
    softmask_gradients,
)
from methods.modeling import MLMOutput, encoder_of, masked_lm_loss, mean_pool, mlm_forward

if TYPE_CHECKING:
    from methods.base import Context

log = logging.getLogger(__name__)


@dataclass
class Args:
    """The paper's settings: contrastive temperature 0.05, weight 1; |grad| importance."""

    units: list[Kind] = knob(list(KINDS), "unit kinds DAS acts on (the companion's "
                             "layer_to_mask); the others are neither gated in the contrast's "
                             "view nor soft-masked")
    softmask: bool = knob(True, "soft-mask each unit's gradients by (1 - its accumulated "
                          "importance); false: no soft-masking (RQ3)")
    softmask_units: list[Kind] = knob(list(KINDS), "the unit kinds soft-masked (RQ3: heads or "
                                      "FFN only)")
    importance_form: Form = knob("abs", "how gate gradients become importance: abs, mean "
                                 "|dL/dg| (the paper) | signed | companion-cumulative (see "
                                 "methods.gates.gate_gradients)")
    importance_transform: Literal["none", "permute", "binary"] = knob(
        "none", "none | permute: importance shuffled over units (RQ3 random) | binary: a hard "
        "mask at hard_threshold (RQ3)")
    hard_threshold: float = knob(0.5, "the threshold of importance_transform binary")
    general_importance: Literal["kl", "mlm", "random", "none"] = knob(
        "kl", "the general-knowledge importance before the first domain: kl (the KL proxy) | "
        "mlm (the MLM loss on the general corpus) | random | none (RQ5)")
    contrast: Literal["full", "past-only", "general-only", "none"] = knob(
        "full", "what the gated view of the contrastive loss keeps: full (general and past "
        "domains) | past-only | general-only | none: no contrastive loss (RQ4)")
    contrast_weight: float = knob(1.0, "weight of the contrastive loss beside the MLM loss")
    temperature: float = knob(0.05, "InfoNCE temperature", check=positive)
    gated_view_grad: bool = knob(True, "backpropagate through the gated view; false: a faster "
                                 "variant with the gated view detached")
    contrast_pairs: Literal["dropout", "companion"] = knob(
        "dropout", "the contrastive pairs: dropout, a sequence with its second dropout view "
        "(the paper) | companion: x_2i+1 with x_2i, as the companion code (module docstring, 1)")
    kl_proxy: Literal["dropout", "companion"] = knob(
        "dropout", "the KL proxy: dropout, two dropout views of the clean input (the paper) | "
        "companion: against θ0, eval mode, masked input (module docstring, 2)")
    domain_importance_input: Literal["masked", "unmasked"] = knob(
        "masked", "the MLM loss of the importance passes on the masked input (the paper) | "
        "unmasked: on the clean input ids (the companion code; module docstring, 4)")
    intermediate_gate: Placement = knob(
        "post", "where an FFN intermediate unit's gate sits: post, after the activation (the "
        "paper) | pre: before it (the companion code; module docstring, 5)")
    qkv_softmask: QkvSoftmask = knob(
        "rows", "how a head's importance soft-masks attention: rows, the head's Q/K/V rows (the "
        "paper) | companion: Q/K/V columns and the attention-output bias (module docstring, 6)")



def companion_kl_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """The companion code's KL proxy on last hidden states [B, L, H] (`utils/model.py` l.217-222,
    called as `kd_loss(teacher, student)` in `networks/posttrain/model.py` l.66): softmax over
    dimension 1 (the token axis), KL(student ‖ teacher) summed and divided by B."""
    return F.kl_div(F.log_softmax(teacher, dim=1), F.softmax(student, dim=1),
                    reduction="sum") / teacher.shape[0]


def info_nce(anchor: Tensor, positive: Tensor, negatives: Tensor, temperature: float) -> Tensor:
    """InfoNCE with cosine similarity: anchor i against positive i, other positives, negatives."""
    a = F.normalize(anchor, dim=-1)
    candidates = F.normalize(torch.cat([positive, negatives]), dim=-1)
    logits = a @ candidates.T / temperature
    return F.cross_entropy(logits, torch.arange(len(anchor), device=anchor.device))


@register("das")
class DAS(Method):
    """Soft-masking of units by importance (KL proxy + domains) and contrastive integration."""
    table_rank = 160
    dap_cost = ("das", 1.0)
    timed_passes = {"label": "importance", "before": "KL proxy", "after": "domain importance"}

    @classmethod
    def draw_artifacts(cls, folders, domains, row, out, fmt, written):
        """The saved unit importance: `methods/importance_figures.py`."""
        from methods.importance_figures import draw_importance

        draw_importance(folders, domains, row, out, fmt, written)

    Args = Args

    def setup(self, ctx: Context) -> None:
        self.gates = UnitGates(ctx.model, intermediate=self.args.intermediate_gate)
        self.general: Importance | None = None
        self.importance: Importance | None = None  # I_≤t, accumulated
        self._history: list[int] = []  # domains whose importance is accumulated

    # -- importance ----------------------------------------------------------------------
    def _compute(self, ctx: Context, data, loss_kind: str, seed: int) -> Importance:
        model = ctx.model
        was_training = model.training
        companion_kl = loss_kind == "kl" and self.args.kl_proxy == "companion"
        # dropout on: in eval mode the paper's KL proxy has exactly zero gradient; the companion
        # code's KL proxy runs in eval mode (see the module docstring, item 2)
        model.train(not companion_kl)
        batches = islice(ctx.mlm_batches(data, seed, ctx.config.importance_batch_size),
                         ctx.config.importance_batches)

        def kl_proxy(batch: dict[str, Tensor]) -> Tensor:
            ids, mask = batch["clean_input_ids"], batch["attention_mask"]
            hidden = encoder_of(model)(input_ids=torch.cat([ids, ids]),
                                       attention_mask=torch.cat([mask, mask])).last_hidden_state
            z1, z2 = mean_pool(hidden, torch.cat([mask, mask])).chunk(2)
            return F.kl_div(F.log_softmax(z2, -1), F.log_softmax(z1, -1), log_target=True,
                            reduction="batchmean")

        teacher = teacher_gates = None
        if companion_kl:
            teacher = ctx.base_model().eval().requires_grad_(False)
            teacher_gates = UnitGates(teacher, intermediate=self.args.intermediate_gate)

        def kl_companion(batch: dict[str, Tensor]) -> Tensor:
            ids, mask = batch["input_ids"], batch["attention_mask"]
            student = encoder_of(model)(input_ids=ids, attention_mask=mask).last_hidden_state
            with teacher_gates.applied(self.gates.values):  # the same gates, with gradient
                fixed = encoder_of(teacher)(input_ids=ids, attention_mask=mask).last_hidden_state
            return companion_kl_loss(student, fixed)

        def mlm(batch: dict[str, Tensor]) -> Tensor:
            if self.args.domain_importance_input == "unmasked":
                batch = {**batch, "input_ids": batch["clean_input_ids"]}
            return mlm_forward(model, batch).loss

        loss_fn = (kl_companion if companion_kl else kl_proxy) if loss_kind == "kl" else mlm
        raw = gate_gradients(self.gates, loss_fn, batches, form=self.args.importance_form)
        model.train(was_training)
        for kind, values in raw.items():
            if not torch.isfinite(values).all() or not values.abs().sum() > 0:
                raise RuntimeError(f"das: {loss_kind} importance of {kind} units is all zero or "
                                   "not finite; is dropout off in the model config?")
        return self._keep_units(normalize(raw))

    def _keep_units(self, importance: Importance) -> Importance:
        """Zero the kinds DAS does not act on, so soft-masking leaves them (1 − 0)."""
        return {k: v if k in self.args.units else torch.zeros_like(v)
                for k, v in importance.items()}

    def _has_importance(self) -> bool:
        """Whether any importance has been computed (not so before the first domain's end with
        `general_importance: none`)."""
        return self.args.general_importance != "none" or bool(self._history)

    def view_gates(self, importance: Importance | None) -> Importance:
        """The gated view's gates: `importance` on the kinds DAS acts on; every other kind is
        left out, so its units stay ungated (gate 1), and all are when `importance` is None (none
        computed yet).

        As the companion code builds the view (ContinualLM 57e498c): `approaches/
        before_posttrain.py` l.88-93 sets only the importances named in `layer_to_mask`
        (DGA: `head_mask`), the others stay `None`; `approaches/compute_loss.py` l.35-39
        passes all three to the model, whose layers skip a `None` mask
        (`networks/transformers/roberta.py` l.176-179, 196-199, 339-341);
        `softmask.accumulate_impt` returns `None` for all three while no importance was saved
        (`networks/baselines/softmask.py` l.157-158: no general importance, first domain).
        """
        if importance is None:
            return {}
        return {k: v for k, v in importance.items() if k in self.args.units}

    def _general_importance(self, ctx: Context) -> Importance:
        kind = self.args.general_importance
        seed = ctx.seed_for("importance_general")
        if kind == "kl":
            return self._compute(ctx, ctx.corpus(0), "kl", seed)
        if kind == "mlm":
            general = ctx.general_corpus()
            if general is None:
                raise ValueError("das: general_importance=mlm needs a suite with a general corpus")
            return self._compute(ctx, general, "mlm", seed)
        if kind == "random":
            rng = torch.Generator().manual_seed(seed)
            return self._keep_units({k: torch.rand(s, generator=rng)
                                     for k, s in self.gates.shapes.items()})
        return self.gates.zeros()  # "none"

    def _save(self, ctx: Context, name: str, importance: Importance) -> None:
        ctx.save_artifact(f"importance_{name}.safetensors", importance)

    def mask(self) -> Importance:
        """I_≤t−1 as used for soft-masking (0 for the kinds not acted on) and, through
        `view_gates`, for the gated view, after the RQ3 transforms."""
        imp = self.importance
        transform = self.args.importance_transform
        if transform == "permute":
            rng = torch.Generator().manual_seed(
                stream_seed("importance_permute", 0, len(self._history)))
            imp = {k: v.flatten()[torch.randperm(v.numel(), generator=rng)].view_as(v)
                   for k, v in imp.items()}
        elif transform == "binary":
            imp = {k: (v > self.args.hard_threshold).float() for k, v in imp.items()}
        return self._keep_units(imp)  # kinds not acted on: unmasked

    # -- the loop's moments -------------------------------------------------------------
    def before_domain(self, ctx: Context, t: int) -> None:
        if self.importance is None:
            self.general = self._general_importance(ctx)
            self.importance = accumulate(None, self.general)
            self._save(ctx, "general", self.general)
        self._mask = {k: v.to(ctx.accelerator.device) for k, v in self.mask().items()}
        if self.args.contrast == "general-only":
            source = self.general if self.args.general_importance != "none" else None
        else:
            source = self.mask() if self._has_importance() else None
        self._view = {k: v.to(ctx.accelerator.device) for k, v in self.view_gates(source).items()}

    def _views(self) -> list[str]:
        """The contrast views of each example: 'full' (ungated) or 'gated' (previous knowledge)."""
        if self.args.contrast == "past-only":
            return ["gated", "gated"]
        if self.args.gated_view_grad:
            return ["full", "full", "gated"]
        return ["full", "full"]  # the gated view runs separately, without gradient

    def forward(self, ctx: Context, model, batch: dict[str, Tensor]) -> MLMOutput:
        """One forward pass over [masked x; the views of x]: the MLM loss and every view's h(x)."""
        if self.args.contrast == "none" or self.args.contrast_weight == 0:
            return super().forward(ctx, model, batch)
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        clean, n = batch["clean_input_ids"], len(ids)
        views = self._views()
        gates = {}
        for kind, view_gate in self._view.items():
            one = torch.ones_like(view_gate)
            rows = [one] * n + [view_gate if v == "gated" else one for v in views for _ in range(n)]
            gates[kind] = torch.stack(rows)
        stacked_mask = mask.repeat(len(views) + 1, 1)
        with self.gates.applied(gates):
            hidden = encoder_of(model)(input_ids=torch.cat([ids] + [clean] * len(views)),
                                       attention_mask=stacked_mask).last_hidden_state
        loss = masked_lm_loss(model, hidden[:n], labels)
        z = list(mean_pool(hidden[n:], stacked_mask[n:]).chunk(len(views)))
        if self.args.contrast != "past-only" and not self.args.gated_view_grad:
            with torch.no_grad(), self.gates.applied(self._view):
                z.append(mean_pool(encoder_of(model)(input_ids=clean, attention_mask=mask)
                                   .last_hidden_state, mask))
        return MLMOutput(loss=loss, hidden=hidden[:n], extra={"views": z})

    def loss(self, ctx: Context, batch: dict[str, Tensor], outputs: MLMOutput) -> Tensor:
        if "views" not in outputs.extra:
            return outputs.loss
        z = outputs.extra["views"]
        # anchor view_i, positive view'_i, negatives view'_j (j≠i) and (full) all gated_j
        anchor, positive = z[0], z[1]
        if self.args.contrast_pairs == "companion":  # rows (2i, 2i+1) of [x; x] are a pair
            tiled = torch.cat([z[0], z[1]])
            anchor, positive = tiled[1::2], tiled[0::2]
        # past-only: previous-knowledge views only (SimCSE-like), no extra negatives
        negatives = z[1][:0] if self.args.contrast == "past-only" else z[2]
        contrast = info_nce(anchor, positive, negatives, self.args.temperature)
        return outputs.loss + self.args.contrast_weight * contrast

    def after_backward(self, ctx: Context) -> None:
        if self.args.softmask:
            softmask_gradients(self.gates, self._mask, self.args.softmask_units,
                               qkv=self.args.qkv_softmask)

    def after_domain(self, ctx: Context, t: int) -> None:
        domain = self._compute(ctx, ctx.corpus(t), "mlm", ctx.seed_for("importance_domain", t))
        self._save(ctx, f"domain{t}_{ctx.domains[t]}", domain)
        self.importance = accumulate(self.importance, domain)
        self._save(ctx, f"accumulated{t}", self.importance)
        self._history.append(t)

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        state = {}
        for name, imp in (("general", self.general), ("accumulated", self.importance)):
            for kind, values in (imp or {}).items():
                state[f"{name}.{kind}"] = values
        state["history"] = torch.tensor(self._history, dtype=torch.long)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.general = ({k: state[f"general.{k}"] for k in KINDS}
                        if "general.head" in state else None)
        self.importance = ({k: state[f"accumulated.{k}"] for k in KINDS}
                           if "accumulated.head" in state else None)
        self._history = state["history"].tolist() if "history" in state else []
