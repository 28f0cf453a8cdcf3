"""`pool`: DAP-train once on the union of all domains' corpora; an upper-bound style reference.

The pooled model is trained before the first end task with the budget of all domains together
(T × `dap_steps`), so every task sees the same model and the forgetting rate is zero. Its DAP
budget equals `ncl`'s (T × `dap_steps` steps of `dap_batch_size`, the same tokens and FLOPs),
recorded as `dap_steps` [T × `dap_steps`, 0, …] and in the record's `compute["dap"]`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from datasets import concatenate_datasets

from methods import DapPlan, Method, register

if TYPE_CHECKING:
    from methods.base import Context


@register("pool")
class Pooled(Method):
    """DAP-train once on the union of all corpora (upper-bound reference)."""
    table_rank = 30

    past_tasks_unchanged = True

    @classmethod
    def config_problem(cls, config):
        if not config.dap_rewarm:
            return ("pool trains T x dap_steps on the first domain and none after, so one "
                    "schedule cannot span the sequence as dap_rewarm: false asks; use "
                    "dap_rewarm: true (its single schedule is then the whole sequence's)")
        return None

    def dap_plan(self, ctx: Context, t):
        if t > 0:
            return None
        corpora = [ctx.corpus(i) for i in range(len(ctx.domains))]
        return DapPlan(concatenate_datasets(corpora), ctx.config.dap_steps * len(corpora))
