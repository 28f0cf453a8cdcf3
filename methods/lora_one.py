"""`lora-one` (beyond the paper): a LoRA module per domain (peft) on the frozen LM θ0."""

from methods import register
from methods.isolation import IsolationMethod, LoraArgs


@register("lora-one")
class LoraOne(IsolationMethod):
    """A LoRA module per domain (peft), LM frozen; task i uses LoRA i."""
    table_rank = 60

    Args = LoraArgs
    kind = "lora"
    per_domain = True
    needs_domain_id = True
    past_tasks_unchanged = True
