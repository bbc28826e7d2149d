"""Where a training stage keeps its per-epoch checkpoints, and when it may resume from one.

DVC deletes a stage's outputs before it runs the stage, so checkpoints live outside them, in
`<repository>/.checkpoints/<stage>/<key>/`, where the key hashes everything the training
depends on: the stage's params (with `runtime.threads: auto` resolved), the hash list of its
input folder (SHA256SUMS), the pipeline's code and the framework's version and device. A
checkpoint from other params, other data or other code has another key and is never
resumed; a stage that finishes removes its folder. Queued experiments, which run in a copy of
the repository, keep theirs in the root repository too, under their own keys.

What a checkpoint holds is the framework's business (`frameworks.torch.resume`,
`frameworks.keras.resume`); this module
knows only folders and keys.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import files

FOLDER = ".checkpoints"
PACKAGE = Path(__file__).resolve().parents[1]  # pipeline/


def code_digest(package: Path = PACKAGE) -> str:
    """One hash of every Python file of the pipeline package, by path and content."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def stage_key(stage: str, params: dict[str, Any], inputs: list[Path], environment: dict[str, str]) -> str:
    """The hash naming a stage run's checkpoint folder (see the module docstring)."""
    record = {
        "stage": stage,
        "params": params,
        "inputs": [hashlib.sha256((Path(i) / files.CHECKSUMS).read_bytes()).hexdigest() for i in inputs],
        "code": code_digest(),
        "environment": environment,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Checkpoints:
    """One stage run's checkpoint folder."""

    folder: Path

    def slot(self, name: str, suffix: str = ".pt") -> Path:
        """The file of one fit (a fine-tune has two phases: 'head' and 'top'); the suffix is the
        framework's format."""
        return self.folder / f"{name}{suffix}"

    def clear(self) -> None:
        """The stage finished: nothing is left to resume."""
        shutil.rmtree(self.folder, ignore_errors=True)
        for parent in (self.folder.parent, self.folder.parent.parent):
            try:
                parent.rmdir()  # only when empty
            except OSError:
                break


def for_stage(root: Path, stage: str, params: dict[str, Any], inputs: list[Path],
              environment: dict[str, str]) -> Checkpoints:
    """`environment`: what the framework computes on (versions, device, threads)."""
    return Checkpoints(root / FOLDER / stage / stage_key(stage, params, inputs, environment))
