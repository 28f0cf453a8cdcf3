"""The `probe` end-task protocol: a linear read-out of the frozen encoder, beside fine-tuning.

`run --eval probe` fills A[t][i] with `probe_and_test` in place of `finetune_and_test`: the
encoder after domain t is frozen, every train and test example of task i is embedded once, and
scikit-learn's logistic regression is fitted on all training examples. It costs one forward pass
per example and has no learning-rate schedule to get wrong; with balanced class weights it does
not settle on the majority class the way a 45-step fine-tuning does (a cell that does is still
flagged, as for fine-tuning), so it measures what the DAP-trained representation holds at CPU
cost. It is not the paper's protocol: the paper's numbers
(SETTING.md) come from fine-tuning the whole encoder (`eval: finetune`, the default).

Readout (`probe_pooling`): `mean` (default) is the attention-masked mean of the last hidden
states; `first` is the first token's state ([CLS] / `<s>`), the one the stock heads of
`AutoModelForSequenceClassification` read (finetune.py `task_model`). The default is `mean`
because a frozen masked LM's first-token state is not trained to summarise the input: MLM never
masks it, RoBERTa has no next-sentence task, and BERT's pooler is missing from MLM
checkpoints, so the stock head relies on fine-tuning to make [CLS] useful. The token states that
MLM (and with it DAP-training) does train are read by the mean; all-MiniLM-L6-v2, real6's
encoder, was itself trained for mean pooling.

Classifier: features standardised, `LogisticRegressionCV` with class_weight="balanced" (real6's
tasks are skewed: ChemProt's majority class is a third of it), C chosen from a small grid by
stratified k-fold CV on the training split scored by macro-F1 (the table's metric). The suites'
`EndTask` carries no dev split (the paper's resplit merges dev into test, tasks/splits.py), so
the C search is internal to train. Folds: 5, fewer when the rarest class has fewer examples.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch
from datasets import Dataset
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.metrics import f1_score, make_scorer
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn
from tqdm.auto import tqdm

from benchmark.compute import uncounted
from benchmark.data import task_collate
from benchmark.finetune import CellScore
from benchmark.metrics import accuracy, macro_f1

log = logging.getLogger(__name__)
C_GRID = [0.001, 0.01, 0.1, 1.0, 10.0]
MAX_FOLDS = 5
EMBED_BATCH = 64
# macro-F1 as a scorer object, not the string "f1_macro": with the string, scikit-learn 1.9's
# LogisticRegressionCV raises a TypeError on binary tasks (a 1.9 regression, open as
# scikit-learn/scikit-learn#34531); the object scores the same
MACRO_F1 = make_scorer(f1_score, average="macro")


@torch.no_grad()
def embed(encoder: nn.Module, data: Dataset, pad_id: int, pooling: str, device: torch.device,
          desc: str = "embedding", count: Callable[[int], None] | None = None) -> np.ndarray:
    """One vector per example of tokenised `data` (rows in their order), the encoder frozen;
    `count` is told the tokens of every batch.

    Examples are batched by length (little padding), then put back in order."""
    was_training = encoder.training
    encoder.eval()
    lengths = [len(ids) for ids in data["input_ids"]]
    order = np.argsort(lengths, kind="stable")
    collate = task_collate(pad_id)
    rows = data.with_format(None)
    chunks = []
    for start in tqdm(range(0, len(order), EMBED_BATCH), desc=desc, leave=False):
        batch = collate([rows[int(j)] for j in order[start:start + EMBED_BATCH]])
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        if count is not None:
            count(ids.numel())
        output = encoder(input_ids=ids, attention_mask=mask)
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        if pooling == "first":
            vectors = hidden[:, 0]
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            vectors = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        chunks.append(vectors.float().cpu().numpy())
    encoder.train(was_training)
    out = np.empty((len(order), chunks[0].shape[1]), dtype=np.float32)
    out[order] = np.concatenate(chunks)
    return out


def fit_probe(features: np.ndarray, labels: np.ndarray, seed: int):
    """A fitted classifier: standardised features, class-balanced logistic regression, C by
    stratified CV on macro-F1 (a plain C=1 fit where a class has a single example)."""
    rarest = int(np.unique(labels, return_counts=True)[1].min()) if len(labels) else 0
    folds = min(MAX_FOLDS, rarest)
    if folds >= 2:
        model = LogisticRegressionCV(
            Cs=C_GRID, cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
            scoring=MACRO_F1, class_weight="balanced", max_iter=2000, l1_ratios=(0.0,),
            use_legacy_attributes=False)  # plain L2; `C_` a float (the 1.10 behaviour)
    else:
        model = LogisticRegression(class_weight="balanced", max_iter=2000)
    return make_pipeline(StandardScaler(), model).fit(features, labels)


def probe_and_test(ctx, encoder: nn.Module, train: Dataset, test: Dataset, seed: int,
                   desc: str) -> CellScore:
    """A[t][i] by the probe: embed `train` and `test` with the frozen `encoder`, fit the
    classifier on all of `train`, score it on `test`."""
    start = time.perf_counter()
    pad_id, pooling = ctx.tokenizer.pad_token_id, ctx.config.probe_pooling
    device = ctx.accelerator.device
    x_train = embed(encoder, train, pad_id, pooling, device, f"{desc} (train)",
                    getattr(ctx, "count", None))
    with uncounted(ctx):  # evaluation is not training compute
        x_test = embed(encoder, test, pad_id, pooling, device, f"{desc} (test)")
    embedded = time.perf_counter()
    y_train, gold = np.asarray(train["label"]), [int(y) for y in test["label"]]
    classifier = fit_probe(x_train, y_train, seed)
    predicted = [int(p) for p in classifier.predict(x_test)]
    seconds = time.perf_counter() - start
    log.info("%s: probe in %.1f s (embedding %d + %d examples %.1f s, C=%s)", desc, seconds,
             len(train), len(test), embedded - start, getattr(classifier[-1], "C_", 1.0))
    return CellScore(macro_f1(gold, predicted), accuracy(gold, predicted), seconds,
                     len(set(predicted)) == 1)
