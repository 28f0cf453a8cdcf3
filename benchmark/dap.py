"""DAP-training: the loop over a domain's steps (`dap_train`) and the one training step
every MLM trainer of the package takes (`dap_step`)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor, nn
from tqdm.auto import tqdm

from benchmark.distributed import average_gradients, check_in_sync, shard
from benchmark.schedule import dap_schedule
from methods.base import DapPlan, Method

log = logging.getLogger(__name__)
LOSS_EVERY = 10  # record the DAP loss every this many steps


def logged_steps(count: int, steps: int) -> list[int]:
    """The DAP steps of a domain's `count` recorded losses: every `LOSS_EVERY`-th step, and the
    last step where a writer records it too (the loop does; the Avalanche evaluator does not)."""
    return [min(k * LOSS_EVERY, steps - 1) for k in range(count)]


def dap_train(ctx, method: Method, plan: DapPlan, t: int) -> list[float]:
    """DAP-train `ctx.model` on `plan` for domain t with the method's hooks; returns losses."""
    cfg = ctx.config
    seed = ctx.seed_for("dap", t)
    set_seed(seed)
    ctx.model.train()
    params = method.parameters(ctx)
    optimizer = torch.optim.AdamW(params, lr=cfg.dap_lr, weight_decay=cfg.dap_weight_decay,
                                  eps=cfg.adam_eps)
    schedule = dap_schedule(optimizer, cfg, plan.steps, t, len(ctx.domains))
    accelerator: Accelerator = ctx.accelerator
    # the model is not wrapped in DDP: methods run the body and the head directly, several
    # times a step (views, replay); each process takes a slice of the batch and the gradients
    # are averaged after backward, before the method's gradient hooks
    model, optimizer = ctx.model, accelerator.prepare(optimizer)
    batches = ctx.mlm_batches(plan.data, seed)
    ctx.total_steps = plan.steps
    losses: list[float] = []
    bar = tqdm(range(plan.steps), desc=f"DAP {ctx.domains[t]}", leave=False,
               disable=not accelerator.is_local_main_process)
    for step in bar:
        ctx.step = step
        batch = shard(next(batches), accelerator.process_index, accelerator.num_processes)
        loss = dap_step(
            lambda b: method.loss(ctx, b, method.forward(ctx, model, b)), batch, params,
            optimizer, schedule, cfg.max_grad_norm, accelerator,
            after_backward=lambda: method.after_backward(ctx),
            after_step=lambda: method.after_step(ctx))
        if accelerator.trackers:  # live tracking (`run --report-to`): every step's loss
            accelerator.log({f"dap_loss/{t}_{ctx.domains[t]}": float(loss.detach())},
                            step=step)
        if step % LOSS_EVERY == 0 or step == plan.steps - 1:
            losses.append(round(float(loss.detach()), 5))
            bar.set_postfix(loss=losses[-1])
    accelerator.free_memory()
    check_in_sync(model, accelerator)
    return losses


def dap_step(loss_of: Callable[[dict[str, Tensor]], Tensor], batch: dict[str, Tensor],
             params: list[nn.Parameter], optimizer: torch.optim.Optimizer, schedule,
             max_grad_norm: float | None, accelerator: Accelerator | None = None,
             after_backward: Callable[[], None] | None = None,
             after_step: Callable[[], None] | None = None) -> Tensor:
    """One MLM training step: the loss of `batch` (`loss_of`: forward and the method's loss),
    backward, the gradient hook, clipping to `max_grad_norm` (None or 0: none), the optimizer
    step, the step hook, the schedule step (None: a constant learning rate); returns the loss.

    With an `accelerator` (DAP-training): forward under its autocast, its backward, and the
    gradients averaged over its processes before `after_backward`; without (θ0 pretraining, the
    head warm-up, a plain model): torch's own backward and clipping."""
    if accelerator is None:
        loss = loss_of(batch)
        loss.backward()
    else:
        # explicit autocast: methods call the encoder and head directly, not a wrapped forward
        with accelerator.autocast():
            loss = loss_of(batch)
        accelerator.backward(loss)
        average_gradients(params, accelerator.num_processes)
    if after_backward is not None:
        after_backward()
    if max_grad_norm:
        if accelerator is None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        else:
            accelerator.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    if after_step is not None:
        after_step()
    if schedule is not None:
        schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return loss
