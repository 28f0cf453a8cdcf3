"""Avalanche's continual-learning plugins as zoo rows (`avl-*`), driven from our hooks.

Avalanche (`avalanche-lib`, the `[avalanche]` extra) implements strategies as plugins: objects
with callbacks (`before_training_exp`, `before_backward`, `after_training_iteration`, ...) that
read and change a strategy object (`strategy.model`, `strategy.loss`, `strategy.mbatch`,
`strategy.clock`, ...). `AvalancheMethod` runs one unmodified plugin inside our DAP loop: it
keeps a small stand-in for the strategy (`StrategyStandIn`) and calls the plugin's callbacks
from our hooks in the order Avalanche's `SupervisedTemplate` does:

    before_domain  -> before_training, before_training_exp, before_training_epoch
    forward        -> before_training_iteration, (gradients cleared), before_forward,
                      after_forward
    loss           -> before_backward (the plugin adds its penalty to `strategy.loss`)
    after_backward -> after_backward (gradient projections), before_update
    after_step     -> after_update, after_training_iteration
    after_domain   -> after_training_epoch, after_training_exp, after_training

What a plugin sees of the masked LM (Avalanche knows classification only):
- batches are tuples `(x, y, t)`: `x` = [batch, 2, length] holding the masked input ids and
  a 0/1 row marking the positions to predict, `y` the MLM labels (-100 elsewhere), `t` zeros;
- `strategy.model` is `MaskedLogits`, which shares the masked LM's parameters and returns the
  vocabulary logits of the marked positions only, and `strategy._criterion` is the
  cross-entropy of those logits against `y`'s non-(-100) labels, i.e. our L_mlm;
- `strategy.experience.dataset` (the data a plugin's own passes read: importance, memory) is
  at most `sequences` sequences of the domain's corpus, masked once (seeded), as an
  AvalancheDataset of fixed-width tensors (Avalanche's loaders ignore a dataset's collate
  function, so masking is done per item, not per batch).

Corrections of plugins that silently misbehave on an MLM are small named context managers in
`PATCHES`, applied around every plugin call of the rows that list them; none copies a plugin:
- `restore_train_mode` (every row): a plugin call may leave the model in `eval()` mode
  (RWalk's `_update_grad` calls `model.eval()` before every step and never undoes it, so the
  DAP step itself ran without dropout); the mode the loop set is restored after each call.
- `si_copy_snapshots` (avl-si): SI stores weight snapshots as `param.detach().cpu().flatten()`,
  which on a CPU model is a view of the live weights, so new − old θ is always 0 and SI's
  importance stays 0 (it does nothing); the snapshots are copied.
- `si_cache_parameters` (avl-si): SI walks the whole module tree (`get_layers_and_params`) in
  every call, five times a step; the list of parameters is computed once per plugin call.
- `rwalk_finite_penalty` (avl-rwalk): in a domain of fewer than `delta_t` steps RWalk never
  updates its scores and its penalty is 0/0 = NaN in every weight (the loss turns NaN); the
  score term is taken as 0 there.

Plugins that run backward passes of their own (importance passes, reference gradients) are
refused under several processes: those gradients would not be averaged across processes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.config import knob
from methods import Method, MethodError, register
from methods.modeling import MLMOutput, encoder_of, mlm_head_of

if TYPE_CHECKING:
    from methods.base import Context

log = logging.getLogger(__name__)
INSTALL = "pip install -e '.[avalanche]'"
STATE_FILE = "avalanche_state.pt"


def import_avalanche(row: str) -> Any:
    """`avalanche.training.plugins`, or a one-line MethodError naming the missing install."""
    try:
        from avalanche.training import plugins
    except ImportError as error:
        raise MethodError(f"method {row!r} needs Avalanche, which is not installed ({error}); "
                          f"run: {INSTALL}") from None
    return plugins


# -- what a plugin sees of the masked LM ---------------------------------------------------------
class MaskedLogits(nn.Module):
    """The masked LM as Avalanche sees it: `x` [batch, 2, length] -> logits of marked tokens."""

    def __init__(self, mlm: nn.Module, pad_id: int) -> None:
        super().__init__()
        self.mlm = mlm
        self.pad_id = pad_id

    def forward(self, x: Tensor) -> Tensor:
        ids, picked = x[:, 0], x[:, 1].bool()
        hidden = encoder_of(self.mlm)(input_ids=ids,
                                      attention_mask=(ids != self.pad_id).long()).last_hidden_state
        return mlm_head_of(self.mlm)(hidden[picked])


def masked_cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """L_mlm from `MaskedLogits`' output: cross-entropy against the labels that are not -100."""
    return F.cross_entropy(logits.float(), y[y != -100])


