"""The suite spec: typed domains, end tasks, corpus sources and data files, checked on reading.

`real6` and `das6` read theirs from tasks/manifests/NAME.json; a user suite is a YAML file of the
same shape (docs/suites.md, "Your own domains"). Every problem is reported as one line
naming the file (or manifest), the domain and the field.
"""

from __future__ import annotations

import codecs
import dataclasses
import inspect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from benchmark.config import read_yaml
from tasks.formats import CORPUS_READERS, TASK_READERS
from tasks.registry import SuiteError

MANIFESTS = Path(__file__).parent / "manifests"
SPLITS = ("paper", "standard")


@dataclass(frozen=True)
class FileEntry:
    """A data file: its path (relative to the data root), where to download it, its checksum."""

    path: str
    url: str | None = None
    sha256: str | None = None
    bytes: int | None = None
    domain: str = ""
    role: str = ""
    encoding: str = "utf-8"


@dataclass(frozen=True)
class CorpusSource:
    """Files of one corpus format, or (format `hf`) a `datasets` id or saved dataset folder."""

    format: str = "text"
    files: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)  # the reader's keyword arguments


@dataclass(frozen=True)
class TaskSpec:
    format: str
    labels: tuple[str, ...]
    train: tuple[str, ...]
    test: tuple[str, ...]
    dev: tuple[str, ...] = ()
    name: str | None = None
    resplit: float | None = None  # the paper's resplit ratio (share of train kept)
    epochs: int | None = None  # the paper's per-task fine-tuning epochs


@dataclass(frozen=True)
class DomainSpec:
    name: str
    corpus: tuple[CorpusSource, ...]
    task: TaskSpec

    def paths(self) -> list[tuple[str, str]]:
        """(path, role) of every file the domain names, corpus first, then train, dev, test."""
        named = [(p, "corpus") for source in self.corpus for p in source.files]
        named += [(p, f"task-{role}") for role in ("train", "dev", "test")
                  for p in getattr(self.task, role)]
        return named


@dataclass(frozen=True)
class GeneralSpec:
    """The suite's general-domain text: `heldout` (the general MLM loss, never DAP-trained) and
    `replay` (what DAP may replay), from disjoint files; `note` names what it stands in for."""

    heldout: tuple[CorpusSource, ...]
    replay: tuple[CorpusSource, ...] = ()
    note: str = ""

    def paths(self) -> list[tuple[str, str]]:
        return [(p, f"general-{role}") for role in ("heldout", "replay")
                for source in getattr(self, role) for p in source.files]


@dataclass
class SuiteSpec:
    """A whole suite as described by a manifest or a YAML file."""

    name: str
    source: str  # the manifest or YAML file, for messages
    domains: dict[str, DomainSpec]
    files: dict[str, FileEntry]  # every file the domains name, in their order
    root: Path | None = None  # a user suite's data root; None: the mirror / data dir
    description: str = ""
    base_model: str | None = None
    split: str = "paper"
    orders: list[list[str]] | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    caps: dict[str, int] = field(default_factory=dict)
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    general: GeneralSpec | None = None


# ---------------------------------------------------------------- reading

_SUITE_KEYS = {"name", "description", "base_model", "data_dir", "split", "orders", "defaults",
               "caps", "profiles", "domains", "files", "note", "general"}
_TASK_KEYS = {"name", "format", "labels", "train", "dev", "test", "resplit", "epochs"}
_FILE_KEYS = {"path", "url", "sha256", "bytes", "domain", "role", "encoding"}
_HF_OPTIONS = ("source", "split", "field")


def load_manifest(name: str) -> SuiteSpec:
    """A built-in suite's spec (tasks/manifests/NAME.json)."""
    path = MANIFESTS / f"{name}.json"
    if not path.exists():
        known = sorted(p.stem for p in MANIFESTS.glob("*.json"))
        raise SuiteError(f"no data manifest for suite {name!r}; suites with data: {known}")
    return parse_spec(json.loads(path.read_text()), str(path), root=None)


def read_suite_file(path: str | Path) -> SuiteSpec:
    """A user suite YAML; paths in it are relative to its folder (or its `data_dir`)."""
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"suite file {path} does not exist")
    raw = read_yaml(path, SuiteError)
    if not isinstance(raw, dict):
        raise SuiteError(f"{path}: a suite file must be a mapping")
    root = raw.get("data_dir")
    raw.setdefault("name", path.stem)
    return parse_spec(raw, str(path), root=(path.parent / str(root)) if root else path.parent)


def suite_spec(name_or_path: str) -> SuiteSpec:
    """The spec for `data fetch/check`: a built-in manifest or a user YAML."""
    if name_or_path.endswith((".yaml", ".yml")):
        return read_suite_file(name_or_path)
    return load_manifest(name_or_path)


