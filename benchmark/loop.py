"""The continual loop: DAP-train domain after domain, fine-tune every seen task, fill A[t][i]."""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import shutil
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed

from benchmark.basemodel import load_base_model
from benchmark.checkpoint import (
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
    write_json_atomic,
)
from benchmark.config import ConfigError, RunConfig
from benchmark.context import Context
from benchmark.data import tokenize_task
from benchmark.training import (
    dap_train,
    domain_seed,
    finetune_and_test,
    mlm_eval_loss,
    warm_up_mlm_head,
)
from methods import build_method

log = logging.getLogger(__name__)
RESULT = "result.json"
PROGRESS = "progress.json"
PACKAGES = ("torch", "transformers", "datasets", "accelerate", "adapters", "peft", "tokenizers")


def run_dir_for(out: Path, cfg: RunConfig) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in cfg.row)
    return Path(out) / f"{cfg.suite}-{cfg.profile}" / safe / f"order{cfg.order}" / f"seed{cfg.seed}"


def environment() -> dict[str, Any]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"versions": versions, "git_commit": commit, "threads": torch.get_num_threads()}


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool, main: bool = True) -> None:
    """Refuse to clobber an earlier run unless asked; `--overwrite` removes it first.

    Every process checks; only the main one (`main`) removes or creates anything."""
    exists = (run_dir / RESULT).exists() or (run_dir / PROGRESS).exists()
    if exists and not (resume or overwrite):
        raise ConfigError(
            f"{run_dir} already holds a run; pass --resume to continue it or --overwrite to "
            "start it again")
    if main:
        if exists and overwrite:
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)


def _crash_point(stage: str, t: int) -> None:
    """Test hook: CDAP_CRASH_AT=stage:t kills the process there, like a `kill -9`."""
    if os.environ.get("CDAP_CRASH_AT") == f"{stage}:{t}":
        os._exit(137)


def run(cfg: RunConfig, suite, out: Path, resume: bool = False, overwrite: bool = False,
        cache: str | None = None, keep_checkpoint: bool = False,
        report_to: list[str] | None = None) -> dict[str, Any]:
    """Run one (suite, method, order, seed); return the result written to `result.json`.

    The last domain checkpoint is removed once the result is written, unless `keep_checkpoint`.
    `report_to` names Accelerate trackers for live tracking (files under run_dir/tracking).
    """
    run_dir = run_dir_for(out, cfg)
    if resume and (run_dir / RESULT).exists():
        log.info("%s is complete; nothing to resume", run_dir)
        return json.loads((run_dir / RESULT).read_text())
    names = suite.order(cfg.order)
    method = build_method(cfg.method, cfg.method_args)
    # under `accelerate launch` / `torchrun` every process runs this; only the main one writes
    tracking = {"log_with": report_to, "project_dir": str(run_dir / "tracking")} if report_to \
        else {}
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, kwargs_handlers=[
        DistributedDataParallelKwargs(find_unused_parameters=True)], **tracking)
    main = accelerator.is_main_process
    prepare_run_dir(run_dir, resume, overwrite, main)
    accelerator.wait_for_everyone()
    if report_to:  # live tracking: the resolved config first
        start_tracking(accelerator, cfg, names)

    started = time.perf_counter()
    with accelerator.main_process_first():
        model, tokenizer, base_seconds = load_base_model(suite, cfg.base_model, cache)
    model.to(accelerator.device)
    head_warmup = []
    if cfg.head_warmup_steps:
        head_warmup = warm_up_mlm_head(
            model, tokenizer, suite.domains[names[0]].corpus, cfg.head_warmup_steps,
            cfg.dap_batch_size, cfg.head_warmup_lr, cfg.max_length, cfg.mlm_probability)
    ctx = Context(config=cfg, suite=suite, domains=names, model=model, tokenizer=tokenizer,
                  accelerator=accelerator, run_dir=run_dir, _base=copy.deepcopy(model))
    method.setup(ctx)
    tasks = [suite.domains[n].task for n in names]
    splits = [(tokenize_task(task.train, tokenizer, cfg.max_length),
               tokenize_task(task.test, tokenizer, cfg.max_length)) for task in tasks]
    general = ctx.general_corpus()

    progress = _fresh_progress(cfg, suite, names, method, base_seconds)
    progress["head_warmup_loss"] = head_warmup
    if general is not None:
        progress["general_mlm_loss"].append(mlm_eval_loss(ctx, ctx.model, general))
    done_dap = -1
    checkpoint = find_checkpoint(run_dir) if resume else None
    if checkpoint is not None and (run_dir / PROGRESS).exists():
        meta = load_checkpoint(checkpoint, ctx.model, method)
        progress = json.loads((run_dir / PROGRESS).read_text())
        done_dap = meta["domain"]
        progress["resumed_at"].append(done_dap + 1)
        log.info("resuming %s after domain %d (%s)", run_dir, done_dap, names[done_dap])

    for t, name in enumerate(names):
        ctx.t = t
        if t > done_dap:
            dap_start = time.perf_counter()
            # hooks may use dropout or sampling (importance, Fisher): seed them per domain too
            set_seed(domain_seed(cfg.seed, 0, t))
            method.before_domain(ctx, t)
            plan = method.dap_plan(ctx, t)
            losses = dap_train(ctx, method, plan, t) if plan is not None else []
            _crash_point("dap", t)
            set_seed(domain_seed(cfg.seed, 3, t))
            method.after_domain(ctx, t)
            progress["dap_loss"].append(losses)
            progress["dap_steps"].append(plan.steps if plan is not None else 0)
            if general is not None:
                progress["general_mlm_loss"].append(mlm_eval_loss(ctx, ctx.model, general))
            progress["timings"]["dap_s"].append(round(time.perf_counter() - dap_start, 3))
            progress["mf1"].append([])
            progress["acc"].append([])
            progress["timings"]["finetune_s"].append([])
            if main:
                save_checkpoint(run_dir, ctx.model, method, {"domain": t, "name": name})
                write_json_atomic(run_dir / PROGRESS, progress)
        last_domain = t == len(names) - 1
        for i in range(len(progress["mf1"][t]), t + 1):
            if i < t and not last_domain and cfg.eval_matrix == "diagonal":
                mf1, acc, seconds = None, None, 0.0
            elif method.past_tasks_unchanged and i < t:
                mf1, acc, seconds = progress["mf1"][i][i], progress["acc"][i][i], 0.0
            else:
                train, test = splits[i]
                mf1, acc, seconds = finetune_and_test(
                    ctx, method.model_for_task(ctx, i), train, test, tasks[i].num_labels,
                    seed=domain_seed(cfg.seed, 2, t, i), desc=f"end task {names[i]} @ {name}",
                    epochs=tasks[i].epochs)
            if mf1 is not None and accelerator.trackers:  # live tracking: A[t][i] as it comes
                accelerator.log({f"mf1/{i}_{names[i]}": mf1, f"acc/{i}_{names[i]}": acc}, step=t)
            progress["mf1"][t].append(None if mf1 is None else round(mf1, 4))
            progress["acc"][t].append(None if acc is None else round(acc, 4))
            progress["timings"]["finetune_s"][t].append(round(seconds, 3))
            if main:
                write_json_atomic(run_dir / PROGRESS, progress)
            _crash_point("finetune", t)
        log.info("after %s: MF1 %s", name, progress["mf1"][t])
        if accelerator.trackers:  # live tracking: the A matrices so far, the general MLM loss
            track_domain(accelerator, progress, names, t)

    progress["timings"]["total_s"] = round(time.perf_counter() - started, 3)
    progress["finished"] = True
    accelerator.wait_for_everyone()
    if main:
        write_json_atomic(run_dir / RESULT, progress)
        (run_dir / PROGRESS).unlink(missing_ok=True)
        if not keep_checkpoint:
            shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)
    if report_to:
        accelerator.end_training()
    return progress


