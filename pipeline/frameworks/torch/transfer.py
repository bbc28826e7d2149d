"""The fine-tune recipe's two phases on a PretrainedCNN (the finetune stage's torch side).

Phase 1, a linear probe: the frozen backbone's pooled features of the (unaugmented) images
are computed once, and the new head is the logistic regression on them (`probe`), solved to
convergence. Phase 2: the top `share` of the backbone trains with the head under
`recipe.fit`, each backbone unit below the head at `layer_decay` times the rate above it, and
is kept only when it beats the probe by more than noise.
The stage resolves its params (`auto` included) and passes plain values down.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline import files
from pipeline.data import formats
from pipeline.frameworks.recipe import FitParams, FitResult
from pipeline.frameworks.torch import fold, probe, recipe
from pipeline.frameworks.torch import model as torch_model

if TYPE_CHECKING:
    from pipeline.runtime.checkpoints import Checkpoints
    from pipeline.tracking.run import StageRun


@dataclasses.dataclass(frozen=True)
class Phases:
    """What the two phases need beyond the shared recipe (FitParams)."""

    head_l2: float | None  # the probe's L2 strength; None: chosen on held-out data (`probe.choose_l2`)
    share: float  # of the backbone's parameter tensors trained in phase 2, from the top
    layer_decay: float
    freeze_batch_norm: bool


@dataclasses.dataclass(frozen=True)
class Outcome:
    """The phases' results and what the stage records of them."""

    results: list[FitResult]
    choices: dict[str, object]


def fit(
    model: torch_model.PretrainedCNN, train: formats.Split, val: formats.Split, p: FitParams, phases: Phases,
    device: Any, generator: Any, run: StageRun | None, saved: Checkpoints | None = None,
    features: list[torch.Tensor] | None = None,
) -> Outcome:
    """Both phases; curves continue across them (phase 1 is step 0) so one plot shows the whole
    run. Phase 2 is kept only when its best val loss beats the probe's by more than that loss's
    standard error over the val images: on a few dozen images a smaller gain is noise. With
    `saved`, phase 2 checkpoints every epoch (slot 'top') and resumes from there; phase 1 is
    recomputed, to the same weights. `features`: train's and val's pooled features, computed
    already (`cached_features`)."""
    model.freeze_batch_norm = phases.freeze_batch_norm
    head, fitted, margin = fit_head(model, train, val, p, phases.head_l2, device, run, features)
    results = [head]
    choices: dict[str, object] = {"head_l2": f"{fitted.l2:.3g}", "head_l2_by": fitted.chosen_by}
    if p.epochs and phases.share > 0:
        probed = copy.deepcopy(model.state_dict())
        model.set_trainable(phases.share)
        groups = model.param_groups(p.lr, phases.layer_decay)
        # its own early stopping: measured against the probe from its first epoch, a one-cycle
        # schedule would be cut before it anneals
        top = recipe.fit(model, train, val, p, device, generator, run, first_epoch=1, desc="finetune top",
                         param_groups=groups, checkpoint=saved.slot("top") if saved else None)
        if top.best_val_loss < head.best_val_loss - margin:
            choices["phase2"] = "kept"
        else:
            model.load_state_dict(probed)
            top = dataclasses.replace(top, best_epoch=-1, best_val_loss=head.best_val_loss,
                                      best_val_acc=head.best_val_acc)
            choices["phase2"] = "discarded (no gain over the probe beyond noise)"
        results.append(top)
    return Outcome(results, choices)


def freeze(model: torch_model.PretrainedCNN, device: Any, channels_last: bool) -> None:
    """The backbone frozen, on `device`, in the memory format the features are computed in."""
    model.set_trainable(0.0)
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)


