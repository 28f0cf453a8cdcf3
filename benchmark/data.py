"""Tokenisation, MLM masking and batching: dynamic padding, seeded masks, endless DAP streams."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain

import torch
from datasets import Dataset
from torch import Tensor
from torch.utils.data import DataLoader

from tasks import SuiteError


def _require_rows(data: Dataset, what: str) -> None:
    """An empty corpus or task split stops here, named, instead of training on nothing (an
    empty DAP stream would cycle forever)."""
    if len(data) == 0:
        files = [f["filename"] for f in data.cache_files]
        raise SuiteError(f"{what} is empty" + (f" ({files[0]})" if files else ""))


def tokenize_corpus(corpus: Dataset, tokenizer, max_length: int) -> Dataset:
    """Tokenise a `text` column into `input_ids` (special tokens added, truncated)."""
    _require_rows(corpus, "the corpus")

    def encode(batch):
        enc = tokenizer(batch["text"], truncation=True, max_length=max_length)
        return {"input_ids": enc["input_ids"]}

    keep = [c for c in corpus.column_names if c != "text"]
    return corpus.map(encode, batched=True, remove_columns=["text", *keep],
                      desc="tokenising corpus", load_from_cache_file=True)


def group_texts(corpus: Dataset, tokenizer, chunk_length: int) -> Dataset:
    """Tokenise a `text` column whole, concatenate it and cut it into chunks of `chunk_length`.

    The companion code's DAP sequences (ContinualLM `utils/data.py` l.110-123, applied in
    `posttrain.py` l.149-179): every text is tokenised with its special tokens and without
    truncation, the texts of each map batch of 1,000 are concatenated, and the concatenation is
    cut into full chunks, its remainder dropped (kept as one short chunk only where the batch
    holds less than one chunk). A chunk thus starts anywhere in a sentence and holds several.
    """
    _require_rows(corpus, "the corpus")

    def chunk(batch):
        flat = [i for ids in tokenizer(batch["text"])["input_ids"] for i in ids]
        total = len(flat)
        if total >= chunk_length:
            total = total // chunk_length * chunk_length
        return {"input_ids": [flat[i: i + chunk_length] for i in range(0, total, chunk_length)]}

    return corpus.map(chunk, batched=True, batch_size=1000, remove_columns=corpus.column_names,
                      desc=f"grouping texts in chunks of {chunk_length}",
                      load_from_cache_file=True)


def dap_sequences(corpus: Dataset, tokenizer, max_length: int, grouped: bool) -> Dataset:
    """A corpus as MLM training sequences: one per text, or grouped chunks of `max_length`."""
    if grouped:
        return group_texts(corpus, tokenizer, max_length)
    return tokenize_corpus(corpus, tokenizer, max_length)


def tokenize_task(split: Dataset, tokenizer, max_length: int, pair_input: str = "pair") -> Dataset:
    """Tokenise an end-task split (`text`, optional `text_pair`, `label`).

    A pair is the tokenizer's text pair (`pair_input: pair`; RoBERTa: `<s> a </s></s> b </s>`),
    or one text `a + ' ' + sep_token + b` (`companion`: ContinualLM dataloader/data.py
    l.180-181; RoBERTa: `<s> a </s>b </s>`, b's first word without its leading space)."""
    _require_rows(split, "an end-task split")

    def encode(batch):
        text, pair = batch["text"], batch.get("text_pair")
        if pair is not None and pair_input == "companion":
            text = [a + " " + tokenizer.sep_token + b for a, b in zip(text, pair, strict=True)]
            pair = None
        enc = tokenizer(text, pair, truncation=True, max_length=max_length)
        return {"input_ids": enc["input_ids"], "label": batch["label"]}

    drop = [c for c in split.column_names if c not in ("label",)]
    return split.map(encode, batched=True, remove_columns=drop, desc="tokenising task",
                     load_from_cache_file=True)


def skip_start(corpus: Dataset, share: float) -> Dataset:
    """`corpus` without its first `share` of rows, as `datasets` slices `train[P%:]` (P = 100 ·
    share; the start rounded to the closest row, ties to even, `datasets` ReadInstruction's
    default "closest" rounding)."""
    if share <= 0:
        return corpus
    start = int(round(float(share * 100) * len(corpus) / 100.0))
    return corpus.select(range(start, len(corpus)))


def pad(sequences: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(ids padded on the right with `pad_id`, attention mask), in one copy instead of one per
    row: collating a 248 x 164 DAP batch fell from 0.16 to 0.09 s (loaded 2-core CPU)."""
    lengths = torch.tensor([len(s) for s in sequences])
    mask = torch.arange(int(lengths.max())) < lengths[:, None]
    ids = torch.full(mask.shape, pad_id, dtype=torch.long)
    ids[mask] = torch.tensor(list(chain.from_iterable(sequences)), dtype=torch.long)
    return ids, mask.long()


class MLMCollator:
    """Pads a batch and masks it BERT-style (80 % [MASK], 10 % random, 10 % kept).

    Masks come from the collator's own generator so that they depend only on the seed, not on
    how much randomness the model's dropout consumed. Every sequence gets at least one masked
    token (short synthetic sentences would otherwise often have none). The unmasked inputs are
    kept as `clean_input_ids` for methods that need `h(x)` of the original text.
    """

    def __init__(self, tokenizer, probability: float, seed: int) -> None:
        self.tokenizer = tokenizer
        self.probability = probability
        self.generator = torch.Generator().manual_seed(seed)
        self.special = set(tokenizer.all_special_ids)
        # once: a fast tokenizer's len() builds its whole vocabulary map on every call (0.2 s
        # for 50,265 tokens on a loaded CPU, longer than a GPU DAP step at batch 248)
        self.vocab_size = len(tokenizer)

    def __call__(self, rows: list[dict]) -> dict[str, Tensor]:
        ids, mask = pad([r["input_ids"] for r in rows], self.tokenizer.pad_token_id)
        candidates = mask.bool().clone()
        for special in self.special:
            candidates &= ids != special
        draw = torch.rand(ids.shape, generator=self.generator)
        chosen = (draw < self.probability) & candidates
        # guarantee one masked token per sequence that has any candidate
        fallback = torch.where(candidates, draw, torch.full_like(draw, 2.0)).argmin(1)
        has_none = ~chosen.any(1) & candidates.any(1)
        chosen[has_none, fallback[has_none]] = True
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        masked = ids.clone()
        kind = torch.rand(ids.shape, generator=self.generator)
        masked[chosen & (kind < 0.8)] = self.tokenizer.mask_token_id
        random_tokens = torch.randint(self.vocab_size, ids.shape, generator=self.generator)
        swap = chosen & (kind >= 0.8) & (kind < 0.9)
        masked[swap] = random_tokens[swap]
        return {"input_ids": masked, "attention_mask": mask, "labels": labels,
                "clean_input_ids": ids}


def task_collate(pad_id: int):
    def collate(rows: list[dict]) -> dict[str, Tensor]:
        ids, mask = pad([r["input_ids"] for r in rows], pad_id)
        labels = torch.tensor([r["label"] for r in rows], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


def mlm_loader(data: Dataset, tokenizer, batch_size: int, probability: float, seed: int,
               shuffle: bool = True) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(data.with_format(None), batch_size=batch_size, shuffle=shuffle,
                      generator=generator, collate_fn=MLMCollator(tokenizer, probability, seed),
                      drop_last=shuffle and len(data) >= batch_size)


def endless(loader: DataLoader) -> Iterator[dict[str, Tensor]]:
    """Cycle through a loader epoch after epoch (each epoch reshuffled by its generator)."""
    while True:
        yield from loader
