"""Ingest: find, decode and validate every image of the dataset named by `data.source`.

Reads `data.folder` (source `folder`: one sub-folder per class, optionally under `train/`,
`val/`, `test/`), the standard files under `data.root` (`mnist`, `fashion_mnist`, `kmnist`,
`cifar10`) or scikit-learn's bundled digits. Writes `data/ingested/`:
- `manifest.csv`: one row per usable image: path, label, source_split (the split the source
  fixes, or empty), sha256 of the decoded pixels, width, height, mode (L or RGB after
  conversion), file_mode (the file's own), phash (perceptual hash, for near-duplicates);
- `classes.json`: the class names, index i meaning class i everywhere downstream;
- `excluded.csv`: every file left out and why (rejected, duplicate or ignored);
- `dataset.json`: the source and the dataset's hash.
Data statistics go to `dvclive/ingest/metrics.json` and MLflow.

Every image is decoded once here, in worker processes on every core, and only its hashes
are kept, never its pixels: memory stays flat however large the dataset. A bad file is
excluded and counted; the stage fails only past `data.max_bad_fraction`, with one message.
"""

from __future__ import annotations

from pipeline import tracking

if __name__ == "__main__":
    # MLflow's start-up (~4 s) runs in a worker process while this one works.
    tracking.start_worker()

import argparse
import os
import time
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from pipeline import config, data, files, images, parallel, sources
from pipeline.config import check

SOURCES = ("digits", "folder", *sources.STANDARD)
SPLIT_FOLDERS = ("train", "val", "test")
REJECT_CODES = (
    "empty", "undecodable", "unsupported_format", "unsupported_mode", "too_many_pixels", "too_small",
    "unreadable", "broken_symlink", "crashed_decoder", "outside_class_folder", "label_conflict",
)  # fmt: skip


@dataclass(frozen=True)
class DataParams:
    source: Literal["digits", "folder", "mnist", "fashion_mnist", "kmnist", "cifar10"] = "digits"
    folder: str = "data/sources"  # source folder: the image-folder dataset
    root: str = "data/sources"  # standard sources: torchvision's layout under here
    download: bool = True  # fetch missing standard files through torchvision when online
    max_bad_fraction: float = 0.01  # rejected / candidate images above this fails the stage
    max_pixels: int = 64_000_000  # width x height claimed by a header; more is refused undecoded
    min_side: int = 8
    min_per_class: int = 10

    def __post_init__(self) -> None:
        check(0 <= self.max_bad_fraction <= 1, "max_bad_fraction", f"must be in [0, 1], got {self.max_bad_fraction}")
        check(self.max_pixels >= 1, "max_pixels", f"must be at least 1, got {self.max_pixels}")
        check(self.min_side >= 1, "min_side", f"must be at least 1, got {self.min_side}")
        check(self.min_per_class >= 1, "min_per_class", f"must be at least 1, got {self.min_per_class}")

    @property
    def limits(self) -> images.Limits:
        return images.Limits(max_pixels=self.max_pixels, min_side=self.min_side)


@dataclass(frozen=True)
class Item:
    """One candidate image: `path` is what reports show (relative to data.folder, or
    "<split>/<index>" in an array dataset), `split` what the source fixes ("" if nothing)."""

    path: str
    label: str
    split: str = ""
    index: int = -1  # row in the array dataset's split; -1 for files


@dataclass(frozen=True)
class Excluded:
    path: str
    status: Literal["rejected", "duplicate", "ignored"]
    code: str
    reason: str


# -- sources: a list of candidate items, and the pixels of one item -----------------------


