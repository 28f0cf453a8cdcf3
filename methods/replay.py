"""Replay: each DAP batch carries a share r of sequences replayed from general and earlier text.

The recipe continual pre-training has converged on: Ibrahim et al. (TMLR 2024, "Simple and
Scalable Strategies to Continually Pre-train Large Language Models") find that re-warming and
re-decaying the learning rate plus replaying a small share of the earlier data matches
re-training on the union of all data: they compare replay shares from 1 % to 50 %, where a
few per cent (1 %, 5 %) undo most forgetting under a weak shift (Pile → SlimPajama) and a
strong one (→ German) wants more (25 %). TiC-LM (Li et al., ACL 2025) and Jin et al. (2022,
"Lifelong Pretraining: Continually Adapting Language Models to Emerging Corpora") find replay
among the hardest baselines to beat. Hence the defaults: `share` 0.05 and `source: general`
(the base model's own kind of data, as Ibrahim et al. replay the Pile, the first dataset), and
the presets `replay-share-0.01`, `replay` (0.05), `replay-share-0.25`, `replay-past`,
`replay-both` and `replay-rewarm` (5 % with a cosine schedule re-warmed per domain,
`benchmark/schedule.py`).

The batch: of the B = `dap_batch_size` rows of a DAP step, n = ⌊r · B + ½⌋ are replayed (at
least 1 when r > 0, at most B − 1) and replace the current domain's last n rows, so every step
still trains B sequences and costs what an `ncl` step costs (the same steps, batch and
sequence length: its tokens and FLOPs are ncl's up to the replayed rows' lengths). The current
domain's stream is ncl's, rows dropped included, so only the replaced rows differ. Examples:
B = 64 (syn6): r = 0.01, 0.05, 0.25 give n = 1, 3, 16; B = 16 (real6): n = 1, 1, 4 (there
1 % and 5 % are the same row; B = 248 (das6): n = 2, 12, 62).

The sources (domain t):
- `general`: the suite's general replay text (`Context.replay_corpus`: syn6's θ0 pre-training
  corpus; real6 / das6: WikiText-2 test, standing in for the base model's pre-training data),
  never the held-out general corpus on which the general MLM loss is measured (a sequence in
  both is dropped from the replay pool).
- `past`: the corpora of domains 0 … t−1, each replayed row from a domain drawn uniformly,
  then a sequence of it drawn uniformly; nothing on the first domain (the batch is all current).
- `both`: n − ⌊n/2⌋ general rows and ⌊n/2⌋ past rows (all n general on the first domain).

The sampler draws indices with replacement from its own generator and masks the drawn rows with
its own `MLMCollator` generator, both seeded once from the run seed; their states are the
method's state, saved with every domain checkpoint, so a killed and resumed run draws the same
batches. Under several processes every process draws the same n rows and keeps its slice
(rank::world), as it does with the current batch. After each domain `artifacts/replay.json`
records the rows and tokens trained per source.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from benchmark.atomic import read_json
from benchmark.config import below_one
from benchmark.data import MLMCollator
from methods import Method, knob, register
from methods.modeling import MLMOutput, mlm_forward

if TYPE_CHECKING:
    from methods.base import Context

log = logging.getLogger(__name__)


@dataclass
class Args:
    share: float = knob(
        0.05,
        "r: the share of every DAP batch replayed (Ibrahim et al. 2024 study 1, 5, 25"
        " %)", check=below_one)
    source: Literal["general", "past", "both"] = knob(
        "general",
        "what is replayed: general text, the earlier domains' corpora, or half of "
        "each")


def replay_rows(share: float, batch_size: int) -> int:
    """n of a batch's `batch_size` rows replayed: ⌊r · B + ½⌋, at least 1 when r > 0, at most
    B − 1 (one current row stays)."""
    if share <= 0:
        return 0
    return min(batch_size - 1, max(1, int(share * batch_size + 0.5)))


def source_rows(source: str, n: int, t: int) -> tuple[int, int]:
    """(general rows, past rows) of the n replayed rows on domain t."""
    if source == "general" or (source == "both" and t == 0):
        return n, 0
    if source == "past":
        return (0, n) if t > 0 else (0, 0)
    return n - n // 2, n // 2


class ReplaySampler:
    """Seeded draws of replayed sequences and their masks; the state resumes the stream."""

    def __init__(self, tokenizer, mlm_probability: float, seed: int, mask_seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.collator = MLMCollator(tokenizer, mlm_probability, mask_seed)

    def draw(self, general, past: list, n_general: int, n_past: int) -> tuple[list, list[int]]:
        """(rows {"input_ids"}, source of each: -1 general, d past domain d) drawn: general
        indices first, then per past row a domain and an index."""
        rows, sources = [], []
        if n_general:
            for i in torch.randint(len(general), (n_general,), generator=self.generator):
                rows.append({"input_ids": general[int(i)]["input_ids"]})
                sources.append(-1)
        for _ in range(n_past):
            d = int(torch.randint(len(past), (1,), generator=self.generator))
            i = int(torch.randint(len(past[d]), (1,), generator=self.generator))
            rows.append({"input_ids": past[d][i]["input_ids"]})
            sources.append(d)
        return rows, sources

    def state_dict(self) -> dict[str, Tensor]:
        return {"replay_rng": self.generator.get_state(),
                "replay_mask_rng": self.collator.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["replay_rng"])
        self.collator.generator.set_state(state["replay_mask_rng"])


def combine(current: dict[str, Tensor], replayed: dict[str, Tensor], pad_id: int
            ) -> dict[str, Tensor]:
    """`current`'s first rows, then `replayed`'s (replacing current's last rows), padded to one
    width."""
    keep = current["input_ids"].shape[0] - replayed["input_ids"].shape[0]
    width = max(current["input_ids"].shape[1], replayed["input_ids"].shape[1])
    fills = {"input_ids": pad_id, "clean_input_ids": pad_id, "attention_mask": 0, "labels": -100}
    out = {}
    for key, fill in fills.items():
        parts = []
        for values in (current[key][:keep], replayed[key].to(current[key].device)):
            extra = values.new_full((values.shape[0], width - values.shape[1]), fill)
            parts.append(torch.cat([values, extra], dim=1))
        out[key] = torch.cat(parts)
    return out


@register("replay")
class Replay(Method):
    """Replace a share r of every DAP batch by general and/or earlier domains' sequences."""
    table_rank = 115

    Args = Args

    def __init__(self, args: Args | None = None) -> None:
        super().__init__(args)
        self.sampler: ReplaySampler | None = None
        self.general = None
        self.counts: Counter = Counter()

    def setup(self, ctx: Context) -> None:
        cfg = ctx.config
        self.sampler = ReplaySampler(ctx.tokenizer, cfg.mlm_probability,
                                     ctx.seed_for("replay"), ctx.seed_for("replay_masks"))
        if self.args.source != "past":
            self.general = ctx.replay_corpus()
            if self.general is None:
                raise ValueError(f"replay: source {self.args.source!r} needs general text to "
                                 f"replay; suite {ctx.suite.name!r} has none (use source: past)")
        n = replay_rows(self.args.share, cfg.dap_batch_size)
        log.info("replay: %d of %d rows per DAP batch from %s", n, cfg.dap_batch_size,
                 self.args.source)

    def before_domain(self, ctx: Context, t: int) -> None:
        self.counts = Counter()

    def mix(self, ctx: Context, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The batch with its last rows replaced by this step's replayed rows."""
        world = ctx.accelerator.num_processes
        current = batch["input_ids"].shape[0]  # B / world, less where a corpus is smaller
        n = replay_rows(self.args.share, min(ctx.config.dap_batch_size, current * world))
        n_general, n_past = source_rows(self.args.source, n, ctx.t)
        past = [ctx.corpus(d) for d in range(ctx.t)]
        rows, sources = self.sampler.draw(self.general, past, n_general, n_past)
        mine = slice(ctx.accelerator.process_index, None, world)
        rows, sources = rows[mine], sources[mine]
        self.counts["current"] += current - len(rows)
        self.counts["current_tokens"] += int(batch["attention_mask"][:current - len(rows)].sum())
        if not rows:
            return batch
        replayed = self.sampler.collator(rows)
        for source, length in zip(sources, replayed["attention_mask"].sum(1).tolist(),
                                  strict=True):
            name = "general" if source < 0 else ctx.domains[source]
            self.counts[name] += 1
            self.counts[f"{name}_tokens"] += int(length)
        return combine(batch, replayed, ctx.tokenizer.pad_token_id)

    def forward(self, ctx: Context, model, batch: dict[str, Tensor]) -> MLMOutput:
        return mlm_forward(model, self.mix(ctx, batch))

    def after_domain(self, ctx: Context, t: int) -> None:
        """Append to `artifacts/replay.json` the rows and tokens domain t trained per source."""
        path = ctx.artifacts_dir / "replay.json"
        record = read_json(path) if path.exists() else {}
        record["share"], record["source"] = self.args.share, self.args.source
        record["replayed_rows_per_step"] = replay_rows(self.args.share, ctx.config.dap_batch_size)
        names = ["current", "general", *ctx.domains[:t]]
        record.setdefault("after_domain", {})[ctx.domains[t]] = {
            "rows": {k: self.counts[k] for k in names if self.counts[k]},
            "tokens": {k: self.counts[f"{k}_tokens"] for k in names if self.counts[k]},
        }
        ctx.save_artifact("replay.json", record)

    def state_dict(self) -> dict[str, Tensor]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state:
            self.sampler.load_state_dict(state)
