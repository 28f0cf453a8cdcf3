"""How fast plain MLM on one domain's corpus binds entity names to their class (syn6 suites).

Prints `tasks.synthetic.type_readout` on θ0 and after each checkpoint of MLM training on the
domain corpus (the DAP loss `one` optimises, the suite's batch size and learning rate), e.g.

    python scripts/name_binding.py --suite syn6 --domain restaurant --steps 100,300
    python scripts/name_binding.py --suite syn6v2 --domain restaurant --steps 100,300
"""

from __future__ import annotations

import argparse
import copy

from benchmark.basemodel import load_base_model
from benchmark.mlm import train_mlm
from tasks import load_suite, synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="syn6", choices=sorted(synthetic.SUITE_PROFILES))
    parser.add_argument("--profile", default="default", choices=["default", "tiny"])
    parser.add_argument("--domain", default="restaurant")
    parser.add_argument("--steps", default="100,300", help="checkpoints, comma separated")
    parser.add_argument("--lr", type=float, help="default: the profile's dap_lr")
    parser.add_argument("--seed", type=int, default=2021)
    args = parser.parse_args()

    suite = load_suite(args.suite, args.profile)
    world = synthetic.build_world(synthetic.SUITE_PROFILES[args.suite][args.profile])
    theta0, tokenizer, _ = load_base_model(suite)
    defaults = suite.defaults
    lr = args.lr or defaults["dap_lr"]

    def show(model, step: int) -> None:
        r = synthetic.type_readout(model, tokenizer, world, args.domain)
        print(f"{args.suite} {args.domain} step {step:4d} (lr {lr:g}): type accuracy "
              f"{r['accuracy']:.3f} (chance {r['chance']:.3f}), adjective mass "
              f"{r['adjective_mass']:.3f}", flush=True)

    show(theta0, 0)
    corpus = suite.domains[args.domain].corpus
    for steps in sorted(int(s) for s in args.steps.split(",")):
        model = copy.deepcopy(theta0).train()  # every checkpoint is one DAP phase from θ0
        train_mlm(model, tokenizer, corpus, steps, defaults["dap_batch_size"], lr,
                  defaults["max_length"], args.seed, desc=f"MLM {steps} steps")
        show(model, steps)


if __name__ == "__main__":
    main()
