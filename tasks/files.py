"""Where a suite's data files are read from, and their sha256 check.

A suite names its files by a relative path laid out like the offline mirror
(`github/OWNER/REPO/PATH`), so a data dir filled by `data fetch` and a mirror read the same way.
`$CDAP_DATA_DIR` and `$CDAP_DATA_MIRROR` are read here and nowhere else, as the defaults of
`DataDirs.resolve`; everything else receives the directories as arguments.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from tasks.registry import SuiteError
from tasks.spec import FileEntry, SuiteSpec

log = logging.getLogger(__name__)
CHUNK = 1 << 20


class FetchError(SuiteError):
    """A file that could not be downloaded, is missing, or does not match its checksum."""


@dataclass(frozen=True)
class DataDirs:
    """The data dir (fetched files and the parsed-dataset cache) and an optional mirror."""

    data_dir: Path
    mirror: Path | None = None

    @classmethod
    def resolve(cls, data_dir: str | Path | None = None,
                mirror: str | Path | None = None) -> DataDirs:
        """The given directories, else `$CDAP_DATA_DIR` (else `data/` under `$CDAP_CACHE` or the
        XDG cache dir) and `$CDAP_DATA_MIRROR`."""
        if data_dir is None:
            if os.environ.get("CDAP_DATA_DIR"):
                data_dir = os.environ["CDAP_DATA_DIR"]
            elif os.environ.get("CDAP_CACHE"):
                data_dir = Path(os.environ["CDAP_CACHE"]) / "data"
            else:
                xdg = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                data_dir = xdg / "cdap-bench" / "data"
        if mirror is None and os.environ.get("CDAP_DATA_MIRROR"):
            mirror = os.environ["CDAP_DATA_MIRROR"]
        return cls(Path(data_dir), Path(mirror) if mirror else None)

    @property
    def cache(self) -> Path:
        """Where parsed datasets (and their tokenisations) are saved."""
        return self.data_dir / "cache"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify(entry: FileEntry, path: Path) -> str:
    """The file's sha256, after checking it exists and matches the manifest (where it has one)."""
    if path.exists() and not path.is_file():
        kind = "a directory" if path.is_dir() else \
            "a FIFO (named pipe)" if stat.S_ISFIFO(path.stat().st_mode) else "not a regular file"
        raise FetchError(f"data file {path} ({entry.domain or '?'} {entry.role}) is {kind}; "
                         "a data file must be a regular file")
    if not path.is_file():
        raise FetchError(f"missing data file {path} ({entry.domain or '?'} {entry.role}); run "
                         "`python -m benchmark data fetch` or pass --mirror / --data-dir")
    actual = sha256_file(path)
    if entry.sha256 and actual != entry.sha256:
        raise FetchError(
            f"checksum mismatch for {path}: sha256 {actual}, manifest says {entry.sha256}")
    return actual


def locate(entry: FileEntry, root: Path | None, dirs: DataDirs) -> Path:
    """Where a file is read from: an absolute path as is; under a user suite's root; else the
    mirror where it has the file, else the data dir."""
    if Path(entry.path).is_absolute():
        return Path(entry.path)
    if root is not None:
        return root / entry.path
    if dirs.mirror is not None and (dirs.mirror / entry.path).exists():
        return dirs.mirror / entry.path
    return dirs.data_dir / entry.path


@dataclass
class SuiteFiles:
    """Resolves and verifies a suite's files once each, remembering each file's sha256."""

    spec: SuiteSpec
    dirs: DataDirs
    sha: dict[str, str] = field(default_factory=dict)

    def file(self, rel: str) -> tuple[Path, str]:
        """(where the file is, its encoding), verified."""
        entry = self.spec.files[rel]
        where = locate(entry, self.spec.root, self.dirs)
        if rel not in self.sha:
            self.sha[rel] = verify(entry, where)
        return where, entry.encoding

    def files(self, rels: tuple[str, ...]) -> list[tuple[Path, str]]:
        return [self.file(r) for r in rels]
