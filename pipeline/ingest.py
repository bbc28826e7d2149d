"""Ingest: materialise the dataset named by `data.source` as an image folder plus a manifest.

Reads nothing from the repository for the embedded `digits` source (scikit-learn ships it);
writes `data/raw/<class>/<file>.png` and `data/manifest.csv` with one row per image:
path (relative to the raw folder), label, sha256 of the decoded pixels, width, height, mode.
"""

from __future__ import annotations

from pipeline import tracking

if __name__ == "__main__":
    # MLflow's start-up (~4 s) runs in a worker process while this one imports torch & co.
    tracking.start_worker()

import argparse
import importlib.util
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from PIL import Image

from pipeline import config, data, files

# A source is a function yielding (relative path, class name, decoded image). New sources
# (an image folder, the standard datasets) register here and reuse the writing below.
SOURCES = ("digits",)


@dataclass(frozen=True)
class DataParams:
    source: Literal["digits"] = "digits"


def digits_file() -> Path:
    """scikit-learn's bundled digits.csv.gz, found without importing scikit-learn (3 s here)."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise data.DataError("data.source 'digits' needs scikit-learn's bundled digits.csv.gz; pip install scikit-learn")
    return path


def digits_images() -> Iterator[tuple[str, str, Image.Image]]:
    """scikit-learn's 1,797 8x8 handwritten digits, 17 grey levels scaled to 0..255."""
    table = np.loadtxt(digits_file(), delimiter=",")  # (1797, 65): 64 pixels in 0..16, then the digit
    pixels = np.rint(table[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)
    for index, (image, target) in enumerate(zip(pixels, table[:, -1].astype(int), strict=True)):
        label = str(int(target))
        yield f"{label}/{index:04d}.png", label, Image.fromarray(image, mode="L")


def source_images(params: DataParams) -> Iterator[tuple[str, str, Image.Image]]:
    if params.source == "digits":
        return digits_images()
    raise config.ConfigError(f"params.yaml: data.source: unknown source {params.source!r}; valid: {list(SOURCES)}")


def write_raw(images: Iterator[tuple[str, str, Image.Image]], raw_dir: Path) -> pd.DataFrame:
    """Write each image as PNG under `raw_dir` (replaced whole) and return the manifest."""
    rows = []
    with files.atomic_dir(raw_dir) as tmp:
        for rel_path, label, image in images:
            target = tmp / rel_path
            target.parent.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")  # Pillow's PNG has no timestamp: same pixels, same bytes
            target.write_bytes(buffer.getvalue())
            pixels = np.asarray(image)
            rows.append((rel_path, label, data.pixel_sha256(pixels), image.width, image.height, image.mode))
    manifest = pd.DataFrame(rows, columns=list(data.MANIFEST_COLUMNS))
    return manifest.sort_values("path", kind="stable").reset_index(drop=True)


def dataset_hash(manifest: pd.DataFrame) -> str:
    """One hash for the whole dataset: the pixels and labels of every image, order-free."""
    rows = sorted(zip(manifest["sha256"], manifest["label"], strict=True))
    return data.pixel_sha256(np.frombuffer("\n".join(f"{h} {lab}" for h, lab in rows).encode(), np.uint8))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/raw"))
    parser.add_argument("--manifest", type=Path, default=Path("data/manifest.csv"))
    args = parser.parse_args(argv)
    params = config.load("data", DataParams)
    with tracking.stage_run("ingest", {"data": params}) as run:
        manifest = write_raw(source_images(params), args.out)
        files.write_text(args.manifest, manifest.to_csv(index=False, lineterminator="\n"))
        counts = manifest["label"].value_counts()
        run.set_tags({"dataset_sha256": dataset_hash(manifest), "data_source": params.source})
        run.log_summary({"images": len(manifest), "classes": len(counts), "min_per_class": int(counts.min())})
        run.log_artifact(args.manifest)


if __name__ == "__main__":
    main()
