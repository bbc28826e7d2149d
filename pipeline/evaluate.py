"""Evaluate one trained model on the held-out test split: how well, how calibrated, where it
looks, and which errors to look at.

Reads the model folder `models/<model>/` (either framework) and the prepared val and test
splits; writes `dvclive/evaluate/<model>/`:
- metrics.json: accuracy, top-k accuracy (k = min(5, classes - 1)), balanced accuracy, macro
  precision/recall/F1, one-vs-rest macro ROC-AUC, log loss, expected calibration error (15
  bins); with `calibrate`, the temperature fitted on the val split and the test ECE and log
  loss after scaling; the model's parameter count and file size;
- per_class.json (precision, recall, F1, support per class), confusion.json (counts and
  row-normalised), calibration.json (the temperature, for exports and serving, and the
  reliability bins before and after): detail kept out of `dvc metrics show`'s columns;
- plots: the confusion matrix (DVC's confusion templates), the reliability curve
  (plots/custom/reliability.json), and PNG images: reliability diagram, Grad-CAM over a seeded
  sample of test images (half right, half wrong), the most confidently wrong test images, both
  confusion matrices.
With `--audit` (the audit stage's issues.csv), metrics.json also holds the test accuracy on the
test images the audit did not flag (`test/acc_unflagged`) and their count.
dvc.yaml runs it for each model (`foreach`: scratch, finetune).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline import cli, config, files
from pipeline.config import check
from pipeline.data import formats, review
from pipeline.evaluation import calibration, figures, samples
from pipeline.frameworks import registry
from pipeline.frameworks.interface import RuntimeParams
from pipeline.tracking.run import stage_run


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 256
    calibrate: bool = True  # fit a temperature on the val split and report test ECE and loss after it
    explain_images: int = 8  # Grad-CAM sample size (half right, half wrong when there are enough wrong ones)
    error_images: int = 12  # the most confidently wrong test images shown
    seed: int = 0  # draws the Grad-CAM sample

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, "batch_size", f"must be at least 1, got {self.batch_size}")
        check(isinstance(self.calibrate, bool), "calibrate", f"must be true or false, got {self.calibrate!r}")
        check(0 <= self.explain_images <= 64, "explain_images", f"must be in [0, 64], got {self.explain_images}")
        check(0 <= self.error_images <= 64, "error_images", f"must be in [0, 64], got {self.error_images}")


def classification_metrics(labels: np.ndarray, proba: np.ndarray, classes: tuple[str, ...]) -> tuple[dict, dict]:
    """Summary metrics and the per-class report from true labels and predicted probabilities."""
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        classification_report,
        log_loss,
        precision_recall_fscore_support,
    )

    predicted = proba.argmax(1)
    indices = list(range(len(classes)))
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, predicted, labels=indices, average="macro", zero_division=0
    )
    k = max(1, min(5, len(classes) - 1))
    summary = {
        "test/acc": float(accuracy_score(labels, predicted)),
        "test/top_k_acc": top_k_accuracy(labels, proba, k),
        "test/top_k": k,
        "test/balanced_acc": float(balanced_accuracy_score(labels, predicted)),
        "test/precision_macro": float(precision),
        "test/recall_macro": float(recall),
        "test/f1_macro": float(f1),
        "test/loss": float(log_loss(labels, proba, labels=indices)),
        "test/ece": calibration.ece(proba, labels),
        "test/images": len(labels),
    }
    auc = roc_auc(labels, proba, len(classes))
    if auc is not None:
        summary["test/roc_auc_macro"] = auc
    report = classification_report(
        labels, predicted, labels=indices, target_names=list(classes), output_dict=True, zero_division=0
    )
    per_class = {name: {k: round(float(v), 6) for k, v in report[name].items()} for name in classes}
    return summary, per_class


def top_k_accuracy(labels: np.ndarray, proba: np.ndarray, k: int) -> float:
    """Share of images whose true class is among the k most probable (ties: the lower class
    index first, as a stable sort orders them)."""
    top = np.argsort(-proba, axis=1, kind="stable")[:, :k]
    return float((top == labels[:, None]).any(1).mean()) if len(labels) else 0.0


def roc_auc(labels: np.ndarray, proba: np.ndarray, classes: int) -> float | None:
    """One-vs-rest macro ROC-AUC; None when a class has no test image (it is undefined then)."""
    from sklearn.metrics import roc_auc_score

    if len(np.unique(labels)) < classes:
        return None
    if classes == 2:
        return float(roc_auc_score(labels, proba[:, 1]))
    return float(roc_auc_score(labels, proba, multi_class="ovr", average="macro", labels=list(range(classes))))


def confusion(labels: np.ndarray, predicted: np.ndarray, classes: tuple[str, ...]) -> dict:
    """Counts (rows: true class) and the same rows as fractions (a class with no image: zeros)."""
    from sklearn.metrics import confusion_matrix

    counts = confusion_matrix(labels, predicted, labels=list(range(len(classes))))
    totals = counts.sum(1, keepdims=True)
    normalised = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    return {"classes": list(classes), "counts": counts.tolist(), "normalised": np.round(normalised, 6).tolist()}


def captions(indices: np.ndarray, labels: np.ndarray, proba: np.ndarray, classes: tuple[str, ...]) -> list[str]:
    predicted = proba.argmax(1)
    return [f"true {classes[labels[i]]}\npred {classes[predicted[i]]} ({proba[i, predicted[i]]:.2f})" for i in indices]


def unflagged_accuracy(labels: np.ndarray, proba: np.ndarray, flagged: set[int] | None) -> dict[str, float | int]:
    """Test accuracy on the test images the audit did not flag, and their count: beside the
    plain accuracy, how much of the error is on images whose label or quality is in doubt."""
    if flagged is None:
        return {}
    keep = np.ones(len(labels), dtype=bool)
    keep[sorted(flagged)] = False
    acc = float((proba[keep].argmax(1) == labels[keep]).mean()) if keep.any() else float("nan")
    return {"test/acc_unflagged": acc, "test/unflagged_images": int(keep.sum())}


def main(argv: list[str] | None = None) -> None:
    args = cli.model_paths(argv, __doc__, "evaluate", audit=True)
    p = config.load("evaluate", EvaluateParams)
    rt = config.load("runtime", RuntimeParams)
    files.verify_folder(args.data, "prepare")
    files.verify_folder(args.model_dir, args.producer)
    test, val = formats.load_split(args.data, "test"), formats.load_split(args.data, "val")
    backend, model, _ = registry.open_model(args.model_dir, test.classes, args.data, rt)  # only its framework loads
    classes, name = test.classes, args.model
    with stage_run(f"evaluate@{name}", {"evaluate": p, "runtime": rt, "model": name}, args.live) as run:
        proba = backend.predict(model, test.images, p.batch_size)
        summary, per_class = classification_metrics(test.labels, proba, classes)
        summary |= unflagged_accuracy(test.labels, proba, review.flagged(args.audit, "test"))
        temperature = 1.0
        if p.calibrate:  # fitted on val: a temperature fitted on test would flatter the test ECE
            temperature = calibration.fit_temperature(backend.predict(model, val.images, p.batch_size), val.labels)
        scaled = calibration.scale(proba, temperature)
        summary |= {"calibrated/temperature": temperature, "calibrated/ece": calibration.ece(scaled, test.labels),
                    "calibrated/loss": calibration.log_loss(scaled, test.labels)}
        model_file = args.model_dir / backend.model_file
        summary |= {"model/parameters": backend.count_parameters(model), "model/file_bytes": model_file.stat().st_size}
        run.log_summary(summary)

        predicted = proba.argmax(1)
        run.log_confusion_matrix([classes[i] for i in test.labels], [classes[i] for i in predicted])
        matrices = confusion(test.labels, predicted, classes)
        before, after = calibration.reliability(proba, test.labels), calibration.reliability(scaled, test.labels)
        details = {
            "per_class.json": per_class,
            "confusion.json": matrices,
            "calibration.json": {"temperature": temperature, "fitted_on": "val" if p.calibrate else "none",
                                 "bins": calibration.BINS, "before": before, "after": after},
            "plots/custom/reliability.json": [
                {"confidence": r["confidence"], "accuracy": r["accuracy"], "images": r["count"]}
                for r in before if r["count"]
            ],
        }
        for file, obj in details.items():
            files.write_json(run.live_dir / file, obj)
            run.log_dict(obj, file.rsplit("/", 1)[-1])

        title = f"{name}: test ECE {summary['test/ece']:.3f}" + (
            f", {summary['calibrated/ece']:.3f} at T = {temperature:.2f}" if p.calibrate else "")
        run.log_image(figures.png_bytes(figures.reliability_figure(before, title, after if p.calibrate else None)),
                      "reliability.png")
        for key, normalised in (("counts", False), ("normalised", True)):
            figure = figures.confusion_figure(np.array(matrices[key]), classes, f"{name}: test confusion ({key})",
                                              normalised)
            run.log_image(figures.png_bytes(figure), f"confusion_{key}.png")
        chosen = samples.explain_sample(test.labels, predicted, p.explain_images, p.seed)
        images = np.asarray(test.images[chosen])
        maps = backend.explain(model, images, predicted[chosen])
        figure = figures.image_grid(images, captions(chosen, test.labels, proba, classes),
                                    f"{name}: Grad-CAM for the predicted class", maps)
        run.log_image(figures.png_bytes(figure), "gradcam.png")
        wrong = samples.confident_errors(proba, test.labels, p.error_images)
        figure = figures.image_grid(np.asarray(test.images[wrong]), captions(wrong, test.labels, proba, classes),
                                    f"{name}: the most confidently wrong test images")
        run.log_image(figures.png_bytes(figure), "errors.png")
        run.set_tags({"model": name, **backend.describe()})
        run.log_dataset(args.data, "evaluation")


if __name__ == "__main__":
    main()
