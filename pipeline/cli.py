"""The paths every stage takes on its command line: dvc.yaml's cmd names them, params.yaml
does not (paths are where outputs go, not knobs that shape them)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

Option = tuple[str, dict[str, Any]]
PRODUCERS = {"scratch": "train", "finetune": "finetune"}  # model folder -> the stage that trains it


def path(flag: str, default: str | None, help: str = "") -> Option:
    return flag, {"type": Path, "default": Path(default) if default else None, "help": help}


def parse(argv: list[str] | None, doc: str | None, *options: Option) -> argparse.Namespace:
    """Parse `argv` with `options`; the stage docstring's first line is the description."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0] if doc else None)
    for flag, kwargs in options:
        parser.add_argument(flag, **kwargs)
    return parser.parse_args(argv)


APPLIED = path("--applied", None, "the audit's changes to train and val (data/audit/applied.csv; audit.apply)")


def fit_paths(argv: list[str] | None, doc: str | None, stage: str, model: str,
              features: bool = False) -> argparse.Namespace:
    """A training stage's paths: the prepared data in, the model folder and DVCLive folder out;
    with `features`, the folder of the audit's backbone features (data/audit), reused if they fit."""
    options = [path("--data", "data/prepared"), path("--out", f"models/{model}", "the model folder"),
               path("--live", f"dvclive/{stage}"), APPLIED]
    if features:
        options.append(path("--features", None, "the audit's folder (data/audit): its features, where they fit"))
    return parse(argv, doc, *options)


def model_paths(
    argv: list[str] | None, doc: str | None, stage: str, out: str | None = None, evaluation: bool = False,
    audit: bool = False,
) -> argparse.Namespace:
    """A stage that reads one trained model (`--model` under `--models`): its paths, with
    `model_dir`, `live` (dvclive/<stage>/<model>), when `out` is given, `out` (<out>/<model>),
    and with `evaluation`, the model's evaluate folder (dvclive/evaluate/<model>)."""
    options = [
        ("--model", {"required": True, "help": "model name: scratch or finetune"}),
        path("--data", "data/prepared"),
        path("--models", "models"),
        path("--live", None, f"default: dvclive/{stage}/<model>"),
    ]
    if out:
        options.append(path("--out", None, f"default: {out}/<model>"))
    if evaluation:
        options.append(path("--evaluation", None, "default: dvclive/evaluate/<model>"))
    if audit:
        options.append(path("--audit", None, "the audit's issues.csv (data/audit/issues.csv)"))
    args = parse(argv, doc, *options)
    args.model_dir = args.models / args.model
    args.producer = PRODUCERS.get(args.model, args.model)
    args.live = args.live or Path("dvclive") / stage / args.model
    if out:
        args.out = args.out or Path(out) / args.model
    if evaluation:
        args.evaluation = args.evaluation or Path("dvclive") / "evaluate" / args.model
    return args
