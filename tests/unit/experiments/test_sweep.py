"""Sweeps: the search-space file, and a stage's side of a trial (reporting and pruning).
The 3-trial sweep through DVC's queue is in test_pipeline."""

from __future__ import annotations

import optuna
import pytest

from pipeline.config import ConfigError
from pipeline.experiments import search_space, trial
from pipeline.experiments.search_space import Objective, Range

PARAMS = "train: {lr: 3.0e-3, width: 32, optimizer: adamw, dropout: 0.3}\nprepare: {seed: 0}\n"


@pytest.fixture
def files(tmp_path):
    (tmp_path / "params.yaml").write_text(PARAMS)
    return tmp_path


def load(files, text: str):
    (files / "sweep.yaml").write_text(text)
    return search_space.load(files / "sweep.yaml", files / "params.yaml")


def test_the_repositorys_sweep_file_matches_its_params_yaml():
    from support import REPO

    space = search_space.load(REPO / "sweep.yaml", REPO / "params.yaml")
    assert space.objective.file == "dvclive/train/metrics.json" and space.objective.key == "best.val_loss"
    assert space.prune is not None and space.prune.stage == "train"


def test_ranges_log_scales_integers_and_choices_sample_as_declared(files):
    space = load(files, """
objective: {metric: "dvclive/train/metrics.json:best.val_acc", direction: maximize}
params:
  train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}
  train.width: {low: 16, high: 64, step: 16}
  train.optimizer: {choices: [adamw, sgd]}
  train.dropout: {low: 0.0, high: 0.5}
""")
    assert space.prune is None and space.objective.direction == "maximize"
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        t = study.ask()
        values = {name: r.sample(t, name) for name, r in space.params.items()}
        assert 1e-4 <= values["train.lr"] <= 1e-2 and isinstance(values["train.lr"], float)
        assert values["train.width"] in (16, 32, 48, 64) and isinstance(values["train.width"], int)
        assert values["train.optimizer"] in ("adamw", "sgd")
    dist = study.trials[0].distributions
    assert dist["train.lr"].log and isinstance(dist["train.width"], optuna.distributions.IntDistribution)


@pytest.mark.parametrize("params, message", [
    ("train.lr: {low: 1.0e-2, high: 1.0e-4}", "params.train.lr.low: must be below high, got 0.01 >= 0.0001"),
    ("train.lr: {low: 0.0, high: 1.0, log: true}", "params.train.lr.log: needs low > 0, got 0.0"),
    ("train.lr: {low: 0.1, high: 1.0, choices: [1]}", "give either low and high, or choices"),
    ("train.lr: {low: 0.1}", "give both low and high"),
    ("train.learning_rate: {low: 0.1, high: 1.0}",
     "'train.learning_rate' is not a key of"),
    ("trian.lr: {low: 0.1, high: 1.0}", "(sections there: ['prepare', 'train'])"),
    ("train.lr: {low: 0.1, hihg: 1.0}", "unknown keys ['hihg']"),
])
def test_a_bad_space_names_the_file_the_key_and_what_is_valid(files, params, message):
    with pytest.raises(ConfigError) as err:
        load(files, f'objective: {{metric: "m.json:a"}}\nparams:\n  {params}\n')
    assert message in str(err.value) and "sweep.yaml" in str(err.value)


def test_the_objective_must_name_a_file_and_a_key(files):
    with pytest.raises(ConfigError, match="must be '<metrics file>:<key>'"):
        load(files, "objective: {metric: best.val_loss}\nparams:\n  train.lr: {low: 0.1, high: 1.0}\n")


def test_overrides_are_what_dvc_parses_back_and_metrics_are_found_nested():
    assert search_space.as_override("train.lr", 0.001) == "train.lr=0.001"
    assert search_space.as_override("train.batch_norm", False) == "train.batch_norm=false"
    assert search_space.as_override("train.optimizer", "sgd") == "train.optimizer=sgd"
    objective = Objective("dvclive/train/metrics.json:best.val_loss")
    metrics = {"dvclive/train/metrics.json": {"data": {"best": {"val_loss": 0.25}}}}
    assert search_space.metric_of(metrics, objective) == 0.25
    assert search_space.metric_of({}, objective) is None
    assert Range(low=1, high=4).integer and not Range(low=1, high=4.0).integer


@pytest.fixture
def study(tmp_path, monkeypatch):
    """A study with two finished trials whose val/loss fell to 0.5, and a running trial that
    is the DVC experiment 'sweep-2' this process pretends to be."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    s = optuna.create_study(study_name="s", storage=trial.storage(url))
    s.set_user_attr(trial.PRUNE_ATTR, {"stage": "train", "metric": "val/loss", "warmup_epochs": 1,
                                       "startup_trials": 2})
    for _ in range(2):
        t = s.ask()
        for epoch, loss in enumerate((1.0, 0.7, 0.5)):
            t.report(loss, epoch)
        s.tell(t, 0.5)
    running = s.ask()
    running.set_user_attr(trial.EXP_ATTR, "sweep-2")
    monkeypatch.setenv(trial.STORAGE_ENV, url)
    monkeypatch.setenv(trial.STUDY_ENV, "s")
    monkeypatch.setenv("DVC_EXP_NAME", "sweep-2")
    return s


def test_outside_a_sweep_a_stage_reports_nothing(monkeypatch):
    for name in (trial.STORAGE_ENV, trial.STUDY_ENV, "DVC_EXP_NAME"):
        monkeypatch.delenv(name, raising=False)
    assert trial.epoch_hook("train") is None


def test_a_trial_worse_than_the_median_after_the_warm_up_is_pruned(study):
    assert trial.epoch_hook("finetune") is None  # the study prunes on train's figures
    report = trial.epoch_hook("train")
    report(0, {"val/loss": 5.0})  # the warm-up epoch: never pruned
    report(1, {"val/loss": 0.6})  # better than the median (0.7): runs on
    with pytest.raises(trial.TrialPruned, match="pruned by the Optuna study 's' at epoch 2 .trial 2.: its val/loss"):
        report(2, {"val/loss": 0.9})
    (t,) = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    assert t.user_attrs[trial.PRUNED_ATTR] == 2 and t.intermediate_values == {0: 5.0, 1: 0.6, 2: 0.9}


def test_an_experiment_that_is_no_trial_of_the_study_is_left_alone(study, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "by-hand")
    assert trial.epoch_hook("train") is None
