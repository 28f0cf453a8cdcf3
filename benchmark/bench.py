"""`python -m benchmark bench`: DAP-step throughput, methods side by side.

For each method (default `ncl,das`) it prints seconds per DAP step, tokens per second, achieved
model TFLOP/s and MFU, peak memory, the ratio of every method to the first, and the DAS
importance passes (the KL proxy before the first domain, the domain importance after each)
timed apart, with their share of a domain's time and a projection of a whole DAP sequence.

The methods run in one process on the same model, batch and length, alternating (ncl, das, ncl,
das, ...) so that machine noise hits all of them; the figures are medians of `--repeats`, and
seconds per step are marginal (see FIXED_STEPS).

Model FLOPs, counted by hooks on the encoder and the LM head (`benchmark.compute.FlopCounter`,
the counter every run's compute record uses; so a method's extra passes, views, replay or
teacher forwards are counted as the method runs them), per call over T tokens of padded width s:

    encoder: k · T · (N_enc + 2 · layers · s · d)        k = 6 with gradient, 2 without
    LM head: k · R · N_head                               R = rows the head runs on

with N_enc the weights of the encoder's linear layers (embedding lookups, biases and LayerNorms
are not matmuls; 84.9 M of roberta-base's 124.7 M parameters), the attention term of Kaplan et
al. (2020, eq. 2.1: QKᵀ and AV), N_head the head's dense and decoder weights (run only on the
masked positions, `methods/modeling.py`). 6·N·T is one pass with
gradient; "passes" below is a method's encoder FLOPs over one such pass of the batch: `ncl`
makes 1, `das` 4 (one forward of [masked x; x; x; x], every view with gradient:
`methods/das.py`, `DAS.forward`). MFU = achieved FLOP/s over the device's dense peak for the
precision (`--peak-tflops`; known defaults for H100/H200 bf16/fp16). The test suite checks the
count against `torch.utils.flop_counter.FlopCounterMode`.

`--random-init` builds the model from `RobertaConfig()` (no hub access; `--size base` is
roberta-base's shape) and feeds random token ids of exactly `--seq-len` tokens: timings do not
depend on the weights or the text.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import math
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import psutil
import torch
from accelerate import Accelerator
from datasets import Dataset
from torch import nn

from benchmark.atomic import write_text_atomic
from benchmark.compute import FlopCounter
from benchmark.config import CHOICES, ConfigError, RunConfig, build_config
from benchmark.context import Context
from benchmark.dap import dap_train
from benchmark.record import package_versions
from methods import DapPlan, MethodError, available_methods, build_method
from methods.modeling import mlm_forward

log = logging.getLogger(__name__)

# Dense (no sparsity) tensor-core peaks, TFLOP/s, bf16 = fp16, from NVIDIA's H100/H200 data
# sheets. Matched against torch.cuda.get_device_name(), most specific name first.
PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H200 NVL", 835.0), ("H200", 989.0),
    ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0),
]

# --random-init model shapes; `base` is roberta-base (RobertaConfig() defaults, with the
# published checkpoint's 514 positions, one token type and LayerNorm eps 1e-5)
SIZES: dict[str, dict[str, int]] = {
    "base": {},
    "small": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4,
                  intermediate_size=1024),
    "tiny": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                 intermediate_size=128),
}
ROBERTA_SPECIALS = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}  # roberta-base's ids


# s/step is marginal: (time of FIXED_STEPS + N steps - time of FIXED_STEPS steps) / N, so what
# every dap_train call pays once (a new optimiser, Accelerate's free_memory: gc.collect and
# emptying the CUDA cache, the first allocations) drops out of the per-step figure
FIXED_STEPS = 2


class OutOfMemory(Exception):
    """The batch does not fit the device."""


# ---------------------------------------------------------------- the model and the data

def random_roberta(size: str, vocab_size: int = 50265, attn: str = "sdpa") -> nn.Module:
    """A randomly initialised RoBERTa masked LM of a named shape (seeded, no download)."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    config = RobertaConfig(vocab_size=vocab_size, max_position_embeddings=514, type_vocab_size=1,
                           layer_norm_eps=1e-5, **SIZES[size])
    config._attn_implementation = attn
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return RobertaForMaskedLM(config)


