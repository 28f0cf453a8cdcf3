"""Unit gates, unit importance and soft-masking on stock BERT/RoBERTa-family encoders.

A *unit* is an attention head, an FFN intermediate neuron or an FFN output neuron of a layer.
`UnitGates` attaches forward hooks (no forked model code) that multiply each unit by a gate:
- head h: its slice of the context vector, before the attention-output projection;
- intermediate neuron j: its activation (`intermediate="post"`, the paper), or its pre-activation,
  the FFN intermediate dense output before the activation (`intermediate="pre"`, as the companion
  code gates it: ContinualLM 57e498c `networks/transformers/roberta.py` l.195-200);
- output neuron k: its value after the FFN output projection, before dropout/residual/LayerNorm.
Hooks do nothing unless gate values are set with `gates.applied(values)`, so a gated model with
no values set is exactly the stock model. DAS, DGA, HAT and the ablations all use this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from methods.modeling import encoder_of

Kind = Literal["head", "intermediate", "output"]
KINDS: tuple[str, ...] = get_args(Kind)
# where an intermediate neuron's gate sits: after / before the activation
Placement = Literal["post", "pre"]
PLACEMENTS: tuple[str, ...] = get_args(Placement)
Form = Literal["abs", "signed", "companion-cumulative"]  # how gate gradients are aggregated
FORMS: tuple[str, ...] = get_args(Form)
# how a head's importance soft-masks the attention weights
QkvSoftmask = Literal["rows", "companion"]
QKV: tuple[str, ...] = get_args(QkvSoftmask)
Importance = dict[str, Tensor]  # kind -> [layers, units]


def transformer_layers(model: nn.Module) -> list[nn.Module]:
    """The encoder layers of a BERT/RoBERTa-family model (masked LM or bare encoder)."""
    body = encoder_of(model) if hasattr(model, "base_model") else model
    try:
        return list(body.encoder.layer)
    except AttributeError:
        raise TypeError(f"{type(model).__name__} is not a BERT/RoBERTa-family encoder") from None


class UnitGates:
    """Forward hooks that multiply every unit of `model` by a gate value when values are set."""

    def __init__(self, model: nn.Module, intermediate: str = "post") -> None:
        if intermediate not in PLACEMENTS:
            raise ValueError(f"intermediate gate placement must be one of {PLACEMENTS}, "
                             f"got {intermediate!r}")
        self.layers = transformer_layers(model)
        first = self.layers[0]
        self.heads = first.attention.self.num_attention_heads
        self.head_dim = first.attention.self.attention_head_size
        self.shapes = {
            "head": (len(self.layers), self.heads),
            "intermediate": (len(self.layers), first.intermediate.dense.out_features),
            "output": (len(self.layers), first.output.dense.out_features),
        }
        self.values: Importance | None = None
        self._handles = []
        for index, layer in enumerate(self.layers):
            ffn_in = layer.intermediate if intermediate == "post" else layer.intermediate.dense
            self._handles += [
                layer.attention.output.dense.register_forward_pre_hook(self._head_hook(index)),
                ffn_in.register_forward_hook(self._unit_hook("intermediate", index)),
                layer.output.dense.register_forward_hook(self._unit_hook("output", index)),
            ]

    def _head_hook(self, index: int) -> Callable:
        def hook(module, args):
            if self.values is None or "head" not in self.values:
                return None
            context = args[0]
            gate = self._gate("head", index, context.dtype).repeat_interleave(self.head_dim, -1)
            return (context * gate, *args[1:])

        return hook

    def _unit_hook(self, kind: str, index: int) -> Callable:
        def hook(module, args, output):
            if self.values is None or kind not in self.values:
                return None
            return output * self._gate(kind, index, output.dtype)

        return hook

    def _gate(self, kind: str, index: int, dtype: torch.dtype) -> Tensor:
        """Layer `index`'s gates: [units], or [batch, 1, units] for per-example gates."""
        values = self.values[kind]
        if values.dim() == 3:  # [batch, layers, units]: each example gated its own way
            return values[:, index].unsqueeze(1).to(dtype)
        return values[index].to(dtype)

    def ones(self, requires_grad: bool = False, device=None) -> Importance:
        return {k: torch.ones(s, device=device, requires_grad=requires_grad)
                for k, s in self.shapes.items()}

    def zeros(self, device=None) -> Importance:
        return {k: torch.zeros(s, device=device) for k, s in self.shapes.items()}

    @contextmanager
    def applied(self, values: Importance) -> Iterator[None]:
        """Gate the model's units by `values` inside the block (kinds left out stay ungated).

        Each value is [layers, units] for the whole batch, or [batch, layers, units] to gate
        every example its own way (several gated views fused into one forward pass).
        """
        previous, self.values = self.values, values
        try:
            yield
        finally:
            self.values = previous

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def gate_gradients(gates: UnitGates, loss_fn: Callable[[dict[str, Tensor]], Tensor],
                   batches: Iterable[dict[str, Tensor]], form: str = "abs") -> Importance:
    """∂L/∂g per unit over batches, aggregated by `form`:

    - "abs": the mean over batches of |∂L/∂g| (the paper, §3.1);
    - "signed": the mean over batches of the signed ∂L/∂g;
    - "companion-cumulative": as the companion code aggregates (ContinualLM 57e498c,
      `networks/baselines/softmask.py` l.77-98): the gate's `.grad` is never zeroed between
      batches and its running value is added after every batch, so batch j of N counts N−j+1
      times; the sum is divided by the number of attended tokens (l.93, 98).
    The per-layer normalisation (`normalize`) removes any positive scale, so only the first two
    differ in shape from each other, the third in weighting. Only the gates get gradients here
    (`torch.autograd.grad`), so the model's `.grad`s are untouched.
    """
    if form not in FORMS:
        raise ValueError(f"importance form must be one of {FORMS}, got {form!r}")
    device = next(gates.layers[0].parameters()).device
    total = gates.zeros(device)
    running = gates.zeros(device)  # the companion code's never-zeroed `.grad`
    count, tokens = 0, 0.0
    for batch in batches:
        probe = gates.ones(requires_grad=True, device=device)
        with gates.applied(probe):
            loss = loss_fn(batch)
        grads = torch.autograd.grad(loss, [probe[k] for k in KINDS])
        for kind, grad in zip(KINDS, grads, strict=True):
            grad = grad.detach()
            if form == "companion-cumulative":
                running[kind] += grad
                total[kind] += running[kind]
            else:
                total[kind] += grad if form == "signed" else grad.abs()
        count += 1
        tokens += float(batch["attention_mask"].sum())
    if count == 0:
        raise ValueError("importance needs at least one batch")
    scale = tokens if form == "companion-cumulative" else count
    return {k: v / scale for k, v in total.items()}


