"""Command line: `python -m benchmark run | table | list`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from benchmark.config import (
    CHOICES,
    ConfigError,
    available_configs,
    build_config,
    read_preset,
)
from benchmark.datacli import add_parser as add_data_parser
from benchmark.datacli import command_data

DEFAULT_SEEDS = [2021, 111, 222, 333, 444]  # the companion code's fine-tuning seeds
log = logging.getLogger("benchmark")


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--seeds takes integers separated by commas, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("--seeds needs at least one seed")
    return seeds


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m benchmark", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a method over a suite's domain sequence")
    run.add_argument("--method", help="registered method name (see `list methods`)")
    run.add_argument("--suite", help="suite name (default syn6)")
    run.add_argument("--profile", help="suite profile: tiny | default")
    run.add_argument("--order", type=int, help="domain order index (0..4)")
    run.add_argument("--seed", type=int, help="one seed (default 2021)")
    run.add_argument("--seeds", type=_seeds,
                     help="several seeds, comma separated, e.g. 2021,111,222")
    run.add_argument("--config", help="a preset name (see `list configs`) or a YAML path")
    run.add_argument("--out", default="results/runs", help="where result files go")
    run.add_argument("--resume", action="store_true", help="continue an interrupted run")
    run.add_argument("--overwrite", action="store_true", help="discard an earlier run first")
    run.add_argument("--keep-checkpoint", action="store_true",
                     help="keep the final DAP-trained model (run_dir/checkpoint) after the run")
    run.add_argument("--cache-dir",
                     help="model cache (default $CDAP_CACHE or ~/.cache/cdap-bench)")
    run.add_argument("--data-dir", help="data files of real suites (default $CDAP_DATA_DIR or "
                     "the user cache dir; das6: the companion archive's data/ folder)")
    run.add_argument("--dap-steps", type=int, dest="dap_steps", help="DAP steps per domain")
    run.add_argument("--ft-epochs", type=int, dest="ft_epochs", help="end-task epochs")
    run.add_argument("--label", help="row name in tables (default: the method name)")
    run.add_argument("--head-warmup-steps", type=int, dest="head_warmup_steps",
                     help="train only the base model's MLM head (encoder frozen) this many steps "
                          "on the first domain's corpus first (for checkpoints without a head)")
    run.add_argument("--mixed-precision", dest="mixed_precision",
                     choices=CHOICES["mixed_precision"],
                     help="autocast DAP-training and fine-tuning (das6 default: fp16, the paper's)")
    run.add_argument("--eval-matrix", dest="eval_matrix", choices=CHOICES["eval_matrix"],
                     help="fine-tune every seen task after each domain (full), or only the "
                          "newest one and all at the end (diagonal: same FR/KT/tables, fewer runs)")
    run.add_argument("--no-table", action="store_true", help="do not print the table at the end")

    table = sub.add_parser("table", help="build the result tables from result JSON files")
    table.add_argument("--runs", default="results/runs", help="directory searched for result.json")
    table.add_argument("--format", default="markdown", choices=["markdown", "latex", "csv"])
    table.add_argument("--config", help="a group preset: only its rows, in its order")
    table.add_argument("--timings", action="store_true",
                       help="wall time per row (DAP, fine-tuning, total, ratio to ncl) instead")

    add_data_parser(sub)
    sub.add_parser("bench", help="seconds per DAP step and peak memory, ncl vs das",
                   add_help=False)

    listing = sub.add_parser("list", help="list methods, suites or configs")
    listing.add_argument("what", choices=["methods", "suites", "configs"])
    return top


def _expand(preset_name: str | None) -> list[tuple[dict, str]]:
    """[(preset mapping, source)]: one entry, or one per member of a group preset."""
    if not preset_name:
        return [({}, "config")]
    preset = read_preset(preset_name)
    members = preset.pop("runs", None)
    if members is None:
        return [(preset, preset_name)]
    if not isinstance(members, list) or not members:
        raise ConfigError(f"{preset_name}: `runs` must be a non-empty list of preset names")
    out = []
    for member in members:
        sub = read_preset(member)
        sub.pop("runs", None)
        out.append(({**preset, **sub}, member))
    return out


def command_run(args: argparse.Namespace) -> int:
    from benchmark.loop import run
    from benchmark.tables import build_tables, load_results, render
    from methods import available_methods, build_method
    from tasks import load_suite

    flags = {k: getattr(args, k) for k in ("method", "suite", "profile", "order", "dap_steps",
                                           "ft_epochs", "label", "mixed_precision",
                                           "eval_matrix", "head_warmup_steps")}
    configs = []
    for preset, source in _expand(args.config):
        suite_name = flags["suite"] or preset.get("suite") or "syn6"
        profile = flags["profile"] or preset.get("profile") or "default"
        suite = load_suite(suite_name, profile, data_dir=args.data_dir)
        seeds = args.seeds or ([args.seed] if args.seed is not None else None)
        seeds = seeds or ([preset["seed"]] if "seed" in preset else [DEFAULT_SEEDS[0]])
        for seed in seeds:
            cfg = build_config(suite.defaults, preset, {**flags, "suite": suite.name, "seed": seed},
                               source)
            available = available_methods()
            if cfg.method not in available:
                raise ConfigError(f"unknown method {cfg.method!r}; valid methods: "
                                  f"{', '.join(available)}")
            suite.order(cfg.order)
            build_method(cfg.method, cfg.method_args)  # fails now on a bad method argument
            configs.append((cfg, suite))
    for cfg, suite in configs:
        log.info("run %s on %s/%s order %d seed %d", cfg.row, cfg.suite, cfg.profile,
                 cfg.order, cfg.seed)
        run(cfg, suite, Path(args.out), resume=args.resume, overwrite=args.overwrite,
            cache=args.cache_dir, keep_checkpoint=args.keep_checkpoint)
    if not args.no_table:
        print(render(build_tables(load_results(Path(args.out)))))
    return 0


def command_table(args: argparse.Namespace) -> int:
    from benchmark.tables import (
        TIMINGS_NOTE,
        build_tables,
        build_timing_tables,
        load_results,
        render,
    )

    results = load_results(Path(args.runs))
    if not results:
        raise UsageError(f"no finished result.json under {args.runs}")
    rows = None
    if args.config:
        rows = []
        for preset, source in _expand(args.config):
            rows.append(preset.get("label") or preset.get("method") or source)
    if args.timings:
        print(render(build_timing_tables(results, rows), args.format, TIMINGS_NOTE))
    else:
        print(render(build_tables(results, rows), args.format))
    return 0


def command_list(args: argparse.Namespace) -> int:
    if args.what == "methods":
        from methods import available_methods

        for name, cls in available_methods().items():
            doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip()
            flag = " [needs domain ID]" if cls.needs_domain_id else ""
            print(f"{name:14s} {doc.splitlines()[0] if doc else ''}{flag}")
    elif args.what == "suites":
        from tasks import available_suites

        for name, (profiles, desc) in available_suites().items():
            print(f"{name:10s} profiles: {', '.join(profiles):18s} {desc}")
    else:
        for name, desc in available_configs().items():
            print(f"{name:24s} {desc}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("datasets", "transformers", "accelerate", "httpx", "adapters"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from benchmark.bench import main as bench

        return bench(argv[1:])
    args = parser().parse_args(argv)
    import datasets

    datasets.disable_progress_bars()
    from methods import MethodError
    from tasks import SuiteError

    try:
        return {"run": command_run, "table": command_table, "list": command_list,
                "data": command_data}[args.command](args)
    except (ConfigError, MethodError, SuiteError, UsageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
