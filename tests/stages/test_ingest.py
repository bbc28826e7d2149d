"""ingest's rules on a user's image folder: layout, bad files, duplicates, classes."""

import faulthandler
import os
import unicodedata

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import ingest
from pipeline.data import formats, images, sources
from pipeline.data.sources import standard

PARAMS = sources.DataParams(source="folder", folder="unused", min_per_class=2, max_bad_fraction=0.5, min_side=8)


def digit(index: int) -> np.ndarray:
    """A real handwritten digit, 8x8 grey, from the bundled set (distinct pixels per index)."""
    pixels, _ = standard.read_array_dataset("digits", None).splits[""]
    return pixels[index]


def write(path, pixels: np.ndarray, **kwargs) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **kwargs)
    return str(path)


def make_folder(root, per_class: int = 4, classes=("cat", "dog"), split: str = "", start: int = 0):
    index = start
    for name in classes:
        for i in range(per_class):
            write(root / split / name / f"{i:02d}.png", digit(index))
            index += 1
    return index


def run(folder, workers: int = 2, **overrides):
    params = sources.DataParams(**{**vars(PARAMS), "folder": str(folder), **overrides})
    source = sources.FolderSource(folder, params.limits)
    manifest, excluded, stats = ingest.ingest(source, params, workers)
    return source, manifest, {e.path: e for e in excluded}, stats


def test_class_folders_become_labels_and_metadata_is_ignored(tmp_path):
    make_folder(tmp_path)
    write(tmp_path / "cat" / "nested" / "deep.jpg", np.dstack([digit(50)] * 3), quality=95)
    (tmp_path / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "cat" / "._00.png").write_bytes(b"\0\5\26\7AppleDouble")
    (tmp_path / ".hidden").mkdir()
    write(tmp_path / ".hidden" / "x.png", digit(60))
    (tmp_path / "dog" / "notes.txt").write_text("taken in the garden")
    write(tmp_path / "stray.png", digit(70))
    (tmp_path / "dog" / "alias").symlink_to(tmp_path / "cat")  # a loop waiting to happen
    source, manifest, excluded, stats = run(tmp_path)
    assert source.classes == ("cat", "dog")
    assert manifest["path"].tolist() == [
        *(f"cat/{i:02d}.png" for i in range(4)), "cat/nested/deep.jpg", *(f"dog/{i:02d}.png" for i in range(4)),
    ]
    assert list(manifest.columns) == list(formats.MANIFEST_COLUMNS)
    deep = manifest.set_index("path").loc["cat/nested/deep.jpg"]
    assert (deep["label"], deep["mode"], deep["file_mode"], deep["width"]) == ("cat", "RGB", "RGB", 8)
    assert {p: e.status for p, e in excluded.items()} == {
        ".hidden": "ignored", "cat/.DS_Store": "ignored", "cat/._00.png": "ignored", "dog/notes.txt": "ignored",
        "dog/alias": "ignored", "stray.png": "rejected",
    }  # .hidden/ is skipped whole
    assert excluded["stray.png"].code == "outside_class_folder"
    assert (stats["images"], stats["rejected"], stats["ignored"], stats["per_class/cat"]) == (9, 1, 5, 5)


def test_bad_files_are_listed_with_reasons_until_too_many(tmp_path):
    make_folder(tmp_path, per_class=6)
    (tmp_path / "cat" / "empty.png").write_bytes(b"")
    (tmp_path / "cat" / "fake.jpg").write_text("<html>not found</html>")
    (tmp_path / "dog" / "link.png").symlink_to(tmp_path / "nowhere.png")
    write(tmp_path / "dog" / "tiny.png", np.zeros((3, 3), np.uint8))
    _, manifest, excluded, stats = run(tmp_path)
    assert len(manifest) == 12
    assert {p: e.code for p, e in excluded.items()} == {
        "cat/empty.png": "empty", "cat/fake.jpg": "undecodable",
        "dog/link.png": "broken_symlink", "dog/tiny.png": "too_small",
    }
    assert stats["rejected"] == 4 and stats["rejected_fraction"] == pytest.approx(4 / 16)
    with pytest.raises(formats.DataError) as info:
        run(tmp_path, max_bad_fraction=0.2)
    message = str(info.value)
    assert "4 of 16 images rejected (25.0%), over data.max_bad_fraction 20.0%" in message
    assert "'broken_symlink': 1" in message and "dog/link.png: broken symbolic link" in message


def test_exact_duplicates_keep_one_and_conflicting_labels_are_rejected(tmp_path):
    make_folder(tmp_path, per_class=4)
    write(tmp_path / "cat" / "copy.bmp", digit(0))  # same pixels as cat/00.png, another format
    write(tmp_path / "dog" / "imposter.png", digit(1))  # same pixels as cat/01.png, another label
    _, manifest, excluded, stats = run(tmp_path)
    assert excluded["cat/copy.bmp"].status == "duplicate" and "cat/00.png" in excluded["cat/copy.bmp"].reason
    assert "cat/00.png" in set(manifest["path"])
    for path in ("cat/01.png", "dog/imposter.png"):
        assert excluded[path].code == "label_conflict" and path not in set(manifest["path"])
    assert manifest["sha256"].is_unique
    assert (stats["duplicates"], stats["rejected_by/label_conflict"]) == (1, 2)


