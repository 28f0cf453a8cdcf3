"""Data files of a suite: where they live, download from their public URL, sha256 verification.

A suite manifest lists its files as `{domain, role, path, url, sha256, bytes}`; `path` is
relative to a data root laid out like the offline mirror (`github/OWNER/REPO/PATH`), so a data
dir filled by `fetch` and a mirror are read the same way. The data files never live in the
project: only their manifests do.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.registry import SuiteError

log = logging.getLogger(__name__)
CHUNK = 1 << 20


class FetchError(SuiteError):
    """A file that could not be downloaded, is missing, or does not match its checksum."""


def default_data_dir() -> Path:
    """`$CDAP_DATA_DIR`, else `data/` under the user cache dir (`$CDAP_CACHE` or XDG)."""
    if os.environ.get("CDAP_DATA_DIR"):
        return Path(os.environ["CDAP_DATA_DIR"])
    if os.environ.get("CDAP_CACHE"):
        return Path(os.environ["CDAP_CACHE"]) / "data"
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "cdap-bench" / "data"


def mirror_dir() -> Path | None:
    """The local mirror named by `$CDAP_DATA_MIRROR`, if any."""
    value = os.environ.get("CDAP_DATA_MIRROR")
    return Path(value) if value else None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify(entry: dict[str, Any], path: Path) -> str:
    """The file's sha256, after checking it exists and matches the manifest (where it has one)."""
    if not path.is_file():
        raise FetchError(f"missing data file {path} ({entry.get('domain', '?')} "
                         f"{entry.get('role', '')}); run `python -m benchmark data fetch` or "
                         "pass --mirror / --data-dir")
    actual = sha256_file(path)
    expected = entry.get("sha256")
    if expected and actual != expected:
        raise FetchError(f"checksum mismatch for {path}: sha256 {actual}, manifest says {expected}")
    return actual


def locate(entry: dict[str, Any], root: Path | None = None) -> Path:
    """Where a manifest file is read from: the given root, else the mirror, else the data dir."""
    if root is not None:
        return Path(root) / entry["path"]
    mirror = mirror_dir()
    if mirror is not None and (mirror / entry["path"]).exists():
        return mirror / entry["path"]
    return default_data_dir() / entry["path"]


def _copy_stream(source, handle, digest) -> int:
    size = 0
    while chunk := source.read(CHUNK):
        handle.write(chunk)
        digest.update(chunk)
        size += len(chunk)
    return size


def fetch_file(entry: dict[str, Any], data_dir: Path, mirror: Path | None = None,
               opener: Callable[[str], Any] = urllib.request.urlopen) -> tuple[Path, str]:
    """Put one manifest file under `data_dir`, from the mirror or its URL; (path, what happened).

    The bytes go to a temporary name beside the target and are renamed only once the sha256
    matches, so an interrupted or corrupt download never sits under the final name.
    """
    target = Path(data_dir) / entry["path"]
    expected = entry.get("sha256")
    if target.is_file() and (not expected or sha256_file(target) == expected):
        return target, "present"
    if mirror is None and not entry.get("url"):
        raise FetchError(f"{entry['path']}: no public URL in the manifest; place the file under "
                         f"{data_dir} yourself, or pass --data-dir where it already is")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.part{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with open(partial, "wb") as handle:
            if mirror is not None:
                source_path = Path(mirror) / entry["path"]
                if not source_path.is_file():
                    raise FetchError(f"missing in mirror {mirror}: {entry['path']}")
                with open(source_path, "rb") as source:
                    _copy_stream(source, handle, digest)
                origin = "copied from mirror"
            else:
                with opener(entry["url"]) as source:
                    _copy_stream(source, handle, digest)
                origin = "downloaded"
        if expected and digest.hexdigest() != expected:
            raise FetchError(f"checksum mismatch for {entry['path']} ({origin}): sha256 "
                             f"{digest.hexdigest()}, manifest says {expected}")
        os.replace(partial, target)
    except FetchError:
        partial.unlink(missing_ok=True)
        raise
    except Exception as err:  # network and file errors alike: never leave the partial file
        partial.unlink(missing_ok=True)
        raise FetchError(f"could not fetch {entry['path']} from "
                         f"{mirror or entry.get('url')}: {err}") from err
    return target, origin


def fetch_all(files: list[dict[str, Any]], data_dir: Path, mirror: Path | None = None,
              opener: Callable[[str], Any] = urllib.request.urlopen) -> list[tuple[Path, str]]:
    done = []
    for entry in files:
        path, what = fetch_file(entry, data_dir, mirror, opener)
        log.info("%-18s %s", what, path)
        done.append((path, what))
    return done


def disk_free_ok(data_dir: Path, files: list[dict[str, Any]]) -> None:
    """Fail before downloading when the data dir's disk cannot hold the suite."""
    need = sum(int(e.get("bytes", 0)) for e in files)
    probe = Path(data_dir)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise FetchError(
            f"{data_dir}: the suite needs {need / 1e6:.1f} MB, {free / 1e6:.1f} MB free")
