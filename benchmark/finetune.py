"""End-task evaluation by fine-tuning: the family's stock classification model around a
DAP-trained encoder (`task_model`), fine-tuned and tested (`finetune_and_test`)."""

from __future__ import annotations

import copy
import math
import time
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
from benchmark.data import task_collate
from benchmark.metrics import accuracy, macro_f1


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
