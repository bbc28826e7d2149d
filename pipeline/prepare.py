"""Prepare: split the ingested images and store them at the training size.

Reads `data/ingested` (manifest, classes) and the source's images (`data.folder` or the files
under `data.root`); writes `data/prepared` (format in `pipeline.data.formats`): per split, uint8
arrays at `prepare.image_size` that training memory-maps, the class-to-index mapping, and
`manifest.csv` with each image's split and row, so split membership is an output.
`near_duplicates.csv` lists val/test images with a perceptual near-twin in an earlier split;
split sizes per class and the near-duplicate counts go to `dvclive/prepare/metrics.json`.

Splits are stratified and seeded, and they follow content, not file order: within a class,
images are ranked by sha256(seed, pixel hash), and the first ranks go to test, then val. An
image keeps its split when files are renamed, reordered or added. Splits that the source
fixes (a folder's train/ val/ test/, the standard datasets' test sets) are kept; missing
ones are carved from train. Images are decoded, checked against their ingest hash, resized
and written straight into the memory-mapped arrays by worker processes on every core.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from pipeline import cli, config, files, tracking
from pipeline.config import check
from pipeline.data import formats, images, parallel, sources
from pipeline.data.sources import DataParams, Source
from pipeline.data.sources.candidates import Item

# (split whose images are checked, split searched for a near-twin): the pairs that leak
NEAR_DUPLICATE_PAIRS = (("val", "train"), ("test", "train"), ("test", "val"))


@dataclass(frozen=True)
class PrepareParams:
    seed: int = 0
    image_size: int = 32
    resize: Literal["stretch", "crop", "pad"] = "stretch"  # how non-square images become square
    val_fraction: float = 0.15  # shares of the whole dataset
    test_fraction: float = 0.15
    near_duplicate_distance: int = 4  # perceptual-hash bits (of 64) within which two images are near-twins

    def __post_init__(self) -> None:
        check(8 <= self.image_size <= 1024, "image_size", f"must be in 8..1024 pixels, got {self.image_size}")
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            check(0 < value < 1, name, f"must be between 0 and 1 (exclusive), got {value}")
        total = self.val_fraction + self.test_fraction
        check(total < 0.9, "val_fraction", "val_fraction + test_fraction must leave at least 10% to "
                                           f"train, got {total}")
        check(
            0 <= self.near_duplicate_distance <= 64,
            "near_duplicate_distance",
            f"must be in 0..64 bits, got {self.near_duplicate_distance}",
        )


def split_rank(seed: int, pixel_sha256: str) -> str:
    return hashlib.sha256(f"{seed}:{pixel_sha256}".encode()).hexdigest()


def assign_splits(manifest: pd.DataFrame, params: PrepareParams) -> np.ndarray:
    """The split of every manifest row: the source's where it fixes one, else by rank."""
    fixed = manifest["source_split"].to_numpy(dtype=object)
    splits = np.where(fixed == "", "train", fixed).astype(object)
    carve = [
        (name, fraction)
        for name, fraction in (("test", params.test_fraction), ("val", params.val_fraction))
        if not (fixed == name).any()
    ]
    if not carve:
        return splits
    ranks = np.array([split_rank(params.seed, h) for h in manifest["sha256"]], dtype=object)
    for label, rows in manifest.groupby("label", sort=True).indices.items():
        pool = rows[splits[rows] == "train"]
        counts = [(name, max(1, round(fraction * len(rows)))) for name, fraction in carve]
        if sum(n for _, n in counts) >= len(pool):
            raise formats.DataError(
                f"class {label!r} has {len(pool)} train images, too few to give {dict(counts)} away and keep one "
                "to train on; add images to it (at least 3 without fixed splits)"
            )
        pool = pool[np.argsort(ranks[pool], kind="stable")]
        start = 0
        for name, n in counts:
            splits[pool[start : start + n]] = name
            start += n
    return splits


