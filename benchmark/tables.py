"""The paper's tables, rebuilt from result JSON files alone.

One table per (suite, profile, order) and metric: a row per method (its `row` label), the
last row of A (mean ± std over seeds) per domain, the average, the forgetting rate on
seed-averaged matrices, KT (gain over `one`) and vs-base (gain over `base`).

Result files are read through `benchmark.record` (schema checked, old files upgraded, damaged
ones skipped with a warning); the views below get each record as its dict.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from benchmark.atomic import DamagedFile
from benchmark.method_info import declared
from benchmark.metrics import (
    average_matrices,
    diagonal,
    final_row,
    forgetting_rate,
    mean_gain,
)
from benchmark.record import load

log = logging.getLogger(__name__)

METRICS = {"mf1": "MF1", "acc": "Acc"}


def load_results(runs: Path) -> list[dict]:
    """Every finished record under `runs` (as `RunRecord.to_dict()`); a damaged file is skipped
    with a one-line warning naming it. A run found twice (a copy of the folder under `runs`) is
    counted once: runs are the same when their `run_identity` is; the first path in sorted
    order is kept and one warning names the others."""
    results = []
    seen: dict[str, tuple[Path, list]] = {}
    copies: list[str] = []
    for path in sorted(Path(runs).rglob("result.json")):
        try:
            record = load(path)
        except (DamagedFile, OSError) as err:
            log.warning("skipped %s", err)
            continue
        if not record.finished:
            continue
        key = run_identity(record.to_dict())
        if key in seen:
            first, mf1 = seen[key]
            differ = ", other numbers: made by other code?" if mf1 != record.mf1 else ""
            copies.append(f"{path} (= {first}{differ})")
            continue
        seen[key] = (path, record.mf1)
        results.append(record.to_dict())
    if copies:
        shown = "; ".join(copies[:3])
        more = f"; and {len(copies) - 3} more" if len(copies) > 3 else ""
        log.warning("ignored %d duplicate run(s), each the same suite, profile, row, order, "
                    "seed, θ0 and config as a file already read: %s%s", len(copies), shown, more)
    return results


def run_identity(res: dict) -> str:
    """What makes two result files the same run: (suite, profile, row, order, seed, θ0
    fingerprint, resolved config)."""
    return json.dumps([res["suite"], res["profile"], res["row"], res["order"], res["seed"],
                       res.get("base_fingerprint"), res["config"]], sort_keys=True)


def _row_key(row: str) -> tuple[float, str]:
    """Rows sort by the `table_rank` of the method their label starts with ("das w/o contrast"
    sits with `das`), then by label; labels of unranked or unknown methods come last. The rank
    is read from the method's source (`benchmark.method_info`): sorting imports no torch; where
    the method registry is already imported (a method registered in this process), its classes
    are asked instead."""
    name = row.split()[0]
    registry = getattr(sys.modules.get("methods"), "_REGISTRY", None)
    if registry is not None and name in registry:
        rank = registry[name].table_rank
    else:
        rank = declared("table_rank").get(name)
    return (math.inf if rank is None else rank, row)


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def _table_groups(results: list[dict], rows: list[str] | None):
    """(key, runs by row, the rows to show in order) per (suite, profile, order, domains)."""
    groups: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for res in results:
        key = (res["suite"], res["profile"], res["order"], tuple(res["domains"]))
        groups[key][res["row"]].append(res)
    for key, by_row in sorted(groups.items()):
        _warn_mixed_base(key, by_row)
        _warn_mixed_protocols(key, by_row)
        yield key, by_row, [r for r in (rows or sorted(by_row, key=_row_key)) if r in by_row]


def _warn_mixed_base(key: tuple, by_row: dict[str, list[dict]]) -> None:
    """Warn when one table holds rows started from different θ0 (their numbers do not compare)."""
    prints = {r.get("base_fingerprint") for runs in by_row.values() for r in runs}
    known = sorted(p for p in prints if p)
    if len(known) > 1 or (known and None in prints):
        log.warning("table %s-%s order %s mixes runs from %d different base models θ0 (%s%s)",
                    key[0], key[1], key[2], len(known), ", ".join(p[:12] for p in known),
                    " and runs that do not record theirs" if None in prints else "")


PROTOCOLS = {"finetune": "fine-tuning", "probe": "linear probe"}
COLLAPSED = "ᶜ"
COLLAPSED_NOTE = (f"{COLLAPSED}: in at least one seed every test prediction of the cell was one "
                  "class (a collapsed classifier: the number measures the majority class)")


def protocol_of(res: dict) -> str:
    """How a run's cells were measured; runs from before schema 3 only fine-tuned."""
    return res.get("protocol", "finetune")


