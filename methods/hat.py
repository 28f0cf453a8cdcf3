"""HAT (Serrà et al., 2018, "Overcoming catastrophic forgetting with hard attention to the
task"): hard attention to the task on the transformer's units.

Domain t owns a task embedding e_t per unit (heads, FFN intermediate and output neurons, the
units of `methods.gates`). While training domain t every unit is gated by a_t = σ(s · e_t)
(§2.2). The default `form: paper` is HAT as the paper defines it (and its code, joansj/hat
6fd0b9d `src/approaches/hat.py`):
- after the domain, a_t = σ(s_max · e_t), not binarised (§2.2: s = s_max at test time; code
  l.88), and the cumulative attention a^{≤t} = max(a^{≤t−1}, a_t) (§2.3 eq. 3, code l.91-95);
- while training domain t the gradient of weight w_ij (output unit i, input unit j) is scaled
  by 1 − min(a_i^{<t}, a_j^{<t}) and a bias by 1 − a_i^{<t} (§2.3 eq. 2; code l.99-102, l.131-
  135 with `get_view_for`, `src/networks/mlp_hat.py` l.73-96). A side without a gate constrains
  nothing, as the code's first layer (l.80-83, the input is not gated): Q, K, V rows of head h
  and the intermediate dense rows take 1 − a of their own unit (their input is the ungated
  residual stream), the FFN output dense takes 1 − min(a_out, a_intermediate), the attention-
  output dense columns 1 − a_head (its output joins the ungated residual stream);
- the slope is annealed per batch, s = 1/s_max + (s_max − 1/s_max)(b − 1)/(B − 1), b = 1…B the
  batch index within an epoch of the domain's DAP stream (§2.4; `anneal: paper`). The code
  (l.120) and the companion code (ContinualLM 57e498c `approaches/compute_loss.py` l.18,
  s = (s_max − 1/s_max)·step/len(train_loader) + 1/s_max) divide by B, so s stops one step
  short of s_max: `anneal: code`. `anneal: domain` anneals once over the domain's steps;
- e_t's gradient is compensated, × s_max/s · (cosh(clamp(s·e, ±thres_cosh)) + 1) /
  (cosh(e) + 1) (§2.5; code l.137-142), and e_t is clamped to ±thres_emb after every step (code
  l.148-151);
- L = L_mlm + c · Σ a_t (1 − a^{<t}) / Σ (1 − a^{<t}) (§2.6; code l.196-209; the companion
  `networks/baselines/hat.py` l.54-75 alike).
`form: binary` with `anneal: domain` (preset `zoo-hat-binary`; how the `hat` rows committed
under results/ were made): m_t = [σ(s_max · e_t) > 0.5], m_≤t = max, and every
parameter row of a unit in m_<t has its gradient zeroed (`gates.softmask_gradients`).
End task i is fine-tuned on the encoder gated by a_i (m_i in the binary form). Embeddings,
LayerNorms and the attention-output bias are shared and not masked (as in DAS). The companion's
own HAT (`utils/roberta.py` l.255-291 `get_view_for`) gates adapters, not the transformer's
units; its view has the same post/pre min form.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from benchmark.config import knob
from methods import Method, register
from methods.base import DapPlan
from methods.gates import KINDS, Importance, UnitGates, softmask_gradients
from methods.modeling import encoder_of, trainable

if TYPE_CHECKING:
    from methods.base import Context

log = logging.getLogger(__name__)


@dataclass
class Args:
    """s_max = 400, c = 0.75, thres_cosh = 50, thres_emb = 6: the companion code's defaults."""

    s_max: float = knob(400.0, "the largest gate scale s of σ(s·e), reached by the anneal "
                        "(HAT §2.4)")
    c: float = knob(0.75, "weight of the sparsity regulariser (companion code's `lamb`)")
    thres_cosh: float = knob(50.0, "clamp of s·e in the cosh of the gate-gradient compensation")
    thres_emb: float = knob(6.0, "clamp of the gate embeddings e to [-thres_emb, thres_emb]")
    form: Literal["paper", "binary"] = knob(
        "paper",
        "paper: continuous attention and the 1 − min(a_out, a_in) gradient scaling "
        "(§2.3); binary: binarised masks, gradients of a used unit's rows zeroed")
    anneal: Literal["paper", "code", "domain"] = knob(
        "paper",
        "paper: (b−1)/(B−1) within each epoch (§2.4); code: (b−1)/B (HAT's and the "
        "companion's code); domain: over the domain's steps")