def random_tokenizer(vocab_size: int = 50265):
    """A tokenizer with roberta-base's special-token ids and vocabulary size, for the masking
    collator only (the bench feeds token ids, never text); <mask> is the last id as in
    roberta-base."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = dict(ROBERTA_SPECIALS)
    vocab.update({f"w{i}": i for i in range(len(vocab), vocab_size - 1)})
    vocab["<mask>"] = vocab_size - 1
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")


def random_corpus(rows: int, length: int, vocab_size: int, seed: int = 0) -> Dataset:
    """`rows` sequences of exactly `length` ids: <s> random ordinary tokens </s>."""
    gen = torch.Generator().manual_seed(seed)
    body = torch.randint(len(ROBERTA_SPECIALS), vocab_size - 1, (rows, length - 2), generator=gen)
    ids = torch.cat([torch.zeros(rows, 1, dtype=torch.long), body,
                     torch.full((rows, 1), 2, dtype=torch.long)], 1)
    return Dataset.from_dict({"input_ids": ids.tolist()})


# ---------------------------------------------------------------- counting and measuring

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


class PeakMemory:
    """Peak memory of the block: CUDA allocated bytes on a GPU, the process RSS on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.kind = "peak device memory" if self.cuda else "peak RSS"
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._rss = PeakRSS().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._rss.__exit__(*exc)
            self.peak = self._rss.peak


@dataclass
class CountingContext(Context):
    """A Context that counts the tokens of the DAP batches it hands out (padding included)."""

    tokens: int = 0
    width: int = 0

    def mlm_batches(self, data, seed, batch_size=None, shuffle=True):
        for batch in super().mlm_batches(data, seed, batch_size, shuffle):
            self.tokens += batch["input_ids"].numel()
            self.width = batch["input_ids"].shape[-1]
            yield batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(device: torch.device, fn) -> float:
    _sync(device)
    start = time.perf_counter()
    try:
        fn()
    except torch.cuda.OutOfMemoryError as err:
        raise OutOfMemory(str(err).splitlines()[0]) from None
    _sync(device)
    return time.perf_counter() - start


def default_peak_tflops(device: torch.device, precision: str) -> float | None:
    """The dense bf16/fp16 peak of a known GPU; None elsewhere (pass --peak-tflops)."""
    if device.type != "cuda" or precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_TFLOPS:
        if key in name:
            return peak
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


# ---------------------------------------------------------------- the measurement

def _setup(args: argparse.Namespace, accelerator: Accelerator):
    """(suite-like config defaults, base model, tokenizer, corpus, domains in a sequence)."""
    from tasks import load_suite

    if args.random_init:
        if args.suite == "das6":
            from tasks.real import DAS6_DEFAULTS as defaults
        else:
            defaults = load_suite(args.suite, args.profile, data_dir=args.data_dir).defaults
        length = args.seq_len or defaults.get("max_length", RunConfig.max_length)
        model = random_roberta(args.size, attn=args.attn)
        tokenizer = random_tokenizer(model.config.vocab_size)
        batch = args.batch or defaults.get("dap_batch_size", RunConfig.dap_batch_size)
        rows = max(4 * batch, batch * (args.steps + 4))  # never the same batch twice in a repeat
        corpus = random_corpus(rows, length, model.config.vocab_size)
        return defaults, model, tokenizer, corpus, 6, None
    from benchmark.basemodel import load_base_model

    suite = load_suite(args.suite, args.profile, data_dir=args.data_dir)
    model, tokenizer, _ = load_base_model(suite, args.base_model or "", args.cache_dir)
    if args.attn and hasattr(model.config, "_attn_implementation"):
        model.config._attn_implementation = args.attn
    return suite.defaults, model, tokenizer, None, len(suite.order(0)), suite


