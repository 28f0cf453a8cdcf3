"""`python -m benchmark base build | list` and `python -m benchmark reproduce RESULT.json`.

`base build` pretrains a synthetic suite's θ0 here (one thread, as `load_base_model` does) and
says whether this machine rebuilds the shipped bits: the fingerprint it built against the
shipped file's, with the CPU and kernel setting of both. `--write DIR` also writes the build as
a shipped file and manifest entry (how `benchmark/theta0/` was made).

`reproduce` reruns one finished result from its recorded config, from the θ0 this machine
loads, after checking that θ0 is the recorded one (a run from another θ0 is another experiment:
refused, exit code 2). It then compares every recorded number of the rerun with the file's,
bit for bit: the A matrices (MF1, accuracy, collapsed flags), the DAP losses and steps, the
general MLM losses, the head warm-up losses, all as the file records them (MF1 rounded to four
decimals, DAP losses to five), and the final weights' fingerprint (sha256 of the state dict after
the last domain; results made before it was recorded compare without it). Exit code 0:
identical; 1: it prints each value that differs.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# the recorded numbers `reproduce` compares; timings, versions and paths may differ
COMPARED = ("mf1", "acc", "collapsed", "dap_loss", "dap_steps", "general_mlm_loss",
            "head_warmup_loss", "mlm_loss", "final_fingerprint")


class Refused(Exception):
    """`reproduce` cannot rerun the file as recorded; the message says why (exit code 2)."""


def add_parsers(sub: Any) -> None:
    """The `base` and `reproduce` subcommands of `python -m benchmark`."""
    base = sub.add_parser("base", help="the synthetic suites' base models θ0: list the shipped "
                          "ones, or rebuild one here and compare it with the shipped file")
    actions = base.add_subparsers(dest="action", required=True)
    build = actions.add_parser("build", help="pretrain a synthetic suite's θ0 here and say "
                               "whether its bits equal the shipped θ0's")
    build.add_argument("--suite", default="syn6", help="a synthetic suite (default syn6)")
    build.add_argument("--profile", default="default", help="its profile (default: default)")
    build.add_argument("--write", metavar="DIR",
                       help="also write the build as DIR/NAME.safetensors and its entry in "
                            "DIR/manifest.json (the shipped files live in benchmark/theta0)")
    build.add_argument("--name", help="its name there (default SUITE-PROFILE)")
    actions.add_parser("list", help="the shipped θ0s: name, fingerprint, size, build CPU")

    again = sub.add_parser("reproduce", help="rerun a result from its recorded config and θ0 "
                           "and compare every number bit for bit")
    again.add_argument("result", help="a finished result.json")
    again.add_argument("--out", help="keep the rerun here (default: a temporary folder)")
    again.add_argument("--cache-dir",
                       help="model cache (default $CDAP_CACHE or ~/.cache/cdap-bench)")
    again.add_argument("--data-dir", help="data files of real suites (as for `run`)")


def command_base(args: argparse.Namespace) -> int:
    from benchmark import basemodel
    from benchmark.kernels import kernel_setting

    if args.action == "list":
        manifest = basemodel.shipped_manifest()
        for name, entry in manifest.items():
            print(f"{name:16s} {entry['sha256']}  {entry['bytes']:>9d} bytes  "
                  f"build {entry['build']}, built on {entry['cpu']}, kernels "
                  f"{'pinned to AVX2' if entry['kernels']['pinned'] else 'default'}")
        if not manifest:
            print(f"no shipped θ0 under {basemodel.SHIPPED}")
        print(f"this process: {basemodel.cpu_description()}, kernels {_kernels(kernel_setting())}")
        return 0
    return build_and_compare(args)


def build_and_compare(args: argparse.Namespace) -> int:
    from benchmark import basemodel
    from benchmark.config import ConfigError
    from benchmark.kernels import kernel_setting
    from tasks import load_suite

    suite = load_suite(args.suite, args.profile)
    if isinstance(suite.base_model, str):
        raise ConfigError(f"suite {args.suite}: its θ0 is {suite.base_model!r}, a model that is "
                          "loaded, not pretrained here; `base build` is for synthetic suites")
    shipped = basemodel.shipped_for(suite)
    start = time.perf_counter()
    with basemodel.single_thread():
        model, _ = basemodel.pretrain_syn_base(suite, suite.base_model)
    seconds = time.perf_counter() - start
    sha = basemodel.fingerprint(model)
    kernels = kernel_setting()
    print(f"{suite.name}/{suite.profile}: built θ0 {sha} in {seconds:.0f} s on "
          f"{basemodel.cpu_description()}, kernels {_kernels(kernels)}")
    if shipped is None:
        print("no shipped θ0 matches this suite's spec (build key "
              f"{basemodel.build_key(suite)}): runs pretrain and cache it")
    else:
        name, entry = shipped
        same = "equal: this machine rebuilds" if entry["sha256"] == sha else \
            "different: this machine does not rebuild"
        print(f"shipped θ0 {name}: {entry['sha256']} (built on {entry['cpu']}, kernels "
              f"{_kernels(entry['kernels'])}): {same} the shipped bits")
    if args.write:
        name = args.name or f"{suite.name}-{suite.profile}"
        entry = basemodel.write_shipped(model, suite, name, Path(args.write))
        print(f"wrote {Path(args.write) / entry['file']} ({entry['bytes']} bytes, file sha256 "
              f"{entry['file_sha256']})")
    return 0


def _kernels(setting: dict[str, Any] | None) -> str:
    if not setting:
        return "not recorded"
    return f"{'pinned to AVX2' if setting.get('pinned') else 'default'} " \
           f"(ATen {setting.get('capability')}, CPU {setting.get('hardware')})"


def command_reproduce(args: argparse.Namespace) -> int:
    import torch

    from benchmark.basemodel import fingerprint, load_base_model
    from benchmark.config import RunConfig, recorded_config, validate
    from benchmark.kernels import kernel_setting
    from benchmark.loop import run, run_dir_for
    from benchmark.record import RunRecord, load
    from tasks import load_suite

    path = Path(args.result)
    recorded = load(path)
    if not recorded.finished:
        raise Refused(f"{path}: not a finished run (finished: false); nothing to compare")
    if not recorded.base_fingerprint:
        raise Refused(f"{path}: records no θ0 fingerprint (made before result schema 2), so "
                      "the rerun's θ0 cannot be checked against it")
    cfg = validate(RunConfig, recorded_config(recorded.config, earlier=recorded.kernels is None),
                   str(path), "config: ")
    suite = load_suite(cfg.suite, cfg.profile, data_dir=args.data_dir)
    model, _, _ = load_base_model(suite, cfg.base_model, args.cache_dir)
    here = fingerprint(model)
    del model
    if here != recorded.base_fingerprint:
        raise Refused(
            f"{path}: base_fingerprint {recorded.base_fingerprint[:12]}… "
            f"({recorded.base_name or 'not a shipped θ0'}) is not the θ0 this machine loads for "
            f"{cfg.suite}/{cfg.profile} ({here[:12]}…); a rerun from it would be another "
            "experiment")
    now = kernel_setting()
    if recorded.kernels and bool(recorded.kernels.get("pinned")) != now["pinned"]:
        how = "rerun as `python -m benchmark --pin-kernels reproduce ...`" if \
            recorded.kernels.get("pinned") else "rerun without --pin-kernels and CDAP_PIN_KERNELS"
        print(f"note: the result was made with kernels {_kernels(recorded.kernels)}, this "
              f"process runs {_kernels(now)}; {how} to match them")
    if recorded.threads and recorded.threads != torch.get_num_threads():
        # intra-op threads split reductions differently: the rerun uses the recorded count
        print(f"note: the result was made with {recorded.threads} thread(s); the rerun uses "
              f"{recorded.threads} (this process had {torch.get_num_threads()})")
        torch.set_num_threads(recorded.threads)
    if args.out and run_dir_for(Path(args.out), cfg).resolve() == path.parent.resolve():
        raise Refused(f"--out {args.out}: the rerun would overwrite {path} itself; give "
                      "another folder")
    with tempfile.TemporaryDirectory(prefix="reproduce-") as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        fresh = RunRecord.from_dict(run(cfg, suite, out, overwrite=True, cache=args.cache_dir))
    diffs = differences(recorded, fresh)
    cells = sum(v is not None for row in recorded.mf1 for v in row)
    where = f"{cfg.suite}/{cfg.profile} {cfg.row} order {cfg.order} seed {cfg.seed}"
    weights = f"final weights {recorded.final_fingerprint[:12]}…" if \
        recorded.final_fingerprint else "final weights not recorded"
    if not diffs:
        print(f"reproduced bit for bit: {path} ({where}; θ0 {here[:12]}…, {cells} MF1 cells, "
              f"{sum(map(len, recorded.dap_loss))} DAP losses, {weights}; kernels "
              f"{_kernels(now)})")
        return 0
    print(f"NOT reproduced bit for bit: {path} ({where}); {len(diffs)} values differ "
          f"(recorded on {recorded.cpu}, kernels {_kernels(recorded.kernels)}; rerun on "
          f"{fresh.cpu}, kernels {_kernels(now)}):")
    for line in diffs:
        print("  " + line)
    return 1


def differences(recorded: Any, fresh: Any) -> list[str]:
    """One line per recorded number that differs between two records (`COMPARED` fields), e.g.
    `mf1[2][0] (after D, task T): 0.61 recorded, 0.6 now (-0.01)`."""
    lines = []
    for name in COMPARED:
        old, new = getattr(recorded, name), getattr(fresh, name)
        if name == "final_fingerprint" and old is None or name == "mlm_loss" and not old:
            continue  # not recorded (files made before the field): nothing to compare
        for index, a, b in _cells(old, new):
            if name == "collapsed" and a is None:  # not recorded (files before schema 3)
                continue
            if a != b or type(a) is not type(b):
                where = _where(name, index, recorded)
                delta = f" ({b - a:+.6g})" if _number(a) and _number(b) else ""
                lines.append(f"{name}{''.join(f'[{i}]' for i in index)}{where}: {a!r} "
                             f"recorded, {b!r} now{delta}")
    return lines


def _cells(old: Any, new: Any, index: tuple = ()):
    """(index, recorded, rerun) for every leaf of two nested lists; a missing side is None."""
    if isinstance(old, list) or isinstance(new, list):
        old = old if isinstance(old, list) else []
        new = new if isinstance(new, list) else []
        for i in range(max(len(old), len(new))):
            yield from _cells(old[i] if i < len(old) else None,
                              new[i] if i < len(new) else None, (*index, i))
    else:
        yield index, old, new


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _where(name: str, index: tuple, record: Any) -> str:
    domains = record.domains
    if name in ("mf1", "acc", "collapsed") and len(index) == 2 and max(index) < len(domains):
        return f" (after {domains[index[0]]}, task of {domains[index[1]]})"
    if name in ("dap_loss", "dap_steps") and index and index[0] < len(domains):
        return f" ({domains[index[0]]})"
    return ""
