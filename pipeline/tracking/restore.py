"""`pipeline.sync`'s MLflow half: runs made from what DVC holds, the registry's alias, the parent.

Only `sync` imports this (it imports MLflow). A restored run holds what the stage's live run
would, read back from its outputs: params (dvc.lock's values), final metrics (the DVCLive
`metrics.json` / `details.json`), per-epoch curves (`plots/metrics/*.tsv`, with their steps),
figures under `plots/`, the stage's JSON reports, its artifacts (the model folder, the export
and its logged MLflow model with evaluate's metrics linked, the report) and its dataset.
It carries no timings: nothing ran. Its outputs are checked against dvc.lock first, so a run
never claims a state the files in the workspace do not hold.
"""

from __future__ import annotations

import csv
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import files
from pipeline.data import formats
from pipeline.runtime import workspace
from pipeline.tracking import connect, lockfile, models, store, worker

RESTORED_TAG = "pipeline.restored_from"  # the commit whose dvc.lock recorded the state
ARTIFACT_FOLDERS = {"ingest": "ingested", "train": "model", "finetune": "model", "export": "export"}
# reports for people: the markdown under the stage's name, its images folder beneath it (as the stages log them)
REPORT_IMAGES = {"reports/images": "report/images", "reports/audit": "audit/audit"}
# what prepare and audit log of their folders (not the arrays, not the features), and where
LOGGED_FILES = {"prepare": ("prepared", ("manifest.csv", "near_duplicates.csv")),
                "audit": ("audit", ("issues.csv", "proposal.csv"))}
DATASET_CONTEXT = {"train": "training", "finetune": "training", "crossval": "training",
                   "evaluate": "evaluation", "export": "evaluation"}
PREPARED = Path("data/prepared")
NOTE = ("Restored by `python -m pipeline sync` from what DVC holds (dvc.lock of commit {commit}): DVC did not run "
        "this stage here (skipped as unchanged, restored from the run-cache, or checked out). Params, metrics, "
        "curves, figures and artifacts are the recorded outputs'; there are no timings, as nothing was timed.")


def say(message: str) -> None:
    print(f"sync: {message}", file=sys.stderr, flush=True)


def leaves(tree: Any, prefix: str = "") -> dict[str, float]:
    """{'test': {'acc': 0.9}} -> {'test/acc': 0.9}: numbers only, as DVCLive nests them."""
    if isinstance(tree, dict):
        out: dict[str, float] = {}
        for key, value in tree.items():
            out.update(leaves(value, f"{prefix}{key}/"))
        return out
    is_number = isinstance(tree, int | float) and not isinstance(tree, bool)
    return {prefix.rstrip("/"): float(tree)} if is_number else {}


def curves(live: Path) -> dict[str, list[tuple[int, float]]]:
    """DVCLive's per-step TSVs (`plots/metrics/<name>.tsv`: step, value) by metric name."""
    found = {}
    for path in sorted((live / "plots" / "metrics").rglob("*.tsv")):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        name = path.relative_to(live / "plots" / "metrics").with_suffix("").as_posix()
        column = name.rsplit("/", 1)[-1]
        found[name] = [(int(r["step"]), float(r[column])) for r in rows if r.get(column) not in (None, "")]
    return found


def live_dir(stage: str) -> Path:
    """The stage's DVCLive folder: dvclive/<stage>, or dvclive/<stage>/<model> for a foreach stage."""
    family, _, model = stage.partition("@")
    return Path("dvclive", family, model) if model else Path("dvclive", family)


def outs_differ(workdir: Path, entry: dict) -> str | None:
    return next(filter(None, (lockfile.out_differs(workdir, o) for o in entry.get("outs", []))), None)


