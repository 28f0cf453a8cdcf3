"""The base model θ0: a hub/local masked LM, or `syn-base`, pretrained here and cached.

`syn-base` is a small BERT pretrained deterministically on the synthetic suite's general corpus.
It is cached under the user cache dir (`--cache-dir` or `CDAP_CACHE`), keyed by a hash of its
spec and vocabulary, written atomically, and reused by every later run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
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

log = logging.getLogger(__name__)


def cache_dir(override: str | None = None) -> Path:
    if override:
        return Path(override)
    if os.environ.get("CDAP_CACHE"):
        return Path(os.environ["CDAP_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cdap-bench"


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


def load_base_model(suite, override: str = "", cache: str | None = None):
    """(model, tokenizer, seconds spent building it) for the suite's θ0."""
    source = override or suite.base_model
    if isinstance(source, str):
        tokenizer = AutoTokenizer.from_pretrained(source)
        # weights the checkpoint lacks (all-MiniLM-L6-v2 has no MLM head) are initialised at
        # random: fix them, so θ0 is the same in every run and process, and leave the run's RNG
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = AutoModelForMaskedLM.from_pretrained(source)
        return model, tokenizer, 0.0
    path = cache_dir(cache) / "models" / (
        f"{source['kind']}-{_fingerprint(source, suite.vocabulary, suite.pretrain_corpus['text'])}"
    )
    if (path / "config.json").exists():
        log.info("reusing cached base model %s", path)
        model = BertForMaskedLM.from_pretrained(path)
        return model, PreTrainedTokenizerFast.from_pretrained(path), 0.0
    start = time.perf_counter()
    model, tokenizer = pretrain_syn_base(suite, source)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("pretrained and cached base model at %s", path)
    return model, tokenizer, time.perf_counter() - start


def pretrain_syn_base(suite, spec: dict[str, Any]):
    from benchmark.training import pretrain_mlm

    tokenizer = word_tokenizer(suite.vocabulary)
    torch.manual_seed(0)
    model = BertForMaskedLM(syn_base_config(spec, len(tokenizer)))
    pretrain_mlm(model, tokenizer, suite.pretrain_corpus, steps=spec["pretrain_steps"],
                 batch_size=spec["pretrain_batch_size"], lr=spec["pretrain_lr"],
                 max_length=spec["max_length"], seed=0)
    return model, tokenizer
