"""Prepare: split the ingested images and store them at the training size.

Reads `data/ingested` (manifest, classes) and the source's images (`data.folder` or the files
under `data.root`); writes `data/prepared` (format in `pipeline.data.formats`): per split, uint8
arrays at `prepare.image_size` that training memory-maps, the class-to-index mapping, and
`manifest.csv` with each image's split and row, so split membership is an output.
The reviewed changes in `data/review/exclude.csv` (`pipeline.data.review`) drop or relabel
images once their splits are drawn; their counts go to the metrics.
`near_duplicates.csv` lists val/test images with a near-twin in an earlier split (a pHash
candidate confirmed by pixel correlation, `pipeline.data.duplicates`); split sizes per class
and the near-duplicate counts go to `dvclive/prepare/metrics.json`.

Splits are stratified and seeded, and they follow content, not file order: within a class,
images are ranked by sha256(seed, pixel hash), and the first ranks go to test, then val. An
image keeps its split when files are renamed, reordered or added. Splits that the source
fixes (a folder's train/ val/ test/, the standard datasets' test sets) are kept; missing
ones are carved from train. Images are decoded, checked against their ingest hash, resized
and written straight into the memory-mapped arrays by worker processes on every core
(`pipeline.data.writer`).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from pipeline import cli, config, files
from pipeline.config import check
from pipeline.data import duplicates, formats, images, parallel, review, sources, writer
from pipeline.data.sources import DataParams
from pipeline.tracking.run import stage_run


@dataclass(frozen=True)
class PrepareParams:
    seed: int = 0
    # the stored side: 'auto' keeps small images at their native size and photos large enough
    # for a 224-px backbone with room for random crops (see stored_size)
    image_size: int | Literal["auto"] = "auto"
    resize: Literal["stretch", "crop", "pad"] = "stretch"  # how non-square images become square
    val_fraction: float = 0.15  # shares of the whole dataset
    test_fraction: float = 0.15
    near_duplicate_distance: int = 4  # perceptual-hash bits (of 64) within which two images are candidates
    near_duplicate_min_correlation: float = 0.98  # pixel correlation that confirms a candidate pair
    colour_threshold: float = 10.0  # colourfulness (images.colourfulness) from which an image counts as colour

    def __post_init__(self) -> None:
        size = self.image_size
        check(size == "auto" or 8 <= size <= 1024, "image_size", f"must be 'auto' or in 8..1024 pixels, got {size}")
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            check(0 < value < 1, name, f"must be between 0 and 1 (exclusive), got {value}")
        total = self.val_fraction + self.test_fraction
        check(total < 0.9, "val_fraction", "val_fraction + test_fraction must leave at least 10% to "
                                           f"train, got {total}")
        distance, correlation = self.near_duplicate_distance, self.near_duplicate_min_correlation
        check(0 <= distance <= 64, "near_duplicate_distance", f"must be in 0..64 bits, got {distance}")
        check(0 < correlation <= 1, "near_duplicate_min_correlation", f"must be in (0, 1], got {correlation}")
        check(self.colour_threshold > 0, "colour_threshold", f"must be > 0, got {self.colour_threshold}")


AUTO_MAX_SIZE = 256  # photos are stored no larger: enough for a 224-px backbone and its random crops


def stored_size(manifest: pd.DataFrame, image_size: int | str) -> int:
    """The side every image is stored at: `image_size`, or for 'auto' the median image's
    shorter side (an image's own size: 8 for the digits, 28 for MNIST, 180 for the pets),
    at most AUTO_MAX_SIZE and at least 8."""
    if image_size != "auto":
        return int(image_size)
    shorter = np.minimum(manifest["width"].to_numpy(), manifest["height"].to_numpy())
    return int(min(AUTO_MAX_SIZE, max(8, np.percentile(shorter, 50, method="lower"))))


@dataclass(frozen=True)
class Storage:
    """How prepare stores the dataset, decided once from the manifest and the params."""

    size: int  # every image's side
    channels: int  # 3 when one image is colourful, else 1
    colourful: pd.DataFrame  # the images that reach the colour threshold, most colourful first
    grey_in_rgb: int  # RGB files whose pixels stay under the threshold
    threshold: float


def decide_storage(prepared: pd.DataFrame, params: PrepareParams) -> Storage:
    """Size and channels by content, not file mode: one colourful image makes the dataset RGB;
    grey pixels saved in RGB files (digits as RGB JPEGs, scans) keep it one channel."""
    threshold = params.colour_threshold
    colourful = prepared[prepared["colourfulness"] >= threshold]
    colourful = colourful.sort_values(["colourfulness", "path"], ascending=[False, True], kind="stable")
    grey_in_rgb = int(((prepared["mode"] == "RGB") & (prepared["colourfulness"] < threshold)).sum())
    channels = 3 if len(colourful) else 1
    return Storage(stored_size(prepared, params.image_size), channels, colourful, grey_in_rgb, threshold)


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


def colour_decision(prepared: pd.DataFrame, storage: Storage) -> str:
    """One line for the stage's log: the channels chosen, and why."""
    colourful, threshold = storage.colourful, storage.threshold
    if len(colourful):
        examples = ", ".join(f"{r.path} ({r.colourfulness:g})" for r in colourful.head(3).itertuples())
        return (f"prepare: RGB: {len(colourful)} of {len(prepared)} images reach colourfulness "
                f"{threshold:g} (prepare.colour_threshold), the most colourful {examples}")
    most = prepared.sort_values("colourfulness", ascending=False, kind="stable").iloc[0]
    return (f"prepare: grey, one channel: no image reaches colourfulness {threshold:g} "
            f"(the most colourful: {most.path}, {most.colourfulness:g}); "
            f"{storage.grey_in_rgb} RGB files hold grey pixels")


def preprocessing(storage: Storage, params: PrepareParams) -> dict:
    """How a file becomes a training array; exports copy it so serving does the same. It
    records the colour decision and the (at most five most colourful) images that forced it."""
    colourful = storage.colourful
    return {
        "image_size": storage.size,
        "channels": storage.channels,
        "colour": {
            "threshold": storage.threshold,
            "colour_images": len(colourful),
            "most_colourful": [
                {"path": r.path, "colourfulness": r.colourfulness} for r in colourful.head(5).itertuples()
            ],
        },
        "resize": params.resize,
        "alpha_background": images.ALPHA_BACKGROUND,
        "function": "pipeline.data.images.load_for_model(path, image_size, channels, resize)",
    }


def prepare_manifest(manifest: pd.DataFrame, params: PrepareParams,
                     changes: list[review.Change] | None = None) -> pd.DataFrame:
    """The ingest manifest plus `split` and `index` (the image's row in its split's arrays), the
    reviewed `changes` applied after the splits are drawn: every other image keeps its split."""
    prepared = manifest.sort_values("path", kind="stable", ignore_index=True)
    prepared["split"] = assign_splits(prepared, params)
    prepared = review.apply_to_manifest(prepared, changes or [])
    prepared["index"] = prepared.groupby("split", sort=False).cumcount()
    return prepared


def statistics(
    prepared: pd.DataFrame, classes: tuple[str, ...], near: pd.DataFrame, candidates: int, storage: Storage
) -> dict[str, int | float]:
    stats: dict[str, int | float] = {}
    counts = prepared.groupby(["split", "label"]).size()
    for split in formats.SPLITS:
        stats[f"{split}/images"] = int((prepared["split"] == split).sum())
        stats.update({f"{split}/per_class/{formats.metric_key(c)}": int(counts.get((split, c), 0)) for c in classes})
    stats["image_size"] = storage.size
    stats["colour/channels"] = storage.channels
    stats["colour/colour_images"] = len(storage.colourful)
    stats["colour/grey_images_in_rgb_files"] = storage.grey_in_rgb
    stats["near_duplicates/phash_candidates"] = candidates  # pairs checked on pixels
    for split, other in duplicates.PAIRS:
        found = int(((near["split"] == split) & (near["nearest_split"] == other)).sum()) if len(near) else 0
        stats[f"near_duplicates/{split}_in_{other}"] = found
        stats[f"near_duplicates/{split}_in_{other}_fraction"] = round(found / max(stats[f"{split}/images"], 1), 6)
    return stats


def is_detail(key: str) -> bool:
    """Per-class counts, fractions and colour counts go to details.json: `dvc metrics show` keeps
    the image size, channels, split sizes and near-duplicate counts."""
    return "/per_class/" in key or key.endswith(("_fraction", "phash_candidates")) or (
        key.startswith("colour/") and key != "colour/channels")


def main(argv: list[str] | None = None) -> None:
    args = cli.parse(argv, __doc__, cli.path("--ingested", "data/ingested"), cli.path("--out", "data/prepared"),
                     cli.path("--live", "dvclive/prepare"),
                     cli.path("--exclude", "data/review/exclude.csv", "reviewed drops and relabels (data.review)"))
    data_params = config.load("data", DataParams)
    params = config.load("prepare", PrepareParams)
    files.verify_folder(args.ingested, "ingest")
    with stage_run("prepare", {"data": data_params, "prepare": params}, live_dir=args.live) as run:
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
        changes = review.read_changes(args.exclude, manifest["path"].tolist(), classes)
        prepared = prepare_manifest(manifest, params, changes)
        counted = review.counts(changes, args.exclude)
        storage = decide_storage(prepared, params)
        with files.atomic_dir(args.out) as tmp:
            writer.write_splits(tmp, prepared, classes, source, storage.size, storage.channels, params.resize,
                                parallel.worker_count())
            stored = lambda split: np.load(tmp / f"{split}_images.npy", mmap_mode="r")  # noqa: E731
            near, candidates = duplicates.find(
                prepared, stored, params.near_duplicate_distance, params.near_duplicate_min_correlation
            )
            files.write_json(tmp / "classes.json", list(classes))
            # the source's images and hash stay as ingested; what the reviewed exclude file changed beside them
            files.write_json(tmp / "dataset.json", {**dataset, "preprocessing": preprocessing(storage, params),
                                                    **({"review": counted} if changes else {})})
            formats.write_table(tmp / "manifest.csv", prepared)
            formats.write_table(tmp / "near_duplicates.csv", near)
        print(colour_decision(prepared, storage))
        print(f"prepare: images stored at {storage.size} x {storage.size} px (prepare.image_size: {params.image_size})")
        run.set_tags({"dataset_sha256": dataset["sha256"], "data_source": dataset["source"]})
        stats = statistics(prepared, classes, near, candidates, storage)
        stats["review/dropped"], stats["review/relabelled"] = counted["dropped"], counted["relabelled"]
        if changes:
            print(f"prepare: {args.exclude} drops {stats['review/dropped']} images and relabels "
                  f"{stats['review/relabelled']}")
        detail = {k: v for k, v in stats.items() if is_detail(k)}
        run.log_summary({k: v for k, v in stats.items() if k not in detail})
        run.log_details(detail)
        run.log_timing({"prepare_seconds": time.perf_counter() - started})
        run.log_artifact(args.out / "manifest.csv", "prepared")
        run.log_artifact(args.out / "near_duplicates.csv", "prepared")


if __name__ == "__main__":
    main()
