"""The continual loop: DAP-train domain after domain, fine-tune every seen task, fill A[t][i].

One writer per run directory (`benchmark.lock`); every file is written atomically; after each
domain the model, the method's state and the record are checkpointed as one, and the record is
saved after every fine-tuning, so `--resume` continues a run killed anywhere and ends with the
same numbers. Everything `--resume` needs is read and checked before anything is written: the
config, θ0, every checkpoint file against the sha256 recorded when it was written, the data
against the digest recorded with it. A domain whose DAP loss or weights are not finite stops
the run (`NotFinite`) before it is checkpointed: a diverged run never becomes a result.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import time
from contextlib import nullcontext
from hashlib import sha1
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed

from benchmark.basemodel import cpu_description, fingerprint, load_base_model, shipped_name
from benchmark.checkpoint import (
    CHECKPOINT,
    Resumed,
    find_checkpoint,
    load_checkpoint,
    read_meta,
    resume_state,
    save_checkpoint,
    verify_checkpoint,
)
from benchmark.compute import Compute, counted
from benchmark.config import ConfigError, RunConfig, recorded_config
from benchmark.context import Context
from benchmark.dap import dap_train
from benchmark.data import tokenize_task
from benchmark.finetune import finetune_and_test
from benchmark.headwarmup import warm_up as warm_up_head
from benchmark.kernels import kernel_setting
from benchmark.lock import LOCK_NAME, run_lock
from benchmark.probe import probe_and_test
from benchmark.record import NotFinite, RunRecord, load, package_versions, save
from methods import Method, build_method, get_method_class

log = logging.getLogger(__name__)
RESULT = "result.json"
PROGRESS = "progress.json"


def run_dir_for(out: Path, cfg: RunConfig, legacy: bool = False) -> Path:
    """`OUT/SUITE-PROFILE/ROW/orderK/seedS`; a row that is not a safe folder name gets a hash of
    itself appended, so two labels that sanitise alike ("das (fast)", "das [fast]") never share
    (`legacy`: the name without it, as runs made before result schema 2 have it)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in cfg.row)
    if safe != cfg.row and not legacy:
        safe += "-" + sha1(cfg.row.encode()).hexdigest()[:8]
    return Path(out) / f"{cfg.suite}-{cfg.profile}" / safe / f"order{cfg.order}" / f"seed{cfg.seed}"


def environment() -> dict[str, Any]:
    versions = package_versions()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"versions": versions, "git_commit": commit, "threads": torch.get_num_threads(),
            "cpu": cpu_description(), "kernels": kernel_setting()}


class CrashPoint(BaseException):
    """Raised by the test hook at a crash point (CDAP_CRASH_SIGNAL=RAISE): it stops the run
    like a kill there (no `except Exception` catches it, nothing after the point runs, no file
    is being written), so a test can kill and resume a run within its own process."""


def _crash_point(stage: str, t: int) -> None:
    """Test hook: CDAP_CRASH_AT=stage:t stops the process there. CDAP_CRASH_SIGNAL picks how:
    KILL (the default) sends itself SIGKILL, a real `kill -9`; INT sends itself SIGINT, a
    Ctrl-C, and waits for its handler to raise KeyboardInterrupt (a SIGINT that is ignored, as
    for a background job of a non-interactive shell, is handled as Python's default first);
    RAISE raises `CrashPoint`."""
    if os.environ.get("CDAP_CRASH_AT") != f"{stage}:{t}":
        return
    how = os.environ.get("CDAP_CRASH_SIGNAL", "KILL")
    if how == "RAISE":
        raise CrashPoint(f"{stage}:{t}")
    if how == "INT":
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.raise_signal(signal.SIGINT)
    else:
        os.kill(os.getpid(), signal.SIGKILL)
    while True:  # until the signal's handler raises (INT) or the process is gone (KILL)
        time.sleep(1)


def config_differences(stored: dict[str, Any], asked: dict[str, Any]) -> str:
    """The keys in which a recorded config (completed by `recorded_config`) differs from the
    config asked for now, as `key=stored (asked value)` pairs; "" when they agree."""
    stored, default = recorded_config(stored), RunConfig().to_dict()
    return ", ".join(f"{k}={stored.get(k, default[k])!r} (asked {asked[k]!r})"
                     for k in asked if stored.get(k, default[k]) != asked[k])


