"""`python -m benchmark report`: one self-contained static HTML page of a results directory.

Tables (the MF1 and Acc tables, the paper's per-task metric, orders pooled, optionally the
differences against a row), every figure of `benchmark.plot` embedded as a PNG data URI, the
resolved configs and package versions of the runs, and a legend of the metrics. Nothing is
fetched when the page is read: no scripts or styles from elsewhere, so it opens offline.
"""

from __future__ import annotations

import base64
import html
import importlib
import json
import logging
from collections import defaultdict
from pathlib import Path
from types import ModuleType

from benchmark.atomic import write_text_atomic

log = logging.getLogger(__name__)
EXTRA = "pip install -e '.[report]'"


class ExtraMissing(Exception):
    """A package of the `report` extra is not installed: one line naming the pip install."""


def require_extra(module: str, command: str) -> ModuleType:
    """Import `module` (from the `report` extra) or raise ExtraMissing naming the install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise ExtraMissing(f"`{command}` needs {top}, from the report extra: {EXTRA}") from None


LEGEND = [
    ("A[t][i]", "score of end task i fine-tuned from the model after DAP-training domain t "
                "(lower triangle; with `eval_matrix: diagonal` only A[i][i] and the last row)"),
    ("MF1", "macro-F1 of the end task's test set, in percent (ours for every task)"),
    ("Acc", "accuracy, in percent"),
    ("paper metric", "MF1, except micro-F1 (= Acc for single-label tasks) for pubmed/ChemProt, "
                     "as the companion code reports it (approaches/finetune.py l.76–77)"),
    ("Avg", "mean of the last row A[T][i] over the end tasks; ± is the standard deviation over "
            "seeds (or over orders × seeds in the pooled view)"),
    ("FR", "forgetting rate: mean over i < T of A[i][i] − A[T][i], on seed-averaged matrices; "
           "negative means backward transfer"),
    ("KT", "knowledge transfer: mean gain of the last row over the `one` row (each domain "
           "DAP-trained alone from the base model)"),
    ("vs-base", "mean gain of the last row over `base` (no DAP-training)"),
    ("Gen. MLM Δ", "change of the MLM loss on the held-out general corpus, base model to the end "
                   "of the sequence (general-knowledge retention; lower is better)"),
    ("†", "the method needs the domain ID at end-task time"),
]


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(path.stem)}">'
            f"<figcaption>{html.escape(path.stem)}</figcaption></figure>")


def _tables_html(tables: list, note: str) -> str:
    parts = []
    for heading, frame in tables:
        parts.append(f"<h3>{html.escape(heading)}</h3>")
        parts.append(frame.to_html(index=False, border=0, classes="result"))
    if tables:
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    return "\n".join(parts)


def _configs_html(results: list[dict]) -> str:
    """One resolved config per row (seed left out: it is the only field that varies), and the
    distinct package versions and commits of the runs."""
    configs: dict[str, dict] = {}
    seeds: dict[str, set] = defaultdict(set)
    versions: dict[str, set] = defaultdict(set)
    for res in results:
        cfg = {k: v for k, v in res.get("config", {}).items() if k != "seed"}
        configs.setdefault(res["row"], cfg)
        seeds[res["row"]].add(res["seed"])
        for name, value in (res.get("versions") or {}).items():
            versions[name].add(str(value))
        versions["git commit"].add(str(res.get("git_commit")))
        versions["threads"].add(str(res.get("threads")))
        versions["cpu"].add(str(res.get("cpu")))
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(', '.join(sorted(v)))}</td></tr>"
                   for k, v in versions.items())
    parts = [f'<table class="result"><tr><th>package</th><th>versions in these runs</th></tr>'
             f"{rows}</table>"]
    for row, cfg in configs.items():
        text = html.escape(json.dumps(cfg, indent=1, ensure_ascii=False))
        parts.append(f"<details><summary>{html.escape(row)} (seeds "
                     f"{', '.join(map(str, sorted(seeds[row])))})</summary><pre>{text}</pre>"
                     "</details>")
    return "\n".join(parts)


STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 1400px; color: #222; }
table.result { border-collapse: collapse; font-size: 0.85em; margin-bottom: 0.5em; }
table.result th, table.result td { border: 1px solid #bbb; padding: 2px 6px; text-align: right; }
table.result td:first-child { text-align: left; white-space: nowrap; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.8em; color: #555; }
.note { font-size: 0.85em; color: #444; max-width: 60em; }
dt { font-weight: bold; } dd { margin-bottom: 0.4em; }
"""


