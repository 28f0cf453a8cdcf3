"""The one way this package writes a file or folder that must never be seen half-written.

Everything is first written under a temporary name beside its target and renamed into place
(`os.replace`, atomic on POSIX), so a kill, a full disk or a crash leaves either the old content
or the new, never a mix. Temporary files are created like any other file, so their mode follows
the umask (`tempfile.mkstemp` would make them 0600).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _fsync(path: Path) -> None:
    if path.is_file():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def atomic_path(path: Path, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write a file or folder at; when the block ends
    without error it replaces `path` (a folder through `path.old`, which `find_previous` still
    finds if a kill falls between the two renames). `keep_existing`: if `path` appeared in the
    meantime (another process), keep that one and drop ours. On error the temporary is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    _remove(tmp)
    try:
        yield tmp
        _fsync(tmp)
        if keep_existing and path.exists():
            _remove(tmp)
        elif tmp.is_dir() and path.exists():
            old = path.with_name(f"{path.name}.old")
            _remove(old)
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except OSError as err:  # a full disk, a read-only folder: the error names `path`
        _remove(tmp)
        if err.filename not in (None, str(tmp), tmp):
            raise
        raise OSError(err.errno, err.strerror or str(err), str(path)) from err
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` as JSON to `path`, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path`, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)


def read_json(path: Path) -> Any:
    """A JSON file's content; `DamagedFile` (one line naming the file) if it cannot be parsed."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DamagedFile(f"{path} is damaged (truncated or not JSON: {err})") from None


class DamagedFile(ValueError):
    """A file of a run (checkpoint, progress, result) that cannot be read back."""
