"""The result record of one (suite, method, order, seed): the one schema of `result.json`.

`loop.run` fills a `RunRecord` as the run goes (it is also the content of `progress.json`) and
writes it through `save`; `tables.py` reads records through `load`, never raw dicts. Files made
before the schema had a version (no `schema` key: version 1) load unchanged; fields added since
get their defaults (`base_fingerprint: None`: θ0 unknown; `protocol: "finetune"`, the only one
before schema 3; `collapsed`: None in every cell, not recorded; `base_name`, `kernels` and
`final_fingerprint`: None, `mlm_loss` and `compute`: empty, not recorded).
"""

from __future__ import annotations

import dataclasses
import platform
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from benchmark.atomic import DamagedFile, read_json, write_json_atomic

PACKAGES = ("torch", "transformers", "datasets", "accelerate", "adapters", "peft", "tokenizers")


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """{"python": its version, package: its installed version or None} for a record."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions

SCHEMA = 3  # 2: schema, base_fingerprint, head_warmup_loss always present; 3: protocol, collapsed


class NotFinite(ValueError):
    """A loss or weight of a run that is NaN or infinite: it never becomes a result."""


@dataclass
class RunRecord:
    suite: str
    profile: str
    synthetic: bool
    method: str
    row: str
    order: int
    seed: int
    domains: list[str]
    needs_domain_id: bool
    config: dict[str, Any]  # the resolved RunConfig
    versions: dict[str, Any] = field(default_factory=dict)  # python and package versions
    git_commit: str | None = None
    threads: int | None = None  # torch threads of the run (they can move the last bits)
    cpu: str | None = None  # loop.cpu_description() (None: not recorded)
    base_fingerprint: str | None = None  # sha256 of θ0's state dict (None: unknown, schema 1)
    # the shipped θ0 (benchmark/theta0/manifest.json) with that fingerprint; None: not a shipped
    # one (a hub / local model, a θ0 pretrained here) or not recorded
    base_name: str | None = None
    # kernels.kernel_setting(): {"pinned", "env", "capability", "hardware"} (None: not recorded)
    kernels: dict[str, Any] | None = None
    # sha256 of the model's state dict after the last domain (basemodel.fingerprint), the
    # weights `reproduce` compares bit for bit beside the rounded numbers (None: not recorded)
    final_fingerprint: str | None = None
    # A[t][i]: row t (after domain t) holds one cell per task i <= t; None = not evaluated
    mf1: list[list[float | None]] = field(default_factory=list)
    acc: list[list[float | None]] = field(default_factory=list)
    # how the cells were measured: "finetune" (the paper's) or "probe" (benchmark/probe.py)
    protocol: str = "finetune"
    # per cell as mf1: True where every test prediction was one class (None: not evaluated, or
    # not recorded: files made before schema 3 load with None in every cell)
    collapsed: list[list[bool | None]] = field(default_factory=list)
    dap_loss: list[list[float]] = field(default_factory=list)
    dap_steps: list[int] = field(default_factory=list)
    general_mlm_loss: list[float] = field(default_factory=list)  # θ0, then after each domain
    # the MLM-loss matrix: row 0 θ0's, row t + 1 after DAP-training domain t; one loss per
    # domain of the run (its held-out text, `Context.heldout_corpus`), future ones included.
    # Empty: not recorded (a file without the field, or a run resumed from one).
    mlm_loss: list[list[float]] = field(default_factory=list)
    head_warmup_loss: list[float] = field(default_factory=list)
    timings: dict[str, Any] = field(default_factory=dict)
    # per phase (head_warmup, method, dap, finetune | probe): {"tokens": int, "flops": float},
    # counted as the run spends them (benchmark/compute.py); {}: not recorded
    compute: dict[str, dict[str, float]] = field(default_factory=dict)
    resumed_at: list[int] = field(default_factory=list)
    finished: bool = False
    schema: int = SCHEMA

    @property
    def domains_done(self) -> int:
        """Domains whose DAP-training is recorded."""
        return len(self.dap_steps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "record") -> RunRecord:
        if not isinstance(data, dict):
            raise DamagedFile(f"{source}: not a result record (a JSON object expected)")
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        known.setdefault("schema", 1)
        if not _is_int(known["schema"]) or known["schema"] < 1:
            raise DamagedFile(f"{source}: not a result record (schema must be a positive "
                              f"integer, got {known['schema']!r})")
        if known["schema"] > SCHEMA:
            raise DamagedFile(f"{source}: schema {known['schema']} is newer than this "
                              f"package's ({SCHEMA}); update the package")
        if isinstance(known.get("mf1"), list):  # one flag per cell of mf1; None: not recorded
            known["collapsed"] = _shaped_like(known.get("collapsed"), known["mf1"])
        try:
            record = cls(**known)
        except TypeError as err:  # a required key missing
            raise DamagedFile(f"{source}: not a result record ({err})") from None
        problem = _problem(record)
        if problem:
            raise DamagedFile(f"{source}: not a valid result record: {problem}")
        return record


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numbers(value: Any, optional: bool = False) -> bool:
    """A list of numbers (`optional`: or None)."""
    return isinstance(value, list) and all(
        _is_number(v) or (optional and v is None) for v in value)


_TYPES: dict[str, tuple[Any, str]] = {  # field: (check, what it must be)
    "suite": (lambda v: isinstance(v, str), "a string"),
    "profile": (lambda v: isinstance(v, str), "a string"),
    "method": (lambda v: isinstance(v, str), "a string"),
    "row": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "synthetic": (lambda v: isinstance(v, bool), "true or false"),
    "needs_domain_id": (lambda v: isinstance(v, bool), "true or false"),
    "finished": (lambda v: isinstance(v, bool), "true or false"),
    "order": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "seed": (_is_int, "an integer"),
    "domains": (lambda v: isinstance(v, list) and v and all(isinstance(d, str) for d in v),
                "a non-empty list of domain names"),
    "config": (lambda v: isinstance(v, dict), "a mapping"),
    "versions": (lambda v: isinstance(v, dict), "a mapping"),
    "timings": (lambda v: isinstance(v, dict), "a mapping"),
    "git_commit": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "cpu": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "base_fingerprint": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "threads": (lambda v: v is None or _is_int(v), "an integer or null"),
    "protocol": (lambda v: isinstance(v, str), "a string"),
    "dap_loss": (lambda v: isinstance(v, list) and all(_numbers(r) for r in v),
                 "a list of lists of numbers"),
    "dap_steps": (lambda v: isinstance(v, list) and all(_is_int(s) for s in v),
                  "a list of integers"),
    "general_mlm_loss": (_numbers, "a list of numbers"),
    "head_warmup_loss": (_numbers, "a list of numbers"),
    "mlm_loss": (lambda v: isinstance(v, list) and all(_numbers(r) for r in v),
                 "a list of lists of numbers"),
    "compute": (lambda v: _compute_ok(v), "a mapping of phase to {tokens, flops}"),
    "resumed_at": (lambda v: isinstance(v, list) and all(_is_int(s) for s in v),
                   "a list of integers"),
}


def _compute_ok(value: Any) -> bool:
    """`compute`: phase names mapped to {"tokens": integer, "flops": number}, both >= 0."""
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, dict) and set(v) == {"tokens", "flops"}
        and _is_int(v["tokens"]) and v["tokens"] >= 0 and _is_number(v["flops"])
        and v["flops"] >= 0 for k, v in value.items())


def _problem(record: RunRecord) -> str | None:
    """What makes `record` unusable, in a few words, or None. Types of every field; A (`mf1`,
    `acc`) lower-triangular over the recorded domains: row t holds t + 1 cells, each a number
    or null (not evaluated: `eval_matrix: diagonal` leaves A[t][i < t] null for t < T); a
    finished record has all T rows with numbers on the diagonal and in the last row."""
    for name, (check, what) in _TYPES.items():
        value = getattr(record, name)
        if not check(value):
            return f"{name} must be {what}, got {_short(value)}"
    size = len(record.domains)
    for metric in ("mf1", "acc"):
        rows = getattr(record, metric)
        if not isinstance(rows, list) or len(rows) > size:
            return f"{metric} must be a list of at most {size} rows (one per domain)"
        for t, row in enumerate(rows):
            if not _numbers(row, optional=True):
                return f"{metric} row {t} must be a list of numbers or nulls, got {_short(row)}"
            complete = t < len(rows) - 1 or record.finished
            if len(row) > t + 1 or complete and len(row) != t + 1:
                return f"{metric} row {t} has {len(row)} cells, expected {t + 1}"
        if record.finished:
            if len(rows) != size:
                return f"{metric} has {len(rows)} rows for {size} domains"
            missing = [f"A[{t}][{t}]" for t in range(size) if rows[t][t] is None] + \
                [f"A[{size - 1}][{i}]" for i in range(size) if rows[-1][i] is None]
            if missing:
                return f"{metric}: {', '.join(dict.fromkeys(missing))} of a finished run is null"
    if len(record.acc) != len(record.mf1):
        return f"acc has {len(record.acc)} rows, mf1 {len(record.mf1)}"
    return _mlm_loss_problem(record)


def _mlm_loss_problem(record: RunRecord) -> str | None:
    """The MLM-loss matrix: at most T + 1 rows of T losses (θ0's and one per domain); a
    finished run has all of them or none."""
    rows, size = record.mlm_loss, len(record.domains)
    if len(rows) > size + 1 or any(len(row) != size for row in rows):
        return f"mlm_loss must hold at most {size + 1} rows of {size} losses"
    if record.finished and rows and len(rows) != size + 1:
        return f"mlm_loss of a finished run has {len(rows)} rows, expected {size + 1} or none"
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _shaped_like(flags: Any, rows: list) -> list[list[bool | None]]:
    """`collapsed` cut or padded with None to the shape of `mf1`: files made before schema 3
    have none, and a progress file written while the package was being upgraded under a running
    process can hold fewer rows than `mf1` (resume would otherwise stop at the next cell)."""
    flags = flags if isinstance(flags, list) else []
    shaped = []
    for t, row in enumerate(rows):
        have = flags[t] if t < len(flags) and isinstance(flags[t], list) else []
        width = len(row) if isinstance(row, list) else 0
        shaped.append((list(have) + [None] * width)[:width])
    return shaped


def save(path: Path, record: RunRecord) -> None:
    write_json_atomic(path, record.to_dict())


def load(path: Path) -> RunRecord:
    """The record in `path`; `DamagedFile` naming the file if it is not one."""
    return RunRecord.from_dict(read_json(path), str(path))