def _mlm_sections(results: list[dict], rows: list[str] | None,
                  vs: str | None) -> list[tuple[str, str]]:
    """The held-out MLM-loss view (`table --mlm`), where any run recorded the matrix."""
    from benchmark.tables import MLM_NOTE, build_mlm_tables, build_mlm_vs_tables, mlm_vs_note

    tables = build_mlm_tables(results, rows)
    if not tables:
        return []
    sections = [("Held-out MLM loss (the LM's own forgetting)", _tables_html(tables, MLM_NOTE))]
    if vs:
        against = build_mlm_vs_tables(results, vs, rows)
        if against:
            sections.append((f"Held-out MLM loss against {vs}",
                             _tables_html(against, mlm_vs_note(vs))))
    return sections


def build_report(runs: Path, out: Path, rows: list[str] | None = None,
                 vs: str | None = None, groups: dict[str, list[str]] | None = None,
                 results: list[dict] | None = None) -> Path:
    """Write `out/index.html` (figures embedded; their PNGs are kept in `out/figures`) from
    `results` (default: `load_results(runs)`)."""
    from benchmark import plot
    from benchmark.tables import (
        METRICS_NOTE,
        PAPER_NOTE,
        POOLED_NOTE,
        build_paper_tables,
        build_pooled_tables,
        build_tables,
        build_vs_tables,
        load_results,
        vs_note,
    )

    results = load_results(runs) if results is None else results
    if not results:
        raise ValueError(f"no finished result.json under {runs}")
    figures = plot.plot_runs(results, runs, Path(out) / "figures", rows, "png", groups)
    present = {r["row"] for r in results}
    by_group = []  # with every row drawn, the bars and trajectories again per group preset
    for name, members in ({} if rows else groups or {}).items():
        if len(present & set(members)) >= 2:
            by_group.append((name, plot.plot_runs(results, runs, Path(out) / "figures" / name,
                                                  members, "png", groups, per_row=False)))
    sections = [
        ("Tables", _tables_html(build_tables(results, rows), METRICS_NOTE)),
        ("The paper's per-task metric", _tables_html(build_paper_tables(results, rows),
                                                     PAPER_NOTE)),
        ("Orders pooled", _tables_html(build_pooled_tables(results, rows), POOLED_NOTE)),
    ]
    if any(r.get("compute") for r in results):  # the score beside the compute spent on it
        from benchmark.tables import COMPUTE_NOTE, build_compute_tables

        sections.append(("Compute", _tables_html(build_compute_tables(results, rows),
                                                 COMPUTE_NOTE)))
    if vs:
        sections.append((f"Against {vs}", _tables_html(build_vs_tables(results, vs, rows),
                                                       vs_note(vs))))
    sections += _mlm_sections(results, rows, vs)
    sections.append(("Figures", "\n".join(_image(p) for p in figures)))
    for name, paths in by_group:
        sections.append((f"Figures of the {name} group",
                         "\n".join(_image(p) for p in paths)))
    legend = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in LEGEND)
    sections.append(("Metrics", f"<dl>{legend}</dl>"))
    sections.append(("Configs and versions", _configs_html(results)))
    body = "\n".join(f'<section id="s{k}"><h2>{html.escape(title)}</h2>\n{content}</section>'
                     for k, (title, content) in enumerate(sections))
    contents = " · ".join(f'<a href="#s{k}">{html.escape(title)}</a>'
                          for k, (title, _) in enumerate(sections))
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>cdap-bench report: {html.escape(str(runs))}</title>"
            f"<style>{STYLE}</style></head><body>\n"
            f"<h1>cdap-bench report</h1><p>{len(results)} finished runs from "
            f"<code>{html.escape(str(runs))}</code>.</p>\n<nav>{contents}</nav>\n{body}\n</body></html>\n")
    index = Path(out) / "index.html"
    write_text_atomic(index, page)
    return index
