"""`python -m pipeline.experiments.batch`'s grid: one experiment per combination of -S values."""

from __future__ import annotations

import pytest

from pipeline.errors import PipelineError
from pipeline.experiments import batch, dvc_queue


def test_comma_separated_values_make_a_grid_in_order():
    assert batch.grid(["train.lr=1e-3,3e-3", "train.seed=1", "finetune.epochs=2,4"]) == [
        ("train.lr=1e-3", "train.seed=1", "finetune.epochs=2"), ("train.lr=1e-3", "train.seed=1", "finetune.epochs=4"),
        ("train.lr=3e-3", "train.seed=1", "finetune.epochs=2"), ("train.lr=3e-3", "train.seed=1", "finetune.epochs=4"),
    ]
    assert batch.grid([]) == [()]  # one experiment of the params as they are
    assert batch.grid(["data.sizes=[1,2]"]) == [("data.sizes=[1,2]",)]  # a list is one value


def test_a_set_without_a_value_is_refused_naming_it():
    with pytest.raises(PipelineError, match=r"-S 'train.lr': expected key=value"):
        batch.grid(["train.lr"])


def test_a_lost_experiment_takes_its_requeued_ones_result():
    again = {"a": "a-again", "a-again": "a-again-again"}
    now = {"a": "Failed", "a-again": "Failed", "a-again-again": "Success", "b": "Success"}
    assert dvc_queue.resolved(["a", "b", "a-again", "a-again-again"], again, now) == {"a": "Success", "b": "Success"}
    assert dvc_queue.resolved(["a", "a-again"], {"a": "a-again"}, {"a": "Failed"}) == {"a": "Failed"}  # not landed
