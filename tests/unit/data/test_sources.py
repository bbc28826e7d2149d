"""pipeline.data.sources.standard reads small files written here in the official formats: IDX (MNIST and
friends) and CIFAR-10's Python 2 pickles. No network: downloads are replaced."""

from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.util
import io
import os
import pickle
import shlex
import socket
import struct
import subprocess
import sys
import types
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.formats import DataError
from pipeline.data.sources import standard
from pipeline.frameworks.torch import download

IDX_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "kmnist": "KMNIST"}
SIZES = {"train": 12, "test": 5}


# --- writers for the official formats ---------------------------------------------------------


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """IDX: magic 0x000008<ndim> (unsigned bytes), big-endian uint32 sizes, then the data."""
    magic = 0x0800 | array.ndim if magic is None else magic
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def write_idx_dataset(root: Path, name: str, gz: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The four IDX files of a tiny `name` (12 train, 5 test 28x28 images) under torchvision's layout."""
    rng = np.random.default_rng(0)
    raw = root / IDX_FOLDERS[name] / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    expected = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = rng.integers(0, 256, (SIZES[split], 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, SIZES[split], dtype=np.uint8)
        for kind, array in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            payload = idx_bytes(array)
            path = raw / f"{prefix}-{kind}"
            if gz:
                path.with_name(path.name + ".gz").write_bytes(gzip.compress(payload, mtime=0))
            else:
                path.write_bytes(payload)
        expected[split] = (images, labels.astype(np.int64))
    return expected


class Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for CIFAR-10: protocol 2 with every string a byte
    string (SHORT_BINSTRING / BINSTRING, read back as bytes with encoding="bytes"). Python 3's
    own protocol 2 would instead reference _codecs.encode, which the real files never do."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_string(self, obj: bytes | str) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_string
    dispatch[str] = save_py2_string


def py2_pickle(obj: object, numpy_module: str = "numpy.core.multiarray") -> bytes:
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    data = buffer.getvalue()
    # numpy 1 (which wrote the official files) kept _reconstruct in numpy.core.multiarray.
    new = b"cnumpy._core.multiarray\n_reconstruct\n"
    assert new in data or b"_reconstruct" not in data
    return data.replace(new, f"c{numpy_module}\n_reconstruct\n".encode())


CIFAR_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


def write_cifar10(root: Path, meta: bool = True, numpy_module: str = "numpy.core.multiarray") -> dict:
    """data_batch_1..5 (3 images each), test_batch (5) and batches.meta, as the official files."""
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, list] = {"train": [], "test": []}
    batches = [(f"data_batch_{i}", "train", 3) for i in range(1, 6)] + [("test_batch", "test", 5)]
    for filename, split, n in batches:
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)  # HWC, what the reader returns
        labels = [int(v) for v in rng.integers(0, 10, n)]
        rows = images.transpose(0, 3, 1, 2).reshape(n, 3072)  # each row: the R, then G, then B plane
        batch = {b"batch_label": filename.encode(), b"labels": labels, b"data": rows,
                 b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
        (folder / filename).write_bytes(py2_pickle(batch, numpy_module))
        expected[split].append((images, labels))
    if meta:
        (folder / "batches.meta").write_bytes(
            py2_pickle({b"num_cases_per_batch": 3, b"label_names": CIFAR_NAMES, b"num_vis": 3072}))
    return {split: (np.concatenate([i for i, _ in parts]), np.array([v for _, lab in parts for v in lab], np.int64))
            for split, parts in expected.items()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- IDX ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "kmnist"])
def test_idx_files_read_back_exactly_with_the_official_classes(tmp_path, name):
    expected = write_idx_dataset(tmp_path, name)
    dataset = standard.read_array_dataset(name, tmp_path)
    assert dataset.name == name
    assert set(dataset.splits) == {"train", "test"}
    for split, (images, labels) in expected.items():
        got_images, got_labels = dataset.splits[split]
        assert got_images.dtype == np.uint8 and got_images.shape == (SIZES[split], 28, 28)
        assert got_labels.dtype == np.int64
        np.testing.assert_array_equal(got_images, images)
        np.testing.assert_array_equal(got_labels, labels)
    official = {
        "mnist": tuple("0123456789"),
        "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                          "Ankle boot"),
        "kmnist": ("\u304a", "\u304d", "\u3059", "\u3064", "\u306a", "\u306f", "\u307e", "\u3084", "\u308c", "\u3092"),
    }
    assert dataset.classes == official[name]


