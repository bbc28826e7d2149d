"""ingest and prepare as stages: manifests, seeded content-based splits, reports, bytes."""

import json
import os
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from support import digit_folder

from pipeline import ingest, prepare
from pipeline.config import ConfigError
from pipeline.data import duplicates, formats, images, sources, writer
from pipeline.data.sources import standard
from pipeline.prepare import PrepareParams

FOLDER_PARAMS = """\
data: {source: folder, folder: images, min_per_class: 5, max_bad_fraction: 0.1}
prepare: {seed: 0, image_size: 16, resize: pad, near_duplicate_distance: 4}
"""


def test_ingest_records_every_digit_in_the_manifest_and_classes(workdir):
    ingest.main(["--out", "ingested", "--live", "live"])
    manifest = formats.read_manifest(workdir / "ingested" / "manifest.csv")
    assert list(manifest.columns) == list(formats.MANIFEST_COLUMNS)
    assert len(manifest) == 1797 and set(manifest["mode"]) == {"L"}
    assert json.loads((workdir / "ingested" / "classes.json").read_text()) == [str(i) for i in range(10)]
    pixels, labels = standard.read_array_dataset("digits", None).splits[""]
    row = manifest.iloc[5]
    assert row["sha256"] == formats.pixel_sha256(pixels[5]) and row["label"] == str(labels[5])
    metrics = json.loads((workdir / "live" / "metrics.json").read_text())
    details = json.loads((workdir / "live" / "details.json").read_text())
    assert metrics["images"] == 1797 and metrics["rejected"] == 0 and sum(details["per_class"].values()) == 1797
    assert "per_class" not in metrics and set(details) == {"per_class", "rejected_by"}  # readable metrics columns
    dataset = json.loads((workdir / "ingested" / "dataset.json").read_text())
    assert dataset["source"] == "digits" and dataset["sha256"] == ingest.dataset_hash(manifest)


def test_prepared_splits_are_stratified_complete_and_recorded_in_the_manifest(prepared):
    splits = {name: formats.load_split(prepared, name) for name in formats.SPLITS}
    assert sum(len(s) for s in splits.values()) == 1797
    assert splits["train"].images.shape[1:] == (16, 16, 1)
    for name, split in splits.items():
        shares = np.bincount(split.labels, minlength=10) / len(split)
        assert np.abs(shares - 0.1).max() < 0.02, name  # each digit is ~10% of every split
    manifest = formats.read_manifest(prepared / "manifest.csv", (*formats.MANIFEST_COLUMNS, "split", "index"))
    assert manifest.groupby("split").size().to_dict() == {name: len(s) for name, s in splits.items()}
    assert manifest["sha256"].is_unique  # one split per image: no image in two splits
    # the manifest's (split, index) is the row holding that image
    pixels, _ = standard.read_array_dataset("digits", None).splits[""]
    for row in manifest.sample(20, random_state=0).itertuples():
        expected = images.fit_square(pixels[int(row.path)], 16, 1)
        assert np.array_equal(splits[row.split].images[row.index], expected), row.path
        assert splits[row.split].classes[splits[row.split].labels[row.index]] == row.label


def manifest_of(n_per_class: int, classes=("a", "b", "c"), start: int = 0) -> pd.DataFrame:
    rows = [
        (f"{c}/{i:04d}", c, "", f"{hash((c, i)) & (2**64 - 1):064x}")
        for c in classes
        for i in range(start, start + n_per_class)
    ]
    frame = pd.DataFrame(rows, columns=["path", "label", "source_split", "sha256"])
    return frame


def test_splits_are_seeded_stratified_and_follow_content_not_order():
    manifest = manifest_of(100)
    a = prepare.assign_splits(manifest, PrepareParams(seed=0))
    assert (a == prepare.assign_splits(manifest, PrepareParams(seed=0))).all()
    assert (a != prepare.assign_splits(manifest, PrepareParams(seed=1))).any()
    counts = pd.crosstab(manifest["label"], a)
    assert (counts["test"] == 15).all() and (counts["val"] == 15).all() and (counts["train"] == 70).all()
    shuffled = manifest.sample(frac=1, random_state=3)
    b = pd.Series(prepare.assign_splits(shuffled, PrepareParams(seed=0)), index=shuffled["path"])
    assert (b[manifest["path"]].to_numpy() == a).all()  # same image, same split, whatever the order
    # 10% more images: only images at the split boundaries move
    grown = pd.concat([manifest, manifest_of(10, start=100)], ignore_index=True)
    c = prepare.assign_splits(grown, PrepareParams(seed=0))[: len(manifest)]
    assert (c == a).mean() > 0.9


