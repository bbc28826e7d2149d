"""A dataset whose images are arrays already: the digits and the standard datasets' files."""

from __future__ import annotations

import numpy as np

from pipeline.data import images
from pipeline.data.sources.candidates import Excluded, Item
from pipeline.data.sources.standard import ArrayDataset


class ArraySource:
    """A dataset whose images are arrays already (digits, the IDX and CIFAR files)."""

    def __init__(self, dataset: ArrayDataset, limits: images.Limits) -> None:
        self.dataset = dataset
        self.limits = limits
        self.classes = dataset.classes

    def describe(self, label: str) -> str:
        return f"{self.dataset.name} class {label!r}"

    def scan(self) -> tuple[list[Item], list[Excluded]]:
        items = []
        for split, (_, labels) in sorted(self.dataset.splits.items()):
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
