"""The dataset formats that stages hand to each other; nothing here needs a framework.

Ingested data (ingest's output) is a manifest CSV with one row per usable image
(`MANIFEST_COLUMNS`), `classes.json` and `dataset.json`; the pixels stay in the source.
Prepared data (prepare's output) is one folder holding, per split, `<split>_images.npy`
(uint8, N x H x W x C) and `<split>_labels.npy` (int64, N), plus `classes.json` (the
class-to-index mapping: index i is classes[i]), `dataset.json` and `manifest.csv` (the
ingest manifest plus each image's split and row, and `given_label`, its label as ingested, which
a review may have changed: `pipeline.data.review`). Plain .npy files memory-map, so a split
larger than memory still trains, and they carry no timestamps (unlike .npz's zip entries).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import files
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    import pandas as pd  # imported where used: the torch stages never read a manifest

SPLITS = ("train", "val", "test")
# source_split: the split the source fixes ("" if none); mode: L or RGB after conversion;
# file_mode: the file's own (CMYK, I;16, P...); phash: perceptual hash, 16 hex digits;
# colourfulness: images.colourfulness of the pixels (0 for grey ones, also in an RGB file).
MANIFEST_COLUMNS = (
    "path", "label", "source_split", "sha256", "width", "height", "mode", "file_mode", "phash", "colourfulness",
)
_TEXT_COLUMNS = ("path", "label", "given_label", "source_split", "sha256", "mode", "file_mode", "phash", "split")


class DataError(PipelineError, ValueError):
    """The data on disk is not what the next stage needs; the message names the file."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,), indices into classes
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise DataError(f"images must be uint8 (N, H, W, C), got {self.images.dtype} {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.images.shape[-1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])


def pixel_sha256(pixels: np.ndarray) -> str:
    """Hash of decoded pixels (shape, dtype and values): equal images hash equal whatever the file format."""
    digest = hashlib.sha256(f"{pixels.dtype}{pixels.shape}".encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()


def metric_key(name: str) -> str:
    """A class name as one metric key level: '/' would nest it ("T-shirt/top")."""
    return name.replace("/", "_")


def write_table(path: Path, table: pd.DataFrame) -> None:
    """A manifest or report as CSV, atomically, with the same bytes for the same table."""
    files.write_text(path, table.to_csv(index=False, lineterminator="\n"))


def read_manifest(path: Path, columns: tuple[str, ...] = MANIFEST_COLUMNS) -> pd.DataFrame:
    import pandas as pd

    path = Path(path)
    try:
        # keep_default_na=False: an empty source_split stays "", and a class named "NA" stays "NA"
        manifest = pd.read_csv(path, dtype={c: str for c in _TEXT_COLUMNS}, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the manifest ({exc}); rerun the ingest stage") from exc
    missing = set(columns) - set(manifest.columns)
    if missing:
        raise DataError(f"{path}: missing columns {sorted(missing)}; expected {list(columns)}; rerun the ingest stage")
    if manifest.empty:
        raise DataError(f"{path}: the manifest lists no images")
    return manifest


def read_json(path: Path, what: str) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read {what} ({exc}); rerun the stage that writes it (dvc repro)") from exc


def dataset_tags(prepared: Path) -> dict[str, str]:
    """The dataset's identity, for every stage's MLflow run."""
    info = read_json(Path(prepared) / "dataset.json", "the dataset description")
    return {"dataset_sha256": str(info.get("sha256")), "data_source": str(info.get("source"))}


def load_classes(prepared: Path) -> tuple[str, ...]:
    path = Path(prepared) / "classes.json"
    classes = read_json(path, "the class list")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{path}: expected a JSON list of class names")
    return tuple(classes)


def load_split(prepared: Path, name: str, mmap: bool = True) -> Split:
    """Load one split; memory-mapped by default so large splits need not fit in RAM."""
    if name not in SPLITS:
        raise DataError(f"unknown split '{name}'; valid splits are {list(SPLITS)}")
    prepared = Path(prepared)
    paths = [prepared / f"{name}_images.npy", prepared / f"{name}_labels.npy"]
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: missing; rerun the prepare stage (dvc repro prepare)")
    images = np.load(paths[0], mmap_mode="r" if mmap else None)
    labels = np.load(paths[1])
    split = Split(images=images, labels=labels, classes=load_classes(prepared))
    if len(split) and (labels.min() < 0 or labels.max() >= split.num_classes):
        raise DataError(f"{paths[1]}: labels outside 0..{split.num_classes - 1}")
    return split
