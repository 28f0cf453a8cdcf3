"""Scores of one fine-tuning (MF1, Acc) and of a whole run (FR, KT, vs-base), in percent."""

from __future__ import annotations

import numpy as np

# lower-triangular A[t][i]; with `eval_matrix: diagonal` None off the diagonal before the last row
Matrix = list[list[float | None]]


def accuracy(gold: list[int], predicted: list[int]) -> float:
    if not gold:
        raise ValueError("accuracy of an empty test set")
    return 100.0 * float(np.mean(np.asarray(gold) == np.asarray(predicted)))


def macro_f1(gold: list[int], predicted: list[int]) -> float:
    """Macro-F1 over the classes present in gold or predictions (as scikit-learn computes it)."""
    if not gold:
        raise ValueError("macro-F1 of an empty test set")
    g, p = np.asarray(gold), np.asarray(predicted)
    scores = []
    for label in np.union1d(g, p):
        tp = float(np.sum((g == label) & (p == label)))
        fp = float(np.sum((g != label) & (p == label)))
        fn = float(np.sum((g == label) & (p != label)))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return 100.0 * float(np.mean(scores))


def final_row(matrix: Matrix) -> list[float]:
    return [float(v) for v in matrix[-1]]


def diagonal(matrix: Matrix) -> list[float]:
    """A[t][t] for every t: each domain's score right after its own DAP-training."""
    return [float(matrix[t][t]) for t in range(len(matrix))]


def forgetting_rate(matrix: Matrix) -> float:
    """FR = 1/(T-1) Σ_{i<T} (A[i][i] − A[T][i]); negative means backward transfer."""
    size = len(matrix)
    if size < 2:
        return 0.0
    return float(np.mean([matrix[i][i] - matrix[-1][i] for i in range(size - 1)]))


def mean_gain(matrix: Matrix, reference: list[float]) -> float:
    """Mean of A[T][i] − reference[i]: KT against `one`'s row, vs-base against `base`'s."""
    return float(np.mean(np.asarray(final_row(matrix)) - np.asarray(reference)))


def average_matrices(matrices: list[Matrix]) -> Matrix:
    """Entry-wise mean; an entry that some run did not evaluate (None) stays None."""
    size = len(matrices[0])

    def mean(values: list[float | None]) -> float | None:
        return None if any(v is None for v in values) else float(np.mean(values))

    return [[mean([m[t][i] for m in matrices]) for i in range(t + 1)] for t in range(size)]
