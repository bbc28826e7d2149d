"""Prepare: decode, resize and split the ingested images into train/val/test arrays.

Reads `data/raw` and `data/manifest.csv`; writes `data/prepared` (see `pipeline.data` for the
format): a stratified, seeded split, every image resized to `prepare.image_size` and stored as
uint8 so that training never decodes a file.
"""

from __future__ import annotations

from pipeline import tracking

if __name__ == "__main__":
    # MLflow's start-up (~4 s) runs in a worker process while this one imports torch & co.
    tracking.start_worker()

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipeline import config, data
from pipeline.config import check

GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "F"}


@dataclass(frozen=True)
class PrepareParams:
    seed: int = 0
    image_size: int = 32
    val_fraction: float = 0.15
    test_fraction: float = 0.15

    def __post_init__(self) -> None:
        check(8 <= self.image_size <= 1024, "image_size", f"must be in 8..1024 pixels, got {self.image_size}")
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            check(0 < value < 1, name, f"must be between 0 and 1 (exclusive), got {value}")
        total = self.val_fraction + self.test_fraction
        check(total < 0.9, "val_fraction", f"val_fraction + test_fraction must leave at least 10% to train, got {total}")


def read_manifest(path: Path) -> pd.DataFrame:
    try:
        manifest = pd.read_csv(path, dtype={"path": str, "label": str, "sha256": str, "mode": str})
    except (OSError, ValueError) as exc:
        raise data.DataError(f"{path}: cannot read the manifest ({exc}); rerun the ingest stage") from exc
    missing = set(data.MANIFEST_COLUMNS) - set(manifest.columns)
    if missing:
        raise data.DataError(f"{path}: missing columns {sorted(missing)}; expected {list(data.MANIFEST_COLUMNS)}")
    if manifest.empty:
        raise data.DataError(f"{path}: the manifest lists no images")
    return manifest


def load_images(raw_dir: Path, paths: list[str], size: int, mode: str) -> np.ndarray:
    """Decode and resize every image into one uint8 (N, size, size, C) array."""
    channels = 1 if mode == "L" else 3
    out = np.empty((len(paths), size, size, channels), dtype=np.uint8)
    for i, rel_path in enumerate(paths):
        with Image.open(raw_dir / rel_path) as image:
            image = image.convert(mode)
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            out[i] = np.asarray(image).reshape(size, size, channels)
    return out


def split_indices(labels: np.ndarray, params: PrepareParams) -> dict[str, np.ndarray]:
    """Stratified, seeded train/val/test indices, each sorted (file order, not random order)."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    counts = np.bincount(labels)
    if counts.min() < 3:
        raise data.DataError(
            f"class index {int(counts.argmin())} has {int(counts.min())} images; each class needs at least 3 "
            "(one per split)"
        )
    rest, test = train_test_split(indices, test_size=params.test_fraction, stratify=labels, random_state=params.seed)
    val_share = params.val_fraction / (1 - params.test_fraction)
    train, val = train_test_split(rest, test_size=val_share, stratify=labels[rest], random_state=params.seed)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def prepare(manifest: pd.DataFrame, raw_dir: Path, params: PrepareParams) -> dict[str, data.Split]:
    classes = tuple(sorted(manifest["label"].unique()))
    labels = manifest["label"].map({name: i for i, name in enumerate(classes)}).to_numpy(np.int64)
    mode = "L" if set(manifest["mode"]) <= GRAYSCALE_MODES else "RGB"
    images = load_images(raw_dir, manifest["path"].tolist(), params.image_size, mode)
    return {
        name: data.Split(images=images[idx], labels=labels[idx], classes=classes)
        for name, idx in split_indices(labels, params).items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, default=Path("data/raw"))
    parser.add_argument("--manifest", type=Path, default=Path("data/manifest.csv"))
    parser.add_argument("--out", type=Path, default=Path("data/prepared"))
    args = parser.parse_args(argv)
    params = config.load("prepare", PrepareParams)
    with tracking.stage_run("prepare", {"prepare": params}) as run:
        splits = prepare(read_manifest(args.manifest), args.raw, params)
        data.save_prepared(args.out, splits)
        run.log_summary({f"{name}_images": len(split) for name, split in splits.items()})


if __name__ == "__main__":
    main()