def check_same_config(cfg: RunConfig, record: RunRecord, where: Path) -> None:
    """Refuse to continue or report a stored run made with another config, naming the keys."""
    pairs = config_differences(record.config, cfg.to_dict())
    if pairs:
        raise ConfigError(f"{where} holds a run made with another config: {pairs}; repeat its "
                          "settings to resume it, or pass --overwrite to start it again")


def check_same_data(data: dict[str, str], meta: dict[str, Any], checkpoint: Path) -> None:
    """Refuse to resume from a checkpoint made on other data than the run reads now, naming
    the file (or dataset) that changed; a checkpoint without a data digest is taken as is."""
    stored = meta.get("data")
    if not isinstance(stored, dict):
        return
    for what in sorted(set(stored) | set(data)):
        if stored.get(what) != data.get(what):
            how = ("is new" if what not in stored else "is no longer read"
                   if what not in data else "changed")
            raise ConfigError(f"data {what} {how} since {checkpoint} was written; its numbers "
                              "would mix two datasets: restore it, or pass --overwrite to start "
                              "the run again")


def prepare_run_dir(run_dir: Path, cfg: RunConfig, resume: bool, overwrite: bool,
                    main: bool = True, data: dict[str, str] | None = None
                    ) -> Resumed | None:
    """Check the run directory against the request and return the state to resume from, if
    any: (checkpoint, its meta, the record). The checkpoint's files must match their recorded
    sha256 and `data` (the suite's `data_digest`, when given) the one recorded with it. Every
    process checks; only `main` writes."""
    held = [n for n in (RESULT, PROGRESS, CHECKPOINT, f"{CHECKPOINT}.old")
            if (run_dir / n).exists()]
    if held and not (resume or overwrite):
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it or "
                          "--overwrite to start it again")
    stored = None
    if resume and held:
        progress = load(run_dir / PROGRESS) if (run_dir / PROGRESS).exists() else None
        checkpoint = find_checkpoint(run_dir)
        if checkpoint is not None:
            meta = read_meta(checkpoint)
            stored = Resumed(checkpoint, meta, resume_state(meta, progress))
            check_same_config(cfg, stored.record, run_dir)
            verify_checkpoint(checkpoint, meta)
            if data is not None:
                check_same_data(data, meta, checkpoint)
        elif progress is not None:
            check_same_config(cfg, progress, run_dir)
    if main and overwrite:
        for path in run_dir.iterdir() if run_dir.exists() else ():
            if path.name != LOCK_NAME:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    return stored


def head_warmup_text(cfg: RunConfig, suite, names: list[str]):
    """The raw text the MLM head warm-up trains on (`head_warmup_corpus`): the suite's general
    replay corpus (real6: WikiText-2 test, never its held-out valid split; syn6: θ0's own
    pre-training corpus) or the first domain's corpus. A suite without general text cannot take
    `general`."""
    if cfg.head_warmup_corpus == "first":
        return suite.domains[names[0]].corpus
    general = suite.replay_corpus if suite.replay_corpus is not None else suite.pretrain_corpus
    if general is None:
        raise ConfigError(
            f"head_warmup_corpus: general: suite {suite.name} has no general replay corpus "
            "(its `general:` key); warm the head on the first domain with "
            "--head-warmup-corpus first")
    return general


def run(cfg: RunConfig, suite, out: Path, resume: bool = False, overwrite: bool = False,
        cache: str | None = None, keep_checkpoint: bool = False,
        report_to: list[str] | None = None) -> dict[str, Any]:
    """Run one (suite, method, order, seed); return the record written to `result.json`.

    The last domain checkpoint is removed once the result is written, unless `keep_checkpoint`.
    `report_to` names Accelerate trackers for live tracking (files under run_dir/tracking).
    """
    run_dir = run_dir_for(out, cfg)
    problem = get_method_class(cfg.method).config_problem(cfg)
    if problem:  # fails before anything is written
        raise ConfigError(f"method {cfg.method}: {problem}")
    if cfg.head_warmup_steps:  # a warm-up the suite cannot feed fails before anything is written
        head_warmup_text(cfg, suite, suite.order(cfg.order))
    # under `accelerate launch` / `torchrun` every process runs this; only the main one writes
    tracking = {"log_with": report_to, "project_dir": str(run_dir / "tracking")} if report_to \
        else {}
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, kwargs_handlers=[
        DistributedDataParallelKwargs(find_unused_parameters=True)], **tracking)
    main = accelerator.is_main_process
    with run_lock(run_dir) if main else nullcontext():
        if resume and (run_dir / RESULT).exists():
            done = load(run_dir / RESULT)
            check_same_config(cfg, done, run_dir)
            log.info("%s is complete; nothing to resume", run_dir)
            if main:  # a kill may have come just after the result was written
                tidy(run_dir, keep_checkpoint)
            return done.to_dict()
        data = suite.data_digest(suite.order(cfg.order))
        stored = prepare_run_dir(run_dir, cfg, resume, overwrite, main, data)
        accelerator.wait_for_everyone()
        if report_to:  # live tracking: the resolved config first
            start_tracking(accelerator, cfg, suite.order(cfg.order))
        record = run_sequence(cfg, suite, run_dir, accelerator, stored, cache, data)
        accelerator.wait_for_everyone()
        if main:
            save(run_dir / RESULT, record)
            _crash_point("finish", len(record.domains) - 1)
            tidy(run_dir, keep_checkpoint)
    if report_to:
        accelerator.end_training()
    return record.to_dict()


