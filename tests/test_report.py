"""Seeing the results: table views (paper metric, orders pooled, `--vs`), figures, the HTML
report opened in a real browser, live tracking into TensorBoard, and the missing-extra line."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmark.__main__ import main
from benchmark.metrics import accuracy

DOMAINS = ["restaurant", "acl", "pubmed"]
# per-seed offsets of the last row's average: known, so the interval can be recomputed by hand
ROWS = {"base": (30.0, [0.0, 1.0, -1.0]), "ncl": (45.0, [0.0, 2.0, 1.0]),
        "das": (46.0, [3.0, -4.0, 2.0])}
SEEDS = [2021, 111, 222]


def _result(row: str, order: int, seed: int, level: float) -> dict:
    domains = DOMAINS if order == 0 else DOMAINS[::-1]
    size = len(domains)
    mf1 = [[level + 10 * (t == i) - 2 * i for i in range(t + 1)] for t in range(size)]
    shift = level - float(np.mean(mf1[-1]))  # make the last row's average exactly `level`
    mf1 = [[v + shift for v in row_] for row_ in mf1]
    acc = [[v + 5.0 for v in row_] for row_ in mf1]  # Acc differs from MF1 by a known 5 points
    return {
        "suite": "syn6", "profile": "tiny", "synthetic": True, "method": row.split()[0],
        "row": row, "order": order, "seed": seed, "domains": domains, "needs_domain_id": False,
        "config": {"method": row, "seed": seed, "dap_lr": 0.001, "method_args": {"x": 1}},
        "versions": {"torch": "2.13.0"}, "git_commit": "abc", "threads": 1,
        "mf1": mf1, "acc": acc,
        "dap_loss": [] if row == "base" else [[3.0 - 0.1 * k for k in range(4)]] * size,
        "dap_steps": [0 if row == "base" else 31] * size,
        "general_mlm_loss": [2.0 + 0.1 * t for t in range(size + 1)],
        "timings": {"base_model_s": 0.0, "dap_s": [1.0] * size,
                    "finetune_s": [[1.0] * (t + 1) for t in range(size)], "total_s": 10.0},
        "resumed_at": [], "finished": True,
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Fake finished runs: 3 rows × 3 seeds on order 0, `das` and `ncl` on order 1 as well,
    and das importance artefacts laid out as the loop writes them."""
    from safetensors.numpy import save_file

    root = tmp_path_factory.mktemp("runs")
    for row, (level, offsets) in ROWS.items():
        for order in (0, 1) if row != "base" else (0,):
            for seed, offset in zip(SEEDS, offsets, strict=True):
                folder = root / "syn6-tiny" / row / f"order{order}" / f"seed{seed}"
                folder.mkdir(parents=True)
                res = _result(row, order, seed, level + offset + 3 * order)
                (folder / "result.json").write_text(json.dumps(res))
                if row == "das":
                    art = folder / "artifacts"
                    art.mkdir()
                    rng = np.random.default_rng(seed)
                    stages = ["general"] + [f"domain{t}_{d}" for t, d in enumerate(res["domains"])]
                    stages += [f"accumulated{t}" for t in range(len(DOMAINS))]
                    for stage in stages:
                        save_file({"head": rng.random((2, 4), dtype=np.float32),
                                   "intermediate": rng.random((2, 16), dtype=np.float32),
                                   "output": rng.random((2, 8), dtype=np.float32)},
                                  str(art / f"importance_{stage}.safetensors"))
    return root


def _load(runs: Path) -> list[dict]:
    from benchmark.tables import load_results

    return load_results(runs)


# -- table views ------------------------------------------------------------------------------

