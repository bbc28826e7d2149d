"""An image-folder dataset (`data.source: folder`): class folders, optionally pre-split."""

from __future__ import annotations

import os
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from pipeline.data import images
from pipeline.data.formats import SPLITS, DataError
from pipeline.data.sources.candidates import Excluded, Item


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
            raise DataError(f"data.folder {self.folder}: no such folder; put one sub-folder per class there")
        names = {e.name for e in os.scandir(self.folder) if not images.is_ignored(e.name) and e.is_dir()}
        if names & set(SPLITS):
            if "train" not in names or names - set(SPLITS):
                raise DataError(
                    f"data.folder {self.folder}: has split folders {sorted(names & set(SPLITS))} beside "
                    f"{sorted(names - set(SPLITS)) or 'no train/'}; use either class folders only, or train/ "
                    "(plus optional val/ and test/) each holding the class folders"
                )
            roots = [(self.folder / s, s) for s in SPLITS if s in names]
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
                    reason = "a symbolic link to a folder, not followed"
                    excluded.append(Excluded(rel, "ignored", "linked_folder", reason))
            dirnames[:] = sorted(
                d for d in dirnames if not images.is_ignored(d) and not os.path.islink(os.path.join(dirpath, d))
            )
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
        raise DataError(f"data.folder {folder}: no class folders; expected {folder}/<class>/<image files>")
    by_key: dict[str, set[str]] = defaultdict(set)
    for name in class_dirs:
        by_key[unicodedata.normalize("NFC", name).casefold()].add(name)
    clashes = [sorted(names) for names in by_key.values() if len(names) > 1]
    if clashes:
        listed = "; ".join(" vs ".join(str(p) for n in group for p in class_dirs[n]) for group in clashes)
        raise DataError(
            f"class folders that differ only by case or Unicode normalisation: {listed}; rename them to one name"
        )
    # an item's class folder is <folder>/[<split>/]<label>
    found = Counter(folder / item.split / item.label if item.split else folder / item.label for item in items)
    empty = [str(p) for paths in class_dirs.values() for p in paths if found[p] == 0]
    if empty:
        raise DataError(f"empty class folders (no image files): {', '.join(sorted(empty))}; remove them or add images")
    if len(class_dirs) < 2:
        raise DataError(
            f"data.folder {folder}: only one class folder ({next(iter(class_dirs))}); a classifier needs at least two"
        )
    return tuple(sorted(class_dirs))
