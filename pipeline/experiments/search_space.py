"""A sweep's YAML file (`sweep.yaml`): what to optimise, how to prune, which params to vary.

    objective: {metric: "dvclive/train/metrics.json:best.val_loss", direction: minimize}
    prune: {stage: train, metric: val/loss, warmup_epochs: 5, startup_trials: 3}   # optional
    params:
      train.lr: {low: 1.0e-4, high: 3.0e-2, log: true}   # float range (log scale)
      train.width: {low: 16, high: 64, step: 16}          # integers: both bounds integers
      train.optimizer: {choices: [adamw, sgd]}

Every key under `params` names a params.yaml value (section.key); each becomes one
`dvc exp run -S key=value` of a trial. Nothing here imports Optuna until a trial is sampled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline import config
from pipeline.config import ConfigError, check

Value = bool | int | float | str


@dataclass(frozen=True)
class Objective:
    metric: str  # "<DVC metrics file>:<dotted key inside it>"
    direction: Literal["minimize", "maximize"] = "minimize"

    def __post_init__(self) -> None:
        file, _, key = self.metric.partition(":")
        check(bool(file and key), "metric", f"must be '<metrics file>:<key>', e.g. "
              f"'dvclive/train/metrics.json:best.val_loss'; got {self.metric!r}")

    @property
    def file(self) -> str:
        return self.metric.partition(":")[0]

    @property
    def key(self) -> str:
        return self.metric.partition(":")[2]


@dataclass(frozen=True)
class Prune:
    """Median pruning on a stage's per-epoch figure (the objective's direction applies to it)."""

    stage: Literal["train", "finetune"] = "train"
    metric: str = "val/loss"  # a per-epoch metric the stage logs
    warmup_epochs: int = 3  # epochs every trial runs before it can be pruned
    startup_trials: int = 2  # trials that finish before any is pruned

    def __post_init__(self) -> None:
        check(self.warmup_epochs >= 0, "warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        check(self.startup_trials >= 0, "startup_trials", f"must be >= 0, got {self.startup_trials}")


@dataclass(frozen=True)
class Range:
    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    step: int | float | None = None
    choices: list[Value] = field(default_factory=list)

    def __post_init__(self) -> None:
        ranged = self.low is not None or self.high is not None
        check(ranged != bool(self.choices), "choices", "give either low and high, or choices")
        if ranged:
            check(self.low is not None and self.high is not None, "high", "give both low and high")
            check(self.low < self.high, "low", f"must be below high, got {self.low} >= {self.high}")
            check(not self.log or self.low > 0, "log", f"needs low > 0, got {self.low}")
            check(not (self.log and self.step), "step", "cannot be combined with log: true")

    @property
    def integer(self) -> bool:
        return all(isinstance(v, int) for v in (self.low, self.high)) and not isinstance(self.step, float)

    def sample(self, trial: Any, name: str) -> Value:
        """Optuna's suggestion for this param (`trial`: an optuna.trial.Trial)."""
        if self.choices:
            return trial.suggest_categorical(name, list(self.choices))
        if self.integer:
            return trial.suggest_int(name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(name, float(self.low), float(self.high), step=self.step, log=self.log)


@dataclass(frozen=True)
class SearchSpace:
    objective: Objective
    params: dict[str, Range]
    prune: Prune | None = None

    def as_dict(self) -> dict[str, Any]:
        import dataclasses

        return dataclasses.asdict(self)


def load(path: Path, params_file: Path = config.PARAMS_FILE) -> SearchSpace:
    """The sweep file at `path`, checked against itself and against params.yaml's keys."""
    raw = config.read_params(path)
    unknown = sorted(set(raw) - {"objective", "prune", "params"})
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown}; valid keys are ['objective', 'params', 'prune']")
    if not isinstance(raw.get("params"), dict) or not raw["params"]:
        raise ConfigError(f"{path}: params: expected a mapping of params.yaml keys to ranges, e.g. "
                          "'train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}'")
    if "objective" not in raw:
        raise ConfigError(f"{path}: missing objective: (e.g. {{metric: 'dvclive/train/metrics.json:best.val_loss'}})")
    objective = config.from_dict(raw["objective"], Objective, f"{path}: objective")
    prune = config.from_dict(raw["prune"], Prune, f"{path}: prune") if raw.get("prune") is not None else None
    known = config.read_params(params_file)
    ranges = {}
    for name, spec in raw["params"].items():
        section, _, key = str(name).partition(".")
        if not isinstance(known.get(section), dict) or key not in known[section]:
            if isinstance(known.get(section), dict):
                hint = f"keys of {section} there: {sorted(known[section])}; a key left at its default must be " \
                       "written there first, so that `dvc params diff` shows what each trial changed"
            else:
                hint = f"sections there: {sorted(known)}"
            raise ConfigError(f"{path}: params: {name!r} is not a key of {params_file} ({hint})")
        ranges[str(name)] = config.from_dict(spec, Range, f"{path}: params.{name}")
    return SearchSpace(objective, ranges, prune)


def as_override(name: str, value: Value) -> str:
    """`-S` text DVC parses back to `value` (YAML: true, 3, 0.001, adamw)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = repr(value)
    else:
        text = str(value)
    return f"{name}={text}"


def metric_of(metrics: dict[str, Any], objective: Objective) -> float | None:
    """The objective's value in `dvc exp show --json`'s metrics of one experiment, if it is there."""
    node: Any = (metrics.get(objective.file) or {}).get("data")
    for part in objective.key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return float(node) if isinstance(node, (int, float)) and not isinstance(node, bool) else None