def pooled_features(model: torch_model.PretrainedCNN, images: list, device: Any, batch_size: int = 256,
                    channels_last: bool = True) -> list[torch.Tensor]:
    """The frozen backbone's pooled features (N, F) of each uint8 (N, H, W, C) array, unaugmented,
    in eval mode, with BatchNorm folded into the convolutions (`fold`): what the probe reads, and
    the audit stage's features."""
    freeze(model, device, channels_last)
    with model.head_removed():
        net, _ = fold.folded(model)  # a copy: phase 2 trains `model` on from its BatchNorms
        return [recipe.predict_logits(net, x, device, batch_size, channels_last) for x in images]


def feature_batch(p: FitParams) -> int:
    return max(p.batch_size, 256)


def features_key(margs: dict, weights_sha256: str, batch_size: int, channels_last: bool, prepared: Any) -> dict:
    """What the pooled features' bytes depend on beyond the threads: the images (the sha256 of
    each split's array, from the prepared folder's checksums), the PretrainedCNN's args but its
    head's, the weights and the batches. A cache of them serves a stage whose key is equal."""
    kept = ("backbone", "in_channels", "image_size", "input_size", "mean", "std")
    images = {name: sha for name, sha in files.read_checksums(prepared).items() if name.endswith("_images.npy")}
    return {**{k: list(margs[k]) if isinstance(margs[k], tuple) else margs[k] for k in kept},
            "weights_sha256": weights_sha256, "batch_size": batch_size, "channels_last": channels_last,
            "images": images}


def cached_features(folder: Any, key: dict, sizes: dict[str, int]) -> dict[str, torch.Tensor] | None:
    """The audit stage's per-split features (`folder`/features.npy, the splits in SPLITS order,
    and features.json) when they were computed with `key` for splits of `sizes`; else None."""
    meta, array = Path(folder) / "features.json", Path(folder) / "features.npy"
    if not (meta.is_file() and array.is_file()):
        return None
    saved = json.loads(meta.read_text())
    if saved.get("key") != key or any(saved.get("splits", {}).get(s) != n for s, n in sizes.items()):
        return None
    x, out, start = torch.from_numpy(np.load(array)), {}, 0
    for split in formats.SPLITS:  # the array's order (the JSON's keys are sorted)
        n = saved["splits"][split]
        out[split], start = x[start:start + n], start + n
    return out


def fit_head(
    model: torch_model.PretrainedCNN, train: formats.Split, val: formats.Split, p: FitParams, l2: float | None,
    device: Any, run: StageRun | None, features: list[torch.Tensor] | None = None,
) -> tuple[FitResult, probe.Probe, float]:
    """Phase 1: the probe on features computed once (unaugmented, the backbone frozen and in
    eval mode), loaded into the model's head; its result as epoch 0, the probe, and the
    standard error of its val loss."""
    if features is None:
        features = pooled_features(model, [train.images, val.images], device, feature_batch(p), p.channels_last)
    else:  # the same weights frozen, as pooled_features leaves them
        freeze(model, device, p.channels_last)
    head = model.net.get_submodule(model.head)  # Sequential(Dropout, Linear)
    labels = [recipe.labels_on(s, torch.device("cpu")) for s in (train, val)]
    fitted = probe.fit(features[0], labels[0], features[1], labels[1], train.num_classes, l2)
    probe.load_into(head[-1], fitted)
    logits = [f @ fitted.weight.T + fitted.bias for f in features]
    losses = [probe.log_losses(z, y) for z, y in zip(logits, labels, strict=True)]
    accs = [float((z.argmax(1) == y).double().mean()) for z, y in zip(logits, labels, strict=True)]
    metrics = {"train/loss": float(losses[0].mean()), "train/acc": accs[0],
               "val/loss": float(losses[1].mean()), "val/acc": accs[1]}
    if run is not None:
        run.log_epoch(0, metrics)
    result = FitResult(best_epoch=0, best_val_loss=metrics["val/loss"], best_val_acc=accs[1], epochs_run=1,
                       history=[metrics])
    return result, fitted, probe.standard_error(losses[1])
