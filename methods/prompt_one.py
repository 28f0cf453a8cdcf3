"""`prompt-one` (DAP-Prompt): a soft prompt per domain (peft prompt tuning), LM frozen.

End task i runs with prompt i prepended; the encoder drops the virtual tokens' states, so the
end-task head still reads the real first token. Needs the domain ID at end-task time.
"""

from methods import register
from methods.isolation import IsolationMethod, PromptArgs


@register("prompt-one")
class PromptOne(IsolationMethod):
    """A soft prompt per domain (peft prompt tuning), LM frozen; task i uses prompt i."""

    Args = PromptArgs
    kind = "prompt"
    per_domain = True
    needs_domain_id = True
    past_tasks_unchanged = True
