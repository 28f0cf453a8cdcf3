"""`ncl-lora` (beyond the paper): one LoRA module (peft) trained through the sequence, LM frozen."""

from methods import register
from methods.isolation import IsolationMethod, LoraArgs


@register("ncl-lora")
class NclLora(IsolationMethod):
    """One shared LoRA module (peft) trained domain after domain, LM frozen."""
    table_rank = 90

    Args = LoraArgs
    kind = "lora"
    per_domain = False