def parse_spec(raw: dict[str, Any], source: str, root: Path | None) -> SuiteSpec:
    """Check a spec mapping and type it; errors name `source`, the domain and the field."""
    unknown = set(raw) - _SUITE_KEYS
    if unknown:
        raise SuiteError(
            f"{source}: unknown key(s) {sorted(unknown)}; valid: {sorted(_SUITE_KEYS)}")
    if not isinstance(raw.get("domains"), dict) or not raw["domains"]:
        raise SuiteError(f"{source}: `domains` must map domain names to {{corpus, task}}")
    domains = {str(name): _domain(str(name), dom, source)
               for name, dom in raw["domains"].items()}
    listed = _listed_files(raw.get("files") or [], source)
    files: dict[str, FileEntry] = {}
    for dom in domains.values():
        for path, role in dom.paths():
            entry = listed.get(path) or FileEntry(path)
            if not entry.domain:
                entry = dataclasses.replace(entry, domain=dom.name, role=role)
            files.setdefault(path, entry)
    general = _general(raw["general"], source) if raw.get("general") is not None else None
    for path, role in general.paths() if general else ():
        entry = listed.get(path) or FileEntry(path)
        files.setdefault(path, entry if entry.domain else
                         dataclasses.replace(entry, domain="general", role=role))
    split = raw.get("split", "paper")
    if split not in SPLITS:
        raise SuiteError(f"{source}: split {split!r} is not one of {', '.join(SPLITS)}")
    for key in ("defaults", "caps", "profiles"):
        if not isinstance(raw.get(key) or {}, dict):
            raise SuiteError(f"{source}: `{key}` must be a mapping")
    profiles = dict(raw.get("profiles") or {})
    _caps(raw.get("caps") or {}, f"{source}: caps")
    for name, profile in profiles.items():
        where = f"{source}: profile {name!r}"
        if not isinstance(profile, dict) or set(profile) - {"defaults", "caps", "orders"}:
            raise SuiteError(f"{where}: expected a mapping of defaults, caps, orders")
        _caps(profile.get("caps") or {}, f"{where}: caps")
    orders = raw.get("orders")
    if orders is not None and not (isinstance(orders, list)
                                   and all(isinstance(o, list) for o in orders)):
        raise SuiteError(f"{source}: `orders` must be a list of lists of domain names")
    return SuiteSpec(
        name=str(raw["name"]), source=source, domains=domains, files=files, root=root,
        description=str(raw.get("description", "")),
        base_model=None if raw.get("base_model") is None else str(raw["base_model"]),
        split=split, orders=orders, defaults=dict(raw.get("defaults") or {}),
        caps=dict(raw.get("caps") or {}), profiles=profiles, general=general)


def _general(raw: Any, source: str) -> GeneralSpec:
    """`general: {heldout: [sources], replay: [sources], note}` (sources as a domain corpus's)."""
    where = f"{source}: general"
    if not isinstance(raw, dict) or "heldout" not in raw or set(raw) - {"heldout", "replay",
                                                                        "note"}:
        raise SuiteError(f"{where}: expected a mapping of heldout, replay (corpus sources), note")
    parts = {}
    for role in ("heldout", "replay"):
        sources = raw.get(role) or []
        sources = sources if isinstance(sources, list) else [sources]
        parts[role] = tuple(_corpus_source(s, f"{where}: {role} source {k + 1}")
                            for k, s in enumerate(sources))
    shared = {p for s in parts["heldout"] for p in s.files} & \
        {p for s in parts["replay"] for p in s.files}
    if shared:
        raise SuiteError(f"{where}: file(s) {sorted(shared)} are both held out and replayed")
    return GeneralSpec(heldout=parts["heldout"], replay=parts["replay"],
                       note=str(raw.get("note", "")))


def _caps(raw: Any, where: str) -> None:
    if not isinstance(raw, dict) or set(raw) - {"corpus", "train", "test"}:
        raise SuiteError(f"{where}: expected a mapping of corpus, train, test to row counts")
    for key, value in raw.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 0):
            raise SuiteError(f"{where}: {key} must be a row count (0: all rows), got {value!r}")


def _as_tuple(value: Any, where: str) -> tuple[str, ...]:
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) and v for v in values):
        raise SuiteError(f"{where}: expected a file path or a list of them, got {value!r}")
    return tuple(values)


def _domain(name: str, dom: Any, source: str) -> DomainSpec:
    where = f"{source}: domain {name!r}"
    for key in ("corpus", "task"):
        if not isinstance(dom, dict) or key not in dom:
            raise SuiteError(f"{where} needs a `{key}` entry")
    extra = set(dom) - {"corpus", "task"}
    if extra:
        raise SuiteError(f"{where}: unknown key(s) {sorted(extra)}; valid: corpus, task")
    sources = dom["corpus"] if isinstance(dom["corpus"], list) else [dom["corpus"]]
    corpus = tuple(_corpus_source(s, f"{where}: corpus source {k + 1}")
                   for k, s in enumerate(sources))
    return DomainSpec(name=name, corpus=corpus, task=_task(dom["task"], f"{where}: task"))