def normalize(raw: Importance) -> Importance:
    """Per layer: z-score across the layer's units → tanh → |·|, so every value is in [0, 1)."""
    out = {}
    for kind, values in raw.items():
        mean = values.mean(dim=1, keepdim=True)
        std = values.std(dim=1, keepdim=True)
        out[kind] = torch.tanh((values - mean) / (std + 1e-12)).abs()
    return out


def accumulate(old: Importance | None, new: Importance) -> Importance:
    """I_≤t = max(I_≤t−1, I_t), element-wise."""
    if old is None:
        return {k: v.clone() for k, v in new.items()}
    return {k: torch.maximum(old[k], new[k].to(old[k].device)) for k in old}


@torch.no_grad()
def softmask_gradients(gates: UnitGates, importance: Importance,
                       kinds: Iterable[str] = KINDS, qkv: str = "rows") -> None:
    """Multiply each unit's parameter gradients by (1 − I): call after backward, before clipping.

    head h, `qkv="rows"` (the paper: a head's own parameters): rows of Q, K, V weights and biases
    in h's slice, and the attention-output weight columns of that slice. `qkv="companion"`, as the
    companion code does it (ContinualLM 57e498c `networks/baselines/softmask.py` l.183-197:
    `weight.grad *= head_mask` with a [hidden] head-indexed vector, which broadcasts over the
    last, *input* dimension): the *columns* of Q, K, V weights, the Q, K, V biases by h's slice,
    the attention-output weight columns, and the attention-output bias by the same vector.
    intermediate j: row j and bias j of the intermediate dense; output k: row k and bias k of the
    FFN output dense (both as in the companion code, l.199-210). Embeddings, LayerNorms and the
    LM head are left.
    """
    if qkv not in QKV:
        raise ValueError(f"qkv soft-mask must be one of {QKV}, got {qkv!r}")
    kinds = set(kinds)
    for index, layer in enumerate(gates.layers):
        if "head" in kinds:
            keep = (1 - importance["head"][index]).repeat_interleave(gates.head_dim)
            attention = layer.attention.self
            dense = layer.attention.output.dense
            for linear in (attention.query, attention.key, attention.value):
                if qkv == "rows":
                    _scale_rows(linear, keep)
                else:
                    _scale_columns(linear, keep, bias=True)
            _scale_columns(dense, keep, bias=qkv == "companion")
        if "intermediate" in kinds:
            _scale_rows(layer.intermediate.dense, 1 - importance["intermediate"][index])
        if "output" in kinds:
            _scale_rows(layer.output.dense, 1 - importance["output"][index])


def _scale_columns(linear: nn.Linear, keep: Tensor, bias: bool) -> None:
    """weight.grad *= keep over the input dimension; the bias by the same vector if `bias`."""
    if linear.weight.grad is not None:
        linear.weight.grad.mul_(keep.to(linear.weight.grad.dtype).unsqueeze(0))
    if bias and linear.bias is not None and linear.bias.grad is not None:
        linear.bias.grad.mul_(keep.to(linear.bias.grad.dtype))


def _scale_rows(linear: nn.Linear, keep: Tensor) -> None:
    if linear.weight.grad is not None:
        linear.weight.grad.mul_(keep.to(linear.weight.grad.dtype).unsqueeze(1))
    if linear.bias is not None and linear.bias.grad is not None:
        linear.bias.grad.mul_(keep.to(linear.bias.grad.dtype))
