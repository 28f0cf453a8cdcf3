"""`adapter-one` (DAP-Adapter): a fresh bottleneck adapter per domain on the frozen LM θ0.

End task i is fine-tuned with adapter i active, so the domain ID is needed at end-task time.
"""

from methods import register
from methods.isolation import AdapterArgs, IsolationMethod


@register("adapter-one")
class AdapterOne(IsolationMethod):
    """A bottleneck adapter per domain (AdapterHub `adapters`), LM frozen; task i uses adapter i."""
    table_rank = 40

    Args = AdapterArgs
    kind = "adapter"
    per_domain = True
    needs_domain_id = True
    past_tasks_unchanged = True
