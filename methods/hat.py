"""HAT (Serrà et al., 2018): hard attention to the task on the transformer's units.

Domain t owns a task embedding e_t per unit (heads, FFN intermediate and output neurons, the
units of `methods.gates`). While training domain t every unit is gated by σ(s · e_t), the slope
s annealed linearly over the domain's steps from 1/s_max to s_max. After the domain its binary
mask is m_t = [σ(s_max · e_t) > 0.5] and the cumulative mask m_≤t = max(m_1, …, m_t).
While training domain t:
- the gradients of every unit in m_≤t−1 are zeroed (`softmask_gradients` with m_≤t−1 as the
  importance), so units used by earlier domains keep their weights;
- L = L_mlm + c · Σ σ(s·e_t) (1 − m_≤t−1) / Σ (1 − m_≤t−1), the sparsity regulariser;
- e_t's gradient is compensated for the annealing, × s_max/s · (cosh(clamp(s·e)) + 1) /
  (cosh(e) + 1), and e_t is clamped to ±thres_emb after every optimiser step.
End task i is fine-tuned on the encoder gated by m_i (the domain ID picks the mask).
Embeddings, LayerNorms and the attention-output bias are shared and not masked (as in DAS).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from methods import Method, register
from methods.gates import KINDS, Importance, UnitGates, softmask_gradients
from methods.modeling import encoder_of, trainable

log = logging.getLogger(__name__)


@dataclass
class Args:
    """s_max = 400, c = 0.75, thres_cosh = 50, thres_emb = 6: the companion code's defaults."""

    s_max: float = 400.0
    c: float = 0.75  # weight of the sparsity regulariser (companion code's `lamb`)
    thres_cosh: float = 50.0
    thres_emb: float = 6.0


@register("hat")
class HAT(Method):
    """Task-conditioned hard-attention gates on units; earlier domains' units are frozen."""
    table_rank = 130

    Args = Args
    needs_domain_id = True

    def __init__(self, args: Args | None = None) -> None:
        super().__init__(args)
        self.gates: UnitGates | None = None
        self.embeddings: dict[int, dict[str, nn.Parameter]] = {}
        self.masks: dict[int, Importance] = {}
        self.device = None

    def setup(self, ctx) -> None:
        self.gates = UnitGates(ctx.model)
        self.device = ctx.accelerator.device
        if ctx.config.dap_weight_decay > 0:
            log.warning("HAT: dap_weight_decay %g still shrinks the units earlier domains "
                        "claimed (AdamW decays weights whose gradient is zero)",
                        ctx.config.dap_weight_decay)

    # -- training ----------------------------------------------------------------------
    def before_domain(self, ctx, t: int) -> None:
        if t not in self.embeddings:
            generator = torch.Generator().manual_seed(ctx.config.seed * 1009 + t)
            self.embeddings[t] = {
                kind: nn.Parameter(torch.randn(shape, generator=generator).to(self.device))
                for kind, shape in self.gates.shapes.items()}
        self.gates.values = _AnnealedGates(self, ctx)

    def parameters(self, ctx) -> list[nn.Parameter]:
        return trainable(ctx.model) + list(self.embeddings[ctx.t].values())

    def slope(self, ctx) -> float:
        s_max = self.args.s_max
        progress = ctx.step / max(ctx.total_steps - 1, 1)
        return 1 / s_max + (s_max - 1 / s_max) * progress

    def cumulative(self, before: int) -> Importance | None:
        """m_≤before−1: the units any domain < `before` uses (None before the first)."""
        masks = [self.masks[i] for i in range(before) if i in self.masks]
        if not masks:
            return None
        return {k: torch.stack([m[k] for m in masks]).amax(0) for k in KINDS}

    def loss(self, ctx, batch: dict[str, Tensor], outputs) -> Tensor:
        gates = self.gates.values
        used = self.cumulative(ctx.t)
        free = {k: torch.ones_like(gates[k]) if used is None else 1 - used[k] for k in KINDS}
        taken = sum((gates[k] * free[k]).sum() for k in KINDS)
        count = sum(free[k].sum() for k in KINDS)
        return outputs.loss + self.args.c * taken / count.clamp(min=1.0)

    @torch.no_grad()
    def after_backward(self, ctx) -> None:
        used = self.cumulative(ctx.t)
        if used is not None:
            softmask_gradients(self.gates, used)
        s, a = self.slope(ctx), self.args
        for e in self.embeddings[ctx.t].values():
            if e.grad is not None:
                num = torch.cosh(torch.clamp(s * e, -a.thres_cosh, a.thres_cosh)) + 1
                e.grad.mul_(a.s_max / s * num / (torch.cosh(e) + 1))

    @torch.no_grad()
    def after_domain(self, ctx, t: int) -> None:
        self.gates.values = None
        for e in self.embeddings[t].values():
            e.clamp_(-self.args.thres_emb, self.args.thres_emb)
        self.masks[t] = {k: (torch.sigmoid(self.args.s_max * e) > 0.5).float()
                         for k, e in self.embeddings[t].items()}
        used = self.cumulative(t + 1)
        share = {k: round(float(used[k].mean()), 3) for k in KINDS}
        log.info("HAT: share of units used by domains ≤ %d: %s", t, share)

    # -- end tasks -----------------------------------------------------------------------
    def model_for_task(self, ctx, i: int) -> nn.Module:
        """A copy of the encoder whose units are gated by m_i in every forward.

        The copy's gate hooks close over their own `UnitGates`; copies of the copy (the loop
        fine-tunes one) keep those hooks, since `copy.deepcopy` shares functions.
        """
        encoder = copy.deepcopy(encoder_of(ctx.model))
        UnitGates(encoder).values = {k: v.to(self.device) for k, v in self.masks[i].items()}
        return encoder

    # -- state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        state = {}
        for t, embedding in self.embeddings.items():
            for kind in KINDS:
                state[f"embedding.{t}.{kind}"] = embedding[kind].detach()
        for t, mask in self.masks.items():
            for kind in KINDS:
                state[f"mask.{t}.{kind}"] = mask[kind]
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.embeddings, self.masks = {}, {}
        for key, value in state.items():
            what, t, kind = key.split(".")
            value = value.to(self.device)
            if what == "embedding":
                self.embeddings.setdefault(int(t), {})[kind] = nn.Parameter(value)
            else:
                self.masks.setdefault(int(t), {})[kind] = value


class _AnnealedGates(Mapping):
    """Gate values σ(s · e_t) at the current step, computed when the forward pass reads them.

    The loop runs the forward before any hook of the step, so the values are made lazily here,
    once per step (cached by step). Making them is also the first thing after the previous
    optimiser step, hence where e_t is clamped to ±thres_emb.
    """

    def __init__(self, hat: HAT, ctx) -> None:
        self.hat, self.ctx = hat, ctx
        self._step: tuple[int, int] | None = None
        self._values: dict[str, Tensor] = {}

    def _current(self) -> dict[str, Tensor]:
        key = (self.ctx.t, self.ctx.step)
        if key != self._step:
            embedding, bound = self.hat.embeddings[self.ctx.t], self.hat.args.thres_emb
            with torch.no_grad():
                for e in embedding.values():
                    e.clamp_(-bound, bound)
            s = self.hat.slope(self.ctx)
            self._values = {k: torch.sigmoid(s * e) for k, e in embedding.items()}
            self._step = key
        return self._values

    def __getitem__(self, kind: str) -> Tensor:
        return self._current()[kind]

    def __iter__(self) -> Iterator[str]:
        return iter(KINDS)

    def __len__(self) -> int:
        return len(KINDS)
