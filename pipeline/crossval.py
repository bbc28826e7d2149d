"""Cross-validate the scratch CNN's recipe (optional: `crossval.folds`, 0 = off, 5 is typical).

Reads the prepared train and val splits (`data/prepared`) and the `train` params; pools train
and val, splits the pool into `folds` stratified folds (seeded), and trains the scratch CNN as
`train` would on all but one fold, validating on the one left out, for each fold. Writes
`dvclive/crossval/`: metrics.json (folds, mean and standard deviation over folds of the best
val accuracy and loss) and folds.json (each fold's figures). The test split is never touched.
MLflow: one run `crossval`, a child run per fold with its curves. Deterministic like `train`:
each fold seeds the framework afresh.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline import cli, config, files
from pipeline.config import check
from pipeline.data import formats, review
from pipeline.frameworks import registry
from pipeline.frameworks.interface import RuntimeParams
from pipeline.frameworks.recipe import resolve_auto
from pipeline.frameworks.scratch import TrainParams, model_args
from pipeline.tracking.run import stage_run


@dataclass(frozen=True)
class CrossvalParams:
    folds: int = 0  # 0: off (the stage records that and returns); else 2..20
    seed: int = 0  # draws the folds

    def __post_init__(self) -> None:
        check(self.folds == 0 or 2 <= self.folds <= 20, "folds", f"must be 0 (off) or in 2..20, got {self.folds}")


def fold_indices(labels: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, val) row indices of each stratified fold, each sorted (so a fold's data order
    depends only on which rows it holds)."""
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(labels)
    if counts[counts > 0].min() < folds:
        raise formats.DataError(f"crossval.folds={folds}, but a class has only {counts[counts > 0].min()} train+val "
                                f"images; every class needs at least one image per fold")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(np.sort(a), np.sort(b)) for a, b in splitter.split(np.zeros(len(labels)), labels)]


def summarise(per_fold: list[dict]) -> dict:
    """Mean and (population) standard deviation over folds of each fold figure."""
    summary: dict = {"folds": len(per_fold)}
    for key in ("val_acc", "val_loss"):
        values = np.array([f[key] for f in per_fold], np.float64)
        summary[f"{key}_mean"], summary[f"{key}_std"] = float(values.mean()), float(values.std())
    return summary


def main(argv: list[str] | None = None) -> None:
    args = cli.parse(argv, __doc__, cli.path("--data", "data/prepared"), cli.path("--live", "dvclive/crossval"),
                     cli.APPLIED)
    p = config.load("crossval", CrossvalParams)
    t = config.load("train", TrainParams)
    rt = config.load("runtime", RuntimeParams)
    files.verify_folder(args.data, "prepare")
    with stage_run("crossval", {"crossval": p, "train": t, "runtime": rt}, args.live) as run:
        per_fold: list[dict] = []
        run.log_dataset(args.data, "training")
        if p.folds:
            train, val = review.load_training(args.data, args.applied)
            images = np.concatenate([np.asarray(train.images), np.asarray(val.images)])
            labels = np.concatenate([train.labels, val.labels])
            for k, (rest, held) in enumerate(fold_indices(labels, p.folds, p.seed)):
                fold_train = formats.Split(images[rest], labels[rest], train.classes)
                fold_val = formats.Split(images[held], labels[held], train.classes)
                backend = registry.get(t.framework, rt, t.seed)  # seeds afresh: each fold as `train` would run
                model = backend.build("scratch_cnn", model_args(t, fold_train))
                fold_t = resolve_auto(t, len(rest))  # auto: the steps `train` aims for, on this fold's images
                sizes = {"fold": k, "train_images": len(rest), "val_images": len(held), "epochs": fold_t.epochs}
                with run.child(f"crossval/fold{k}", sizes) as child:
                    result = backend.fit(model, fold_train, fold_val, fold_t, child,
                                         desc=f"crossval fold {k + 1}/{p.folds}")
                    figures = {"fold": k, "val_acc": result.best_val_acc, "val_loss": result.best_val_loss,
                               "best_epoch": result.best_epoch, "val_images": len(held)}
                    child.log_summary({k2: v for k2, v in figures.items() if k2 != "fold"})
                per_fold.append(figures)
        run.log_summary(summarise(per_fold) if per_fold else {"folds": 0})
        files.write_json(run.live_dir / "folds.json", per_fold)


if __name__ == "__main__":
    main()