def _warn_mixed_protocols(key: tuple, by_row: dict[str, list[dict]]) -> None:
    """Warn when one table holds rows measured by different protocols (fine-tuning and probe
    numbers do not compare); the heading says so too (`_protocol_caption`)."""
    used = {row: sorted({protocol_of(r) for r in runs}) for row, runs in by_row.items()}
    if len({p for ps in used.values() for p in ps}) > 1:
        log.warning("table %s-%s order %s mixes end-task protocols, its rows do not compare: %s",
                    key[0], key[1], key[2],
                    "; ".join(f"{row}: {'+'.join(ps)}" for row, ps in sorted(used.items())))


def _protocol_caption(by_row: dict[str, list[dict]]) -> str:
    used = sorted({protocol_of(r) for runs in by_row.values() for r in runs})
    dap = _dap_once_note(by_row)
    if len(used) == 1:
        return f"by {PROTOCOLS.get(used[0], used[0])}" + dap
    return ("MIXED protocols (" + ", ".join(PROTOCOLS.get(p, p) for p in used)
            + "), do not compare" + dap)


# The seed protocol: by default every seed re-runs DAP with its own seed; a run with `dap_seed`
# DAP-trained with that seed (the companion's protocol: DAP once, seeds vary fine-tuning only).
# Runs without the field (all made before it existed) re-ran DAP per seed, and print as before.
DAP_ONCE = "◦"
DAP_ONCE_NOTE = (f" ({DAP_ONCE}S: DAP-trained once with dap_seed S shared by the row's seeds, "
                 "which vary fine-tuning only; other rows DAP-train per seed)")


def dap_seed_of(res: dict) -> int | None:
    """The fixed DAP seed a run used (`dap_seed`), or None: DAP with the run's own seed."""
    return (res.get("config") or {}).get("dap_seed")


def _dap_seed_mark(runs: list[dict]) -> str:
    """The row-label mark of the seed protocol: "" (DAP per seed), " ◦S", or " ◦mixed"."""
    seeds = {dap_seed_of(r) for r in runs}
    if seeds == {None}:
        return ""
    return f" {DAP_ONCE}{seeds.pop()}" if len(seeds) == 1 else f" {DAP_ONCE}mixed"


def _dap_once_note(by_row: dict[str, list[dict]]) -> str:
    """The heading's note on the ◦S mark where a row of the table carries it, else ""."""
    return DAP_ONCE_NOTE if any(_dap_seed_mark(runs) for runs in by_row.values()) else ""


def _row_label(row: str, runs: list[dict]) -> str:
    """A row's label: † where it needs the domain ID, the seed-protocol mark where it has one."""
    return row + (" †" if runs[0]["needs_domain_id"] else "") + _dap_seed_mark(runs)


def _collapsed_last(res: dict) -> list[bool]:
    """Per task: whether the run's last-row cell collapsed (False where not recorded)."""
    rows = res.get("collapsed") or []
    last = rows[-1] if len(rows) == len(res["mf1"]) else []
    return [bool(v) for v in last] + [False] * (len(res["mf1"][-1]) - len(last))


