"""NCL: naive sequential DAP-training of the whole LM, domain after domain."""

from methods import Method, register


@register("ncl")
class NaiveContinual(Method):
    """Naive sequential DAP-training of the whole LM (plain MLM, domain after domain)."""
    table_rank = 70
