"""EWC (Kirkpatrick et al., 2017): a quadratic penalty weighted by the diagonal Fisher of L_mlm.

After each domain the empirical diagonal Fisher is estimated on at most `fisher_sequences`
sequences of that domain's corpus: Σ_batches |B| · g_B² / sequences, as in the HAT authors'
`fisher_matrix_diag` (the companion code divides by the number of batches instead, i.e. its
Fisher is |B| times larger for the same λ). It is merged with the earlier ones:
`mean` (the companion code: F_≤t = (F_t + t · F_≤t−1) / (t + 1)) or `sum`. While training
domain t the loss is `L_mlm + λ/2 · Σ F_≤t−1 (θ − θ*)²`, θ* the weights at the start of domain
t, i.e. the previous domain's checkpoint, so only the Fisher is saved with the checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from methods import Method, knob, positive, register
from methods.modeling import mlm_forward


@dataclass
class Args:
    lam: float = 5000.0  # λ; the companion code's grid best
    # sequences of each domain the Fisher is estimated on
    fisher_sequences: int = knob(512, check=positive)
    # how per-domain Fishers accumulate: "mean" (companion code) or "sum"
    merge: Literal["mean", "sum"] = "mean"


@register("ewc")
class EWC(Method):
    """L_mlm + λ/2 · Σ F (θ − θ*)², F the diagonal Fisher accumulated over earlier domains."""

    Args = Args

    def __init__(self, args: Args | None = None) -> None:
        super().__init__(args)
        self.fisher: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}
        self.domains = 0  # how many domains the Fisher covers
        self.device = None

    def setup(self, ctx) -> None:
        self.device = ctx.accelerator.device

    def before_domain(self, ctx, t: int) -> None:
        self.anchor = {n: p.detach().clone() for n, p in ctx.model.named_parameters()
                       if n in self.fisher}

    def loss(self, ctx, batch: dict[str, Tensor], outputs) -> Tensor:
        if not self.fisher:
            return outputs.loss
        return outputs.loss + self.penalty(ctx.model)

    def penalty(self, model: nn.Module) -> Tensor:
        """λ/2 · Σ F (θ − θ*)² over the parameters the Fisher covers."""
        total = sum((self.fisher[n] * (p - self.anchor[n]).pow(2)).sum()
                    for n, p in model.named_parameters() if n in self.fisher)
        return self.args.lam / 2 * total

    def after_domain(self, ctx, t: int) -> None:
        fresh = diagonal_fisher(ctx, ctx.corpus(t), self.args.fisher_sequences,
                                seed=ctx.config.seed * 1009 + t)
        if not self.fisher:
            self.fisher = fresh
        elif self.args.merge == "sum":
            self.fisher = {n: self.fisher[n] + f for n, f in fresh.items()}
        else:
            k = self.domains
            self.fisher = {n: (f + k * self.fisher[n]) / (k + 1) for n, f in fresh.items()}
        self.domains += 1

    def state_dict(self) -> dict[str, Tensor]:
        state = {f"fisher.{n}": f for n, f in self.fisher.items()}
        state["domains"] = torch.tensor([self.domains])
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.domains = int(state["domains"][0]) if "domains" in state else 0
        self.fisher = {k.removeprefix("fisher."): v.to(self.device) for k, v in state.items()
                       if k.startswith("fisher.")}


def diagonal_fisher(ctx, data, sequences: int, seed: int) -> dict[str, Tensor]:
    """Empirical diagonal Fisher of L_mlm on at most `sequences` sequences of `data`.

    Dropout stays on, as in the companion code. The model's `.grad`s are cleared afterwards.
    """
    model = ctx.model
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    batch_size = ctx.config.dap_batch_size
    wanted = min(sequences, len(data))
    batches = ctx.mlm_batches(data, seed, batch_size)
    was_training = model.training
    model.train()
    seen = 0
    for _ in range(math.ceil(wanted / batch_size)):
        batch = next(batches)
        model.zero_grad(set_to_none=True)
        mlm_forward(model, batch).loss.backward()
        size = batch["input_ids"].shape[0]
        for n, p in params.items():
            if p.grad is not None:
                fisher[n] += size * p.grad.detach().pow(2)
        seen += size
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    reduce = ctx.accelerator.reduce
    return {n: reduce(f / max(seen, 1), reduction="mean") for n, f in fisher.items()}