def build_tables(
    results: list[dict], rows: list[str] | None = None, metrics: dict[str, str] = METRICS
) -> list[tuple[str, pd.DataFrame]]:
    """[(title, table)] for every (suite, profile, order) and metric (`metrics`: result key to
    title) present in `results`."""
    tables = []
    for (suite, profile, order, domains), by_row, wanted in _table_groups(results, rows):
        synthetic = any(r["synthetic"] for runs in by_row.values() for r in runs)
        protocol = _protocol_caption(by_row)
        for metric, title in metrics.items():
            marked = False
            reference = {
                name: final_row(average_matrices([r[metric] for r in by_row[name]]))
                for name in ("one", "base") if name in by_row
            }
            records = []
            for row in wanted:
                runs = sorted(by_row[row], key=lambda r: r["seed"])
                last = np.asarray([final_row(r[metric]) for r in runs])
                collapsed = np.asarray([_collapsed_last(r) for r in runs])
                mean_matrix = average_matrices([r[metric] for r in runs])
                record = {"method": _row_label(row, runs), "seeds": len(runs)}
                for i, domain in enumerate(domains):
                    mark = COLLAPSED if collapsed[:, i].any() else ""
                    marked = marked or bool(mark)
                    record[domain] = _cell(list(last[:, i])) + mark
                record["Avg"] = _cell(list(last.mean(axis=1)))
                record["FR"] = f"{forgetting_rate(mean_matrix):.2f}"
                for name, column in (("one", "KT"), ("base", "vs-base")):
                    record[column] = (f"{mean_gain(mean_matrix, reference[name]):+.2f}"
                                      if name in reference else "–")
                general = [r["general_mlm_loss"] for r in runs if r.get("general_mlm_loss")]
                record["Gen. MLM Δ"] = (f"{np.mean([g[-1] - g[0] for g in general]):+.3f}"
                                        if general else "–")
                records.append(record)
            heading = (f"{suite} ({profile}{', synthetic' if synthetic else ''}), order {order}: "
                       f"{title} of the last row A[T][i] {protocol}, mean ± std over seeds"
                       + (f"; {COLLAPSED_NOTE}" if marked else ""))
            tables.append((heading, pd.DataFrame.from_records(records)))
    return tables


def build_timing_tables(
    results: list[dict], rows: list[str] | None = None
) -> list[tuple[str, pd.DataFrame]]:
    """Wall time per row, mean over seeds: DAP phase, fine-tunings, total, and total / ncl's.

    Comparable only between runs made under the same load and thread count (`threads` column).
    """
    tables = []
    for (suite, profile, order, _), by_row, wanted in _table_groups(results, rows):
        totals = {row: float(np.mean([r["timings"]["total_s"] for r in by_row[row]]))
                  for row in by_row}
        records = []
        for row in wanted:
            runs = by_row[row]
            finetunes = [sum(s for domain in r["timings"]["finetune_s"] for s in domain)
                         for r in runs]
            records.append({
                "method": row, "seeds": len(runs),
                "threads": ",".join(sorted({str(r.get("threads")) for r in runs})),
                "DAP s": f"{np.mean([sum(r['timings']['dap_s']) for r in runs]):.0f}",
                "fine-tune s": f"{np.mean(finetunes):.0f}",
                "total s": f"{totals[row]:.0f}",
                "× ncl": f"{totals[row] / totals['ncl']:.2f}" if "ncl" in totals else "–",
            })
        heading = f"{suite} ({profile}), order {order}: wall time per run, mean over seeds"
        tables.append((heading, pd.DataFrame.from_records(records)))
    return tables


# -- compute: tokens and training FLOPs per phase beside the score (benchmark/compute.py) ------

COMPUTE_NOTE = (
    "Tokens: the tokens of the batches each phase drew from its data (padding included). "
    "PFLOPs: model FLOPs (10^15) counted as the run spent them, by hooks on the encoder and the "
    "LM head (6 per weight and token with gradient, 2 without, plus attention; the formula of "
    "`bench`): DAP = the DAP steps with every pass a method makes in them (views, replay, a "
    "teacher); method = its passes before and after each domain (importance, Fisher, buffer "
    "filling); end task = fine-tuning or the probe's embedding of the training split; total "
    "adds the MLM-head warm-up where one runs. θ0's own pretraining and evaluation are not "
    "counted. × ncl: DAP + method PFLOPs over ncl's (the cost of continual pre-training). "
    "Mean over seeds; –: not recorded (runs made before 2026-12-08).")


def _compute_mean(runs: list[dict], phases: tuple[str, ...], key: str) -> float | None:
    """Mean over the runs that record compute of `key` summed over `phases` (None: none do)."""
    values = [sum(float(r["compute"].get(p, {}).get(key, 0)) for p in phases)
              for r in runs if r.get("compute")]
    return float(np.mean(values)) if values else None


