"""Model folders: what any stage reads of a trained model before (or without) its framework.

A trained model is a folder, `models/<name>/`, whichever framework trained it:

    model.json    framework, arch, model_args, classes: what rebuilds and reads the model
    model.pt      torch: the checkpoint (`frameworks.torch.checkpoint.checkpoint_bytes`' plain containers)
    model.keras   keras: the Keras archive, without the timestamps a plain save writes
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pipeline import files
from pipeline.data.formats import DataError, read_json
from pipeline.errors import ArtifactError

CARD = "model.json"
FRAMEWORKS = ("torch", "keras")


class Serializer(Protocol):
    """What `save` needs of a framework's Backend (frameworks.interface), without importing it."""

    framework: str
    model_file: str

    def serialize(self, model: Any, card: ModelCard) -> bytes: ...


@dataclass(frozen=True)
class ModelCard:
    """model.json: what a model folder holds, readable without any framework installed."""

    framework: str
    arch: str
    model_args: dict[str, Any]
    classes: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        args = {k: list(v) if isinstance(v, tuple) else v for k, v in self.model_args.items()}
        return {"framework": self.framework, "arch": self.arch, "model_args": args, "classes": list(self.classes)}


def save(
    out: Path, backend: Serializer, model: Any, arch: str, model_args: dict[str, Any], classes: tuple[str, ...]
) -> ModelCard:
    """Write the model folder whole or not at all (a failed save leaves the old one)."""
    card = ModelCard(backend.framework, arch, dict(model_args), tuple(classes))
    blob = backend.serialize(model, card)
    with files.atomic_dir(out) as tmp:
        files.write_json(tmp / CARD, card.to_json())
        files.write_bytes(tmp / backend.model_file, blob)
    return card


def read_card(model_dir: Path) -> ModelCard:
    path = Path(model_dir) / CARD
    if not path.is_file():
        hint = f"; {model_dir}.pt is the old single-file layout" if Path(f"{model_dir}.pt").is_file() else ""
        raise ArtifactError(
            f"{path}: not found; {model_dir} is not a trained model folder: "
            f"run the stage that trains it (dvc repro){hint}"
        )
    raw = read_json(path, "the model card")
    missing = {"framework", "arch", "model_args", "classes"} - set(raw)
    if missing:
        raise ArtifactError(f"{path}: not a model card (missing {sorted(missing)}); rerun the stage that trains it")
    if raw["framework"] not in FRAMEWORKS:
        raise ArtifactError(f"{path}: framework {raw['framework']!r} is not known; valid: {list(FRAMEWORKS)}")
    return ModelCard(raw["framework"], raw["arch"], raw["model_args"], tuple(raw["classes"]))


def check_classes(card: ModelCard, data_classes: tuple[str, ...], model_dir: Path, data_path: Path) -> None:
    """A model is only meaningful on data whose label indices mean the same classes."""
    if tuple(card.classes) != tuple(data_classes):
        raise DataError(
            f"{model_dir} was trained on classes {list(card.classes)}, but {data_path}/classes.json "
            f"lists {list(data_classes)}; rerun the training stages (dvc repro)"
        )
