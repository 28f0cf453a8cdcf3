"""The Method interface: hooks named after the moments of the continual loop.

A method is a class registered under a name (`@register("name")` in `methods/__init__.py`) with
an optional `Args` dataclass for its own hyper-parameters: each field's type (`Literal` for
choices), default and, through `knob(default, check=...)`, its check are declared there once and
enforced by `build_method` before a run writes anything. Every hook is optional; the defaults
give `ncl`. Methods see the harness only through `Context`, declared here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from methods.modeling import MLMOutput, encoder_of, mlm_forward, trainable


class Context(Protocol):
    """What every hook receives (implemented by `benchmark.context.Context`)."""

    config: Any  # benchmark.config.RunConfig: the run's resolved, checked config
    suite: Any  # tasks.Suite
    domains: list[str]  # the run's domain names in order
    model: nn.Module  # the masked LM being DAP-trained (a method may wrap or replace it)
    tokenizer: Any
    accelerator: Any  # accelerate.Accelerator
    run_dir: Path
    t: int  # index of the domain being trained
    step: int  # DAP step within the domain
    total_steps: int  # DAP steps planned for the domain

    @property
    def is_main_process(self) -> bool: ...
    @property
    def artifacts_dir(self) -> Path: ...
    def save_artifact(self, name: str, content: dict[str, Any]) -> None: ...
    def base_model(self) -> nn.Module: ...
    def corpus(self, t: int) -> Any: ...
    def general_corpus(self) -> Any | None: ...
    def replay_corpus(self) -> Any | None: ...
    def mlm_batches(self, data: Any, seed: int, batch_size: int | None = None,
                    shuffle: bool = True) -> Iterator[dict[str, Tensor]]: ...
    def mlm_eval_loss(self, model: nn.Module, data: Any, seed: int | None = None) -> float: ...
    def seed_for(self, stream: str, t: int = 0, i: int | None = None) -> int: ...
    def count(self, tokens: int, passes: float = 0.0, width: int | None = None) -> None: ...


@dataclass
class NoArgs:
    """A method without hyper-parameters of its own."""


@dataclass
class DapPlan:
    """What the loop DAP-trains on for one domain: a tokenised dataset and a step count."""

    data: Any
    steps: int


class Method:
    name: ClassVar[str] = ""
    Args: ClassVar[type] = NoArgs
    # True for methods that isolate parameters per domain and need the domain ID at end-task time.
    needs_domain_id: ClassVar[bool] = False
    # True when later domains cannot change task i's model (base, one, pool): the loop copies
    # A[t-1][i] into A[t][i] instead of fine-tuning task i again.
    past_tasks_unchanged: ClassVar[bool] = False
    # Where the method's rows sit in tables (lower first). The built-ins follow the paper's
    # Table 1: references, the isolation rows, NCL and its variants, the continual baselines,
    # DAS. None: after every ranked method, by row label.
    table_rank: ClassVar[int | None] = None
    # The cost of one DAP step for `sweep --dry-run`'s estimate: (the measured s/step figure it
    # scales, "ncl" or "das", see benchmark/data/timings.json; a factor on it). None: the method
    # does no DAP-training (its estimate is fine-tuning only).
    dap_cost: ClassVar[tuple[str, float] | None] = ("ncl", 1.0)
    # The passes `bench` times outside the DAP steps and reports with their share of the DAP
    # time: {"label": what they compute, "before": the pass of `before_domain` on the first
    # domain, "after": the pass of `after_domain`}, both scaled to `importance_batches`. None:
    # the method's before/after-domain work is not reported.
    timed_passes: ClassVar[dict[str, str] | None] = None

    @classmethod
    def draw_artifacts(cls, folders: list[Path], domains: list[str], row: str, out: Path,
                       fmt: str, written: list[Path]) -> None:
        """Draw the row's saved artefacts (`save_artifact`) for `python -m benchmark plot`:
        `folders` are the `artifacts` folders of the row's runs (one per seed); append every
        figure written under `out` (file suffix `fmt`) to `written`. Default: nothing."""

    def __init__(self, args: Any = None) -> None:
        self.args = args if args is not None else self.Args()

    @classmethod
    def config_problem(cls, config: Any) -> str | None:
        """Why the method cannot run under the run config `config` (None: it can); asked
        before a run writes anything."""
        return None

    # -- the loop's moments -------------------------------------------------------------
    def setup(self, ctx: Context) -> None:
        """Once, after the base model is loaded and before the first domain."""

    def dap_plan(self, ctx: Context, t: int) -> DapPlan | None:
        """What to DAP-train on for domain t; None skips DAP-training for it."""
        return DapPlan(data=ctx.corpus(t), steps=ctx.config.dap_steps)

    def parameters(self, ctx: Context) -> list[nn.Parameter]:
        """The parameters the DAP optimiser updates."""
        return trainable(ctx.model)

    def before_domain(self, ctx: Context, t: int) -> None:
        """Before DAP-training on domain t."""

    def forward(self, ctx: Context, model: nn.Module, batch: dict[str, Tensor]) -> MLMOutput:
        """The DAP forward pass of one batch (override to fuse extra views into one pass)."""
        return mlm_forward(model, batch)

    def loss(self, ctx: Context, batch: dict[str, Tensor], outputs: MLMOutput) -> Tensor:
        """The DAP loss of one batch; `outputs` holds the MLM loss and hidden states."""
        return outputs.loss

    def after_backward(self, ctx: Context) -> None:
        """After `backward()`, before gradient clipping and the optimiser step."""

    def after_step(self, ctx: Context) -> None:
        """After the optimiser step, before the gradients are cleared."""

    def after_domain(self, ctx: Context, t: int) -> None:
        """After DAP-training on domain t, before its checkpoint is written."""

    def model_for_task(self, ctx: Context, i: int) -> nn.Module:
        """The encoder end task i is fine-tuned from (the loop fine-tunes a copy)."""
        return encoder_of(ctx.model)

    # -- state saved with every domain checkpoint ----------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state:
            raise ValueError(f"method {self.name!r} got unexpected state {sorted(state)}")

    def save_state(self, directory: Path) -> None:
        """Write the method's state into a checkpoint directory (override for library formats).
        The checkpoint records the sha256 of every file written there, and `--resume` refuses
        it when one is missing or changed, whatever the format."""
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if state:
            save_file(state, str(directory / "method_state.safetensors"))

    def load_state(self, directory: Path) -> None:
        """Load what `save_state` wrote; no file: the method saved no state (an empty
        `state_dict`), as the checkpoint's recorded files have been checked to be there."""
        path = directory / "method_state.safetensors"
        self.load_state_dict(load_file(str(path)) if path.exists() else {})