def build_compute_tables(
    results: list[dict], rows: list[str] | None = None, metric: str = "mf1"
) -> list[tuple[str, pd.DataFrame]]:
    """Per row, the score (average of the last row of A) beside the compute spent to get it:
    DAP tokens and PFLOPs, the method's extra passes, the end-task phase, the total and its
    ratio to ncl's; mean over seeds."""
    from benchmark.compute import PHASES

    def pflops(value: float | None) -> str:
        return "–" if value is None else f"{value / 1e15:.3g}"

    def tokens(value: float | None) -> str:
        return "–" if value is None else f"{value:,.0f}"

    tables = []
    for (suite, profile, order, _), by_row, wanted in _table_groups(results, rows):
        cpt = {row: _compute_mean(runs, ("dap", "method"), "flops")
               for row, runs in by_row.items()}
        records = []
        for row in wanted:
            runs = by_row[row]
            total = _compute_mean(runs, PHASES, "flops")
            reference = cpt.get("ncl")
            records.append({
                "method": row + _dap_seed_mark(runs), "seeds": len(runs),
                f"Avg {METRICS[metric]}": _cell([float(np.mean(final_row(r[metric])))
                                                 for r in sorted(runs, key=lambda r: r["seed"])]),
                "DAP tokens": tokens(_compute_mean(runs, ("dap",), "tokens")),
                "DAP PFLOPs": pflops(_compute_mean(runs, ("dap",), "flops")),
                "method PFLOPs": pflops(_compute_mean(runs, ("method",), "flops")),
                "end-task PFLOPs": pflops(_compute_mean(runs, ("finetune", "probe"), "flops")),
                "total PFLOPs": pflops(total),
                "total tokens": tokens(_compute_mean(runs, PHASES, "tokens")),
                "× ncl": (f"{cpt[row] / reference:.2f}" if cpt[row] is not None and reference
                          else "–"),
            })
        heading = (f"{suite} ({profile}), order {order}: score and training compute per run, "
                   "mean over seeds" + _dap_once_note(by_row))
        tables.append((heading, pd.DataFrame.from_records(records)))
    return tables


def final_dap_loss(losses: list[float], steps: int, share: float = 0.2) -> float | None:
    """Mean of a domain's DAP losses recorded in its last `share` of steps (None: no DAP); a
    list too sparse to have one there gives the last `share` of its entries."""
    from benchmark.dap import logged_steps

    if not losses:
        return None
    tail = [v for s, v in zip(logged_steps(len(losses), steps), losses, strict=True)
            if s >= (1 - share) * steps]
    return float(np.mean(tail or losses[-max(1, round(share * len(losses))):]))


def build_dap_loss_tables(
    results: list[dict], rows: list[str] | None = None
) -> list[tuple[str, pd.DataFrame]]:
    """Per row and domain, the loss at the end of that domain's DAP-training, mean over seeds:
    whether a row learns each domain at all (e.g. isolation rows against `one`)."""
    tables = []
    for (suite, profile, order, domains), by_row, wanted in _table_groups(results, rows):
        records = []
        for row in wanted:
            record = {"method": row, "seeds": len(by_row[row])}
            for t, domain in enumerate(domains):
                values = [final_dap_loss(r["dap_loss"][t], r["dap_steps"][t])
                          for r in by_row[row] if len(r.get("dap_loss", [])) > t]
                values = [v for v in values if v is not None]
                record[domain] = f"{np.mean(values):.3f}" if values else "–"
            records.append(record)
        heading = (f"{suite} ({profile}), order {order}: DAP training loss at the end of each "
                   "domain (mean of the last 20 % of its steps), mean over seeds")
        tables.append((heading, pd.DataFrame.from_records(records)))
    return tables


def _diagonal_and_average(runs: list[dict], metric: str) -> dict[int, tuple[float, float]]:
    """seed: (mean A[t][t], average of the last row), in the order of `runs`."""
    return {r["seed"]: (float(np.mean(diagonal(r[metric]))), float(np.mean(final_row(r[metric]))))
            for r in runs}


