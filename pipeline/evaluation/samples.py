"""Which test images to show: a seeded sample to explain (half right, half wrong when there
are enough wrong ones) and the most confidently wrong, the errors worth looking at first."""

from __future__ import annotations

import numpy as np


def explain_sample(labels: np.ndarray, predicted: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of up to `n` test images, half correctly and half wrongly predicted (the wrong
    half shrinks to what there is; right ones fill the rest), drawn with `seed`, in index order
    within each half: the same every rerun."""
    rng = np.random.default_rng(seed)
    wrong = np.flatnonzero(labels != predicted)
    right = np.flatnonzero(labels == predicted)
    take_wrong = min(len(wrong), n // 2)
    take_right = min(len(right), n - take_wrong)
    chosen_wrong = np.sort(rng.choice(wrong, take_wrong, replace=False)) if take_wrong else wrong[:0]
    chosen_right = np.sort(rng.choice(right, take_right, replace=False)) if take_right else right[:0]
    return np.concatenate([chosen_right, chosen_wrong]).astype(np.int64)


def confident_errors(proba: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """Indices of the `n` wrong predictions with the highest confidence, most confident first
    (ties broken by index, so reruns agree)."""
    predicted = proba.argmax(1)
    wrong = np.flatnonzero(predicted != labels)
    confidence = proba[wrong, predicted[wrong]]
    order = np.lexsort((wrong, -confidence))
    return wrong[order][:n].astype(np.int64)
