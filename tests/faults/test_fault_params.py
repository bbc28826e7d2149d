"""Params traps: each bad params.yaml stops the stage before it touches anything, in one line
that names the file, the key and what is valid; YAML 1.1 look-alikes read as DVC reads them."""

from __future__ import annotations

import shutil

import pytest
from helpers import assert_expected_failure, snapshot, stage
from support import TINY_PARAMS

from pipeline import config, train

pytestmark = pytest.mark.slow  # stages in subprocesses; make test runs them, test-fast does not


def with_train(body: str) -> str:
    """TINY_PARAMS with its train section replaced by `body`."""
    lines = [line for line in TINY_PARAMS.splitlines() if not line.startswith("train:")]
    return "\n".join(lines) + "\n" + body + "\n"


TRAPS = {
    "unknown key": (with_train("train: {epochs: 2, lrr: 0.1}"), ["params.yaml: train: unknown keys ['lrr']",
                                                                  "valid keys are"]),
    "wrong type": (with_train("train: {epochs: ten}"), ["train.epochs: expected an integer, got 'ten' (str)"]),
    "out of range": (with_train("train: {lr: -1.0}"), ["train.lr: must be in (0, 10], got -1.0"]),
    "yaml 1.1 on": (with_train("train: {batch_norm: on}"), ["train.batch_norm: expected true or false, got 'on'"]),
    "yaml 1.1 no": (with_train("train: {channels_last: no}"), ["train.channels_last: expected true or false, got 'no'"],
                    ),
    "quoted number": (with_train("train: {lr: '1e-3'}"), ["train.lr: expected a number, got '1e-3' (str)"]),
    "missing section": (with_train(""), ["params.yaml: missing section 'train:'"]),
    "broken yaml": (with_train("train: {epochs: 2\n  lr: [3"), ["params.yaml: not valid YAML"]),
    "unknown choice": (with_train("train: {optimizer: adagrad}"), ["train.optimizer: 'adagrad' (str) is not one of"]),
}


@pytest.mark.parametrize("trap", TRAPS, ids=list(TRAPS))
def test_a_params_trap_stops_the_stage_in_one_line_and_keeps_its_outputs(trap, prepared, tmp_path):
    text, needles = TRAPS[trap]
    (tmp_path / "params.yaml").write_text(text)
    shutil.copytree(prepared, tmp_path / "data/prepared")
    previous = tmp_path / "models/scratch"
    previous.mkdir(parents=True)
    (previous / "model.pt").write_bytes(b"the previous model")
    before = snapshot(tmp_path / "models", tmp_path / "data")
    done = stage(tmp_path, "train")
    message = assert_expected_failure(done, *needles)
    assert "`dvc checkout train` restores" in message  # how to get back what DVC deleted
    assert snapshot(tmp_path / "models", tmp_path / "data") == before


@pytest.mark.parametrize("value, expected", [("010", 10), ("1e-3", 0.001), ("0o10", 8), ("1.0e-3", 0.001)])
def test_numbers_read_as_dvc_reads_them(value, expected, tmp_path):
    from dvc.utils.serialize import parse_yaml

    path = tmp_path / "params.yaml"
    key = "epochs" if isinstance(expected, int) else "lr"
    path.write_text(with_train(f"train: {{{key}: {value}}}"))
    ours = getattr(config.load("train", train.TrainParams, path), key)
    dvc = parse_yaml(path.read_text(), str(path))["train"][key]
    assert ours == dvc == expected and type(ours) is type(dvc)