def test_pre_split_folders_are_kept_and_a_leak_between_them_fails(tmp_path):
    end = make_folder(tmp_path, per_class=4, split="train")
    make_folder(tmp_path, per_class=2, split="test", start=end)
    _, manifest, _, _ = run(tmp_path)
    assert manifest.groupby("source_split").size().to_dict() == {"test": 4, "train": 8}
    assert manifest.set_index("path").loc["test/dog/01.png", "source_split"] == "test"
    write(tmp_path / "test" / "cat" / "leak.png", digit(2))  # train/cat/02.png again
    with pytest.raises(
        formats.DataError, match=r"the same image is in two splits: test/cat/leak.png and train/cat/02.png",
    ):
        run(tmp_path)


def test_standard_datasets_keep_their_official_test_copy_of_a_duplicate():
    pixels = np.stack([digit(i) for i in range(6)])
    train = (pixels, np.array([0, 1, 0, 1, 0, 1]))
    test = (pixels[[0]], np.array([0]))  # train/0 leaked into the test set
    dataset = standard.ArrayDataset("mnist", ("0", "1"), {"train": train, "test": test}, {})
    source = sources.ArraySource(dataset, PARAMS.limits)
    manifest, excluded, stats = ingest.ingest(source, PARAMS, 2)
    assert "train/0" not in set(manifest["path"]) and "test/0" in set(manifest["path"])
    assert [(e.path, e.status) for e in excluded] == [("train/0", "duplicate")]


def test_layout_and_class_folder_problems_are_named(tmp_path):
    with pytest.raises(formats.DataError, match="no such folder"):
        run(tmp_path / "missing")
    make_folder(tmp_path / "mixed", split="train")
    make_folder(tmp_path / "mixed", classes=("bird",))
    with pytest.raises(formats.DataError, match=r"split folders \['train'\] beside \['bird'\]"):
        run(tmp_path / "mixed")
    make_folder(tmp_path / "one", classes=("cat",))
    with pytest.raises(formats.DataError, match=r"only one class folder \(cat\)"):
        run(tmp_path / "one")
    make_folder(tmp_path / "empty")
    (tmp_path / "empty" / "fish" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "fish" / ".DS_Store").write_bytes(b"x")
    with pytest.raises(formats.DataError, match=r"empty class folders \(no image files\): .*empty/fish"):
        run(tmp_path / "empty")
    make_folder(tmp_path / "case", classes=("Cat", "cat"))
    with pytest.raises(formats.DataError, match=r"differ only by case .*case/Cat vs .*case/cat"):
        run(tmp_path / "case")
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    make_folder(tmp_path / "unicode", classes=(nfc, nfd))
    with pytest.raises(formats.DataError, match="Unicode normalisation"):
        run(tmp_path / "unicode")


def test_classes_under_min_per_class_are_named_with_their_counts(tmp_path):
    make_folder(tmp_path, per_class=3)
    (tmp_path / "dog" / "00.png").write_bytes(b"broken")
    with pytest.raises(formats.DataError, match=r"fewer than data.min_per_class=3 usable images: .*dog: 2"):
        run(tmp_path, min_per_class=3)


def test_a_class_missing_from_train_is_named(tmp_path):
    make_folder(tmp_path, per_class=3, classes=("cat", "dog"), split="train")
    make_folder(tmp_path, per_class=3, classes=("bird",), split="test", start=10)
    with pytest.raises(formats.DataError, match=r"no usable image in the train split: .*test/bird"):
        run(tmp_path)


def test_a_decoder_that_kills_its_process_costs_only_that_file(tmp_path, monkeypatch):
    make_folder(tmp_path, per_class=5)
    write(tmp_path / "dog" / "crash.png", digit(40))
    real = images.decode_file

    def fragile(path, limits):
        if os.path.basename(path) == "crash.png":
            faulthandler.disable()  # keep pytest's crash dump of the dying worker out of the log
            os.abort()  # as a native decoder does on a malformed file
        return real(path, limits)

    monkeypatch.setattr(images, "decode_file", fragile)  # forked workers inherit the patch
    _, manifest, excluded, _ = run(tmp_path)
    assert excluded["dog/crash.png"].code == "crashed_decoder"
    assert len(manifest) == 10


def test_the_result_does_not_depend_on_the_number_of_workers(tmp_path):
    make_folder(tmp_path, per_class=30, classes=("a", "b", "c"))
    one = run(tmp_path, workers=1)
    two = run(tmp_path, workers=2)
    pd.testing.assert_frame_equal(one[1], two[1])
    assert one[2] == two[2] and one[3] == two[3]
