"""DGA (Ke et al., EMNLP 2022): DAS's ingredients on attention heads only, in two forms.

`dga`, the project's continual version: general importance of heads from the KL proxy,
soft-masking of head gradients by accumulated importance, and the contrast of the full model
against the head-gated one. Its defaults, in dga.yaml (which applies to every method of this
module), restrict every DAS argument that names units to attention heads; every other argument,
including the published-vs-released options of `methods.das`, is DAS's. The FFN units are left
ungated in the gated view and unmasked (`DAS.view_gates`), as the companion code's
`layer_to_mask='head_mask'` leaves them.

`dga-one`, DGA as the companion code runs it: every domain DAP-trained alone from θ0 (not
continual).

The companion code (ContinualLM 57e498c) rewrites the baseline `dga` to `dga_one`
(`utils/model.py` l.227-230 at DAP, l.315-317 at fine-tuning), and for `one` baselines it loads
θ0 for every domain (l.286-287) and keeps only that domain's importance (l.256-261): before each
domain the KL-proxy head importance is computed on that domain's data
(`approaches/before_posttrain.py` l.66-71: `pt_task == 0 or 'dga' in baseline`); no MLM
importance follows a domain (`softmask_compute = 'before_distill'`, l.229). Task i is fine-tuned
from model i, like `one`. The companion code's other choices are DAS's options (`methods.das`);
the preset `dga-one` sets them as the companion code runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from methods import register
from methods.das import DAS
from methods.gates import accumulate
from methods.modeling import copy_weights

if TYPE_CHECKING:
    from methods.base import Context


@register("dga")
class DGA(DAS):
    """DAS restricted to attention heads (KL-proxy head importance, soft-masking, contrast)."""
    table_rank = 150


@register("dga-one")
class DGAOne(DGA):
    """DGA per domain from θ0: that domain's KL-proxy head importance, soft-masking, contrast."""

    table_rank = 155
    past_tasks_unchanged = True

    def before_domain(self, ctx: Context, t: int) -> None:
        copy_weights(ctx.model, ctx.base_model())
        self.general = self._general_importance_of(ctx, t)
        self.importance = accumulate(None, self.general)  # a copy: this domain's alone
        self._save(ctx, f"general{t}_{ctx.domains[t]}", self.general)
        super().before_domain(ctx, t)

    def _general_importance_of(self, ctx: Context, t: int):
        if self.args.general_importance != "kl":
            return self._general_importance(ctx)
        return self._compute(ctx, ctx.corpus(t), "kl", ctx.seed_for("importance_dga", t))

    def _has_importance(self) -> bool:
        return self.args.general_importance != "none"  # no domain importance is ever added

    def after_domain(self, ctx: Context, t: int) -> None:
        self._history.append(t)  # no MLM importance after a domain (companion: before_distill)
