"""`python -m benchmark plot`: the figures, from result JSON and method artefacts alone.

Per (suite, profile, order), in `OUT/<suite>-<profile>-order<k>/`, one figure per idea:

- `A_mf1-<row>`: the seed-mean A[t][i] MF1 matrix as an annotated heatmap, the diagonal
  (just trained) and the last row (the table's numbers) outlined;
- `trajectories`: each end task's MF1 through the sequence, a line per row, ± std band;
- `summary_bars`: average MF1 ± std and FR per row, coloured by the group preset it belongs to;
- `dap_loss`: the DAP loss per step for each domain; `general_mlm_loss`: the held-out general
  corpus MLM loss of θ0 and after each domain;
- the figures a row's method draws from its saved artefacts (`Method.draw_artifacts`; das and
  dga: `importance-<row>` and `importance_units-<row>`, see `methods/importance_figures.py`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from benchmark.atomic import atomic_path
from benchmark.metrics import average_matrices, forgetting_rate
from benchmark.report import require_extra

log = logging.getLogger(__name__)
FORMATS = ("png", "pdf", "svg")
GROUP_ORDER = ["reference", "zoo", "rq1", "rq3", "rq4", "rq5"]


def _pyplot():
    matplotlib = require_extra("matplotlib", "plot")
    matplotlib.use("Agg")  # files only, no display
    return require_extra("matplotlib.pyplot", "plot")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _matrix(runs: list[dict], metric: str = "mf1") -> tuple[np.ndarray, np.ndarray]:
    """Seed mean and std of A (NaN where not evaluated; std 0 for a single seed)."""
    stack = np.asarray([[[np.nan if v is None else v for v in row] + [np.nan] * (len(r[metric])
                        - len(row)) for row in r[metric]] for r in runs], dtype=float)
    std = stack.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(stack.shape[1:])
    return stack.mean(axis=0), std


def _styles(rows: list[str]) -> dict[str, dict]:
    """A fixed colour and line style per row, the same in every figure of a group."""
    plt = _pyplot()
    colours = plt.get_cmap("tab20").colors
    dashes = ["-", "--", ":", "-."]
    return {row: {"color": colours[k % len(colours)], "linestyle": dashes[(k // 20) % 4]}
            for k, row in enumerate(rows)}


def _save(fig, path: Path, written: list[Path]) -> None:
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight", format=path.suffix[1:])
    finally:
        _pyplot().close(fig)
    written.append(path)


def heatmap(runs: list[dict], domains: list[str], row: str, path: Path,
            written: list[Path]) -> None:
    plt = _pyplot()
    mean, _ = _matrix(runs)
    size = len(domains)
    fig, ax = plt.subplots(figsize=(1.0 * size + 2.0, 0.8 * size + 1.5))
    image = ax.imshow(np.ma.masked_invalid(mean), cmap="viridis", vmin=0, vmax=100)
    for t in range(size):
        for i in range(t + 1):
            if not np.isnan(mean[t, i]):
                ax.text(i, t, f"{mean[t, i]:.1f}", ha="center", va="center", fontsize=8,
                        color="white" if mean[t, i] < 60 else "black")
        ax.add_patch(plt.Rectangle((t - 0.5, t - 0.5), 1, 1, fill=False, edgecolor="black",
                                   linewidth=2))
    ax.add_patch(plt.Rectangle((-0.5, size - 1.5), size, 1, fill=False, edgecolor="red",
                               linewidth=2.5))
    ax.set_xticks(range(size), domains, rotation=45, ha="right")
    ax.set_yticks(range(size), [f"after {d}" for d in domains])
    ax.set_xlabel("end task i")
    ax.set_ylabel("DAP-trained through domain t")
    seeds = len(runs)
    ax.set_title(f"{row}: A[t][i] MF1, mean of {seeds} seed{'s' if seeds > 1 else ''}\n"
                 "black: diagonal (just trained); red: last row (the table)", fontsize=9)
    fig.colorbar(image, ax=ax, label="MF1")
    _save(fig, path, written)


def mlm_heatmap(matrices: list[np.ndarray], domains: list[str], row: str, path: Path,
                written: list[Path]) -> None:
    """The held-out MLM-loss matrix of a row, seed mean: θ0's row, then one row per domain
    trained; every domain's loss in every row (above the diagonal: forward transfer)."""
    plt = _pyplot()
    mean = np.mean(matrices, axis=0)
    size = len(domains)
    fig, ax = plt.subplots(figsize=(1.0 * size + 2.0, 0.8 * (size + 1) + 1.5))
    image = ax.imshow(mean, cmap="viridis_r")
    middle = (mean.min() + mean.max()) / 2
    for t in range(size + 1):
        for i in range(size):
            ax.text(i, t, f"{mean[t, i]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if mean[t, i] > middle else "black")
    for t in range(size):  # row t + 1: right after domain t's own phase
        ax.add_patch(plt.Rectangle((t - 0.5, t + 0.5), 1, 1, fill=False, edgecolor="black",
                                   linewidth=2))
    ax.set_xticks(range(size), domains, rotation=45, ha="right")
    ax.set_yticks(range(size + 1), ["θ0"] + [f"after {d}" for d in domains])
    ax.set_xlabel("held-out text of domain i")
    ax.set_ylabel("DAP-trained through domain t")
    seeds = len(matrices)
    ax.set_title(f"{row}: held-out MLM loss L[t][i], mean of {seeds} seed"
                 f"{'s' if seeds > 1 else ''}\nlower is better; black: right after the "
                 "domain's own phase", fontsize=9)
    fig.colorbar(image, ax=ax, label="MLM loss")
    _save(fig, path, written)


def trajectories(by_row: dict[str, list[dict]], wanted: list[str], domains: list[str],
                 styles: dict, path: Path, written: list[Path]) -> None:
    plt = _pyplot()
    size = len(domains)
    cols = min(size, 3)
    fig, axes = plt.subplots((size + cols - 1) // cols, cols, figsize=(4.2 * cols, 3.2 *
                             ((size + cols - 1) // cols)), squeeze=False, sharey=True)
    for i, domain in enumerate(domains):
        ax = axes.flat[i]
        for row in wanted:
            mean, std = _matrix(by_row[row])
            ts = np.asarray([t for t in range(i, size) if not np.isnan(mean[t, i])])
            if not len(ts):
                continue
            ax.plot(ts, mean[ts, i], marker="o", markersize=3, label=row, **styles[row])
            if len(by_row[row]) > 1:
                ax.fill_between(ts, mean[ts, i] - std[ts, i], mean[ts, i] + std[ts, i],
                                color=styles[row]["color"], alpha=0.12, linewidth=0)
        ax.set_title(f"end task {i}: {domain}", fontsize=10)
        ax.set_xticks(range(size), [f"{t}" for t in range(size)])
        ax.set_xlim(-0.3, size - 0.7)
        ax.set_xlabel("after DAP-training domain t")
        ax.grid(alpha=0.3)
    for ax in axes.flat[size:]:
        ax.axis("off")
    axes[0, 0].set_ylabel("MF1")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle("Each end task's MF1 through the sequence (seed mean ± std; with "
                 "eval_matrix diagonal only A[i][i] and A[T][i] exist)", fontsize=10)
    fig.tight_layout()
    _save(fig, path, written)


def summary_bars(by_row: dict[str, list[dict]], wanted: list[str],
                 groups: dict[str, list[str]], path: Path, written: list[Path]) -> None:
    plt = _pyplot()
    member = {}  # a row's colour: the first group preset holding it, in GROUP_ORDER first
    ordered = sorted(groups, key=lambda g: GROUP_ORDER.index(g) if g in GROUP_ORDER else 99)
    for name, rows in ((g, groups[g]) for g in ordered):
        for row in rows:
            member.setdefault(row, name)
    names = list(dict.fromkeys(member.get(r, "other") for r in wanted))
    palette = dict(zip(names, plt.get_cmap("Set2").colors * 3, strict=False))
    avgs, stds, frs = [], [], []
    for row in wanted:
        runs = by_row[row]
        per_seed = [float(np.mean(r["mf1"][-1])) for r in runs]
        avgs.append(np.mean(per_seed))
        stds.append(np.std(per_seed, ddof=1) if len(per_seed) > 1 else np.nan)
        frs.append(forgetting_rate(average_matrices([r["mf1"] for r in runs])))
    colours = [palette[member.get(r, "other")] for r in wanted]
    y = np.arange(len(wanted))
    height = 0.32 * len(wanted) + 2.2
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, height), sharey=True)
    left.barh(y, avgs, xerr=stds, color=colours, capsize=2)
    right.barh(y, frs, color=colours)
    right.axvline(0, color="black", linewidth=0.8)
    left.set_yticks(y, [f"{r} ({len(by_row[r])})" for r in wanted])
    left.invert_yaxis()
    left.set_xlabel("average MF1 of the last row (± std over seeds)")
    right.set_xlabel("forgetting rate FR (seed-averaged matrix)")
    for ax in (left, right):
        ax.grid(axis="x", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=palette[n]) for n in names]
    fig.legend(handles, names, loc="upper center", ncol=len(names), fontsize=8,
               bbox_to_anchor=(0.5, 1.0), title="group (row label: seeds)")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.75 / height))  # the legend keeps 0.75 in on top
    _save(fig, path, written)


