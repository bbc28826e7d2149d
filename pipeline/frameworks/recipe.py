"""The training recipe both frameworks follow: its params, its result, and the epoch loop
(early stopping on the unsmoothed validation loss, the best weights restored).

Free of any framework: `train` and `finetune` extend `FitParams` with their own knobs. torch's
fit hands `fit_epochs` one function that runs an epoch; Keras runs its epochs in its own fit
and reports each one's end to an `EpochLoop`, the same bookkeeping.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from tqdm import tqdm

from pipeline.config import check
from pipeline.frameworks.shapes import PHOTO_SIZE
from pipeline.runtime import launch

if TYPE_CHECKING:
    from pipeline.tracking.run import StageRun


@dataclass(frozen=True)
class FitParams:
    """The training recipe; the train and finetune params extend it. Defaults are params.yaml's
    `train:` values (finetune overrides its own; tests/unit/test_config.py holds both to the file)."""

    seed: int = 0
    # auto: as many as TRAIN_EPOCHS.steps optimizer steps take on the training split (`resolve_auto`)
    epochs: int | Literal["auto"] = "auto"
    # auto: 64, smaller (down to 16) where that leaves a split under BATCHES_PER_EPOCH batches
    batch_size: int | Literal["auto"] = "auto"
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 3.0e-3  # the peak rate under onecycle
    momentum: float = 0.9  # sgd only
    weight_decay: float = 5.0e-4
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    warmup_fraction: float = 0.25  # onecycle: share of steps spent rising to lr
    label_smoothing: float = 0.1
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    # auto: crop_flip for photos (stored at 64 px or more), shift for small images such as
    # digits and text, where a flip can change the class (see `augmentation`)
    augment: Literal["auto", "shift", "crop_flip", "none"] = "auto"
    augment_shift: int = 2  # shift: random translation of up to this many pixels
    crop_scale: float = 0.35  # crop_flip: the smallest share of the image's area a crop keeps
    # epochs without a better val loss; 0 turns it off; auto: PATIENCE_SHARE of the epochs
    early_stopping_patience: int | Literal["auto"] = "auto"
    channels_last: bool = True
    nproc: int = 1  # torch: processes under torchrun with DistributedDataParallel (pipeline.runtime.launch)

    def __post_init__(self) -> None:
        check(self.epochs == "auto" or self.epochs >= 1, "epochs", f"must be 'auto' or at least 1, got {self.epochs}")
        check(self.batch_size == "auto" or self.batch_size >= 1, "batch_size",
              f"must be 'auto' or at least 1, got {self.batch_size}")
        check(0 < self.lr <= 10, "lr", f"must be in (0, 10], got {self.lr}")
        check(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(0 < self.warmup_fraction < 1, "warmup_fraction", f"must be in (0, 1), got {self.warmup_fraction}")
        check(0 <= self.label_smoothing < 1, "label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        check(self.grad_clip >= 0, "grad_clip", f"must be >= 0 (0 = off), got {self.grad_clip}")
        check(self.augment_shift >= 0, "augment_shift", f"must be >= 0 (0 = off), got {self.augment_shift}")
        check(0 < self.crop_scale <= 1, "crop_scale", f"must be in (0, 1], got {self.crop_scale}")
        patience = self.early_stopping_patience
        check(patience == "auto" or patience >= 0, "early_stopping_patience",
              f"must be 'auto' or >= 0 (0 = off), got {patience}")
        check(self.nproc >= 1, "nproc", f"must be at least 1, got {self.nproc}")



@dataclass(frozen=True)
class AutoEpochs:
    """What `epochs: auto` aims for: a number of optimizer steps, whatever the data's size, within
    bounds. A fixed epoch count gives a few hundred photos a handful of steps (the one-cycle
    schedule is over before the CNN has learned anything) and tens of thousands of images far
    more steps than they need."""

    steps: int
    least: int
    most: int


# the scratch CNN: 550 steps are the 25 epochs measured on the digits and the pets photos (20 and
# 22 batches of 64 an epoch); 200 photos 62 epochs of 9 batches of 16, an MNIST-sized folder 15 long ones
TRAIN_EPOCHS = AutoEpochs(steps=550, least=15, most=150)
# batch_size auto: an epoch of at least this many batches (200 photos' 140-image training split
# made 3 batches of 64: three updates, and three BatchNorm estimates, between val checks)
BATCHES_PER_EPOCH = 8
BATCH_RANGE = (16, 64)
# patience auto: 10 of 25 epochs as measured (docs/benchmarks.md#recipe-choices), kept in proportion:
# 10 epochs of 150 short ones stopped 200 photos mid-schedule, on a val split of 30 images
PATIENCE_SHARE = 0.4


def auto_batch_size(images: int) -> int:
    """The largest power of two in BATCH_RANGE that cuts `images` into BATCHES_PER_EPOCH batches or more."""
    least, most = BATCH_RANGE
    size = most
    while size > least and images < BATCHES_PER_EPOCH * size:
        size //= 2
    return size


def resolve_auto(p: FitParams, images: int, auto: AutoEpochs = TRAIN_EPOCHS) -> FitParams:
    """`p` with its `auto`s resolved for a training split of `images` images, in order:
    `batch_size` (`auto_batch_size`), `epochs` (the epochs of `auto.steps` steps of that batch
    size, within `auto.least`..`auto.most`), `early_stopping_patience` (PATIENCE_SHARE of them)."""
    if p.batch_size == "auto":
        p = dataclasses.replace(p, batch_size=auto_batch_size(images))
    if p.epochs == "auto":
        per_epoch = max(1, math.ceil(images / p.batch_size))
        p = dataclasses.replace(p, epochs=min(max(math.ceil(auto.steps / per_epoch), auto.least), auto.most))
    if p.early_stopping_patience == "auto":
        p = dataclasses.replace(p, early_stopping_patience=math.ceil(PATIENCE_SHARE * p.epochs))
    return p


def schedule(p: FitParams, total_steps: int) -> tuple[str, float]:
    """(kind, warm-up share) that both frameworks' schedulers run for `total_steps` steps. The
    one-cycle's two phases need a step or more each (torch's OneCycleLR divides by their
    length): on a tiny training set the warm-up grows to 1.5 steps, and under 4 steps in all
    the rate stays constant."""
    if p.schedule != "onecycle":
        return p.schedule, p.warmup_fraction
    if total_steps < 4:
        return "constant", p.warmup_fraction
    edge = 1.5 / total_steps
    return "onecycle", min(max(p.warmup_fraction, edge), 1 - edge)


def augmentation(p: FitParams, image_size: int) -> str:
    """The augmentation `p.augment` means for images stored at `image_size`: random resized
    crops and horizontal flips for photos, shifts for small images (a flipped 2 or b is
    another class); 'none' where the chosen one is switched off."""
    mode = p.augment
    if mode == "auto":
        mode = "crop_flip" if image_size >= PHOTO_SIZE else "shift"
    return "none" if mode == "shift" and not p.augment_shift else mode


@dataclass
class FitResult:
    best_epoch: int  # 0-based, in this fit's own count
    best_val_loss: float
    best_val_acc: float
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)


class Resume(Protocol):
    """A fit's checkpoint (`frameworks.torch.resume.TorchResume`): `save` after each epoch,
    `load` at the start (restoring the framework's state; the loop's state comes back)."""

    def load(self) -> dict[str, Any] | None: ...

    def save(self, loop: dict[str, Any]) -> None: ...


class EpochLoop:
    """`fit_epochs`' bookkeeping, for a framework that runs the epochs itself (Keras' own fit,
    from a callback): `begin()` gives the first epoch to run (later than 0 after a resume),
    `end(epoch, metrics)` logs an epoch and says whether to stop, `finish()` restores the best
    weights and gives the result. `fit_epochs` is this driven by a plain loop."""

    def __init__(
        self, p: FitParams, snapshot: Callable[[], Any], restore: Callable[[Any], None],
        run: StageRun | None = None, first_epoch: int = 0, desc: str = "train", resume: Resume | None = None,
    ) -> None:
        self.p, self.snapshot, self.restore, self.run = p, snapshot, restore, run
        self.first_epoch, self.desc, self.resume = first_epoch, desc, resume
        self.result = FitResult(best_epoch=-1, best_val_loss=math.inf, best_val_acc=0.0, epochs_run=0)
        self.best: Any = None
        self.bar: tqdm | None = None

    def begin(self) -> int:
        self.best = self.snapshot()
        begin = 0
        saved = self.resume.load() if self.resume is not None else None
        if saved is not None:
            self.result, self.best = FitResult(**saved["result"]), saved["best"]
            begin = self.p.epochs if saved["stopped"] else saved["epoch"] + 1
            if self.run is not None:
                self.run.resumed_from(self.first_epoch + begin, saved["attempt"])
                for epoch, metrics in enumerate(self.result.history):
                    self.run.log_epoch(self.first_epoch + epoch, metrics, hooks=False)
        self.bar = tqdm(desc=self.desc, unit="epoch", dynamic_ncols=True, initial=begin, total=self.p.epochs,
                        disable=launch.rank() > 0)  # under torchrun one bar, rank 0's
        return begin

    def end(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Record `epoch`'s metrics (train/loss, train/acc, val/loss, val/acc, lr); True: stop here."""
        result = self.result
        result.history.append(metrics)
        result.epochs_run = epoch + 1
        if self.run is not None:
            self.run.log_epoch(self.first_epoch + epoch, metrics)
        val_loss, val_acc = metrics["val/loss"], metrics["val/acc"]
        self.bar.update()
        self.bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", val_loss=f"{val_loss:.4f}", val_acc=f"{val_acc:.4f}")
        stop = False
        if val_loss < result.best_val_loss:
            result.best_epoch, result.best_val_loss, result.best_val_acc = epoch, val_loss, val_acc
            self.best = self.snapshot()
        else:
            patience = self.p.early_stopping_patience
            stop = bool(patience) and epoch - result.best_epoch >= patience
        if self.resume is not None:
            self.resume.save({"epoch": epoch, "stopped": stop, "result": dataclasses.asdict(result), "best": self.best})
        return stop

    def close(self) -> None:
        """End the progress bar's line, also when Ctrl-C or an error stops the fit (the message
        that follows must start a line of its own)."""
        if self.bar is not None:
            self.bar.close()

    def finish(self) -> FitResult:
        self.close()
        self.restore(self.best)
        return self.result


def fit_epochs(
    p: FitParams,
    run_epoch: Callable[[int], dict[str, float]],
    snapshot: Callable[[], Any],
    restore: Callable[[Any], None],
    run: StageRun | None = None,
    first_epoch: int = 0,
    desc: str = "train",
    resume: Resume | None = None,
) -> FitResult:
    """Up to p.epochs of `run_epoch(epoch)`, which trains one epoch and returns its metrics
    (train/loss, train/acc, val/loss, val/acc, lr); stops early after p.early_stopping_patience
    epochs without a lower val/loss, and `restore`s the weights `snapshot` took at the best one.

    With `resume`, each epoch ends with a checkpoint, and a fit that finds one carries on after
    its epoch: the curves so far are logged again (DVC's plots come out whole) and the run is
    tagged with the epoch it resumed from and linked to the run that was interrupted."""
    loop = EpochLoop(p, snapshot, restore, run, first_epoch, desc, resume)
    try:
        for epoch in range(loop.begin(), p.epochs):
            if loop.end(epoch, run_epoch(epoch)):
                break
    finally:
        loop.close()
    return loop.finish()
