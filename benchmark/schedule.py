"""The DAP learning-rate schedule: its shape (`dap_schedule`) and whether each domain re-warms.

Every shape multiplies `dap_lr` by a factor of the step s, with W warm-up steps (a linear ramp
s / W, Transformers' `get_*_schedule_with_warmup`) out of N steps:

- `linear` (default): (N − s) / (N − W) after the warm-up, to 0 at N (Transformers'
  `get_linear_schedule_with_warmup`, the companion code's DAP schedule: ContinualLM commit
  57e498c `approaches/posttrain.py` l.80-87 builds `get_scheduler(lr_scheduler_type, ...)`
  with `config.py` l.104-108's default `linear` and l.205-208's `warmup_proportion` 0.1).
- `cosine`: ½ (1 + cos(π (s − W) / (N − W))), a half cosine to 0 (Transformers'
  `get_cosine_schedule_with_warmup` with `num_cycles=0.5`); the schedule Ibrahim et al. (TMLR
  2024, "Simple and Scalable Strategies to Continually Pre-train LLMs") re-warm and re-decay
  for every new dataset, and Gupta et al. (2023, "Continual Pre-Training of LLMs: How to
  (re)warm your model?") study.
- `constant`: 1 after the warm-up (`get_constant_schedule_with_warmup`).
- `wsd`: warm-up, stable at 1, then a linear decay to 0 over the last D = ⌈`dap_decay` · S⌉
  steps: (N − s) / D (warm-up-stable-decay, MiniCPM, Hu et al. 2024; the "infinite" schedules
  of Ibrahim et al., whose constant phase lets a sequence continue without knowing its end).

`dap_rewarm: true` (default): each domain is its own schedule, N = S (the domain's DAP steps),
W = ⌈`dap_warmup` · S⌉: the learning rate is re-warmed and re-decayed per domain, as the
companion code does (and as this package always did). `dap_rewarm: false`: one schedule over
the whole sequence of T domains, N = T · S, warmed up once over the same W steps at its start;
domain t runs its steps t · S ... (t + 1) · S − 1 (and `wsd` decays only at the end of the last
domain). Both settings need no state beyond the domain index, so a resumed run gets the same
learning rates.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("linear", "cosine", "constant", "wsd")


def lr_factor(schedule: str, step: int, warmup: int, total: int, decay: int) -> float:
    """The factor on the peak learning rate at `step` of a `total`-step schedule (see above).

    The warm-up and the linear decay are Transformers' expressions term for term, so the default
    schedule is the very `get_linear_schedule_with_warmup` every committed result used."""
    if step < warmup:
        return float(step) / float(max(1, warmup))
    if schedule == "linear":
        return max(0.0, float(total - step) / float(max(1, total - warmup)))
    if schedule == "cosine":
        progress = float(step - warmup) / float(max(1, total - warmup))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        return 1.0 if step < total - decay else max(0.0, float(total - step) / float(max(1, decay)))
    raise ValueError(f"unknown DAP schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")


def dap_schedule(optimizer: Optimizer, cfg, steps: int, t: int, domains: int) -> LambdaLR:
    """The learning-rate scheduler of domain t's `steps` DAP steps (`cfg`: the run config's
    `dap_schedule`, `dap_rewarm`, `dap_warmup`, `dap_decay`; `domains`: T)."""
    warmup = math.ceil(cfg.dap_warmup * steps)
    decay = math.ceil(cfg.dap_decay * steps)
    if cfg.dap_rewarm:
        offset, total = 0, steps
    else:
        if steps != cfg.dap_steps:
            raise ValueError(
                f"dap_rewarm: false spans one schedule over {domains} x dap_steps "
                f"({cfg.dap_steps}) steps; this method DAP-trains {steps} steps on domain {t}")
        offset, total = t * steps, domains * steps
    return LambdaLR(optimizer, lambda s: lr_factor(cfg.dap_schedule, offset + s, warmup, total,
                                                   decay))
