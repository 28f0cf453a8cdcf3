"""The paper's tables, rebuilt from result JSON files alone.

One table per (suite, profile, order) and metric: a row per method (its `row` label), the
last row of A (mean ± std over seeds) per domain, the average, the forgetting rate on
seed-averaged matrices, KT (gain over `one`) and vs-base (gain over `base`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from benchmark.atomic import DamagedFile
from benchmark.metrics import average_matrices, final_row, forgetting_rate, mean_gain
from benchmark.record import RunRecord, load

log = logging.getLogger(__name__)

ROW_ORDER = ["base", "one", "pool", "adapter-one", "prompt-one", "lora-one", "ncl",
             "ncl-adapter", "ncl-lora", "ewc", "kd", "derpp", "hat", "demix", "dga", "das"]
METRICS = {"mf1": "MF1", "acc": "Acc"}


def load_results(runs: Path) -> list[RunRecord]:
    """Every finished record under `runs`; a damaged file is skipped with a one-line warning."""
    results = []
    for path in sorted(Path(runs).rglob("result.json")):
        try:
            record = load(path)
        except (DamagedFile, OSError) as err:
            log.warning("skipped %s", err)
            continue
        if record.finished:
            results.append(record)
    return results


def _row_key(row: str) -> tuple[int, str]:
    base = row.split()[0]
    return (ROW_ORDER.index(base) if base in ROW_ORDER else len(ROW_ORDER), row)


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def _table_groups(results: list[RunRecord], rows: list[str] | None):
    """(key, runs by row, the rows to show in order) per (suite, profile, order, domains)."""
    groups: dict[tuple, dict[str, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    for res in results:
        key = (res.suite, res.profile, res.order, tuple(res.domains))
        groups[key][res.row].append(res)
    for key, by_row in sorted(groups.items()):
        _warn_mixed_base(key, by_row)
        yield key, by_row, [r for r in (rows or sorted(by_row, key=_row_key)) if r in by_row]


def _warn_mixed_base(key: tuple, by_row: dict[str, list[RunRecord]]) -> None:
    """Warn when one table holds rows started from different θ0 (their numbers do not compare)."""
    prints = {r.base_fingerprint for runs in by_row.values() for r in runs}
    known = sorted(p for p in prints if p)
    if len(known) > 1 or (known and None in prints):
        log.warning("table %s-%s order %s mixes runs from %d different base models θ0 (%s%s)",
                    key[0], key[1], key[2], len(known), ", ".join(p[:12] for p in known),
                    " and runs that do not record theirs" if None in prints else "")


def build_tables(
    results: list[RunRecord], rows: list[str] | None = None
) -> list[tuple[str, pd.DataFrame]]:
    """[(title, table)] for every (suite, profile, order) and metric present in `results`."""
    tables = []
    for (suite, profile, order, domains), by_row, wanted in _table_groups(results, rows):
        synthetic = any(r.synthetic for runs in by_row.values() for r in runs)
        for metric, title in METRICS.items():
            reference = {
                name: final_row(average_matrices([getattr(r, metric) for r in by_row[name]]))
                for name in ("one", "base") if name in by_row
            }
            records = []
            for row in wanted:
                runs = sorted(by_row[row], key=lambda r: r.seed)
                last = np.asarray([final_row(getattr(r, metric)) for r in runs])
                mean_matrix = average_matrices([getattr(r, metric) for r in runs])
                label = row + (" †" if runs[0].needs_domain_id else "")
                record = {"method": label, "seeds": len(runs)}
                for i, domain in enumerate(domains):
                    record[domain] = _cell(list(last[:, i]))
                record["Avg"] = _cell(list(last.mean(axis=1)))
                record["FR"] = f"{forgetting_rate(mean_matrix):.2f}"
                for name, column in (("one", "KT"), ("base", "vs-base")):
                    record[column] = (f"{mean_gain(mean_matrix, reference[name]):+.2f}"
                                      if name in reference else "–")
                general = [r.general_mlm_loss for r in runs if r.general_mlm_loss]
                record["Gen. MLM Δ"] = (f"{np.mean([g[-1] - g[0] for g in general]):+.3f}"
                                        if general else "–")
                records.append(record)
            heading = (f"{suite} ({profile}{', synthetic' if synthetic else ''}), order {order}: "
                       f"{title} of the last row A[T][i], mean ± std over seeds")
            tables.append((heading, pd.DataFrame.from_records(records)))
    return tables


def build_timing_tables(
    results: list[RunRecord], rows: list[str] | None = None
) -> list[tuple[str, pd.DataFrame]]:
    """Wall time per row, mean over seeds: DAP phase, fine-tunings, total, and total / ncl's.

    Comparable only between runs made under the same load and thread count (`threads` column).
    """
    tables = []
    for (suite, profile, order, _), by_row, wanted in _table_groups(results, rows):
        totals = {row: float(np.mean([r.timings["total_s"] for r in by_row[row]]))
                  for row in by_row}
        records = []
        for row in wanted:
            runs = by_row[row]
            finetunes = [sum(s for domain in r.timings["finetune_s"] for s in domain)
                         for r in runs]
            records.append({
                "method": row, "seeds": len(runs),
                "threads": ",".join(sorted({str(r.threads) for r in runs})),
                "DAP s": f"{np.mean([sum(r.timings['dap_s']) for r in runs]):.0f}",
                "fine-tune s": f"{np.mean(finetunes):.0f}",
                "total s": f"{totals[row]:.0f}",
                "× ncl": f"{totals[row] / totals['ncl']:.2f}" if "ncl" in totals else "–",
            })
        heading = f"{suite} ({profile}), order {order}: wall time per run, mean over seeds"
        tables.append((heading, pd.DataFrame.from_records(records)))
    return tables


METRICS_NOTE = (
    "† needs the domain ID at end-task time. FR: forgetting rate on seed-averaged matrices "
    "(negative = backward transfer). KT: gain over `one`; vs-base: gain over `base`. Gen. MLM Δ: "
    "change of the MLM loss on the held-out general corpus from the base model to the end of "
    "the sequence (general-knowledge retention; lower is better).")
TIMINGS_NOTE = ("Wall times compare only between runs made together, under the same load and "
                "thread count; × ncl: total time over the `ncl` row's.")


def render(tables: list[tuple[str, pd.DataFrame]], fmt: str = "markdown",
           note: str = METRICS_NOTE) -> str:
    parts = []
    for heading, frame in tables:
        if fmt == "markdown":
            parts.append(f"### {heading}\n\n{frame.to_markdown(index=False)}\n")
        elif fmt == "latex":
            caption = heading.replace("±", r"$\pm$")
            parts.append(f"% {caption}\n" + frame.to_latex(index=False).replace("±", r"$\pm$"))
        elif fmt == "csv":
            parts.append(f"# {heading}\n" + frame.to_csv(index=False))
        else:
            raise ValueError(f"unknown table format {fmt!r}; valid: markdown, latex, csv")
    if fmt == "markdown" and parts:
        parts.append(note + "\n")
    return "\n".join(parts)