def _warm_up(ctx: Context) -> None:
    """One untimed MLM pass with gradient, so that kernel and library set-up (cuBLAS, autocast
    casts, the first allocations) is not charged to the importance pass timed next."""
    batch = next(ctx.mlm_batches(ctx.corpus(0), 0))
    with ctx.accelerator.autocast():
        loss = mlm_forward(ctx.model, batch).loss
    loss.backward()
    ctx.model.zero_grad(set_to_none=True)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Time `args.methods` side by side; a dict of every figure the report prints."""
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    device = accelerator.device
    defaults, base, tokenizer, corpus, n_domains, suite = _setup(args, accelerator)
    flags = {"dap_batch_size": args.batch, "max_length": args.seq_len,
             "mixed_precision": args.mixed_precision}
    full = build_config(defaults, {}, {**flags, "method": "ncl"}, "bench")
    timed_batches = min(args.importance_batches or full.importance_batches,
                        full.importance_batches)
    out: dict[str, Any] = {
        "device": device_name(device), "device_type": device.type,
        "precision": args.mixed_precision,
        "autocast": accelerator.native_amp or args.mixed_precision == "no",
        "batch": full.dap_batch_size, "seq_len": full.max_length, "steps": args.steps,
        "repeats": args.repeats, "dap_steps": full.dap_steps, "domains": n_domains,
        "importance_batches": full.importance_batches, "importance_timed": timed_batches,
        "importance_batch": full.importance_batch_size,
        "model_params": sum(p.numel() for p in base.parameters()),
        "random_init": args.random_init, "suite": args.suite, "methods": {},
    }
    if args.global_batch:
        out["accumulation"] = math.ceil(args.global_batch / full.dap_batch_size)
    with TemporaryDirectory() as tmp:
        runs = {}
        for name in args.methods:
            cfg = build_config(defaults, {}, {**flags, "method": name,
                                              "importance_batches": timed_batches}, "bench")
            model = copy.deepcopy(base).to(device)
            if suite is not None:
                ctx = CountingContext(config=cfg, suite=suite, domains=suite.order(0),
                                      model=model, tokenizer=tokenizer, accelerator=accelerator,
                                      run_dir=Path(tmp) / name, _base=base)
            else:
                ctx = CountingContext(config=cfg, suite=None, domains=["random"], model=model,
                                      tokenizer=tokenizer, accelerator=accelerator,
                                      run_dir=Path(tmp) / name, _base=base,
                                      _corpora={0: corpus})
            method = build_method(name)
            method.setup(ctx)
            _warm_up(ctx)
            seconds = _timed(device, lambda m=method, c=ctx: m.before_domain(c, 0))
            runs[name] = (ctx, method, FlopCounter(ctx.model))
            out["methods"][name] = {"s_per_step": [], "peak_bytes": 0, "before_domain_s": seconds}
        for ctx, method, _ in runs.values():  # warm-up: first steps pay allocations
            _timed(device, lambda c=ctx, m=method: dap_train(c, m, DapPlan(c.corpus(0), 1), 0))
        gc.freeze()  # the loop's free_memory() collects garbage: not over every module's objects
        for _ in range(args.repeats):
            for name, (ctx, method, flops) in runs.items():
                def steps(n: int, c=ctx, m=method) -> float:
                    return _timed(device, lambda: dap_train(c, m, DapPlan(c.corpus(0), n), 0))

                short = steps(FIXED_STEPS)
                ctx.tokens, ctx.width = 0, 0
                flops.reset()
                with PeakMemory(device) as memory:
                    long = steps(FIXED_STEPS + args.steps)
                done = FIXED_STEPS + args.steps
                row = out["methods"][name]
                marginal = (long - short) / args.steps
                if marginal <= 0:  # noise above the timed steps: whole-call time instead
                    log.warning("%s: timing noise exceeds %d steps; raise --steps", name,
                                args.steps)
                    marginal = long / done
                row["s_per_step"].append(marginal)
                row["peak_bytes"] = max(row["peak_bytes"], memory.peak)
                row["memory_kind"] = memory.kind
                row["tokens_per_step"] = ctx.tokens / done
                row["flops_per_step"] = flops.flops / done
                row["encoder_flops_per_step"] = flops.encoder_flops / done
                row["passes"] = flops.encoder_flops / flops.one_pass(ctx.tokens, ctx.width)
        gc.unfreeze()
        ctx = next(iter(runs.values()))[0]  # the input pipeline alone: collate, mask, copy
        batches = ctx.mlm_batches(ctx.corpus(0), 0)
        next(batches)
        out["data_s_per_step"] = _timed(
            device, lambda: [next(batches) for _ in range(args.steps)]) / args.steps
        for name, (ctx, method, flops) in runs.items():
            flops.remove()
            row = out["methods"][name]
            row["after_domain_s"] = _timed(device, lambda c=ctx, m=method: m.after_domain(c, 0))
    return out


# ---------------------------------------------------------------- the report

def report(res: dict[str, Any], peak_tflops: float | None) -> list[str]:
    """The printed lines: one per method, ratios, importance, the sequence projection."""
    lines = [f"device: {res['device']}; torch {torch.__version__}; precision "
             f"{res['precision']}" + ("" if res["autocast"] else
                                      " (NOT available on this device: ran in fp32)")]
    model = "random-init RoBERTa" if res["random_init"] else "the suite's base model"
    lines.append(f"suite {res['suite']}, {model} ({res['model_params'] / 1e6:.1f} M params), "
                 f"batch {res['batch']} x {res['seq_len']} tokens, "
                 f"{res['repeats']} x {res['steps']} timed steps (median)")
    accumulation = res.get("accumulation", 1)
    if accumulation > 1:
        lines.append(f"global batch: {accumulation} micro-batches of {res['batch']} per "
                     "optimiser step (s/step below is per micro-batch; projections x"
                     f"{accumulation})")
    peak = peak_tflops * 1e12 if peak_tflops else None
    first = None
    for name, row in res["methods"].items():
        step = statistics.median(row["s_per_step"])
        row["median_s"] = step
        achieved = row["flops_per_step"] / step
        mfu = f"MFU {100 * achieved / peak:5.1f} %" if peak else "MFU n/a"
        first = first or (name, step)
        lines.append(
            f"{name:6s} {step:8.4f} s/step  {row['tokens_per_step'] / step:10.0f} tokens/s  "
            f"{row['passes']:.2f} passes  {row['flops_per_step'] / 1e12:.3g} TFLOP/step  "
            f"{achieved / 1e12:.3g} TFLOP/s  {mfu}  "
            f"{row['memory_kind']} {row['peak_bytes'] / 2**20:.0f} MiB")
    for name, row in list(res["methods"].items())[1:]:
        lines.append(f"{name} / {first[0]} seconds per step: {row['median_s'] / first[1]:.2f}x")
    lines.append(f"input pipeline (collate + mask + copy, in the main process, inside every "
                 f"step above): {res['data_s_per_step']:.4f} s/step")
    if not peak:
        lines.append("MFU: pass --peak-tflops (the device's dense peak at this precision)")
    for name in res["methods"]:
        if _timed_passes(name):
            lines += _pass_lines(res, name, accumulation)
    lines += _projection_lines(res, accumulation)
    return lines


def _timed_passes(name: str) -> dict[str, str] | None:
    """The passes a method declares outside its DAP steps (`Method.timed_passes`), or None."""
    return available_methods()[name].timed_passes


def _pass_lines(res: dict[str, Any], name: str, accumulation: int) -> list[str]:
    """The method's passes before the first domain and after each (`before_domain_s`,
    `after_domain_s`, scaled to the config's batch count), and their share of the DAP time."""
    passes = _timed_passes(name)
    row = res["methods"][name]
    scale = res["importance_batches"] / res["importance_timed"]
    kl, domain = row["before_domain_s"] * scale, row["after_domain_s"] * scale
    dap = row["median_s"] * accumulation * res["dap_steps"]
    n = res["domains"]
    measured = (f"{res['importance_batches']} batches of "
                f"{res.get('importance_batch', res['batch'])} sequences")
    if scale != 1:
        measured += f"; timed on {res['importance_timed']}, scaled x{scale:g}"
    row["importance"] = {"kl_proxy_s": kl, "domain_s": domain, "dap_domain_s": dap}
    share_domain = domain / (dap + domain)
    share_sequence = (kl + n * domain) / (kl + n * (dap + domain))
    return [
        f"{passes['label']} ({measured}): {passes['before']} {kl:.2f} s (once), "
        f"{passes['after']} {domain:.2f} s (after each domain)",
        f"{passes['label']} share: {100 * share_domain:.1f} % of a domain's {name.upper()} time "
        f"({res['dap_steps']} steps), {100 * share_sequence:.1f} % of a {n}-domain sequence "
        "(target <= 5 %)",
    ]