def tidy(run_dir: Path, keep_checkpoint: bool) -> None:
    """Once the result is written: drop the progress file and, unless kept, the checkpoint."""
    (run_dir / PROGRESS).unlink(missing_ok=True)
    if not keep_checkpoint:
        shutil.rmtree(run_dir / CHECKPOINT, ignore_errors=True)


def run_sequence(cfg: RunConfig, suite, run_dir: Path, accelerator: Accelerator,
                 stored: Resumed | None, cache: str | None,
                 data: dict[str, str] | None = None) -> RunRecord:
    """θ0, then for every domain: DAP-train and checkpoint it (with `data`, the suite's data
    digest), fine-tune the row's tasks."""
    started = time.perf_counter()
    names, main = suite.order(cfg.order), accelerator.is_main_process
    method = build_method(cfg.method, cfg.method_args)
    with accelerator.main_process_first():
        model, tokenizer, base_seconds = load_base_model(suite, cfg.base_model, cache)
    record = new_record(cfg, suite, names, method, base_seconds, fingerprint(model))
    model.to(accelerator.device)
    compute = Compute(model, record.compute, reduce=(
        (lambda x: accelerator.reduce(x.to(accelerator.device), "sum"))
        if accelerator.num_processes > 1 else None))
    if cfg.head_warmup_steps:
        record.head_warmup_loss = warm_up_head(
            model, tokenizer, head_warmup_text(cfg, suite, names), cfg,
            record.base_fingerprint, compute, cache)
    ctx = context_for(cfg, suite, names, model, tokenizer, accelerator, run_dir, compute)
    method.setup(ctx)
    tasks = [suite.domains[n].task for n in names]
    splits = [(tokenize_task(task.train, tokenizer, cfg.max_length, cfg.pair_input),
               tokenize_task(task.test, tokenizer, cfg.max_length, cfg.pair_input))
              for task in tasks]
    general = ctx.general_corpus()
    if stored is None:  # θ0's losses; a resumed record holds them already
        if general is not None:
            record.general_mlm_loss.append(ctx.mlm_eval_loss(ctx.model, general))
        record_mlm_losses(ctx, record, 0)
    else:
        record = resume_from(stored, ctx, method, record)
        compute.totals = record.compute  # counted until the checkpoint; counting goes on

    for t, name in enumerate(names):
        ctx.t = t
        if t >= record.domains_done:
            train_domain(ctx, method, record, general, t)
            if main:
                save_checkpoint(run_dir, ctx.model, method, {
                    "domain": t, "name": name, "record": record.to_dict(), "data": data or {}})
            _crash_point("checkpoint", t)
            if main:
                save(run_dir / PROGRESS, record)
        for i in range(len(record.mf1[t]), t + 1):
            fine_tune_cell(ctx, method, record, splits, tasks, t, i)
            if main:
                save(run_dir / PROGRESS, record)
            _crash_point("finetune", t)
        log.info("after %s: MF1 %s", name, record.mf1[t])
        if accelerator.trackers:  # live tracking: the A matrices so far, the general MLM loss
            track_domain(accelerator, record, names, t)
    record.timings["total_s"] = round(time.perf_counter() - started, 3)
    record.final_fingerprint = fingerprint(ctx.model)
    record.finished = True
    compute.remove()
    return record


