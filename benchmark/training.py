"""The two kinds of training the loop does: MLM (DAP, pretraining) and end-task fine-tuning."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import Dataset
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, get_linear_schedule_with_warmup
from transformers.modeling_outputs import BaseModelOutputWithPooling

from benchmark.compute import uncounted
from benchmark.data import endless, mlm_loader, task_collate
from benchmark.metrics import accuracy, macro_f1
from benchmark.schedule import dap_schedule
from methods.base import DapPlan, Method
from methods.modeling import encoder_of, mlm_forward, mlm_head_of

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


def train_mlm(model: nn.Module, tokenizer, corpus: Dataset, steps: int, batch_size: int,
              lr: float, max_length: int, seed: int, params: list[nn.Parameter] | None = None,
              weight_decay: float = 0.01, mlm_probability: float = 0.15,
              max_grad_norm: float | None = 1.0, desc: str = "MLM",
              group_texts: bool = False,
              count: Callable[[int], None] | None = None) -> list[float]:
    """Plain MLM training of `params` (default: all), deterministic for a seed; the losses
    (`count` is told the tokens of every batch)."""
    from benchmark.data import dap_sequences

    set_seed(seed)
    data = dap_sequences(corpus, tokenizer, max_length, group_texts)
    batches = endless(mlm_loader(data, tokenizer, batch_size, mlm_probability, seed))
    params = list(model.parameters()) if params is None else params
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, steps // 10, steps)
    device = next(model.parameters()).device
    losses: list[float] = []
    for step in tqdm(range(steps), desc=desc, leave=False):
        batch = next(batches)
        if count is not None:
            count(batch["input_ids"].numel())
        loss = dap_step(lambda b: mlm_forward(model, b).loss,
                        {k: v.to(device) for k, v in batch.items()}, params, optimizer,
                        schedule, max_grad_norm)
        if step % LOSS_EVERY == 0 or step == steps - 1:
            losses.append(round(loss.item(), 4))
    return losses


def pretrain_mlm(model: nn.Module, tokenizer, corpus: Dataset, steps: int, batch_size: int,
                 lr: float, max_length: int, seed: int) -> None:
    """Plain MLM pretraining (the synthetic base model); deterministic for a seed."""
    model.train()
    train_mlm(model, tokenizer, corpus, steps, batch_size, lr, max_length, seed,
              desc="pretraining syn-base")
    model.eval()


def warm_up_mlm_head(model: nn.Module, tokenizer, corpus: Dataset, steps: int,
                     batch_size: int, lr: float, max_length: int, mlm_probability: float,
                     seed: int = 0, group_texts: bool = False,
                     count: Callable[[int], None] | None = None) -> list[float]:
    """Train only the LM head's own weights on `corpus`, the encoder frozen; return the losses.

    For a checkpoint shipped without an MLM head (all-MiniLM-L6-v2), so that DAP does not begin
    by training the encoder through a random head (loss ~10.8). Weights the head shares with the
    encoder (the tied decoder = word embeddings) stay fixed, so the encoder, and with it every
    no-DAP number, is unchanged. Deterministic for a seed; torch's RNG state is left as it was.
    """
    shared = {id(p) for p in encoder_of(model).parameters()}
    head = [p for p in mlm_head_of(model).parameters() if id(p) not in shared]
    trainable = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head:
        p.requires_grad_(True)
    model.eval()  # frozen features: no dropout in the encoder
    with torch.random.fork_rng(devices=[]):
        losses = train_mlm(model, tokenizer, corpus, steps, batch_size, lr, max_length, seed,
                           params=head, weight_decay=0.0, mlm_probability=mlm_probability,
                           max_grad_norm=None, desc="MLM head warm-up",
                           group_texts=group_texts, count=count)
    for p, flag in trainable.items():
        p.requires_grad_(flag)
    return losses


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


class SharedEncoder(nn.Module):
    """The body of a stock sequence-classification model, played by the DAP-trained encoder.

    The stock heads read either the sequence output (RoBERTa's `RobertaClassificationHead`:
    dense + tanh + out_proj on `<s>`) or the pooled output (BERT: the pooler's dense + tanh on
    [CLS], dropout, a linear classifier). A masked LM's encoder has no pooler, so the stock
    model's own freshly initialised one stands in (used only when the encoder returns none).
    The encoder may be any module a method hands over (a stock body with hooks, a mixture).
    """

    def __init__(self, encoder: nn.Module, pooler: nn.Module | None) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooler = pooler
        self.config = encoder.config

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                **_: object) -> BaseModelOutputWithPooling:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        pooled = getattr(out, "pooler_output", None)
        if pooled is None and self.pooler is not None:
            pooled = self.pooler(hidden)
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)


def task_model(encoder: nn.Module, num_labels: int) -> nn.Module:
    """The encoder family's stock `AutoModelForSequenceClassification`, its body `encoder`.

    The companion code fine-tunes with the family's own head: ContinualLM
    `networks/transformers/roberta.py` l.676 and l.735–736, `RobertaClassificationHead` on the
    sequence output (dense + tanh + out_proj on `<s>`), loaded by `utils/model.py` l.436–448.
    Building the stock model from the encoder's config and swapping its body for the encoder
    gives every family its own head through one code path. The stock body built alongside is
    dropped (its pooler aside): a transient cost of one randomly initialised encoder.
    """
    config = copy.deepcopy(encoder.config)
    config.num_labels = num_labels
    config.problem_type = "single_label_classification"
    model = AutoModelForSequenceClassification.from_config(config)
    stock = model.base_model
    pooler = getattr(stock, "pooler", None)
    setattr(model, model.base_model_prefix, SharedEncoder(encoder, pooler))
    return model


class CellScore(NamedTuple):
    """One end-task evaluation A[t][i]: scores in percent, its wall time, and whether every test
    prediction was the same class (a collapsed classifier: its MF1 measures no knowledge)."""

    mf1: float
    acc: float
    seconds: float
    collapsed: bool


def finetune_and_test(ctx, encoder: nn.Module, train: Dataset, test: Dataset, num_labels: int,
                      seed: int, desc: str, epochs: int | None = None) -> CellScore:
    """Fine-tune a copy of `encoder` with the family's stock classification head on `train`;
    score it on `test`.

    `epochs` is the task's own count (the paper's per-task epochs) and wins over `ft_epochs`.
    The lr decays linearly to 0 after a warm-up over `ft_warmup` of the steps (default none, as
    the companion code: ContinualLM config.py l.288–296, approaches/finetune.py l.53–58)."""
    cfg = ctx.config
    epochs = epochs or cfg.ft_epochs
    start = time.perf_counter()
    set_seed(seed)
    model = task_model(copy.deepcopy(encoder), num_labels)
    collate = task_collate(ctx.tokenizer.pad_token_id)
    loader = DataLoader(train.with_format(None), batch_size=cfg.ft_batch_size, shuffle=True,
                        collate_fn=collate, generator=torch.Generator().manual_seed(seed))
    # `ft_decay_params: weights` leaves biases and LayerNorm weights undecayed; `all` decays
    # every trainable parameter, as the companion (approaches/finetune.py l.44-45)
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight") \
        if cfg.ft_decay_params == "weights" else ()
    groups = [
        {"params": [p for n, p in model.named_parameters() if p.requires_grad
                    and not (no_decay and n.endswith(no_decay))],
         "weight_decay": cfg.ft_weight_decay},
        {"params": [p for n, p in model.named_parameters() if p.requires_grad
                    and no_decay and n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.ft_lr, eps=cfg.adam_eps)
    total = epochs * len(loader)
    schedule = get_linear_schedule_with_warmup(optimizer, math.ceil(cfg.ft_warmup * total), total)
    accelerator: Accelerator = ctx.accelerator
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    count = getattr(ctx, "count", None)
    for _ in tqdm(range(epochs), desc=desc, leave=False,
                  disable=not accelerator.is_local_main_process):
        for batch in loader:
            if count is not None:  # the tokens of every process's share
                count(batch["input_ids"].numel() * accelerator.num_processes)
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
            loss = nn.functional.cross_entropy(logits, batch["labels"])
            accelerator.backward(loss)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
    model.eval()
    predictions, gold = [], []
    test_loader = accelerator.prepare(DataLoader(test.with_format(None), batch_size=64,
                                                 collate_fn=collate))
    with torch.no_grad(), uncounted(ctx):  # evaluation is not training compute
        for batch in test_loader:
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
            pred, labels = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"]))
            predictions += pred.tolist()
            gold += labels.tolist()
    accelerator.free_memory()
    return CellScore(macro_f1(gold, predictions), accuracy(gold, predictions),
                     time.perf_counter() - start, len(set(predictions)) == 1)
