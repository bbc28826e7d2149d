"""One reporting path for every stage: DVC metrics and plots (through DVCLive) and MLflow.

DVC-tracked files get only deterministic figures (losses, accuracies, counts): `dvc repro -f`
must reproduce them byte for byte. Wall-clock timings, host facts and artifacts go to MLflow
only, through `tracking.store` (where runs go, the worker process), which shapes no output.

A run ends FINISHED when the stage succeeds, FAILED when it raises, KILLED when it is
interrupted (Ctrl-C) or vanishes (see `tracking.worker` for the faults the worker bounds).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline import files
from pipeline.runtime import launch, workspace
from pipeline.tracking.store import (
    ATTEMPT_TAG,
    DRIVER_TAG,
    SCRATCH_PREFIX,
    MlflowWorker,
    SilentWorker,
    _take_worker,
    flatten,
    git_tags,
    group_name,
    remove_orphan_scratch,
)


def nest_into(target: dict, metrics: Mapping[str, Any]) -> dict:
    """'test/acc' -> target["test"]["acc"], as DVCLive nests curves; returns `target`."""
    for key, value in metrics.items():
        node = target
        *parents, leaf = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return target


class StageRun:
    """What a stage reports through; made by `stage_run`."""

    def __init__(self, stage: str, live: Any | None, worker: MlflowWorker, scratch: Path, attempt: str = "") -> None:
        self.stage = stage
        self.attempt = attempt  # the run's ATTEMPT_TAG: the checkpoints it writes carry it
        self._live = live
        self._worker = worker
        self._scratch = scratch  # files made only to be logged; removed once the worker is done
        # where the stage's own DVC metrics files go: DVCLive's folder, moved into place on success
        self.live_dir = Path(live.dir) if live is not None else None
        # called with each epoch's metrics once they are logged (an Optuna trial's pruning check)
        self.epoch_hooks: list[Callable[[int, Mapping[str, float]], None]] = []

    def log_epoch(self, epoch: int, metrics: Mapping[str, float], hooks: bool = True) -> None:
        """Per-epoch curves: a DVC plot per metric and an MLflow metric history; then the epoch
        hooks (not for the epochs a resumed fit logs again)."""
        if self._live is not None:
            for name, value in metrics.items():
                self._live.log_metric(name, float(value))
            self._live.next_step()
        self._worker.call("log_metrics", metrics={k: float(v) for k, v in metrics.items()}, step=epoch)
        for hook in self.epoch_hooks if hooks else ():
            hook(epoch, metrics)

    def resumed_from(self, epoch: int, attempt: str) -> None:
        """This fit carries on, at `epoch`, the checkpoint the run tagged `attempt` wrote."""
        self.set_tags({"resumed_from_epoch": str(epoch)})
        self._worker.call("link_resumed", attempt=attempt, epoch=epoch)

    def log_summary(self, metrics: Mapping[str, float | int]) -> None:
        """Final metrics: `dvc metrics show` (metrics.json) and MLflow.

        'test/acc' nests as {"test": {"acc": ...}} in metrics.json, as DVCLive nests curves."""
        if self._live is not None:
            nest_into(self._live.summary, metrics)
            self._live.make_summary()
        self._worker.call("log_metrics", metrics={k: float(v) for k, v in metrics.items()}, step=None)

    def log_details(self, metrics: Mapping[str, float | int], name: str = "details.json") -> None:
        """Figures too many for `dvc metrics show`'s columns (per class, per reason): nested in
        `<live_dir>/<name>`, a file dvc.yaml declares as an output, not as metrics, and MLflow."""
        if self.live_dir is not None:
            files.write_json(self.live_dir / name, nest_into({}, metrics))
        self._worker.call("log_metrics", metrics={k: float(v) for k, v in metrics.items()}, step=None)

    def log_dataset(self, prepared: Path, context: str) -> None:
        """The prepared dataset as the run's MLflow input (its name: the source; the prepared
        folder; the digest ingest computed over every image's pixels and label) and as its tags
        `dataset_sha256` and `data_source`."""
        from pipeline.data import formats  # pandas: not at start-up, where the worker must start first

        tags = formats.dataset_tags(prepared)
        self.set_tags(tags)
        self._worker.call("log_input", name=tags["data_source"], uri=str(Path(prepared).resolve()),
                          digest=tags["dataset_sha256"][:36], context=context)  # MLflow keeps 36 chars

    def log_model(self, export_dir: Path, example: Any, tags: Mapping[str, str], linked: Mapping[str, float]) -> None:
        """An export folder as this run's MLflow model (`pipeline.serving.pyfunc`: uint8 images of any
        size in, probabilities out), `example` (uint8 (1, H, W, C)) its input example, `linked`
        the metrics shown with it under "Logged models"."""
        self._worker.call("log_model", export_dir=str(Path(export_dir).resolve()), example=self._example(example),
                          scratch=str(self._scratch), tags={k: str(v) for k, v in tags.items()},
                          linked={k: float(v) for k, v in linked.items()})

    def _example(self, example: Any) -> str:
        """An input example saved for the worker (an array has no JSON form worth sending)."""
        import numpy as np

        path = self._scratch / "input_example.npy"
        np.save(path, np.asarray(example), allow_pickle=False)
        return str(path)

    def register_model(self, name: str, alias: str, candidate: Mapping[str, Any], export_dir: Path, example: Any,
                       tags: Mapping[str, str]) -> None:
        """Register the chosen export's MLflow model (found by its ONNX file's hash; logged in
        this run when the store has none) as a version of `name`, and move `alias` to it when
        it beats the current holder (`tracking.models.register`)."""
        self._worker.call("register", name=name, alias=alias, candidate=dict(candidate),
                          export_dir=str(Path(export_dir).resolve()), example=self._example(example),
                          scratch=str(self._scratch),
                          tags={k: str(v) for k, v in tags.items()})

    def log_group_metrics(self, metrics: Mapping[str, float | int]) -> None:
        """Headline figures onto the parent run of this pipeline execution too, so executions
        compare side by side in MLflow's runs table."""
        self._worker.call("log_group_metrics", metrics={k: float(v) for k, v in metrics.items()})

    def log_timing(self, metrics: Mapping[str, float]) -> None:
        """Wall-clock figures: MLflow only, so DVC-tracked files stay reproducible."""
        self._worker.call("log_metrics", metrics={f"time/{k}": float(v) for k, v in metrics.items()}, step=None)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._worker.call("set_tags", tags={k: str(v) for k, v in tags.items()})

    def log_choices(self, choices: Mapping[str, object]) -> None:
        """What the stage's `auto` params resolved to: printed for the log and tagged in MLflow."""
        if not isinstance(self._worker, SilentWorker):  # under torchrun, rank 0 says it
            print(f"{self.stage}: " + ", ".join(f"{k} {v}" for k, v in choices.items()))
        self.set_tags({k: str(v) for k, v in choices.items()})

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        """Log a file or a folder's files (under `folder`); they must stay until the stage ends."""
        path = Path(path).resolve()
        if path.is_dir():
            self._worker.call("log_artifacts", path=str(path), folder=folder or path.name)
        else:
            self._worker.call("log_artifact", path=str(path), folder=folder)

    def log_figure(self, figure: Any, name: str) -> None:
        path = self._scratch / name
        figure.savefig(path, dpi=100, bbox_inches="tight")
        self.log_artifact(path)

    def log_image(self, png: bytes, name: str) -> None:
        """A PNG as a DVC image plot (`<live_dir>/plots/images/<name>`) and an MLflow artifact
        (under `plots/`; from the scratch folder, as the live folder moves when the stage ends)."""
        if self.live_dir is not None:
            files.write_bytes(self.live_dir / "plots" / "images" / name, png)
        path = self._scratch / name
        path.write_bytes(png)
        self.log_artifact(path, "plots")

    @contextlib.contextmanager
    def child(self, name: str, params: Mapping[str, Any]) -> Iterator[StageRun]:
        """A nested MLflow run under this one (a cross-validation fold): what is logged through
        the StageRun it yields goes to MLflow only, and the child ends FINISHED, FAILED or KILLED."""
        self._worker.call("start_child", run_name=name, tags={"stage": self.stage, DRIVER_TAG: workspace.driver().key},
                          params={k: str(v) for k, v in flatten(params).items()})
        status = "FAILED"
        try:
            yield StageRun(self.stage, None, self._worker, self._scratch)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self._worker.call("end_child", status=status)

    def log_dict(self, obj: Any, name: str) -> None:
        path = self._scratch / name
        path.write_text(json.dumps(obj, indent=2, sort_keys=True))
        self.log_artifact(path)

    def log_confusion_matrix(self, actual: Sequence[str], predicted: Sequence[str]) -> None:
        """Rows of (actual, predicted) that `dvc plots` draws as a confusion matrix."""
        if self._live is not None:
            self._live.log_sklearn_plot("confusion_matrix", list(actual), list(predicted), name="confusion_matrix.json")