def to_avalanche(batch: dict[str, Tensor]) -> list[Tensor]:
    """Our MLM batch as Avalanche's `(x, y, t)` minibatch."""
    picked = (batch["labels"] != -100).long()
    x = torch.stack([batch["input_ids"], picked], dim=1)
    return [x, batch["labels"], torch.zeros(len(x), dtype=torch.long, device=x.device)]


def masked_tensors(ids: list[list[int]], tokenizer, probability: float,
                   seed: int) -> tuple[Tensor, Tensor]:
    """`(x, y)` for sequences `ids`, masked once by our MLM collator, padded to one width."""
    from benchmark.data import MLMCollator

    batch = MLMCollator(tokenizer, probability, seed)([{"input_ids": row} for row in ids])
    return to_avalanche(batch)[:2]


def avalanche_dataset(x: Tensor, y: Tensor):
    """An AvalancheDataset of `(x, y, t)` items, task label 0 (what plugins and loaders read)."""
    from torch.utils.data import TensorDataset

    return avalanche_dataset_of(TensorDataset(x, y))


def avalanche_dataset_of(data):
    """`data` (items `(x, y)`) as an AvalancheDataset of `(x, y, t)` items, task label 0."""
    from avalanche.benchmarks.utils import DataAttribute, make_avalanche_dataset

    labels = DataAttribute([0] * len(data), "targets_task_labels", use_in_getitem=True)
    return make_avalanche_dataset(data, data_attributes=[labels])


# -- the strategy stand-in -----------------------------------------------------------------------
@dataclass
class Clock:
    """The counters of Avalanche's `Clock` plugin that plugins read."""

    train_exp_counter: int = 0
    train_iterations: int = 0
    train_exp_iterations: int = 0
    train_epoch_iterations: int = 0
    train_exp_epochs: int = 0


class GradClearer:
    """`strategy.optimizer` as plugins use it: only `zero_grad()` (the loop owns the optimiser)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.model.zero_grad(set_to_none=set_to_none)


class StrategyStandIn:
    """The attributes of Avalanche's `SupervisedTemplate` its regularisation and episodic-memory
    plugins read or write; nothing else."""

    def __init__(self, model: nn.Module, pad_id: int, device: torch.device,
                 batch_size: int) -> None:
        self.model = MaskedLogits(model, pad_id)
        self.optimizer = GradClearer(self.model)
        self.device = device
        self.train_mb_size = batch_size
        self.clock = Clock()
        self.is_training = True
        self.experience: Any = None
        self.mbatch: list[Tensor] | None = None
        self.mb_output: Tensor | None = None
        self.loss: Tensor | None = None
        self._criterion = masked_cross_entropy
        self.plugins: list = []

    @property
    def mb_x(self) -> Tensor:
        return self.mbatch[0]

    @property
    def mb_y(self) -> Tensor:
        return self.mbatch[1]

    @property
    def mb_task_id(self) -> Tensor:
        return self.mbatch[-1]

    def criterion(self) -> Tensor:
        return self._criterion(self.mb_output, self.mb_y)


# -- named corrections ---------------------------------------------------------------------------
@contextlib.contextmanager
def restore_train_mode(method: AvalancheMethod, event: str) -> Iterator[None]:
    """Put the model back in the mode it had before the plugin call (RWalk leaves `eval()`)."""
    strategy = method.strategy
    was_training = strategy.model.training
    try:
        yield
    finally:
        strategy.model.train(was_training)


@contextlib.contextmanager
def _static_replaced(cls: type, name: str, function: Any) -> Iterator[None]:
    """`cls.name` (a staticmethod) replaced by `function` for the block, then restored."""
    original = cls.__dict__[name]
    setattr(cls, name, staticmethod(function))
    try:
        yield
    finally:
        setattr(cls, name, original)


@contextlib.contextmanager
def si_copy_snapshots(method: AvalancheMethod, event: str) -> Iterator[None]:
    """SI's weight snapshots as copies, not views of the live CPU parameters."""
    si = type(method.plugin)

    @torch.no_grad()
    def extract_weights(model, target, excluded_parameters) -> None:
        for name, param in si.allowed_parameters(model, excluded_parameters):
            target[name].data = param.detach().flatten().cpu().clone()

    with _static_replaced(si, "extract_weights", extract_weights):
        yield


