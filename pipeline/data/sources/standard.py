"""The standard datasets that come as arrays, not image folders, read into memory.

- `digits`: scikit-learn's bundled `digits.csv.gz` (1,797 8x8 images), found without importing
  scikit-learn; `root` and `fetch` are ignored.
- `mnist`, `fashion_mnist`, `kmnist`: the four official IDX files (`.gz`, or extracted) in
  torchvision's layout, `<root>/MNIST/raw/`, `<root>/FashionMNIST/raw/`, `<root>/KMNIST/raw/`.
- `cifar10`: the official python pickles in `<root>/cifar-10-batches-py/`, unpickled with a
  loader that builds only numpy arrays, so a tampered file cannot run code.

The layouts are torchvision's so that its downloader (`pipeline.frameworks.torch.download.fetch`, passed in
as `fetch` by ingest when files are missing and `data.download` is true) writes
exactly the files read here. Nothing here imports torch, torchvision or scikit-learn.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import math
import os
import pickle
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
from numpy._core.multiarray import _reconstruct

from pipeline.data.formats import DataError

Name = Literal["digits", "mnist", "fashion_mnist", "kmnist", "cifar10"]
NAMES: tuple[str, ...] = get_args(Name)
STANDARD = NAMES[1:]  # the official files under data.root; digits ships with scikit-learn
Fetch = Callable[[str, Path], None]  # fetch(name, root) writes the official files of `name` under root

_DIGITS = tuple(str(d) for d in range(10))
_CLASSES: dict[str, tuple[str, ...]] = {
    "digits": _DIGITS,
    "mnist": _DIGITS,
    "fashion_mnist": (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ),
    # Kuzushiji-MNIST's kmnist_classmap.csv: o ki su tsu na ha ma ya re wo.
    "kmnist": ("お", "き", "す", "つ", "な", "は", "ま", "や", "れ", "を"),
    # Used when batches.meta is absent; the same list the file holds.
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}

# torchvision's dataset classes, whose folders under root are the layout read here
TORCHVISION = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "kmnist": "KMNIST", "cifar10": "CIFAR10"}
_IDX_FOLDERS = {name: TORCHVISION[name] for name in ("mnist", "fashion_mnist", "kmnist")}  # torchvision's raw folders
_IDX_PREFIXES = {"train": "train", "test": "t10k"}
_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
_CIFAR_META = "batches.meta"


@dataclass(frozen=True)
class ArrayDataset:
    name: str
    classes: tuple[str, ...]  # official label order: label i is classes[i]
    splits: dict[str, tuple[np.ndarray, np.ndarray]]  # "train"/"test", or "" when there is no official split
    files: dict[str, str]  # path relative to root -> sha256 of the bytes read; empty for digits

    def __post_init__(self) -> None:
        for hint, (images, labels) in self.splits.items():
            gray_or_rgb = images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)
            if images.dtype != np.uint8 or not gray_or_rgb or labels.dtype != np.int64 or labels.ndim != 1:
                raise DataError(f"{self.name} split {hint!r}: expected uint8 (N, H, W[, 3]) images and int64 (N,) "
                                f"labels, got {images.dtype} {images.shape} and {labels.dtype} {labels.shape}")
            if len(images) != len(labels):
                raise DataError(f"{self.name} split {hint!r}: {len(images)} images but {len(labels)} labels")


def required_files(name: str) -> list[str]:
    """The files `name` needs, relative to root; an IDX file may instead be there extracted (no `.gz`)."""
    if name == "digits":
        return []
    if name in _IDX_FOLDERS:
        return [
            f"{_IDX_FOLDERS[name]}/raw/{prefix}-{kind}.gz"
            for prefix in _IDX_PREFIXES.values()
            for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")
        ]
    if name == "cifar10":
        return [f"{_CIFAR_FOLDER}/{batch}" for batches in _CIFAR_BATCHES.values() for batch in batches]
    raise DataError(f"unknown array dataset {name!r}; valid: {list(NAMES)}")


def read_array_dataset(name: str, root: Path, fetch: Fetch | None = None) -> ArrayDataset:
    """Read `name` whole from the official files under `root`; missing files are fetched first
    with `fetch` when one is given (`data.download`), else named in the error."""
    if name == "digits":
        return _read_digits()
    root = Path(root)
    missing = _missing(root, required_files(name))
    if missing:
        reason = _fetch_missing(fetch, name, root) if fetch is not None else None
        missing = _missing(root, missing)
        if missing:
            raise DataError(_missing_message(name, root, missing, fetch is not None, reason))
    return _read_idx_dataset(name, root) if name in _IDX_FOLDERS else _read_cifar10(root)


def _fetch_missing(fetch: Fetch, name: str, root: Path) -> str | None:
    """Run the fetcher; return why it failed, if it did."""
    try:
        fetch(name, root)
    # Any failure (no network, a bad archive, a torchvision error) ends in the one DataError naming the files.
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None


def _existing(root: Path, rel: str) -> Path | None:
    candidates = [root / rel, root / rel.removesuffix(".gz")] if rel.endswith(".gz") else [root / rel]
    return next((path for path in candidates if path.is_file()), None)


def _missing(root: Path, rels: list[str]) -> list[str]:
    return [rel for rel in rels if _existing(root, rel) is None]


def _missing_message(name: str, root: Path, missing: list[str], tried: bool, reason: str | None) -> str:
    root_abs = os.path.abspath(root)
    paths = "\n".join(f"  {os.path.join(root_abs, rel)}" for rel in missing)
    lines = [f"data.source {name!r}: {len(missing)} file(s) missing; put the official files exactly here:", paths]
    if any(rel.endswith(".gz") for rel in missing):
        lines.append("(an IDX file may also be there already extracted, without .gz)")
    if name == "cifar10":
        lines.append(f"(cifar-10-python.tar.gz, the python version, unpacks to exactly this folder under {root_abs})")
    if tried:
        lines.append(f"data.download: true tried to fetch them and failed ({reason}); "
                     "it fetches them when a network is there.")
    else:
        lines.append("Or set data.download: true to fetch them when a network is there.")
    return "\n".join(lines)


def _read_file(root: Path, rel: str, files: dict[str, str]) -> tuple[Path, bytes]:
    """The bytes of root/rel (or its extracted twin), recording their sha256 under the path actually read."""
    path = _existing(root, rel)
    if path is None:  # deleted between the check and the read
        raise DataError(f"{os.path.abspath(root / rel)}: missing")
    raw = path.read_bytes()
    files[path.relative_to(root).as_posix()] = hashlib.sha256(raw).hexdigest()
    return path, raw


# --- digits ---------------------------------------------------------------------------------


def _digits_file() -> Path:
    """scikit-learn's bundled digits.csv.gz, found without importing scikit-learn (3 s here)."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise DataError("data.source 'digits' needs scikit-learn's bundled digits.csv.gz; pip install scikit-learn")
    return path


