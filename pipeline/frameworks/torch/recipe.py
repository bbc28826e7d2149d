"""The recipe in PyTorch: train_one_epoch / evaluate / fit, for the train and finetune stages.

Batches are cut by index from `Images`, which holds a split one of two ways:

- resident: when the split's float copy fits `RESIDENT_BYTES`, it is converted to model input
  once and kept on the device for the whole fit, so epochs skip the conversion. On MNIST-sized
  data a DataLoader's per-sample collation costs more than the model.
- streamed: a larger split stays the memory map that `formats.load_split` opened, and each batch
  reads exactly its own rows from it and converts them. Only the page cache holds the file,
  so a split larger than memory still trains; what stays in memory per image is its label and
  its place in the epoch's order (16 bytes).

Both give the same batches bit for bit: the same rows in the same order, converted by the same
`as_input`. Batch order and augmentation come from one seeded torch.Generator, drawn from in
the same sequence either way, so an epoch is the same on every rerun and on either path.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.formats import Split
from pipeline.frameworks.recipe import FitParams, FitResult, augmentation, fit_epochs, schedule
from pipeline.frameworks.torch import distributed, runtime
from pipeline.frameworks.torch.resume import TorchResume

if TYPE_CHECKING:
    from pipeline.tracking import StageRun


def as_input(batch: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float [0, 1]; normalisation lives in the model. Float passes through."""
    x = batch.to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


RESIDENT_BYTES = 1 << 30  # splits whose float copy fits stay on the device for the whole fit; larger ones stream


