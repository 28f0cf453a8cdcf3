"""The base model θ0: a hub/local masked LM, or `syn-base`, pretrained here and cached.

`syn-base` is a small BERT pretrained deterministically on the synthetic suite's general corpus.
It is pretrained on one thread whatever the run's thread count: PyTorch's CPU kernels split
reductions differently with the number of threads, and 800 steps turn those last-bit
differences into a different θ0 (general MLM loss 1.71611 at 1 thread against 1.71621 at 2),
which moves a seed's average MF1 by 2–3 points. The CPU's instruction set does the same: MKL and
ATen dispatch to other kernels on another CPU, so a θ0 rebuilt on another kind of machine differs
(the syn6 θ0 of the committed tables, ca5e9c4d…, is what AMD EPYC machines with AVX2 build; on
an AVX512+AMX Xeon the same code gives 008dc1bc…, and 7c66c6e1… with `ATEN_CPU_CAPABILITY=avx2
MKL_CBWR=AVX2`; none of six kernel settings tried there gave ca5e9c4d…; an AVX512 AMD EPYC
builds 001f53bb… by default, dd00b09c… with `ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2
ONEDNN_MAX_CPU_ISA=AVX2`, and ca5e9c4d… with `--pin-kernels`, `benchmark/kernels.py`: what the
shipped syn6-default is). Tables therefore come
from one θ0 (`tables.py` warns when they mix), and every result and cached θ0 records the CPU
(`cpu_description`) and kernel setting (`benchmark/kernels.py`).

So the synthetic suites' θ0s are shipped as files: `benchmark/theta0/NAME.safetensors`, one per
suite and profile, listed in `benchmark/theta0/manifest.json` with the build key they were made
for (a hash of the spec, vocabulary, corpus and `BUILD`), the file's sha256, θ0's fingerprint and
the CPU that built them. `load_base_model` loads the shipped file whenever the suite's build key
is one the manifest lists (checking both hashes), so every machine starts from the same bits; a
result records the shipped θ0's name (`base_name`) beside its fingerprint. With
`CDAP_THETA0=build`, or for a spec no shipped file matches, θ0 is pretrained here as before:
cached under the user cache dir (`--cache-dir` or `CDAP_CACHE`), keyed by the build key, written
atomically with its fingerprint (`fingerprint`: sha256 of the state dict, recorded in every
result), checked against that fingerprint when reused, and rebuilt if damaged.
`python -m benchmark base build` pretrains one and says whether this machine rebuilds the shipped
bits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoModelForMaskedLM,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    PreTrainedTokenizerFast,
)

from benchmark.atomic import atomic_path, read_json, write_json_atomic
from benchmark.config import ConfigError, cache_root
from benchmark.kernels import kernel_setting
from benchmark.protocol import stream_seed
from tasks.files import sha256_file

log = logging.getLogger(__name__)
# bumped when the way syn-base is built changes, so older cached builds are not reused
# (2: pretrained on one thread)
BUILD = 2
FINGERPRINT = "fingerprint.json"
SHIPPED = Path(__file__).parent / "theta0"  # the shipped θ0 files and their manifest
MANIFEST = "manifest.json"
SHIPPED_ENV = "CDAP_THETA0"  # "build": pretrain θ0 here even where a shipped file matches
cache_dir = cache_root  # the old name


def cpu_description() -> str:
    """The CPU model and the kernel set PyTorch dispatches to, e.g. "AVX512 amx; Intel(R) Xeon(R)".

    θ0's bits (syn-base is pretrained here) depend on it: MKL and ATen pick other kernels on
    another instruction set, and the rounding differences grow over 800 steps into another θ0."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    extra = " amx" if "amx_tile" in flags else ""
    return f"{torch.backends.cpu.get_cpu_capability()}{extra}; {model}"


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 over θ0's state dict (names, dtypes, shapes and bytes), hex."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@contextmanager
def single_thread():
    """Run the block on one intra-op thread, then restore the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def check_base_model(source: Any) -> None:
    """A base model given as a local folder must exist (checked before anything is written)."""
    if isinstance(source, str) and looks_like_path(source):
        folder = Path(source).expanduser()
        if not (folder / "config.json").is_file():
            what = "has no config.json" if folder.is_dir() else "does not exist"
            raise ConfigError(f"base model folder {source} {what}")


def word_tokenizer(vocabulary: list[str]) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer with BERT's special tokens, for the synthetic suite."""
    vocab = {word: i for i, word in enumerate(vocabulary)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )


