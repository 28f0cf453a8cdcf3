"""`joint`: after each domain t, re-train from θ0 on the union of domains 0 … t (an oracle).

The "re-train on everything" reference of Ibrahim et al. (TMLR 2024, "Simple and Scalable
Strategies to Continually Pre-train Large Language Models"): before domain t the model is reset
to θ0 and DAP-trained on the union of the corpora of domains 0 … t with t + 1 times the
per-domain budget, (t + 1) · `dap_steps` steps of `dap_batch_size` (sequences drawn uniformly
from the union, so each domain in proportion to its corpus). Every task is then evaluated on that
model, so later domains do change earlier tasks' models (unlike `pool`, trained once on all
domains, and `one`, one model per domain). Under `dap_rewarm: true` each re-training has its own
warm-up and decay over its (t + 1) · `dap_steps` steps.

Its cost: T (T + 1) / 2 times `dap_steps` DAP steps in all, against T times for `ncl`: 21
against 6 domain budgets for T = 6, 3.5 times ncl's DAP compute. syn6 default: 21 × 100 =
2,100 steps (ncl: 600); real6 default: 21 × 60 = 1,260 steps of batch 16 (ncl: 360), its probe
profile 21 × 140 = 2,940 (ncl: 840), so 3.5 times ncl's DAP hours on a CPU; das6: 21 × 2,580 =
54,180 steps of batch 248. Meant for syn6: the grid `syn6-baselines` runs it there. The budget
is recorded per domain in `dap_steps` ((t + 1) · `dap_steps`) and in tokens and FLOPs in the
record's `compute["dap"]` (`table --compute`: × ncl ≈ 3.5 at T = 6).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from datasets import concatenate_datasets

from methods import DapPlan, Method, register
from methods.modeling import copy_weights

if TYPE_CHECKING:
    from methods.base import Context


@register("joint")
class JointRetrain(Method):
    """After each domain t, re-train from θ0 on domains 0..t with (t+1)× the budget (oracle)."""
    table_rank = 25

    @classmethod
    def config_problem(cls, config):
        if not config.dap_rewarm:
            return ("joint trains (t + 1) x dap_steps on domain t, so one schedule cannot span "
                    "the sequence as dap_rewarm: false asks; use dap_rewarm: true")
        return None

    def before_domain(self, ctx: Context, t):
        copy_weights(ctx.model, ctx.base_model())

    def dap_plan(self, ctx: Context, t):
        corpora = [ctx.corpus(i) for i in range(t + 1)]
        data = corpora[0] if t == 0 else concatenate_datasets(corpora)
        return DapPlan(data, ctx.config.dap_steps * (t + 1))
