"""Line the models up and write one report a reviewer can read offline.

Reads, per model in `--models`: evaluate's `dvclive/evaluate/<model>/` (metrics, calibration,
its PNG figures), export's `dvclive/export/<model>/metrics.json` and `exports/<model>/`
(the ONNX file's size), and the training curves of the stage that trained it
(`dvclive/<train|finetune>/plots/metrics/`). Writes:
- `dvclive/report/metrics.json`: the few numbers that matter, side by side per model (test
  accuracy, macro F1, ECE before and after temperature scaling, log loss, parameter count,
  model and ONNX file sizes, the accuracy of always answering the most common test class and
  the binomial p-value of reaching the model's by such guessing), so `dvc exp show` compares
  experiments on them;
- `reports/report.md` with its PNGs beside it in `reports/images/`: the table (and, under it,
  which models are not clearly above chance: p >= 0.05, as on a few dozen test images), training
  curves, confusion matrices, reliability diagrams, Grad-CAM and error galleries, and how to
  read each. Plain Markdown and PNGs: it reads offline, unlike `dvc plots show`'s page.
The same folder is logged to MLflow under `report/`.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from pipeline import cli, files
from pipeline.data import formats
from pipeline.evaluation import figures
from pipeline.tracking.run import stage_run

HEADLINE = {  # report column: (evaluate metrics path, format)
    "test accuracy": ("test/acc", "{:.4f}"),
    "macro F1": ("test/f1_macro", "{:.4f}"),
    "balanced accuracy": ("test/balanced_acc", "{:.4f}"),
    "ECE": ("test/ece", "{:.4f}"),
    "ECE after T": ("calibrated/ece", "{:.4f}"),
    "log loss": ("test/loss", "{:.4f}"),
    "temperature": ("calibrated/temperature", "{:.3f}"),
    "parameters": ("model/parameters", "{:,}"),
    "model file (MB)": ("model/file_bytes", None),
}
FIGURES = (
    ("confusion_counts.png", "Confusion matrix (counts; rows are the true class)"),
    ("confusion_normalised.png", "Confusion matrix (rows divided by each class's test images: recall on the diagonal)"),
    ("reliability.png", "Reliability diagram"),
    ("gradcam.png", "Grad-CAM"),
    ("errors.png", "The most confidently wrong test images"),
)
READING = """\
## How to read it

- **Accuracy, macro F1, balanced accuracy**: accuracy counts every test image once; macro F1
  and balanced accuracy weight every class equally, so a model that ignores a rare class shows
  it there first.
- **Log loss** punishes confident mistakes; two models with the same accuracy can differ a lot.
- **ECE** (expected calibration error, 15 equal-width confidence bins): the mean gap between
  confidence and accuracy, weighted by images per bin. 0.05 means that, on average, a
  prediction made with confidence c is right c ± 5 points of the time. **ECE after T** is the
  same after temperature scaling: the logits divided by one number T fitted on the validation
  split (never the test split). T > 1: the model was over-confident; T < 1: under-confident
  (label smoothing makes models so). The exports' `model.json` carries T for serving.
- **Reliability diagram**: bars are the accuracy in each confidence bin, the orange line the
  mean confidence against accuracy; on the dashed diagonal the model is calibrated, below it
  over-confident. The lower panel shows how many images each bin holds: sparse bins are noisy.
- **Confusion matrices**: rows are the true class. The row-normalised one shows each class's
  recall on the diagonal and where its errors go off it.
- **Grad-CAM**: for a fixed, seeded sample of test images (half right, half wrong when there are
  enough wrong ones), where the last feature map's evidence for the predicted class lies, red
  strongest. A model that looks at the background or the borders has learnt a shortcut.
  The maps are as coarse as that feature map (a few cells for small inputs).
- **Most confidently wrong**: the errors with the highest confidence; look for label noise,
  ambiguous images and classes that look alike.
