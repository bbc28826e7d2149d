"""The fine-tune recipe's two phases on a PretrainedCNN (the finetune stage's torch side).

Phase 1, a linear probe: the frozen backbone's pooled features of the (unaugmented) images
are computed once, and the new head alone trains on them: one forward pass of the backbone
instead of one an epoch. Phase 2: the top `share` of the backbone trains with the head under
`recipe.fit`, each backbone unit below the head at `layer_decay` times the rate above it.
The stage resolves its params (`auto` included) and passes plain values down.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipeline.data import formats
from pipeline.frameworks.recipe import FitParams, FitResult
from pipeline.frameworks.torch import inputs, recipe, resume
from pipeline.frameworks.torch import model as torch_model

if TYPE_CHECKING:
    from pipeline.runtime.checkpoints import Checkpoints
    from pipeline.tracking.run import StageRun


@dataclasses.dataclass(frozen=True)
class Phases:
    """What the two phases need beyond the shared recipe (FitParams)."""

    head_epochs: int
    head_lr: float
    share: float  # of the backbone's parameter tensors trained in phase 2, from the top
    layer_decay: float
    freeze_batch_norm: bool


def fit(
    model: torch_model.PretrainedCNN, train: formats.Split, val: formats.Split, p: FitParams, phases: Phases,
    device: Any, generator: Any, run: StageRun | None, saved: Checkpoints | None = None,
) -> list[FitResult]:
    """Both phases; curves continue across them so one plot shows the whole run. With `saved`,
    each phase checkpoints every epoch (slots 'head' and 'top') and resumes from there."""
    model.freeze_batch_norm = phases.freeze_batch_norm
    results = []
    if phases.head_epochs:
        results.append(fit_head(model, train, val, p, phases.head_epochs, phases.head_lr, device, generator, run,
                                saved.slot("head") if saved else None))
    if p.epochs and phases.share > 0:
        model.set_trainable(phases.share)
        first = results[0].epochs_run if results else 0
        groups = model.param_groups(p.lr, phases.layer_decay)
        results.append(recipe.fit(model, train, val, p, device, generator, run, first_epoch=first,
                                  desc="finetune top", param_groups=groups, keep_start=True,
                                  checkpoint=saved.slot("top") if saved else None))
    return results


def fit_head(
    model: torch_model.PretrainedCNN, train: formats.Split, val: formats.Split, p: FitParams, epochs: int,
    lr: float, device: Any, generator: Any, run: StageRun | None, checkpoint: Path | None = None,
) -> FitResult:
    """Phase 1: the head alone, `epochs` epochs at `lr`, on features computed once."""
    model.set_trainable(0.0)
    model.to(device, memory_format=torch.channels_last if p.channels_last else torch.preserve_format)
    size = max(p.batch_size, 256)
    with model.head_removed() as head:
        if resume.finished(checkpoint, epochs):  # a resumed run past this phase: no epoch reads them
            features = [torch.empty(len(s.labels), 1) for s in (train, val)]
        else:
            features = [recipe.predict_logits(model, s.images, device, size, p.channels_last) for s in (train, val)]
    # (N, F) features: no image augmentation, no channels_last (a 4-D layout)
    q = dataclasses.replace(p, epochs=epochs, lr=lr, augment="none", channels_last=False)
    train_x, val_x = (inputs.Images(f.to(device), device, channels_last=False) for f in features)
    labels = recipe.labels_on(train, device), recipe.labels_on(val, device)
    return recipe.fit_inputs(head, train_x, labels[0], val_x, labels[1], q, device, generator, run,
                             desc="finetune head", checkpoint=checkpoint)