@contextlib.contextmanager
def stage_run(stage: str, params: Mapping[str, Any], live_dir: Path | None = None) -> Iterator[StageRun]:
    """Claim the workspace (`workspace.claim`) and open the stage's MLflow run (and its DVCLive
    folder, when the stage has DVC metrics). A rank > 0 under torchrun gets a run that logs
    and writes nothing."""
    if launch.rank() > 0:
        with tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-") as scratch:
            yield StageRun(stage, None, SilentWorker(), Path(scratch))  # type: ignore[arg-type]
        return
    started = time.perf_counter()
    worker = _take_worker()
    status, previous_sigint = "FAILED", None
    remove_orphan_scratch()
    prefix = f"{SCRATCH_PREFIX}{os.getpid()}-{stage.replace('@', '-')}-"
    attempt = uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix=prefix) as scratch:
        try:
            workspace.claim()  # before the run starts: a refused stage leaves no run behind
            git = git_tags(Path.cwd())
            worker.call(
                "start",
                run_name=stage,
                tags={"stage": stage, DRIVER_TAG: workspace.driver().key, ATTEMPT_TAG: attempt, **git,
                      # the stage, not the worker process MLflow would name
                      "mlflow.source.name": f"pipeline/{stage.split('@')[0]}.py", "mlflow.source.type": "LOCAL"},
                params={k: str(v) for k, v in flatten(params).items()},
                group={"driver": workspace.driver().key, "name": group_name(git)},
            )
            with contextlib.ExitStack() as stack:
                live = None
                if live_dir is not None:
                    from dvclive import Live

                    # Written to a temporary sibling that replaces live_dir only when the stage
                    # succeeds: a failed stage leaves the previous metrics whole, not `{}`.
                    staging = stack.enter_context(files.atomic_dir(live_dir, checksums=False))
                    # dvcyaml=None: dvc.yaml declares the metrics and plots; DVCLive must not rewrite it.
                    live = Live(str(staging), dvcyaml=None, save_dvc_exp=False, report=None)
                run = StageRun(stage, live, worker, Path(scratch), attempt)
                yield run
                if live is not None:
                    live.end()
                workspace.check_unchanged()  # before DVC records params.yaml beside these outputs
            run.log_timing({"stage_seconds": time.perf_counter() - started})
            status = "FINISHED"
        except KeyboardInterrupt:
            # DVC forwards Ctrl-C to the stage on top of the terminal's own: a second one must
            # not cut short the cleanup that records the run as KILLED.
            previous_sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
            status = "KILLED"
            raise
        finally:
            try:
                # an experiment with a failed stage is not saved: its finished runs fail with it
                in_experiment = status != "FINISHED" and os.environ.get("DVC_EXP_NAME")
                worker.close(status, {"driver": workspace.driver().key, "stage": stage} if in_experiment else None)
            finally:
                if previous_sigint is not None:  # left ignored, it would outlive the run, even into children
                    signal.signal(signal.SIGINT, previous_sigint)
