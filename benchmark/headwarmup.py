"""θ0's MLM head, for a base checkpoint shipped without one (all-MiniLM-L6-v2, real6's θ0).

The head starts at random (a fixed seed, `basemodel.load_base_model`); `head_warmup_steps` train
it alone, the encoder frozen (`training.warm_up_mlm_head`), before the first domain, so that the
MLM-loss matrix's θ0 row and the first DAP steps read a trained head rather than one at ~10.8
nats. On `head_warmup_corpus: general` the warm-up depends on nothing of the run but θ0, the
general text and the warm-up settings (not the order, seed or method): it is computed once per
machine and reused from the cache (`CDAP_CACHE`/`--cache-dir`, `head-warmup/KEY.safetensors`),
the head's tensors with its losses and counted compute, so every cell of a grid starts from the
same bits without paying the steps again. The key holds θ0's fingerprint, the text's digest,
every warm-up setting, the thread count and the kernel setting (the bits depend on both); a
damaged file is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from benchmark.atomic import atomic_path
from benchmark.config import RunConfig, cache_root
from benchmark.kernels import kernel_setting
from benchmark.mlm import head_tensors, warm_up_mlm_head
from benchmark.protocol import stream_seed
from tasks.registry import dataset_sha256

log = logging.getLogger(__name__)


def cache_key(cfg: RunConfig, base_fingerprint: str, text) -> str:
    """sha256 of everything the warmed head's bits depend on."""
    parts = {"base": base_fingerprint, "text": dataset_sha256(text),
             "steps": cfg.head_warmup_steps, "lr": cfg.head_warmup_lr,
             "batch": cfg.dap_batch_size, "max_length": cfg.max_length,
             "mlm_probability": cfg.mlm_probability, "group_texts": cfg.group_texts,
             "threads": torch.get_num_threads(), "kernels": kernel_setting()["capability"],
             "torch": torch.__version__}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def warm_up(model: nn.Module, tokenizer, text, cfg: RunConfig, base_fingerprint: str,
            compute, cache: str | None = None) -> list[float]:
    """Warm the head of `model` on `text` (see the module doc); return the warm-up losses and
    leave the phase's compute in `compute.totals["head_warmup"]`. `general` warm-ups are cached;
    `first` ones (order-dependent) are always computed."""
    cached = cfg.head_warmup_corpus == "general"
    path = (cache_root(cache) / "head-warmup" / f"{cache_key(cfg, base_fingerprint, text)}"
            ".safetensors") if cached else None
    if path is not None and path.exists():
        try:
            return _load(model, path, compute)
        except Exception as err:  # noqa: BLE001 - any damage to the cache means: recompute it
            log.warning("cached MLM head %s is damaged (%s); warming the head again", path,
                        str(err).splitlines()[0] if str(err) else type(err).__name__)
    with compute.phase("head_warmup"):
        losses = warm_up_mlm_head(model, tokenizer, text, cfg.head_warmup_steps,
                                  cfg.dap_batch_size, cfg.head_warmup_lr, cfg.max_length,
                                  cfg.mlm_probability, seed=stream_seed("head_warmup", cfg.seed),
                                  group_texts=cfg.group_texts, count=compute.count)
    if path is not None:
        meta = {"losses": json.dumps(losses),
                "compute": json.dumps(compute.totals.get("head_warmup", {}))}
        with atomic_path(path, keep_existing=True) as tmp:
            save_file({k: v.detach().contiguous() for k, v in head_tensors(model).items()},
                      str(tmp), metadata=meta)
        log.info("MLM head warmed and cached at %s", path)
    return losses


def _load(model: nn.Module, path: Path, compute) -> list[float]:
    with safe_open(str(path), "pt") as handle:  # one read: the tensors and their metadata
        meta: dict[str, Any] = handle.metadata() or {}
        stored = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    head = head_tensors(model)
    if set(stored) != set(head) or any(stored[k].shape != head[k].shape for k in head):
        raise ValueError("its tensors are not this model's head")
    if not all(torch.isfinite(v).all() for v in stored.values()):
        raise ValueError("it holds non-finite weights")
    losses, counted = json.loads(meta["losses"]), json.loads(meta["compute"])
    with torch.no_grad():
        for name, param in head.items():
            param.copy_(stored[name])
    if counted:
        compute.totals["head_warmup"] = counted
    log.info("reusing the cached MLM head %s", path)
    return losses