def test_fixed_splits_are_kept_and_missing_ones_carved_from_train():
    manifest = manifest_of(40)
    manifest.loc[manifest.index % 4 == 0, "source_split"] = "test"
    manifest.loc[manifest["source_split"] == "", "source_split"] = "train"
    splits = prepare.assign_splits(manifest, PrepareParams(seed=0, val_fraction=0.1))
    assert (splits[manifest["source_split"] == "test"] == "test").all()
    assert pd.crosstab(manifest["label"], splits)["val"].tolist() == [4, 4, 4]


def test_a_class_too_small_to_split_is_named():
    manifest = pd.concat([manifest_of(20, ("a",)), manifest_of(2, ("b",))], ignore_index=True)
    with pytest.raises(formats.DataError, match=r"class 'b' has 2 train images, too few"):
        prepare.assign_splits(manifest, PrepareParams())


def test_fractions_that_leave_nothing_to_train_on_are_refused():
    with pytest.raises(ConfigError, match="must leave at least 10% to train"):
        PrepareParams(val_fraction=0.5, test_fraction=0.45)


def test_a_missing_split_file_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(formats.DataError, match=r"train_images.npy: missing; rerun the prepare stage"):
        formats.load_split(tmp_path, "train")


def test_a_manifest_without_its_columns_is_named(tmp_path):
    (tmp_path / "m.csv").write_text("path,label\na.png,0\n")
    expected = r"m.csv: missing columns \['colourfulness', 'file_mode', 'height', .*rerun the ingest stage"
    with pytest.raises(formats.DataError, match=expected):
        formats.read_manifest(tmp_path / "m.csv")


def test_a_folder_dataset_runs_through_both_stages_the_same_way_twice(workdir, mlflow_store):
    (workdir / "params.yaml").write_text(FOLDER_PARAMS)
    digit_folder(workdir / "images")
    (workdir / "images" / "digit0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    for out in ("a", "b"):
        ingest.main(["--out", f"{out}/ingested", "--live", f"{out}/live/ingest"])
        prepare.main(["--ingested", f"{out}/ingested", "--out", f"{out}/prepared", "--live", f"{out}/live/prepare"])
    for rel in ("ingested/manifest.csv", "ingested/excluded.csv", "prepared/manifest.csv", "prepared/train_images.npy",
                "prepared/test_labels.npy", "prepared/near_duplicates.csv", "live/prepare/metrics.json",
                "live/prepare/details.json"):
        assert (workdir / "a" / rel).read_bytes() == (workdir / "b" / rel).read_bytes(), rel
    train = formats.load_split(workdir / "a" / "prepared", "train")
    assert train.classes == ("digit0", "digit1", "digit2", "digit3")
    assert train.images.shape[1:] == (16, 16, 1)  # the JPEGs are RGB files of grey digits: grey by content
    excluded = pd.read_csv(workdir / "a" / "ingested" / "excluded.csv")
    assert excluded[["path", "code"]].values.tolist() == [["digit0/broken.png", "undecodable"]]
    metrics = json.loads((workdir / "a" / "live" / "prepare" / "metrics.json").read_text())
    assert sum(metrics[s]["images"] for s in formats.SPLITS) == 48
    assert set(metrics["near_duplicates"]) >= {"test_in_train", "val_in_train", "test_in_val"}
    details = json.loads((workdir / "a" / "live" / "prepare" / "details.json").read_text())
    assert metrics["colour"] == {"channels": 1}
    assert details["colour"] == {"colour_images": 0, "grey_images_in_rgb_files": 12}
    assert sum(details["train"]["per_class"].values()) == metrics["train"]["images"]
    # the same statistics and the dataset's identity reach MLflow
    client = mlflow.MlflowClient(mlflow_store)
    experiment_id = client.get_experiment_by_name("cnn-pipeline").experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([experiment_id])}
    assert runs["ingest"].data.metrics["rejected"] == 1 and runs["ingest"].data.metrics["per_class/digit2"] == 12
    assert runs["prepare"].data.metrics["test/images"] == metrics["test"]["images"]
    dataset = json.loads((workdir / "a" / "ingested" / "dataset.json").read_text())
    assert runs["prepare"].data.tags["dataset_sha256"] == dataset["sha256"] and dataset["source"] == "folder"