def _projection_lines(res: dict[str, Any], accumulation: int) -> list[str]:
    n, steps = res["domains"], res["dap_steps"]
    parts = []
    included = set()
    for name, row in res["methods"].items():
        total = n * steps * row["median_s"] * accumulation
        if "importance" in row:
            imp = row["importance"]
            total += imp["kl_proxy_s"] + n * imp["domain_s"]
            included.add(_timed_passes(name)["label"])
        row["projected_sequence_s"] = total
        parts.append(f"{name} {total / 3600:.2f} h")
    return [f"projected DAP time of a {n}-domain sequence ({steps} steps per domain"
            + "".join(f", {label} included" for label in sorted(included)) + "): "
            + ", ".join(parts)]


# ---------------------------------------------------------------- the command

def _methods(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    known = available_methods()
    bad = [m for m in names if m not in known]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {bad}; valid: {', '.join(known)}" if bad else "no method given")
    return names


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmark bench",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="syn6", help="suite whose config (and, without "
                   "--random-init, base model and first corpus) is used (default syn6)")
    p.add_argument("--profile", default="default", help="suite profile (default: default)")
    p.add_argument("--methods", type=_methods, default=["ncl", "das"],
                   help="comma-separated methods; ratios are to the first (default ncl,das)")
    p.add_argument("--steps", type=int, default=20, help="timed DAP steps per repeat (20)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; median (3)")
    p.add_argument("--batch", type=int, help="DAP batch (default: the suite's dap_batch_size)")
    p.add_argument("--global-batch", type=int,
                   help="optimiser batch reached by accumulating --batch micro-batches "
                        "(projections scale by the micro-batch count)")
    p.add_argument("--seq-len", type=int, help="sequence length (default: max_length)")
    p.add_argument("--mixed-precision", default="no", choices=CHOICES["mixed_precision"],
                   help="autocast (fp16 with loss scaling; CUDA only for fp16)")
    p.add_argument("--random-init", action="store_true",
                   help="a random RoBERTa from RobertaConfig() and random token ids (no download)")
    p.add_argument("--size", default="base", choices=list(SIZES),
                   help="--random-init shape: base = roberta-base, small 4x256, tiny 2x64")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"],
                   help="attention implementation (default sdpa)")
    p.add_argument("--importance-batches", type=int,
                   help="time this many importance batches and scale to the config's count")
    p.add_argument("--peak-tflops", type=float,
                   help="the device's dense peak TFLOP/s at this precision, for MFU (default: "
                        "known for H100/H200 in bf16/fp16)")
    p.add_argument("--base-model", help="a hub id or local folder overriding the suite's model")
    p.add_argument("--data-dir", help="data files of real suites (das6: the archive's data/)")
    p.add_argument("--cache-dir", help="model cache (default $CDAP_CACHE)")
    p.add_argument("--json", help="also write every figure to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    for name in ("steps", "repeats", "batch", "seq_len", "global_batch", "importance_batches"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.seq_len is not None and args.seq_len < 3:
        p.error("--seq-len must be at least 3 (<s>, one token, </s>)")
    from tasks import SuiteError

    try:
        res = measure(args)
    except (ConfigError, MethodError, SuiteError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OutOfMemory as err:
        print(f"error: batch {args.batch} does not fit the device ({err}); pass a smaller "
              "--batch with --global-batch", file=sys.stderr)
        return 3
    peak = args.peak_tflops or default_peak_tflops(torch.device(res["device_type"]),
                                                    args.mixed_precision)
    lines = report(res, peak)
    print("\n".join(lines))
    if args.json:
        res["peak_tflops"] = peak
        res["command"] = "python -m benchmark bench " + " ".join(argv or sys.argv[2:])
        res["versions"] = versions()
        write_text_atomic(Path(args.json), json.dumps(res, indent=1, default=str) + "\n")
    return 0


def versions() -> dict[str, str | None]:
    out = package_versions(("torch", "transformers", "accelerate", "datasets"))
    out["cuda"] = torch.version.cuda
    return out
