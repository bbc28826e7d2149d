"""Reviewed changes to the labels: the user's exclude file that prepare applies, and the rows the
audit stage applies on its own only where `audit.apply` says so.

The exclude file (`data/review/exclude.csv`, tracked in git) is a CSV with the columns `path`
(as in the ingest manifest), `action` (`drop` or `relabel`) and `label` (the new class, for
`relabel`; empty for `drop`), plus any columns of the user's own (a note, say), which are
ignored. No file, or a header alone, changes nothing. Every row is checked before anything is
applied: a path that is not an image of the dataset, an unknown action or class, or a path
listed twice stops the stage with one line naming the row.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import files
from pipeline.data import formats
from pipeline.data.formats import DataError, Split

ACTIONS = ("drop", "relabel")
COLUMNS = ("path", "action", "label")


@dataclass(frozen=True)
class Change:
    path: str
    action: str  # one of ACTIONS
    label: str  # the new class for relabel, "" for drop


def read_changes(path: Path, known_paths: Sequence[str], classes: Sequence[str]) -> list[Change]:
    """The file's rows, checked against the dataset's paths and classes; [] when it is absent."""
    if not path.is_file():
        return []
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            rows, header = list(reader), reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read it as a UTF-8 CSV ({exc})") from exc
    missing = [c for c in COLUMNS if c not in header]
    if rows and missing:
        raise DataError(f"{path}: missing column(s) {missing}; the header must hold {','.join(COLUMNS)}")
    known, valid, seen, changes = set(known_paths), set(classes), set(), []
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"{path} line {line}"
        item, action, label = ((row.get(c) or "").strip() for c in COLUMNS)
        if item not in known:
            example = next(iter(sorted(known)), "")
            raise DataError(f"{where}: path {item!r} is not an image of this dataset (paths as in "
                            f"data/ingested/manifest.csv, e.g. {example!r})")
        if action not in ACTIONS:
            raise DataError(f"{where}: action {action!r} must be one of {', '.join(ACTIONS)}")
        if action == "relabel" and label not in valid:
            raise DataError(f"{where}: label {label!r} is not a class (classes: {', '.join(classes)})")
        if action == "drop" and label:
            raise DataError(f"{where}: a drop takes no label (got {label!r}); to change it use relabel")
        if item in seen:
            raise DataError(f"{where}: path {item!r} is listed twice")
        seen.add(item)
        changes.append(Change(item, action, label))
    return changes


def counts(changes: list[Change], path: Path) -> dict[str, int | str]:
    """How many images the reviewed file drops and relabels, and which file: what prepare
    records beside the dataset's identity and the report states under its table's title."""
    return {"file": Path(path).as_posix(), "dropped": sum(c.action == "drop" for c in changes),
            "relabelled": sum(c.action == "relabel" for c in changes)}


def apply_to_manifest(manifest, changes: list[Change]):
    """The manifest (a DataFrame with `path` and `label`) less the dropped rows, relabelled rows
    carrying their new label and all rows their ingested one as `given_label` (a folder source
    finds the file by it); the order of the rest is kept."""
    drop = {c.path for c in changes if c.action == "drop"}
    relabel = {c.path: c.label for c in changes if c.action == "relabel"}
    kept = manifest[~manifest["path"].isin(drop)].copy()
    kept["given_label"] = kept["label"]
    kept["label"] = [relabel.get(p, label) for p, label in zip(kept["path"], kept["label"], strict=True)]
    return kept.reset_index(drop=True)


def write_changes(path: Path, changes: list[tuple[str, str, str, str]]) -> None:
    """A file in the exclude file's format, with a `reason` column: (path, action, label, reason)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerows([(*COLUMNS, "reason"), *changes])
    files.write_text(path, text.getvalue())


def load_training(prepared: Path, applied: Path | None) -> tuple[Split, Split]:
    """The train and val splits with the audit's applied changes (`audit.apply`), if any."""
    return apply_to_split(formats.load_split(prepared, "train"), "train", applied), \
        apply_to_split(formats.load_split(prepared, "val"), "val", applied)


def flagged(issues: Path | None, split: str) -> set[int] | None:
    """The indices of `split`'s images the audit flagged (`data/audit/issues.csv`); None without it."""
    if issues is None or not issues.is_file():
        return None
    with issues.open(newline="", encoding="utf-8") as handle:
        return {int(r["index"]) for r in csv.DictReader(handle) if r["split"] == split}


def apply_to_split(split: Split, name: str, applied: Path | None) -> Split:
    """`split` with the audit's applied rows for it (`data/audit/applied.csv`: split, index,
    action, label index) dropped or relabelled; unchanged when `applied` is None or has none."""
    if applied is None:
        return split
    with applied.open(newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"] == name]
    if not rows:
        return split
    labels = split.labels.copy()
    keep = np.ones(len(split), dtype=bool)
    for row in rows:
        index = int(row["index"])
        if row["action"] == "drop":
            keep[index] = False
        else:
            labels[index] = int(row["label"])
    return Split(images=np.asarray(split.images)[keep], labels=labels[keep], classes=split.classes)
