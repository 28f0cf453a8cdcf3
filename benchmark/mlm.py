"""Plain MLM training outside the DAP loop: θ0 pretraining (the synthetic base model) and the
LM head's warm-up; both take `benchmark.dap.dap_step`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate.utils import set_seed
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from benchmark.dap import LOSS_EVERY, dap_step
from benchmark.data import endless, mlm_loader
from methods.modeling import encoder_of, mlm_forward, mlm_head_of


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


def head_tensors(model: nn.Module) -> dict[str, nn.Parameter]:
    """The MLM head's own parameters (not those it shares with the encoder, such as the tied
    decoder), by state-dict name."""
    shared = {id(p) for p in encoder_of(model).parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: p for p in mlm_head_of(model).parameters() if id(p) not in shared}


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
    head = list(head_tensors(model).values())
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