class FolderSource:
    """An image-folder dataset, laid out as torchvision's ImageFolder and Keras'
    image_dataset_from_directory expect: <folder>/<class>/**/<image>, or the same under
    <folder>/train/, <folder>/val/ and <folder>/test/ when the split is fixed."""

    def __init__(self, folder: Path, limits: images.Limits) -> None:
        self.folder = Path(folder)
        self.limits = limits
        self.classes: tuple[str, ...] = ()
        self.class_dirs: dict[str, list[Path]] = {}

    def scan(self) -> tuple[list[Item], list[Excluded]]:
        if not self.folder.is_dir():
            raise data.DataError(f"data.folder {self.folder}: no such folder; put one sub-folder per class there")
        names = {e.name for e in os.scandir(self.folder) if not images.is_ignored(e.name) and e.is_dir()}
        if names & set(SPLIT_FOLDERS):
            if "train" not in names or names - set(SPLIT_FOLDERS):
                raise data.DataError(
                    f"data.folder {self.folder}: has split folders {sorted(names & set(SPLIT_FOLDERS))} beside "
                    f"{sorted(names - set(SPLIT_FOLDERS)) or 'no train/'}; use either class folders only, or train/ "
                    "(plus optional val/ and test/) each holding the class folders"
                )
            roots = [(self.folder / s, s) for s in SPLIT_FOLDERS if s in names]
        else:
            roots = [(self.folder, "")]
        items: list[Item] = []
        excluded: list[Excluded] = []
        if roots[0][1]:  # pre-split: loose files beside train/ val/ test/ are reported too
            for entry in sorted(os.scandir(self.folder), key=lambda e: e.name):
                if not entry.is_dir():
                    excluded.append(self._loose(entry.name, entry.name, "."))
        class_dirs: dict[str, list[Path]] = defaultdict(list)
        for root, split in roots:
            for entry in sorted(os.scandir(root), key=lambda e: e.name):
                if entry.is_dir() and not images.is_ignored(entry.name):
                    class_dirs[entry.name].append(Path(entry.path))
                    items += self._walk(Path(entry.path), entry.name, split, excluded)
                else:
                    excluded.append(self._loose(os.path.relpath(entry.path, self.folder), entry.name, split or "."))
        self.class_dirs = dict(class_dirs)
        self.classes = check_class_folders(self.folder, self.class_dirs, items)
        return items, excluded

    def describe(self, label: str) -> str:
        return " and ".join(str(p) for p in self.class_dirs.get(label, [self.folder / label]))

    @staticmethod
    def _loose(rel: str, name: str, where: str) -> Excluded:
        """A file or hidden folder where class folders belong."""
        if images.is_ignored(name):
            return Excluded(rel, "ignored", "hidden", "hidden file or OS metadata")
        if images.has_image_extension(name):
            return Excluded(rel, "rejected", "outside_class_folder", f"not inside a class folder of {where}")
        return Excluded(rel, "ignored", "not_an_image", "no image file extension")

    def _walk(self, class_dir: Path, label: str, split: str, excluded: list[Excluded]) -> list[Item]:
        found = []

        def unreadable(error: OSError) -> None:  # os.walk would skip an unreadable folder silently
            rel = os.path.relpath(error.filename, self.folder)
            excluded.append(Excluded(rel, "rejected", "unreadable", f"cannot list the folder: {error.strerror}"))

        for dirpath, dirnames, filenames in os.walk(class_dir, onerror=unreadable):
            for name in dirnames:  # not followed: a link can loop, or pull in another class's images
                if os.path.islink(os.path.join(dirpath, name)):
                    rel = os.path.relpath(os.path.join(dirpath, name), self.folder)
                    excluded.append(Excluded(rel, "ignored", "linked_folder", "a symbolic link to a folder, not followed"))
            dirnames[:] = sorted(d for d in dirnames if not images.is_ignored(d) and not os.path.islink(os.path.join(dirpath, d)))
            for name in sorted(filenames):
                rel = os.path.relpath(os.path.join(dirpath, name), self.folder)
                if images.is_ignored(name):
                    excluded.append(Excluded(rel, "ignored", "hidden", "hidden file or OS metadata"))
                elif images.has_image_extension(name):
                    found.append(Item(rel, label, split))
                else:
                    excluded.append(Excluded(rel, "ignored", "not_an_image", "no image file extension"))
        return found

    def item(self, path: str, label: str, split: str) -> Item:
        return Item(path, label, split)

    def pixels(self, item: Item) -> tuple[np.ndarray, str]:
        return images.decode_file(self.folder / item.path, self.limits)


def check_class_folders(folder: Path, class_dirs: dict[str, list[Path]], items: list[Item]) -> tuple[str, ...]:
    """Class folders must be usable as labels: at least two, none empty, none that differ
    only by case or Unicode normalisation (they would be one class on macOS and Windows)."""
    if not class_dirs:
        raise data.DataError(f"data.folder {folder}: no class folders; expected {folder}/<class>/<image files>")
    by_key: dict[str, set[str]] = defaultdict(set)
    for name in class_dirs:
        by_key[unicodedata.normalize("NFC", name).casefold()].add(name)
    clashes = [sorted(names) for names in by_key.values() if len(names) > 1]
    if clashes:
        listed = "; ".join(" vs ".join(str(p) for n in group for p in class_dirs[n]) for group in clashes)
        raise data.DataError(f"class folders that differ only by case or Unicode normalisation: {listed}; rename them to one name")
    # an item's class folder is <folder>/[<split>/]<label>
    found = Counter(folder / item.split / item.label if item.split else folder / item.label for item in items)
    empty = [str(p) for paths in class_dirs.values() for p in paths if found[p] == 0]
    if empty:
        raise data.DataError(f"empty class folders (no image files): {', '.join(sorted(empty))}; remove them or add images")
    if len(class_dirs) < 2:
        raise data.DataError(f"data.folder {folder}: only one class folder ({next(iter(class_dirs))}); a classifier needs at least two")
    return tuple(sorted(class_dirs))


