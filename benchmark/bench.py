"""`python -m benchmark bench`: seconds per DAP step and peak memory, NCL against DAS.

Both methods run in one process on the same suite, base model, batch size and sequence length,
alternating (ncl, das, ncl, das, ...) so that machine noise hits both; the figures are medians.
It also times one importance computation and states it as a share of a domain's DAP time.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import threading
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import psutil
import torch
from accelerate import Accelerator

from benchmark.basemodel import load_base_model
from benchmark.config import build_config
from benchmark.context import Context
from benchmark.training import dap_train
from methods import DapPlan, build_method
from tasks import load_suite


class PeakRSS:
    """Highest resident memory of this process while the block runs, sampled every 5 ms."""

    def __enter__(self) -> PeakRSS:
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def _context(cfg, suite, model, tokenizer, run_dir: Path) -> Context:
    return Context(config=cfg, suite=suite, domains=suite.order(cfg.order), model=model,
                   tokenizer=tokenizer, accelerator=Accelerator(), run_dir=run_dir,
                   _base=model)


def measure(suite_name: str, profile: str, steps: int, repeats: int, cache: str | None) -> dict:
    suite = load_suite(suite_name, profile)
    base, tokenizer, _ = load_base_model(suite, cache=cache)
    out: dict = {"ncl": [], "das": [], "peak_mb": {}, "importance_s": {}}
    with TemporaryDirectory() as tmp:
        contexts, methods = {}, {}
        for name in ("ncl", "das"):
            cfg = build_config(suite.defaults, {"method": name})
            contexts[name] = _context(cfg, suite, copy.deepcopy(base), tokenizer, Path(tmp) / name)
            methods[name] = build_method(name)
            methods[name].setup(contexts[name])
        das_ctx, das = contexts["das"], methods["das"]
        start = time.perf_counter()
        das.before_domain(das_ctx, 0)  # the KL-proxy general importance
        out["importance_s"]["kl_proxy"] = time.perf_counter() - start
        methods["ncl"].before_domain(contexts["ncl"], 0)
        for name in ("ncl", "das"):  # warm-up: first steps pay allocation costs
            dap_train(contexts[name], methods[name], DapPlan(contexts[name].corpus(0), 3), 0)
        for _ in range(repeats):
            for name in ("ncl", "das"):
                with PeakRSS() as rss:
                    start = time.perf_counter()
                    dap_train(contexts[name], methods[name],
                              DapPlan(contexts[name].corpus(0), steps), 0)
                    out[name].append((time.perf_counter() - start) / steps)
                out["peak_mb"][name] = max(out["peak_mb"].get(name, 0), rss.peak / 2**20)
        start = time.perf_counter()
        das.after_domain(das_ctx, 0)  # the domain's MLM importance
        out["importance_s"]["mlm"] = time.perf_counter() - start
        out["config"] = das_ctx.config
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark bench", description=__doc__)
    parser.add_argument("--suite", default="syn6")
    parser.add_argument("--profile", default="default")
    parser.add_argument("--steps", type=int, default=20, help="timed DAP steps per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-dir")
    args = parser.parse_args(argv)
    if args.steps <= 0 or args.repeats <= 0:
        parser.error("--steps and --repeats must be positive")
    res = measure(args.suite, args.profile, args.steps, args.repeats, args.cache_dir)
    cfg = res["config"]
    ncl, das = statistics.median(res["ncl"]), statistics.median(res["das"])
    domain_das = das * cfg.dap_steps
    importance = res["importance_s"]["mlm"]
    print(f"suite {args.suite}/{args.profile}: batch {cfg.dap_batch_size}, max length "
          f"{cfg.max_length}, {torch.get_num_threads()} threads, {args.repeats}×{args.steps} steps")
    print(f"ncl  s/step {ncl:.4f}   peak RSS {res['peak_mb']['ncl']:.0f} MB")
    print(f"das  s/step {das:.4f}   peak RSS {res['peak_mb']['das']:.0f} MB")
    print(f"das / ncl seconds per step: {das / ncl:.2f}x")
    print(f"importance: KL proxy {res['importance_s']['kl_proxy']:.2f} s, domain MLM "
          f"{importance:.2f} s ({cfg.importance_batches} batches)")
    print(f"domain importance / (a domain's DAS DAP time of {cfg.dap_steps} steps + importance): "
          f"{100 * importance / (domain_das + importance):.1f} %")
    return 0
