"""A stage's side of an Optuna sweep (`python -m pipeline.experiments.sweep`): report each epoch's
validation figure to the trial this DVC experiment is, and stop when the study prunes it.

The sweep queues each trial as a DVC experiment named after it and starts the queue's
workers with PIPELINE_SWEEP_STORAGE and PIPELINE_SWEEP_STUDY set; DVC gives every stage of an
experiment DVC_EXP_NAME. Outside a sweep (no such variables) nothing here imports Optuna.
The pruner's settings live in the study's user attributes, so every process that joins the
study, on any host, prunes by the same rule.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from pipeline.errors import PipelineError
from pipeline.runtime import launch

STORAGE_ENV, STUDY_ENV = "PIPELINE_SWEEP_STORAGE", "PIPELINE_SWEEP_STUDY"
EXP_ATTR, PRUNE_ATTR, PRUNED_ATTR = "dvc_exp", "prune", "pruned_at_epoch"


class TrialPruned(PipelineError):
    """The study stopped this trial early: the experiment fails, and the sweep records it PRUNED."""


def storage(url: str) -> Any:
    """Optuna's RDB storage at `url`; SQLite waits for a lock (the sweep and J trials share the
    file) instead of failing at once."""
    import optuna

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite:") else {}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


def make_pruner(settings: Mapping[str, Any]) -> Any:
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=int(settings["startup_trials"]),
                                       n_warmup_steps=int(settings["warmup_epochs"]))


def epoch_hook(stage: str) -> Callable[[int, Mapping[str, float]], None] | None:
    """The function a stage calls after each epoch when it runs as a trial that prunes on this
    stage's figures; None otherwise."""
    url, study_name, exp = os.environ.get(STORAGE_ENV), os.environ.get(STUDY_ENV), os.environ.get("DVC_EXP_NAME")
    if not (url and study_name and exp) or launch.rank() > 0:  # under torchrun rank 0 reports
        return None
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = storage(url)
    probe = optuna.load_study(study_name=study_name, storage=store)
    settings = probe.user_attrs.get(PRUNE_ATTR)
    if not settings or settings.get("stage") != stage:
        return None
    study = optuna.load_study(study_name=study_name, storage=store, pruner=make_pruner(settings))
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    found = [t for t in running if t.user_attrs.get(EXP_ATTR) == exp]
    if not found:  # an experiment queued by hand with a sweep's name: not a trial
        return None
    trial = optuna.trial.Trial(study, found[0]._trial_id)
    metric = settings["metric"]

    def report(epoch: int, metrics: Mapping[str, float]) -> None:
        if metric not in metrics:
            return
        trial.report(float(metrics[metric]), epoch)
        if trial.should_prune():
            trial.set_user_attr(PRUNED_ATTR, epoch)
            raise TrialPruned(f"{stage}: pruned by the Optuna study '{study_name}' at epoch {epoch} (trial "
                              f"{trial.number}): its {metric} {metrics[metric]:.4f} is worse than the median of "
                              "earlier trials at this epoch")

    return report