def near_duplicates(prepared: pd.DataFrame, max_distance: int) -> pd.DataFrame:
    """Each val/test image's perceptually nearest image in an earlier split, where within
    `max_distance` bits: likely the same picture re-encoded, resized or lightly edited."""
    hashes = images.hashes_to_uint64(prepared["phash"].tolist())
    split_of, paths = prepared["split"].to_numpy(), prepared["path"].to_numpy()
    found = []
    for split, other in NEAR_DUPLICATE_PAIRS:
        a_rows, b_rows = np.flatnonzero(split_of == split), np.flatnonzero(split_of == other)
        if not len(a_rows) or not len(b_rows):
            continue
        chunk = max(1, (1 << 23) // len(b_rows))  # bounds the (chunk, len(b)) XOR matrix to 64 MiB
        for start in range(0, len(a_rows), chunk):
            block = a_rows[start : start + chunk]
            distance = images.hamming(hashes[block], hashes[b_rows])
            nearest = distance.argmin(1)  # the first of equally near ones: deterministic
            best = distance[np.arange(len(block)), nearest]
            hit = best <= max_distance
            found.append(
                pd.DataFrame(
                    {
                        "split": split,
                        "path": paths[block[hit]],
                        "nearest_split": other,
                        "nearest_path": paths[b_rows[nearest[hit]]],
                        "distance": best[hit].astype(int),
                    }
                )
            )
    columns = ["split", "path", "nearest_split", "nearest_path", "distance"]
    return pd.concat(found, ignore_index=True)[columns] if found else pd.DataFrame(columns=columns)


# -- pixels: written by worker processes straight into the memory-mapped arrays -------------


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
    out: Path, prepared: pd.DataFrame, classes: tuple[str, ...], source: Source, params: PrepareParams, workers: int
) -> None:
    """`<split>_images.npy` and `<split>_labels.npy` for every split, filled in parallel."""
    channels = channels_of(prepared)
    class_index = {name: i for i, name in enumerate(classes)}
    tasks: list[Task] = []
    for split in formats.SPLITS:
        rows = prepared[prepared["split"] == split]
        shape = (len(rows), params.image_size, params.image_size, channels)
        np.lib.format.open_memmap(out / f"{split}_images.npy", mode="w+", dtype=np.uint8, shape=shape).flush()
        np.save(out / f"{split}_labels.npy", rows["label"].map(class_index).to_numpy(np.int64))
        tasks += [(source.item(r.path, r.label, r.source_split), r.sha256, split, r.index) for r in rows.itertuples()]
    target = Target(source, out, params.image_size, channels, params.resize)
    errors = [e for e in parallel.map_batches(_fill_batch, tasks, _crashed, workers, 1024, _use_target, (target,)) if e]
    if errors:
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise formats.DataError(
            f"{len(errors)} images could not be prepared; rerun ingest (dvc repro):\n  "
            + "\n  ".join(errors[:10])
            + more
        )


def channels_of(prepared: pd.DataFrame) -> int:
    return 1 if (prepared["mode"] == "L").all() else 3  # one colour image makes the dataset RGB


def preprocessing(prepared: pd.DataFrame, params: PrepareParams) -> dict:
    """How a file becomes a training array; exports copy it so serving does the same."""
    return {
        "image_size": params.image_size,
        "channels": channels_of(prepared),
        "resize": params.resize,
        "alpha_background": images.ALPHA_BACKGROUND,
        "function": "pipeline.data.images.load_for_model(path, image_size, channels, resize)",
    }


def prepare_manifest(manifest: pd.DataFrame, params: PrepareParams) -> pd.DataFrame:
    """The ingest manifest plus `split` and `index` (the image's row in its split's arrays)."""
    prepared = manifest.sort_values("path", kind="stable", ignore_index=True)
    prepared["split"] = assign_splits(prepared, params)
    prepared["index"] = prepared.groupby("split", sort=False).cumcount()
    return prepared


def statistics(prepared: pd.DataFrame, classes: tuple[str, ...], near: pd.DataFrame) -> dict[str, int | float]:
    stats: dict[str, int | float] = {}
    counts = prepared.groupby(["split", "label"]).size()
    for split in formats.SPLITS:
        stats[f"{split}/images"] = int((prepared["split"] == split).sum())
        stats.update({f"{split}/per_class/{formats.metric_key(c)}": int(counts.get((split, c), 0)) for c in classes})
    for split, other in NEAR_DUPLICATE_PAIRS:
        found = int(((near["split"] == split) & (near["nearest_split"] == other)).sum()) if len(near) else 0
        stats[f"near_duplicates/{split}_in_{other}"] = found
        stats[f"near_duplicates/{split}_in_{other}_fraction"] = round(found / max(stats[f"{split}/images"], 1), 6)
    return stats


def main(argv: list[str] | None = None) -> None:
    args = cli.parse(argv, __doc__, cli.path("--ingested", "data/ingested"), cli.path("--out", "data/prepared"),
                     cli.path("--live", "dvclive/prepare"))  # fmt: skip
    data_params = config.load("data", DataParams)
    params = config.load("prepare", PrepareParams)
    with tracking.stage_run("prepare", {"data": data_params, "prepare": params}, live_dir=args.live) as run:
        started = time.perf_counter()
        manifest = formats.read_manifest(args.ingested / "manifest.csv")
        classes = formats.load_classes(args.ingested)
        dataset = formats.read_json(args.ingested / "dataset.json", "the dataset description")
        if dataset.get("source") != data_params.source:
            raise formats.DataError(
                f"{args.ingested} holds source {dataset.get('source')!r} but "
                f"data.source is {data_params.source!r}; rerun ingest (dvc repro)"
            )
        source = sources.open_source(data_params)  # no fetch: ingest read these files
        prepared = prepare_manifest(manifest, params)
        near = near_duplicates(prepared, params.near_duplicate_distance)
        with files.atomic_dir(args.out) as tmp:
            write_splits(tmp, prepared, classes, source, params, parallel.worker_count())
            files.write_json(tmp / "classes.json", list(classes))
            files.write_json(tmp / "dataset.json", {**dataset, "preprocessing": preprocessing(prepared, params)})
            formats.write_table(tmp / "manifest.csv", prepared)
            formats.write_table(tmp / "near_duplicates.csv", near)
        run.set_tags({"dataset_sha256": dataset["sha256"], "data_source": dataset["source"]})
        run.log_summary(statistics(prepared, classes, near))
        run.log_timing({"prepare_seconds": time.perf_counter() - started})
        run.log_artifact(args.out / "manifest.csv", "prepared")
        run.log_artifact(args.out / "near_duplicates.csv", "prepared")


if __name__ == "__main__":
    main()
