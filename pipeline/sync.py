"""Make the MLflow store mirror the result DVC holds: a run for every stage that dvc.lock records.

`python -m pipeline sync` (the last, `always_changed` stage of dvc.yaml, so every `dvc repro` and
`dvc exp run` ends with it; `make mlflow-ui` runs it too, for a `dvc checkout` or `dvc exp
apply`). Reads dvc.lock, the outputs it records (the DVCLive metrics and plots, the models,
exports and report), `dvclive/register/selection.json` and the store; writes nothing DVC
tracks, only MLflow runs, tags and registry entries.

A stage's recorded state is named by a digest of its dvc.lock entry (its command, deps,
params and outs hashes: what DVC itself computed), tagged `pipeline.lock_digest` on the run
that holds it. For each stage whose digest no FINISHED run carries:
- the stage ran in this `dvc repro` / `dvc exp run` (same driver): its run is tagged (adopted);
- DVC skipped it, restored it from the run-cache, or `dvc checkout` / `dvc exp apply` put its
  outputs back: a run is made from what DVC holds (params from dvc.lock, metrics, curves,
  figures, artifacts and, for an export, the logged model), tagged `pipeline.restored_from`
  with the commit, and no timings, since nothing was timed.
Then the registry: the alias `dvclive/register/selection.json` names must exist, held by a
version of the chosen ONNX file (`tracking.models.register`'s rule decides who holds it).

Nothing missing: one read of dvc.lock and one query of the SQLite store, without importing
MLflow (`bench/pipeline.py` times it; the target is under 2 s). Otherwise
`tracking.restore` does the work, under a lock on the store so parallel experiments make one
run per state, not two.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

from pipeline.tracking import lockfile, store
from pipeline.tracking.lockfile import LOCK_TAG

SELECTION = Path("dvclive/register/selection.json")
STAGE = "sync"  # this stage: it has no run of its own


def selection(root: Path) -> dict | None:
    try:
        found = json.loads((root / SELECTION).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and {"registered_model", "alias", "onnx_sha256"} <= set(found) else None


def mirrored(db: Path, experiment: str, digests: set[str], chosen: dict | None) -> bool | None:
    """Whether the SQLite store at `db` holds a FINISHED run for every digest and the chosen
    model's alias; None when the store cannot say (no such file, another schema): then MLflow
    itself is asked."""
    if not db.is_file():
        return False
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
            found = {row[0] for row in con.execute(
                "SELECT t.value FROM tags t JOIN runs r ON r.run_uuid = t.run_uuid "
                "JOIN experiments e ON e.experiment_id = r.experiment_id "
                "WHERE t.key = ? AND r.status = 'FINISHED' AND r.lifecycle_stage = 'active' AND e.name = ?",
                (LOCK_TAG, experiment))}
            if not digests <= found:
                return False
            if chosen is None:
                return True
            alias = con.execute(
                "SELECT 1 FROM registered_model_aliases a WHERE a.name = ? AND a.alias = ?",
                (chosen["registered_model"], chosen["alias"])).fetchone()
            version = con.execute(
                "SELECT 1 FROM model_version_tags WHERE name = ? AND key = ? AND value = ?",
                (chosen["registered_model"], "pipeline.onnx_sha256", chosen["onnx_sha256"])).fetchone()
            return alias is not None and version is not None
    except sqlite3.Error:
        return None


def main(argv: list[str] | None = None) -> None:
    root = store.repo_root()
    workdir = Path.cwd()  # DVC's copy for queued and --temp runs: its dvc.lock and outputs
    stages = lockfile.stages(workdir, skip=STAGE)
    if not stages:
        print("sync: no dvc.lock yet; nothing to mirror")
        return
    digests = {name: lockfile.digest(entry) for name, entry in stages.items()}
    chosen = selection(workdir) if "register" in stages else None
    uri = store.tracking_uri(root)
    db = store.sqlite_file(uri)
    if db is not None and mirrored(Path(db), store.experiment_name(), set(digests.values()), chosen):
        return
    from pipeline.tracking import restore  # MLflow: only when something is missing

    summary = restore.reconcile(root, workdir, uri, stages, digests, chosen)
    print(f"sync: {summary}", file=sys.stderr)


if __name__ == "__main__":
    main()
