"""The hand-written multi-process parts of DAP-training: each process's slice of a batch,
the gradient average, the check that the copies of the model agree."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import Tensor, nn


def shard(batch: dict[str, Tensor], rank: int, world: int) -> dict[str, Tensor]:
    """Process `rank`'s share of a batch every process drew identically (same seed)."""
    if world == 1:
        return batch
    return {k: v[rank::world] for k, v in batch.items()}


def average_gradients(params: list[nn.Parameter], world: int) -> None:
    """All-reduce the mean gradient over processes, in one flat buffer."""
    if world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def check_in_sync(model: nn.Module, accelerator: Accelerator) -> None:
    """Raise if the processes' copies of the model differ (a gradient missed the average)."""
    if accelerator.num_processes == 1:
        return
    total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
    sums = accelerator.gather(total.reshape(1).to(accelerator.device))
    if not torch.equal(sums, sums[:1].expand_as(sums)):
        raise RuntimeError(f"the processes' models diverged (parameter sums {sums.tolist()})")
