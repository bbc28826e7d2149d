"""One reporting path for every stage: DVC metrics and plots (through DVCLive) and MLflow.

DVC-tracked files get only deterministic figures (losses, accuracies, counts): `dvc repro -f`
must reproduce them byte for byte. Wall-clock timings, host facts and artifacts go to MLflow
only. The MLflow store defaults to SQLite in the repository root; runs made by
`dvc exp run --temp` or a queue execute in a copy under `.dvc/tmp/exps/`, so the root is
resolved past that copy, or every such run would land in a store that DVC deletes.

MLflow calls run in a worker process (`python -m pipeline.tracking_worker`) fed JSON lines on its
stdin: importing MLflow and opening its store take ~4 s, which the worker spends on the other
core while the stage imports torch and works. The entry point (`python -m pipeline <stage>`)
starts the worker before the stage's heavy imports, and the stage waits for it at the end, so
the run is complete, or the stage fails, before DVC moves on.

A run ends FINISHED when the stage succeeds, FAILED when it raises, KILLED when it is
interrupted (Ctrl-C) or vanishes (see `tracking_worker` for the faults the worker bounds). A
worker that cannot use the store makes the stage stop at its next call with a TrackingError.
Files made only to be logged live in a scratch folder named with the stage's pid; the next
stage removes those whose process is gone (a SIGKILL skips every cleanup).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline import config, files, launch, workspace
from pipeline.errors import TrackingError

EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # on the worker's PYTHONPATH
ATTEMPT_TAG = "pipeline.attempt"  # one process's try at a stage: a resumed run names the one it continues
DRIVER_TAG = "pipeline.driver"  # the `dvc repro` / `dvc exp run` process a run belongs to (workspace.Driver)
DEFAULT_EXPERIMENT = "cnn-pipeline"
# a run id: the parent runs of the pipeline executions that see it nest under that run (a sweep's)
PARENT_RUN_ENV = "PIPELINE_PARENT_RUN_ID"
STORE_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
OFFLINE_STORE = "mlflow-offline.db"  # tracking.offline_fallback's store, in the repository root
SCRATCH_PREFIX = "pipeline-mlflow-"


@dataclasses.dataclass(frozen=True)
class TrackingParams:
    """params.yaml `tracking:` (optional). It shapes where runs are logged, never what a stage
    builds, so no stage lists it in dvc.yaml: changing it reruns nothing."""

    offline_fallback: bool = False  # an unreachable server: log to OFFLINE_STORE instead of failing
    timeout_seconds: int = 10  # an HTTP request to the server
    http_retries: int = 2  # retries of a failed request, with 1, 2, 4... s between them
    lock_wait_seconds: float = 120.0  # how long a call waits for a locked SQLite store

    def __post_init__(self) -> None:
        config.check(self.timeout_seconds >= 1, "timeout_seconds", f"must be >= 1, got {self.timeout_seconds}")
        config.check(0 <= self.http_retries <= 10, "http_retries", f"must be in 0..10, got {self.http_retries}")
        config.check(self.lock_wait_seconds >= 0, "lock_wait_seconds", f"must be >= 0, got {self.lock_wait_seconds}")


def load_tracking_params(path: Path = config.PARAMS_FILE) -> TrackingParams:
    """The `tracking:` section, or its defaults when params.yaml has none (or there is no params.yaml)."""
    if not path.is_file():
        return TrackingParams()
    try:
        raw = config.read_params(path)
    except config.ConfigError:  # an unreadable params.yaml is the stage's to report, in its own words
        return TrackingParams()
    if "tracking" not in raw:
        return TrackingParams()
    return config.from_dict(raw["tracking"], TrackingParams, where=f"{path}: tracking")


def experiment_name() -> str:
    return os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT)


def repo_root(cwd: Path | None = None) -> Path:
    """The user's repository root, also when DVC runs the stage in a temporary copy."""
    cwd = (cwd or Path.cwd()).resolve()
    for parent in [cwd, *cwd.parents]:
        # dvc exp run --temp and queued runs execute in <root>/.dvc/tmp/exps/<...>/
        if parent.name == "exps" and parent.parent.name == "tmp" and parent.parent.parent.name == ".dvc":
            return parent.parent.parent.parent
    return cwd


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / STORE_FILE}"


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': TrainParams(lr=...)} -> {'train.lr': ...}; dataclasses and dicts alike."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def git_tags(root: Path) -> dict[str, str]:
    """Commit and dirty flag of the checkout the stage runs in (for --temp and queued runs, DVC's
    copy at the experiment's baseline), and the DVC experiment it belongs to."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True)
        except (OSError, subprocess.CalledProcessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    # what `dvc repro` itself rewrites (dvc.lock, the git-tracked metrics it deletes before a stage
    # runs) is not a change to the code or params: counted, every repro would read as dirty
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                 *(f":(exclude,glob){p}" for p in pipeline_outputs(root)))
    return {
        "git_commit": commit or "none",
        "git_dirty": "unknown" if status is None else str(bool(status)).lower(),
        # set by `dvc exp run` (workspace, --temp and queued); empty for plain `dvc repro`
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "dvc_exp_baseline": os.environ.get("DVC_EXP_BASELINE_REV", ""),
    }


def pipeline_outputs(root: Path) -> list[str]:
    """dvc.lock and every output dvc.yaml declares (outs, metrics, plots), as git glob patterns
    (a foreach stage's `${item}` matching any name), each also for what is under it."""
    import re

    import yaml

    try:
        spec = yaml.safe_load((root / "dvc.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return ["dvc.lock"]
    found = ["dvc.lock"]
    for stage in (spec.get("stages") or {}).values():
        body = stage.get("do", stage) if isinstance(stage, dict) else {}
        for key in ("outs", "metrics", "plots"):
            for entry in body.get(key) or []:
                path = re.sub(r"\$\{[^}]*\}", "*", str(next(iter(entry)) if isinstance(entry, dict) else entry))
                found += [path, f"{path}/**"]
    return found


def nest_into(target: dict, metrics: Mapping[str, Any]) -> dict:
    """'test/acc' -> target["test"]["acc"], as DVCLive nests curves; returns `target`."""
    for key, value in metrics.items():
        node = target
        *parents, leaf = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return target


def group_name(git: Mapping[str, str]) -> str:
    """The parent run's name: the DVC experiment, else the commit of a plain `dvc repro`, marked
    `-dirty` (as `git describe --dirty` does) when tracked files differed from it as it began."""
    if git.get("dvc_exp_name"):
        return git["dvc_exp_name"]
    if git.get("git_commit", "none") == "none":
        return "repro"
    return f"repro {git['git_commit'][:7]}{'-dirty' if git.get('git_dirty') == 'true' else ''}"


class MlflowWorker:
    """The child process that makes this stage's MLflow calls, in order."""

    def __init__(self) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")])),
        }
        root = repo_root()
        self.uri = tracking_uri(root)
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline.tracking_worker",
                self.uri,
                experiment_name(),
                str(root),
            ],
            stdin=subprocess.PIPE,
            text=True,
            env=env,
            # Its own process group: a terminal's Ctrl-C goes to the stage, which says how the
            # run ends; delivered to the worker during its start-up, it printed a traceback.
            process_group=0,
        )

    def call(self, op: str, **kwargs: Any) -> None:
        """Queue one MLflow call; a worker that has died (its one-line error is printed above)
        stops the stage here, so a stage does not work for minutes to lose its run."""
        self._check()
        try:
            self._proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self._check(self._proc.wait())

    def _check(self, code: int | None = None) -> None:
        code = self._proc.poll() if code is None else code
        if code:
            raise TrackingError(f"MLflow logging failed: its worker stopped (exit code {code}; its error is "
                                f"printed above) for the store {self.uri}")

    def close(self, status: str, fail_experiment: dict | None = None) -> None:
        """End the run and wait for every call to land; raise if MLflow failed."""
        with contextlib.suppress(TrackingError):
            self.call("end", status=status, fail_experiment=fail_experiment)
        with contextlib.suppress(BrokenPipeError, OSError):
            self._proc.stdin.close()
        code = self._proc.wait()
        if code != 0 and status == "FINISHED":
            self._check(code)


_worker: MlflowWorker | None = None


def start_worker() -> None:
    """Start the MLflow worker now, so that its imports overlap the stage's own."""
    global _worker
    if _worker is None:
        _worker = MlflowWorker()


def _take_worker() -> MlflowWorker:
    global _worker
    start_worker()
    worker, _worker = _worker, None
    return worker


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
        """An export folder as this run's MLflow model (`pipeline.serving`: uint8 images of any
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
        it beats the current holder (`tracking_models.register`)."""
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


class SilentWorker:
    """The worker of a stage's rank > 0 under torchrun: rank 0 alone logs."""

    uri = ""

    def call(self, op: str, **kwargs: Any) -> None:
        pass

    def close(self, status: str, fail_experiment: dict | None = None) -> None:
        pass


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


def remove_orphan_scratch(folder: Path | None = None) -> None:
    """Remove scratch folders of stages whose process is gone (SIGKILL leaves them behind)."""
    import shutil

    folder = Path(folder or tempfile.gettempdir())
    for path in folder.glob(f"{SCRATCH_PREFIX}*"):
        pid = path.name[len(SCRATCH_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
