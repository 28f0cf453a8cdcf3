"""`one` (DAP-RoBERTa): each domain DAP-trained on its own, from θ0; task i uses model i."""

from methods import Method, register
from methods.modeling import copy_weights


@register("one")
class OnePerDomain(Method):
    """DAP-train each domain alone from θ0; task i uses its own model."""
    table_rank = 20

    past_tasks_unchanged = True

    def before_domain(self, ctx, t):
        copy_weights(ctx.model, ctx.base_model())