@contextlib.contextmanager
def si_cache_parameters(method: AvalancheMethod, event: str) -> Iterator[None]:
    """SI's parameter list computed once per plugin call instead of once per use."""
    si = type(method.plugin)
    original = si.__dict__["allowed_parameters"]
    found: dict[tuple[int, frozenset], list] = {}

    def allowed_parameters(model, excluded_parameters):
        key = (id(model), frozenset(excluded_parameters))
        if key not in found:
            found[key] = original.__func__(model, excluded_parameters)
        return found[key]

    with _static_replaced(si, "allowed_parameters", allowed_parameters):
        yield


@contextlib.contextmanager
def rwalk_finite_penalty(method: AvalancheMethod, event: str) -> Iterator[None]:
    """RWalk's per-domain penalty without 0/0: a domain shorter than `delta_t` steps has no
    score update, all scores stay 0 and `relu(score) / max_score` is NaN in every weight; the
    score term is taken as 0 then (the penalty is the normalised Fisher alone)."""
    yield
    rwalk = method.plugin
    if event != "after_training_exp" or any(s.data.abs().max() > 0
                                            for s in rwalk.exp_scores.values()):
        return
    log.warning("%s: no RWalk score update in a domain of fewer than delta_t=%d steps; its "
                "penalty is the normalised Fisher alone", method.name, rwalk.delta_t)
    top = max(imp.data.max() for imp in rwalk.exp_importance.values())
    for name, penalty in rwalk.exp_penalties.items():
        penalty.data = rwalk.exp_importance[name].data / top


PATCHES = {f.__name__: f for f in (restore_train_mode, si_copy_snapshots, si_cache_parameters,
                                   rwalk_finite_penalty)}


