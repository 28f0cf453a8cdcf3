"""Tokens and model FLOPs, counted as a run spends them: the counter of `bench` and the compute
record of every result.

Model FLOPs are counted by hooks on the encoder and the LM head, per call over T tokens of
padded width s:

    encoder: k · T · (N_enc + 2 · layers · s · d)        k = 6 with gradient, 2 without
    LM head: k · R · N_head                               R = rows the head runs on

with N_enc the weights of the encoder's linear layers (embedding lookups, biases and LayerNorms
are not matmuls), the attention term of Kaplan et al. (2020, eq. 2.1: QKᵀ and AV), N_head the
head's dense and decoder weights (run only on the masked positions, `methods/modeling.py`); 6·N·T
is one forward and backward pass. k is read from `torch.is_grad_enabled()`, so a pass whose
backward reaches only part of the model (the head warm-up's frozen encoder, the importance's
gradients to the gates only, a frozen LM under adapters or prompts) counts as a full one: an
upper bound there. T and s are those the encoder is called with (soft-prompt positions added
inside the encoder are not in them). Because the hooks see every call, a method's extra passes
(DAS's views and importance, EWC's Fisher, DER++'s replay forward, a teacher's forward) are
counted as the method runs them, with no code in the method.

A run's record (`RunRecord.compute`) holds, per phase, `tokens` (the tokens of the batches the
phase drew from its data, padding included: DAP batches, importance or Fisher batches, end-task
batches, the head warm-up's) and `flops` (the model FLOPs of every hooked call in the phase,
summed over processes). Phases: `head_warmup` (the MLM-head warm-up, if any), `method` (the
method's hooks before and after each domain: importance, Fisher, buffer filling), `dap` (the DAP
steps, with every pass a method makes in them), `finetune` or `probe` (end-task training; the
probe's is the frozen encoder's embedding of the training split). Evaluation (test sets, the
general MLM loss) and θ0's own pretraining are not counted. The classification head of
fine-tuning and the probe's logistic regression are not model FLOPs here (a few per cent at
most of a fine-tuning step). A method that runs a model outside the hooked encoder and head
reports it with `ctx.count(tokens, passes=...)`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from methods.modeling import encoder_of, mlm_head_of

PHASES = ("head_warmup", "method", "dap", "finetune", "probe")  # in table order


class FlopCounter:
    """Model FLOPs of every encoder and LM-head call (formula in the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        encoder, cfg = encoder_of(model), model.config
        self.n_encoder = sum(m.weight.numel() for m in encoder.modules()
                             if isinstance(m, nn.Linear))
        self.n_head = sum(m.weight.numel() for m in mlm_head_of(model).modules()
                          if isinstance(m, nn.Linear))
        self.layers, self.width = cfg.num_hidden_layers, cfg.hidden_size
        self.flops = 0.0
        self.encoder_flops = 0.0
        self._handles = [
            encoder.register_forward_pre_hook(self._on_encoder, with_kwargs=True),
            mlm_head_of(model).register_forward_pre_hook(self._on_head),
        ]

    def _on_encoder(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:  # a prompt or adapter method feeding embeddings
            ids = kwargs["inputs_embeds"][..., 0]
        k = 6 if torch.is_grad_enabled() else 2
        tokens, width = ids.numel(), ids.shape[-1]
        flops = k * tokens * (self.n_encoder + 2 * self.layers * width * self.width)
        self.encoder_flops += flops
        self.add(flops)

    def _on_head(self, module, args) -> None:
        rows = args[0].shape[:-1].numel()
        self.add((6 if torch.is_grad_enabled() else 2) * rows * self.n_head)

    def add(self, flops: float) -> None:
        self.flops += flops

    def reset(self) -> None:
        self.flops = self.encoder_flops = 0.0

    def one_pass(self, tokens: int, width: int) -> float:
        """Encoder FLOPs of one pass with gradient over `tokens` tokens of width `width`."""
        return 6 * tokens * (self.n_encoder + 2 * self.layers * width * self.width)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class Compute(FlopCounter):
    """A run's tokens and FLOPs per phase, into `totals` (the record's `compute` mapping).

    Nothing is counted outside a phase (`with compute.phase("dap"): ...`). Copies of the hooked
    model (θ0's copy, a teacher, the model being fine-tuned) keep counting here: deep-copying
    a module copies its hooks, and this counter deep-copies as itself. Under several processes
    each runs its share of a batch: the FLOPs of a phase are summed over processes by `reduce`
    (a sum over processes of a float64 tensor, e.g. `Accelerator.reduce`) when its outermost
    block ends, a point every process reaches together; tokens are counted as given.
    """

    def __init__(self, model: nn.Module, totals: dict[str, dict[str, Any]],
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__(model)
        self.totals = totals
        self.reduce = reduce
        self.current: str | None = None
        self._local = dict.fromkeys(PHASES, 0.0)  # this process's FLOPs not yet in totals

    def __deepcopy__(self, memo: dict) -> Compute:
        return self

    @contextlib.contextmanager
    def phase(self, name: str | None) -> Iterator[None]:
        """Count what runs in the block into phase `name` (None: count nothing)."""
        if name is not None and name not in PHASES:
            raise ValueError(f"compute phase {name!r}: not one of {PHASES}")
        before, self.current = self.current, name
        try:
            yield
        finally:
            self.current = before
            if before is None and name is not None:
                self._flush()

    def _flush(self) -> None:
        local = torch.tensor([self._local[p] for p in PHASES], dtype=torch.float64)
        summed = self.reduce(local).cpu() if self.reduce is not None else local
        for phase, value in zip(PHASES, summed.tolist(), strict=True):
            if value:
                self._entry(phase)["flops"] += value
        self._local = dict.fromkeys(PHASES, 0.0)

    def _entry(self, phase: str) -> dict[str, Any]:
        return self.totals.setdefault(phase, {"tokens": 0, "flops": 0.0})

    def add(self, flops: float) -> None:
        super().add(flops)
        if self.current is not None:
            self._local[self.current] += flops

    def count(self, tokens: int, passes: float = 0.0, width: int | None = None) -> None:
        """Add `tokens` drawn from data to the current phase, and `passes` passes with gradient
        over them (width `width`) that the hooks do not see."""
        if self.current is None:
            return
        self._entry(self.current)["tokens"] += int(tokens)
        if passes:
            self._local[self.current] += passes * self.one_pass(tokens, width or 1)


def total_flops(compute: dict[str, dict[str, Any]]) -> float:
    """Training FLOPs of a record's `compute`, every phase together."""
    return sum(float(v.get("flops", 0.0)) for v in compute.values())


def total_tokens(compute: dict[str, dict[str, Any]]) -> int:
    """Tokens drawn from data, every phase together."""
    return sum(int(v.get("tokens", 0)) for v in compute.values())


def counted(ctx: Any, phase: str | None) -> contextlib.AbstractContextManager:
    """A block whose compute goes to `phase` of `ctx`'s record (a context without a counter,
    as tests build one: nothing)."""
    compute = getattr(ctx, "compute", None)
    return compute.phase(phase) if compute is not None else contextlib.nullcontext()


def uncounted(ctx: Any) -> contextlib.AbstractContextManager:
    """A block that `ctx`'s compute record leaves out (evaluation)."""
    return counted(ctx, None)
