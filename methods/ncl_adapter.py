"""`ncl-adapter`: one bottleneck adapter trained through the whole sequence, LM frozen."""

from methods import register
from methods.isolation import AdapterArgs, IsolationMethod


@register("ncl-adapter")
class NclAdapter(IsolationMethod):
    """One shared bottleneck adapter (AdapterHub `adapters`) trained domain after domain."""
    table_rank = 80

    Args = AdapterArgs
    kind = "adapter"
    per_domain = False
