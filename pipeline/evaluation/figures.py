"""Figures for evaluate and report, drawn with Matplotlib's Agg backend and saved as PNGs whose
bytes depend only on what they show (no Software or date metadata), so `dvc repro -f` leaves
them identical."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline import files

DPI = 100


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(figure) -> bytes:
    """The figure as PNG, then closed (metadata emptied: Matplotlib writes its version)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    _plt().close(figure)
    return buffer.getvalue()


def save_png(figure, path: Path) -> None:
    files.write_bytes(path, png_bytes(figure))


def reliability_figure(rows: list[dict], title: str, scaled: list[dict] | None = None):
    """Accuracy against confidence per bin (the diagonal is perfect calibration), the bins'
    image counts beneath; `scaled`: the same after temperature scaling."""
    plt = _plt()
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), height_ratios=(3, 1), sharex=True)
    width = rows[0]["upper"] - rows[0]["lower"]
    centres = [r["lower"] + width / 2 for r in rows]
    top.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    top.bar(centres, [r["accuracy"] or 0 for r in rows], width=width * 0.9, alpha=0.6, label="accuracy")
    top.plot(*_points(rows), "o-", color="C1", label="mean confidence vs accuracy")
    if scaled is not None:
        top.plot(*_points(scaled), "s-", color="C2", label="after temperature scaling")
    top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=title)
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centres, [r["count"] for r in rows], width=width * 0.9, color="C0")
    bottom.set(xlabel="confidence (top class)", ylabel="images")
    figure.tight_layout()
    return figure


def _points(rows: list[dict]) -> tuple[list[float], list[float]]:
    filled = [r for r in rows if r["count"]]
    return [r["confidence"] for r in filled], [r["accuracy"] for r in filled]


def image_grid(images: np.ndarray, captions: Sequence[str], title: str, maps: np.ndarray | None = None,
               columns: int = 4):
    """uint8 (N, H, W, C) images in a grid with a caption each; with `maps` ((N, H, W) in
    [0, 1]), each image twice: as it is and with its heat-map over it."""
    plt = _plt()
    per_image = 1 if maps is None else 2
    cells = max(len(images), 1) * per_image
    columns = min(columns * per_image, cells)
    rows = math.ceil(cells / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, image in enumerate(images):
        shown = image[..., 0] if image.shape[-1] == 1 else image
        cmap = "gray" if image.shape[-1] == 1 else None
        ax = axes.flat[i * per_image]
        ax.imshow(shown, cmap=cmap, vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(captions[i], fontsize=7)
        if maps is not None:
            ax = axes.flat[i * per_image + 1]
            ax.imshow(shown, cmap=cmap, vmin=0, vmax=255, interpolation="nearest")
            ax.imshow(maps[i], cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear")
            ax.set_title("Grad-CAM", fontsize=7)
    if not len(images):
        axes.flat[0].text(0.5, 0.5, "none", ha="center", va="center")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


def confusion_figure(matrix: np.ndarray, classes: Sequence[str], title: str, normalised: bool):
    """A confusion matrix (rows: true class), counts or row fractions in each cell."""
    plt = _plt()
    size = max(4.0, 0.45 * len(classes) + 2)
    figure, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1 if normalised else max(int(matrix.max()), 1))
    ticks = range(len(classes))
    ax.set(xticks=ticks, yticks=ticks, xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(classes, rotation=90, fontsize=7)
    ax.set_yticklabels(classes, fontsize=7)
    if len(classes) <= 20:
        for (r, c), value in np.ndenumerate(matrix):
            text = f"{value:.2f}" if normalised else str(int(value))
            ax.text(c, r, text, ha="center", va="center", fontsize=6,
                    color="white" if value > (0.5 if normalised else matrix.max() / 2) else "black")
    figure.tight_layout()
    return figure