def _corpus_source(raw: Any, where: str) -> CorpusSource:
    if not isinstance(raw, dict):
        raise SuiteError(f"{where}: expected a mapping {{format, files, ...}}")
    options = dict(raw)
    fmt = options.pop("format", "text")
    if fmt == "hf":
        allowed: tuple[str, ...] = _HF_OPTIONS
        if "source" not in options:
            raise SuiteError(f"{where}: format hf needs `source` (a datasets id or folder)")
        files: tuple[str, ...] = ()
    elif fmt in CORPUS_READERS:
        # a reader's keyword arguments are its options (`field`, `column`, `header`)
        params = inspect.signature(CORPUS_READERS[fmt]).parameters.values()
        allowed = tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY)
        if "files" not in options:
            raise SuiteError(f"{where}: format {fmt} needs `files`")
        files = _as_tuple(options.pop("files"), f"{where}: files")
    else:
        raise SuiteError(f"{where}: unknown corpus format {fmt!r}; valid: "
                         f"{', '.join(CORPUS_READERS)}, hf")
    extra = set(options) - set(allowed)
    if extra:
        raise SuiteError(f"{where}: format {fmt} has no option(s) {sorted(extra)}; "
                         f"valid: {', '.join(allowed) or 'none'}")
    return CorpusSource(format=fmt, files=files, options=options)


def _task(raw: Any, where: str) -> TaskSpec:
    if not isinstance(raw, dict):
        raise SuiteError(f"{where}: expected a mapping {{format, labels, train, test, ...}}")
    for key in ("format", "labels", "train", "test"):
        if key not in raw:
            raise SuiteError(f"{where} needs `{key}`")
    extra = set(raw) - _TASK_KEYS
    if extra:
        raise SuiteError(f"{where}: unknown key(s) {sorted(extra)}; valid: {sorted(_TASK_KEYS)}")
    if raw["format"] not in TASK_READERS:
        raise SuiteError(f"{where}: unknown task format {raw['format']!r}; valid: "
                         f"{', '.join(TASK_READERS)}")
    resplit, epochs = raw.get("resplit"), raw.get("epochs")
    if resplit is not None and not (_is_number(resplit) and 0 < resplit <= 1):
        raise SuiteError(f"{where}: `resplit` must be a share of train in (0, 1], got {resplit!r}")
    if epochs is not None and not (isinstance(epochs, int) and not isinstance(epochs, bool)
                                   and epochs > 0):
        raise SuiteError(f"{where}: `epochs` must be a positive integer, got {epochs!r}")
    return TaskSpec(format=raw["format"], labels=_labels(raw["labels"], where),
                    train=_as_tuple(raw["train"], f"{where}: train"),
                    test=_as_tuple(raw["test"], f"{where}: test"),
                    dev=_as_tuple(raw["dev"], f"{where}: dev") if raw.get("dev") else (),
                    name=None if raw.get("name") is None else str(raw["name"]),
                    resplit=None if resplit is None else float(resplit), epochs=epochs)


def _labels(raw: Any, where: str) -> tuple[str, ...]:
    """Labels as strings: the readers compare the data's labels as strings, so `[0, 1]` in the
    YAML matches `"label": 0` in a JSON file. YAML reads unquoted yes/no/on/off as booleans and
    1.0 as a float; those are refused rather than guessed."""
    if not isinstance(raw, list) or len(raw) < 2:
        raise SuiteError(f"{where}: `labels` must list at least two labels, got {raw!r}")
    for label in raw:
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise SuiteError(f"{where}: label {label!r} is a {type(label).__name__}; labels are "
                             "strings or integers (quote it in YAML: '\"yes\"')")
    labels = tuple(str(x) for x in raw)
    if len(set(labels)) != len(labels):
        raise SuiteError(f"{where}: `labels` lists a label twice: {list(labels)}")
    return labels


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _listed_files(raw: Any, source: str) -> dict[str, FileEntry]:
    """The `files:` entries (url, sha256, encoding), checked: http(s) URLs only, known codec."""
    if not isinstance(raw, list):
        raise SuiteError(f"{source}: `files` must be a list of {{path, url, sha256}}")
    out: dict[str, FileEntry] = {}
    for k, item in enumerate(raw, start=1):
        where = f"{source}: files entry {k}"
        if not isinstance(item, dict) or not isinstance(item.get("path"), str):
            raise SuiteError(f"{where}: expected a mapping with a `path`")
        where = f"{where} ({item['path']})"
        extra = set(item) - _FILE_KEYS
        if extra:
            raise SuiteError(
                f"{where}: unknown key(s) {sorted(extra)}; valid: {sorted(_FILE_KEYS)}")
        url = item.get("url")
        if url is not None and (not isinstance(url, str)
                                or urlsplit(url).scheme not in ("http", "https")):
            raise SuiteError(f"{where}: url {url!r} is not an http(s) URL")
        sha, size = item.get("sha256"), item.get("bytes")
        if sha is not None and not (isinstance(sha, str) and len(sha) == 64
                                    and all(c in "0123456789abcdef" for c in sha)):
            raise SuiteError(f"{where}: sha256 must be 64 lowercase hex digits, got {sha!r}")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise SuiteError(f"{where}: bytes must be a file size, got {size!r}")
        encoding = item.get("encoding", "utf-8")
        try:
            codecs.lookup(encoding)
        except (LookupError, TypeError):
            raise SuiteError(f"{where}: unknown encoding {encoding!r}") from None
        out[item["path"]] = FileEntry(**item)
    return out
