"""Calibration, the samples to show, Grad-CAM and the figures, against hand-computed values
and a planted patch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import evaluate
from pipeline.evaluation import calibration, figures, samples
from pipeline.frameworks.torch import explain
from pipeline.frameworks.torch.model import ScratchCNN

# four predictions over two classes: confident right, confident wrong, two less confident right
PROBA = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.2, 0.8]])
LABELS = np.array([0, 1, 1, 1])


def test_ece_is_the_count_weighted_gap_between_accuracy_and_confidence():
    # bins (of 15): 0.9 holds two (accuracy 0.5, gap 0.4), 0.6 one (gap 0.4), 0.8 one (gap 0.2)
    assert calibration.ece(PROBA, LABELS) == pytest.approx((2 * 0.4 + 0.4 + 0.2) / 4)
    assert calibration.ece(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 1])) == 0.0


def test_reliability_bins_hold_every_image_once_and_leave_empty_bins_empty():
    rows = calibration.reliability(PROBA, LABELS)
    assert len(rows) == 15 and sum(r["count"] for r in rows) == 4
    (top,) = [r for r in rows if r["lower"] < 0.9 <= r["upper"]]
    assert (top["count"], top["confidence"], top["accuracy"]) == (2, 0.9, 0.5)
    assert all(r["confidence"] is None and r["accuracy"] is None for r in rows if r["count"] == 0)


def test_temperature_scaling_finds_the_hand_computed_temperature():
    # one prediction, 0.9 / 0.1, right 3 times in 4: the NLL is lowest where sigmoid(z / T) = 0.75,
    # T = logit(0.9) / logit(0.75) = 2
    proba, labels = np.tile([[0.9, 0.1]], (4, 1)), np.array([0, 0, 0, 1])
    t = calibration.fit_temperature(proba, labels)
    assert t == pytest.approx(2.0, abs=1e-4)
    scaled = calibration.scale(proba, t)
    assert scaled[0] == pytest.approx([0.75, 0.25], abs=1e-4)
    assert calibration.ece(proba, labels) == pytest.approx(0.15) and calibration.ece(scaled, labels) < 1e-4
    before, after = calibration.log_loss(proba, labels), calibration.log_loss(scaled, labels)
    assert before == pytest.approx(-(3 * np.log(0.9) + np.log(0.1)) / 4)
    assert after == pytest.approx(-(3 * np.log(0.75) + np.log(0.25)) / 4, abs=1e-6) and after < before


def test_scaling_never_changes_the_predicted_class():
    proba = np.random.default_rng(0).dirichlet(np.ones(5), 50)
    for t in (0.3, 1.0, 4.0):
        assert (calibration.scale(proba, t).argmax(1) == proba.argmax(1)).all()


def test_metrics_add_top_k_balanced_accuracy_and_roc_auc():
    labels = np.array([0, 0, 0, 1, 2, 2])
    proba = np.array([[.7, .2, .1], [.6, .3, .1], [.2, .7, .1], [.3, .6, .1], [.1, .2, .7], [.5, .4, .1]])
    summary, _ = evaluate.classification_metrics(labels, proba, ("a", "b", "c"))
    assert summary["test/top_k"] == 2  # min(5, classes - 1)
    assert summary["test/top_k_acc"] == pytest.approx(5 / 6)  # only the last image misses its top two
    assert summary["test/balanced_acc"] == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)
    assert 0.5 < summary["test/roc_auc_macro"] <= 1.0
    without_c, _ = evaluate.classification_metrics(labels[:4], proba[:4], ("a", "b", "c"))
    assert "test/roc_auc_macro" not in without_c  # undefined with a class that has no test image


def test_confusion_rows_normalise_to_recall():
    matrices = evaluate.confusion(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), ("a", "b", "c"))
    assert matrices["counts"] == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
    assert matrices["normalised"] == [[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]


def test_the_gallery_picks_the_most_confident_errors_first():
    proba = np.array([[0.6, 0.4], [0.1, 0.9], [0.95, 0.05], [0.3, 0.7], [0.8, 0.2]])
    labels = np.array([1, 0, 1, 1, 1])  # wrong: 0 (0.6), 1 (0.9), 2 (0.95), 4 (0.8)
    assert samples.confident_errors(proba, labels, 3).tolist() == [2, 1, 4]
    assert samples.confident_errors(proba, labels, 10).tolist() == [2, 1, 4, 0]


def test_the_explained_sample_is_half_wrong_seeded_and_fills_up_with_right_ones():
    labels = np.zeros(40, int)
    predicted = np.zeros(40, int)
    predicted[[3, 9, 17, 25, 31]] = 1  # five wrong
    chosen = samples.explain_sample(labels, predicted, 8, seed=0)
    assert len(chosen) == 8 and (labels[chosen] != predicted[chosen]).sum() == 4
    assert chosen.tolist() == samples.explain_sample(labels, predicted, 8, seed=0).tolist()
    assert chosen.tolist() != samples.explain_sample(labels, predicted, 8, seed=1).tolist()
    few = samples.explain_sample(labels, predicted, 16, seed=0)
    assert len(few) == 16 and (labels[few] != predicted[few]).sum() == 5  # every wrong one, right ones fill


def planted(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """16 x 16 grey noise; class 1 holds a bright 4 x 4 patch at a random place, class 0 none.
    Returns uint8 images (N, 16, 16, 1), labels and each image's patch mask."""
    images = rng.integers(0, 90, (n, 16, 16, 1)).astype(np.uint8)
    labels = rng.integers(0, 2, n)
    masks = np.zeros((n, 16, 16), bool)
    for i in np.flatnonzero(labels):
        r, c = rng.integers(0, 13, 2)
        images[i, r:r + 4, c:c + 4] = 255
        masks[i, r:r + 4, c:c + 4] = True
    return images, labels, masks


