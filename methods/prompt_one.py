"""`prompt-one` (DAP-Prompt): a soft prompt per domain appended after the real tokens, LM frozen.

End task i runs with prompt i after its real tokens, which keep positions 0…L−1; the encoder
returns the real tokens' states only, so the end-task head reads the real first token. The
prompt follows the companion code (DGA `networks/prompt.py` l.64 and `networks/roberta_model.py`
l.43–51: appended, 100 tokens, U(−0.5, 0.5)); see `methods.isolation.SoftPrompts`. Needs the
domain ID at end-task time. At end-task time the LM is frozen, the prompt and the head train
(ContinualLM `utils/model.py` l.373-380); `prompt_finetune: companion` fine-tunes a fresh
prepended prompt instead, as the companion does (see `PromptArgs`).
"""

from methods import register
from methods.isolation import IsolationMethod, PromptArgs


@register("prompt-one")
class PromptOne(IsolationMethod):
    """A soft prompt per domain appended after the real tokens, LM frozen; task i uses prompt i."""
    table_rank = 50

    Args = PromptArgs
    kind = "prompt"
    per_domain = True
    needs_domain_id = True
    past_tasks_unchanged = True
