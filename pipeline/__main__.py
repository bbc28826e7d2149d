"""`python -m pipeline <stage> [paths...]`: the one entry point dvc.yaml runs for every stage.

MLflow's start-up (~4 s of imports and opening the store) runs in a worker process started
here, before the stage module and its heavy imports (torch, TensorFlow) load, so the two
overlap on the machine's cores.
"""

from __future__ import annotations

import importlib
import sys

from pipeline import tracking

STAGES = ("ingest", "prepare", "train", "finetune", "evaluate", "export")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in STAGES:
        given = repr(argv[0]) if argv else "no stage"
        sys.exit(f"usage: python -m pipeline <stage> [options]; got {given}, valid stages: {', '.join(STAGES)}")
    tracking.start_worker()
    stage = importlib.import_module(f"pipeline.{argv[0]}")
    stage.main(argv[1:])


if __name__ == "__main__":
    main()
