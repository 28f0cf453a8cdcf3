"""Command line: `python -m benchmark run | table | plot | report | list | data | bench | sweep |
base | reproduce`; `python -m benchmark --pin-kernels COMMAND ...` runs it with the CPU kernels
pinned to AVX2 (benchmark/kernels.py)."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

from benchmark.atomic import DamagedFile
from benchmark.config import (
    FLAGS,
    ConfigError,
    RunConfig,
    add_flags,
    available_configs,
    build_config,
    check_writable,
    expand_preset,
    read_preset,
)
from benchmark.datacli import add_parser as add_data_parser
from benchmark.datacli import command_data
from benchmark.lock import RunLocked
from benchmark.reproduce import Refused
from benchmark.reproduce import add_parsers as add_reproduce_parsers

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


def parser(parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser
           ) -> argparse.ArgumentParser:
    """The command line; `parser_class` builds it and each subcommand's parser (the sweep's
    check of `run` flags passes one whose `error` raises instead of exiting)."""
    top = parser_class(prog="python -m benchmark", description=__doc__)
    pin = top.add_mutually_exclusive_group()
    pin.add_argument("--pin-kernels", action="store_true",
                     help="first argument only; the default on a CPU with AVX2: hold ATen, MKL "
                          "and oneDNN to their AVX2 kernels (the process starts again with "
                          "ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 "
                          "ONEDNN_MAX_CPU_ISA=AVX2), so AVX2 and AVX512 CPUs give the same bits")
    pin.add_argument("--no-pin-kernels", action="store_true",
                     help="first argument only: run the CPU's own widest kernels (also "
                          "CDAP_PIN_KERNELS=0)")
    sub = top.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a method over a suite's domain sequence")
    add_flags(run)  # one flag per knob of RunConfig that has one: --method, --dap-steps, ...
    run.add_argument("--seeds", type=_seeds,
                     help="several seeds, comma separated, e.g. 2021,111,222")
    run.add_argument("--config", help="a preset name (see `list configs`) or a YAML path")
    run.add_argument("--out", default="results/runs", help="where result files go")
    again = run.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue an interrupted run")
    again.add_argument("--overwrite", action="store_true", help="discard an earlier run first")
    run.add_argument("--keep-checkpoint", action="store_true",
                     help="keep the final DAP-trained model (run_dir/checkpoint) after the run")
    run.add_argument("--cache-dir",
                     help="model cache (default $CDAP_CACHE or ~/.cache/cdap-bench)")
    run.add_argument("--data-dir", help="data files of real suites (default $CDAP_DATA_DIR or "
                     "the user cache dir; das6: the companion archive's data/ folder)")
    run.add_argument("--no-table", action="store_true", help="do not print the table at the end")
    run.add_argument("--report-to", dest="report_to", type=_trackers,
                     help="live tracking through Accelerate's trackers, comma separated: "
                          "tensorboard, wandb, mlflow, ... (files under RUN_DIR/tracking)")

    _add_table_parser(sub)
    plot = sub.add_parser("plot", help="figures from result JSON (needs the report extra)")
    plot.add_argument("--runs", default="results/runs", help="directory searched for result.json")
    plot.add_argument("--config", help="a group preset: only its rows, in its order")
    plot.add_argument("--out", default="figures", help="where the figures go")
    plot.add_argument("--format", default="png", choices=["png", "pdf", "svg"])

    report = sub.add_parser("report", help="one self-contained HTML page: tables, figures, "
                            "configs, versions (needs the report extra)")
    report.add_argument("--runs", default="results/runs",
                        help="directory searched for result.json")
    report.add_argument("--config", help="a group preset: only its rows, in its order")
    report.add_argument("--out", default="report", help="folder of index.html")
    report.add_argument("--vs", metavar="ROW", help="add the differences against ROW")

    add_data_parser(sub)
    sub.add_parser("bench", help="DAP throughput side by side: s/step, tokens/s, MFU, memory",
                   add_help=False)
    sub.add_parser("sweep", help="a resumable grid of runs: local, SLURM (submitit) or sharded",
                   add_help=False)

    add_reproduce_parsers(sub)  # base build | list, reproduce
    listing = sub.add_parser("list", help="list methods, suites or configs")
    listing.add_argument("what", choices=["methods", "suites", "configs"])
    listing.add_argument("--args", metavar="METHOD",
                         help="with `methods`: each option of METHOD's `Args` with its type, "
                              "default and help (a preset sets them under method_args)")
    return top


def _add_table_parser(sub: argparse._SubParsersAction) -> None:
    """`table`: its flags."""
    table = sub.add_parser("table", help="build the result tables from result JSON files")
    table.add_argument("--runs", default="results/runs", help="directory searched for result.json")
    table.add_argument("--format", default="markdown", choices=["markdown", "latex", "csv"])
    table.add_argument("--config", help="group presets, comma separated: only their rows, in "
                       "their order")
    table.add_argument("--timings", action="store_true",
                       help="wall time per row (DAP, fine-tuning, total, ratio to ncl) instead")
    table.add_argument("--compute", action="store_true",
                       help="the score beside the training compute per row (tokens, PFLOPs per "
                            "phase, total, ratio to ncl) instead")
    table.add_argument("--dap-loss", action="store_true", dest="dap_loss",
                       help="the DAP training loss at the end of each domain per row instead")
    table.add_argument("--paper-metrics", action="store_true", dest="paper_metrics",
                       help="the paper's per-task metric: micro-F1 (= Acc) for pubmed/ChemProt, "
                            "MF1 elsewhere")
    table.add_argument("--pooled", action="store_true",
                       help="orders pooled: mean ± std over orders × seeds")
    table.add_argument("--diagonal", action="store_true",
                       help="the diagonal A[t][t] per row (each domain right after its own "
                            "DAP-training) beside the last row's average and FR; with --vs ROW, "
                            "the differences against ROW on shared seeds")
    table.add_argument("--mlm", action="store_true",
                       help="the held-out MLM loss per domain after the last domain L[T][i], its "
                            "forgetting and transfer in loss units, instead; with --vs ROW, the "
                            "average loss against ROW")
    table.add_argument("--vs", metavar="ROW",
                       help="add each row's difference in average MF1 against ROW, 95 %% "
                            "interval over seeds (needs the report extra)")


def _trackers(text: str) -> list[str]:
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in LOGGER_TYPE_TO_CLASS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown tracker(s) {unknown}; valid: "
                                         f"{', '.join(LOGGER_TYPE_TO_CLASS)}")
    return names


def _check_trackers(names: list[str] | None) -> None:
    """Accelerate drops a tracker whose package is missing without a word: say so instead."""
    if not names:
        return
    from accelerate.tracking import get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    missing = [t for t in names if t not in available]
    if missing:
        hint = "pip install -e '.[report]'" if missing == ["tensorboard"] else \
            f"pip install {' '.join(missing)}"
        raise UsageError(f"--report-to {','.join(missing)}: package not installed; {hint}")


def _group_rows(preset_name: str | None) -> list[str] | None:
    """The row labels of a group preset, in its order (None: every row)."""
    if not preset_name:
        return None
    return [p.get("label") or p.get("method") or src for p, src in _expand(preset_name)]


def _groups() -> dict[str, list[str]]:
    """Every shipped group preset and its rows (bar colours in `plot`)."""
    out = {}
    for name in available_configs():
        if "runs" in read_preset(name):
            out[name] = _group_rows(name)
    return out


def _expand(preset_name: str | None) -> list[tuple[dict, str]]:
    """[(preset mapping, source)]: one entry, or one per member of a group preset."""
    return expand_preset(preset_name)[0] if preset_name else [({}, "config")]


def plan_runs(args: argparse.Namespace) -> list[tuple[RunConfig, Any]]:
    """Every (config, suite) the command asks for, resolved and checked before anything runs:
    config values, method and its arguments, order, base model folder, writable folders."""
    from benchmark.basemodel import cached_path, check_base_model, shipped_used
    from methods import build_method
    from tasks import load_suite

    _check_trackers(args.report_to)
    flags = {f.name: getattr(args, f.name) for f in FLAGS}
    suites: dict[tuple[str, str], Any] = {}  # each suite is loaded once per invocation
    configs = []
    for preset, source in _expand(args.config):
        key = (flags["suite"] or preset.get("suite") or "syn6",
               flags["profile"] or preset.get("profile") or "default")
        if key not in suites:
            suites[key] = load_suite(*key, data_dir=args.data_dir)
        suite = suites[key]
        seeds = args.seeds or ([args.seed] if args.seed is not None else None)
        seeds = seeds or ([preset["seed"]] if "seed" in preset else [DEFAULT_SEEDS[0]])
        for seed in seeds:
            cfg = build_config(suite.defaults, preset, {**flags, "suite": suite.name, "seed": seed},
                               source)
            suite.order(cfg.order)
            build_method(cfg.method, cfg.method_args, source)
            check_base_model(cfg.base_model or suite.base_model)
            configs.append((cfg, suite))
    check_writable(Path(args.out), "--out")
    for suite in {id(s): s for _, s in configs}.values():
        cached = cached_path(suite, args.cache_dir)
        if cached is not None and not cached.exists() and not shipped_used(suite):
            # θ0 will be pretrained and cached
            check_writable(cached.parent, "--cache-dir" if args.cache_dir else "model cache")
    return configs


def command_run(args: argparse.Namespace) -> int:
    from benchmark.loop import run
    from benchmark.tables import build_tables, load_results, render

    for cfg, suite in plan_runs(args):
        log.info("run %s on %s/%s order %d seed %d", cfg.row, cfg.suite, cfg.profile,
                 cfg.order, cfg.seed)
        run(cfg, suite, Path(args.out), resume=args.resume, overwrite=args.overwrite,
            cache=args.cache_dir, keep_checkpoint=args.keep_checkpoint,
            report_to=args.report_to)
    if not args.no_table:
        print(render(build_tables(load_results(Path(args.out)))))
    return 0


def command_table(args: argparse.Namespace) -> int:
    from benchmark.tables import (
        DAP_LOSS_NOTE,
        TIMINGS_NOTE,
        build_dap_loss_tables,
        build_tables,
        build_timing_tables,
        load_results,
        render,
    )

    results = load_results(Path(args.runs))
    if not results:
        raise UsageError(f"no finished result.json under {args.runs}")
    _check_row(args.vs, results, args.runs)
    rows = None
    if args.config:
        rows = []
        for name in (n.strip() for n in args.config.split(",") if n.strip()):
            for preset, source in _expand(name):
                row = preset.get("label") or preset.get("method") or source
                rows += [] if row in rows else [row]
    if args.timings:
        print(render(build_timing_tables(results, rows), args.format, TIMINGS_NOTE))
    elif args.compute:
        from benchmark.tables import COMPUTE_NOTE, build_compute_tables

        print(render(build_compute_tables(results, rows), args.format, COMPUTE_NOTE))
    elif args.dap_loss:
        print(render(build_dap_loss_tables(results, rows), args.format, DAP_LOSS_NOTE))
    elif args.mlm:
        _mlm_table(results, rows, args.vs, args.format)
        return 0
    elif args.diagonal:
        from benchmark.tables import DIAGONAL_NOTE, build_diagonal_tables

        print(render(build_diagonal_tables(results, rows, args.vs), args.format, DIAGONAL_NOTE))
    elif args.paper_metrics or args.pooled:
        print(render(_table_view(results, rows, args.paper_metrics, args.pooled), args.format,
                     _table_note(args.paper_metrics, args.pooled)))
    else:
        print(render(build_tables(results, rows), args.format))
    if args.vs:
        from benchmark.tables import build_vs_tables, vs_note

        print(render(build_vs_tables(results, args.vs, rows), args.format, vs_note(args.vs)))
    return 0


def _mlm_table(results: list[dict], rows: list[str] | None, vs: str | None, fmt: str) -> None:
    """`table --mlm`: the MLM-loss matrix view, and with `vs` its average against that row."""
    from benchmark.tables import (
        MLM_NOTE,
        build_mlm_tables,
        build_mlm_vs_tables,
        mlm_vs_note,
        render,
    )

    tables = build_mlm_tables(results, rows)
    if not tables:
        raise UsageError("no run under --runs recorded the MLM-loss matrix (runs made before "
                         "2026-12-08 have none)")
    print(render(tables, fmt, MLM_NOTE))
    if vs:
        print(render(build_mlm_vs_tables(results, vs, rows), fmt, mlm_vs_note(vs)))


def _check_row(row: str | None, results: list[dict], runs: str) -> None:
    """A `--vs ROW` that names no row under --runs is one line listing the rows there."""
    if row is not None and row not in {r["row"] for r in results}:
        raise UsageError(f"--vs {row}: no such row under {runs}; rows: "
                         f"{', '.join(sorted({r['row'] for r in results}))}")


def _table_view(results: list[dict], rows: list[str] | None, paper: bool, pooled: bool):
    from benchmark import tables

    if pooled:
        if paper:
            return tables.build_pooled_tables(tables.with_paper_metric(results), rows,
                                              tables.PAPER_METRICS)
        return tables.build_pooled_tables(results, rows)
    return tables.build_paper_tables(results, rows)


def _table_note(paper: bool, pooled: bool) -> str:
    from benchmark import tables

    if pooled:
        return tables.POOLED_NOTE + (" " + tables.PAPER_METRIC_NOTE if paper else "")
    return tables.PAPER_NOTE


def command_plot(args: argparse.Namespace) -> int:
    from benchmark.plot import plot_runs
    from benchmark.tables import load_results

    results = load_results(Path(args.runs))
    if not results:
        raise UsageError(f"no finished result.json under {args.runs}")
    written = plot_runs(results, Path(args.runs), Path(args.out), _group_rows(args.config),
                        args.format, _groups())
    print(f"{len(written)} figures under {args.out}")
    return 0


def command_report(args: argparse.Namespace) -> int:
    from benchmark.report import build_report
    from benchmark.tables import load_results

    results = load_results(Path(args.runs))
    if not results:
        raise UsageError(f"no finished result.json under {args.runs}")
    if args.vs and args.vs not in {r["row"] for r in results}:
        raise UsageError(f"--vs {args.vs}: no such row under {args.runs}")
    index = build_report(Path(args.runs), Path(args.out), _group_rows(args.config), args.vs,
                         _groups(), results)
    print(f"report: {index}")
    return 0


def command_list(args: argparse.Namespace) -> int:
    if args.what == "methods" and args.args:
        from methods import describe_args, get_method_class

        rows = describe_args(get_method_class(args.args))
        if not rows:
            print(f"{args.args} has no options")
        for name, kind, default, text in rows:
            print(f"{name}: {kind} = {default}")
            if text:
                print(textwrap.fill(text, width=98, initial_indent="    ",
                                    subsequent_indent="    "))
    elif args.what == "methods":
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


WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                errno.ENOTDIR, errno.EISDIR, errno.EFBIG, errno.EIO)


def os_error_line(err: OSError) -> str | None:
    """One line for an `OSError` the user can act on (a full disk, a read-only folder, ...),
    naming the file; None for other errors (a bug: let its traceback show)."""
    if err.errno not in WRITE_ERRNOS:
        return None
    where = f" ({err.filename})" if err.filename else ""
    return f"error: {err.strerror or err}{where}"


def degrade_output() -> None:
    """Print what the terminal's encoding cannot show (θ0, ±, ...) as escapes, not a crash:
    a run must not fail on its table after its result is written (PYTHONIOENCODING=ascii)."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure") and getattr(stream, "errors", None) == "strict":
            stream.reconfigure(errors="backslashreplace")