def build_diagonal_tables(
    results: list[dict], rows: list[str] | None = None, reference: str | None = None,
    metric: str = "mf1", title: str = "MF1",
) -> list[tuple[str, pd.DataFrame]]:
    """Per (suite, profile, order): each row's diagonal A[t][t] (what a domain reaches right after
    its own DAP-training, seed mean per domain), its mean ± std over seeds, beside the average of
    the last row and FR. Works on `eval_matrix: diagonal` runs (the diagonal is always filled).

    With `reference`, two more columns: the row's mean diagonal and Avg minus the reference
    row's on the seeds both have (a paired difference; `–` where they share none), so a
    single-seed variant is held against the reference on that seed, not against its seed mean.
    """
    tables = []
    for (suite, profile, order, domains), by_row, wanted in _table_groups(results, rows):
        ref = _diagonal_and_average(by_row[reference], metric) if reference in by_row else None
        records = []
        for row in wanted:
            runs = sorted(by_row[row], key=lambda r: r["seed"])
            mine = _diagonal_and_average(runs, metric)
            record = {"method": _row_label(row, runs),
                      "seeds": f"{len(runs)} ({','.join(str(seed) for seed in mine)})"}
            diagonals = np.asarray([diagonal(r[metric]) for r in runs])
            for t, domain in enumerate(domains):
                record[domain] = f"{diagonals[:, t].mean():.2f}"
            record["mean A[t][t]"] = _cell([d for d, _ in mine.values()])
            record[f"Avg {title}"] = _cell([a for _, a in mine.values()])
            record["FR"] = f"{np.mean([forgetting_rate(r[metric]) for r in runs]):.2f}"
            if ref is not None:
                shared = sorted(set(mine) & set(ref))
                for k, column in ((0, f"Δ A[t][t] vs {reference}"), (1, f"Δ Avg vs {reference}")):
                    record[column] = (f"{np.mean([mine[s][k] - ref[s][k] for s in shared]):+.2f}"
                                      if shared else "–")
            records.append(record)
        heading = (f"{suite} ({profile}), order {order}: {title} on the diagonal A[t][t] (each "
                   f"domain right after its own DAP-training, seed mean) "
                   f"{_protocol_caption(by_row)}, with the last row's average and FR")
        tables.append((heading, pd.DataFrame.from_records(records)))
    return tables


DIAGONAL_NOTE = (
    "A[t][t]: the end task of domain t fine-tuned and tested right after DAP-training on domain "
    "t (how well the domain just trained is learned); mean A[t][t]: per seed, then mean ± std. "
    "Avg: the last row's average, mean ± std over seeds. FR: per seed, then averaged (equal to "
    "FR on the seed-averaged matrix). Δ … vs ROW: the row minus ROW on the seeds both have, "
    "averaged (no interval: `--vs ROW` without `--diagonal` gives one).")


METRICS_NOTE = (
    "† needs the domain ID at end-task time. FR: forgetting rate on seed-averaged matrices "
    "(negative = backward transfer). KT: gain over `one`; vs-base: gain over `base`. Gen. MLM Δ: "
    "change of the MLM loss on the held-out general corpus from the base model to the end of "
    "the sequence (general-knowledge retention; lower is better).")
DAP_LOSS_NOTE = ("The training loss each row optimises (L_mlm plus the method's own terms: "
                 "KD's distillation, DAS's contrast, ...); –: no DAP-training (base); `pool` "
                 "trains once, on all corpora, shown under the first domain.")
TIMINGS_NOTE = ("Wall times compare only between runs made together, under the same load and "
                "thread count; × ncl: total time over the `ncl` row's.")


def render(tables: list[tuple[str, pd.DataFrame]], fmt: str = "markdown",
           note: str = METRICS_NOTE) -> str:
    parts = []
    for heading, frame in tables:
        if fmt == "markdown":
            # numbers stay as formatted (tabulate would re-parse "+0.50" to 0.5, "12.80" to 12.8)
            table = frame.to_markdown(index=False, disable_numparse=True)
            parts.append(f"### {heading}\n\n{table}\n")
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


# -- further views: the paper's per-task metric, orders pooled, differences against a row -------

# The paper's per-task metric: for `chemprot_sup` (our `pubmed` domain) the companion code
# reports micro-F1 in place of macro-F1 (ContinualLM approaches/finetune.py l.76–77; both are
# computed with scikit-learn at l.210–212). For single-label classification micro-F1 equals
# accuracy (a wrong prediction is one false positive and one false negative, so micro precision
# = micro recall = correct / N); the result JSON holds accuracy, so this view takes Acc there
# and MF1 for every other domain.
PAPER_ACC_DOMAINS = frozenset({"pubmed"})
PAPER_METRICS = {"paper": "paper metric (MF1; Acc = micro-F1 for pubmed/ChemProt)"}
PAPER_METRIC_NOTE = ("Paper metric: macro-F1, except micro-F1 (= accuracy for single-label "
                     "tasks) for pubmed/ChemProt, as the companion code reports it "
                     "(approaches/finetune.py l.76–77).")
PAPER_NOTE = PAPER_METRIC_NOTE + " " + METRICS_NOTE