class ArraySource:
    """A dataset whose images are arrays already (digits, the IDX and CIFAR files)."""

    def __init__(self, dataset: sources.ArrayDataset, limits: images.Limits) -> None:
        self.dataset = dataset
        self.limits = limits
        self.classes = dataset.classes

    def describe(self, label: str) -> str:
        return f"{self.dataset.name} class {label!r}"

    def scan(self) -> tuple[list[Item], list[Excluded]]:
        items = []
        for split, (pixels, labels) in sorted(self.dataset.splits.items()):
            width = len(str(max(len(labels) - 1, 0)))
            prefix = f"{split}/" if split else ""
            items += [Item(f"{prefix}{i:0{width}d}", self.classes[int(y)], split, i) for i, y in enumerate(labels)]
        return items, []

    def item(self, path: str, label: str, split: str) -> Item:
        return Item(path, label, split, int(path.rsplit("/", 1)[-1]))  # "<split>/<index>" or "<index>"

    def pixels(self, item: Item) -> tuple[np.ndarray, str]:
        pixels = self.dataset.splits[item.split][0][item.index]
        images.check_size((pixels.shape[1], pixels.shape[0]), self.limits)
        return pixels, "L" if pixels.ndim == 2 else "RGB"


Source = FolderSource | ArraySource


def open_source(params: DataParams) -> Source:
    """The source named in params; the standard ones are read (or downloaded) here."""
    if params.source == "folder":
        return FolderSource(Path(params.folder), params.limits)
    if params.source in SOURCES:
        return ArraySource(sources.read_array_dataset(params.source, Path(params.root), params.download), params.limits)
    raise config.ConfigError(f"params.yaml: data.source: unknown source {params.source!r}; valid: {list(SOURCES)}")


# -- inspection: runs in worker processes ---------------------------------------------------

_SOURCE: Source | None = None  # set in each worker by _use_source


def _use_source(source: Source) -> None:
    global _SOURCE
    _SOURCE = source


def inspect(item: Item) -> tuple:
    """(code, reason) for a rejected image, else (sha256, width, height, mode, file_mode, phash)."""
    assert _SOURCE is not None
    try:
        pixels, file_mode = _SOURCE.pixels(item)
    except images.Rejected as rejected:
        return (rejected.code, str(rejected))
    height, width = pixels.shape[:2]
    mode = "L" if pixels.ndim == 2 else "RGB"
    return (data.pixel_sha256(pixels), width, height, mode, file_mode, images.phash(pixels))


def _inspect_batch(batch: Sequence[Item]) -> list[tuple]:
    return [inspect(item) for item in batch]


def _crashed(item: Item) -> tuple:
    return ("crashed_decoder", "the decoder crashed its process on this file")


def inspect_all(source: Source, items: list[Item], workers: int) -> list[tuple]:
    return parallel.map_batches(_inspect_batch, items, _crashed, workers, 2048, _use_source, (source,))


# -- the rules: duplicates, rejections, class sizes ------------------------------------------


def build_manifest(items: list[Item], results: list[tuple], fixed_split_source: bool) -> tuple[pd.DataFrame, list[Excluded]]:
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
    columns = list(data.MANIFEST_COLUMNS)
    manifest = pd.DataFrame(rows, columns=columns).sort_values("path", kind="stable", ignore_index=True)
    drop: set[int] = set()
    copies = manifest[manifest["sha256"].duplicated(keep=False)]  # grouping only these: 60k groups cost seconds
    for _, group in copies.groupby("sha256", sort=True):
        paths = group["path"].tolist()
        if group["label"].nunique() > 1:
            listing = ", ".join(f"{p} ({lab})" for p, lab in zip(paths, group["label"], strict=True))
            for p in paths:
                excluded.append(Excluded(p, "rejected", "label_conflict", f"same pixels under different labels: {listing}"))
            drop.update(group.index)
            continue
        splits = group["source_split"]
        if splits.nunique() > 1:
            if not fixed_split_source:
                a, b = group.drop_duplicates("source_split")["path"].tolist()[:2]
                raise data.DataError(f"the same image is in two splits: {a} and {b}; remove one copy (a test image seen in training inflates accuracy)")
            keep = group.index[splits == "test"][0] if (splits == "test").any() else group.index[0]
        else:
            keep = group.index[0]
        kept_path = manifest.at[keep, "path"]
        for index in group.index:
            if index != keep:
                excluded.append(Excluded(manifest.at[index, "path"], "duplicate", "duplicate", f"same pixels as {kept_path}"))
                drop.add(index)
    manifest = manifest.drop(index=sorted(drop)).reset_index(drop=True)
    return manifest, sorted(excluded, key=lambda e: e.path)


