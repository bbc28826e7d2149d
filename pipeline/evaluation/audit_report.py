"""The audit's report for people: `reports/audit.md` and its galleries in `reports/audit/`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline import files
from pipeline.evaluation import figures

GALLERIES = (  # file, the report's heading, the figure's own (short: a gallery may be two images wide), kinds
    ("label_issues.png", "Likely label errors: given -> suggested label; quality: the given label's probability",
     "Likely label errors", ("label_issue",)),
    ("outliers.png", "Outliers: far from every class in the backbone's features", "Outliers", ("outlier",)),
    ("poor_images.png", "Poor images: blank, dark, bright, blurry or odd aspect", "Poor images",
     ("blank", "dark", "bright", "blurry", "odd_aspect")),
)


def caption(row) -> str:
    name = Path(row.path).name[:18]
    if row.kind == "label_issue":
        return f"{name}\n{row.given_label} -> {row.suggested_label}?\nquality {row.score:.2f}"
    return f"{name} ({row.split})\n{row.kind} {row.score:.3g}"


def markdown(summary: dict, shown: list[tuple[str, str]], params, classes, reads: str) -> str:
    n = summary["images"]
    lines = ["# Data audit", "",
             f"{n} images ({', '.join(classes)}) scored; {summary['flagged_images']} flagged. Every image was "
             f"scored by a linear probe that never saw it ({params.folds} folds over train, val and test, on "
             f"{reads}); its out-of-fold accuracy is "
             f"{summary['probe_out_of_fold_acc']:.3f}. Estimated label noise (cleanlab): "
             f"**{summary['estimated_noise_rate']:.1%}**.", "",
             "| issue | images | what it means |", "|---|---|---|"]
    meaning = {"label_issue": "the given label is unlikely; a suggested label is given (cleanlab)",
               "outlier": "far from every class's mean in feature space",
               "blank": "almost no contrast", "dark": "very dark", "bright": "washed out",
               "blurry": "far less fine detail than the rest (photos)", "odd_aspect": "sides 3:1 or more apart"}
    for kind, text in meaning.items():
        lines.append(f"| {kind} | {summary[f'issues/{kind}']} | {text} |")
    lines += ["", f"Test images flagged: {summary['flagged_test_images']} (evaluate reports the test accuracy "
              "without them beside the plain one).", "",
              "## What to do", "",
              "`data/audit/proposal.csv` lists every flagged image in the exclude file's format (label issues "
              "relabelled to the suggestion, the rest dropped). Look at the images, copy the rows you agree "
              "with into `data/review/exclude.csv` (git tracks it) and run `dvc repro`: prepare drops or "
              "relabels them and everything downstream retrains. `data/audit/issues.csv` has every flag "
              f"with its score. Training applies nothing on its own (`audit.apply: {params.apply}`).", ""]
    for file, title in shown:
        lines += [f"## {title}", "", f"![{title}](audit/{file})", ""]
    if not shown:
        lines += ["Nothing flagged: no galleries.", ""]
    return "\n".join(lines)


def write(report: Path, issues, images: np.ndarray, rows, summary: dict, params, classes, reads: str) -> None:
    """reports/audit.md and reports/audit/*.png (each gallery only where it has images)."""
    shown = []
    where = {(s, i): n for n, (s, i) in enumerate(zip(rows["split"], rows["index"], strict=True))}  # rows of `images`
    with files.atomic_dir(report / "audit", checksums=False) as out:
        for file, title, short, kinds in GALLERIES:
            picked = issues[issues["kind"].isin(kinds)].drop_duplicates("path").head(params.gallery_images)
            if picked.empty:
                continue
            at = [where[(r.split, r.index)] for r in picked.itertuples()]
            figure = figures.image_grid(images[at], [caption(r) for r in picked.itertuples()], short, columns=8)
            figures.save_png(figure, out / file)
            shown.append((file, title))
    files.write_text(report / "audit.md", markdown(summary, shown, params, classes, reads))
