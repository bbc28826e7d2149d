"""Calibration: is a predicted confidence of 0.9 right 90% of the time?

- Expected calibration error (ECE): the test images binned by their top confidence into
  equal-width bins over [0, 1]; the mean |accuracy - confidence| over bins, weighted by how
  many images fall in each (Guo et al., 2017, "On Calibration of Modern Neural Networks").
- Temperature scaling: one scalar T dividing the logits, fitted by minimising the negative
  log-likelihood on the validation split (never the test split, which would report a
  calibration the model cannot have on new data). T > 1 softens over-confident predictions;
  the predicted class never changes, so accuracy does not either.
"""

from __future__ import annotations

import numpy as np

BINS = 15
T_RANGE = (0.05, 20.0)  # a temperature outside this means the fit failed, not a real model


def bin_index(confidence: np.ndarray, bins: int) -> np.ndarray:
    """Each confidence's equal-width bin, right-closed (lo, hi]: exactly 1.0 falls in the last
    bin, 0 in the first."""
    return np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)


def reliability(proba: np.ndarray, labels: np.ndarray, bins: int = BINS) -> list[dict]:
    """Per equal-width confidence bin: its range, image count, mean confidence and accuracy
    (bins with no image have count 0 and no confidence or accuracy)."""
    confidence = proba.max(1)
    correct = proba.argmax(1) == labels
    index = bin_index(confidence, bins)
    rows = []
    for b in range(bins):
        inside = index == b
        n = int(inside.sum())
        rows.append({
            "bin": b, "lower": round(b / bins, 6), "upper": round((b + 1) / bins, 6), "count": n,
            "confidence": round(float(confidence[inside].mean()), 6) if n else None,
            "accuracy": round(float(correct[inside].mean()), 6) if n else None,
        })
    return rows


def ece(proba: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error over `bins` equal-width bins (0 is perfectly calibrated)."""
    confidence = proba.max(1)
    correct = (proba.argmax(1) == labels).astype(np.float64)
    index = bin_index(confidence, bins)
    total = 0.0
    for b in range(bins):
        inside = index == b
        if inside.any():
            total += inside.sum() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total / max(len(labels), 1))


def log_loss(proba: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (probabilities clipped at 1e-12)."""
    return float(-np.log(np.clip(proba[np.arange(len(labels)), labels], 1e-12, None)).mean())


def scale(proba: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) from probabilities: log p differs from the logits by a constant per
    row, which softmax cancels."""
    z = np.log(np.clip(proba, 1e-300, None)) / temperature
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def fit_temperature(proba: np.ndarray, labels: np.ndarray) -> float:
    """The T minimising the NLL of `scale(proba, T)` (bounded 1-D search over log T: the NLL is
    convex in 1/T, so the minimum is unique; the search is deterministic)."""
    from scipy.optimize import minimize_scalar

    if len(labels) == 0:
        return 1.0
    lo, hi = np.log(T_RANGE[0]), np.log(T_RANGE[1])
    found = minimize_scalar(lambda t: log_loss(scale(proba, float(np.exp(t))), labels), bounds=(lo, hi),
                            method="bounded", options={"xatol": 1e-6})
    return round(float(np.exp(found.x)), 6)