class Restorer:
    """One store, one driver: finds what is missing and makes it."""

    def __init__(self, mlflow: Any, root: Path, workdir: Path, p: store.TrackingParams) -> None:
        self.mlflow, self.workdir, self.p = mlflow, workdir, p
        # the store may become the offline one (tracking.offline_fallback): the client after it
        self.experiment_id = connect.open_store(mlflow, mlflow.get_tracking_uri(), store.experiment_name(),
                                                        root, p)
        self.client = mlflow.MlflowClient()
        self.driver = workspace.driver().key
        self.git = store.git_tags(workdir)
        self._parent: str | None = None

    def call(self, fn: Any) -> Any:
        return connect.retrying(fn, self.p.lock_wait_seconds)

    def tagged(self) -> dict[str, str]:
        """digest -> run id of the FINISHED runs that carry one."""
        runs = self.call(lambda: self.client.search_runs(
            [self.experiment_id], f"attributes.status = 'FINISHED' and tags.`{lockfile.LOCK_TAG}` LIKE '%'",
            max_results=50000))
        return {r.data.tags[lockfile.LOCK_TAG]: r.info.run_id for r in runs}

    def own_run(self, stage: str) -> Any | None:
        """This driver's FINISHED live run of `stage` that no digest names yet."""
        query = (f"attributes.status = 'FINISHED' and tags.stage = '{stage}' and "
                 f"tags.`{store.DRIVER_TAG}` = '{self.driver}'")
        runs = self.call(lambda: self.client.search_runs([self.experiment_id], query, max_results=10))
        return next((r for r in runs if lockfile.LOCK_TAG not in r.data.tags and RESTORED_TAG not in r.data.tags), None)

    def parent(self, create: bool) -> str | None:
        if self._parent is None:
            query = f"tags.`{worker.GROUP_TAG}` = 'true' and tags.`{store.DRIVER_TAG}` = '{self.driver}'"
            found = self.call(lambda: self.client.search_runs([self.experiment_id], query, max_results=1))
            if found:
                self._parent = found[0].info.run_id
            elif create:
                name = store.group_name(self.git)
                if not workspace.driver().command.startswith("dvc "):  # run by hand (make mlflow-ui), not by DVC
                    name = name.replace("repro", "restored", 1)
                self._parent = worker.group_run(self.client, self.experiment_id, self.driver, name, self.p)
        return self._parent

    def restore(self, stage: str, entry: dict, digest: str) -> str:
        """A FINISHED run of `stage` made from its outputs; returns its id."""
        family, _, model = stage.partition("@")
        commit = self.git["git_commit"][:7]
        tags = {"stage": stage, store.DRIVER_TAG: self.driver, **self.git, lockfile.LOCK_TAG: digest,
                RESTORED_TAG: self.git["git_commit"], "mlflow.source.name": f"pipeline/{family}.py",
                "mlflow.source.type": "LOCAL", "mlflow.note.content": NOTE.format(commit=commit)}
        params = store.flatten((entry.get("params") or {}).get("params.yaml") or {})
        if model:
            tags["model"] = params["model"] = model
        mlflow = self.mlflow
        with tempfile.TemporaryDirectory(prefix=f"{store.SCRATCH_PREFIX}sync-") as scratch:
            run = self.call(lambda: mlflow.start_run(experiment_id=self.experiment_id, run_name=f"{stage} (restored)",
                                                     parent_run_id=self.parent(create=True), tags=tags))
            try:
                self.call(lambda: mlflow.log_params({k: str(v) for k, v in params.items()}))
                dataset = self.log_dataset(family)
                if (self.workdir / live_dir(stage)).is_dir():
                    self.log_live(self.workdir / live_dir(stage))
                self.log_artifacts(family, entry)
                if family == "export":
                    self.log_export(model, dataset, Path(scratch))
                self.call(lambda: mlflow.end_run("FINISHED"))
            except BaseException:
                self.call(lambda: mlflow.end_run("FAILED"))
                raise
        self.touch_parent()
        return run.info.run_id

    def log_dataset(self, family: str) -> Any:
        prepared = self.workdir / PREPARED
        if family not in DATASET_CONTEXT or not (prepared / "dataset.json").is_file():
            return None
        t = formats.dataset_tags(prepared)
        self.call(lambda: self.mlflow.set_tags(t))
        return self.call(lambda: worker.log_input(self.mlflow, t["data_source"], str(prepared.resolve()),
                                                           t["dataset_sha256"][:36], DATASET_CONTEXT[family],
                                                           self.parent(create=True)))

    def log_live(self, live: Path) -> None:
        from mlflow.entities import Metric

        summary: dict[str, float] = {}
        for name in ("metrics.json", "details.json"):
            if (live / name).is_file():
                summary.update(leaves(json.loads((live / name).read_text())))
        summary.pop("step", None)  # DVCLive's own step count, not a figure the stage logs
        now = int(time.time() * 1000)
        points = [Metric(k, v, now, 0) for k, v in summary.items()]
        points += [Metric(k, v, now, step) for k, series in curves(live).items() for step, v in series]
        run_id = self.mlflow.active_run().info.run_id
        for i in range(0, len(points), 1000):  # MLflow's batch limit
            self.call(lambda c=points[i:i + 1000]: self.client.log_batch(run_id, metrics=c))
        for path in sorted(live.glob("*.json")):
            if path.name not in ("metrics.json", "details.json"):
                self.call(lambda f=path: self.mlflow.log_artifact(str(f)))
        if (live / "plots" / "images").is_dir():
            self.call(lambda: self.mlflow.log_artifacts(str(live / "plots" / "images"), "plots"))

    def log_artifacts(self, family: str, entry: dict) -> None:
        for out in entry.get("outs", []):
            path = self.workdir / out["path"]
            if out["path"].startswith("dvclive/"):
                continue
            if path.suffix == ".md" and path.is_file():  # report's and audit's markdown
                self.call(lambda f=path: self.mlflow.log_artifact(str(f), family))
            elif out["path"] in REPORT_IMAGES and path.is_dir():
                self.call(lambda d=path, o=out["path"]: self.mlflow.log_artifacts(str(d), REPORT_IMAGES[o]))
            elif family in LOGGED_FILES:
                folder, names = LOGGED_FILES[family]
                for f in (path / name for name in names if (path / name).is_file()):
                    self.call(lambda f=f, to=folder: self.mlflow.log_artifact(str(f), to))
            elif family in ARTIFACT_FOLDERS and path.is_dir():
                self.call(lambda d=path: self.mlflow.log_artifacts(str(d), ARTIFACT_FOLDERS[family]))

    def log_export(self, model: str, dataset: Any, scratch: Path) -> str:
        """The export as the run's MLflow model, evaluate's metrics linked, as export does."""
        export_dir = self.workdir / "exports" / model
        card = formats.read_json(export_dir / "model.json", "the export's model card")
        evaluation = self.workdir / "dvclive" / "evaluate" / model / "metrics.json"
        linked = leaves(json.loads(evaluation.read_text())) if evaluation.is_file() else {}
        example = np.asarray(formats.load_split(self.workdir / PREPARED, "test").images[:1])
        tags = {"model": model, "framework": card.get("framework", ""), "arch": card.get("arch", ""),
                **formats.dataset_tags(self.workdir / PREPARED),
                models.ONNX_TAG: files.sha256_file(export_dir / "model.onnx")}
        return self.call(lambda: models.log_model(self.mlflow, export_dir, example, scratch, tags, linked,
                                                           dataset))

    def ensure_champion(self, chosen: dict, register_run: str | None) -> None:
        """The alias exists and a version of the chosen ONNX file is registered (the register
        stage's rule decides whether it takes the alias from another holder)."""
        mlflow, onnx = self.mlflow, chosen["onnx_sha256"]
        model_id = self.call(lambda: models.find_model(mlflow, self.experiment_id, onnx))
        if model_id is None and register_run is not None:  # logged by no export run: under register's
            with tempfile.TemporaryDirectory(prefix=f"{store.SCRATCH_PREFIX}sync-") as scratch:
                self.call(lambda: mlflow.start_run(run_id=register_run))
                try:
                    model_id = self.log_export(chosen["model"], None, Path(scratch))
                finally:
                    self.call(lambda: mlflow.end_run("FINISHED"))
        if model_id is None:
            say(f"{chosen['registered_model']}@{chosen['alias']}: no logged model of {chosen['model']}'s export "
                "in this store; rerun `dvc repro -f -s export@" + chosen["model"] + "`")
            return
        candidate = {**chosen, "higher_is_better": not chosen["select_by"].endswith("loss"),  # register.SELECTORS
                     "dataset_sha256": formats.dataset_tags(self.workdir / PREPARED)["dataset_sha256"]}
        self.call(lambda: models.register(mlflow, self.client, chosen["registered_model"], chosen["alias"],
                                                   model_id, candidate))

    def headline(self, report: Path, chosen: dict | None) -> None:
        """Every model's headline figures (the report's side-by-side metrics) and the champion
        onto this execution's parent run, also when report itself did not run."""
        from mlflow.entities import Metric

        parent = self.parent(create=False)
        if parent is None:
            return
        now = int(time.time() * 1000)
        if report.is_file():
            metrics = [Metric(k, v, now, 0) for k, v in leaves(json.loads(report.read_text())).items()]
            self.call(lambda: self.client.log_batch(parent, metrics=metrics))
        if chosen is not None:
            self.call(lambda: self.client.set_tag(parent, "champion", f"{chosen['model']} ({chosen['select_by']} "
                                                                      f"{chosen['score']:.4f})"))
        self.touch_parent()

    def touch_parent(self) -> None:
        """The parent ends when its last run does: its duration spans them."""
        if self._parent is not None:
            worker.touch_group(self.client, self._parent, self.p)


