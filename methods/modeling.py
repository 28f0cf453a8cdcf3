"""Model helpers shared by the harness and the methods, for stock BERT/RoBERTa-family masked LMs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class MLMOutput:
    loss: Tensor
    hidden: Tensor  # last hidden layer of the masked input, [batch, length, width]
    extra: dict[str, Tensor] = field(default_factory=dict)  # a method's other views or losses


def encoder_of(model: nn.Module) -> nn.Module:
    """The transformer body (`BertModel`, `RobertaModel`, ...) of a masked LM."""
    return model.base_model


def mlm_head_of(model: nn.Module) -> nn.Module:
    """The LM head: `cls` for BERT, `lm_head` for RoBERTa-family models."""
    for name in ("cls", "lm_head", "predictions"):
        head = getattr(model, name, None)
        if head is not None:
            return head
    raise TypeError(f"{type(model).__name__} has no masked-LM head (cls / lm_head)")


def mlm_forward(model: nn.Module, batch: dict[str, Tensor]) -> MLMOutput:
    """Masked-LM loss computing the vocabulary projection only at masked positions.

    The loss and its gradient equal the stock model's (positions with label -100 do not
    contribute to either); skipping the other positions halves a step on a real vocabulary.
    """
    hidden = encoder_of(model)(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    return MLMOutput(loss=masked_lm_loss(model, hidden, batch["labels"]), hidden=hidden)


def masked_lm_loss(model: nn.Module, hidden: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of the LM head, run only where `labels` is not -100."""
    picked = labels != -100
    if not picked.any():
        return hidden.sum() * 0.0
    return F.cross_entropy(mlm_head_of(model)(hidden[picked]).float(), labels[picked])


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """`h(x)`: the mean of the last hidden layer over non-padding tokens."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def copy_weights(target: nn.Module, source: nn.Module) -> None:
    """Load `source`'s parameters and buffers into `target` in place (same architecture)."""
    target.load_state_dict(source.state_dict())
