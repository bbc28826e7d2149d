"""Evaluate one trained model on the held-out test split.

Reads the model folder `models/<model>/` (either framework) and the prepared test split;
writes `dvclive/evaluate/<model>/`: metrics.json (accuracy, macro precision/recall/F1, loss),
the confusion matrix as a DVC plot and `per_class.json` (precision, recall, F1 and support per
class). dvc.yaml runs it for each model (`foreach`: scratch, finetune).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline import cli, config, files, tracking
from pipeline.config import check
from pipeline.data import formats
from pipeline.frameworks import registry
from pipeline.frameworks.interface import RuntimeParams


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 256

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, "batch_size", f"must be at least 1, got {self.batch_size}")


def classification_metrics(labels: np.ndarray, proba: np.ndarray, classes: tuple[str, ...]) -> tuple[dict, dict]:
    """Summary metrics and the per-class report from true labels and predicted probabilities."""
    from sklearn.metrics import accuracy_score, classification_report, log_loss, precision_recall_fscore_support

    predicted = proba.argmax(1)
    indices = list(range(len(classes)))
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, predicted, labels=indices, average="macro", zero_division=0
    )
    summary = {
        "test/acc": float(accuracy_score(labels, predicted)),
        "test/precision_macro": float(precision),
        "test/recall_macro": float(recall),
        "test/f1_macro": float(f1),
        "test/loss": float(log_loss(labels, proba, labels=indices)),
        "test/images": len(labels),
    }
    report = classification_report(
        labels, predicted, labels=indices, target_names=list(classes), output_dict=True, zero_division=0
    )
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
    args = cli.model_paths(argv, __doc__, "evaluate")
    p = config.load("evaluate", EvaluateParams)
    rt = config.load("runtime", RuntimeParams)
    files.verify_folder(args.data, "prepare")
    files.verify_folder(args.model_dir, args.producer)
    test = formats.load_split(args.data, "test")
    backend, model, _ = registry.open_model(args.model_dir, test.classes, args.data, rt)  # only its framework loads
    with tracking.stage_run(
        f"evaluate@{args.model}", {"evaluate": p, "runtime": rt, "model": args.model}, args.live
    ) as run:
        proba = backend.predict(model, test.images, p.batch_size)
        summary, per_class = classification_metrics(test.labels, proba, test.classes)
        predicted = proba.argmax(1)
        run.log_summary(summary)
        run.log_confusion_matrix([test.classes[i] for i in test.labels], [test.classes[i] for i in predicted])
        files.write_json(run.live_dir / "per_class.json", per_class)
        run.set_tags({"model": args.model, **backend.describe(), **formats.dataset_tags(args.data)})
        run.log_dict(per_class, "per_class.json")
        run.log_figure(confusion_figure(test.labels, predicted, test.classes), "confusion_matrix.png")


if __name__ == "__main__":
    main()
