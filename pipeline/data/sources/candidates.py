"""What a source lists: candidate images (`Item`) and the files it leaves out (`Excluded`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


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
