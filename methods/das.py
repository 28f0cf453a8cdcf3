"""DAS (Ke et al., ICLR 2023): soft-masking by unit importance + contrastive knowledge integration.

Before the first domain, the KL proxy (the model against itself under two dropout masks) gives
the importance of every unit for general knowledge. While training domain t, each unit's
parameter gradients are scaled by (1 − I_≤t−1); the MLM loss is joined by an InfoNCE loss that
contrasts the full model's representation with the "previous knowledge" model (every unit
multiplied by its importance). After domain t, the MLM loss gives the domain's importance,
accumulated by element-wise max. The arguments express the paper's ablations (RQ3–RQ5).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from itertools import islice
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from methods import Method, knob, positive, register
from methods.gates import (
    KINDS,
    Importance,
    UnitGates,
    accumulate,
    gate_gradients,
    normalize,
    softmask_gradients,
)
from methods.modeling import MLMOutput, encoder_of, masked_lm_loss, mean_pool, mlm_forward

log = logging.getLogger(__name__)
Kind = Literal["head", "intermediate", "output"]  # gates.KINDS


@dataclass
class Args:
    """The paper's settings: contrastive temperature 0.05, weight 1; |grad| importance."""

    units: list[Kind] = field(default_factory=lambda: list(KINDS))  # unit kinds DAS acts on
    softmask: bool = True  # RQ3: false = no soft-masking
    softmask_units: list[Kind] = field(default_factory=lambda: list(KINDS))  # RQ3 heads/FFN only
    # abs: mean |∂L/∂g| (paper); signed: companion code's sum
    importance_form: Literal["abs", "signed"] = "abs"
    # none | permute (RQ3 random) | binary (RQ3 hard mask)
    importance_transform: Literal["none", "permute", "binary"] = "none"
    hard_threshold: float = 0.5
    # kl | mlm (general corpus) | random | none (RQ5)
    general_importance: Literal["kl", "mlm", "random", "none"] = "kl"
    contrast: Literal["full", "past-only", "general-only", "none"] = "full"  # RQ4
    contrast_weight: float = 1.0
    temperature: float = knob(0.05, check=positive)
    gated_view_grad: bool = True  # false: a faster variant with a detached gated view



def info_nce(anchor: Tensor, positive: Tensor, negatives: Tensor, temperature: float) -> Tensor:
    """InfoNCE with cosine similarity: anchor i against positive i, other positives, negatives."""
    a = F.normalize(anchor, dim=-1)
    candidates = F.normalize(torch.cat([positive, negatives]), dim=-1)
    logits = a @ candidates.T / temperature
    return F.cross_entropy(logits, torch.arange(len(anchor), device=anchor.device))


@register("das")
class DAS(Method):
    """Soft-masking of units by importance (KL proxy + domains) and contrastive integration."""

    Args = Args

    def setup(self, ctx) -> None:
        self.gates = UnitGates(ctx.model)
        self.general: Importance | None = None
        self.importance: Importance | None = None  # I_≤t, accumulated
        self._history: list[int] = []  # domains whose importance is accumulated

    # -- importance ----------------------------------------------------------------------
    def _compute(self, ctx, data, loss_kind: str, seed: int) -> Importance:
        model = ctx.model
        was_training = model.training
        model.train()  # dropout on: in eval mode the KL proxy's gradient is exactly zero
        batches = islice(ctx.mlm_batches(data, seed), ctx.config.importance_batches)

        def kl_proxy(batch: dict[str, Tensor]) -> Tensor:
            ids, mask = batch["clean_input_ids"], batch["attention_mask"]
            hidden = encoder_of(model)(input_ids=torch.cat([ids, ids]),
                                       attention_mask=torch.cat([mask, mask])).last_hidden_state
            z1, z2 = mean_pool(hidden, torch.cat([mask, mask])).chunk(2)
            return F.kl_div(F.log_softmax(z2, -1), F.log_softmax(z1, -1), log_target=True,
                            reduction="batchmean")

        def mlm(batch: dict[str, Tensor]) -> Tensor:
            return mlm_forward(model, batch).loss

        raw = gate_gradients(self.gates, kl_proxy if loss_kind == "kl" else mlm, batches,
                             signed=self.args.importance_form == "signed")
        model.train(was_training)
        for kind, values in raw.items():
            if not torch.isfinite(values).all() or not values.abs().sum() > 0:
                raise RuntimeError(f"das: {loss_kind} importance of {kind} units is all zero or "
                                   "not finite; is dropout off in the model config?")
        return self._keep_units(normalize(raw))

    def _keep_units(self, importance: Importance) -> Importance:
        """Zero the kinds DAS does not act on, so they are neither masked nor gated."""
        return {k: v if k in self.args.units else torch.zeros_like(v)
                for k, v in importance.items()}

    def _general_importance(self, ctx) -> Importance:
        kind = self.args.general_importance
        seed = ctx.config.seed + 7
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

    def _save(self, ctx, name: str, importance: Importance) -> None:
        ctx.save_artifact(f"importance_{name}.safetensors", importance)

    def mask(self) -> Importance:
        """I_≤t−1 as used for soft-masking and the gated view, after the RQ3 transforms."""
        imp = self.importance
        transform = self.args.importance_transform
        if transform == "permute":
            rng = torch.Generator().manual_seed(len(self._history) + 1)
            imp = {k: v.flatten()[torch.randperm(v.numel(), generator=rng)].view_as(v)
                   for k, v in imp.items()}
        elif transform == "binary":
            imp = {k: (v > self.args.hard_threshold).float() for k, v in imp.items()}
        return self._keep_units(imp)

    # -- the loop's moments -------------------------------------------------------------
    def before_domain(self, ctx, t: int) -> None:
        if self.importance is None:
            self.general = self._general_importance(ctx)
            self.importance = accumulate(None, self.general)
            self._save(ctx, "general", self.general)
        self._mask = {k: v.to(ctx.accelerator.device) for k, v in self.mask().items()}
        general = self.general if self.args.contrast == "general-only" else None
        self._view = {k: v.to(ctx.accelerator.device) for k, v in
                      (self._keep_units(general) if general else self._mask).items()}

    def _views(self) -> list[str]:
        """The contrast views of each example: 'full' (ungated) or 'gated' (previous knowledge)."""
        if self.args.contrast == "past-only":
            return ["gated", "gated"]
        if self.args.gated_view_grad:
            return ["full", "full", "gated"]
        return ["full", "full"]  # the gated view runs separately, without gradient

    def forward(self, ctx, model, batch: dict[str, Tensor]) -> MLMOutput:
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

    def loss(self, ctx, batch: dict[str, Tensor], outputs: MLMOutput) -> Tensor:
        if "views" not in outputs.extra:
            return outputs.loss
        z = outputs.extra["views"]
        if self.args.contrast == "past-only":  # previous-knowledge views only (SimCSE-like)
            contrast = info_nce(z[0], z[1], z[1][:0], self.args.temperature)
        else:  # anchor full_i, positive full'_i, negatives full'_j (j≠i) and all gated_j
            contrast = info_nce(z[0], z[1], z[2], self.args.temperature)
        return outputs.loss + self.args.contrast_weight * contrast

    def after_backward(self, ctx) -> None:
        if self.args.softmask:
            softmask_gradients(self.gates, self._mask, self.args.softmask_units)

    def after_domain(self, ctx, t: int) -> None:
        domain = self._compute(ctx, ctx.corpus(t), "mlm", ctx.config.seed + 100 + t)
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
