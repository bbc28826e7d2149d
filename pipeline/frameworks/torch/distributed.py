"""DistributedDataParallel for the train and finetune stages under torchrun (`pipeline.runtime.launch`).

Every rank draws each epoch's order from the same seeded generator and takes every
WORLD_SIZE-th index of each batch (`shard`): one global batch of `batch_size` images per
optimizer step, as in a single process, split across the ranks; DDP averages the gradients,
so each step sees the whole batch's mean gradient. Augmentation draws from a per-rank
generator (seeded by the seed and the rank), which keeps the shared order generator in step on
every rank. The ranks' weights stay equal; each evaluates the validation split whole, so early
stopping decides the same everywhere. Deterministic for a given number of processes (gloo's
and NCCL's reductions sum in a fixed order for a fixed world); a different count changes the
BatchNorm statistics (each rank's are of its own shard; DDP keeps rank 0's) and the float
sums, so results differ with nproc.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE = World()


def current() -> World:
    """The process group this process is part of (World(0, 1) outside torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return SINGLE


def join(device: torch.device) -> World:
    """Join torchrun's process group (gloo on the CPU, NCCL on CUDA), left again at exit;
    World(0, 1) for a process that runs alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return SINGLE
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(dist.destroy_process_group)
    return current()


def device_for(device: torch.device) -> torch.device:
    """Each rank its own GPU on a CUDA machine (LOCAL_RANK); the CPU as it is."""
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def shard(idx: torch.Tensor, world: World) -> torch.Tensor:
    return idx[world.rank :: world.size] if world.size > 1 else idx


def augment_generator(generator: torch.Generator, seed: int, world: World) -> torch.Generator:
    """The generator augmentation draws from: the shared one alone, a per-rank one under DDP."""
    if world.size == 1:
        return generator
    return torch.Generator(device=generator.device).manual_seed(seed * 1_000_003 + world.rank)


def wrap(model: nn.Module, world: World) -> nn.Module:
    """The module to train through: DDP around `model` under torchrun, else `model` itself."""
    if world.size == 1:
        return model
    device = next(model.parameters()).device
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def all_sum(*values: torch.Tensor) -> list[torch.Tensor]:
    """Sums over the ranks (in place); the values themselves alone."""
    world = current()
    if world.size > 1:
        for v in values:
            dist.all_reduce(v)
    return list(values)


def barrier() -> None:
    if current().size > 1:
        dist.barrier()
