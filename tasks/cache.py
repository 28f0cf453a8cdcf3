"""Parsed datasets saved with `datasets` under the data dir's `cache/`.

A domain's corpus, train and test are keyed by its spec, the split, the caps and the sha256 of
every file it reads, so a later run loads Arrow files instead of re-parsing; the harness's
tokenisation (`Dataset.map`) is cached beside them by `datasets`, keyed by the tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datasets import Dataset, load_from_disk

from tasks.registry import SuiteError

# bump when a reader's output changes, to invalidate cached datasets
# (2: invalid UTF-8 is replaced, the rest of the file read as UTF-8)
READER_VERSION = 2


def cache_key(described: Any, sha: dict[str, str]) -> str:
    """A short digest of a JSON-able description and the sha256 of the files read."""
    digest = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode())
    digest.update(json.dumps(sorted(sha.items())).encode())
    digest.update(str(READER_VERSION).encode())
    return digest.hexdigest()[:20]


def saved(path: Path, build: Callable[[], Dataset], what: str) -> Dataset:
    """Load the dataset saved at `path`, or build, save (atomically) and load it. An empty
    dataset is never saved: `what` names it in the error."""
    if not (path / "state.json").exists():
        data = build()
        if len(data) == 0:
            raise SuiteError(f"{what} is empty")
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        data.save_to_disk(str(tmp))
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, path)
        except OSError:  # another process saved it first
            shutil.rmtree(tmp, ignore_errors=True)
    return load_from_disk(str(path))
