"""A Keras fit's checkpoint: everything the next epoch depends on, saved after each one.

`model.variables` (the weights, BatchNormalization's statistics and each Dropout layer's
SeedGenerator state, which decides the next mask), the optimizer's variables (its step count,
which drives the learning-rate schedule, and its moments) and the epoch loop's own state (the
best weights so far, early stopping's count, the curves). The data order and the shifts are
drawn from (seed, epoch) and (seed, epoch, batch) alone (`recipe.train_batches`), so no other
generator carries state between epochs. Restored, the next epoch computes what it would
have computed without the interruption: a resumed fit ends with byte-identical weights.

One .npz file, written whole to a temporary file and renamed into place (a SIGKILL mid-write
leaves the previous epoch's); read with `allow_pickle=False`: arrays only, never code, the
loop state as JSON text.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import files

SUFFIX = ".npz"


def _arrays(prefix: str, values: list) -> dict[str, np.ndarray]:
    return {f"{prefix}/{i}": np.asarray(v) for i, v in enumerate(values)}


def _listed(stored: Any, prefix: str) -> list[np.ndarray]:
    count = sum(1 for k in stored.files if k.startswith(prefix + "/"))
    return [stored[f"{prefix}/{i}"] for i in range(count)]


class KerasResume:
    """`recipe.Resume` for one Keras fit, in the file `path`; `optimizer` already built
    (`recipe.fit` builds it before anything else touches it)."""

    def __init__(self, path: Path, attempt: str, model: Any, optimizer: Any) -> None:
        self.path, self.attempt, self.model, self.optimizer = Path(path), attempt, model, optimizer

    def load(self) -> dict[str, Any] | None:
        """The loop state of the last finished epoch, with the model's and optimizer's state
        restored; None when there is no checkpoint (or an unreadable one: the fit starts over)."""
        if not self.path.is_file():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as stored:
                loop = json.loads(str(stored["loop"]))
                variables, slots = _listed(stored, "model"), _listed(stored, "optimizer")
                best = _listed(stored, "best")
            if len(variables) != len(self.model.variables):
                raise ValueError(f"{len(variables)} model variables saved, the model has {len(self.model.variables)}")
            if len(slots) != len(self.optimizer.variables):
                raise ValueError(f"{len(slots)} optimizer variables saved, it has {len(self.optimizer.variables)}")
            for variable, value in zip(self.model.variables, variables, strict=True):
                variable.assign(value)
            for variable, value in zip(self.optimizer.variables, slots, strict=True):
                variable.assign(value)
        except Exception as exc:  # a checkpoint of an older layout, a truncated disk: start over
            print(f"{self.path}: not resumable ({type(exc).__name__}: {exc}); training from the start",
                  file=sys.stderr)
            return None
        return {**loop, "best": best}

    def save(self, loop: dict[str, Any]) -> None:
        state = {
            **_arrays("model", [v.numpy() for v in self.model.variables]),
            **_arrays("optimizer", [v.numpy() for v in self.optimizer.variables]),
            **_arrays("best", loop["best"]),
            "loop": np.array(json.dumps({**{k: v for k, v in loop.items() if k != "best"}, "attempt": self.attempt},
                                        default=float)),  # metrics may be NumPy floats
        }
        buffer = io.BytesIO()
        np.savez(buffer, **state)
        files.write_bytes(self.path, buffer.getvalue())

