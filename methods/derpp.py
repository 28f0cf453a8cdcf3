"""DER++ (Buzzega et al., 2020): replay with stored dark knowledge plus the replayed MLM loss.

Every DAP batch is offered to a reservoir buffer with the last hidden states (or MLM logits)
the model produced for it at that step. Every `replay_every` steps two independent minibatches
are drawn from the buffer: `alpha · MSE(now, stored)` on the first, `beta · L_mlm` on the
second (their stored masks and labels), added to the current batch's MLM loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from methods import Method, knob, positive, register
from methods.buffer import ReservoirBuffer
from methods.modeling import mlm_forward, mlm_head_of


@dataclass
class Args:
    """Buffer of 500 sequences, α = 0.2, β = 0.5: Mammoth's best_args for DER++ with a
    500-sample buffer on Seq-CIFAR-10 and Seq-TinyImageNet; replay on every step."""

    buffer_size: int = knob(500, check=positive)  # sequences
    alpha: float = 0.2  # weight of the MSE to the stored outputs
    beta: float = 0.5  # weight of the replayed MLM loss
    replay_every: int = knob(1, check=positive)  # replay on every k-th DAP step
    replay_batch_size: int = 0  # 0: the DAP batch size
    # what is stored and matched: "hidden" or "logits" (L × vocab each)
    target: Literal["hidden", "logits"] = "hidden"


@register("derpp")
class DERpp(Method):
    """Reservoir replay of earlier sequences: α · MSE to stored outputs + β · replayed MLM."""

    Args = Args

    def __init__(self, args: Args | None = None) -> None:
        super().__init__(args)
        self.buffer = ReservoirBuffer(self.args.buffer_size)
        self.device = None

    def setup(self, ctx) -> None:
        self.buffer = ReservoirBuffer(self.args.buffer_size, seed=ctx.config.seed)
        self.device = ctx.accelerator.device

    def loss(self, ctx, batch: dict[str, Tensor], outputs) -> Tensor:
        loss = outputs.loss
        if len(self.buffer) and ctx.step % self.args.replay_every == 0:
            loss = loss + self.replay_loss(ctx.model, ctx.config.dap_batch_size)
        self.store(ctx, batch, outputs.hidden)
        return loss

    def replay_loss(self, model, batch_size: int) -> Tensor:
        n = self.args.replay_batch_size or batch_size
        memory = _trim(self.buffer.sample(n))
        hidden = mlm_forward(model, memory).hidden
        now = mlm_head_of(model)(hidden) if self.args.target == "logits" else hidden
        valid = memory["attention_mask"].unsqueeze(-1).to(now.dtype)
        error = F.mse_loss(now, memory["target"].to(now.dtype), reduction="none") * valid
        mse = error.sum() / (valid.sum() * now.shape[-1]).clamp(min=1.0)
        mlm = mlm_forward(model, _trim(self.buffer.sample(n))).loss
        return self.args.alpha * mse + self.args.beta * mlm

    @torch.no_grad()
    def store(self, ctx, batch: dict[str, Tensor], hidden: Tensor) -> None:
        rows, slots = self.buffer.reserve(batch["input_ids"].shape[0])
        if not rows:
            return
        index = torch.tensor(rows, device=hidden.device)
        target = hidden[index]
        if self.args.target == "logits":
            target = mlm_head_of(ctx.model)(target)
        width = ctx.config.max_length  # a fixed length, so every stored row has one shape
        pad_id = ctx.tokenizer.pad_token_id
        self.buffer.write(slots, {
            "input_ids": _pad(batch["input_ids"][index], width, pad_id),
            "attention_mask": _pad(batch["attention_mask"][index], width, 0),
            "labels": _pad(batch["labels"][index], width, -100),
            "target": _pad(target.float(), width, 0.0),
            "domain": torch.full((len(rows),), ctx.t, dtype=torch.long, device=hidden.device),
        })

    def state_dict(self) -> dict[str, Tensor]:
        return self.buffer.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state:
            self.buffer.load_state_dict(state, device=self.device)


def _pad(values: Tensor, width: int, fill) -> Tensor:
    """Pad or cut dimension 1 to `width`."""
    if values.shape[1] >= width:
        return values[:, :width]
    shape = (values.shape[0], width - values.shape[1], *values.shape[2:])
    return torch.cat([values, values.new_full(shape, fill)], dim=1)


def _trim(memory: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop the padding columns no sampled sequence uses."""
    length = max(int(memory["attention_mask"].sum(1).max()), 1)
    return {k: v[:, :length] if v.dim() > 1 else v for k, v in memory.items()}
