"""Domains and end tasks: the suite registry, the synthetic suite and loaders for real data.

Real data, one job per module: spec.py (the typed suite spec, checked on reading), files.py
(where files are read from, sha256), formats.py (file readers), splits.py (the paper's resplit,
caps), cache.py (parsed datasets saved as Arrow), build.py (spec -> Suite), fetch.py
(`data fetch`), real.py (the real6 / das6 / YAML suites and their profiles).
"""

from tasks.registry import (
    PAPER_ORDERS,
    Domain,
    EndTask,
    Suite,
    SuiteError,
    available_suites,
    load_suite,
    register_suite,
)

__all__ = [
    "PAPER_ORDERS",
    "Domain",
    "EndTask",
    "Suite",
    "SuiteError",
    "available_suites",
    "load_suite",
    "register_suite",
]
