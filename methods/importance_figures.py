"""The figures of DAS's saved unit importance (das, dga), drawn by `python -m benchmark plot`.

`DAS.after_domain` and `DAS.setup` save `importance_general`, `importance_domain<t>_<domain>` and
`importance_accumulated<t>` (safetensors, one [layers, units] array per unit kind) in the run's
artefacts; `draw_importance` averages them over the row's seeds and writes
`importance-<row>` (mean per layer × unit kind, of the general proxy, each domain and the
accumulated I_≤t) and `importance_units-<row>` (the final accumulated importance of every unit).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmark.plot import _pyplot, _safe, _save
from benchmark.report import require_extra
from methods.gates import KINDS

SHORT = {"head": "head", "intermediate": "int.", "output": "out"}


def draw_importance(folders: list[Path], domains: list[str], row: str, folder: Path, fmt: str,
                    written: list[Path]) -> None:
    """Both figures of the row's runs (`folders`: their artefact folders); none without files."""
    stages = _load_importance(folders, domains)
    if stages:
        importance(stages, domains, row, len(folders), folder, fmt, written)


def _load_importance(folders: list[Path], domains: list[str]) -> dict[str, dict] | None:
    """{stage: {kind: seed-mean array [layers, units]}} for general, domain t, accumulated t."""
    safetensors = require_extra("safetensors.numpy", "plot")
    stages = {"general": "importance_general"}
    for t, domain in enumerate(domains):
        stages[f"domain {t}"] = f"importance_domain{t}_{domain}"
        stages[f"accumulated ≤{t}"] = f"importance_accumulated{t}"
    out = {}
    for stage, stem in stages.items():
        files = [f / f"{stem}.safetensors" for f in folders]
        files = [f for f in files if f.exists()]
        if not files:
            continue
        loaded = [safetensors.load_file(str(f)) for f in files]
        out[stage] = {k: np.mean([d[k] for d in loaded], axis=0) for k in loaded[0]}
    return out or None


def importance(stages: dict[str, dict], domains: list[str], row: str, seeds: int,
               folder: Path, fmt: str, written: list[Path]) -> None:
    plt = _pyplot()
    kinds = [k for k in KINDS if k in stages[next(iter(stages))]]
    size = len(domains)
    fig, axes = plt.subplots(2, size + 1, figsize=(1.9 * (size + 1), 5.6), squeeze=False,
                             gridspec_kw={"hspace": 0.45})
    panels = [(0, 0, "general")] + [(0, t + 1, f"domain {t}") for t in range(size)] + \
             [(1, t + 1, f"accumulated ≤{t}") for t in range(size)]
    image = None
    for ax in axes.flat:
        ax.axis("off")
    for r, c, stage in panels:
        if stage not in stages:
            continue
        ax = axes[r, c]
        ax.axis("on")
        grid = np.stack([stages[stage][k].mean(axis=1) for k in kinds], axis=1)  # layer × kind
        image = ax.imshow(grid, cmap="magma", vmin=0, vmax=1, aspect="auto")
        for layer in range(grid.shape[0]):
            for k in range(grid.shape[1]):
                ax.text(k, layer, f"{grid[layer, k]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if grid[layer, k] < 0.6 else "black")
        title = stage if not stage.startswith("domain") else \
            f"{stage}: {domains[int(stage.split()[1])]}"
        ax.set_title(title, fontsize=8)
        ax.set_xticks(range(len(kinds)), [SHORT[k] for k in kinds], fontsize=7)
        ax.set_yticks(range(grid.shape[0]), [f"L{layer}" for layer in range(grid.shape[0])],
                      fontsize=7)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="mean unit importance")
    fig.suptitle(f"{row}: unit importance, mean per layer × unit kind (attention head, FFN "
                 "intermediate, FFN output)\ntop: general proxy and each domain; bottom: "
                 f"accumulated I≤t; {seeds} seed(s)", fontsize=10)
    _save(fig, folder / f"importance-{_safe(row)}.{fmt}", written)

    last = [s for s in stages if s.startswith("accumulated")]
    if not last:
        return
    final = stages[last[-1]]
    fig, axes = plt.subplots(len(kinds), 1, figsize=(10, 1.3 * len(kinds) + 1.8), squeeze=False,
                             gridspec_kw={"hspace": 0.6})
    for ax, kind in zip(axes.flat, kinds, strict=True):
        image = ax.imshow(final[kind], cmap="magma", vmin=0, vmax=1, aspect="auto",
                          interpolation="nearest")
        ax.set_ylabel("layer", fontsize=8)
        ax.set_yticks(range(final[kind].shape[0]))
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(f"{kind} units", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.8, label="importance")
    fig.suptitle(f"{row}: accumulated importance of every unit after the last domain "
                 f"({last[-1]})", fontsize=10)
    _save(fig, folder / f"importance_units-{_safe(row)}.{fmt}", written)