def test_every_file_read_is_hashed_by_its_path_under_root(tmp_path):
    write_idx_dataset(tmp_path, "mnist")
    dataset = standard.read_array_dataset("mnist", tmp_path)
    assert sorted(dataset.files) == sorted(standard.required_files("mnist"))
    for rel, digest in dataset.files.items():
        assert digest == sha256(tmp_path / rel)


def test_extracted_idx_files_are_accepted(tmp_path):
    expected = write_idx_dataset(tmp_path, "mnist", gz=False)
    dataset = standard.read_array_dataset("mnist", tmp_path)
    np.testing.assert_array_equal(dataset.splits["test"][0], expected["test"][0])
    assert "MNIST/raw/t10k-images-idx3-ubyte" in dataset.files


def rewrite_idx(path: Path, payload: bytes) -> None:
    path.write_bytes(gzip.compress(payload, mtime=0))


@pytest.mark.parametrize(
    ("file", "payload", "message"),
    [
        ("train-images-idx3-ubyte.gz", idx_bytes(np.zeros((12, 28, 28), np.uint8))[:-10], "truncated"),
        (
            "train-images-idx3-ubyte.gz", idx_bytes(np.zeros((12, 28, 28), np.uint8)) + b"\0",
            "9408 bytes should follow it, but 9409",
        ),
        ("train-images-idx3-ubyte.gz", idx_bytes(np.zeros((12, 28, 28), np.uint8))[:10], "shorter than"),
        ("train-images-idx3-ubyte.gz", idx_bytes(np.zeros((12, 28, 28), np.uint8), magic=0x0D03), "0x00000803"),
        ("t10k-labels-idx1-ubyte.gz", idx_bytes(np.zeros(5, np.uint8), magic=0x0803), "0x00000801"),
        ("t10k-labels-idx1-ubyte.gz", idx_bytes(np.zeros(4, np.uint8)), "4 labels"),
        ("t10k-labels-idx1-ubyte.gz", idx_bytes(np.full(5, 10, np.uint8)), "label 10 is outside 0..9"),
    ],
    ids=[
        "truncated", "trailing-bytes", "no-header", "bad-image-magic", "bad-label-magic", "count-mismatch",
        "label-out-of-range",
    ],
)
def test_a_bad_idx_file_is_named_in_the_error(tmp_path, file, payload, message):
    write_idx_dataset(tmp_path, "mnist")
    path = tmp_path / "MNIST" / "raw" / file
    rewrite_idx(path, payload)
    with pytest.raises(DataError, match=message) as error:
        standard.read_array_dataset("mnist", tmp_path)
    assert str(path) in str(error.value)


def test_a_corrupt_gzip_is_named_in_the_error(tmp_path):
    write_idx_dataset(tmp_path, "mnist")
    path = tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(DataError, match="gzip") as error:
        standard.read_array_dataset("mnist", tmp_path)
    assert str(path) in str(error.value)


# --- CIFAR-10 -------------------------------------------------------------------------------


@pytest.mark.parametrize("numpy_module", ["numpy.core.multiarray", "numpy._core.multiarray"])
def test_cifar10_pickles_read_back_as_hwc_images(tmp_path, numpy_module):
    expected = write_cifar10(tmp_path, numpy_module=numpy_module)
    dataset = standard.read_array_dataset("cifar10", tmp_path)
    assert dataset.classes == tuple(n.decode() for n in CIFAR_NAMES)
    for split, (images, labels) in expected.items():
        got_images, got_labels = dataset.splits[split]
        assert got_images.shape == (len(labels), 32, 32, 3) and got_images.dtype == np.uint8
        np.testing.assert_array_equal(got_images, images)
        np.testing.assert_array_equal(got_labels, labels)
        assert got_labels.dtype == np.int64
    folder = tmp_path / "cifar-10-batches-py"
    assert dataset.files == {f"cifar-10-batches-py/{p.name}": sha256(p) for p in folder.iterdir()}


def test_cifar10_without_meta_uses_the_official_class_names(tmp_path):
    write_cifar10(tmp_path, meta=False)
    dataset = standard.read_array_dataset("cifar10", tmp_path)
    assert dataset.classes == tuple(n.decode() for n in CIFAR_NAMES)
    assert "cifar-10-batches-py/batches.meta" not in dataset.files


class RunsCommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_pickle_that_would_run_code_is_refused_and_not_run(tmp_path):
    write_cifar10(tmp_path)
    sentinel = tmp_path / "pwned"
    payload = py2_pickle({b"data": RunsCommand(f"touch {shlex.quote(str(sentinel))}")})
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(payload)
    with pytest.raises(DataError, match=r"refused to unpickle the global \w+\.system") as error:
        standard.read_array_dataset("cifar10", tmp_path)
    assert str(path) in str(error.value)
    assert not sentinel.exists()
    pickle.loads(payload)  # the payload is live: an ordinary unpickler does run the command
    assert sentinel.exists()


def test_a_batch_that_is_not_a_uint8_array_is_named_in_the_error(tmp_path):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(py2_pickle({b"data": np.zeros((5, 3072), np.float32), b"labels": [0] * 5}))
    with pytest.raises(DataError, match=r"uint8 array of shape \(N, 3072\)") as error:
        standard.read_array_dataset("cifar10", tmp_path)
    assert str(path) in str(error.value)


# --- missing files and downloads ------------------------------------------------------------


def test_missing_files_without_download_are_listed_with_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as error:
        standard.read_array_dataset("fashion_mnist", Path("data/external"), fetch=None)
    message = str(error.value)
    for rel in standard.required_files("fashion_mnist"):
        assert str(tmp_path / "data" / "external" / rel) in message
    assert "data.download: true" in message


def test_a_failed_download_gives_one_error_with_the_reason(tmp_path, monkeypatch):
    def no_network(name, root):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    with pytest.raises(DataError) as error:
        standard.read_array_dataset("cifar10", tmp_path, fetch=no_network)
    message = str(error.value)
    assert "Temporary failure in name resolution" in message
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in message
    assert "data.download: true" in message


def test_downloaded_files_are_read(tmp_path, monkeypatch):
    calls = []

    def fake_download(name, root):
        calls.append((name, root))
        write_idx_dataset(root, name)

    dataset = standard.read_array_dataset("kmnist", tmp_path, fetch=fake_download)
    assert calls == [("kmnist", tmp_path)]
    assert len(dataset.splits["train"][1]) == SIZES["train"]


def test_present_files_are_not_downloaded_again(tmp_path, monkeypatch):
    write_idx_dataset(tmp_path, "mnist")
    never = lambda name, root: pytest.fail("fetch must not be called")  # noqa: E731
    assert len(standard.read_array_dataset("mnist", tmp_path, fetch=never).splits["test"][0]) == SIZES["test"]


def test_download_uses_torchvision_for_both_splits_with_a_short_timeout(tmp_path, monkeypatch):
    calls = []

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            calls.append((root, train, download, socket.getdefaulttimeout()))

    datasets = types.ModuleType("torchvision.datasets")
    datasets.CIFAR10 = FakeCIFAR10
    torchvision = types.ModuleType("torchvision")
    torchvision.datasets = datasets
    monkeypatch.setitem(sys.modules, "torchvision", torchvision)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)
    before = socket.getdefaulttimeout()
    download.fetch("cifar10", tmp_path)
    assert calls == [(str(tmp_path), True, True, 15), (str(tmp_path), False, True, 15)]
    assert socket.getdefaulttimeout() == before


def test_an_unknown_dataset_is_an_error_naming_the_valid_ones():
    with pytest.raises(DataError, match="cifar10"):
        standard.required_files("svhn")


# --- digits ---------------------------------------------------------------------------------


def test_digits_are_the_bundled_csv_scaled_to_0_255():
    spec = importlib.util.find_spec("sklearn")
    csv_path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(csv_path, "rt") as f:
        rows = [[float(v) for v in row] for row in csv.reader(f)]
    table = np.array(rows)
    expected = np.rint(table[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)  # ingest's formula

    dataset = standard.read_array_dataset("digits", Path("unused"))
    assert dataset.classes == tuple("0123456789")
    assert list(dataset.splits) == [""]
    assert dataset.files == {}
    images, labels = dataset.splits[""]
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert images.max() == 255 and images.min() == 0
    np.testing.assert_array_equal(images, expected)
    np.testing.assert_array_equal(labels, table[:, -1].astype(np.int64))
    assert set(labels.tolist()) == set(range(10))


def test_the_module_imports_without_torch_torchvision_or_sklearn(repo_root):
    code = "import sys, pipeline.data.sources; print(sorted({'torch', 'torchvision', 'sklearn'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
