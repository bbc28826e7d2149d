"""params.yaml is read as DVC reads it and every mistake is named."""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
from support import REPO

from pipeline import config
from pipeline.config import ConfigError, check
from pipeline.tracking.store import TrackingParams


@dataclass(frozen=True)
class Knobs:
    lr: float = 1.0e-3
    epochs: int = 3
    optimizer: Literal["adam", "sgd"] = "adam"
    augment: bool = True

    def __post_init__(self) -> None:
        check(self.epochs >= 1, "epochs", f"must be at least 1, got {self.epochs}")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_exponent_floats_are_numbers_as_in_yaml_1_2(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-3 as the string '1e-3'; DVC and this loader read a float.
    knobs = config.load("train", Knobs, write(tmp_path, "train:\n  lr: 1e-3\n"))
    assert knobs.lr == pytest.approx(0.001) and isinstance(knobs.lr, float)


def test_an_integer_is_accepted_where_a_float_is_expected(tmp_path):
    assert config.load("train", Knobs, write(tmp_path, "train:\n  lr: 1\n")).lr == 1.0


def test_unknown_params_key_is_named_in_the_error(tmp_path):
    with pytest.raises(ConfigError, match=r"params.yaml: train: unknown keys \['lrr'\]; valid keys are .*'lr'"):
        config.load("train", Knobs, write(tmp_path, "train:\n  lrr: 0.1\n"))


def test_wrong_type_names_the_key_and_the_value(tmp_path):
    with pytest.raises(ConfigError, match=r"train.epochs: expected an integer, got 'ten' \(str\)"):
        config.load("train", Knobs, write(tmp_path, "train:\n  epochs: ten\n"))


def test_a_float_is_not_silently_truncated_to_an_integer(tmp_path):
    with pytest.raises(ConfigError, match=r"train.epochs: expected an integer, got 2.5"):
        config.load("train", Knobs, write(tmp_path, "train:\n  epochs: 2.5\n"))


def test_a_boolean_is_not_a_number(tmp_path):
    with pytest.raises(ConfigError, match=r"train.lr: expected a number, got True"):
        config.load("train", Knobs, write(tmp_path, "train:\n  lr: true\n"))


def test_choice_errors_list_the_valid_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"train.optimizer: 'adagrad' \(str\) is not one of \['adam', 'sgd'\]"):
        config.load("train", Knobs, write(tmp_path, "train:\n  optimizer: adagrad\n"))


def test_out_of_range_value_names_file_key_and_valid_range(tmp_path):
    with pytest.raises(ConfigError, match=r"params.yaml: train.epochs: must be at least 1, got 0"):
        config.load("train", Knobs, write(tmp_path, "train:\n  epochs: 0\n"))


def test_missing_section_lists_the_sections_present(tmp_path):
    with pytest.raises(ConfigError, match=r"missing section 'train:' \(sections present: \['prepare'\]\)"):
        config.load("train", Knobs, write(tmp_path, "prepare:\n  seed: 1\n"))


def test_missing_keys_take_their_defaults(tmp_path):
    assert config.load("train", Knobs, write(tmp_path, "train: {}\n")) == Knobs()


def test_invalid_yaml_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"params.yaml: not valid YAML"):
        config.load("train", Knobs, write(tmp_path, "train: [unclosed\n"))


def test_the_repository_params_file_loads_into_every_stage(repo_root):
    from pipeline import audit, crossval, evaluate, export, finetune, prepare, register, train
    from pipeline.data import sources
    from pipeline.frameworks.interface import RuntimeParams

    path = repo_root / "params.yaml"
    for section, cls in [
        ("runtime", RuntimeParams), ("data", sources.DataParams), ("prepare", prepare.PrepareParams),
        ("audit", audit.AuditParams), ("train", train.TrainParams), ("finetune", finetune.FinetuneParams),
        ("evaluate", evaluate.EvaluateParams), ("export", export.ExportParams), ("tracking", TrackingParams),
        ("crossval", crossval.CrossvalParams), ("register", register.RegisterParams),
    ]:
        config.load(section, cls, path)
    assert set(config.read_params(path)) == {
        "runtime", "tracking", "data", "prepare", "audit", "train", "crossval", "finetune", "evaluate", "export",
        "register"}


def test_every_params_dataclass_default_is_the_committed_params_yaml():
    """One source of defaults: a dataclass built without arguments is params.yaml's section, and
    params.yaml names every field (so a default cannot drift from the value the pipeline runs)."""
    import dataclasses

    from pipeline.audit import AuditParams
    from pipeline.crossval import CrossvalParams
    from pipeline.data.sources import DataParams
    from pipeline.evaluate import EvaluateParams
    from pipeline.export import ExportParams
    from pipeline.finetune import FinetuneParams
    from pipeline.frameworks.interface import RuntimeParams
    from pipeline.frameworks.scratch import TrainParams
    from pipeline.prepare import PrepareParams
    from pipeline.register import RegisterParams
    from pipeline.tracking.store import TrackingParams

    sections = {"runtime": RuntimeParams, "tracking": TrackingParams, "data": DataParams, "prepare": PrepareParams,
                "audit": AuditParams, "train": TrainParams, "crossval": CrossvalParams, "finetune": FinetuneParams,
                "evaluate": EvaluateParams, "export": ExportParams, "register": RegisterParams}
    raw = config.read_params(REPO / "params.yaml")
    assert set(sections) <= set(raw)
    for section, cls in sections.items():
        names = {f.name for f in dataclasses.fields(cls)}
        assert names - set(raw[section]) == set(), f"params.yaml {section}: misses {sorted(names - set(raw[section]))}"
        committed, default = config.from_dict(raw[section], cls, where=section), cls()
        differ = {n: (getattr(default, n), getattr(committed, n)) for n in sorted(names)
                  if getattr(default, n) != getattr(committed, n)}
        assert differ == {}, f"{cls.__name__} defaults (default, params.yaml) differ: {differ}"
