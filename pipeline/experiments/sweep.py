"""`python -m pipeline.experiments.sweep --trials N --jobs J`: an Optuna study whose trials are DVC experiments.

Each trial's sampled params become `dvc exp run --queue -n <study>-<number> -S key=value ...`;
`dvc queue start -j J` runs them J at a time, and the objective is read back from DVC's own
metrics (`dvc exp show --json`). The search space, objective and pruning rule come from a
YAML file (`search_space`, default sweep.yaml). The study lives in Optuna's RDB storage
(SQLite in the repository by default; any SQLAlchemy URL): several sweep processes on
different hosts that share one database and one study name are Optuna's distributed mode,
each running its own --trials. Trials report each epoch's validation figure to the study
from inside the stage (`pipeline.experiments.trial`) and a pruned one stops there. In MLflow every
trial's pipeline run nests under one parent run, `sweep <study>`. At the end the best trial
is applied to the workspace with `dvc exp apply`.

Each batch of J trials is sampled together (TPE with the constant liar, so they differ) and
the next batch waits for the slowest of them: the queue does the running, this loop only
asks, queues, waits and tells.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from pipeline import config
from pipeline.errors import PipelineError
from pipeline.experiments import dvc_queue, search_space, trial
from pipeline.experiments.search_space import SearchSpace
from pipeline.tracking import store

SWEEP_TAG = "pipeline.experiments.sweep"


def experiment_metrics() -> dict[str, dict]:
    """Metrics of every saved experiment, by name, from `dvc exp show --json`."""
    found: dict[str, dict] = {}
    for baseline in json.loads(dvc_queue.dvc("exp", "show", "--json", "--no-fetch")):
        for exp in baseline.get("experiments") or []:
            rev = (exp.get("revs") or [{}])[0]
            name = exp.get("name") or rev.get("name")
            found[name] = ((rev.get("data") or {}).get("metrics")) or {}
    return found


def open_study(space: SearchSpace, name: str, storage: str, seed: int) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    study = optuna.create_study(study_name=name, storage=trial.storage(storage), sampler=sampler, load_if_exists=True,
                                direction=space.objective.direction)
    described = json.loads(json.dumps(space.as_dict()))
    previous = study.user_attrs.get("space")
    if previous is not None and previous != described:
        raise PipelineError(f"study '{name}' in {safe_url(storage)} was run with another search space; "
                            "use a new --study name, or the same sweep file")
    study.set_user_attr("space", described)
    study.set_user_attr(trial.PRUNE_ATTR, described["prune"])
    return study


def safe_url(url: str) -> str:
    """The storage URL without its password, for messages and MLflow."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def run_batch(study: Any, space: SearchSpace, size: int, jobs: int, root: Path, env: dict,
              targets: list[str]) -> list[tuple]:
    """Ask `size` trials, queue them as experiments (of `targets` and what they need, or the
    whole pipeline), run the queue, tell the study; the outcomes."""
    import optuna

    # workers left from before would run these trials without the study in their environment
    dvc_queue.wait_for_workers_without(trial.STUDY_ENV, env[trial.STUDY_ENV], root)
    asked = []
    for _ in range(size):
        t = study.ask()
        values = {name: r.sample(t, name) for name, r in space.params.items()}
        exp = f"{study.study_name}-{t.number}"
        t.set_user_attr(trial.EXP_ATTR, exp)
        overrides = [arg for name, v in values.items() for arg in ("-S", search_space.as_override(name, v))]
        dvc_queue.dvc("exp", "run", "--queue", "-q", "-n", exp, *overrides, *targets)
        asked.append((t, exp, values))
    dvc_queue.start(jobs, env)
    status = dvc_queue.wait_for([exp for _, exp, _ in asked], root, env, jobs)
    metrics = experiment_metrics()
    attrs = {f.number: f.user_attrs for f in study.get_trials(deepcopy=False)}  # what the stages wrote
    outcomes = []
    for t, exp, values in asked:
        value = search_space.metric_of(metrics.get(exp, {}), space.objective) if status[exp] == "Success" else None
        pruned = attrs[t.number].get(trial.PRUNED_ATTR)
        if value is not None:
            study.tell(t, value)
            state = "COMPLETE"
        elif pruned is not None:
            study.tell(t, state=optuna.trial.TrialState.PRUNED)
            state = f"PRUNED at epoch {pruned}"
        else:
            study.tell(t, state=optuna.trial.TrialState.FAIL)
            state = f"FAILED (dvc queue logs {exp})"
        outcomes.append((t.number, exp, values, value, state))
    return outcomes


