"""Split policy: the paper's resplit of an end task, or the files' own splits; seeded caps."""

from __future__ import annotations

import random

from tasks.formats import Columns
from tasks.registry import SuiteError
from tasks.spec import SPLITS, TaskSpec

Parts = dict[str, Columns]  # role (train, dev, test) -> columns


def split_task(task: TaskSpec, parts: Parts, split: str) -> tuple[Columns, Columns, Columns]:
    """(train, dev, test) from the files' own parts. With split='paper', dev is merged into
    test and the paper's per-class take-out is applied where the task has a `resplit` ratio."""
    if split not in SPLITS:
        raise SuiteError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if split == "paper" and task.resplit:
        test = merge(parts["test"], parts["dev"])
        train, test = resplit(parts["train"], test, task.resplit, len(task.labels))
        return train, {}, test
    return parts["train"], parts["dev"], parts["test"]


def resplit(train: Columns, test: Columns, ratio: float,
            num_labels: int) -> tuple[Columns, Columns]:
    """The paper's resplit: move the first `floor(floor(n·(1-ratio)) / L)` train examples of each
    class (file order, fewer where a class is smaller) to the end of test.

    Dev sets are merged into test by the caller first. This is the companion code's rule
    (ContinualLM dataloader/data.py:225-229, `num_takeout`); it gives ChemProt 2,667/7,398,
    ACL-ARC 1,520/421 and SciERC 2,260/2,388.
    """
    take = int((len(train["label"]) * (1 - ratio)) // num_labels)
    moved: set[int] = set()
    for label in range(num_labels):
        rows = [i for i, y in enumerate(train["label"]) if y == label][:take]
        moved.update(rows)
    order = sorted(moved, key=lambda i: (train["label"][i], i))
    new_test = {k: list(v) + [train[k][i] for i in order] for k, v in test.items()}
    new_train = {k: [x for i, x in enumerate(v) if i not in moved] for k, v in train.items()}
    return new_train, new_test


def merge(*parts: Columns) -> Columns:
    out: Columns = {}
    for part in parts:
        for key, values in part.items():
            out.setdefault(key, []).extend(values)
    return out


def cap(columns: Columns, limit: int | None, seed: str) -> Columns:
    """A seeded random subset of `limit` rows, kept in file order (None or 0: all rows)."""
    n = len(next(iter(columns.values()), []))
    if not limit or n <= limit:
        return columns
    keep = sorted(random.Random(seed).sample(range(n), limit))
    return {k: [v[i] for i in keep] for k, v in columns.items()}