@register("hat")
class HAT(Method):
    """Task-conditioned hard-attention gates on units; earlier domains' units are protected."""
    table_rank = 130

    Args = Args
    needs_domain_id = True

    def __init__(self, args: Args | None = None) -> None:
        super().__init__(args)
        self.gates: UnitGates | None = None
        self.embeddings: dict[int, dict[str, nn.Parameter]] = {}
        self.masks: dict[int, Importance] = {}
        self._cumulative: dict[int, Importance | None] = {}  # by `before`; reset with masks
        self.device = None
        self.batches_per_epoch = 1  # B of §2.4, set by `dap_plan`

    def setup(self, ctx: Context) -> None:
        self.gates = UnitGates(ctx.model)
        self.device = ctx.accelerator.device
        if ctx.config.dap_weight_decay > 0:
            log.warning("HAT: dap_weight_decay %g still shrinks the units earlier domains "
                        "claimed (AdamW decays weights whose gradient is zero)",
                        ctx.config.dap_weight_decay)

    # -- training ----------------------------------------------------------------------
    def before_domain(self, ctx: Context, t: int) -> None:
        if t not in self.embeddings:
            generator = torch.Generator().manual_seed(ctx.seed_for("fisher", t))
            self.embeddings[t] = {
                kind: nn.Parameter(torch.randn(shape, generator=generator).to(self.device))
                for kind, shape in self.gates.shapes.items()}
        self.gates.values = _AnnealedGates(self, ctx)

    def dap_plan(self, ctx: Context, t: int) -> DapPlan | None:
        """The default plan; B, the batches of one epoch of its stream (`mlm_loader` drops a
        last partial batch when it shuffles), for the annealing."""
        plan = super().dap_plan(ctx, t)
        if plan is not None:
            self.batches_per_epoch = max(len(plan.data) // ctx.config.dap_batch_size, 1)
        return plan

    def parameters(self, ctx: Context) -> list[nn.Parameter]:
        return trainable(ctx.model) + list(self.embeddings[ctx.t].values())

    def slope(self, ctx: Context) -> float:
        """s at the current step (`anneal`, see the module docstring)."""
        s_max, anneal = self.args.s_max, self.args.anneal
        if anneal == "domain":
            progress = ctx.step / max(ctx.total_steps - 1, 1)
        else:
            batches = self.batches_per_epoch
            b = ctx.step % batches  # b − 1 of §2.4
            if anneal == "paper":
                progress = b / (batches - 1) if batches > 1 else 1.0
            else:
                progress = b / batches
        return 1 / s_max + (s_max - 1 / s_max) * progress

    def cumulative(self, before: int) -> Importance | None:
        """a^{<before} = max over domains < `before` of their attention (None before the
        first; binary masks in `form: binary`)."""
        if before not in self._cumulative:
            masks = [self.masks[i] for i in range(before) if i in self.masks]
            self._cumulative[before] = None if not masks else {
                k: torch.stack([m[k] for m in masks]).amax(0) for k in KINDS}
        return self._cumulative[before]

    def loss(self, ctx: Context, batch: dict[str, Tensor], outputs) -> Tensor:
        gates = self.gates.values
        used = self.cumulative(ctx.t)
        free = {k: torch.ones_like(gates[k]) if used is None else 1 - used[k] for k in KINDS}
        taken = sum((gates[k] * free[k]).sum() for k in KINDS)
        count = sum(free[k].sum() for k in KINDS)
        return outputs.loss + self.args.c * taken / count.clamp(min=1.0)

    @torch.no_grad()
    def after_backward(self, ctx: Context) -> None:
        used = self.cumulative(ctx.t)
        if used is not None:
            if self.args.form == "paper":
                attention_gradients(self.gates, used)
            else:
                softmask_gradients(self.gates, used)
        s, a = self.slope(ctx), self.args
        for e in self.embeddings[ctx.t].values():
            if e.grad is not None:
                num = torch.cosh(torch.clamp(s * e, -a.thres_cosh, a.thres_cosh)) + 1
                e.grad.mul_(a.s_max / s * num / (torch.cosh(e) + 1))

    @torch.no_grad()
    def after_domain(self, ctx: Context, t: int) -> None:
        self.gates.values = None
        for e in self.embeddings[t].values():
            e.clamp_(-self.args.thres_emb, self.args.thres_emb)
        self.masks[t] = {k: torch.sigmoid(self.args.s_max * e.detach())
                         for k, e in self.embeddings[t].items()}
        if self.args.form == "binary":
            self.masks[t] = {k: (a > 0.5).float() for k, a in self.masks[t].items()}
        self._cumulative = {}
        used = self.cumulative(t + 1)
        share = {k: round(float(used[k].mean()), 3) for k in KINDS}
        log.info("HAT: mean cumulative attention of domains ≤ %d: %s", t, share)

    # -- end tasks -----------------------------------------------------------------------
    def model_for_task(self, ctx: Context, i: int) -> nn.Module:
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
        self.embeddings, self.masks, self._cumulative = {}, {}, {}
        for key, value in state.items():
            what, t, kind = key.split(".")
            value = value.to(self.device)
            if what == "embedding":
                self.embeddings.setdefault(int(t), {})[kind] = nn.Parameter(value)
            else:
                self.masks.setdefault(int(t), {})[kind] = value


@torch.no_grad()
def attention_gradients(gates: UnitGates, used: Importance) -> None:
    """Scale each weight's gradient by 1 − min(a_out, a_in) and each bias's by 1 − a_out, with
    a = `used` = a^{<t} (HAT §2.3 eq. 2, joansj/hat `mlp_hat.py` l.73-96); a side without a gate
    leaves only the other (see the module docstring). Call after backward."""
    for index, layer in enumerate(gates.layers):
        head = used["head"][index].repeat_interleave(gates.head_dim)
        attention = layer.attention.self
        for linear in (attention.query, attention.key, attention.value):
            _scale(linear, post=head)
        _scale(layer.attention.output.dense, pre=head)
        _scale(layer.intermediate.dense, post=used["intermediate"][index])
        _scale(layer.output.dense, post=used["output"][index],
               pre=used["intermediate"][index])


def _scale(linear: nn.Linear, post: Tensor | None = None, pre: Tensor | None = None) -> None:
    """weight.grad *= 1 − min(post_i, pre_j); bias.grad *= 1 − post_i (left when no post)."""
    weight = linear.weight
    views = []
    if post is not None:
        views.append(post.to(weight.dtype).view(-1, 1).expand_as(weight))
    if pre is not None:
        views.append(pre.to(weight.dtype).view(1, -1).expand_as(weight))
    view = views[0] if len(views) == 1 else torch.min(*views)
    if weight.grad is not None:
        weight.grad.mul_(1 - view)
    if post is not None and linear.bias is not None and linear.bias.grad is not None:
        linear.bias.grad.mul_(1 - post.to(linear.bias.grad.dtype))


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
