"""Evaluate one trained model on the held-out test split.

Reads the model folder `models/<model>/` (either framework) and the prepared test split; writes `dvclive/evaluate/<model>/`:
metrics.json (accuracy, macro precision/recall/F1, loss), the confusion matrix as a DVC plot
and `per_class.json` (precision, recall, F1 and support per class). dvc.yaml runs it for each
model (`foreach`: scratch, finetune).
"""

from __future__ import annotations

from pipeline import tracking

if __name__ == "__main__":
    # MLflow's start-up (~4 s) runs in a worker process while this one imports torch & co.
    tracking.start_worker()

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import backends, config, data, files
from pipeline.config import check
from pipeline.runtime import RuntimeParams


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 256

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, "batch_size", f"must be at least 1, got {self.batch_size}")


def check_classes(model_classes: tuple[str, ...], data_classes: tuple[str, ...], model_path: Path, data_path: Path) -> None:
    """A model is only meaningful on data whose label indices mean the same classes."""
    if tuple(model_classes) != tuple(data_classes):
        raise data.DataError(
            f"{model_path} was trained on classes {list(model_classes)}, but {data_path}/classes.json "
            f"lists {list(data_classes)}; rerun the training stages (dvc repro)"
        )


def classification_metrics(labels: np.ndarray, proba: np.ndarray, classes: tuple[str, ...]) -> tuple[dict, dict]:
    """Summary metrics and the per-class report from true labels and predicted probabilities."""
    from sklearn.metrics import accuracy_score, classification_report, log_loss, precision_recall_fscore_support

    predicted = proba.argmax(1)
    indices = list(range(len(classes)))
    precision, recall, f1, _ = precision_recall_fscore_support(labels, predicted, labels=indices, average="macro", zero_division=0)
    summary = {
        "test/acc": float(accuracy_score(labels, predicted)),
        "test/precision_macro": float(precision),
        "test/recall_macro": float(recall),
        "test/f1_macro": float(f1),
        "test/loss": float(log_loss(labels, proba, labels=indices)),
        "test/images": len(labels),
    }
    report = classification_report(labels, predicted, labels=indices, target_names=list(classes), output_dict=True, zero_division=0)
    per_class = {name: {k: round(float(v), 6) for k, v in report[name].items()} for name in classes}
    return summary, per_class


def confusion_figure(labels: np.ndarray, predicted: np.ndarray, classes: tuple[str, ...]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    figure, axes = plt.subplots(figsize=(6, 6))
    ConfusionMatrixDisplay.from_predictions(
        labels, predicted, labels=list(range(len(classes))), display_labels=list(classes), ax=axes, colorbar=False
    )
    return figure


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model name: scratch or finetune")
    parser.add_argument("--data", type=Path, default=Path("data/prepared"))
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--live", type=Path, default=None, help="default: dvclive/evaluate/<model>")
    args = parser.parse_args(argv)
    p = config.load("evaluate", EvaluateParams)
    rt = config.load("runtime", RuntimeParams)
    live_dir = args.live or Path("dvclive/evaluate") / args.model
    model_dir = args.models / args.model
    test = data.load_split(args.data, "test")
    card = backends.read_card(model_dir)
    check_classes(card.classes, test.classes, model_dir, args.data)
    backend, model = backends.load(model_dir, card, rt)  # imports only the model's framework
    with tracking.stage_run(f"evaluate@{args.model}", {"evaluate": p, "runtime": rt, "model": args.model}, live_dir) as run:
        proba = backend.predict_proba(model, test.images, p.batch_size)
        summary, per_class = classification_metrics(test.labels, proba, test.classes)
        predicted = proba.argmax(1)
        run.log_summary(summary)
        run.log_confusion_matrix([test.classes[i] for i in test.labels], [test.classes[i] for i in predicted])
        files.write_json(live_dir / "per_class.json", per_class)
        run.set_tags({"model": args.model, **backend.describe(), **data.dataset_tags(args.data)})
        run.log_dict(per_class, "per_class.json")
        run.log_figure(confusion_figure(test.labels, predicted, test.classes), "confusion_matrix.png")


if __name__ == "__main__":
    main()
