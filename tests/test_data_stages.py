"""ingest and prepare: the digits become an image folder, a manifest and seeded splits."""

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import data, ingest, prepare
from pipeline.prepare import PrepareParams


def test_ingest_writes_every_digit_as_a_png_with_a_manifest_row(workdir):
    ingest.main(["--out", "raw", "--manifest", "manifest.csv"])
    manifest = pd.read_csv(workdir / "manifest.csv", dtype={"label": str})
    assert list(manifest.columns) == list(data.MANIFEST_COLUMNS)
    assert len(manifest) == 1797
    assert sorted(manifest["label"].unique()) == [str(i) for i in range(10)]
    row = manifest.iloc[0]
    with Image.open(workdir / "raw" / row["path"]) as image:
        pixels = np.asarray(image)
    assert (image.mode, image.size) == ("L", (8, 8))
    assert data.pixel_sha256(pixels) == row["sha256"]
    assert row["path"].startswith(row["label"] + "/")


def test_ingest_twice_gives_identical_bytes(workdir):
    ingest.main(["--out", "a", "--manifest", "a.csv"])
    ingest.main(["--out", "b", "--manifest", "b.csv"])
    assert (workdir / "a.csv").read_bytes() == (workdir / "b.csv").read_bytes()
    first = sorted(p.relative_to(workdir / "a") for p in (workdir / "a").rglob("*.png"))
    assert all((workdir / "a" / p).read_bytes() == (workdir / "b" / p).read_bytes() for p in first)


def test_prepared_splits_are_stratified_disjoint_and_complete(prepared):
    splits = {name: data.load_split(prepared, name) for name in data.SPLITS}
    assert sum(len(s) for s in splits.values()) == 1797
    assert splits["train"].images.shape[1:] == (16, 16, 1)
    hashes = {name: {data.pixel_sha256(img) for img in s.images} for name, s in splits.items()}
    # digits has a few exact duplicate images, so compare counts rather than demand disjoint hashes
    assert len(splits["test"]) == pytest.approx(0.15 * 1797, abs=2)
    for name, split in splits.items():
        shares = np.bincount(split.labels, minlength=10) / len(split)
        assert np.abs(shares - 0.1).max() < 0.02, name  # each digit is ~10% of every split
    assert len(hashes["train"]) > 1000


def test_prepare_is_deterministic_and_the_seed_changes_the_split(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 25)
    a = prepare.split_indices(labels, PrepareParams(seed=0))
    b = prepare.split_indices(labels, PrepareParams(seed=0))
    c = prepare.split_indices(labels, PrepareParams(seed=1))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["test"], c["test"])
    union = np.concatenate(list(a.values()))
    assert sorted(union) == list(range(100))
    del rng


def test_a_class_too_small_to_split_is_named():
    labels = np.array([0] * 20 + [1] * 2)
    with pytest.raises(data.DataError, match="class index 1 has 2 images"):
        prepare.split_indices(labels, PrepareParams())


def test_fractions_that_leave_nothing_to_train_on_are_refused():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="must leave at least 10% to train"):
        PrepareParams(val_fraction=0.5, test_fraction=0.45)


def test_a_missing_split_file_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(data.DataError, match=r"train_images.npy: missing; rerun the prepare stage"):
        data.load_split(tmp_path, "train")


def test_a_manifest_without_its_columns_is_named(tmp_path):
    (tmp_path / "m.csv").write_text("path,label\na.png,0\n")
    with pytest.raises(data.DataError, match=r"m.csv: missing columns \['height', 'mode', 'sha256', 'width'\]"):
        prepare.read_manifest(tmp_path / "m.csv")


def test_data_stages_run_without_importing_torch(workdir, repo_root):
    # importing torch costs seconds; ingest and prepare have no use for it
    code = (
        "import sys, pipeline.ingest, pipeline.prepare; "
        "pipeline.ingest.main(['--out', 'raw', '--manifest', 'm.csv']); "
        "pipeline.prepare.main(['--raw', 'raw', '--manifest', 'm.csv', '--out', 'prep']); "
        "print('heavy imports:', sorted({'torch', 'timm', 'tensorflow'} & set(sys.modules)))"
    )
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    done = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "heavy imports: []" in done.stdout
    assert (workdir / "prep" / "train_images.npy").is_file()


def test_digits_are_read_exactly_as_scikit_learn_loads_them():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = list(ingest.digits_images())
    assert len(images) == len(bunch.target) == 1797
    for index in (0, 1, 1796):
        rel_path, label, image = images[index]
        assert label == str(bunch.target[index])
        expected = np.rint(bunch.images[index] * 255 / 16).astype(np.uint8)
        assert np.array_equal(np.asarray(image), expected)