def syn_base_config(spec: dict[str, Any], vocab_size: int) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=spec["hidden"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        intermediate_size=spec["intermediate"],
        max_position_embeddings=max(64, spec["max_length"]),
        type_vocab_size=2,
    )


def _fingerprint(spec: dict[str, Any], vocabulary: list[str], texts: list[str]) -> str:
    header = json.dumps({"spec": spec, "vocab": vocabulary}, sort_keys=True)
    digest = hashlib.sha256(header.encode())
    for text in texts:
        digest.update(text.encode() + b"\n")
    return digest.hexdigest()[:16]


def build_key(suite) -> str | None:
    """The hash that names the suite's syn-base build: its spec, vocabulary, corpus and `BUILD`
    (None for hub / local models)."""
    source = suite.base_model
    if isinstance(source, str):
        return None
    return _fingerprint({**source, "build": BUILD}, suite.vocabulary,
                        suite.pretrain_corpus["text"])


def cached_path(suite, cache: str | None = None) -> Path | None:
    """Where the suite's syn-base build is cached (None for hub / local models)."""
    key = build_key(suite)
    if key is None:
        return None
    return cache_root(cache) / "models" / f"{suite.base_model['kind']}-{key}"


def shipped_manifest(folder: Path = SHIPPED) -> dict[str, dict[str, Any]]:
    """Name -> entry of every shipped θ0 (`{}` when the folder has no manifest)."""
    path = folder / MANIFEST
    return read_json(path) if path.is_file() else {}


def shipped_for(suite, folder: Path = SHIPPED) -> tuple[str, dict[str, Any]] | None:
    """(name, manifest entry) of the shipped θ0 built for exactly this suite's spec, if any."""
    key = build_key(suite)
    if key is None:
        return None
    for name, entry in shipped_manifest(folder).items():
        if entry.get("key") == key:
            return name, entry
    return None


def shipped_name(sha: str | None) -> str | None:
    """The name of the shipped θ0 whose fingerprint is `sha` (None: not a shipped θ0)."""
    return next((name for name, entry in shipped_manifest().items()
                 if sha and entry.get("sha256") == sha), None)


def use_shipped() -> bool:
    """False where `CDAP_THETA0=build` asks to pretrain θ0 here instead of loading the file."""
    return os.environ.get(SHIPPED_ENV, "").strip().lower() != "build"


def shipped_used(suite) -> bool:
    """Whether `load_base_model` will load a shipped file for the suite (no cache needed)."""
    return use_shipped() and shipped_for(suite) is not None


def load_shipped(suite, name: str, entry: dict[str, Any], folder: Path = SHIPPED):
    """(model, tokenizer) from the shipped file, checked against both recorded hashes.

    The model is built from the suite's spec under a forked RNG (loading leaves the caller's
    random state as `from_pretrained` does) and its weights read with safetensors."""
    from safetensors.torch import load_model

    path = folder / entry["file"]
    damaged = f"shipped base model θ0 {name} ({path})"
    if not path.is_file() or sha256_file(path) != entry["file_sha256"]:
        raise ConfigError(f"{damaged} is missing or damaged: reinstall the package, or set "
                          f"{SHIPPED_ENV}=build to pretrain θ0 here")
    tokenizer = word_tokenizer(suite.vocabulary)
    with torch.random.fork_rng(devices=[]):
        model = BertForMaskedLM(syn_base_config(suite.base_model, len(tokenizer)))
    load_model(model, str(path))
    model.tie_weights()
    model.eval()
    # the config as `from_pretrained` leaves it on a cached build
    model.config.architectures, model.config.dtype = [type(model).__name__], torch.float32
    if fingerprint(model) != entry["sha256"]:
        raise ConfigError(f"{damaged}: its weights do not match the manifest's fingerprint")
    log.info("loaded the shipped base model θ0 %s (fingerprint %s)", name, entry["sha256"][:12])
    return model, tokenizer


