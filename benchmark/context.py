"""What the loop hands every method hook: config, model, data of the run, the accelerator, and
the services methods share (MLM evaluation, per-phase seeds). Implements `methods.base.Context`.

`config.seed` is the seed of everything DAP-time (the DAP stream, the hooks' draws: importance,
replay, Fisher, module init): the run's seed, or its `dap_seed` where set (`RunConfig.for_dap`);
end-task fine-tuning draws from `run_seed`, the run's own seed.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from datasets import Dataset
from safetensors.torch import save_file
from torch import Tensor, nn

from benchmark.atomic import atomic_path, write_json_atomic
from benchmark.config import RunConfig
from benchmark.data import dap_sequences, endless, mlm_loader, skip_start
from benchmark.protocol import Protocol, stream_seed

# held-out tokens per domain for the MLM-loss matrix L[t][i] (`Context.heldout_corpus`): about
# 4,900 masked at 15 %; the loss's sampling std falls as one over the root of that count
HELDOUT_TOKENS = 32_768


def domain_texts(split: Dataset) -> list[str]:
    """The domain's own text in an end-task split, each distinct text once: the sentence of a
    pair task (aspect sentiment: `text` is the aspect term, `text_pair` the review sentence it
    occurs in; tasks/formats.py), else `text`."""
    column = "text_pair" if "text_pair" in split.column_names else "text"
    return list(dict.fromkeys(split[column]))


@dataclass
class Context:
    config: RunConfig
    suite: Any  # tasks.Suite; typed loosely so methods need not import tasks/
    domains: list[str]  # the run's domain names in order
    model: nn.Module  # the masked LM being DAP-trained (a method may wrap or replace it)
    tokenizer: Any
    accelerator: Accelerator
    run_dir: Path
    t: int = 0  # index of the domain being trained
    step: int = 0  # DAP step within the domain
    total_steps: int = 0  # DAP steps planned for the domain
    _base: nn.Module | None = None
    run_seed: int | None = None  # the run's seed where `config` is `for_dap()` (fine-tuning)
    compute: Any = None  # benchmark.compute.Compute of the run (None: nothing counted)
    _corpora: dict[Any, Dataset] = field(default_factory=dict)
    _trained: set[tuple[int, ...]] | None = None  # every DAP sequence of the run (held-out filter)

    @property
    def is_main_process(self) -> bool:
        """Whether this process writes files (one of several under `accelerate launch`)."""
        return self.accelerator.is_main_process

    @property
    def artifacts_dir(self) -> Path:
        """Where a method writes inspectable per-domain artefacts (importance arrays, ...)."""
        path = self.run_dir / "artifacts"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def save_artifact(self, name: str, content: dict[str, Any]) -> None:
        """Write `artifacts/name` once (main process only) and whole: tensors to `.safetensors`,
        anything else to `.json`."""
        if not self.is_main_process:
            return
        path = self.artifacts_dir / name
        if path.suffix == ".safetensors":
            with atomic_path(path) as tmp:
                save_file({k: v.detach().cpu().contiguous() for k, v in content.items()}, str(tmp))
        elif path.suffix == ".json":
            write_json_atomic(path, content)
        else:
            raise ValueError(f"artifact {name!r}: the name must end in .safetensors or .json")

    def base_model(self) -> nn.Module:
        """A fresh copy of θ0, the masked LM before any DAP-training."""
        return copy.deepcopy(self._base)

    def corpus(self, t: int) -> Dataset:
        """Domain t's corpus as DAP sequences (column `input_ids`; grouped if `group_texts`)."""
        if t not in self._corpora:
            raw = skip_start(self.suite.domains[self.domains[t]].corpus,
                             self.config.corpus_skip)
            self._corpora[t] = dap_sequences(raw, self.tokenizer, self.config.max_length,
                                             self.config.group_texts)
        return self._corpora[t]

    def general_corpus(self) -> Dataset | None:
        """The suite's held-out general corpus, tokenised, or None where it has none."""
        if self.suite.general_corpus is None:
            return None
        if "general" not in self._corpora:
            self._corpora["general"] = dap_sequences(
                self.suite.general_corpus, self.tokenizer, self.config.max_length,
                self.config.group_texts)
        return self._corpora["general"]

    def heldout_corpus(self, i: int) -> Dataset:
        """Domain i's held-out text as MLM sequences, for the per-domain MLM loss L[t][i]: the
        domain's `heldout` texts (syn6: extra sentences its generator draws from a seed of their
        own), else its end task's test texts (`domain_texts`; real suites: their corpora stay
        whole, so DAP batches stay as they were). Every sequence that a DAP corpus of the run
        also holds is dropped, so no DAP batch draws one; then the first sequences up to
        `HELDOUT_TOKENS` tokens are kept (syn6 default: all of its ~650; a real suite at 128
        tokens: 256)."""
        key = ("heldout", i)
        if key not in self._corpora:
            domain = self.suite.domains[self.domains[i]]
            raw = domain.heldout
            if raw is None:
                raw = Dataset.from_dict({"text": domain_texts(domain.task.test)})
            data = dap_sequences(raw, self.tokenizer, self.config.max_length,
                                 self.config.group_texts)
            if self._trained is None:
                self._trained = {tuple(ids) for t in range(len(self.domains))
                                 for ids in self.corpus(t)["input_ids"]}
            trained = self._trained
            keep, tokens = [], 0
            for k, ids in enumerate(data["input_ids"]):
                if tokens >= HELDOUT_TOKENS:
                    break
                if tuple(ids) not in trained:
                    keep.append(k)
                    tokens += len(ids)
            self._corpora[key] = data.select(keep)
        return self._corpora[key]

    def replay_corpus(self) -> Dataset | None:
        """General text DAP may train on (replay), tokenised: the suite's `replay_corpus` (real
        suites: a stand-in for the base model's pre-training data), else the corpus a self-built
        θ0 was pre-trained on (syn6), else None; less every sequence of the held-out
        `general_corpus` (syn6's generator repeats sentences across the two)."""
        raw = self.suite.replay_corpus
        if raw is None:
            raw = self.suite.pretrain_corpus
        if raw is None:
            return None
        if "replay" not in self._corpora:
            data = dap_sequences(raw, self.tokenizer, self.config.max_length,
                                 self.config.group_texts)
            held = self.general_corpus()
            if held is not None:  # a sequence also held out is never replayed
                held_out = {tuple(ids) for ids in held["input_ids"]}
                data = data.filter(lambda row: tuple(row["input_ids"]) not in held_out,
                                   desc="dropping held-out general sequences")
            self._corpora["replay"] = data
        return self._corpora["replay"]

    def mlm_batches(self, data: Dataset, seed: int, batch_size: int | None = None,
                    shuffle: bool = True) -> Iterator[dict[str, Tensor]]:
        """Masked batches of `data`, endlessly, placed on the accelerator's device."""
        loader = mlm_loader(data, self.tokenizer, batch_size or self.config.dap_batch_size,
                            self.config.mlm_probability, seed, shuffle=shuffle)
        device = self.accelerator.device
        for batch in endless(loader):
            self.count(batch["input_ids"].numel())
            yield {k: v.to(device) for k, v in batch.items()}

    def count(self, tokens: int, passes: float = 0.0, width: int | None = None) -> None:
        """Record `tokens` drawn from data in the current compute phase, and `passes` passes
        with gradient over them that the encoder and head hooks do not see (a model of the
        method's own); see `benchmark.compute`."""
        if self.compute is not None:
            self.compute.count(tokens, passes, width)

    def mlm_eval_loss(self, model: nn.Module, data: Dataset, seed: int | None = None) -> float:
        """Mean MLM loss of `model` over `data` with fixed masks (no gradient); the masks'
        seed: the `eval_masks` stream unless given."""
        from benchmark.mlm_eval import mlm_eval_loss

        return mlm_eval_loss(self, model, data,
                             self.seed_for("eval_masks") if seed is None else seed)

    @property
    def protocol(self) -> Protocol:
        """What the run measures: its cells and record updates (`benchmark.protocol`)."""
        return Protocol(len(self.domains), self.config.eval_matrix)

    def seed_for(self, stream: str, t: int = 0, i: int | None = None) -> int:
        """The seed of random stream `stream` for domain t (task i): see
        `benchmark.protocol.SEED_STREAMS`. Each is independent of everything run before it, so
        a resumed run draws the same numbers; `finetune` draws from the run's own seed,
        everything else from the DAP-time seed; a name not in the table gets a stream of its
        own."""
        seed = self.config.seed
        if stream == "finetune" and self.run_seed is not None:
            seed = self.run_seed
        return stream_seed(stream, seed, t, i)
