"""Domains and end tasks: the suite registry, the synthetic suite and loaders for real data."""

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
