"""Ingest: find, decode and validate every image of the dataset named by `data.source`.

Reads `data.folder` (source `folder`: one sub-folder per class, optionally under `train/`,
`val/`, `test/`), the standard files under `data.root` (`mnist`, `fashion_mnist`, `kmnist`,
`cifar10`) or scikit-learn's bundled digits. Writes `data/ingested/`:
- `manifest.csv`: one row per usable image: path, label, source_split (the split the source
  fixes, or empty), sha256 of the decoded pixels, width, height, mode (L or RGB after
  conversion), file_mode (the file's own), phash (perceptual hash, for near-duplicates),
  colourfulness (0 for grey pixels, even in an RGB file; prepare decides the channels by it);
- `classes.json`: the class names, index i meaning class i everywhere downstream;
- `excluded.csv`: every file left out and why (rejected, duplicate or ignored);
- `dataset.json`: the source and the dataset's hash.
Data statistics go to `dvclive/ingest/metrics.json` and MLflow.

Every image is decoded once here, in worker processes on every core, and only its hashes
are kept, never its pixels: memory stays flat however large the dataset. A bad file is
excluded and counted; the stage fails only past `data.max_bad_fraction`, with one message.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pandas as pd

from pipeline import cli, config, files
from pipeline.data import formats, images, parallel, sources
from pipeline.data.sources import ArraySource, DataParams, Source
from pipeline.data.sources.candidates import Excluded, Item
from pipeline.frameworks.torch import download
from pipeline.tracking.run import stage_run

REJECT_CODES = (
    "empty", "undecodable", "unsupported_format", "unsupported_mode", "too_many_pixels", "too_small",
    "unreadable", "broken_symlink", "crashed_decoder", "outside_class_folder", "label_conflict",
)


# -- inspection: runs in worker processes ---------------------------------------------------

_SOURCE: Source | None = None  # set in each worker by _use_source


def _use_source(source: Source) -> None:
    global _SOURCE
    _SOURCE = source


def inspect(item: Item) -> tuple:
    """(code, reason) for a rejected image, else (sha256, width, height, mode, file_mode, phash, colourfulness)."""
    assert _SOURCE is not None
    try:
        pixels, file_mode = _SOURCE.pixels(item)
    except images.Rejected as rejected:
        return (rejected.code, str(rejected))
    height, width = pixels.shape[:2]
    mode = "L" if pixels.ndim == 2 else "RGB"
    digest, phash = formats.pixel_sha256(pixels), images.phash(pixels)
    return (digest, width, height, mode, file_mode, phash, images.colourfulness(pixels))


def _inspect_batch(batch: Sequence[Item]) -> list[tuple]:
    return [inspect(item) for item in batch]


def _crashed(item: Item) -> tuple:
    return ("crashed_decoder", "the decoder crashed its process on this file")


def inspect_all(source: Source, items: list[Item], workers: int) -> list[tuple]:
    return parallel.map_batches(_inspect_batch, items, _crashed, workers, 2048, _use_source, (source,))


# -- the rules: duplicates, rejections, class sizes ------------------------------------------


def build_manifest(
    items: list[Item], results: list[tuple], fixed_split_source: bool
) -> tuple[pd.DataFrame, list[Excluded]]:
    """Kept images as a manifest, and the rejected and duplicate ones.

    Exact duplicates (same decoded pixels) keep the first path in sorted order. Copies under
    different labels are all rejected: no label can be trusted. A folder's pre-split copies in
    two splits fail the stage (a leak the user must fix); the standard datasets keep their
    official test copy and drop the train one, so their test sets stay the published ones."""
    excluded = []
    rows = []
    for item, result in zip(items, results, strict=True):
        if len(result) == 2:
            excluded.append(Excluded(item.path, "rejected", result[0], result[1]))
        else:
            rows.append((item.path, item.label, item.split, *result))
    columns = list(formats.MANIFEST_COLUMNS)
    manifest = pd.DataFrame(rows, columns=columns).sort_values("path", kind="stable", ignore_index=True)
    drop: set[int] = set()
    copies = manifest[manifest["sha256"].duplicated(keep=False)]  # grouping only these: 60k groups cost seconds
    for _, group in copies.groupby("sha256", sort=True):
        paths = group["path"].tolist()
        if group["label"].nunique() > 1:
            listing = ", ".join(f"{p} ({lab})" for p, lab in zip(paths, group["label"], strict=True))
            for p in paths:
                excluded.append(
                    Excluded(p, "rejected", "label_conflict", f"same pixels under different labels: {listing}")
                )
            drop.update(group.index)
            continue
        splits = group["source_split"]
        if splits.nunique() > 1:
            if not fixed_split_source:
                a, b = group.drop_duplicates("source_split")["path"].tolist()[:2]
                raise formats.DataError(
                    f"the same image is in two splits: {a} and {b}; remove one copy "
                    "(a test image seen in training inflates accuracy)"
                )
            keep = group.index[splits == "test"][0] if (splits == "test").any() else group.index[0]
        else:
            keep = group.index[0]
        kept_path = manifest.at[keep, "path"]
        for index in group.index:
            if index != keep:
                excluded.append(
                    Excluded(manifest.at[index, "path"], "duplicate", "duplicate", f"same pixels as {kept_path}")
                )
                drop.add(index)
    manifest = manifest.drop(index=sorted(drop)).reset_index(drop=True)
    return manifest, sorted(excluded, key=lambda e: e.path)


def check_rejections(candidates: int, excluded: list[Excluded], max_bad_fraction: float) -> None:
    rejected = [e for e in excluded if e.status == "rejected"]
    if candidates and len(rejected) / candidates > max_bad_fraction:
        by_code = Counter(e.code for e in rejected)
        examples = "\n".join(f"  {e.path}: {e.reason}" for e in rejected[:10])
        more = f"\n  ... and {len(rejected) - 10} more" if len(rejected) > 10 else ""
        raise formats.DataError(
            f"{len(rejected)} of {candidates} images rejected ({len(rejected) / candidates:.1%}), over "
            f"data.max_bad_fraction {max_bad_fraction:.1%}; by reason: {dict(sorted(by_code.items()))}\n"
            f"{examples}{more}"
        )


def check_class_sizes(manifest: pd.DataFrame, source: Source, min_per_class: int) -> None:
    counts = manifest["label"].value_counts()
    small = {c: int(counts.get(c, 0)) for c in source.classes if counts.get(c, 0) < min_per_class}
    if small:
        listing = "; ".join(f"{source.describe(c)}: {n}" for c, n in sorted(small.items()))
        raise formats.DataError(f"classes with fewer than data.min_per_class={min_per_class} usable images: {listing}")
    if (manifest["source_split"] != "").any():
        trained = set(manifest.loc[manifest["source_split"] == "train", "label"])
        missing = [source.describe(c) for c in source.classes if c not in trained]
        if missing:
            raise formats.DataError(f"classes with no usable image in the train split: {'; '.join(missing)}")


def dataset_hash(manifest: pd.DataFrame) -> str:
    """One hash for the whole dataset: pixels, labels and fixed splits of every image, order-free."""
    rows = sorted(zip(manifest["sha256"], manifest["label"], manifest["source_split"], strict=True))
    return formats.pixel_sha256(np.frombuffer("\n".join(" ".join(r) for r in rows).encode(), np.uint8))


def statistics(
    manifest: pd.DataFrame, classes: tuple[str, ...], excluded: list[Excluded], candidates: int
) -> dict[str, float | int]:
    rejected = Counter(e.code for e in excluded if e.status == "rejected")
    counts = manifest["label"].value_counts()
    stats: dict[str, float | int] = {
        "images": len(manifest),
        "classes": len(classes),
        "candidates": candidates,
        "rejected": sum(rejected.values()),
        "rejected_fraction": round(sum(rejected.values()) / max(candidates, 1), 6),
        "duplicates": sum(e.status == "duplicate" for e in excluded),
        "ignored": sum(e.status == "ignored" for e in excluded),
    }
    stats.update({f"rejected_by/{code}": rejected.get(code, 0) for code in REJECT_CODES})
    stats.update({f"per_class/{formats.metric_key(c)}": int(counts.get(c, 0)) for c in classes})
    return stats


def ingest(
    source: Source, params: DataParams, workers: int
) -> tuple[pd.DataFrame, list[Excluded], dict[str, float | int]]:
    items, excluded = source.scan()
    candidates = len(items) + sum(e.status == "rejected" for e in excluded)  # + what the scan itself rejected
    results = inspect_all(source, items, workers)
    manifest, rejected = build_manifest(items, results, fixed_split_source=isinstance(source, ArraySource))
    excluded = sorted(excluded + rejected, key=lambda e: e.path)
    check_rejections(candidates, excluded, params.max_bad_fraction)
    check_class_sizes(manifest, source, params.min_per_class)
    return manifest, excluded, statistics(manifest, source.classes, excluded, candidates)


DETAIL_KEYS = ("per_class/", "rejected_by/")  # to details.json: a column each would drown `dvc metrics show`


def main(argv: list[str] | None = None) -> None:
    args = cli.parse(argv, __doc__, cli.path("--out", "data/ingested"), cli.path("--live", "dvclive/ingest"))
    params = config.load("data", DataParams)
    with stage_run("ingest", {"data": params}, live_dir=args.live) as run:
        started = time.perf_counter()
        source = sources.open_source(params, fetch=download.fetch if params.download else None)
        manifest, excluded, stats = ingest(source, params, parallel.worker_count())
        digest = dataset_hash(manifest)
        with files.atomic_dir(args.out) as tmp:
            formats.write_table(tmp / "manifest.csv", manifest)
            files.write_json(tmp / "classes.json", list(source.classes))
            excluded_table = pd.DataFrame([vars(e) for e in excluded], columns=["path", "status", "code", "reason"])
            formats.write_table(tmp / "excluded.csv", excluded_table)
            source_files = source.dataset.files if isinstance(source, ArraySource) else {}
            description = {"source": params.source, "sha256": digest, "images": len(manifest),
                           "classes": len(source.classes), "source_files": source_files}
            files.write_json(tmp / "dataset.json", description)
        run.set_tags({"dataset_sha256": digest, "data_source": params.source})
        detail = {k: v for k, v in stats.items() if k.startswith(DETAIL_KEYS)}
        run.log_summary({k: v for k, v in stats.items() if k not in detail})
        run.log_details(detail)
        seconds = time.perf_counter() - started
        run.log_timing({"ingest_seconds": seconds, "images_per_second": len(manifest) / seconds})
        run.log_artifact(args.out, "ingested")


if __name__ == "__main__":
    main()
