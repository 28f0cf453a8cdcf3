"""From a typed suite spec to a `Suite` of Arrow datasets: read, split, cap, cache."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from datasets import Dataset

from tasks.cache import cache_key, saved
from tasks.files import DataDirs, FetchError, SuiteFiles
from tasks.formats import Columns, read_corpus_files, read_hf_corpus, read_task_files
from tasks.registry import Domain, EndTask, Suite, SuiteError
from tasks.spec import CorpusSource, DomainSpec, SuiteSpec
from tasks.splits import Parts, cap, split_task

log = logging.getLogger(__name__)


def read_corpus(dom: DomainSpec, files: SuiteFiles) -> list[str]:
    """All documents of a domain's corpus sources, exact duplicates dropped (order kept)."""
    return read_sources(dom.corpus, files)


def read_sources(sources: tuple[CorpusSource, ...], files: SuiteFiles) -> list[str]:
    """All documents of corpus sources, exact duplicates dropped (order kept)."""
    docs: list[str] = []
    for source in sources:
        if source.format == "hf":
            docs += read_hf_corpus(**source.options)
        else:
            docs += read_corpus_files(source.format, files.files(source.files), **source.options)
    return list(dict.fromkeys(docs))


def read_parts(dom: DomainSpec, files: SuiteFiles) -> Parts:
    """The task files' own train, dev and test columns (files verified)."""
    task = dom.task
    return {role: read_task_files(task.format, files.files(getattr(task, role)), task.labels)
            for role in ("train", "dev", "test")}


def build_domain(spec: SuiteSpec, name: str, files: SuiteFiles, split: str,
                 caps: dict[str, int], task_epochs: bool = True) -> Domain:
    """A Domain whose corpus/train/test are Arrow datasets cached under the data dir."""
    dom = spec.domains[name]
    # verifying every file first makes the checksums part of the cache key
    for rel, _ in dom.paths():
        files.file(rel)
    sha = {rel: files.sha[rel] for rel, _ in dom.paths()}
    encodings = {rel: spec.files[rel].encoding for rel in sha}
    key = cache_key({"domain": dataclasses.asdict(dom), "encodings": encodings, "split": split,
                     "caps": caps}, sha)
    base = files.dirs.cache / f"{spec.name}-{name}-{key}"
    where = f"{spec.source}: domain {name!r}"
    loaded: dict[str, Columns] = {}

    def columns() -> dict[str, Columns]:
        if not loaded:
            train, _, test = split_task(dom.task, read_parts(dom, files), split)
            loaded["train"] = cap(train, caps.get("train"), f"{name}-train")
            loaded["test"] = cap(test, caps.get("test"), f"{name}-test")
        return loaded

    def corpus_columns() -> Dataset:
        docs = cap({"t": read_corpus(dom, files)}, caps.get("corpus"), f"{name}-corpus")["t"]
        return Dataset.from_dict({"text": docs})

    corpus = saved(base / "corpus", corpus_columns, f"{where}: corpus")
    train = saved(base / "train", lambda: Dataset.from_dict(columns()["train"]),
                  f"{where}: task train split")
    test = saved(base / "test", lambda: Dataset.from_dict(columns()["test"]),
                 f"{where}: task test split")
    end_task = EndTask(name=dom.task.name or name, labels=list(dom.task.labels), train=train,
                       test=test, epochs=dom.task.epochs if task_epochs else None)
    return Domain(name=name, corpus=corpus, task=end_task, files=sha)


def build_general(spec: SuiteSpec, files: SuiteFiles, caps: dict[str, int]
                  ) -> tuple[Dataset, Dataset | None]:
    """(held-out general corpus, general replay corpus or None), each capped like a domain's
    corpus (`caps["corpus"]`); a replay paragraph that is also held out is dropped, so the
    general MLM loss is measured on text no DAP batch can draw."""
    general = spec.general
    for rel, _ in general.paths():
        files.file(rel)
    sha = {rel: files.sha[rel] for rel, _ in general.paths()}
    key = cache_key({"general": dataclasses.asdict(general), "caps": caps.get("corpus")}, sha)
    base = files.dirs.cache / f"{spec.name}-general-{key}"

    def heldout_docs() -> list[str]:
        return cap({"t": read_sources(general.heldout, files)}, caps.get("corpus"),
                   "general-heldout")["t"]

    def replay_docs() -> list[str]:
        held = set(read_sources(general.heldout, files))
        docs = [d for d in read_sources(general.replay, files) if d not in held]
        return cap({"t": docs}, caps.get("corpus"), "general-replay")["t"]

    where = f"{spec.source}: general"
    heldout = saved(base / "heldout", lambda: Dataset.from_dict({"text": heldout_docs()}),
                    f"{where} heldout corpus")
    replay = saved(base / "replay", lambda: Dataset.from_dict({"text": replay_docs()}),
                   f"{where} replay corpus") if general.replay else None
    return heldout, replay


def build_suite(spec: SuiteSpec, profile: str, dirs: DataDirs, domains: list[str] | None = None,
                caps: dict[str, int] | None = None, defaults: dict[str, Any] | None = None,
                base_model: str = "", orders: list[list[str]] | None = None,
                split: str = "paper", task_epochs: bool = True,
                general_required: bool = True) -> Suite:
    """Build the named domains (default: all); `task_epochs=False` ignores the spec's per-task
    epochs (CPU profiles use one `ft_epochs` for all tasks). The spec's general text, if any,
    becomes the suite's `general_corpus` (held out) and `replay_corpus`; with
    `general_required=False` missing general files leave both None, with a warning."""
    names = domains or list(spec.domains)
    unknown = [n for n in names if n not in spec.domains]
    if unknown:
        raise SuiteError(f"suite {spec.name!r} has no domain(s) {unknown}")
    files = SuiteFiles(spec, dirs)
    built = {name: build_domain(spec, name, files, split, caps or {}, task_epochs)
             for name in names}
    heldout = replay = None
    if spec.general is not None:
        try:
            heldout, replay = build_general(spec, files, caps or {})
        except FetchError as err:
            if general_required:
                raise
            log.warning("%s: no general corpus, so no general MLM loss and no general replay "
                        "(%s)", spec.name, err)
    return Suite(name=spec.name, profile=profile, domains=built, orders=orders or [names],
                 base_model=base_model, defaults=dict(defaults or {}),
                 description=spec.description, general_corpus=heldout, replay_corpus=replay)


def task_splits(spec: SuiteSpec, name: str, split: str = "paper",
                dirs: DataDirs | None = None) -> tuple[Columns, Columns, Columns]:
    """(train, dev, test) columns of one domain's end task, files verified."""
    files = SuiteFiles(spec, dirs or DataDirs.resolve())
    return split_task(spec.domains[name].task, read_parts(spec.domains[name], files), split)


def describe(spec: SuiteSpec, dirs: DataDirs, split: str = "paper") -> list[dict[str, Any]]:
    """Per domain: corpus documents, task train/dev/test sizes and classes (files verified)."""
    files = SuiteFiles(spec, dirs)
    rows = []
    for name, dom in spec.domains.items():
        docs = read_corpus(dom, files)
        parts = read_parts(dom, files)
        row = {"domain": name, "corpus_docs": len(docs),
               "corpus_words": sum(len(d.split()) for d in docs),
               **{role: len(parts[role].get("label", [])) for role in ("train", "dev", "test")},
               "classes": len(dom.task.labels)}
        if split == "paper":
            p_train, _, p_test = split_task(dom.task, parts, "paper")
            row["paper_train"], row["paper_test"] = len(p_train["label"]), len(p_test["label"])
        rows.append(row)
    return rows
