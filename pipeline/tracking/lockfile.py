"""dvc.lock read back: each stage's recorded state, and whether the workspace holds it.

A stage's state is named by a digest of its dvc.lock entry (command, deps, params and outs
hashes, as DVC computed them); an output is checked with DVC's own hashes (md5 of a file's
bytes; for a folder, the md5 of its sorted file list, as dvc-data's Tree computes it), so
nothing here needs DVC, whose repository lock a running `dvc repro` holds.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

LOCK_FILE = Path("dvc.lock")
LOCK_TAG = "pipeline.lock_digest"  # on an MLflow run: the dvc.lock state it holds


def stages(root: Path, skip: str = "") -> dict[str, dict]:
    """dvc.lock's stages, in its order, less `skip`; {} when there is none yet."""
    import yaml

    path = root / LOCK_FILE
    if not path.is_file():
        return {}
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    stages = (yaml.load(path.read_text(), Loader=loader) or {}).get("stages") or {}  # noqa: S506 (a safe loader)
    return {name: entry for name, entry in stages.items() if name != skip}


def digest(entry: dict) -> str:
    """A stage's recorded state: its dvc.lock entry, canonically serialised."""
    return hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()[:20]


def dir_md5(folder: Path) -> str:
    """DVC's hash of a folder (dvc-data's Tree: the md5 of its sorted file list, + '.dir')."""
    listing = sorted(({"md5": file_md5(p), "relpath": p.relative_to(folder).as_posix()}
                      for p in folder.rglob("*") if p.is_file()), key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(listing, sort_keys=True).encode()).hexdigest() + ".dir"  # noqa: S324 (DVC's hash)


def file_md5(path: Path) -> str:
    h = hashlib.md5()  # noqa: S324 (DVC's hash)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def out_differs(workdir: Path, out: dict[str, Any]) -> str | None:
    """Why an output in the workspace is not the one dvc.lock records, or None."""
    path = workdir / out["path"]
    expected = out.get("md5")
    if not path.exists():
        return f"{out['path']} is missing"
    actual = dir_md5(path) if path.is_dir() else file_md5(path)
    return None if actual == expected else f"{out['path']} differs from dvc.lock"
