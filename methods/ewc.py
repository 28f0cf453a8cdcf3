"""EWC (Kirkpatrick et al., 2017): a quadratic penalty weighted by the diagonal Fisher of the loss.

While training domain t the loss is `L_mlm + λ/2 · Σ F_≤t−1 (θ − θ*)²`, θ* the weights at the
start of domain t (the previous domain's checkpoint, so only the Fisher is saved with the
checkpoint). After each domain a diagonal Fisher is estimated on `fisher_sequences` sequences
of that domain's corpus in batches of `fisher_batch_size`, and merged with the earlier ones.

`fisher_form: companion` (default) computes it as the companion code does (UIC-Liu-Lab/
ContinualLM, commit 57e498c, `networks/baselines/ewc.py`):
- l.30–50: per batch B, `g_B` is the gradient of the batch's loss, the model in train mode
  (dropout on), and `F += |B| · g_B²`;
- l.36 with `networks/posttrain/model.py` l.100–110: that loss is the model's training loss,
  `L_mlm` **plus the EWC penalty** towards the previous domain (zero for the first domain);
- l.52–54: the sum is divided by the **number of batches** (`len(train_dataloader_prune)`),
  not of sequences, so F is about |B| times the per-sequence mean (λ = 5000 was tuned on it);
- l.59–62: domains merge as a running mean, `F_≤t = (F_t + t · F_≤t−1) / (t + 1)` (the code
  reads the domain index from `args.ft_task`, which its post-training script leaves unset,
  config.py l.217; the evident intent, t = the domain index, is what runs here);
- `posttrain.py` l.204–208: batches of 100 from the domain's first 10,000 sequences (here
  `fisher_sequences` = 512 by default, drawn at random, to keep runs short: the division by
  the number of batches makes F's scale independent of how many batches are drawn);
- `utils/model.py` l.300–301: λ = 5000, the best of the authors' grid.

`fisher_form: per-sequence` is the form of the HAT authors' `fisher_matrix_diag`: the
gradient of `L_mlm` alone, `Σ_B |B| · g_B²` divided by the number of sequences
(`fisher_batch_size: 0` batches the Fisher pass as the DAP steps are batched).
`merge: sum` adds the domains' Fishers instead of averaging them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from methods import Method, knob, non_negative, positive, register
from methods.modeling import mlm_forward

if TYPE_CHECKING:
    from methods.base import Context


@dataclass
class Args:
    lam: float = knob(5000.0, "λ; the companion code's grid best")
    fisher_form: Literal["companion", "per-sequence"] = knob(
        "companion",
        "\"companion\" (Σ|B|g²/batches, penalty in) or \"per-sequence\"")
    fisher_sequences: int = knob(
        512,
        "sequences of each domain the Fisher is estimated on", check=positive)
    fisher_batch_size: int = knob(
        100,
        "the companion code's 100; 0: the DAP batch size", check=non_negative)
    merge: Literal["mean", "sum"] = knob(
        "mean",
        "how per-domain Fishers accumulate: \"mean\" (companion code) or \"sum\"")


@register("ewc")
class EWC(Method):
    """L_mlm + λ/2 · Σ F (θ − θ*)², F the diagonal Fisher accumulated over earlier domains."""
    table_rank = 100

    Args = Args

    def __init__(self, args: Args | None = None) -> None:
        super().__init__(args)
        self.fisher: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}
        self.domains = 0  # how many domains the Fisher covers
        self.device = None

    def setup(self, ctx: Context) -> None:
        self.device = ctx.accelerator.device

    def before_domain(self, ctx: Context, t: int) -> None:
        self.anchor = {n: p.detach().clone() for n, p in ctx.model.named_parameters()
                       if n in self.fisher}

    def loss(self, ctx: Context, batch: dict[str, Tensor], outputs) -> Tensor:
        if not self.fisher:
            return outputs.loss
        return outputs.loss + self.penalty(ctx.model)

    def penalty(self, model: nn.Module) -> Tensor:
        """λ/2 · Σ F (θ − θ*)² over the parameters the Fisher covers."""
        total = sum((self.fisher[n] * (p - self.anchor[n]).pow(2)).sum()
                    for n, p in model.named_parameters() if n in self.fisher)
        return self.args.lam / 2 * total

    def after_domain(self, ctx: Context, t: int) -> None:
        companion = self.args.fisher_form == "companion"
        fresh = diagonal_fisher(
            ctx, ctx.corpus(t), self.args.fisher_sequences, seed=ctx.seed_for("fisher", t),
            batch_size=self.args.fisher_batch_size or ctx.config.dap_batch_size,
            per_batch=companion, penalty=self.penalty if companion and self.fisher else None)
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


def diagonal_fisher(ctx: Context, data, sequences: int, seed: int, batch_size: int | None = None,
                    per_batch: bool = False, penalty=None) -> dict[str, Tensor]:
    """Empirical diagonal Fisher `Σ_B |B| · g_B²` on batches of `data` covering `sequences`.

    `g_B` is the gradient of the batch's `L_mlm` (plus `penalty(model)` when given), the model
    in train mode (dropout on), as in the companion code. The sum is divided by the number of
    batches (`per_batch`, the companion code) or of sequences. The `.grad`s are cleared after.
    """
    model = ctx.model
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    batch_size = batch_size or ctx.config.dap_batch_size
    wanted = min(sequences, len(data))
    batches = ctx.mlm_batches(data, seed, batch_size)
    was_training = model.training
    model.train()
    seen, count = 0, 0
    for _ in range(math.ceil(wanted / batch_size)):
        batch = next(batches)
        model.zero_grad(set_to_none=True)
        loss = mlm_forward(model, batch).loss
        if penalty is not None:
            loss = loss + penalty(model)
        loss.backward()
        size = batch["input_ids"].shape[0]
        for n, p in params.items():
            if p.grad is not None:
                fisher[n] += size * p.grad.detach().pow(2)
        seen += size
        count += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    reduce = ctx.accelerator.reduce
    norm = max(count if per_batch else seen, 1)
    return {n: reduce(f / norm, reduction="mean") for n, f in fisher.items()}