def parent_run(study_name: str, args: argparse.Namespace, storage: str) -> tuple[Any, str]:
    """The MLflow parent run of this sweep in the pipeline's store; its client and id."""
    import mlflow

    from pipeline.tracking import connect

    root = store.repo_root()
    uri = store.tracking_uri(root)
    experiment_id = connect.open_store(mlflow, uri, store.experiment_name(), root,
                                               store.load_tracking_params())
    client = mlflow.MlflowClient(uri)
    run = client.create_run(experiment_id, run_name=f"sweep {study_name}", tags={
        SWEEP_TAG: study_name, "mlflow.note.content": "An Optuna sweep: each trial's pipeline run is nested here."})
    params = {"study": study_name, "storage": safe_url(storage), "trials": args.trials, "jobs": args.jobs,
              "seed": args.seed, "space_file": str(args.space)}
    for key, value in params.items():
        client.log_param(run.info.run_id, key, str(value))
    return client, run.info.run_id


def sweep(args: argparse.Namespace) -> int:
    space = search_space.load(args.space)
    root = Path.cwd()
    storage = args.storage or f"sqlite:///{root / 'optuna.db'}"
    study = open_study(space, args.study, storage, args.seed)
    client, parent = parent_run(args.study, args, storage)
    # the queue's workers (and so every stage they run) inherit these: pruning and nesting
    env = {**os.environ, trial.STORAGE_ENV: storage, trial.STUDY_ENV: args.study, store.PARENT_RUN_ENV: parent}
    status, remaining = "FAILED", args.trials
    try:
        while remaining > 0:
            size = min(args.jobs, remaining)
            for number, exp, values, value, state in run_batch(study, space, size, args.jobs, root, env, args.target):
                shown = f"{value:.5g}" if value is not None else "-"
                print(f"trial {number} ({exp}): {space.objective.key} {shown}, {state}; "
                      + ", ".join(f"{k}={v}" for k, v in values.items()), flush=True)
                if value is not None:
                    client.log_metric(parent, "trial_value", value, step=number)
            remaining -= size
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        client.set_terminated(parent, status)
    return finish(study, client, parent, args.apply)


def finish(study: Any, client: Any, parent: str, apply: bool) -> int:
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        print("no trial completed; nothing to apply", file=sys.stderr)
        return 1
    best = study.best_trial
    exp = best.user_attrs[trial.EXP_ATTR]
    client.set_tag(parent, "best_trial", str(best.number))
    client.set_tag(parent, "best_experiment", exp)
    client.log_metric(parent, "best_value", best.value)
    print(f"best: trial {best.number} ({exp}), value {best.value:.5g}: {best.params}")
    if apply:
        dvc_queue.dvc("exp", "apply", exp)
        print(f"applied {exp} to the workspace (`dvc exp apply`); `git diff params.yaml` shows its params")
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.experiments.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, required=True, help="trials this process runs")
    parser.add_argument("--jobs", type=int, default=1, help="experiments at once (dvc queue start -j)")
    parser.add_argument("--space", type=Path, default=Path("sweep.yaml"), help="the search space (YAML)")
    parser.add_argument("--study", default="sweep", help="the study's name; an existing one continues")
    parser.add_argument("--storage", help="SQLAlchemy URL of the study (default sqlite:///<repo>/optuna.db)")
    parser.add_argument("--seed", type=int, default=0, help="the TPE sampler's seed")
    parser.add_argument("--target", action="append", default=[], metavar="STAGE",
                        help="run only this stage and what it needs (repeatable; default: the whole pipeline)")
    parser.add_argument("--no-apply", dest="apply", action="store_false", help="leave the workspace as it is")
    args = parser.parse_args(argv)
    if args.trials < 1 or args.jobs < 1:
        parser.error("--trials and --jobs must be at least 1")
    if not Path("dvc.yaml").is_file():
        parser.error("run it in the repository root (no dvc.yaml here)")
    try:
        sys.exit(sweep(args))
    except (PipelineError, config.ConfigError) as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        sys.exit("sweep: interrupted (queued trials keep running: `dvc queue status`, `dvc queue kill`)")


if __name__ == "__main__":
    main()