# -- the adapter ---------------------------------------------------------------------------------
class AvalancheMethod(Method):
    """One Avalanche plugin run from our hooks through `StrategyStandIn`."""

    plugin_class: ClassVar[str] = ""  # the class name in `avalanche.training.plugins`
    state_attrs: ClassVar[tuple[str, ...]] = ()  # the plugin's attributes saved with checkpoints
    own_backward: ClassVar[bool] = True  # runs backward passes of its own (one process only)
    patches: ClassVar[tuple[str, ...]] = ("restore_train_mode",)
    table_rank = 145  # beside the other continual baselines, before DGA and DAS

    def __init__(self, args: Any = None) -> None:
        super().__init__(args)
        if getattr(self.args, "sequences", 1) <= 0:
            raise MethodError(f"{self.name}: sequences must be a positive number of sequences")
        self._plugins = import_avalanche(self.name)
        self.plugin = getattr(self._plugins, self.plugin_class)(**self.plugin_kwargs())
        self.strategy: StrategyStandIn | None = None

    def plugin_kwargs(self) -> dict[str, Any]:
        """The plugin's constructor arguments from `self.args`."""
        return {k: v for k, v in vars(self.args).items() if k != "sequences"}

    def call(self, *events: str) -> None:
        """Run the plugin's callbacks `events` in order, each inside the row's patches."""
        for event in events:
            with contextlib.ExitStack() as stack:
                for name in self.patches:
                    stack.enter_context(PATCHES[name](self, event))
                getattr(self.plugin, event)(self.strategy)

    # -- the loop's moments ----------------------------------------------------------------
    def setup(self, ctx: Context) -> None:
        if self.own_backward and ctx.accelerator.num_processes > 1:
            raise MethodError(
                f"{self.name}: Avalanche's {self.plugin_class} runs backward passes of its own, "
                "whose gradients would not be averaged across processes; run it in one process")
        self.strategy = StrategyStandIn(ctx.model, ctx.tokenizer.pad_token_id,
                                        ctx.accelerator.device, ctx.config.dap_batch_size)

    def before_domain(self, ctx: Context, t: int) -> None:
        s = self.strategy
        # only plugins with passes of their own over the domain's data have `sequences`
        data = self.experience_data(ctx, t) if hasattr(self.args, "sequences") else None
        s.experience = SimpleNamespace(dataset=data,
                                       current_experience=t, task_label=0, task_labels=[0])
        s.clock.train_exp_counter = t
        s.clock.train_exp_iterations = s.clock.train_epoch_iterations = 0
        s.clock.train_exp_epochs = 0
        self.call("before_training", "before_training_exp", "before_training_epoch")

    def experience_data(self, ctx: Context, t: int):
        """At most `sequences` sequences of domain t, masked once, seeded by run seed and t."""
        data = ctx.corpus(t)
        generator = torch.Generator().manual_seed(ctx.seed_for("fisher", t))
        rows = torch.randperm(len(data), generator=generator)[:self.args.sequences].tolist()
        ids = [data[i]["input_ids"] for i in rows]
        x, y = masked_tensors(ids, ctx.tokenizer, ctx.config.mlm_probability,
                              ctx.seed_for("fisher", t))
        return avalanche_dataset(x, y)

    def forward(self, ctx: Context, model: nn.Module, batch: dict[str, Tensor]) -> MLMOutput:
        s = self.strategy
        s.mbatch = to_avalanche(batch)
        self.call("before_training_iteration")
        s.model.zero_grad(set_to_none=True)  # as the template, after before_training_iteration
        self.call("before_forward")
        hidden = encoder_of(model)(input_ids=batch["input_ids"],
                                   attention_mask=batch["attention_mask"]).last_hidden_state
        picked = batch["labels"] != -100
        s.mb_output = mlm_head_of(model)(hidden[picked])
        self.call("after_forward")
        return MLMOutput(loss=F.cross_entropy(s.mb_output.float(), batch["labels"][picked]),
                         hidden=hidden)

    def loss(self, ctx: Context, batch: dict[str, Tensor], outputs: MLMOutput) -> Tensor:
        self.strategy.loss = outputs.loss.clone()  # plugins add in place (`loss += penalty`)
        self.call("before_backward")
        return self.strategy.loss

    def after_backward(self, ctx: Context) -> None:
        self.call("after_backward", "before_update")

    def after_step(self, ctx: Context) -> None:
        self.call("after_update", "after_training_iteration")
        clock = self.strategy.clock
        clock.train_iterations += 1
        clock.train_exp_iterations += 1
        clock.train_epoch_iterations += 1

    def after_domain(self, ctx: Context, t: int) -> None:
        self.call("after_training_epoch", "after_training_exp", "after_training")
        self.strategy.model.zero_grad(set_to_none=True)
        self.strategy.clock.train_exp_counter = t + 1

    # -- state saved with every domain checkpoint ------------------------------------------
    def save_state(self, directory: Path) -> None:
        state = {"clock": vars(self.strategy.clock).copy(),
                 "plugin": {a: getattr(self.plugin, a) for a in self.state_attrs}}
        torch.save(state, directory / STATE_FILE)

    def load_state(self, directory: Path) -> None:
        path = directory / STATE_FILE
        if not path.exists():
            raise MethodError(f"{self.name}: checkpoint {directory} has no {STATE_FILE}")
        # our own file, written by `save_state`: plugin objects (ParamData, datasets) need pickle
        state = torch.load(path, map_location=self.strategy.device, weights_only=False)
        vars(self.strategy.clock).update(state["clock"])
        for attr, value in state["plugin"].items():
            setattr(self.plugin, attr, value)
        self.after_load()

    def after_load(self) -> None:
        """Rebuild what a plugin derives from its saved state (loaders, iterators)."""


# -- the rows ------------------------------------------------------------------------------------
# Each row's defaults live in its Args: Avalanche's own defaults where it has them (MAS, RWalk),
# else values sized for the syn6 default profile.
@dataclass
class MASArgs:
    lambda_reg: float = knob(1.0, "weight of the penalty Σ Ω (θ − θ*)²")
    alpha: float = knob(0.5, "Ω ← α Ω_old + (1 − α) Ω_new")
    sequences: int = knob(512, "sequences of each domain the importance pass reads")