def test_micro_f1_is_accuracy_for_single_label_predictions():
    """Why the paper view may take Acc for ChemProt: micro-F1 (companion finetune.py l.210,
    scikit-learn's average='micro') equals accuracy whenever each example has one label."""
    rng = np.random.default_rng(0)
    gold, pred = rng.integers(0, 5, 300), rng.integers(0, 5, 300)
    tp = sum(int(np.sum((gold == c) & (pred == c))) for c in range(5))
    fp = sum(int(np.sum((gold != c) & (pred == c))) for c in range(5))
    fn = sum(int(np.sum((gold == c) & (pred != c))) for c in range(5))
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    micro = 100 * 2 * precision * recall / (precision + recall)
    assert micro == pytest.approx(accuracy(gold.tolist(), pred.tolist()))
    try:
        from sklearn.metrics import f1_score
    except ImportError:
        return
    assert 100 * f1_score(gold, pred, average="micro") == pytest.approx(micro)


def test_paper_metrics_take_acc_for_pubmed_only(runs, capsys):
    from benchmark.tables import build_paper_tables, build_tables

    results = [r for r in _load(runs) if r["order"] == 0]
    (_, mf1), _ = build_tables(results, ["ncl"])
    [(heading, paper)] = build_paper_tables(results, ["ncl"])
    assert "pubmed/ChemProt" in heading
    ncl = [r for r in results if r["row"] == "ncl"]
    expected = np.mean([r["acc"][-1][2] for r in ncl])
    assert paper.loc[0, "pubmed"].startswith(f"{expected:.2f}")  # Acc = MF1 + 5 there
    assert paper.loc[0, "restaurant"] == mf1.loc[0, "restaurant"]
    assert main(["table", "--runs", str(runs), "--paper-metrics"]) == 0
    out = capsys.readouterr().out
    assert "paper metric" in out and "l.76–77" in out


def test_pooled_view_averages_over_orders_and_seeds(runs, capsys):
    from benchmark.tables import build_pooled_tables

    results = _load(runs)
    mf1_table = build_pooled_tables(results)[0][1].set_index("method")
    das = [r for r in results if r["row"] == "das"]
    averages = [np.mean(r["mf1"][-1]) for r in das]
    assert mf1_table.loc["das", "runs"] == 6 and mf1_table.loc["das", "orders"] == "0,1"
    spread = np.std(averages, ddof=1)
    assert mf1_table.loc["das", "Avg"] == f"{np.mean(averages):.2f} ± {spread:.2f}"
    pubmed = [r["mf1"][-1][r["domains"].index("pubmed")] for r in das]  # column by name
    assert mf1_table.loc["das", "pubmed"].startswith(f"{np.mean(pubmed):.2f}")
    assert main(["table", "--runs", str(runs), "--pooled", "--format", "csv"]) == 0
    assert "orders pooled" in capsys.readouterr().out


