"""`one` (DAP-RoBERTa): each domain DAP-trained on its own, from θ0; task i uses model i.

Budget: `dap_steps` steps of `dap_batch_size` per domain, T × `dap_steps` in all, the same DAP
tokens and FLOPs as `ncl` (recorded per domain in `dap_steps` and in total in the record's
`compute["dap"]`); past tasks are not fine-tuned again (their models do not change), so its
end-task compute is T fine-tunings against ncl's T (T + 1) / 2 (`eval_matrix: full`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from methods import Method, register
from methods.modeling import copy_weights

if TYPE_CHECKING:
    from methods.base import Context


@register("one")
class OnePerDomain(Method):
    """DAP-train each domain alone from θ0; task i uses its own model."""
    table_rank = 20

    past_tasks_unchanged = True

    def before_domain(self, ctx: Context, t):
        copy_weights(ctx.model, ctx.base_model())
