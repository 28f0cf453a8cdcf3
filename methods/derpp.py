"""DER++ (Buzzega et al., 2020): replay of earlier sequences with their stored dark knowledge.

Every `replay_every` steps, while the buffer holds anything, a minibatch is drawn from it:
`alpha · MSE(now, stored)` (the last hidden states, or the MLM logits, the model produced when
the sequence was stored; the mean over the non-padding tokens' values) plus `beta · L_mlm` (its
stored masks and labels), both added to the current batch's MLM loss. `replay_batches: one`
(default) computes both terms on that one batch, as the companion code does
(`approaches/compute_gradient.py` l.22-27: one `replay_batch`, one forward pass, `replay_beta`
on its MLM loss and `replay_alpha` on the MSE of its `hidden_states[-1]`); `two` draws a second,
independent batch for the β term, as DER++ is published (Buzzega et al. 2020, Algorithm 1;
Mammoth `models/derpp.py` l.41-51).

`fill: after_domain` (default) fills the buffer as the companion code intends
(UIC-Liu-Lab/ContinualLM, commit 57e498c): after DAP-training domain t, sequences of its corpus
(at most `fill_sequences`, the companion code's 10,000-sequence subset, `posttrain.py`
l.204–208) are offered to a reservoir buffer with the final model's outputs on them
(`approaches/after_posttrain.py` l.45–52, `networks/baselines/memory.py` l.96–140: the
masked input, its labels and `hidden_states[-1]`; the reservoir is shared by all domains,
l.19–33). While domain t trains the buffer thus holds domains < t only, and nothing is replayed
on the first domain. (In the companion code `add_from_loader` reads `hidden_states` from an
output that does not carry them, so its DER++ does not run as shipped.) The model stays in
train mode while filling, as there. Only the offered sequences the reservoir keeps are encoded.

`fill: stream` is Mammoth's online DER++: every DAP batch is
offered to the reservoir with the outputs of that very step, so the buffer also holds the
domain being trained.

The buffer's size: `buffer_size` sequences, or, when 0 (default), `buffer_share` of all the
run's corpora together, as the companion code sizes it per domain times the number of domains
(`approaches/before_posttrain.py` l.55). The paper keeps about 100 sequences per domain of
~640k (0.016 %); on `syn6` (720 sequences per domain, 4,320 in all) that share is under one
sequence, so the default is 1 %: 43 sequences on `syn6`, about 7 per domain at the end, where
a fixed 500 would hold 11.6 % of the corpora. After each domain `artifacts/derpp.json`
records how many sequences of each domain the buffer holds and its share of the corpora seen so far.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from methods import Method, knob, non_negative, positive, register
from methods.buffer import ReservoirBuffer
from methods.modeling import mlm_forward, mlm_head_of

if TYPE_CHECKING:
    from methods.base import Context

log = logging.getLogger(__name__)


def share(value: float) -> str | None:
    return None if 0 < value <= 1 else "must be a share in (0, 1]"


@dataclass
class Args:
    buffer_size: int = knob(
        0,
        "sequences; 0: `buffer_share` of all the run's corpora", check=non_negative)
    buffer_share: float = knob(
        0.01,
        "the buffer's size as a share of the corpora (when buffer_size is 0)", check=share)
    fill: Literal["after_domain", "stream"] = knob(
        "after_domain",
        "\"after_domain\" (companion code) or \"stream\" (every DAP batch)")
    fill_sequences: int = knob(
        10000,
        "after_domain: sequences of the domain offered (companion: 1e4)", check=positive)
    alpha: float = knob(0.2, "weight of the MSE to the stored outputs (Mammoth's best_args, 500)")
    beta: float = knob(0.5, "weight of the replayed MLM loss (Mammoth's best_args, buffer 500)")
    replay_every: int = knob(1, "replay on every k-th DAP step", check=positive)
    replay_batch_size: int = knob(0, "0: the DAP batch size")
    replay_batches: Literal["one", "two"] = knob(
        "one",
        "one: both terms on one replay batch (companion code) | two: one batch per "
        "term (the paper)")
    target: Literal["hidden", "logits"] = knob(
        "hidden",
        "what is stored and matched: \"hidden\" or \"logits\" (L × vocab each)")


@register("derpp")
class DERpp(Method):
    """Reservoir replay of earlier sequences: α · MSE to stored outputs + β · replayed MLM."""
    table_rank = 120
    # DER++ replays a batch of earlier sequences beside each new one: its DAP took 345 s against
    # 162 s for EWC and KD in results/syn6/syn6-default/{derpp,ewc,kd}/order0/seed2021
    # (timings.dap_s): 2.1 ncl steps per step.
    dap_cost = ("ncl", 2.1)

    Args = Args

    def __init__(self, args: Args | None = None) -> None:
        super().__init__(args)
        self.buffer: ReservoirBuffer | None = None
        self.corpus_sizes: list[int] = []
        self.device = None

    def setup(self, ctx: Context) -> None:
        self.corpus_sizes = [len(ctx.corpus(t)) for t in range(len(ctx.domains))]
        size = self.args.buffer_size or max(1, round(self.args.buffer_share
                                                     * sum(self.corpus_sizes)))
        self.buffer = ReservoirBuffer(size, seed=ctx.seed_for("buffer"))
        self.device = ctx.accelerator.device
        log.info("derpp: a buffer of %d sequences, %.3f %% of the run's %d corpus sequences",
                 size, 100 * size / sum(self.corpus_sizes), sum(self.corpus_sizes))

    def loss(self, ctx: Context, batch: dict[str, Tensor], outputs) -> Tensor:
        loss = outputs.loss
        if len(self.buffer) and ctx.step % self.args.replay_every == 0:
            loss = loss + self.replay_loss(ctx.model, ctx.config.dap_batch_size)
        if self.args.fill == "stream":
            rows, slots = self.buffer.reserve(batch["input_ids"].shape[0])
            self.store(ctx, batch, rows, slots, outputs.hidden, ctx.t)
        return loss

    def replay_loss(self, model, batch_size: int) -> Tensor:
        n = self.args.replay_batch_size or batch_size
        memory = _trim(self.buffer.sample(n))
        replay = mlm_forward(model, memory)
        hidden = replay.hidden
        now = mlm_head_of(model)(hidden) if self.args.target == "logits" else hidden
        valid = memory["attention_mask"].unsqueeze(-1).to(now.dtype)
        error = F.mse_loss(now, memory["target"].to(now.dtype), reduction="none") * valid
        mse = error.sum() / (valid.sum() * now.shape[-1]).clamp(min=1.0)
        if self.args.replay_batches == "two":
            mlm = mlm_forward(model, _trim(self.buffer.sample(n))).loss
        else:
            mlm = replay.loss
        return self.args.alpha * mse + self.args.beta * mlm

    @torch.no_grad()
    def fill_from_domain(self, ctx: Context, t: int) -> None:
        """Offer sequences of domain t's corpus to the reservoir with the model's outputs now."""
        data = ctx.corpus(t)
        offer = min(len(data), self.args.fill_sequences)
        batch_size = ctx.config.dap_batch_size
        batches = ctx.mlm_batches(data, seed=ctx.seed_for("derpp_replay", t), batch_size=batch_size)
        for _ in range(math.ceil(offer / batch_size)):
            batch = next(batches)
            take = min(batch["input_ids"].shape[0], offer)
            offer -= take
            rows, slots = self.buffer.reserve(take)
            if not rows:
                continue
            index = torch.tensor(rows, device=batch["input_ids"].device)
            kept = {k: v[index] for k, v in batch.items()}
            hidden = mlm_forward(ctx.model, kept).hidden
            self.store(ctx, kept, list(range(len(rows))), slots, hidden, t)

    @torch.no_grad()
    def store(self, ctx: Context, batch: dict[str, Tensor], rows: list[int], slots: list[int],
              hidden: Tensor, t: int) -> None:
        """Write rows `rows` of `batch` (and of its outputs `hidden`) into buffer `slots`."""
        if not rows:
            return
        index = torch.tensor(rows, device=hidden.device)
        target = hidden[index]
        if self.args.target == "logits":
            target = mlm_head_of(ctx.model)(target)
        width = ctx.config.max_length  # a fixed length, so every stored row has one shape
        pad_id = ctx.tokenizer.pad_token_id
        self.buffer.write(slots, {
            "input_ids": _pad(batch["input_ids"][index], width, pad_id),
            "attention_mask": _pad(batch["attention_mask"][index], width, 0),
            "labels": _pad(batch["labels"][index], width, -100),
            "target": _pad(target.float(), width, 0.0),
            "domain": torch.full((len(rows),), t, dtype=torch.long, device=hidden.device),
        })

    def after_domain(self, ctx: Context, t: int) -> None:
        if self.args.fill == "after_domain":
            self.fill_from_domain(ctx, t)
        self.record(ctx, t)

    def record(self, ctx: Context, t: int) -> None:
        """Append to `artifacts/derpp.json` what the buffer holds after domain t."""
        domains = self.buffer.data.get("domain", torch.zeros(0, dtype=torch.long))
        held = Counter(domains[: len(self.buffer)].tolist())
        seen = sum(self.corpus_sizes[: t + 1])
        path = ctx.artifacts_dir / "derpp.json"
        record = json.loads(path.read_text()) if path.exists() else {}
        record["buffer_size"] = self.buffer.size
        record["corpus_sequences"] = dict(zip(ctx.domains, self.corpus_sizes, strict=True))
        record.setdefault("after_domain", {})[ctx.domains[t]] = {
            "sequences": len(self.buffer),
            "per_domain": {ctx.domains[i]: held.get(i, 0) for i in range(t + 1)},
            "seen_sequences": seen,
            "share_of_seen": round(len(self.buffer) / seen, 6),
        }
        ctx.save_artifact("derpp.json", record)
        log.info("derpp after %s: %d sequences, %.3f %% of the %d seen", ctx.domains[t],
                 len(self.buffer), 100 * len(self.buffer) / seen, seen)

    def state_dict(self) -> dict[str, Tensor]:
        return self.buffer.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state:
            self.buffer.load_state_dict(state, device=self.device)


def _pad(values: Tensor, width: int, fill) -> Tensor:
    """Pad or cut dimension 1 to `width`."""
    if values.shape[1] >= width:
        return values[:, :width]
    shape = (values.shape[0], width - values.shape[1], *values.shape[2:])
    return torch.cat([values, values.new_full(shape, fill)], dim=1)


def _trim(memory: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop the padding columns no sampled sequence uses."""
    length = max(int(memory["attention_mask"].sum(1).max()), 1)
    return {k: v[:, :length] if v.dim() > 1 else v for k, v in memory.items()}
