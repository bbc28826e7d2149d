"""The audit's findings on small synthetic data: poor images, outliers, what training applies."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.audit import applied, proposal
from pipeline.data import formats, review
from pipeline.evaluation import audit


def test_poor_images_are_named_by_kind_and_ordinary_ones_are_not():
    rng = np.random.default_rng(0)
    images = rng.integers(40, 200, (8, 64, 64, 3)).astype(np.uint8)  # textured, mid-grey
    images[1] = 128  # blank
    images[2] = rng.integers(0, 30, (64, 64, 3))  # dark
    images[3] = rng.integers(230, 256, (64, 64, 3))  # washed out
    widths = np.array([64, 64, 64, 64, 640, 64, 64, 64.0])
    heights = np.array([64, 64, 64, 64, 100, 64, 64, 64.0])  # image 4's file was 6.4:1
    found = audit.poor_images(images, widths, heights)
    flagged = {kind: set(np.flatnonzero(f)) for kind, (f, _) in found.items()}
    assert flagged["blank"] == {1} and flagged["dark"] == {2} and flagged["bright"] == {3}
    assert flagged["odd_aspect"] == {4}


def test_an_image_far_from_every_class_is_an_outlier_and_members_are_not():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 32))
    labels = np.repeat(np.arange(3), 40)
    features = centres[labels] + 0.3 * rng.normal(size=(120, 32))
    features[7] = rng.normal(size=32) * 5  # from nowhere near any class
    flagged, distance = audit.outliers(features, labels, 3, fence=3.0)
    assert set(np.flatnonzero(flagged)) == {7} and distance.argmax() == 7


def test_label_issues_flag_flipped_labels_with_their_true_class():
    labels = np.repeat(np.arange(3), 100)
    probs = np.full((300, 3), 0.05)
    probs[np.arange(300), labels] = 0.9
    flipped = labels.copy()
    flipped[[5, 150, 250]] = [1, 2, 0]
    found = audit.label_issues(flipped, probs, "prune_by_class")
    assert set(np.flatnonzero(found.flagged)) == {5, 150, 250}
    assert found.suggested[[5, 150, 250]].tolist() == [0, 1, 2]


def issues_frame() -> pd.DataFrame:
    return pd.DataFrame({
        "path": ["a.png", "b.png", "c.png", "c.png"], "split": ["train", "val", "test", "test"],
        "index": [3, 0, 1, 1], "kind": ["label_issue", "outlier", "label_issue", "blank"],
        "score": [0.01, 0.9, 0.02, 0.0], "given_label": ["cat", "dog", "dog", "dog"],
        "suggested_label": ["dog", "", "cat", ""]})


def test_training_applies_flags_to_train_and_val_only_and_only_when_asked(tmp_path):
    issues, classes = issues_frame(), ["cat", "dog"]
    assert applied(issues, "none", classes).empty
    drop = applied(issues, "drop", classes)
    assert drop[["path", "action"]].values.tolist() == [["a.png", "drop"], ["b.png", "drop"]]  # test untouched
    relabel = applied(issues, "relabel", classes)
    assert relabel[["path", "action", "label"]].values.tolist() == [["a.png", "relabel", "1"]]
    # a split as training loads it: image 3 of train takes label 1, or is gone
    split = formats.Split(np.arange(5 * 4, dtype=np.uint8).reshape(5, 2, 2, 1), np.zeros(5, np.int64), ("cat", "dog"))
    for how, expected_labels, expected_len in (("relabel", [0, 0, 0, 1, 0], 5), ("drop", [0, 0, 0, 0], 4)):
        formats.write_table(tmp_path / f"{how}.csv", applied(issues, how, classes))
        changed = review.apply_to_split(split, "train", tmp_path / f"{how}.csv")
        assert changed.labels.tolist() == expected_labels and len(changed) == expected_len
    assert review.apply_to_split(split, "train", None) is split


def test_the_proposal_relabels_label_issues_and_drops_the_rest_once_per_image(tmp_path):
    rows = proposal(issues_frame())
    assert [(p, a, label) for p, a, label, _ in rows] == [
        ("a.png", "relabel", "dog"), ("b.png", "drop", ""), ("c.png", "relabel", "cat")]
    review.write_changes(tmp_path / "proposal.csv", rows)
    changes = review.read_changes(tmp_path / "proposal.csv", ["a.png", "b.png", "c.png"], ["cat", "dog"])
    assert [(c.path, c.action, c.label) for c in changes] == [(p, a, label) for p, a, label, _ in rows]