def _read_digits() -> ArrayDataset:
    """scikit-learn's 1,797 8x8 handwritten digits, 17 grey levels scaled to 0..255."""
    table = np.loadtxt(_digits_file(), delimiter=",")  # (1797, 65): 64 pixels in 0..16, then the digit
    images = np.rint(table[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)  # as ingest always did
    labels = table[:, -1].astype(np.int64)
    return ArrayDataset("digits", _CLASSES["digits"], {"": _frozen(images, labels)}, {})


# --- MNIST, Fashion-MNIST, KMNIST: IDX files ------------------------------------------------


def _read_idx_dataset(name: str, root: Path) -> ArrayDataset:
    classes = _CLASSES[name]
    files: dict[str, str] = {}
    splits = {}
    for hint, prefix in _IDX_PREFIXES.items():
        folder = f"{_IDX_FOLDERS[name]}/raw"
        image_path, images = _read_idx(*_read_file(root, f"{folder}/{prefix}-images-idx3-ubyte.gz", files), ndim=3)
        label_path, labels = _read_idx(*_read_file(root, f"{folder}/{prefix}-labels-idx1-ubyte.gz", files), ndim=1)
        if len(images) != len(labels):
            raise DataError(f"{image_path}: {len(images)} images, but {label_path} has {len(labels)} labels; "
                            "expected one label per image")
        if len(labels) and labels.max() >= len(classes):
            raise DataError(f"{label_path}: label {labels.max()} is outside 0..{len(classes) - 1} "
                            f"({name} has {len(classes)} classes)")
        splits[hint] = _frozen(images, labels.astype(np.int64))
    return ArrayDataset(name, classes, splits, files)


def _read_idx(path: Path, raw: bytes, ndim: int) -> tuple[Path, np.ndarray]:
    """Parse one IDX file of unsigned bytes: magic 0x0000 08 <ndim>, ndim big-endian uint32 sizes, the data."""
    what = "images (N, H, W)" if ndim == 3 else "labels (N,)"
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: not a complete gzip file ({exc}); expected gzipped IDX {what}") from exc
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: {len(raw)} bytes, shorter than the {header}-byte IDX header of {what}")
    magic = int.from_bytes(raw[:4], "big")
    expected = 0x0800 | ndim  # 0x08: unsigned bytes
    if magic != expected:
        raise DataError(f"{path}: IDX magic number 0x{magic:08x}; expected 0x{expected:08x} (unsigned-byte {what})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    size = math.prod(dims)
    if len(raw) - header != size:
        raise DataError(f"{path}: the header says {what} of shape {dims}, so exactly {size} bytes should follow it, "
                        f"but {len(raw) - header} do; the file is truncated or corrupt")
    return path, np.frombuffer(raw, np.uint8, count=size, offset=header).reshape(dims)  # no copy of the payload


# --- CIFAR-10: python pickles ---------------------------------------------------------------

# Everything CIFAR-10's pickles reference: numpy's array rebuild function (under its numpy 1 name
# in the official files, its numpy 2 name if re-saved), ndarray and dtype. Unpickling any other
# global could run code (os.system, eval, ...), so nothing else is resolved.
_PICKLE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _ArrayUnpickler(pickle.Unpickler):
    def __init__(self, raw: bytes, path: Path) -> None:
        super().__init__(io.BytesIO(raw), encoding="bytes")  # "bytes": the files' Python 2 strings stay bytes
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        found = _PICKLE_GLOBALS.get((module, name))
        if found is None:
            raise DataError(f"{self.path}: refused to unpickle the global {module}.{name}; a CIFAR-10 file holds "
                            "only numpy uint8 arrays, lists, bytes and ints, so this file is not the official one")
        return found


def _unpickle(path: Path, raw: bytes) -> dict:
    try:
        content = _ArrayUnpickler(raw, path).load()
    except DataError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
        raise DataError(f"{path}: not a readable CIFAR-10 pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(content, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(content).__name__}")
    return content


def _read_cifar10(root: Path) -> ArrayDataset:
    files: dict[str, str] = {}
    classes = _CLASSES["cifar10"]
    if _existing(root, f"{_CIFAR_FOLDER}/{_CIFAR_META}"):
        path, raw = _read_file(root, f"{_CIFAR_FOLDER}/{_CIFAR_META}", files)
        names = _unpickle(path, raw).get(b"label_names")
        if not isinstance(names, list) or not names or not all(isinstance(n, bytes) for n in names):
            raise DataError(f"{path}: expected b'label_names' to be a list of class names as bytes")
        classes = tuple(n.decode() for n in names)
    splits = {}
    for hint, batches in _CIFAR_BATCHES.items():
        parts = [_cifar_batch(*_read_file(root, f"{_CIFAR_FOLDER}/{batch}", files), len(classes)) for batch in batches]
        splits[hint] = _frozen(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return ArrayDataset("cifar10", classes, splits, files)


def _cifar_batch(path: Path, raw: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path, raw)
    data, labels = batch.get(b"data"), batch.get(b"labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: expected b'data' to be a uint8 array of shape (N, 3072), got {got}")
    if not isinstance(labels, list) or not all(type(label) is int for label in labels):
        raise DataError(f"{path}: expected b'labels' to be a list of ints")
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels; expected one label per image")
    label_array = np.array(labels, dtype=np.int64)
    if len(labels) and (label_array.min() < 0 or label_array.max() >= num_classes):
        raise DataError(f"{path}: labels outside 0..{num_classes - 1}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # rows are R, G, B planes of 32x32 -> (N, 32, 32, 3)
    return images, label_array


def _frozen(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous, read-only arrays: the dataset as read, which no later step may change in place."""
    images, labels = np.ascontiguousarray(images), np.ascontiguousarray(labels)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels
