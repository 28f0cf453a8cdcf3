"""`data fetch`: put a suite's files under its data root, from a mirror or their public URL.

The data files never live in the project: only their manifests do. Every file is written under
a temporary name beside its target and renamed only once its sha256 matches, so an interrupted,
timed-out or corrupt download never sits under the final name, and the temporary file goes
whatever stopped it (an error, a timeout, Ctrl-C).
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
from urllib.parse import urlsplit

from tasks.files import CHUNK, FetchError, sha256_file
from tasks.registry import SuiteError
from tasks.spec import FileEntry, SuiteSpec

log = logging.getLogger(__name__)
TIMEOUT_S = 60.0  # seconds a download may wait for the server (connect, and each read)
Opener = Callable[..., Any]  # urllib.request.urlopen(url, timeout=...)


def fetch_plan(spec: SuiteSpec, target: Path) -> list[FileEntry]:
    """The files `data fetch` writes under `target`, all checked before any is written: a path
    that is absolute or leaves `target` (`../x`) is refused, naming the suite file and entry."""
    root = target.resolve()
    for entry in spec.files.values():
        where = target / entry.path
        if Path(entry.path).is_absolute() or not where.resolve().is_relative_to(root):
            raise SuiteError(f"{spec.source}: file {entry.path!r} ({entry.domain} {entry.role}) "
                             f"is outside the data dir {target}; `data fetch` writes only "
                             "relative paths inside it")
    return list(spec.files.values())


def _copy_stream(source, handle, digest) -> int:
    size = 0
    while chunk := source.read(CHUNK):
        handle.write(chunk)
        digest.update(chunk)
        size += len(chunk)
    return size


def fetch_file(entry: FileEntry, data_dir: Path, mirror: Path | None = None,
               opener: Opener = urllib.request.urlopen,
               timeout: float = TIMEOUT_S) -> tuple[Path, str]:
    """Put one file under `data_dir`, from the mirror or its URL; (path, what happened)."""
    target = Path(data_dir) / entry.path
    if target.is_file() and (not entry.sha256 or sha256_file(target) == entry.sha256):
        return target, "present"
    if mirror is None and not entry.url:
        raise FetchError(f"{entry.path}: no public URL in the manifest; place the file under "
                         f"{data_dir} yourself, or pass --data-dir where it already is")
    if mirror is None and urlsplit(entry.url).scheme not in ("http", "https"):
        raise FetchError(f"{entry.path}: url {entry.url!r} is not an http(s) URL")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.part{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with open(partial, "wb") as handle:
            if mirror is not None:
                source_path = Path(mirror) / entry.path
                if not source_path.is_file():
                    raise FetchError(f"missing in mirror {mirror}: {entry.path}")
                with open(source_path, "rb") as source:
                    _copy_stream(source, handle, digest)
                origin = "copied from mirror"
            else:
                with opener(entry.url, timeout=timeout) as source:
                    _copy_stream(source, handle, digest)
                origin = "downloaded"
        if entry.sha256 and digest.hexdigest() != entry.sha256:
            raise FetchError(f"checksum mismatch for {entry.path} ({origin}): sha256 "
                             f"{digest.hexdigest()}, manifest says {entry.sha256}")
        os.replace(partial, target)
    except FetchError:
        raise
    except Exception as err:  # network and file errors alike: the source and file named
        timed_out = isinstance(err, TimeoutError) or isinstance(getattr(err, "reason", None),
                                                                TimeoutError)
        why = f"no answer within {timeout:g} s (--timeout)" if timed_out else str(err)
        raise FetchError(f"could not fetch {entry.path} from {mirror or entry.url}: {why}") from err
    finally:
        partial.unlink(missing_ok=True)  # gone after a rename; removed after any failure
    return target, origin


def fetch_all(files: list[FileEntry], data_dir: Path, mirror: Path | None = None,
              opener: Opener = urllib.request.urlopen,
              timeout: float = TIMEOUT_S) -> list[tuple[Path, str]]:
    done = []
    for entry in files:
        path, what = fetch_file(entry, data_dir, mirror, opener, timeout)
        log.info("%-18s %s", what, path)
        done.append((path, what))
    return done


def disk_free_ok(data_dir: Path, files: list[FileEntry]) -> None:
    """Fail before downloading when the data dir's disk cannot hold the suite."""
    need = sum(int(e.bytes or 0) for e in files)
    probe = Path(data_dir)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise FetchError(
            f"{data_dir}: the suite needs {need / 1e6:.1f} MB, {free / 1e6:.1f} MB free")
