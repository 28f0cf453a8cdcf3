"""`demix` (DEMix layers, Gururangan et al. 2022, as the paper runs it): adapter experts.

A new domain's expert starts as a copy of the existing expert with the lowest MLM perplexity on
the new domain's corpus (the first one starts fresh); only that expert trains, the LM is frozen.
At end-task time either the task's own expert is used (domain ID, the default) or, with
`mixture: true`, every expert so far, their outputs weighted per input by the posterior over
domains from each expert's pseudo-log-likelihood of the input (uniform prior; no domain ID).
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutput

from benchmark.config import knob
from methods import register
from methods.isolation import AdapterArgs, IsolationMethod
from methods.modeling import encoder_of, mlm_forward, mlm_head_of

if TYPE_CHECKING:
    from methods.base import Context

log = logging.getLogger(__name__)


@dataclass
class DemixArgs(AdapterArgs):
    mixture: bool = knob(
        False,
        "end task: likelihood-weighted mixture of experts instead of expert i")
    ppl_batches: int = knob(8, "batches of the new corpus scored per candidate expert")
    pll_groups: int = knob(5, "mixture: tokens masked in this many interleaved passes per input")


@torch.no_grad()
def corpus_loss(ctx: Context, model: nn.Module, t: int, batches: int) -> float:
    """Mean masked-LM loss of `model` on domain t's corpus, with fixed masks."""
    was_training = model.training
    model.eval()
    data = ctx.corpus(t)
    n = min(batches, math.ceil(len(data) / ctx.config.dap_batch_size))
    stream = ctx.mlm_batches(data, seed=ctx.seed_for("expert_scoring"), shuffle=False)
    total, tokens = 0.0, 0
    for _ in range(n):
        batch = next(stream)
        k = int((batch["labels"] != -100).sum())
        total += float(mlm_forward(model, batch).loss) * k
        tokens += k
    model.train(was_training)
    return total / max(tokens, 1)


class ExpertMixture(nn.Module):
    """An encoder whose output is the posterior-weighted sum of its adapter experts' outputs.

    The posterior comes from a frozen copy of the DAP-trained masked LM (`scorer`), so it is a
    function of the input alone and is cached per distinct input.
    """

    def __init__(self, encoder: nn.Module, scorer: nn.Module, experts: list[str],
                 special_ids: list[int], mask_token_id: int, groups: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.scorer = scorer.eval().requires_grad_(False)
        self.experts = experts
        self.config = encoder.config
        self.register_buffer("special_ids", torch.tensor(special_ids), persistent=False)
        self.mask_token_id = mask_token_id
        self.groups = groups
        self.cache: dict[tuple[int, ...], Tensor] = {}

    @torch.no_grad()
    def log_likelihood(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[batch, experts]: pseudo-log-likelihood of each input under each expert."""
        self.scorer.eval()
        real = attention_mask.bool() & ~torch.isin(input_ids, self.special_ids)
        position = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        scores = torch.zeros(input_ids.shape[0], len(self.experts), device=input_ids.device)
        body, head = encoder_of(self.scorer), mlm_head_of(self.scorer)
        for k, name in enumerate(self.experts):
            self.scorer.set_active_adapters(name)
            for g in range(self.groups):
                picked = real & (position % self.groups == g)
                if not picked.any():
                    continue
                masked = input_ids.masked_fill(picked, self.mask_token_id)
                hidden = body(input_ids=masked, attention_mask=attention_mask).last_hidden_state
                logp = F.log_softmax(head(hidden[picked]).float(), dim=-1)
                token = logp.gather(1, input_ids[picked].unsqueeze(1)).squeeze(1)
                row = picked.nonzero()[:, 0]
                scores[:, k].index_add_(0, row, token)
        return scores

    def posterior(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        keys = [tuple(ids[m.bool()].tolist()) for ids, m in zip(input_ids, attention_mask,
                                                                 strict=True)]
        missing = [i for i, key in enumerate(keys) if key not in self.cache]
        if missing:
            scores = self.log_likelihood(input_ids[missing], attention_mask[missing])
            for i, row in zip(missing, torch.softmax(scores, dim=-1), strict=True):
                self.cache[keys[i]] = row
        return torch.stack([self.cache[key] for key in keys])

    def forward(self, input_ids: Tensor, attention_mask: Tensor, **_: object) -> BaseModelOutput:
        weights = self.posterior(input_ids, attention_mask)
        mixed = 0.0
        for k, name in enumerate(self.experts):
            self.encoder.set_active_adapters(name)
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
            mixed = mixed + weights[:, k, None, None] * hidden.last_hidden_state
        return BaseModelOutput(last_hidden_state=mixed)


@register("demix")
class Demix(IsolationMethod):
    """DEMix: an adapter expert per domain, initialised from the lowest-perplexity expert."""
    table_rank = 140

    Args = DemixArgs
    kind = "adapter"
    per_domain = True
    needs_domain_id = True
    past_tasks_unchanged = True

    def __init__(self, args: DemixArgs | None = None) -> None:
        super().__init__(args)
        # Expert i alone never changes after domain i; a mixture gains experts as domains come.
        self.needs_domain_id = not self.args.mixture
        self.past_tasks_unchanged = not self.args.mixture

    def pick_expert(self, ctx: Context, t: int) -> tuple[int, list[float]]:
        """(index of the existing expert with the lowest perplexity on C_t, the perplexities)."""
        perplexities = []
        for j in range(t):
            self.modules.activate(self.names[j])
            loss = corpus_loss(ctx, ctx.model, t, self.args.ppl_batches)
            perplexities.append(math.exp(min(loss, 50.0)))
        return min(range(t), key=perplexities.__getitem__), perplexities

    def before_domain(self, ctx: Context, t: int) -> None:
        if t > 0:
            best, perplexities = self.pick_expert(ctx, t)
            self.modules.copy(self.names[best], self.names[t])
            log.info("demix: expert %s starts from %s (perplexities %s)", self.names[t],
                     self.names[best], [round(p, 3) for p in perplexities])
            path = ctx.artifacts_dir / "demix.json"
            record = json.loads(path.read_text()) if path.exists() else {}
            record[self.names[t]] = {"init_from": self.names[best], "perplexity": dict(
                zip(self.names[:t], [round(p, 5) for p in perplexities], strict=True))}
            ctx.save_artifact("demix.json", record)
        super().before_domain(ctx, t)

    def model_for_task(self, ctx: Context, i: int) -> nn.Module:
        if not self.args.mixture:
            return super().model_for_task(ctx, i)
        experts = self.names[: ctx.t + 1]
        encoder = super().model_for_task(ctx, i)
        for name in experts:
            for p in self.modules.parameters(name):
                p.requires_grad_(True)
        # the scorer is a separate frozen copy, so fine-tuning the encoder leaves the posterior be
        return ExpertMixture(encoder, copy.deepcopy(ctx.model), experts,
                             ctx.tokenizer.all_special_ids, ctx.tokenizer.mask_token_id,
                             self.args.pll_groups)
