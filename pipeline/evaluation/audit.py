"""What the audit stage finds in the data: label issues, outliers and poor images.

- Label issues: cleanlab's `find_label_issues` on out-of-fold predicted probabilities (each
  image scored by a model that never saw it). Confident learning estimates, per pair of classes,
  how many images of one carry the other's label (the confident joint), and flags, class by
  class, that many of the images whose given label is least likely (`prune_by_class`);
  `num_label_issues` gives the estimated noise rate. The suggested label is the most probable
  class.
- Outliers: images far from every class: the cosine distance of an image's backbone features
  to the nearest class's mean, flagged beyond Q3 + `fence` x IQR of all images' (3: Tukey's
  "far out"). Not cleanlab's k-nearest-neighbour score: planted outliers come in groups (a
  few screenshots, a few blank frames) that are each other's neighbours, and on the pets with
  10 planted ones it ranked them below ordinary photos (docs/benchmarks.md#audit).
- Poor images, from the stored pixels and the ingest manifest: `blank` (almost no contrast),
  `dark`, `bright` (washed out), `blurry` (photos only: far less fine detail than the rest of
  the set), `odd_aspect` (the file's sides 3:1 or more apart, before prepare made it square).
NumPy, scikit-learn and cleanlab: no framework.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINDS = ("label_issue", "outlier", "blank", "dark", "bright", "blurry", "odd_aspect")
BLANK_STD = 4.0  # grey levels (of 255): the whole image within a few levels of its mean
DARK_P99 = 40  # the brightest 1% of pixels below this: a dark image
BRIGHT_P1 = 225  # the darkest 1% above this: washed out
BLUR_ROBUST_Z = -3.5  # log sharpness this many robust standard deviations below the set's median
BLUR_MIN_SIDE = 64  # smaller images (digits, icons) are smooth by nature: no blur check
ODD_ASPECT = 3.0


@dataclass(frozen=True)
class Labels:
    flagged: np.ndarray  # bool (N,)
    quality: np.ndarray  # (N,) cleanlab's label quality score: the given label's probability
    suggested: np.ndarray  # int (N,)
    noise_rate: float  # the estimated share of wrong labels in the whole set


def label_issues(labels: np.ndarray, probs: np.ndarray, filter_by: str) -> Labels:
    from cleanlab.count import num_label_issues
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    flagged = find_label_issues(labels, probs, filter_by=filter_by, n_jobs=1)
    quality = get_label_quality_scores(labels, probs, method="self_confidence")
    noise = num_label_issues(labels, probs) / max(len(labels), 1)
    return Labels(np.asarray(flagged, bool), np.asarray(quality, np.float64), probs.argmax(1), float(noise))


def with_pixels(features: np.ndarray, images: np.ndarray) -> np.ndarray:
    """The backbone's features beside the raw pixels, each block centred and scaled to unit
    root-mean-square so that they weigh alike. For small images (strokes: digits, letters) an
    ImageNet backbone's features alone make a weaker probe than their pixels (docs/benchmarks.md#audit)."""
    blocks = [features.astype(np.float64), images.reshape(len(images), -1).astype(np.float64)]
    blocks = [b - b.mean(0) for b in blocks]
    return np.concatenate([b / max(float(np.sqrt((b * b).mean())), 1e-12) for b in blocks], axis=1)


def outliers(features: np.ndarray, labels: np.ndarray, classes: int, fence: float) -> tuple[np.ndarray, np.ndarray]:
    """(flagged, distance): each image's cosine distance to the nearest class mean of the
    L2-normalised features; higher is further from every class."""
    z = features.astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True).clip(1e-12)
    means = np.stack([z[labels == c].mean(0) if (labels == c).any() else np.zeros(z.shape[1]) for c in range(classes)])
    means /= np.linalg.norm(means, axis=1, keepdims=True).clip(1e-12)
    distance = (1 - z @ means.T).min(1)
    q1, q3 = np.percentile(distance, [25, 75])
    return distance > q3 + fence * (q3 - q1), distance


def grey(images: np.ndarray) -> np.ndarray:
    """float32 (N, H, W) luminance of uint8 (N, H, W, C)."""
    x = images.astype(np.float32)
    return x[..., 0] if x.shape[-1] == 1 else x[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)


def sharpness(g: np.ndarray) -> np.ndarray:
    """log of the Laplacian's energy over the image's variance: fine detail, whatever the contrast."""
    lap = 4 * g[:, 1:-1, 1:-1] - g[:, :-2, 1:-1] - g[:, 2:, 1:-1] - g[:, 1:-1, :-2] - g[:, 1:-1, 2:]
    return np.log((lap.var(axis=(1, 2)) + 1e-6) / (g.var(axis=(1, 2)) + 1e-6))


def poor_images(images: np.ndarray, widths: np.ndarray, heights: np.ndarray,
                batch: int = 512) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each poor-image kind's (flagged, score); a score's meaning is its kind's: contrast (std),
    brightest or darkest percentile, robust z of sharpness, side ratio."""
    n = len(images)
    std, p99, p1, sharp = (np.empty(n, np.float64) for _ in range(4))
    for start in range(0, n, batch):  # the split arrays may be memory maps larger than memory
        g = grey(np.asarray(images[start:start + batch]))
        rows = slice(start, start + len(g))
        std[rows] = g.std(axis=(1, 2))
        p1[rows], p99[rows] = np.percentile(g.reshape(len(g), -1), [1, 99], axis=1)
        sharp[rows] = sharpness(g) if min(g.shape[1:]) >= 3 else 0.0
    median = np.median(sharp)
    mad = 1.4826 * np.median(np.abs(sharp - median)) or 1.0
    z = (sharp - median) / mad
    side = min(images.shape[1:3]) if n else 0
    ratio = np.maximum(widths, heights) / np.maximum(np.minimum(widths, heights), 1)
    return {
        "blank": (std < BLANK_STD, std),
        "dark": ((p99 < DARK_P99) & (std >= BLANK_STD), p99),
        "bright": ((p1 > BRIGHT_P1) & (std >= BLANK_STD), p1),
        "blurry": ((z < BLUR_ROBUST_Z) & (side >= BLUR_MIN_SIDE) & (std >= BLANK_STD), z),
        "odd_aspect": (ratio >= ODD_ASPECT, ratio.astype(np.float64)),
    }
