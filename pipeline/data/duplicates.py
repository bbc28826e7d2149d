"""Near-duplicates across splits: a perceptual-hash search whose every hit is confirmed on pixels.

pHash alone cries wolf on small, centred images: on 5,000 real MNIST digits (`bench/duplicates.py`)
28% of test images have a training digit within 4 bits, though MNIST's test set holds no copies.
So each pHash candidate pair (within `max_distance` bits) is checked on the stored training
arrays, the pixels the model sees: the pair is a near-duplicate when the Pearson correlation
of their pixels reaches `min_correlation`. Correlation ignores brightness and contrast, so a
copy resized, re-encoded, brightened or captioned still correlates above 0.99 with its
original; distinct digits stay below.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from pipeline.data import images

# (split whose images are checked, split searched for a near-twin): the pairs that leak
PAIRS = (("val", "train"), ("test", "train"), ("test", "val"))
COLUMNS = ["split", "path", "nearest_split", "nearest_path", "distance", "correlation"]
_BLOCK_BYTES = 1 << 26  # bounds each step's working set (hamming matrix, pixel rows) to ~64 MiB


def correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row pair of two (N, ...) arrays; 0 where a row is flat."""
    x = a.reshape(len(a), -1).astype(np.float64)
    y = b.reshape(len(b), -1).astype(np.float64)
    x -= x.mean(1, keepdims=True)
    y -= y.mean(1, keepdims=True)
    norms = np.sqrt((x * x).sum(1) * (y * y).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, (x * y).sum(1) / norms, 0.0)


def candidates(
    a_hashes: np.ndarray, b_hashes: np.ndarray, max_distance: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (i, j, bits) with pHash a[i] within `max_distance` bits of b[j], in (i, j) order."""
    found = []
    chunk = max(1, (_BLOCK_BYTES // 8) // max(len(b_hashes), 1))
    for start in range(0, len(a_hashes), chunk):
        distance = images.hamming(a_hashes[start : start + chunk], b_hashes)
        i, j = np.nonzero(distance <= max_distance)
        found.append((i + start, j, distance[i, j]))
    if not found:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64)
    return tuple(np.concatenate(parts).astype(np.int64) for parts in zip(*found, strict=True))


def find(
    prepared: pd.DataFrame,
    arrays: Callable[[str], np.ndarray],
    max_distance: int,
    min_correlation: float,
) -> tuple[pd.DataFrame, int]:
    """Each val/test image's most correlated pHash candidate in an earlier split, where that
    correlation reaches `min_correlation`; and how many pHash candidate pairs were checked.

    `prepared` is prepare's manifest (split, index: the row in that split's array, path, phash);
    `arrays(split)` gives the split's stored uint8 images, usually their memory map."""
    hashes = images.hashes_to_uint64(prepared["phash"].tolist())
    split_of, rows, paths = prepared["split"].to_numpy(), prepared["index"].to_numpy(), prepared["path"].to_numpy()
    found, checked = [], 0
    for split, other in PAIRS:
        a, b = np.flatnonzero(split_of == split), np.flatnonzero(split_of == other)
        if not len(a) or not len(b):
            continue
        i, j, bits = candidates(hashes[a], hashes[b], max_distance)
        checked += len(i)
        corr = np.empty(len(i))
        a_images, b_images = arrays(split), arrays(other)
        step = max(1, _BLOCK_BYTES // (16 * max(1, a_images[0].size)))  # two float64 rows a pair
        for start in range(0, len(i), step):
            ai, bj = rows[a[i[start : start + step]]], rows[b[j[start : start + step]]]
            corr[start : start + step] = correlation(a_images[ai], b_images[bj])
        hit = corr >= min_correlation
        i, j, bits, corr = i[hit], j[hit], bits[hit], corr[hit]
        best = np.lexsort((j, -corr, i))  # per image: highest correlation, then the first candidate
        first = np.ones(len(best), bool)
        first[1:] = i[best][1:] != i[best][:-1]
        keep = best[first]
        found.append(pd.DataFrame({
            "split": split, "path": paths[a[i[keep]]], "nearest_split": other, "nearest_path": paths[b[j[keep]]],
            "distance": bits[keep], "correlation": np.round(corr[keep], 6),
        }))
    table = pd.concat(found, ignore_index=True)[COLUMNS] if found else pd.DataFrame(columns=COLUMNS)
    return table, checked
