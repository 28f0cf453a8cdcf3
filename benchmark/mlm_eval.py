"""The MLM loss of a model over held-out text with fixed masks (no gradient)."""

from __future__ import annotations

import torch
from datasets import Dataset
from torch import nn

from benchmark.data import mlm_loader
from methods.modeling import mlm_forward


@torch.no_grad()
def mlm_eval_loss(ctx, model: nn.Module, data: Dataset, seed: int = 0) -> float:
    """Mean MLM loss over `data` with fixed masks (general-knowledge retention)."""
    model.eval()
    loader = mlm_loader(data, ctx.tokenizer, 128, ctx.config.mlm_probability, seed, shuffle=False)
    total, count = 0.0, 0
    for batch in loader:
        batch = {k: v.to(ctx.accelerator.device) for k, v in batch.items()}
        n = int((batch["labels"] != -100).sum())
        total += float(mlm_forward(model, batch).loss) * n
        count += n
    return total / max(count, 1)