def context_for(cfg: RunConfig, suite, names: list[str], model, tokenizer,
                accelerator: Accelerator, run_dir: Path, compute: Compute | None = None
                ) -> Context:
    """The hooks' context: the DAP-time config (`seed` = `dap_seed` where set), and the run's
    own seed for fine-tuning (`Context.run_seed`)."""
    return Context(config=cfg.for_dap(), suite=suite, domains=names, model=model,
                   tokenizer=tokenizer, accelerator=accelerator, run_dir=run_dir,
                   _base=copy.deepcopy(model), run_seed=cfg.seed, compute=compute)


def resume_from(stored: Resumed, ctx: Context, method: Method,
                fresh: RunRecord) -> RunRecord:
    """Load the checkpoint into the model and method; the stored record, checked against θ0."""
    path, meta, record = stored
    if record.base_fingerprint and record.base_fingerprint != fresh.base_fingerprint:
        raise ConfigError(
            f"{ctx.run_dir} was started from another base model θ0 (fingerprint "
            f"{record.base_fingerprint[:12]}, now {fresh.base_fingerprint[:12]}); its numbers "
            "would mix two models: pass --overwrite to start it again")
    load_checkpoint(path, ctx.model, method)
    record.resumed_at.append(meta["domain"] + 1)
    log.info("resuming %s after domain %d (%s)", ctx.run_dir, meta["domain"], meta.get("name"))
    return record


def train_domain(ctx: Context, method: Method, record: RunRecord, general, t: int) -> None:
    """DAP-train domain t with the method's hooks and append its losses, steps and times."""
    start = time.perf_counter()
    weights = fingerprint(ctx.model)
    # hooks may use dropout or sampling (importance, Fisher): seed them per domain too
    set_seed(ctx.seed_for("before_domain", t))
    with counted(ctx, "method"):
        method.before_domain(ctx, t)
    plan = method.dap_plan(ctx, t)
    with counted(ctx, "dap"):
        losses = dap_train(ctx, method, plan, t) if plan is not None else []
    _crash_point("dap", t)
    set_seed(ctx.seed_for("after_domain", t))
    with counted(ctx, "method"):
        method.after_domain(ctx, t)
    check_finite(ctx, losses, t, weights=True)
    # no DAP and the weights as they were (base, pool after its one phase): the losses of the
    # last row are this row's (the same forward passes on the same weights and fixed masks)
    same = plan is None and fingerprint(ctx.model) == weights
    general_loss = None
    if general is not None:
        general_loss = (record.general_mlm_loss[-1] if same and record.general_mlm_loss
                        else ctx.mlm_eval_loss(ctx.model, general))
        check_finite(ctx, [general_loss], t, "general MLM loss")
    record_mlm_losses(ctx, record, t + 1, same)
    ctx.protocol.record_domain(record, losses, plan.steps if plan is not None else 0,
                               general_loss, time.perf_counter() - start)


def record_mlm_losses(ctx: Context, record: RunRecord, row: int, same: bool = False) -> None:
    """Row `row` of the MLM-loss matrix (0: θ0, t + 1: after domain t): the model's MLM loss on
    every domain's held-out text (forward passes, fixed masks), and its seconds; `same`: the
    weights are those of the row before, whose losses are copied. A run resumed from a record
    without the earlier rows records none (a partial matrix would mislead)."""
    if len(record.mlm_loss) != row:
        return
    start = time.perf_counter()
    losses = list(record.mlm_loss[-1]) if same and row else [
        ctx.mlm_eval_loss(ctx.model, ctx.heldout_corpus(i)) for i in range(len(ctx.domains))]
    if row:
        check_finite(ctx, losses, row - 1, "held-out MLM loss")
    ctx.protocol.record_mlm_row(record, losses, time.perf_counter() - start)


def check_finite(ctx: Context, losses: list[float], t: int, what: str = "DAP loss",
                 weights: bool = False) -> None:
    """`NotFinite` if a loss of domain t (or, with `weights`, a weight of the model) is NaN or
    infinite: the run has diverged (or started from damaged weights), and nothing of the
    domain is kept. The weights are scanned once per domain, after DAP-training."""
    where = f"{ctx.run_dir}: domain {t} ({ctx.domains[t]})"
    bad = [k for k, v in enumerate(losses) if not math.isfinite(v)]
    if bad:
        raise NotFinite(f"{where}: the {what} is not finite ({losses[bad[0]]} at record "
                        f"{bad[0]}); the run has diverged and is stopped before its checkpoint")
    if not weights:
        return
    weight = next((n for n, p in ctx.model.named_parameters() if not torch.isfinite(p).all()),
                  None)
    if weight is not None:
        raise NotFinite(f"{where}: weight {weight} is not finite after DAP-training; the run has "
                        "diverged and is stopped before its checkpoint")