def reconcile(root: Path, workdir: Path, uri: str, stages: dict[str, dict], digests: dict[str, str],
              chosen: dict | None) -> str:
    """Make the store hold every stage's recorded state and the chosen model's alias; returns
    what it did, in a line."""
    p = store.load_tracking_params()
    connect.bound_http(p)
    import mlflow

    mlflow.set_tracking_uri(uri)
    with connect.creating(uri, ".sync.lock"):  # parallel experiments: one run per state
        r = Restorer(mlflow, root, workdir, p)
        have = r.tagged()
        adopted, restored, left = [], [], {}  # left: stage -> why its outputs are not dvc.lock's
        checked: dict[str, str | None] = {}

        def problem(stage: str) -> str | None:  # each stage's outputs hashed once
            if stage not in checked:
                checked[stage] = outs_differ(workdir, stages[stage])
            return checked[stage]

        for stage in stages:
            if digests[stage] in have:
                continue
            own = r.own_run(stage)
            if own is not None:
                r.call(lambda o=own, d=digests[stage]: r.client.set_tag(o.info.run_id, lockfile.LOCK_TAG, d))
                have[digests[stage]] = own.info.run_id
                adopted.append(stage)
                continue
            if problem(stage):
                left[stage] = problem(stage)
                continue
            have[digests[stage]] = r.restore(stage, stages[stage], digests[stage])
            restored.append(stage)
        if chosen is not None and "register" not in left:
            r.ensure_champion(chosen, have.get(digests["register"]))
        if "report" in stages and not problem("report"):
            r.headline(workdir / "dvclive" / "report" / "metrics.json", chosen)
    done = [f"{len(adopted)} run(s) of this execution tagged with their dvc.lock state",
            f"{len(restored)} restored from what DVC holds ({', '.join(restored) or 'none'})"]
    if left:
        why = "; ".join(f"{stage} ({reason})" for stage, reason in left.items())
        done.append(f"not mirrored, as the workspace does not hold what dvc.lock records: {why} "
                    "(`dvc checkout` or `dvc repro` first)")
    return "; ".join(done)
