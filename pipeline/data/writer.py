"""The prepared splits' arrays, written by worker processes: each decodes its images, checks
them against their ingest hash, resizes them and writes them straight into the memory-mapped
`<split>_images.npy`, so no copy of the whole split is ever held in memory."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data import formats, images, parallel
from pipeline.data.sources import Source
from pipeline.data.sources.candidates import Item


@dataclass(frozen=True)
class Target:
    """Where and how every image goes: the same for all tasks, sent to each worker once."""

    source: Source
    out: Path
    size: int
    channels: int
    resize: images.Resize


# (item, pixel sha256, split, row): small tuples, as 60,000 of them are pickled to the workers
Task = tuple[Item, str, str, int]
_TARGET: Target | None = None
_ARRAYS: dict[str, np.ndarray] = {}  # each worker's open memory maps, by split


def _use_target(target: Target) -> None:
    global _TARGET
    _TARGET = target
    _ARRAYS.clear()


def _fill_batch(batch: Sequence[Task]) -> list[str | None]:
    """Write each image's resized pixels into its row; an error message where that failed."""
    assert _TARGET is not None
    t = _TARGET
    errors: list[str | None] = []
    for item, sha256, split, row in batch:
        try:
            pixels, _ = t.source.pixels(item)
        except images.Rejected as rejected:
            errors.append(f"{item.path}: {rejected} (it was readable at ingest)")
            continue
        if formats.pixel_sha256(pixels) != sha256:
            errors.append(
                f"{item.path}: pixels differ from the ingest manifest's sha256 (the file changed since ingest)"
            )
            continue
        if split not in _ARRAYS:
            _ARRAYS[split] = np.load(t.out / f"{split}_images.npy", mmap_mode="r+")
        _ARRAYS[split][row] = images.fit_square(pixels, t.size, t.channels, t.resize)
        errors.append(None)
    for array in _ARRAYS.values():
        array.flush()
    return errors


def _crashed(task: Task) -> str:
    return f"{task[0].path}: the decoder crashed its process on this file"


def write_splits(
    out: Path, prepared: pd.DataFrame, classes: tuple[str, ...], source: Source, size: int, channels: int,
    resize: images.Resize, workers: int,
) -> None:
    """`<split>_images.npy` (uint8 (N, size, size, channels)) and `<split>_labels.npy` for every
    split of `prepared` (its split, label, given_label, path, source_split, sha256 and row index columns),
    filled by `workers` processes."""
    class_index = {name: i for i, name in enumerate(classes)}
    tasks: list[Task] = []
    for split in formats.SPLITS:
        rows = prepared[prepared["split"] == split]
        shape = (len(rows), size, size, channels)
        np.lib.format.open_memmap(out / f"{split}_images.npy", mode="w+", dtype=np.uint8, shape=shape).flush()
        np.save(out / f"{split}_labels.npy", rows["label"].map(class_index).to_numpy(np.int64))
        tasks += [(source.item(r.path, r.given_label, r.source_split), r.sha256, split, r.index)
                  for r in rows.itertuples()]
    target = Target(source, out, size, channels, resize)
    errors = [e for e in parallel.map_batches(_fill_batch, tasks, _crashed, workers, 1024, _use_target, (target,)) if e]
    if errors:
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise formats.DataError(
            f"{len(errors)} images could not be prepared; rerun ingest (dvc repro):\n  "
            + "\n  ".join(errors[:10])
            + more
        )
