"""Atomic files and domain checkpoints: a killed run never leaves half a result behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import load_model, save_model
from torch import nn

CHECKPOINT = "checkpoint"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(run_dir: Path, model: nn.Module, method, meta: dict[str, Any]) -> Path:
    """Replace `run_dir/checkpoint` with the model, the method's state and `meta`, atomically.

    Built in a temporary directory and swapped in by renames; `load_checkpoint` also accepts
    the previous checkpoint left as `checkpoint.old` if a kill fell between the two renames.
    """
    final = run_dir / CHECKPOINT
    tmp = run_dir / f"{CHECKPOINT}.tmp"
    old = run_dir / f"{CHECKPOINT}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    method.save_state(tmp)
    write_json_atomic(tmp / "meta.json", meta)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(run_dir: Path) -> Path | None:
    for name in (CHECKPOINT, f"{CHECKPOINT}.old"):
        path = run_dir / name
        if (path / "meta.json").exists():
            return path
    return None


def load_checkpoint(path: Path, model: nn.Module, method) -> dict[str, Any]:
    """Load model weights and method state in place; return the checkpoint's meta."""
    load_model(model, str(path / "model.safetensors"))
    method.load_state(path)
    return json.loads((path / "meta.json").read_text())