def fine_tune_cell(ctx: Context, method: Method, record: RunRecord, splits, tasks, t: int,
                   i: int) -> None:
    """Fill A[t][i]: fine-tune (or probe, `eval: probe`) task i on the model after domain t, or
    skip / copy it."""
    mf1 = acc = collapsed = None
    seconds = 0.0
    cell = ctx.protocol.cell(t, i, method.past_tasks_unchanged)
    if cell == "skip":
        pass
    elif cell == "copy":
        mf1, acc, collapsed = record.mf1[i][i], record.acc[i][i], record.collapsed[i][i]
    else:
        train, test = splits[i]
        desc = f"end task {ctx.domains[i]} @ {ctx.domains[t]}"
        seed = ctx.seed_for("finetune", t, i)
        with counted(ctx, ctx.config.eval):  # "finetune" or "probe"
            if ctx.config.eval == "probe":
                score = probe_and_test(ctx, method.model_for_task(ctx, i), train, test, seed,
                                       desc)
            else:
                score = finetune_and_test(ctx, method.model_for_task(ctx, i), train, test,
                                          tasks[i].num_labels, seed=seed, desc=desc,
                                          epochs=tasks[i].epochs)
        mf1, acc, seconds, collapsed = score
        if collapsed:
            log.warning("%s: every test prediction is one class (MF1 %.2f): marked collapsed",
                        desc, mf1)
    if mf1 is not None and ctx.accelerator.trackers:  # live tracking: A[t][i] as it comes
        ctx.accelerator.log({f"mf1/{i}_{ctx.domains[i]}": mf1,
                             f"acc/{i}_{ctx.domains[i]}": acc}, step=t)
    ctx.protocol.record_cell(record, t, mf1, acc, collapsed, seconds)


# -- live tracking (`run --report-to`): Accelerate's trackers, written by the main process ----

def start_tracking(accelerator: Accelerator, cfg: RunConfig, names: list[str]) -> None:
    """Start the trackers and store the resolved config (scalars as they are, the rest as
    JSON text: TensorBoard's hparams take only scalars and strings)."""
    config = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
              for k, v in {**cfg.to_dict(), "domains": names}.items()}
    label = f"{cfg.row}-order{cfg.order}-seed{cfg.seed}"
    accelerator.init_trackers("cdap-bench", config=config, init_kwargs={
        "wandb": {"name": label}, "mlflow": {"run_name": label}})


def track_domain(accelerator: Accelerator, progress: RunRecord, names: list[str],
                 t: int) -> None:
    """After domain t: the MF1 and Acc matrices so far as markdown text, the general loss."""
    values: dict[str, Any] = {}
    for metric in ("mf1", "acc"):
        lines = ["| after domain / task | " + " | ".join(names[:t + 1]) + " |",
                 "|---" * (t + 2) + "|"]
        for s, row in enumerate(getattr(progress, metric)[:t + 1]):
            cells = ["–" if v is None else f"{v:.2f}" for v in row]
            lines.append(f"| {names[s]} | " + " | ".join(cells) + " |")
        values[f"A_{metric}"] = "\n".join(lines)
    if len(progress.general_mlm_loss) > t + 1:  # [0] is θ0's
        values["general_mlm_loss"] = progress.general_mlm_loss[t + 1]
    accelerator.log(values, step=t)


def new_record(cfg: RunConfig, suite, names: list[str], method: Method, base_s: float,
               base_fingerprint: str) -> RunRecord:
    return RunRecord(
        suite=cfg.suite, profile=cfg.profile, synthetic=bool(suite.synthetic), method=cfg.method,
        row=cfg.row, order=cfg.order, seed=cfg.seed, domains=names,
        needs_domain_id=bool(method.needs_domain_id), config=cfg.to_dict(), **environment(),
        base_fingerprint=base_fingerprint, base_name=shipped_name(base_fingerprint),
        protocol=cfg.eval,
        timings={"base_model_s": round(base_s, 3), "dap_s": [], "finetune_s": []})
