"""Where the candidate images come from, named by `data.source`, and the `data` params.

A source lists its candidates (`scan`: `candidates.Item`s and the files it leaves out) and
gives the canonical pixels of one (`pixels`). `folder.FolderSource` reads an image folder;
`arrays.ArraySource` wraps an array dataset that `standard` reads from the official files
(or scikit-learn's bundled digits).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from pipeline.config import check
from pipeline.data import images
from pipeline.data.sources import standard
from pipeline.data.sources.arrays import ArraySource
from pipeline.data.sources.folder import FolderSource

SourceName = Literal["folder", standard.Name]  # one list of names: the folder and the array datasets
SOURCES: tuple[str, ...] = get_args(SourceName)
Source = FolderSource | ArraySource


@dataclass(frozen=True)
class DataParams:
    source: SourceName = "digits"
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


def open_source(params: DataParams, fetch: standard.Fetch | None = None) -> Source:
    """The source named in params; an array dataset is read here, its missing files fetched
    with `fetch` when given (config has already refused any other name)."""
    if params.source == "folder":
        return FolderSource(Path(params.folder), params.limits)
    return ArraySource(standard.read_array_dataset(params.source, Path(params.root), fetch), params.limits)
