"""Atomic writes, and checksums that the next stage verifies.

Each writer goes to a temporary sibling and renames it into place, so a stage that fails
half-way never leaves a half-written model, split or report for the next stage to read.

A folder written whole (`atomic_dir`: ingested and prepared data, model folders, exports)
gets a `SHA256SUMS` file listing every file's hash, in the format `sha256sum -c` reads. A
stage that reads the folder calls `verify_folder` first: a byte flipped later (a damaged DVC
cache object that `dvc checkout` linked back, an edit, a bad disk) stops it with the file's
name instead of feeding it to the model. DVC itself does not check what it checks out.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import ArtifactError

CHECKSUMS = "SHA256SUMS"


def write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:  # a failed write() names no file (ENOSPC)
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    """Sorted keys and a trailing newline: the same object always gives the same bytes."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: Path, checksums: bool = True) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it gets its SHA256SUMS (with `checksums`)
    and replaces `path` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if checksums:
            write_checksums(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and (exc.filename is None or str(exc.filename).startswith(str(tmp))):
            # name the output the user knows, not the temporary folder (or nothing: ENOSPC in write())
            name = path / Path(exc.filename).relative_to(tmp) if exc.filename else path
            raise OSError(exc.errno, exc.strerror, str(name)) from exc
        raise


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(folder: Path) -> None:
    """`folder`/SHA256SUMS: `<sha256>  <relative path>` for every other file under it, sorted."""
    folder = Path(folder)
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    lines = [f"{sha256_file(folder / name)}  {name}\n" for name in names if name != CHECKSUMS]
    write_text(folder / CHECKSUMS, "".join(lines))


def read_checksums(folder: Path) -> dict[str, str]:
    """`folder`/SHA256SUMS as {relative path: sha256}; FileNotFoundError when it is missing."""
    lines = (Path(folder) / CHECKSUMS).read_text().splitlines()
    return {name: expected for expected, _, name in (line.partition("  ") for line in lines)}


def verify_folder(folder: Path, producer: str) -> None:
    """Check every file `folder`/SHA256SUMS lists; `producer` is the stage that writes the folder."""
    folder = Path(folder)
    listing = folder / CHECKSUMS
    rebuild = f"rebuild it with `dvc repro -f -s {producer}`"
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: not found; {rebuild} (or `dvc checkout {folder}`)")
    try:
        listed = read_checksums(folder)
    except FileNotFoundError:
        raise ArtifactError(f"{listing}: missing, so {folder} cannot be verified (written by an older "
                            f"version, or not by the {producer} stage); {rebuild}") from None
    for name, expected in listed.items():
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in {listing} but missing; `dvc checkout {folder}` or {rebuild}")
        if sha256_file(path) != expected:
            raise ArtifactError(
                f"{path}: its content differs from the sha256 that {listing} recorded when it was written "
                f"(corrupted or edited); {rebuild}")