def loss_curves(by_row: dict[str, list[dict]], wanted: list[str], domains: list[str],
                styles: dict, folder: Path, fmt: str, written: list[Path]) -> None:
    from benchmark.dap import LOSS_EVERY, logged_steps

    plt = _pyplot()
    size = len(domains)
    cols = min(size, 3)
    fig, axes = plt.subplots((size + cols - 1) // cols, cols, figsize=(4.2 * cols, 3.0 *
                             ((size + cols - 1) // cols)), squeeze=False, sharey=True)
    drawn = False
    for t, domain in enumerate(domains):
        ax = axes.flat[t]
        for row in wanted:
            curves = [r["dap_loss"][t] for r in by_row[row]
                      if len(r["dap_loss"]) > t and r["dap_loss"][t]]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            steps = by_row[row][0]["dap_steps"][t]
            xs = logged_steps(length, steps)
            ax.plot(xs, np.mean([c[:length] for c in curves], axis=0), label=row,
                    linewidth=1, **styles[row])
            drawn = True
        ax.set_title(f"domain {t}: {domain}", fontsize=10)
        ax.set_xlabel("DAP step")
        ax.grid(alpha=0.3)
    for ax in axes.flat[size:]:
        ax.axis("off")
    axes[0, 0].set_ylabel("DAP loss (seed mean)")
    if drawn:
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
        fig.suptitle(f"DAP training loss per step (recorded every {LOSS_EVERY} steps)",
                     fontsize=10)
        fig.tight_layout()
        _save(fig, folder / f"dap_loss.{fmt}", written)
    else:
        plt.close(fig)

    general = {row: [r["general_mlm_loss"] for r in by_row[row] if r.get("general_mlm_loss")]
               for row in wanted}
    general = {row: g for row, g in general.items() if g}
    if not general:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for row, curves in general.items():
        length = min(len(c) for c in curves)
        mean = np.mean([c[:length] for c in curves], axis=0)
        ax.plot(range(length), mean, marker="o", markersize=3, label=row, **styles[row])
    ax.set_xticks(range(size + 1), ["θ0"] + [f"after {d}" for d in domains], rotation=30,
                  ha="right")
    ax.set_ylabel("general-corpus MLM loss (seed mean)")
    ax.set_title("Held-out general corpus MLM loss after each domain (lower: more retained)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    _save(fig, folder / f"general_mlm_loss.{fmt}", written)


def _artifact_dirs(runs_dir: Path, runs: list[dict]) -> list[Path]:
    """The `artifacts` folders of `runs` under `runs_dir`, found by the loop's layout."""
    from benchmark.loop import run_dir_for

    found = []
    for res in runs:
        cfg = SimpleNamespace(**{k: res[k] for k in ("suite", "profile", "row", "order", "seed")})
        found += [p for legacy in (False, True)
                  for rel in [run_dir_for(Path("."), cfg, legacy) / "artifacts"]
                  for p in [Path(runs_dir) / rel, *Path(runs_dir).glob(f"**/{rel}")]
                  if p.is_dir()][:1]
    return found


def plot_runs(results: list[dict], runs_dir: Path, out: Path, rows: list[str] | None = None,
              fmt: str = "png", groups: dict[str, list[str]] | None = None,
              per_row: bool = True) -> list[Path]:
    """Draw every figure for `results` (read from `runs_dir`) into `out`; the files written.

    `per_row=False` draws only the bars and the trajectories (the report's per-group views)."""
    from benchmark.tables import _table_groups, mlm_matrix

    if fmt not in FORMATS:
        raise ValueError(f"unknown figure format {fmt!r}; valid: {', '.join(FORMATS)}")
    _pyplot()
    written: list[Path] = []
    for (suite, profile, order, domains), by_row, wanted in _table_groups(results, rows):
        folder = Path(out) / f"{_safe(suite)}-{_safe(profile)}-order{order}"
        folder.mkdir(parents=True, exist_ok=True)
        domains = list(domains)
        styles = _styles(wanted)
        summary_bars(by_row, wanted, groups or {}, folder / f"summary_bars.{fmt}", written)
        trajectories(by_row, wanted, domains, styles, folder / f"trajectories.{fmt}", written)
        if not per_row:
            continue
        loss_curves(by_row, wanted, domains, styles, folder, fmt, written)
        for row in wanted:
            heatmap(by_row[row], domains, row, folder / f"A_mf1-{_safe(row)}.{fmt}", written)
        for row in wanted:  # a run without `mlm_loss` has no MLM-loss matrix
            matrices = [m for r in by_row[row] if (m := mlm_matrix(r)) is not None]
            if matrices:
                mlm_heatmap(matrices, domains, row, folder / f"L_mlm-{_safe(row)}.{fmt}",
                            written)
        from methods import available_methods

        for row in wanted:
            method = available_methods().get(by_row[row][0]["method"])
            folders = _artifact_dirs(runs_dir, by_row[row]) if method is not None else []
            if folders:
                method.draw_artifacts(folders, domains, row, folder, fmt, written)
    log.info("wrote %d figures under %s", len(written), out)
    return written