def stage(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """Convert a whole uint8 (N, C, H, W) tensor to model input once when it fits, so epochs skip the work."""
    if images.numel() * 4 <= RESIDENT_BYTES:
        return as_input(images, device, channels_last)
    return images


class Images:
    """A split's images as model input, batch by batch: resident or streamed (see the module docstring).

    Built from a split's uint8 (N, H, W, C) array, usually its memory map, it picks the path by
    size. Built from an (N, C, H, W) tensor (uint8, or float in [0, 1]) it holds that tensor as
    given, which is how callers with tensors already in memory use it.
    """

    def __init__(self, images: np.ndarray | torch.Tensor, device: torch.device, channels_last: bool) -> None:
        self.device, self.channels_last = device, channels_last
        self.resident: torch.Tensor | None = None  # (N, C, H, W)
        self.streamed: np.ndarray | None = None  # uint8 (N, H, W, C), never read whole
        if isinstance(images, torch.Tensor):
            self.resident = images
        elif images.size * 4 <= RESIDENT_BYTES:
            # np.array: a writable copy (torch warns on a read-only map), freed once stage() has converted it
            self.resident = stage(torch.from_numpy(np.array(images)).permute(0, 3, 1, 2), device, channels_last)
        else:
            self.streamed = images

    def __len__(self) -> int:
        return len(self.resident if self.resident is not None else self.streamed)

    @property
    def side(self) -> int:
        """The images' width: resident (N, C, H, W), streamed (N, H, W, C); F for (N, F) features."""
        return int(self.resident.shape[-1] if self.resident is not None else self.streamed.shape[2])

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        """Model input (B, C, H, W) on the device for the rows in `idx`, in idx's order."""
        if self.streamed is not None:
            # fancy indexing reads just these rows from the map into a fresh (B, H, W, C) array
            batch = torch.from_numpy(self.streamed[idx.numpy()]).permute(0, 3, 1, 2)
            if self.device.type == "cuda":  # page-locked: the copy to the GPU runs asynchronously
                batch = batch.pin_memory()
        else:
            batch = self.resident[idx]
        return as_input(batch, self.device, self.channels_last)


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by its own random offset in [-max_shift, max_shift], zero-filled."""
    n, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)  # (N, C, H + 2s, W + 2s)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)).view(n, 1, h, 1).expand(n, c, h, w + 2 * max_shift)
    padded = padded.gather(2, rows)  # (N, C, H, W + 2s)
    cols = (dx[:, None] + torch.arange(w, device=x.device)).view(n, 1, 1, w).expand(n, c, h, w)
    return padded.gather(3, cols)  # (N, C, H, W)


def random_crop_flip(x: torch.Tensor, min_scale: float, generator: torch.Generator) -> torch.Tensor:
    """Inception-style random resized crops, each flipped left-right with probability 1/2, at
    the input's own size: a crop keeps a share of the area in [min_scale, 1] at an aspect
    ratio in [3/4, 4/3], resampled bilinearly by one batched affine grid."""
    n = x.shape[0]
    u = torch.rand((n, 5), generator=generator, dtype=torch.float64)  # drawn on the CPU: the same on any device
    area = min_scale + (1 - min_scale) * u[:, 0]
    ratio = torch.exp((2 * u[:, 1] - 1) * math.log(4 / 3))
    w, h = torch.sqrt(area * ratio).clamp(max=1), torch.sqrt(area / ratio).clamp(max=1)  # shares of each side
    theta = torch.zeros((n, 2, 3), dtype=torch.float64)
    theta[:, 0, 0] = w * torch.where(u[:, 4] < 0.5, -1.0, 1.0)
    theta[:, 0, 2] = (2 * u[:, 2] - 1) * (1 - w)  # the crop's centre, in [-1, 1] image coordinates
    theta[:, 1, 1] = h
    theta[:, 1, 2] = (2 * u[:, 3] - 1) * (1 - h)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def batches(n: int, batch_size: int, generator: torch.Generator | None) -> Iterator[torch.Tensor]:
    """Index batches over range(n), shuffled when a generator is given."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    yield from order.split(batch_size)


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
    images: Images | torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    p: FitParams,
    device: torch.device,
    generator: torch.Generator,
    augment: torch.Generator | None = None,
) -> tuple[float, float]:
    """One pass over the training images; returns (mean loss, accuracy) over the epoch.

    `images` is an `Images`, or an (N, C, H, W) tensor held as given. `generator` draws the
    order, `augment` (default: the same one) the augmentation. Under torchrun `model` is the
    DDP module and each rank trains on its share of every batch (`distributed.shard`)."""
    if not isinstance(images, Images):
        images = Images(images, device, p.channels_last)
    augment = generator if augment is None else augment
    world = distributed.current()
    model.train()
    trainable = [q for q in model.parameters() if q.requires_grad]
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = torch.zeros((), device=device, dtype=torch.long)
    scaler = runtime.grad_scaler(device)
    mode = augmentation(p, images.side)
    for idx in batches(len(labels), p.batch_size, generator):
        if len(idx) < world.size:  # a last batch too small to give every rank an image: all skip it
            continue
        idx = distributed.shard(idx, world)
        x = images.take(idx)
        if mode == "shift":
            x = random_shift(x, p.augment_shift, augment)
        elif mode == "crop_flip":
            x = random_crop_flip(x, p.crop_scale, augment)
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
    images: Images | np.ndarray | torch.Tensor,
    device: torch.device,
    batch_size: int = 256,
    channels_last: bool = True,
) -> torch.Tensor:
    """Logits (N, classes) on the CPU, in input order, for an `Images`, a split's uint8
    (N, H, W, C) array (streamed when large) or (N, C, H, W) tensor (uint8, or float in [0, 1])."""
    if not isinstance(images, Images):
        images = Images(images, device, channels_last)
    model.eval()
    out = None
    for idx in batches(len(images), batch_size, None):
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
    images: Images | np.ndarray | torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    p: FitParams,
) -> tuple[float, float]:
    """(cross-entropy without smoothing, accuracy): the loss that early stopping watches."""
    logits = predict_logits(model, images, device, max(p.batch_size, 256), p.channels_last)
    labels = labels.cpu()
    return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


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
    keep_start: bool = False,
    checkpoint: Path | None = None,
) -> FitResult:
    """Train for up to p.epochs, early-stop on val loss and restore the best weights. With
    `keep_start`, the weights it starts from count as epoch -1: an epoch must beat their val
    loss, or they come back (a fine-tune's second phase never ends worse than its first).
    With `checkpoint` (a file), each epoch is saved there and a fit that finds one resumes it."""
    model.to(device, memory_format=torch.channels_last if p.channels_last else torch.preserve_format)
    train_x, val_x = Images(train.images, device, p.channels_last), Images(val.images, device, p.channels_last)
    train_y, val_y = labels_on(train, device), labels_on(val, device)
    start = evaluate(model, val_x, val_y, device, p) if keep_start else (math.inf, 0.0)
    return fit_inputs(model, train_x, train_y, val_x, val_y, p, device, generator, run, first_epoch, desc,
                      param_groups, start, checkpoint)


def labels_on(split: Split, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.asarray(split.labels, dtype=np.int64)).to(device)


def fit_inputs(
    model: nn.Module,
    train_x: Images,
    train_y: torch.Tensor,
    val_x: Images,
    val_y: torch.Tensor,
    p: FitParams,
    device: torch.device,
    generator: torch.Generator,
    run: StageRun | None = None,
    first_epoch: int = 0,
    desc: str = "train",
    param_groups: list[dict] | None = None,
    start: tuple[float, float] = (math.inf, 0.0),
    checkpoint: Path | None = None,
) -> FitResult:
    """`fit` on inputs already held as `Images`: a split's images, or (N, F) features that a
    frozen backbone computed once (the fine-tune's head phase)."""
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

    return fit_epochs(p, run_epoch, snapshot, model.load_state_dict, run, first_epoch, desc, start, resume)