def check_rejections(candidates: int, excluded: list[Excluded], max_bad_fraction: float) -> None:
    rejected = [e for e in excluded if e.status == "rejected"]
    if candidates and len(rejected) / candidates > max_bad_fraction:
        by_code = Counter(e.code for e in rejected)
        examples = "\n".join(f"  {e.path}: {e.reason}" for e in rejected[:10])
        more = f"\n  ... and {len(rejected) - 10} more" if len(rejected) > 10 else ""
        raise data.DataError(
            f"{len(rejected)} of {candidates} images rejected ({len(rejected) / candidates:.1%}), over "
            f"data.max_bad_fraction {max_bad_fraction:.1%}; by reason: {dict(sorted(by_code.items()))}\n{examples}{more}"
        )


def check_class_sizes(manifest: pd.DataFrame, source: Source, min_per_class: int) -> None:
    counts = manifest["label"].value_counts()
    small = {c: int(counts.get(c, 0)) for c in source.classes if counts.get(c, 0) < min_per_class}
    if small:
        listing = "; ".join(f"{source.describe(c)}: {n}" for c, n in sorted(small.items()))
        raise data.DataError(f"classes with fewer than data.min_per_class={min_per_class} usable images: {listing}")
    if (manifest["source_split"] != "").any():
        trained = set(manifest.loc[manifest["source_split"] == "train", "label"])
        missing = [source.describe(c) for c in source.classes if c not in trained]
        if missing:
            raise data.DataError(f"classes with no usable image in the train split: {'; '.join(missing)}")


def dataset_hash(manifest: pd.DataFrame) -> str:
    """One hash for the whole dataset: pixels, labels and fixed splits of every image, order-free."""
    rows = sorted(zip(manifest["sha256"], manifest["label"], manifest["source_split"], strict=True))
    return data.pixel_sha256(np.frombuffer("\n".join(" ".join(r) for r in rows).encode(), np.uint8))


def statistics(manifest: pd.DataFrame, classes: tuple[str, ...], excluded: list[Excluded], candidates: int) -> dict[str, float | int]:
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
    stats.update({f"per_class/{data.metric_key(c)}": int(counts.get(c, 0)) for c in classes})
    return stats


def ingest(source: Source, params: DataParams, workers: int) -> tuple[pd.DataFrame, list[Excluded], dict[str, float | int]]:
    items, excluded = source.scan()
    candidates = len(items) + sum(e.status == "rejected" for e in excluded)  # + what the scan itself rejected
    results = inspect_all(source, items, workers)
    manifest, rejected = build_manifest(items, results, fixed_split_source=isinstance(source, ArraySource))
    excluded = sorted(excluded + rejected, key=lambda e: e.path)
    check_rejections(candidates, excluded, params.max_bad_fraction)
    check_class_sizes(manifest, source, params.min_per_class)
    return manifest, excluded, statistics(manifest, source.classes, excluded, candidates)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/ingested"))
    parser.add_argument("--live", type=Path, default=Path("dvclive/ingest"))
    args = parser.parse_args(argv)
    params = config.load("data", DataParams)
    with tracking.stage_run("ingest", {"data": params}, live_dir=args.live) as run:
        started = time.perf_counter()
        source = open_source(params)
        manifest, excluded, stats = ingest(source, params, parallel.worker_count())
        digest = dataset_hash(manifest)
        with files.atomic_dir(args.out) as tmp:
            data.write_table(tmp / "manifest.csv", manifest)
            files.write_json(tmp / "classes.json", list(source.classes))
            data.write_table(tmp / "excluded.csv", pd.DataFrame([vars(e) for e in excluded], columns=["path", "status", "code", "reason"]))
            source_files = source.dataset.files if isinstance(source, ArraySource) else {}
            files.write_json(tmp / "dataset.json", {"source": params.source, "sha256": digest, "images": len(manifest),
                                                    "classes": len(source.classes), "source_files": source_files})
        run.set_tags({"dataset_sha256": digest, "data_source": params.source})
        run.log_summary(stats)
        seconds = time.perf_counter() - started
        run.log_timing({"ingest_seconds": seconds, "images_per_second": len(manifest) / seconds})
        run.log_artifact(args.out, "ingested")


if __name__ == "__main__":
    main()