"""


def lookup(metrics: dict, path: str) -> int | float | None:
    """metrics["test"]["acc"] for 'test/acc'; None when it is not there (or not a number)."""
    node = metrics
    for part in path.split("/"):
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, int | float) else None


def headline(evaluation: dict, export: dict, onnx_bytes: int | None) -> dict:
    """One model's row of the comparison (evaluate's numbers; export's ONNX parity and size)."""
    def get(path: str) -> int | float | None:
        return lookup(evaluation, path)

    row = {
        "test_acc": get("test/acc"), "f1_macro": get("test/f1_macro"), "balanced_acc": get("test/balanced_acc"),
        "ece": get("test/ece"), "ece_calibrated": get("calibrated/ece"), "loss": get("test/loss"),
        "temperature": get("calibrated/temperature"), "parameters": get("model/parameters"),
        "model_bytes": get("model/file_bytes"), "onnx_bytes": onnx_bytes,
        "onnx_max_abs_diff": export.get("onnx", {}).get("max_abs_diff"),
    }
    for name, result in export.items():  # the int8 file (keras: tflite_int8): shipped, or withheld by its gate
        if name.endswith("int8") and isinstance(result, dict):
            row |= {"int8_shipped": result.get("shipped", 1.0), "int8_top1_agreement": result.get("top1_agreement"),
                    "int8_max_abs_diff": result.get("max_abs_diff")}
    return {k: v for k, v in row.items() if v is not None}


def int8_cell(row: dict) -> str:
    if "int8_shipped" not in row:
        return "-"
    figures = (f"top-1 agreement {row.get('int8_top1_agreement', float('nan')):.4f}, "
               f"largest move {row.get('int8_max_abs_diff', float('nan')):.2f}")
    return f"shipped ({figures})" if row["int8_shipped"] else f"**withheld** by its gate ({figures})"


CHANCE_P = 0.05  # a model whose test accuracy a majority-class guesser reaches this often is not above chance


def binomial_tail(successes: int, n: int, p: float) -> float:
    """P(X >= successes) for X ~ Binomial(n, p), summed in log space (n of thousands). scipy's
    `binom.sf` gives the same; importing scipy.stats would cost this short stage 0.9 s."""
    if successes <= 0 or p >= 1:
        return 1.0
    if p <= 0 or successes > n:
        return 0.0
    logs = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p)
            + (n - k) * math.log1p(-p) for k in range(successes, n + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * math.fsum(math.exp(v - top) for v in logs))


def versus_chance(accuracy: float, supports: list[int]) -> dict[str, float]:
    """How the test accuracy compares with always answering the test split's most common class:
    that rate, and the one-sided binomial p-value of scoring this well by such guessing."""
    n = sum(supports)
    majority = max(supports) / n
    return {"chance_acc": majority, "chance_p": binomial_tail(round(accuracy * n), n, majority)}


def chance_warning(name: str, accuracy: float, n: int, chance: dict[str, float]) -> list[str]:
    """A paragraph for a model not clearly above chance; none for one that is."""
    if chance["chance_p"] < CHANCE_P:
        return []
    return [f"**{name} is not clearly above chance**: {round(accuracy * n)} of {n} test images right "
            f"({accuracy:.3f}), where always answering the most common class scores {chance['chance_acc']:.3f} "
            f"(one-sided binomial p = {chance['chance_p']:.2f}). On data this small it has learned nothing it can "
            "show; prefer a model above chance (the fine-tune), or gather more images.", ""]


def curves(stage_live: Path) -> pd.DataFrame:
    """train/val loss and accuracy per epoch from a training stage's DVCLive files."""
    frames = []
    for split in ("train", "val"):
        for metric in ("loss", "acc"):
            path = stage_live / "plots" / "metrics" / split / f"{metric}.tsv"
            if path.is_file():
                frame = pd.read_csv(path, sep="\t")
                frames.append(frame.rename(columns={metric: f"{split}/{metric}"}).set_index("step"))
    return pd.concat(frames, axis=1) if frames else pd.DataFrame()


