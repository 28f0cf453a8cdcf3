"""Domains, end tasks and suites: the data side of the benchmark, knowing no method and no loop."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset

# The companion code's first five domain orders; order 0 is the paper's main one.
PAPER_ORDERS: list[list[str]] = [
    ["restaurant", "acl", "ai", "phone", "pubmed", "camera"],
    ["phone", "ai", "pubmed", "camera", "restaurant", "acl"],
    ["pubmed", "camera", "acl", "restaurant", "ai", "phone"],
    ["camera", "acl", "phone", "restaurant", "pubmed", "ai"],
    ["ai", "pubmed", "camera", "phone", "acl", "restaurant"],
]


class SuiteError(ValueError):
    """A suite, profile, order or data file that cannot be used; the message says which."""


@dataclass
class EndTask:
    """A labelled end task: `train`/`test` hold `text` (and optionally `text_pair`) and `label`."""

    name: str
    labels: list[str]
    train: Dataset
    test: Dataset
    metric: str = "mf1"
    epochs: int | None = None  # the paper's per-task fine-tuning epochs; None: the run config's

    @property
    def num_labels(self) -> int:
        return len(self.labels)


@dataclass
class Domain:
    """One domain: an unlabelled corpus (column `text`) and its end task."""

    name: str
    corpus: Dataset
    task: EndTask
    # {file as the suite names it: sha256} of every data file the domain was built from (empty:
    # built without files)
    files: dict[str, str] = field(default_factory=dict)
    # held-out text of the domain for its MLM loss, never DAP-trained (column `text`); None:
    # the run takes the end task's test texts (benchmark.context.Context.heldout_corpus)
    heldout: Dataset | None = None


@dataclass
class Suite:
    """An ordered benchmark: domains, the orders over them, the base model and training defaults.

    `defaults` are the suite profile's values for the run config (steps, batch sizes, ...);
    `base_model` is either a hub id / local path or a dict describing a model the harness
    pretrains itself (the synthetic `syn-base`).
    """

    name: str
    profile: str
    domains: dict[str, Domain]
    orders: list[list[str]]
    base_model: str | dict[str, Any]
    defaults: dict[str, Any] = field(default_factory=dict)
    general_corpus: Dataset | None = None  # held out: the general MLM loss, never DAP-trained
    # general text DAP may train on (replay), disjoint from general_corpus; None: the
    # pretrain_corpus of a self-built base model (syn6), or none
    replay_corpus: Dataset | None = None
    pretrain_corpus: Dataset | None = None  # what a self-built base model is pretrained on
    vocabulary: list[str] | None = None
    synthetic: bool = False
    description: str = ""

    def order(self, index: int) -> list[str]:
        if not 0 <= index < len(self.orders):
            raise SuiteError(
                f"order {index} does not exist for suite {self.name!r}; "
                f"valid orders: 0..{len(self.orders) - 1}"
            )
        names = self.orders[index]
        unknown = [n for n in names if n not in self.domains]
        if unknown:
            raise SuiteError(
                f"order {index} of suite {self.name!r} names unknown domain(s) {unknown}; "
                f"known: {sorted(self.domains)}"
            )
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise SuiteError(
                f"order {index} of suite {self.name!r} names domain(s) {twice} more than once")
        return names

    def data_digest(self, names: list[str]) -> dict[str, str]:
        """{what: sha256} of the data a run over domains `names` reads: the files each domain
        was built from, as the suite names them (its datasets follow from them and the suite
        spec); for a domain built without files (the synthetic suites), the content of its
        corpus, train, test and held-out sets; the content of the general text (held-out,
        replay, and θ0's pre-training corpus, which replay falls back to). A run stores it with
        its checkpoints, so `--resume` can name what changed since."""
        out: dict[str, str] = {}
        for name in names:
            domain = self.domains[name]
            out.update(domain.files)
            if not domain.files:
                for part, data in (("corpus", domain.corpus), ("train", domain.task.train),
                                   ("test", domain.task.test), ("heldout", domain.heldout)):
                    if data is not None:
                        out[f"{self.name} domain {name!r} {part}"] = dataset_sha256(data)
        for part, data in (("general corpus", self.general_corpus),
                           ("replay corpus", self.replay_corpus),
                           ("pre-training corpus", self.pretrain_corpus)):
            if data is not None:
                out[f"{self.name} {part}"] = dataset_sha256(data)
        return out


def dataset_sha256(data: Dataset) -> str:
    """The sha256 of a dataset's rows (as sorted-key JSON, one line per column)."""
    digest = hashlib.sha256()
    for column, values in sorted(data.to_dict().items()):
        digest.update(json.dumps([column, values], ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()


SuiteBuilder = Callable[..., Suite]
_SUITES: dict[str, tuple[SuiteBuilder, tuple[str, ...], str, bool]] = {}


def register_suite(name: str, profiles: tuple[str, ...], description: str,
                   reads_files: bool = False):
    """Register `build(profile) -> Suite` under `name`; with `reads_files`, the builder is
    `build(profile, dirs: tasks.files.DataDirs)` and reads its data from those directories."""

    def wrap(builder: SuiteBuilder) -> SuiteBuilder:
        _SUITES[name] = (builder, profiles, description, reads_files)
        return builder

    return wrap


def available_suites() -> dict[str, tuple[tuple[str, ...], str]]:
    """Suite name -> (profiles, one-line description)."""
    _import_builtin_suites()
    return {name: (profiles, desc) for name, (_, profiles, desc, _) in sorted(_SUITES.items())}


def load_suite(name: str, profile: str = "default", data_dir: str | Path | None = None,
               mirror: str | Path | None = None) -> Suite:
    """Build a registered suite, or a user suite from a YAML path, in the given profile.

    `data_dir` / `mirror`: where real suites' files are read (and parsed data cached); None:
    `$CDAP_DATA_DIR` / `$CDAP_DATA_MIRROR` or their defaults (tasks/files.py)."""
    _import_builtin_suites()
    from tasks.files import DataDirs

    dirs = DataDirs.resolve(data_dir, mirror)
    if name.endswith((".yaml", ".yml")):
        from tasks.real import load_suite_file

        return load_suite_file(name, profile, dirs)
    if name not in _SUITES:
        raise SuiteError(f"unknown suite {name!r}; valid suites: {', '.join(sorted(_SUITES))}")
    builder, profiles, _, reads_files = _SUITES[name]
    if profile not in profiles:
        raise SuiteError(
            f"unknown profile {profile!r} for suite {name!r}; valid profiles: {', '.join(profiles)}"
        )
    return builder(profile, dirs) if reads_files else builder(profile)


def _import_builtin_suites() -> None:
    from tasks import real, synthetic  # noqa: F401  (registers syn6, real6, das6)