def test_vs_gives_the_paired_t_interval_and_marks_it(runs, capsys):
    pytest.importorskip("scipy")
    from benchmark.tables import build_vs_tables

    results = [r for r in _load(runs) if r["order"] == 0]
    [(_, table)] = build_vs_tables(results, "base")
    table = table.set_index("method")
    for row in ("ncl", "das"):
        diff = np.asarray(ROWS[row][1]) - np.asarray(ROWS["base"][1]) + ROWS[row][0] - 30.0
        half = 4.302653 * diff.std(ddof=1) / np.sqrt(3)  # t(0.975, 2 dof)
        low, high = diff.mean() - half, diff.mean() + half
        assert table.loc[row, "Δ Avg MF1"] == f"{diff.mean():+.2f}"
        assert table.loc[row, "95 % interval"] == f"[{low:+.2f}, {high:+.2f}]"
        assert table.loc[row, "interval"] == "paired t"
        assert table.loc[row, "≠ 0"] == ("*" if low > 0 or high < 0 else "")
    assert table.loc["ncl", "≠ 0"] == "*"  # +15 with a small spread
    assert main(["table", "--runs", str(runs), "--vs", "ncl"]) == 0
    out = capsys.readouterr().out
    assert "against `ncl`" in out and "With 3 seeds" in out and "the interval is wide" in out
    assert main(["table", "--runs", str(runs), "--vs", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--vs nope: no such row" in err and len(err.strip().splitlines()) == 1


def test_diagonal_view_holds_a_single_seed_variant_against_the_reference_on_its_seed(runs,
                                                                                      capsys):
    """The RQ3–RQ5 tables: each domain right after its own DAP-training (A[t][t]), and a
    variant run on one seed compared with the reference on that seed, not its seed mean."""
    pytest.importorskip("scipy")
    from benchmark.tables import build_diagonal_tables, build_vs_tables

    results = [r for r in _load(runs) if r["order"] == 0]
    das = {r["seed"]: r for r in results if r["row"] == "das"}
    variant = {**das[111], "row": "das variant",
               "mf1": [[v + 1.5 for v in row] for row in das[111]["mf1"]]}
    results.append(variant)
    [(heading, table)] = build_diagonal_tables(results, ["das", "das variant", "ncl"], "das")
    table = table.set_index("method")
    assert "diagonal A[t][t]" in heading
    diagonals = [[r["mf1"][t][t] for t in range(3)] for r in das.values()]
    assert table.loc["das", "acl"] == f"{np.mean([d[1] for d in diagonals]):.2f}"
    means = [np.mean(d) for d in diagonals]
    assert table.loc["das", "mean A[t][t]"] == f"{np.mean(means):.2f} ± {np.std(means, ddof=1):.2f}"
    assert table.loc["das variant", "seeds"] == "1 (111)"
    # das's seed 111 sits 4 below its seed mean (ROWS): the variant is +1.50 on its seed
    assert table.loc["das variant", "Δ Avg vs das"] == "+1.50"
    assert table.loc["das variant", "Δ A[t][t] vs das"] == "+1.50"
    assert table.loc["ncl", "Δ Avg vs das"] == f"{np.mean([0 - 3, 2 + 4, 1 - 2]) - 1:+.2f}"
    [(_, vs)] = build_vs_tables(results, "das", ["das variant"])
    assert vs.loc[0, "Δ Avg MF1"] == "+1.50" and vs.loc[0, "interval"] == "none (1 shared seed)"
    assert main(["table", "--runs", str(runs), "--diagonal", "--vs", "ncl",
                 "--config", "ref-base,ref-ncl"]) == 0
    out = capsys.readouterr().out
    assert "| base " in out and "| das " not in out and "Δ Avg vs ncl" in out
    # base − ncl = −15 − 1 on the shared seeds; tabulate must not re-parse "+0.00" into 0
    assert "| -16.00 " in out and "| +0.00 " in out
    assert main(["table", "--runs", str(runs), "--diagonal", "--vs", "nope"]) == 2
    assert "--vs nope: no such row" in capsys.readouterr().err


# -- figures and the report -------------------------------------------------------------------

def test_plot_writes_one_named_figure_per_idea(runs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "fig"
    assert main(["plot", "--runs", str(runs), "--out", str(out)]) == 0
    folder = out / "syn6-tiny-order0"
    names = {p.name for p in folder.iterdir()}
    expected = {"summary_bars.png", "trajectories.png", "dap_loss.png", "general_mlm_loss.png",
                "A_mf1-base.png", "A_mf1-ncl.png", "A_mf1-das.png", "importance-das.png",
                "importance_units-das.png"}
    assert expected <= names and not any(n.startswith("importance-ncl") for n in names)
    assert (out / "syn6-tiny-order1" / "importance-das.png").exists()
    for name in expected:
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    from benchmark.plot import plot_runs

    order0 = [r for r in _load(runs) if r["order"] == 0]
    vector = plot_runs(order0, runs, tmp_path / "pdf", ["ncl"], "pdf")
    assert sorted(p.name for p in vector) == [  # only the row asked for
        "A_mf1-ncl.pdf", "dap_loss.pdf", "general_mlm_loss.pdf", "summary_bars.pdf",
        "trajectories.pdf"]
    assert all(p.read_bytes()[:4] == b"%PDF" for p in vector)


def test_missing_extra_is_one_line_naming_the_install(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    out = tmp_path / "fig"
    assert main(["plot", "--runs", str(runs), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: `plot` needs matplotlib, from the report extra: "
                   "pip install -e '.[report]'")
    assert not out.exists()


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


CHECK = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.title = `tables=${document.querySelectorAll('table').length} images=${imgs.length}`
    + ` decoded=${ok} sections=${document.querySelectorAll('section').length}`;
});</script></body>"""


def test_report_opens_in_headless_chromium_with_tables_and_images(runs, tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("scipy")
    out, order0 = tmp_path / "report", tmp_path / "runs"
    for folder in runs.glob("syn6-tiny/*/order0"):  # one order: half the figures to draw
        shutil.copytree(folder, order0 / folder.relative_to(runs))
    assert main(["report", "--runs", str(order0), "--out", str(out), "--vs", "base"]) == 0
    page = (out / "index.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page  # offline
    browser = _browser()
    if browser is None:
        pytest.skip("no headless Chromium installed (apt-get install chromium; .ci/run does)")
    probe = out / "probe.html"
    probe.write_text(page.replace("</body>", CHECK))
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--virtual-time-budget=10000", "--window-size=1400,2400"]
    dom = subprocess.run([*flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    title = dom.split("<title>")[1].split("</title>")[0]
    counts = dict(part.split("=") for part in title.split())
    images = page.count("<img ")
    assert int(counts["tables"]) >= 6 and int(counts["sections"]) >= 6
    assert int(counts["images"]) == images >= 9
    assert counts["decoded"] == counts["images"], "every embedded figure decodes in the browser"
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", (out / "index.html").as_uri()],
                   capture_output=True, timeout=120)
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1400, 2400)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50, "the screenshot shows a rendered page"


# -- live tracking --------------------------------------------------------------------------

def test_run_report_to_tensorboard_writes_events_we_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    out = tmp_path / "runs"
    assert main(["run", "--method", "ncl", "--profile", "tiny", "--out", str(out),
                 "--dap-steps", "3", "--report-to", "tensorboard", "--no-table"]) == 0
    run_dir = out / "syn6-tiny" / "ncl" / "order0" / "seed2021"
    result = json.loads((run_dir / "result.json").read_text())
    scalars, texts, config = {}, {}, {}
    for path in sorted((run_dir / "tracking").rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                plugin = value.metadata.plugin_data
                if value.HasField("tensor") and plugin.plugin_name == "scalars":
                    scalars.setdefault(value.tag, {})[event.step] = value.tensor.float_val[0]
                elif value.HasField("simple_value"):
                    scalars.setdefault(value.tag, {})[event.step] = value.simple_value
                elif plugin.plugin_name == "text":
                    texts.setdefault(value.tag, {})[event.step] = \
                        value.tensor.string_val[0].decode()
                elif value.tag == "_hparams_/session_start_info":
                    info = plugin_data_pb2.HParamsPluginData.FromString(plugin.content)
                    config = {k: v.string_value or v.number_value
                              for k, v in info.session_start_info.hparams.items()}
    names = result["domains"]
    assert sorted(scalars[f"dap_loss/0_{names[0]}"]) == [0, 1, 2]  # every DAP step
    assert scalars[f"dap_loss/0_{names[0]}"][0] == pytest.approx(result["dap_loss"][0][0],
                                                                abs=1e-4)
    for t, row in enumerate(result["mf1"]):
        for i, value in enumerate(row):
            assert scalars[f"mf1/{i}_{names[i]}"][t] == pytest.approx(value, abs=1e-3)
            assert scalars[f"acc/{i}_{names[i]}"][t] == pytest.approx(result["acc"][t][i],
                                                                     abs=1e-3)
    last = texts["A_mf1/text_summary"][len(names) - 1]
    assert f"{result['mf1'][-1][0]:.2f}" in last and names[-1] in last
    assert scalars["general_mlm_loss"][len(names) - 1] == pytest.approx(
        result["general_mlm_loss"][-1], rel=1e-5)
    assert config["method"] == "ncl" and config["dap_steps"] == 3


def test_report_to_a_tracker_that_is_not_installed_is_one_line(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    out = tmp_path / "runs"
    assert main(["run", "--method", "ncl", "--profile", "tiny", "--out", str(out),
                 "--report-to", "wandb"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --report-to wandb: package not installed; pip install wandb"
    assert not out.exists()
