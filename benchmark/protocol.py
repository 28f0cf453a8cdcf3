"""What a run measures and how it draws: which cells A[t][i] of the end-task matrix are
evaluated, the seed of every random stream, and the updates to the run's record.

Every random draw of a run takes its seed from `SEED_STREAMS` through `stream_seed` (or
`Context.seed_for`, which picks the base seed); no method invents one. The table keeps the
integer each stream has always had, so every committed result stays byte-identical:

====================  ===========================================  ==========================
stream                seed                                         drawn by
====================  ===========================================  ==========================
before_domain         domain_seed(s, 0, t)                         torch/numpy before the hook
dap                   domain_seed(s, 1, t)                         DAP batches and masks
finetune              domain_seed(r, 2, t, i)                      end task i after domain t
after_domain          domain_seed(s, 3, t)                         torch/numpy before the hook
fisher                s * 1009 + t                                 ewc / hat / avl-* samples
derpp_replay          s * 7919 + t                                 DER++ logit batches
buffer                s                                            reservoir buffer (DER++)
module_init           s                                            isolation modules' init
importance_general    s + 7                                        DAS general importance
importance_domain     s + 100 + t                                  DAS domain importance
importance_dga        s + 7 + t                                    DGA domain importance
importance_permute    t + 1 (t: domains in the history)            DAS RQ3 `permute`
replay_masks          seed_for("replay", 0) + 1                    replay's MLM masks
eval_masks            0                                            fixed masks of MLM losses
expert_scoring        0                                            DEMix expert likelihoods
theta0                0                                            θ0 init and pretraining
head_warmup           0                                            the LM head's warm-up
other names           domain_seed(s, 16 + crc32(name) % 10^6, t)   a method's own stream
====================  ===========================================  ==========================

`s` is the DAP-time seed (`RunConfig.for_dap().seed`: the run's `dap_seed` where set, else its
seed) and `r` the run's own seed: fine-tuning draws from `r`, everything DAP-time from `s`.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from benchmark.record import RunRecord


def domain_seed(seed: int, *parts: int) -> int:
    """A seed for one phase of a run, independent of everything before it (resume-safe)."""
    value = seed
    for part in parts:
        value = (value * 1_000_003 + part + 1) % (2**31 - 1)
    return value


def _other(name: str) -> Callable[[int, int, int | None], int]:
    stream = 16 + zlib.crc32(name.encode()) % 1_000_000
    return lambda s, t, i: domain_seed(s, stream, t, *(() if i is None else (i,)))


# name -> seed(s, t, i); see the module docstring for the table and who draws from each
SEED_STREAMS: dict[str, Callable[[int, int, int | None], int]] = {
    "before_domain": lambda s, t, i: domain_seed(s, 0, t),
    "dap": lambda s, t, i: domain_seed(s, 1, t),
    "finetune": lambda s, t, i: domain_seed(s, 2, t, *(() if i is None else (i,))),
    "after_domain": lambda s, t, i: domain_seed(s, 3, t),
    "fisher": lambda s, t, i: s * 1009 + t,
    "derpp_replay": lambda s, t, i: s * 7919 + t,
    "buffer": lambda s, t, i: s,
    "module_init": lambda s, t, i: s,
    "importance_general": lambda s, t, i: s + 7,
    "importance_domain": lambda s, t, i: s + 100 + t,
    "importance_dga": lambda s, t, i: s + 7 + t,
    "importance_permute": lambda s, t, i: t + 1,
    "replay_masks": lambda s, t, i: _other("replay")(s, 0, None) + 1,
    "eval_masks": lambda s, t, i: 0,
    "expert_scoring": lambda s, t, i: 0,
    "theta0": lambda s, t, i: 0,
    "head_warmup": lambda s, t, i: 0,
}


def stream_seed(name: str, seed: int, t: int = 0, i: int | None = None) -> int:
    """The seed of stream `name` for domain t (task i) of a run whose base seed is `seed` (the
    DAP-time seed; the run's own seed for `finetune`). A name not in `SEED_STREAMS` gets a
    stream of its own from its CRC32, so an outside method's draws stay independent."""
    return SEED_STREAMS.get(name, _other(name))(seed, t, i)


Cell = Literal["evaluate", "copy", "skip"]


@dataclass(frozen=True)
class Protocol:
    """Which end-task cells a run of `domains` domains evaluates (`eval_matrix`), and the
    record updates of each domain and cell."""

    domains: int
    eval_matrix: str = "full"  # "full": every A[t][i <= t]; "diagonal": A[i][i] and the last row

    def cell(self, t: int, i: int, past_tasks_unchanged: bool = False) -> Cell:
        """What A[t][i] gets: `skip` (not evaluated: a diagonal matrix off its diagonal before
        the last row), `copy` (A[i][i]: the method leaves task i's model as it was), else
        `evaluate` (fine-tune or probe task i on the model after domain t)."""
        if i < t and t < self.domains - 1 and self.eval_matrix == "diagonal":
            return "skip"
        if past_tasks_unchanged and i < t:
            return "copy"
        return "evaluate"

    def evaluated(self, past_tasks_unchanged: bool = False) -> list[tuple[int, int]]:
        """The cells (t, i) a run fine-tunes (or probes), in the order it does."""
        return [(t, i) for t in range(self.domains) for i in range(t + 1)
                if self.cell(t, i, past_tasks_unchanged) == "evaluate"]

    @staticmethod
    def record_domain(record: RunRecord, losses: list[float], steps: int,
                      general_loss: float | None, dap_s: float) -> None:
        """Append domain t's DAP losses, steps, general MLM loss and seconds, and open its
        row of the end-task matrices."""
        record.dap_loss.append(losses)
        record.dap_steps.append(steps)
        if general_loss is not None:
            record.general_mlm_loss.append(general_loss)
        record.timings["dap_s"].append(round(dap_s, 3))
        record.mf1.append([])
        record.acc.append([])
        record.collapsed.append([])
        record.timings["finetune_s"].append([])

    @staticmethod
    def record_cell(record: RunRecord, t: int, mf1: float | None, acc: float | None,
                    collapsed: bool | None, seconds: float) -> None:
        """Append A[t][i] (MF1, accuracy rounded to 4 places; None: not evaluated)."""
        record.mf1[t].append(None if mf1 is None else round(mf1, 4))
        record.acc[t].append(None if acc is None else round(acc, 4))
        record.collapsed[t].append(collapsed)
        record.timings["finetune_s"][t].append(round(seconds, 3))

    @staticmethod
    def record_mlm_row(record: RunRecord, losses: list[float], seconds: float) -> None:
        """Append a row of the MLM-loss matrix (rounded to 5 places) and its seconds."""
        record.mlm_loss.append([round(v, 5) for v in losses])
        record.timings.setdefault("mlm_loss_s", []).append(round(seconds, 3))
