"""Which framework backs a model: the one place that imports a framework's code by name.

Each framework's `Backend` is imported only when that framework is used, so a torch run never
imports TensorFlow (about 3 s here, with its configuration) and a keras run never imports
torch (importing torch._dynamo after TensorFlow crashes the process).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import ConfigError
from pipeline.errors import ArtifactError
from pipeline.frameworks.card import CARD, FRAMEWORKS, ModelCard, check_classes, read_card
from pipeline.frameworks.interface import Backend, RuntimeParams
from pipeline.runtime import interrupts


def backend_class(framework: str) -> type[Backend]:
    if framework == "torch":
        with interrupts.held():  # a Ctrl-C inside torch's import would abort the process
            from pipeline.frameworks.torch.backend import TorchBackend

        return TorchBackend
    if framework == "keras":
        with interrupts.held():
            from pipeline.frameworks.keras.backend import KerasBackend

        return KerasBackend
    raise ConfigError(f"framework {framework!r} is not known; valid: {list(FRAMEWORKS)}")


def get(framework: str, runtime: RuntimeParams, seed: int = 0) -> Backend:
    """The framework's backend, configured: this is where its module is first imported."""
    return backend_class(framework)(runtime, seed)


def open_model(
    model_dir: Path, data_classes: tuple[str, ...], data_path: Path, runtime: RuntimeParams
) -> tuple[Backend, Any, ModelCard]:
    """(backend, model, card) for a model folder, with only its framework imported: the card is read
    and its classes checked against the data's before any framework loads."""
    card = read_card(model_dir)
    check_classes(card, data_classes, model_dir, data_path)
    backend = get(card.framework, runtime)
    path = Path(model_dir) / backend.model_file
    if not path.is_file():
        raise ArtifactError(f"{path}: not found, but {Path(model_dir) / CARD} says the model is "
                                f"{card.framework}'s; rerun its stage")
    return backend, backend.deserialize(path, card), card