def main(argv: list[str] | None = None) -> int:
    degrade_output()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("datasets", "transformers", "accelerate", "httpx", "adapters"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["--pin-kernels"], ["--no-pin-kernels"]):  # taken by `cli`, before torch
        argv = argv[1:]
    if argv[:1] == ["bench"]:
        from benchmark.bench import main as bench

        return bench(argv[1:])
    if argv[:1] == ["sweep"]:
        from benchmark.sweep import main as sweep

        return sweep(argv[1:])
    args = parser().parse_args(argv)
    import datasets

    datasets.disable_progress_bars()
    from benchmark.record import NotFinite
    from benchmark.report import ExtraMissing
    from benchmark.reproduce import command_base, command_reproduce
    from methods import MethodError
    from tasks import SuiteError

    try:
        return {"run": command_run, "table": command_table, "list": command_list,
                "data": command_data, "plot": command_plot, "report": command_report,
                "base": command_base, "reproduce": command_reproduce}[args.command](args)
    except (ConfigError, MethodError, SuiteError, UsageError, ExtraMissing, DamagedFile,
            RunLocked, NotFinite, Refused) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a folder turned read-only, ...
        line = os_error_line(err)
        if line is None:
            raise
        again = "; then rerun with --resume to continue" if args.command == "run" else ""
        print(f"{line}{again}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = ("; rerun the same command with --resume to continue from the last finished "
                 "step" if args.command == "run" else "")
        print(f"interrupted{again}", file=sys.stderr)
        return 130


def cli() -> int:
    """The command line (`python -m benchmark`, `cdap-bench`): the CPU kernels pinned to AVX2
    unless `--no-pin-kernels` or `CDAP_PIN_KERNELS=0` (benchmark/kernels.py), then `main`."""
    from benchmark.kernels import PIN_ENV, pin_and_reexec, wanted

    argv = sys.argv[1:]
    if argv[:1] in (["--pin-kernels"], ["--no-pin-kernels"]):
        os.environ[PIN_ENV] = "1" if argv[0] == "--pin-kernels" else "0"
        argv = argv[1:]
    if wanted():
        pin_and_reexec(argv)  # starts this command again, pinned, unless it already is
    return main(argv)


if __name__ == "__main__":
    sys.exit(cli())