def test_grad_cam_puts_its_mass_on_a_planted_patch():
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    images, labels, masks = planted(512, rng)
    model = ScratchCNN(num_classes=2, in_channels=1, image_size=16, width=8, dropout=0.0, hidden=16)
    x, y = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(labels)
    optimiser = torch.optim.Adam(model.parameters(), 3e-3)
    model.train()
    for _ in range(6):
        for start in range(0, 512, 32):
            loss = torch.nn.functional.cross_entropy(model(x[start:start + 32]), y[start:start + 32])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    test, test_labels, test_masks = planted(64, rng)
    with torch.no_grad():
        accuracy = (model.eval()(torch.from_numpy(test).permute(0, 3, 1, 2).float() / 255).argmax(1).numpy()
                    == test_labels).mean()
    assert accuracy > 0.9
    ones = np.flatnonzero(test_labels)
    maps = explain.grad_cam(model, test[ones], np.ones(len(ones), int))
    inside = (maps * test_masks[ones]).sum() / maps.sum()
    chance = test_masks[ones].mean()  # the patch's share of the image: 16 / 256
    # The scratch CNN's last feature map is 4 x 4, each cell seeing the whole 16 px image, so the
    # map is coarse: 1.68 times the patch's share of the mass here (docs/benchmarks.md).
    assert inside > 1.5 * chance, f"{inside:.3f} of the heat-map mass in the patch, chance {chance:.3f}"
    assert (maps == explain.grad_cam(model, test[ones], np.ones(len(ones), int))).all()  # the same every run


def test_figures_are_byte_identical_and_carry_no_version_stamp():
    rows = calibration.reliability(PROBA, LABELS)
    first = figures.png_bytes(figures.reliability_figure(rows, "t", rows))
    second = figures.png_bytes(figures.reliability_figure(rows, "t", rows))
    assert first == second and first.startswith(b"\x89PNG") and b"Matplotlib" not in first
    images = np.random.default_rng(0).integers(0, 255, (3, 8, 8, 3), dtype=np.uint8)
    grid = figures.png_bytes(figures.image_grid(images, ["a", "b", "c"], "g", np.zeros((3, 8, 8), np.float32)))
    assert grid == figures.png_bytes(figures.image_grid(images, ["a", "b", "c"], "g", np.zeros((3, 8, 8))))