def curves_figure(name: str, table: pd.DataFrame):
    plt = figures._plt()
    figure, (loss, acc) = plt.subplots(1, 2, figsize=(9, 3.2))
    for column in table.columns:
        (loss if column.endswith("loss") else acc).plot(table.index, table[column], label=column)
    loss.set(xlabel="epoch", ylabel="loss", title=f"{name}: loss")
    acc.set(xlabel="epoch", ylabel="accuracy", title=f"{name}: accuracy")
    for ax in (loss, acc):
        ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def markdown(rows: dict[str, dict], evaluations: dict[str, dict], dataset: dict, images: dict[str, list]) -> str:
    lines = ["# Evaluation report", ""]
    reviewed = dataset.get("review")
    changed = (f" ({reviewed['dropped']} dropped and {reviewed['relabelled']} relabelled by `{reviewed['file']}`)"
               if isinstance(reviewed, dict) else "")
    lines += [f"Dataset: `{dataset.get('source')}` (sha256 `{str(dataset.get('sha256'))[:12]}`), "
              f"{dataset.get('images')} images{changed}, {dataset.get('classes')} classes. Every number is on the "
              "test split unless it says otherwise.", ""]
    names = list(rows)
    lines += ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for column, (path, fmt) in HEADLINE.items():
        cells = []
        for name in names:
            node = lookup(evaluations[name], path)
            if node is None:
                cells.append("-")
            else:
                cells.append(f"{node / 1e6:.2f}" if fmt is None else fmt.format(node))
        lines.append(f"| {column} | " + " | ".join(cells) + " |")
    lines.append("| ONNX file (MB) | " + " | ".join(
        f"{rows[n]['onnx_bytes'] / 1e6:.2f}" if "onnx_bytes" in rows[n] else "-" for n in names) + " |")
    lines.append("| int8 file | " + " | ".join(int8_cell(rows[n]) for n in names) + " |")
    lines.append("| chance (most common class) | " + " | ".join(
        f"{rows[n]['chance_acc']:.4f}" if "chance_acc" in rows[n] else "-" for n in names) + " |")
    lines.append("")
    for name in names:
        if "chance_p" in rows[name]:
            lines += chance_warning(name, rows[name]["test_acc"], int(lookup(evaluations[name], "test/images")),
                                    rows[name])
    for name in names:
        lines += [f"## {name}", ""]
        for file, caption in images[name]:
            lines += [f"**{caption}**", "", f"![{name}: {caption}](images/{file})", ""]
    return "\n".join(lines) + "\n" + READING


def main(argv: list[str] | None = None) -> None:
    args = cli.parse(argv, __doc__, ("--models", {"nargs": "+", "default": ["scratch", "finetune"]}),
                     cli.path("--data", "data/prepared"), cli.path("--evaluations", "dvclive/evaluate"),
                     cli.path("--exports", "exports"), cli.path("--export-metrics", "dvclive/export"),
                     cli.path("--curves", "dvclive"), cli.path("--out", "reports"),
                     cli.path("--live", "dvclive/report"))
    dataset = formats.read_json(args.data / "dataset.json", "the dataset description")
    evaluations = {m: formats.read_json(args.evaluations / m / "metrics.json", f"{m}'s evaluation")
                   for m in args.models}
    with stage_run("report", {"models": list(args.models)}, args.live) as run:
        rows, images = {}, {}
        # read by people, not by a stage; reports/ also holds the audit's report, which is not ours
        with files.atomic_dir(args.out / "images", checksums=False) as out_images:
            for m in args.models:
                export_metrics = args.export_metrics / m / "metrics.json"
                export = formats.read_json(export_metrics, f"{m}'s export metrics") if export_metrics.exists() else {}
                onnx = args.exports / m / "model.onnx"
                rows[m] = headline(evaluations[m], export, onnx.stat().st_size if onnx.exists() else None)
                per_class = args.evaluations / m / "per_class.json"
                if "test_acc" in rows[m] and per_class.is_file():
                    supports = [int(c["support"]) for c in formats.read_json(per_class, f"{m}'s per-class figures")
                                .values() if isinstance(c, dict) and "support" in c]
                    rows[m].update(versus_chance(rows[m]["test_acc"], supports) if supports else {})
                images[m] = []
                table = curves(args.curves / cli.PRODUCERS.get(m, m))
                if not table.empty:
                    figures.save_png(curves_figure(m, table), out_images / f"{m}_curves.png")
                    images[m].append((f"{m}_curves.png", "Training curves (train and validation, per epoch)"))
                for file, caption in FIGURES:
                    source = args.evaluations / m / "plots" / "images" / file
                    if source.is_file():
                        files.write_bytes(out_images / f"{m}_{file}", source.read_bytes())
                        images[m].append((f"{m}_{file}", caption))
        files.write_text(args.out / "report.md", markdown(rows, evaluations, dataset, images))
        side_by_side = {f"{m}/{k}": v for m, row in rows.items() for k, v in row.items()}
        run.log_summary(side_by_side)
        run.log_group_metrics(side_by_side)  # onto the execution's parent run: experiments compare there
        run.log_artifact(args.out / "report.md", "report")
        run.log_artifact(args.out / "images", "report/images")


if __name__ == "__main__":
    main()
