"""The recipe in PyTorch: train_one_epoch / evaluate / fit, for the train and finetune stages.

Batches come from `inputs.Images` (a split resident on the device or streamed from its memory
map; the same batches bit for bit either way). Batch order and augmentation come from one
seeded torch.Generator, drawn from in the same sequence on either path, so an epoch is the
same on every rerun.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.formats import Split
from pipeline.frameworks.recipe import FitParams, FitResult, augmentation, fit_epochs, resolve_auto, schedule
from pipeline.frameworks.torch import distributed, inputs, runtime
from pipeline.frameworks.torch.resume import TorchResume

if TYPE_CHECKING:
    from pipeline.tracking.run import StageRun


def make_optimizer(params: list[nn.Parameter] | list[dict], p: FitParams) -> torch.optim.Optimizer:
    """`params`: the trainable tensors, or param groups each with its own "lr" (layer-wise rates)."""
    if p.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay, nesterov=p.momentum > 0
        )
    if p.optimizer == "adam":
        return torch.optim.Adam(params, lr=p.lr, weight_decay=p.weight_decay)
    return torch.optim.AdamW(params, lr=p.lr, weight_decay=p.weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, p: FitParams, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    total = p.epochs * steps_per_epoch
    kind, warmup = schedule(p, total)
    if kind == "onecycle":
        peaks = [group["lr"] for group in optimizer.param_groups]  # p.lr, or each group's own (layer-wise)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=peaks if len(peaks) > 1 else p.lr,
            total_steps=total,
            pct_start=warmup,
            cycle_momentum=p.optimizer == "sgd",
        )
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def train_one_epoch(
    model: nn.Module,
    images: inputs.Images | torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    p: FitParams,
    device: torch.device,
    generator: torch.Generator,
    augment: torch.Generator | None = None,
) -> tuple[float, float]:
    """One pass over the training images; returns (mean loss, accuracy) over the epoch.

    `images` is an `inputs.Images`, or an (N, C, H, W) tensor held as given. `generator` draws the
    order, `augment` (default: the same one) the augmentation. Under torchrun `model` is the
    DDP module and each rank trains on its share of every batch (`distributed.shard`)."""
    if not isinstance(images, inputs.Images):
        images = inputs.Images(images, device, p.channels_last)
    augment = generator if augment is None else augment
    world = distributed.current()
    model.train()
    trainable = [q for q in model.parameters() if q.requires_grad]
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = torch.zeros((), device=device, dtype=torch.long)
    scaler = runtime.grad_scaler(device)
    mode = augmentation(p, images.side)
    for idx in inputs.batches(len(labels), p.batch_size, generator):
        if len(idx) < world.size:  # a last batch too small to give every rank an image: all skip it
            continue
        idx = distributed.shard(idx, world)
        x = images.take(idx)
        if mode == "shift":
            x = inputs.random_shift(x, p.augment_shift, augment)
        elif mode == "crop_flip":
            x = inputs.random_crop_flip(x, p.crop_scale, augment)
        y = labels[idx].to(device, non_blocking=True)
        with runtime.autocast(device):
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=p.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if p.grad_clip:
            scaler.unscale_(optimizer)  # clip the true gradients, not fp16's scaled ones
            nn.utils.clip_grad_norm_(trainable, p.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        # accumulate on the device: a .item() per step would sync the GPU every batch
        total_loss += loss.detach() * len(idx)
        correct += (logits.argmax(1) == y).sum()
        seen += len(idx)
    total_loss, correct, seen = distributed.all_sum(total_loss, correct, seen)  # every rank's share
    n = int(seen.item())
    return total_loss.item() / n, correct.item() / n


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: inputs.Images | np.ndarray | torch.Tensor,
    device: torch.device,
    batch_size: int = 256,
    channels_last: bool = True,
) -> torch.Tensor:
    """Logits (N, classes) on the CPU, in input order, for an `inputs.Images`, a split's uint8
    (N, H, W, C) array (streamed when large) or (N, C, H, W) tensor (uint8, or float in [0, 1])."""
    if not isinstance(images, inputs.Images):
        images = inputs.Images(images, device, channels_last)
    model.eval()
    out = None
    for idx in inputs.batches(len(images), batch_size, None):
        with runtime.autocast(device):
            logits = model(images.take(idx)).float().cpu()
        if out is None:
            out = torch.empty(len(images), logits.shape[1])
        # Filled in place: kept per-batch tensors would land in the holes that freed batches
        # leave in glibc's heap, so streamed memory would grow by about a batch each batch.
        out[idx] = logits
    return out if out is not None else torch.empty(0, 0)


def evaluate(
    model: nn.Module,
    images: inputs.Images | np.ndarray | torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    p: FitParams,
) -> tuple[float, float]:
    """(cross-entropy without smoothing, accuracy): the loss that early stopping watches."""
    logits = predict_logits(model, images, device, max(p.batch_size, 256), p.channels_last)
    labels = labels.cpu()
    return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


def labels_on(split: Split, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.asarray(split.labels, dtype=np.int64)).to(device)


def fit(
    model: nn.Module,
    train: Split,
    val: Split,
    p: FitParams,
    device: torch.device,
    generator: torch.Generator,
    run: StageRun | None = None,
    first_epoch: int = 0,
    desc: str = "train",
    param_groups: list[dict] | None = None,
    checkpoint: Path | None = None,
) -> FitResult:
    """Train for up to p.epochs, early-stop on val loss and restore the best weights. With
    `checkpoint` (a file), each epoch is saved there and a fit that finds one resumes it."""
    p = resolve_auto(p, len(train))  # the stage resolved and recorded it already; a direct call may not have
    model.to(device, memory_format=torch.channels_last if p.channels_last else torch.preserve_format)
    train_x, val_x = (inputs.Images(split.images, device, p.channels_last) for split in (train, val))
    train_y, val_y = labels_on(train, device), labels_on(val, device)
    params = param_groups or [q for q in model.parameters() if q.requires_grad]
    optimizer = make_optimizer(params, p)
    scheduler = make_scheduler(optimizer, p, math.ceil(len(train_y) / p.batch_size))
    world = distributed.current()
    net, augment = distributed.wrap(model, world), distributed.augment_generator(generator, p.seed, world)
    resume = None
    if checkpoint is not None and world.size == 1:  # DDP runs do not checkpoint (docs/distributed.md)
        resume = TorchResume(checkpoint, run.attempt if run else "", model, optimizer, scheduler, generator)

    def run_epoch(epoch: int) -> dict[str, float]:
        lr = optimizer.param_groups[-1]["lr"]  # the head's (the last group), or the only one
        train_loss, train_acc = train_one_epoch(net, train_x, train_y, optimizer, scheduler, p, device, generator,
                                                augment)
        val_loss, val_acc = evaluate(model, val_x, val_y, device, p)
        return {"train/loss": train_loss, "train/acc": train_acc, "val/loss": val_loss, "val/acc": val_acc, "lr": lr}

    def snapshot() -> dict[str, torch.Tensor]:
        return copy.deepcopy(model.state_dict())

    return fit_epochs(p, run_epoch, snapshot, model.load_state_dict, run, first_epoch, desc, resume)