# -- live tracking (`run --report-to`): Accelerate's trackers, written by the main process ----

def start_tracking(accelerator: Accelerator, cfg: RunConfig, names: list[str]) -> None:
    """Start the trackers and store the resolved config (scalars as they are, the rest as
    JSON text: TensorBoard's hparams take only scalars and strings)."""
    config = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
              for k, v in {**cfg.to_dict(), "domains": names}.items()}
    label = f"{cfg.row}-order{cfg.order}-seed{cfg.seed}"
    accelerator.init_trackers("cdap-bench", config=config, init_kwargs={
        "wandb": {"name": label}, "mlflow": {"run_name": label}})


def track_domain(accelerator: Accelerator, progress: dict, names: list[str], t: int) -> None:
    """After domain t: the MF1 and Acc matrices so far as markdown text, the general loss."""
    values: dict[str, Any] = {}
    for metric in ("mf1", "acc"):
        lines = ["| after domain / task | " + " | ".join(names[:t + 1]) + " |",
                 "|---" * (t + 2) + "|"]
        for s, row in enumerate(progress[metric][:t + 1]):
            cells = ["–" if v is None else f"{v:.2f}" for v in row]
            lines.append(f"| {names[s]} | " + " | ".join(cells) + " |")
        values[f"A_{metric}"] = "\n".join(lines)
    if len(progress["general_mlm_loss"]) > t + 1:  # [0] is θ0's
        values["general_mlm_loss"] = progress["general_mlm_loss"][t + 1]
    accelerator.log(values, step=t)


def _fresh_progress(cfg: RunConfig, suite, names: list[str], method, base_s: float) -> dict:
    return {
        "suite": cfg.suite,
        "profile": cfg.profile,
        "synthetic": bool(suite.synthetic),
        "method": cfg.method,
        "row": cfg.row,
        "order": cfg.order,
        "seed": cfg.seed,
        "domains": names,
        "needs_domain_id": bool(method.needs_domain_id),
        "config": cfg.to_dict(),
        **environment(),
        "mf1": [],
        "acc": [],
        "dap_loss": [],
        "dap_steps": [],
        "general_mlm_loss": [],
        "timings": {"base_model_s": round(base_s, 3), "dap_s": [], "finetune_s": []},
        "resumed_at": [],
        "finished": False,
    }
