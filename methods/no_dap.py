"""`base` (the paper's "RoBERTa" row): no DAP-training; every end task starts from θ0."""

from methods import Method, register


@register("base")
class NoDap(Method):
    """No DAP-training: fine-tune θ0 on every end task."""
    table_rank = 10
    dap_cost = None

    past_tasks_unchanged = True

    def dap_plan(self, ctx, t):
        return None