@register("avl-mas")
class AvlMAS(AvalancheMethod):
    """MAS (Aljundi et al., 2018) via Avalanche's MASPlugin: importance |∂‖logits‖²/∂θ|."""

    Args = MASArgs
    plugin_class = "MASPlugin"
    state_attrs = ("params", "importance")


@dataclass
class SIArgs:
    si_lambda: float = knob(1.0, "weight of the penalty Σ Ω (θ − θ*)²")
    eps: float = knob(1e-7, "damping of Ω = Σ −g Δθ / (Δθ_domain² + eps)")


@register("avl-si")
class AvlSI(AvalancheMethod):
    """Synaptic Intelligence (Zenke et al., 2017) via Avalanche's plugin (snapshots patched)."""

    Args = SIArgs
    plugin_class = "SynapticIntelligencePlugin"
    state_attrs = ("ewc_data", "syn_data")
    own_backward = False  # uses the step's own (averaged) gradients
    patches = ("restore_train_mode", "si_copy_snapshots", "si_cache_parameters")


@dataclass
class RWalkArgs:
    ewc_lambda: float = knob(0.1, "weight of the penalty")
    ewc_alpha: float = knob(0.9, "moving-average factor of the Fisher (EWC++)")
    delta_t: int = knob(10, "steps between score updates")


@register("avl-rwalk")
class AvlRWalk(AvalancheMethod):
    """RWalk (Chaudhry et al., 2018) via Avalanche's RWalkPlugin (train mode restored)."""

    Args = RWalkArgs
    plugin_class = "RWalkPlugin"
    state_attrs = ("iter_importance", "exp_scores", "exp_params", "exp_importance",
                   "exp_penalties")
    patches = ("restore_train_mode", "rwalk_finite_penalty")


@dataclass
class AGEMArgs:
    patterns_per_experience: int = knob(256, "sequences of each domain kept in memory")
    sample_size: int = knob(64, "memory sequences per reference gradient")
    sequences: int = knob(512, "sequences of each domain the memory is drawn from")


@register("avl-agem")
class AvlAGEM(AvalancheMethod):
    """A-GEM (Chaudhry et al., 2019) via Avalanche's AGEMPlugin: project on a memory gradient."""

    Args = AGEMArgs
    plugin_class = "AGEMPlugin"
    state_attrs = ("buffers",)

    def after_load(self) -> None:
        # AGEM keeps a loader over its buffers; `update_memory` rebuilds it from the last one
        # (which holds no more than `patterns_per_experience` items, so it is kept whole)
        if self.plugin.buffers:
            last = self.plugin.buffers.pop()
            self.plugin.update_memory(last)


@dataclass
class GEMArgs:
    patterns_per_experience: int = knob(32, "sequences of each domain kept in memory")
    memory_strength: float = knob(0.5, "γ, the margin of the projection's constraints")
    sequences: int = knob(512, "sequences of each domain the memory is drawn from")


@register("avl-gem")
class AvlGEM(AvalancheMethod):
    """GEM (Lopez-Paz & Ranzato, 2017) via Avalanche's GEMPlugin (quadprog projection)."""

    Args = GEMArgs
    plugin_class = "GEMPlugin"
    state_attrs = ("memory_x", "memory_y", "memory_tid")


@dataclass
class EWCArgs:
    lam: float = knob(5000.0, "λ in our convention, λ/2 · Σ F (θ − θ*)²: the plugin gets λ/2")
    mode: Literal["separate", "online"] = knob(
        "separate",
        "Avalanche's \"separate\" (one penalty per domain) or \"online\"")
    decay_factor: float = knob(1.0, "the \"online\" mode's Fisher decay")
    sequences: int = knob(512, "sequences of each domain the Fisher is estimated on")


@register("avl-ewc")
class AvlEWC(AvalancheMethod):
    """EWC via Avalanche's EWCPlugin, λ as our `ewc` (a cross-check of our implementation)."""

    Args = EWCArgs
    plugin_class = "EWCPlugin"
    state_attrs = ("saved_params", "importances")

    def plugin_kwargs(self) -> dict[str, Any]:
        if self.args.mode not in ("separate", "online"):
            raise MethodError(f"avl-ewc: mode must be 'separate' or 'online', got "
                              f"{self.args.mode!r}")
        return {"ewc_lambda": self.args.lam / 2, "mode": self.args.mode,
                "decay_factor": self.args.decay_factor if self.args.mode == "online" else None}
