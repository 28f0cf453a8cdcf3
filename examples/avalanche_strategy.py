"""Run an Avalanche strategy on one of our suites and print our table.

    python examples/avalanche_strategy.py --suite syn6 --profile tiny --out runs/avl-example

The strategy is Avalanche's `Naive` with its `EWCPlugin` (λ = 2500, i.e. our `ewc`'s 5000
in the λ/2 convention); any Avalanche strategy or plugin set that trains a classifier-shaped
model goes in its place. `CdapEvaluator` fills our A matrix after each domain and writes
`result.json`, so the row also shows in `python -m benchmark table --runs OUT`.
"""

from __future__ import annotations

import argparse
import logging
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

# benchmark first: its compatibility module must run before Avalanche imports torchvision
from benchmark.avalanche import CdapEvaluator, as_benchmark, masked_cross_entropy  # noqa: E402
from benchmark.tables import build_tables, load_results, render  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="syn6")
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--order", type=int, default=0)
    parser.add_argument("--seed", type=int, default=2021)
    parser.add_argument("--out", default="runs/avl-example")
    args = parser.parse_args()
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin, EWCPlugin

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    bench = as_benchmark(args.suite, args.profile, args.order, overrides={"seed": args.seed})
    torch.manual_seed(args.seed)
    model = bench.base_model()
    cfg = bench.config
    strategy = Naive(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=cfg.dap_lr),
        criterion=masked_cross_entropy,
        train_mb_size=cfg.dap_batch_size,
        train_epochs=1,
        device="cpu",
        plugins=[EWCPlugin(ewc_lambda=2500.0),
                 CdapEvaluator(bench, args.out, row="avalanche naive+ewc")],
        evaluator=EvaluationPlugin(loggers=[]),
    )
    for experience in bench.train_stream:
        strategy.train(experience)
    print(render(build_tables(load_results(args.out))))


if __name__ == "__main__":
    main()