def with_paper_metric(results: list[dict]) -> list[dict]:
    """Copies of `results` with a `paper` matrix: Acc for the pubmed/ChemProt task, else MF1."""
    out = []
    for res in results:
        acc_task = [domain in PAPER_ACC_DOMAINS for domain in res["domains"]]
        matrix = [[a if acc_task[i] else m
                   for i, (m, a) in enumerate(zip(m_row, a_row, strict=True))]
                  for m_row, a_row in zip(res["mf1"], res["acc"], strict=True)]
        out.append({**res, "paper": matrix})
    return out


def build_paper_tables(results: list[dict],
                       rows: list[str] | None = None) -> list[tuple[str, pd.DataFrame]]:
    """The MF1 table with the paper's per-task metric (`with_paper_metric`)."""
    return build_tables(with_paper_metric(results), rows, PAPER_METRICS)


def build_pooled_tables(
    results: list[dict], rows: list[str] | None = None, metrics: dict[str, str] = METRICS
) -> list[tuple[str, pd.DataFrame]]:
    """Orders pooled, as the paper averages them: the last row per domain (by name), its
    average and the forgetting rate, mean ± std over every (order, seed) run of a row.

    FR here is each run's own FR, then pooled (the per-order table takes it on seed-averaged
    matrices, which cannot be averaged across orders position by position)."""
    groups: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for res in results:
        key = (res["suite"], res["profile"], tuple(sorted(res["domains"])))
        groups[key][res["row"]].append(res)
    tables = []
    for (suite, profile, _), by_row in sorted(groups.items()):
        runs_all = [r for runs in by_row.values() for r in runs]
        domains = min(runs_all, key=lambda r: r["order"])["domains"]  # lowest order's sequence
        wanted = [r for r in (rows or sorted(by_row, key=_row_key)) if r in by_row]
        for metric, title in metrics.items():
            records = []
            for row in wanted:
                runs = sorted(by_row[row], key=lambda r: (r["order"], r["seed"]))
                last = [dict(zip(r["domains"], final_row(r[metric]), strict=True)) for r in runs]
                record = {"method": _row_label(row, runs),
                          "orders": ",".join(str(o) for o in sorted({r["order"] for r in runs})),
                          "runs": len(runs)}
                for domain in domains:
                    record[domain] = _cell([values[domain] for values in last])
                record["Avg"] = _cell([float(np.mean(list(values.values()))) for values in last])
                record["FR"] = _cell([forgetting_rate(r[metric]) for r in runs])
                records.append(record)
            heading = (f"{suite} ({profile}), orders pooled: {title} of the last row A[T][i] "
                       f"{_protocol_caption(by_row)}, mean ± std over orders × seeds")
            tables.append((heading, pd.DataFrame.from_records(records)))
    return tables


POOLED_NOTE = ("Orders pooled: every (order, seed) run of a row counts once; columns name the "
               "domains (their position differs between orders). FR: each run's forgetting "
               "rate, then mean ± std. " + METRICS_NOTE)


def _t_interval(values_a: list[float], values_b: list[float],
                paired: bool) -> tuple[float, float, float]:
    """(mean difference a − b, low, high) of a 95 % t-interval: paired, or Welch's."""
    from benchmark.report import require_extra

    stats = require_extra("scipy.stats", "table --vs")
    a, b = np.asarray(values_a), np.asarray(values_b)
    if paired:
        diff = a - b
        n = len(diff)
        half = stats.t.ppf(0.975, n - 1) * diff.std(ddof=1) / np.sqrt(n)
        return float(diff.mean()), float(diff.mean() - half), float(diff.mean() + half)
    var_a, var_b = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    dof = (var_a + var_b) ** 2 / (var_a**2 / (len(a) - 1) + var_b**2 / (len(b) - 1))
    mean = float(a.mean() - b.mean())
    half = stats.t.ppf(0.975, dof) * np.sqrt(var_a + var_b)
    return mean, float(mean - half), float(mean + half)