def test_one_colourful_image_makes_the_dataset_rgb_and_is_named(workdir):
    (workdir / "params.yaml").write_text(FOLDER_PARAMS)
    digit_folder(workdir / "images")
    red = np.zeros((16, 24, 3), np.uint8)
    red[..., 0] = 200
    red[4:12, 8:16] = 255  # a white square on red
    Image.fromarray(red).save(workdir / "images" / "digit1" / "red.png")
    ingest.main(["--out", "ingested", "--live", "live/ingest"])
    prepare.main(["--ingested", "ingested", "--out", "prepared", "--live", "live/prepare"])
    assert formats.load_split(workdir / "prepared", "train").images.shape[1:] == (16, 16, 3)
    colour = json.loads((workdir / "prepared" / "dataset.json").read_text())["preprocessing"]["colour"]
    assert colour["colour_images"] == 1 and colour["most_colourful"][0]["path"] == "digit1/red.png"
    metrics = json.loads((workdir / "live" / "prepare" / "metrics.json").read_text())
    details = json.loads((workdir / "live" / "prepare" / "details.json").read_text())
    assert metrics["colour"]["channels"] == 3 and details["colour"]["grey_images_in_rgb_files"] == 12


def planted(size: int = 48) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Distinct photos in train; in val and test, edited copies of two of them and one more
    distinct photo; stored at `size` as prepare stores them."""
    import io

    import skimage.data
    from PIL import ImageEnhance

    def jpeg(image):
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=40)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")

    photo = {n: Image.fromarray(getattr(skimage.data, n)()).convert("RGB") for n in
             ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins")}
    rows = [("train", name, photo[name]) for name in ("astronaut", "chelsea", "coffee", "rocket")]
    rows += [
        ("val", "chelsea-half", photo["chelsea"].resize((225, 150))),
        ("val", "camera", photo["camera"]),
        ("test", "chelsea-jpeg", jpeg(photo["chelsea"])),
        ("test", "coffee-brighter", ImageEnhance.Brightness(photo["coffee"]).enhance(1.15)),
        ("test", "coins", photo["coins"]),
    ]
    arrays: dict[str, list] = {"train": [], "val": [], "test": []}
    records = []
    for split, path, image in rows:
        phash = images.phash(np.asarray(image))
        records.append({"split": split, "path": path, "index": len(arrays[split]), "phash": phash})
        arrays[split].append(images.fit_square(np.asarray(image), size, 3, "stretch"))
    return pd.DataFrame(records), {k: np.stack(v) for k, v in arrays.items()}


def test_resized_re_encoded_and_brightened_copies_are_near_duplicates_and_distinct_photos_are_not():
    frame, stored = planted()
    near, checked = duplicates.find(frame, stored.__getitem__, max_distance=4, min_correlation=0.98)
    found = near[["split", "path", "nearest_split", "nearest_path"]].values.tolist()
    assert found == [
        ["val", "chelsea-half", "train", "chelsea"],
        ["test", "chelsea-jpeg", "train", "chelsea"],
        ["test", "coffee-brighter", "train", "coffee"],
        ["test", "chelsea-jpeg", "val", "chelsea-half"],  # a copy of a copy leaks too
    ]
    assert (near["correlation"] > 0.99).all() and checked >= 3
    frame = frame.assign(label="a", mode="RGB", colourfulness=40.0)
    storage = prepare.decide_storage(frame, PrepareParams(image_size=48, colour_threshold=10.0))
    stats = prepare.statistics(frame, ("a",), near, checked, storage)
    assert stats["near_duplicates/test_in_train"] == 2
    assert stats["near_duplicates/test_in_train_fraction"] == round(2 / 3, 6)
    assert stats["near_duplicates/val_in_train"] == stats["near_duplicates/test_in_val"] == 1
    assert stats["near_duplicates/phash_candidates"] == checked


def test_similar_but_distinct_digits_are_not_reported_as_near_duplicates():
    """pHash alone flags 6.5% of held-out digits (32% of real MNIST: bench/duplicates.py); the
    pixel check keeps false alarms well under 1%."""
    pixels, labels = standard.read_array_dataset("digits", None).splits[""]
    frame = pd.DataFrame({
        "path": [f"{i:04d}" for i in range(len(pixels))], "label": labels.astype(str), "source_split": "",
        "sha256": [formats.pixel_sha256(p) for p in pixels], "phash": [images.phash(p) for p in pixels],
    })
    prepared = prepare.prepare_manifest(frame, PrepareParams())
    stored = {s: pixels[prepared.loc[prepared.split == s].sort_values("index").index] for s in formats.SPLITS}
    held_out = (prepared.split != "train").sum()
    candidates, _ = duplicates.find(prepared, stored.__getitem__, max_distance=4, min_correlation=-1.0)
    near, _ = duplicates.find(prepared, stored.__getitem__, max_distance=4, min_correlation=0.98)
    assert len(candidates) / held_out > 0.05  # what pHash alone reported
    assert len(near) / held_out < 0.01


def test_prepare_refuses_images_that_changed_since_ingest(workdir):
    (workdir / "params.yaml").write_text(FOLDER_PARAMS)
    digit_folder(workdir / "images", per_class=6)
    ingest.main(["--out", "ingested", "--live", "live/ingest"])
    Image.fromarray(np.zeros((16, 24), np.uint8)).save(workdir / "images" / "digit1" / "004.png")
    with pytest.raises(formats.DataError, match=r"digit1/004.png: pixels differ from the ingest manifest"):
        prepare.main(["--ingested", "ingested", "--out", "prepared", "--live", "live/prepare"])
    assert not (workdir / "prepared").exists()  # nothing half-written


def test_prepared_arrays_do_not_depend_on_the_number_of_workers(tmp_path):
    params, prep = sources.DataParams(), PrepareParams(image_size=12, resize="crop")
    source = sources.open_source(params)
    for workers in (1, 2):
        manifest, _, _ = ingest.ingest(source, params, workers)
        prepared = prepare.prepare_manifest(manifest, prep)
        (tmp_path / str(workers)).mkdir()
        storage = prepare.decide_storage(prepared, prep)
        writer.write_splits(tmp_path / str(workers), prepared, source.classes, source, storage.size, storage.channels,
                            prep.resize, workers)
    for name in ("train_images.npy", "val_images.npy", "test_images.npy", "test_labels.npy"):
        assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "2" / name).read_bytes(), name


@pytest.mark.slow  # both stages in a subprocess
def test_data_stages_run_without_importing_torch(workdir, repo_root):
    # importing torch costs seconds; ingest and prepare have no use for it
    code = (
        "import sys, pipeline.ingest, pipeline.prepare; "
        "pipeline.ingest.main(['--out', 'ing', '--live', 'l1']); "
        "pipeline.prepare.main(['--ingested', 'ing', '--out', 'prep', '--live', 'l2']); "
        "print('heavy imports:', sorted({'torch', 'torchvision', 'timm', 'tensorflow', 'sklearn'} & set(sys.modules)))"
    )
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    done = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "heavy imports: []" in done.stdout
    assert (workdir / "prep" / "train_images.npy").is_file()


def test_auto_stores_small_images_at_their_own_size_and_photos_at_most_256_px():
    def frame(sizes):
        return pd.DataFrame({"width": [w for w, _ in sizes], "height": [h for _, h in sizes]})

    assert prepare.stored_size(frame([(8, 8)] * 5), "auto") == 8  # the digits
    assert prepare.stored_size(frame([(28, 28)] * 5), "auto") == 28
    assert prepare.stored_size(frame([(180, 180), (500, 375), (640, 480), (120, 90), (4000, 3000)]), "auto") == 256
    assert prepare.stored_size(frame([(180, 180), (200, 150), (120, 90)]), "auto") == 150  # the median shorter side
    assert prepare.stored_size(frame([(4000, 3000)]), 96) == 96  # a number wins
    with pytest.raises(ConfigError, match="image_size: must be 'auto' or in 8..1024"):
        PrepareParams(image_size=4)