def write_shipped(model: torch.nn.Module, suite, name: str, folder: Path) -> dict[str, Any]:
    """Write θ0 as `folder/NAME.safetensors` and its manifest entry (what `base build --write`
    does; the shipped files were made so). Returns the entry."""
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.safetensors"
    with atomic_path(path) as tmp:
        save_model(model, str(tmp))
    entry = {"file": path.name, "suite": suite.name, "profile": suite.profile,
             "key": build_key(suite), "build": BUILD, "sha256": fingerprint(model),
             "file_sha256": sha256_file(path), "bytes": path.stat().st_size,
             "cpu": cpu_description(), "kernels": kernel_setting(),
             "torch": torch.__version__}
    manifest = {**shipped_manifest(folder), name: entry}
    write_json_atomic(folder / MANIFEST, dict(sorted(manifest.items())))
    return entry


def load_base_model(suite, override: str = "", cache: str | None = None,
                    shipped: bool | None = None):
    """(model, tokenizer, seconds spent building it) for the suite's θ0.

    `shipped`: load the shipped file where one matches the suite's spec (None: unless
    `CDAP_THETA0=build`); False pretrains (or reuses the cached pretraining)."""
    source = override or suite.base_model
    if isinstance(source, str):
        check_base_model(source)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            # weights the checkpoint lacks (all-MiniLM-L6-v2 has no MLM head) are initialised
            # at random: fix them, so θ0 is the same in every run and process, and leave the
            # run's RNG
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(stream_seed("theta0", 0))
                model = AutoModelForMaskedLM.from_pretrained(source)
        except OSError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"base model {source!r} cannot be loaded: {first}") from None
        return model, tokenizer, 0.0
    match = shipped_for(suite) if (use_shipped() if shipped is None else shipped) else None
    if match is not None:
        return (*load_shipped(suite, *match), 0.0)
    path = cached_path(suite, cache)
    if (path / FINGERPRINT).exists():
        try:
            model = BertForMaskedLM.from_pretrained(path)
            tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
            stored = read_json(path / FINGERPRINT)["sha256"]
            if fingerprint(model) != stored:
                raise ValueError("its weights do not match their fingerprint")
            log.info("reusing cached base model %s", path)
            return model, tokenizer, 0.0
        except Exception as err:  # noqa: BLE001 - any damage to the cache means: rebuild it
            log.warning("cached base model %s is damaged (%s); rebuilding it", path,
                        str(err).splitlines()[0] if str(err) else type(err).__name__)
            shutil.rmtree(path, ignore_errors=True)
    start = time.perf_counter()
    with single_thread():
        model, tokenizer = pretrain_syn_base(suite, source)
    sha = fingerprint(model)
    with atomic_path(path, keep_existing=True) as tmp:  # another process may finish first
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / FINGERPRINT, {"sha256": sha, "build": BUILD,
                                                  "cpu": cpu_description(),
                                                  "kernels": kernel_setting()})
    log.info("pretrained and cached base model at %s (fingerprint %s)", path, sha[:12])
    return model, tokenizer, time.perf_counter() - start


def pretrain_syn_base(suite, spec: dict[str, Any]):
    from benchmark.mlm import pretrain_mlm

    tokenizer = word_tokenizer(suite.vocabulary)
    seed = stream_seed("theta0", 0)
    torch.manual_seed(seed)
    model = BertForMaskedLM(syn_base_config(spec, len(tokenizer)))
    pretrain_mlm(model, tokenizer, suite.pretrain_corpus, steps=spec["pretrain_steps"],
                 batch_size=spec["pretrain_batch_size"], lr=spec["pretrain_lr"],
                 max_length=spec["max_length"], seed=seed)
    return model, tokenizer