def build_vs_tables(
    results: list[dict], reference: str, rows: list[str] | None = None,
    metric: str = "mf1", title: str = "MF1", digits: int = 2,
) -> list[tuple[str, pd.DataFrame]]:
    """Per (suite, profile, order): every row's mean difference in average `metric` (last row)
    against row `reference`, with a 95 % t-interval over seeds (paired by seed where both rows
    share at least 2 seeds, Welch's otherwise; a single-seed row sharing its seed with the
    reference gets the difference on that seed, without interval); `*` where the interval
    excludes zero."""
    tables = []
    for (suite, profile, order, _), by_row, wanted in _table_groups(results, rows):
        if reference not in by_row:
            continue
        ref = {r["seed"]: float(np.mean(final_row(r[metric]))) for r in by_row[reference]}
        records = []
        for row in wanted:
            if row == reference:
                continue
            mine = {r["seed"]: float(np.mean(final_row(r[metric]))) for r in by_row[row]}
            shared = sorted(set(mine) & set(ref))
            if len(shared) >= 2:
                how, n = "paired t", str(len(shared))
                diff, low, high = _t_interval([mine[s] for s in shared], [ref[s] for s in shared],
                                              paired=True)
            elif len(mine) >= 2 and len(ref) >= 2:
                how, n = "Welch t", f"{len(mine)} vs {len(ref)}"
                diff, low, high = _t_interval(list(mine.values()), list(ref.values()), False)
            elif shared:  # one seed in common: the difference on that seed, no interval
                how, n = "none (1 shared seed)", str(shared[0])
                diff = mine[shared[0]] - ref[shared[0]]
                low = high = float("nan")
            else:
                how, n = "none (1 seed)", f"{len(mine)} vs {len(ref)}"
                diff = float(np.mean(list(mine.values())) - np.mean(list(ref.values())))
                low = high = float("nan")
            excludes = bool(low > 0 or high < 0)
            records.append({
                "method": row + _dap_seed_mark(by_row[row]), "seeds": n,
                f"Δ Avg {title}": f"{diff:+.{digits}f}",
                "95 % interval": "–" if np.isnan(low) else
                f"[{low:+.{digits}f}, {high:+.{digits}f}]",
                "interval": how, "≠ 0": "*" if excludes else "",
            })
        if not records:
            continue
        heading = (f"{suite} ({profile}), order {order}: average {title} of the last row "
                   f"against `{reference}`, 95 % interval over seeds" + _dap_once_note(by_row))
        tables.append((heading, pd.DataFrame.from_records(records)))
    return tables


def vs_note(reference: str) -> str:
    return (f"Δ: mean difference of the average MF1 (last row A[T][i]) against `{reference}`. "
            "95 % interval: a t-interval (scipy) over the per-seed averages, paired by seed "
            "where both rows share 2 or more seeds, Welch's unpaired interval otherwise; none "
            f"for a single-seed row (its Δ is taken on its seed where `{reference}` has it: the "
            "seeds column names it). * the interval excludes zero. With 3 seeds the t quantile "
            "is 4.30 (2 degrees of freedom), so the interval is wide: ±2.5 standard deviations "
            "of the paired differences. A row without * is not shown to be equal, only not "
            "shown to differ.")


# -- the LM's own forgetting matrix: held-out MLM loss L[t][i] (`table --mlm`) -----------------

def mlm_matrix(res: dict) -> np.ndarray | None:
    """A run's MLM-loss matrix as (T + 1) × T: row 0 θ0's, row t + 1 after domain t; None where
    the run did not record it (a record without `mlm_loss`)."""
    rows = res.get("mlm_loss") or []
    if len(rows) != len(res["domains"]) + 1:
        return None
    return np.asarray(rows, dtype=float)


def mlm_summary(matrix: np.ndarray) -> dict[str, float]:
    """The loss-unit counterparts of the A-matrix summaries, with L_t the row after domain t
    (L_-1: θ0's) and T domains; lower loss is better, so each is signed to read as its name:
    `avg`: mean_i L_{T-1}[i]; `diag`: mean_i L_i[i] (each domain right after its own DAP);
    `forgetting`: mean_{i<T-1} (L_{T-1}[i] − L_i[i]), > 0: the loss rose again after the domain's
    own phase (backward transfer in loss units is its negative); `fwt`: mean_{i>0}
    (L_-1[i] − L_{i-1}[i]), > 0: the domains before i lowered i's loss before its own phase;
    `gain`: mean_i (L_-1[i] − L_{T-1}[i]), > 0: the end of the sequence is below θ0."""
    base, after = matrix[0], matrix[1:]
    size = after.shape[1]
    own = np.asarray([after[i, i] for i in range(size)])
    last = after[-1]
    return {
        "avg": float(last.mean()),
        "diag": float(own.mean()),
        "forgetting": float(np.mean(last[:-1] - own[:-1])) if size > 1 else float("nan"),
        "fwt": float(np.mean([base[i] - after[i - 1, i] for i in range(1, size)]))
        if size > 1 else float("nan"),
        "gain": float(np.mean(base - last)),
    }


