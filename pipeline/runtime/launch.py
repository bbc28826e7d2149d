"""Several processes for one stage: `train.nproc` / `finetune.nproc` > 1 reruns the stage's
command under torchrun (`torch.distributed.run`, standalone: one machine, a free port), which
starts that many copies with RANK / WORLD_SIZE set; the stage trains with
DistributedDataParallel (`frameworks.torch.distributed`). Rank 0 alone opens the MLflow run,
claims the workspace and writes outputs.

Across machines, start the stage on each one yourself; torchrun's own rendezvous joins them:

    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 4 --rdzv-backend c10d \\
        --rdzv-endpoint host0:29500 -m pipeline train --data data/prepared ...

torchrun's agent runs inside the stage's process (`frameworks.torch.torchrun`), which only the
two training stages import: this module decides, from params.yaml and the environment, and
holds nothing of torch's.
"""

from __future__ import annotations

import os

from pipeline import config

DISTRIBUTED_STAGES = ("train", "finetune")


def rank() -> int:
    """This process's rank under torchrun; 0 for a stage that runs alone."""
    return int(os.environ.get("RANK", "0"))


def local_processes() -> int:
    """How many ranks torchrun runs on this machine (1 outside torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def requested(stage: str) -> int:
    """params.yaml `<stage>.nproc`, for the stages that train; 1 for every other."""
    if stage not in DISTRIBUTED_STAGES:
        return 1
    section = config.read_params().get(stage)
    value = section.get("nproc", 1) if isinstance(section, dict) else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise config.ConfigError(f"{config.PARAMS_FILE}: {stage}.nproc: expected an integer >= 1, got {value!r}")
    if value > 1 and section.get("framework", "torch") != "torch":
        raise config.ConfigError(f"{config.PARAMS_FILE}: {stage}.nproc: {value} processes need framework torch "
                                 f"(DistributedDataParallel); keras trains in one process: set nproc: 1")
    return value


def relaunches(stage: str) -> int:
    """How many torchrun processes this process should hand `stage` to: its `nproc` when the
    params ask for more than one and this process is not already one of them, else 0."""
    nproc = requested(stage)
    return 0 if nproc == 1 or "RANK" in os.environ else nproc
