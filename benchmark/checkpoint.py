"""Domain checkpoints: the model, the method's state and the run record, committed as one.

The record (`RunRecord`, what `progress.json` holds) is saved inside the checkpoint, so a kill
between the checkpoint and the next `progress.json` write leaves a state `--resume` reconciles:
it takes whichever of the two is at the checkpoint's domain (`resume_state`).

`meta.json`, written last, lists the sha256 of every other file of the checkpoint (`files`:
the model, the method's state in whatever format the method writes it) and a digest of the data
the run reads (`data`, see `loop.data_digest`). `verify_checkpoint` checks them before a resume
loads anything: a file missing (a method that saved state must find it) or changed is refused
in one line naming it.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from benchmark.atomic import DamagedFile, atomic_path, read_json, write_json_atomic
from benchmark.record import RunRecord
from tasks.files import sha256_file

CHECKPOINT = "checkpoint"
log = logging.getLogger(__name__)


def save_checkpoint(run_dir: Path, model: nn.Module, method, meta: dict[str, Any]) -> Path:
    """Replace `run_dir/checkpoint` with the model, the method's state and `meta`, atomically
    (built aside and swapped in; `find_checkpoint` also takes `checkpoint.old`, left if a kill
    falls between the two renames)."""
    final = run_dir / CHECKPOINT
    with atomic_path(final) as tmp:
        tmp.mkdir()
        try:
            save_model(model, str(tmp / "model.safetensors"))
            method.save_state(tmp)
        except SafetensorError as err:  # not an OSError: say which file, as the OS would
            raise _as_os_error(err, final) from err
        write_json_atomic(tmp / "meta.json", {**meta, "files": checksums(tmp)})
    return final


def checksums(directory: Path) -> dict[str, str]:
    """{path relative to `directory`: sha256} of every file under it (`meta.json` aside)."""
    return {p.relative_to(directory).as_posix(): sha256_file(p)
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != "meta.json"}


def verify_checkpoint(path: Path, meta: dict[str, Any]) -> None:
    """Every file `meta['files']` lists is there with its recorded sha256, else `DamagedFile`
    naming the first that is not. A checkpoint written before checksums were recorded (no
    `files`) is taken as it is."""
    files = meta.get("files")
    if files is None:
        log.warning("%s records no checksums (written by an older version): its files are "
                    "taken unchecked", path)
        return
    if not isinstance(files, dict):
        raise DamagedFile(f"{path / 'meta.json'} is damaged (`files` is not a mapping)")
    for name, sha in sorted(files.items()):
        file = path / name
        if not file.is_file():
            raise DamagedFile(f"{file} is missing: the checkpoint of domain {meta['domain']} "
                              "is incomplete; pass --overwrite to start the run again")
        if sha256_file(file) != sha:
            raise DamagedFile(f"{file} is damaged (its sha256 differs from the one recorded "
                              "when it was written); pass --overwrite to start the run again")


def _as_os_error(err: SafetensorError, path: Path) -> OSError:
    """safetensors reports a failed write (a full disk, ...) as `SafetensorError` carrying the
    OS error code in its text (`os error 28`): the `OSError` it stands for."""
    code = re.search(r"os error (\d+)|code: (\d+)", str(err))
    number = int(code.group(1) or code.group(2)) if code else errno.EIO
    return OSError(number, os.strerror(number), str(path))


def find_checkpoint(run_dir: Path) -> Path | None:
    for name in (CHECKPOINT, f"{CHECKPOINT}.old"):
        path = run_dir / name
        if (path / "meta.json").exists():
            return path
    return None


def read_meta(path: Path) -> dict[str, Any]:
    """The checkpoint's `meta.json`; one without a domain index raises `DamagedFile`."""
    meta = read_json(path / "meta.json")
    if not isinstance(meta, dict) or not isinstance(meta.get("domain"), int):
        raise DamagedFile(f"{path / 'meta.json'} is damaged (no domain index)")
    return meta


def load_checkpoint(path: Path, model: nn.Module, method) -> dict[str, Any]:
    """Load model weights and method state in place; return the checkpoint's meta.

    A truncated or otherwise unreadable file raises `DamagedFile` naming it."""
    meta = read_meta(path)
    try:
        load_model(model, str(path / "model.safetensors"))
        method.load_state(path)
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DamagedFile(f"{path} is damaged ({first})") from None
    bad = next((n for n, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if bad is not None:
        raise DamagedFile(f"{path / 'model.safetensors'} is damaged (non-finite values in {bad})")
    return meta


class Resumed(NamedTuple):
    """A run found to continue: its checkpoint folder, the checkpoint's meta and the record to
    continue (`resume_state`)."""

    checkpoint: Path
    meta: dict[str, Any]
    record: RunRecord


def resume_state(meta: dict[str, Any], progress: RunRecord | None) -> RunRecord:
    """The record to continue from a checkpoint of domain `meta['domain']`: `progress.json`'s
    when it is at that domain (it may hold fine-tunings made since), else the copy saved in the
    checkpoint (a kill fell between the checkpoint and the progress write)."""
    done = meta["domain"] + 1
    if progress is not None and progress.domains_done == done:
        return progress
    if "record" not in meta:  # a checkpoint written before records were saved in it
        raise DamagedFile(f"progress.json does not match the checkpoint of domain {done - 1}")
    return RunRecord.from_dict(meta["record"], "checkpoint/meta.json")
