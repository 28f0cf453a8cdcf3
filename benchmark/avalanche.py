"""Our suites as an Avalanche benchmark, and an Avalanche plugin that fills our A matrix.

The other direction of methods/avalanche.py: an Avalanche user runs *their* strategy on our
suites and gets our tables.

    bench = as_benchmark("syn6", "tiny", order=0)
    model = bench.base_model()                  # MaskedLogits over a fresh θ0
    strategy = Naive(model=model, optimizer=AdamW(model.parameters(), lr=bench.config.dap_lr),
                     criterion=masked_cross_entropy, train_mb_size=bench.config.dap_batch_size,
                     plugins=[EWCPlugin(2500.0), CdapEvaluator(bench, out, row="naive+ewc")],
                     evaluator=EvaluationPlugin(loggers=[]))
    for experience in bench.train_stream:
        strategy.train(experience)              # DAP-trains one domain, then fills A[t]
    print(render(build_tables(load_results(out))))

Each experience is one domain's corpus: items `(x, y, t)` with `x` = [2, length] (the masked
ids and the 0/1 row of positions to predict), `y` the MLM labels, `t` = 0, masked afresh every
time an item is read (Avalanche's training loader ignores a dataset's collate function, so
masking is per item; `MaskedCorpus`). The evaluator fine-tunes and tests the end tasks after
each experience exactly as our loop does (`finetune_and_test`, same seeds and settings) and
writes `result.json` in our format, so `python -m benchmark table --runs OUT` shows the row.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor
from torch.utils.data import Dataset as TorchDataset

from benchmark.basemodel import fingerprint, load_base_model
from benchmark.config import RunConfig, build_config
from benchmark.context import Context
from benchmark.dap import LOSS_EVERY
from benchmark.data import MLMCollator, tokenize_task
from benchmark.finetune import finetune_and_test
from benchmark.loop import RESULT, new_record, run_dir_for
from benchmark.mlm_eval import mlm_eval_loss
from benchmark.probe import probe_and_test
from benchmark.protocol import stream_seed
from benchmark.record import save
from methods import MethodError
from methods.avalanche import INSTALL, MaskedLogits, avalanche_dataset_of, masked_cross_entropy
from methods.modeling import encoder_of

try:
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.core import SupervisedPlugin
except ImportError as error:
    raise ImportError(f"benchmark.avalanche needs Avalanche ({error}); run: {INSTALL}") from None

log = logging.getLogger(__name__)
__all__ = ["CdapEvaluator", "MaskedCorpus", "as_benchmark", "masked_cross_entropy"]


class MaskedCorpus(TorchDataset):
    """A tokenised corpus whose items are masked when read: `(x [2, width], y [width])`."""

    def __init__(self, ids: list[list[int]], tokenizer, probability: float, width: int,
                 seed: int) -> None:
        self.ids = ids
        self.collator = MLMCollator(tokenizer, probability, seed)
        self.width = width
        self.pad_id = tokenizer.pad_token_id

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        batch = self.collator([{"input_ids": self.ids[index]}])
        room = self.width - batch["input_ids"].shape[1]
        ids = torch.nn.functional.pad(batch["input_ids"][0], (0, room), value=self.pad_id)
        labels = torch.nn.functional.pad(batch["labels"][0], (0, room), value=-100)
        return torch.stack([ids, (labels != -100).long()]), labels


def as_benchmark(suite: str, profile: str = "default", order: int = 0,
                 data_dir: str | None = None, cache: str | None = None,
                 overrides: dict[str, Any] | None = None):
    """An Avalanche benchmark of `suite`'s domains in `order`: one experience per domain.

    The returned `CLScenario` also carries what our evaluation needs: `.suite`, `.domains`,
    `.tokenizer`, `.config` (the suite profile's run config, `overrides` applied) and
    `.base_model()` (a fresh θ0 as `MaskedLogits`)."""
    from benchmark.data import dap_sequences
    from tasks import load_suite

    loaded = load_suite(suite, profile, data_dir=data_dir)
    config = build_config(loaded.defaults, {"suite": loaded.name, "profile": profile,
                                            "order": order, **(overrides or {})})
    names = loaded.order(order)
    model, tokenizer, _ = load_base_model(loaded, config.base_model, cache)
    experiences = []
    for t, name in enumerate(names):
        data = dap_sequences(loaded.domains[name].corpus, tokenizer, config.max_length,
                             config.group_texts)
        corpus = MaskedCorpus(list(data["input_ids"]), tokenizer, config.mlm_probability,
                              config.max_length, stream_seed("dap", config.for_dap().seed, t))
        experiences.append(avalanche_dataset_of(corpus))
    bench = benchmark_from_datasets(train=experiences)
    bench.suite, bench.domains, bench.tokenizer, bench.config = loaded, names, tokenizer, config
    bench.base_model = lambda: MaskedLogits(copy.deepcopy(model), tokenizer.pad_token_id)
    return bench


class CdapEvaluator(SupervisedPlugin):
    """An Avalanche plugin: after each experience, fine-tune and test the end tasks (our A[t])
    and, after the last, write our `result.json` under `out` (a run directory per row, seed)."""

    def __init__(self, bench, out: str | Path, row: str, seed: int | None = None,
                 eval_matrix: str | None = None) -> None:
        super().__init__()
        if not row:
            raise MethodError("CdapEvaluator: `row` (the table row name) must not be empty")
        cfg: RunConfig = bench.config
        self.config = build_config(bench.suite.defaults, {
            **cfg.to_dict(), "method": row, "label": row,
            "seed": cfg.seed if seed is None else seed,
            "eval_matrix": eval_matrix or cfg.eval_matrix})
        self.bench = bench
        self.run_dir = run_dir_for(Path(out), self.config)
        self.tasks = [bench.suite.domains[n].task for n in bench.domains]
        tok = bench.tokenizer
        self.splits = [(tokenize_task(task.train, tok, cfg.max_length, cfg.pair_input),
                        tokenize_task(task.test, tok, cfg.max_length, cfg.pair_input))
                       for task in self.tasks]
        self.progress: dict | None = None
        self.started = self.dap_started = 0.0
        self.losses: list[float] = []

    def _context(self, strategy) -> Context:
        model = strategy.model.mlm if isinstance(strategy.model, MaskedLogits) else strategy.model
        return Context(config=self.config, suite=self.bench.suite, domains=self.bench.domains,
                       model=model, tokenizer=self.bench.tokenizer,
                       accelerator=Accelerator(cpu=str(strategy.device) == "cpu"),
                       run_dir=self.run_dir)

    def before_training(self, strategy, *args, **kwargs) -> None:
        if self.progress is not None:
            return
        self.started = time.perf_counter()
        ctx = self._context(strategy)
        self.progress = new_record(self.config, self.bench.suite, self.bench.domains,
                                   SimpleNamespace(needs_domain_id=False), 0.0,
                                   fingerprint(ctx.model))
        general = ctx.general_corpus()
        if general is not None:
            self.progress.general_mlm_loss.append(mlm_eval_loss(ctx, ctx.model, general))
        strategy.model.train()

    def before_training_exp(self, strategy, *args, **kwargs) -> None:
        self.dap_started = time.perf_counter()
        self.losses = []
        self.steps = 0

    def after_training_iteration(self, strategy, *args, **kwargs) -> None:
        if self.steps % LOSS_EVERY == 0:
            self.losses.append(round(float(strategy.loss.detach()), 5))
        self.steps += 1

    def after_training_exp(self, strategy, *args, **kwargs) -> None:
        t = strategy.experience.current_experience
        names, cfg, progress = self.bench.domains, self.config, self.progress
        ctx = self._context(strategy)
        general = ctx.general_corpus()
        protocol = ctx.protocol
        protocol.record_domain(
            progress, self.losses, self.steps,
            None if general is None else mlm_eval_loss(ctx, ctx.model, general),
            time.perf_counter() - self.dap_started)
        last = t == len(names) - 1
        for i in range(t + 1):
            if protocol.cell(t, i) == "skip":
                protocol.record_cell(progress, t, None, None, None, 0.0)
                continue
            train, test = self.splits[i]
            seed, desc = ctx.seed_for("finetune", t, i), f"end task {names[i]} @ {names[t]}"
            if cfg.eval == "probe":
                score = probe_and_test(ctx, encoder_of(ctx.model), train, test, seed, desc)
            else:
                score = finetune_and_test(ctx, encoder_of(ctx.model), train, test,
                                          self.tasks[i].num_labels, seed=seed, desc=desc,
                                          epochs=self.tasks[i].epochs)
            protocol.record_cell(progress, t, score.mf1, score.acc, score.collapsed, score.seconds)
        log.info("after %s: MF1 %s", names[t], progress.mf1[t])
        strategy.model.train()
        if last:
            progress.timings["total_s"] = round(time.perf_counter() - self.started, 3)
            progress.finished = True
            save(self.run_dir / RESULT, progress)
