"""`python -m benchmark data fetch|check SUITE`: put a suite's data files in place and verify them.

SUITE is a built-in suite with a manifest (real6, das6) or a suite YAML. `fetch` downloads each
file from its public URL (or copies it from `--mirror`), checks its sha256 and stores it under
the data dir; `check` verifies every file and prints per-domain counts.
"""

from __future__ import annotations

import argparse
import logging

from tabulate import tabulate

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    data = sub.add_parser("data", help="fetch or check a suite's data files")
    data.add_argument("action", choices=["fetch", "check"])
    data.add_argument("suite", help="a suite with a data manifest (real6, das6) or a suite YAML")
    data.add_argument("--data-dir", help="where the files go / are read (default: "
                      "$CDAP_DATA_DIR or the user cache dir)")
    data.add_argument("--mirror", help="a local mirror laid out like shared/data/mirror "
                      "(default $CDAP_DATA_MIRROR)")
    data.add_argument("--split", default="paper", choices=["paper", "standard"],
                      help="also count the paper's resplit (default) or only the files' splits")
    data.add_argument("--timeout", type=float, default=60.0,
                      help="seconds a download may wait for the server (default 60)")


def command_data(args: argparse.Namespace) -> int:
    from tasks.build import describe
    from tasks.fetch import disk_free_ok, fetch_all, fetch_plan
    from tasks.files import DataDirs, FetchError, locate, verify
    from tasks.spec import suite_spec

    dirs = DataDirs.resolve(args.data_dir, args.mirror)
    spec = suite_spec(args.suite)
    entries = list(spec.files.values())

    if args.action == "fetch":
        target = spec.root or dirs.data_dir
        entries = fetch_plan(spec, target)
        disk_free_ok(target, entries)
        done = fetch_all(entries, target, dirs.mirror, timeout=args.timeout)
        counts: dict[str, int] = {}
        for _, what in done:
            counts[what] = counts.get(what, 0) + 1
        print(f"{len(done)} files of {spec.name} under {target}: "
              + ", ".join(f"{n} {what}" for what, n in sorted(counts.items())))
        return 0

    problems = []
    for entry in entries:
        try:
            verify(entry, locate(entry, spec.root, dirs))
        except FetchError as err:
            problems.append(str(err))
    if problems:
        raise FetchError(f"{len(problems)} of {len(entries)} files of {spec.name} are not "
                         "usable:\n  " + "\n  ".join(problems))
    rows = describe(spec, dirs, args.split)
    print(f"{spec.name}: {len(entries)} files verified (sha256 where the manifest has one)")
    print(tabulate(rows, headers="keys", tablefmt="github", intfmt=","))
    return 0