def _cell3(values: list[float], signed: bool = False) -> str:
    fmt = "+.3f" if signed else ".3f"
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{np.mean(values):{fmt}} ± {np.std(values, ddof=1):.3f}"


MLM_COLUMNS = {"avg": "Avg L", "diag": "mean L[t][t]", "forgetting": "Forg.", "fwt": "FWT",
               "gain": "gain vs θ0"}


def build_mlm_tables(results: list[dict],
                     rows: list[str] | None = None) -> list[tuple[str, pd.DataFrame]]:
    """Per (suite, profile, order): each row's held-out MLM loss per domain after the last
    domain, L[T][i], and `mlm_summary`'s numbers, mean ± std over the seeds that recorded the
    matrix, beside the general corpus's loss at the end; rows none of whose runs recorded it are
    left out (a table none of whose rows did is not shown)."""
    tables = []
    for (suite, profile, order, domains), by_row, wanted in _table_groups(results, rows):
        records = []
        for row in wanted:
            runs = sorted(by_row[row], key=lambda r: r["seed"])
            with_matrix = [(r, m) for r in runs if (m := mlm_matrix(r)) is not None]
            if not with_matrix:
                continue
            record = {"method": _row_label(row, runs), "seeds": len(with_matrix)}
            for i, domain in enumerate(domains):
                record[domain] = _cell3([float(m[-1, i]) for _, m in with_matrix])
            summaries = [mlm_summary(m) for _, m in with_matrix]
            for key, column in MLM_COLUMNS.items():
                record[column] = _cell3([s[key] for s in summaries], key != "avg" and
                                        key != "diag")
            general = [r["general_mlm_loss"][-1] for r, _ in with_matrix
                       if r.get("general_mlm_loss")]
            record["general L"] = _cell3(general) if general else "–"
            records.append(record)
        if not records:
            continue
        heading = (f"{suite} ({profile}), order {order}: held-out MLM loss after the last domain "
                   "L[T][i] and its forgetting and transfer (loss units, lower loss is better), "
                   "mean ± std over seeds" + _dap_once_note(by_row))
        tables.append((heading, pd.DataFrame.from_records(records)))
    return tables


def with_mlm_matrix(results: list[dict]) -> list[dict]:
    """The runs that recorded the MLM-loss matrix, each with an `mlm` key: its rows after each
    domain (θ0's dropped), so the views over A (`build_vs_tables`) read L[T] as the last row."""
    return [{**res, "mlm": matrix[1:].tolist()} for res in results
            if (matrix := mlm_matrix(res)) is not None]


def build_mlm_vs_tables(results: list[dict], reference: str,
                        rows: list[str] | None = None) -> list[tuple[str, pd.DataFrame]]:
    """`--mlm --vs ROW`: each row's average held-out MLM loss against `reference`."""
    return build_vs_tables(with_mlm_matrix(results), reference, rows, "mlm",
                           "held-out MLM loss", digits=3)


MLM_NOTE = (
    "L[t][i]: the masked-LM loss (fixed masks) of the model after DAP-training domain t on "
    "domain i's held-out text, which no DAP batch draws (syn6: extra corpus sentences from a "
    "seed of their own; real suites: the end task's test sentences); θ0's row is L_-1. Domain "
    "columns: L[T][i]. Avg L: their mean. mean L[t][t]: each domain right after its own phase. "
    "Forg.: mean over i < T of L[T][i] − L[i][i] (> 0: forgotten; backward transfer is its "
    "negative). FWT: mean over i > 0 of L_-1[i] − L[i−1][i] (> 0: earlier domains lowered "
    "i's loss before its own phase). gain vs θ0: mean of L_-1[i] − L[T][i]. general L: the "
    "held-out general corpus's loss at the end. Per seed, then mean ± std over seeds.")


def mlm_vs_note(reference: str) -> str:
    return (f"Δ: mean difference of the average held-out MLM loss of the last row L[T][i] "
            f"against `{reference}` (< 0: lower loss than `{reference}`). 95 % interval: a "
            "t-interval (scipy) over the per-seed averages, paired by seed where both rows share "
            "2 or more seeds, Welch's otherwise; none for a single-seed row. * the interval "
            "excludes zero.")
