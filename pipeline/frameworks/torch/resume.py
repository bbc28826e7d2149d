"""A torch fit's checkpoint: everything the next epoch depends on, saved after each one.

The weights, the optimizer's and the scheduler's state, every random generator (the data
order and augmentation generator, torch's global one that dropout draws from, CUDA's, NumPy's
and Python's) and the epoch loop's own state (the best weights so far, early stopping's
count, the curves). Restored, the next epoch computes exactly what it would have computed
without the interruption, so a resumed fit ends with byte-identical weights.

Written whole to a temporary file and renamed into place: a SIGKILL mid-write leaves the
previous epoch's checkpoint. Read with `torch.load(weights_only=True)`: tensors and plain
containers only, never code.
"""

from __future__ import annotations

import io
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import files


def rng_states(generator: torch.Generator) -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }


def set_rng_states(generator: torch.Generator, states: dict[str, Any]) -> None:
    generator.set_state(states["generator"])
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])


class TorchResume:
    """`recipe.Resume` for one torch fit, in the file `path`."""

    def __init__(self, path: Path, attempt: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any, generator: torch.Generator) -> None:
        self.path, self.attempt = Path(path), attempt
        self.model, self.optimizer, self.scheduler, self.generator = model, optimizer, scheduler, generator

    def load(self) -> dict[str, Any] | None:
        """The loop state of the last finished epoch, with the framework's state restored; None
        when there is no checkpoint (or an unreadable one: the fit starts over)."""
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            set_rng_states(self.generator, state["rng"])
        except Exception as exc:  # a checkpoint of an older layout, a truncated disk: start over
            print(f"{self.path}: not resumable ({type(exc).__name__}: {exc}); training from the start",
                  file=sys.stderr)
            return None
        return state["loop"]

    def save(self, loop: dict[str, Any]) -> None:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_states(self.generator),
            "loop": {**loop, "attempt": self.attempt},
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        files.write_bytes(self.path, buffer.getvalue())
