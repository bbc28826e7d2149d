"""Fine-tune a pretrained ImageNet backbone with a new head, in two phases.

Phase 1 fits the new head as a linear probe on the frozen backbone's features, computed once
and solved to convergence (`head_l2` auto: its L2 strength chosen on held-out data); phase 2
unfreezes the top `unfreeze_fraction` of the backbone and trains it with the head at `lr`, each
unit further from the head at `layer_decay` times the rate of the one above, and is kept only
when it beats the probe on val by more than noise.
BatchNorm statistics update in the unfrozen layers (`batch_norm: frozen` keeps ImageNet's in
all). Reads the prepared train/val splits and the backbone weights; writes the model folder
(`models/finetune/`), its metrics and curves (`dvclive/finetune/`). PyTorch only: the backbones
are timm's and torchvision's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from pipeline import cli, config, files
from pipeline.config import check
from pipeline.data import formats, review
from pipeline.experiments import trial
from pipeline.frameworks import card, shapes
from pipeline.frameworks.interface import RuntimeParams
from pipeline.frameworks.recipe import AutoEpochs, FitParams, augmentation, resolve_auto
from pipeline.frameworks.torch import model as torch_model
from pipeline.frameworks.torch import torchrun, transfer
from pipeline.frameworks.torch import weights as pretrained  # `weights` is a FinetuneParams field
from pipeline.frameworks.torch.backend import TorchBackend
from pipeline.runtime import checkpoints, launch
from pipeline.tracking import store
from pipeline.tracking.run import StageRun, stage_run


@dataclass(frozen=True)
class FinetuneParams(FitParams):
    # phase 2, at most; auto: PHASE2_EPOCHS (its steps within its bounds: `resolve`)
    epochs: int | Literal["auto"] = "auto"
    # not auto: on 200 photos batches of 16 let phase 2 win on 60 val images and lose on the rest
    batch_size: int | Literal["auto"] = 64
    weight_decay: float = 1.0e-4
    early_stopping_patience: int = 3
    backbone: str = pretrained.PACKAGE_BACKBONE  # 'timm:<name>' or 'torchvision:<name>'
    weights: str = pretrained.PACKAGE_WEIGHTS  # the package, 'hub', 'none' or a local file
    weights_sha256: str = pretrained.PACKAGE_SHA256  # '' skips the check (hub weights)
    # the backbone's input side, resized inside the model; auto: its pretrained resolution, at
    # most 4x the stored side; small single-channel images at 64 (frameworks.shapes.pretrained_input_size)
    input_size: int | Literal["auto"] = "auto"
    dropout: float = 0.2
    # phase 1's L2 strength; auto: the value of a grid with the lowest held-out log loss
    head_l2: float | Literal["auto"] = "auto"
    # share of backbone parameter tensors trained in phase 2, from the top; auto: all of them for
    # small images (digits look nothing like ImageNet photos), the top 30% for photos
    unfreeze_fraction: float | Literal["auto"] = "auto"
    layer_decay: float = 1.0  # phase 2: each backbone unit below the head learns at this times the one above
    batch_norm: Literal["train", "frozen"] = "train"  # frozen: all BatchNorm layers keep ImageNet's statistics

    def __post_init__(self) -> None:
        super().__post_init__()
        size = self.input_size
        check(size == "auto" or 16 <= size <= 1024, "input_size", f"must be 'auto' or in 16..1024, got {size}")
        check(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        l2 = self.head_l2
        check(l2 == "auto" or (isinstance(l2, int | float) and 0 < l2 <= 100), "head_l2",
              f"must be 'auto' or a number in (0, 100], got {l2!r}")
        share = self.unfreeze_fraction
        check(share == "auto" or 0 <= share <= 1, "unfreeze_fraction", f"must be 'auto' or in [0, 1], got {share}")
        check(0 < self.layer_decay <= 1, "layer_decay", f"must be in (0, 1], got {self.layer_decay}")
        check(self.weights != "", "weights", f"must name weights: '{pretrained.PACKAGE_WEIGHTS}', 'hub', "
                                             "'none' or a file path")
        torch_model.parse_backbone(self.backbone)  # fail at start-up on a malformed spec


# phase 2's epochs auto: 120 optimizer steps, in 4 to 6 epochs. The whole backbone adapting to the
# digits needs them (80 steps: 0.974-0.985 test accuracy over seeds, 120: 0.981-0.993), an
# MNIST-sized folder keeps its 4 (220 steps; 2 cost 1.5 points): docs/benchmarks.md#recipe-choices
PHASE2_EPOCHS = AutoEpochs(steps=120, least=4, most=6)


def resolve(p: FinetuneParams, images: int) -> FinetuneParams:
    """`p` with its autos resolved for `images` training images (phase 2's epochs by PHASE2_EPOCHS)."""
    return resolve_auto(p, images, PHASE2_EPOCHS)


def model_args(p: FinetuneParams, train: formats.Split, pretrained_size: int = 224) -> dict:
    """`pretrained_size`: the backbone's pretrained resolution (`torch_model.pretrained_resolution`)."""
    auto = shapes.pretrained_input_size(train.image_size, pretrained_size, train.channels)
    return {
        "backbone": p.backbone,
        "num_classes": train.num_classes,
        "in_channels": train.channels,
        "image_size": train.image_size,
        "input_size": auto if p.input_size == "auto" else p.input_size,
        "dropout": p.dropout,
        "mean": torch_model.IMAGENET_MEAN,
        "std": torch_model.IMAGENET_STD,
    }


def phases(p: FinetuneParams, image_size: int) -> transfer.Phases:
    """The two phases' settings, `auto` resolved."""
    return transfer.Phases(None if p.head_l2 == "auto" else float(p.head_l2), unfreeze_share(p, image_size),
                           p.layer_decay, p.batch_norm == "frozen")


def finetune(
    model: torch_model.PretrainedCNN, train: formats.Split, val: formats.Split, p: FinetuneParams,
    device, generator, run: StageRun | None, saved: checkpoints.Checkpoints | None = None,
    features: list | None = None,
) -> transfer.Outcome:
    """Both phases (`transfer.fit`) with this stage's params, `auto` resolved for `train`'s size;
    `features`: train's and val's pooled features, when the audit computed them already."""
    fit_p = resolve(p, len(train))
    return transfer.fit(model, train, val, fit_p, phases(p, train.image_size), device, generator, run, saved,
                        features)


PHOTO_UNFREEZE = 0.3  # unfreeze_fraction auto for photos


def unfreeze_share(p: FinetuneParams, image_size: int) -> float:
    """unfreeze_fraction, with auto resolved by the stored size as augment auto is: photos
    (shapes.PHOTO_SIZE px or more) adapt the top PHOTO_UNFREEZE of the backbone, small images all of it."""
    if p.unfreeze_fraction != "auto":
        return float(p.unfreeze_fraction)
    return PHOTO_UNFREEZE if image_size >= shapes.PHOTO_SIZE else 1.0


def main(argv: list[str] | None = None) -> None:
    torchrun.relaunch("finetune", argv or [])  # nproc > 1: this process becomes torchrun's agent, exits with the ranks
    args = cli.fit_paths(argv, __doc__, "finetune", "finetune", features=True)
    p = config.load("finetune", FinetuneParams)
    rt = config.load("runtime", RuntimeParams)
    files.verify_folder(args.data, "prepare")
    backend = TorchBackend(rt, p.seed)  # seeds, threads, deterministic kernels, device
    train_set, val_set = review.load_training(args.data, args.applied)
    net, weights_sha256 = pretrained.load_pretrained(p.backbone, p.weights, p.weights_sha256)
    margs = model_args(p, train_set, torch_model.pretrained_resolution(net))
    model = torch_model.PretrainedCNN(**margs, net=net)
    with stage_run("finetune", {"finetune": p, "runtime": rt}, live_dir=args.live) as run:
        run.set_tags({**backend.describe(), "weights_sha256": weights_sha256})
        if (prune := trial.epoch_hook("finetune")) is not None:  # a trial of `python -m pipeline.experiments.sweep`
            run.epoch_hooks.append(prune)
        run.log_dataset(args.data, "training")
        fit_p = resolve(p, len(train_set))
        run.log_choices({"input_size": margs["input_size"], "augment": augmentation(p, train_set.image_size),
                         "unfreeze_fraction": unfreeze_share(p, train_set.image_size),
                         "batch_size": fit_p.batch_size, "epochs": fit_p.epochs})
        # per-epoch checkpoints outside DVC's outputs: a killed run resumes
        ran_on = {**backend.describe(), "weights_sha256": weights_sha256}
        saved = checkpoints.for_stage(store.repo_root(), "finetune", {"finetune": p, "runtime": rt}, [args.data],
                                      ran_on)
        batch = transfer.feature_batch(fit_p)
        key = transfer.features_key(margs, weights_sha256, batch, fit_p.channels_last, args.data)
        cached = transfer.cached_features(args.features, key, {"train": len(train_set), "val": len(val_set)}) \
            if args.features else None
        run.set_tags({"features": f"from {args.features} (the audit's)" if cached else "computed here"})
        started = time.perf_counter()
        outcome = finetune(model, train_set, val_set, fit_p, backend.device, backend.generator, run, saved,
                           [cached["train"], cached["val"]] if cached else None)
        seconds = time.perf_counter() - started
        run.log_choices(outcome.choices)
        results = outcome.results
        last = results[-1]
        run.log_summary({"best/val_loss": last.best_val_loss, "best/val_acc": last.best_val_acc,
                         "epochs_run": sum(r.epochs_run for r in results)})
        epochs = sum(r.epochs_run for r in results)  # both phases; a resumed run counts epochs run before it too
        run.log_timing({"fit_seconds": seconds, "images_per_second": epochs * len(train_set) / seconds})
        if launch.rank() == 0:  # under torchrun the ranks hold equal weights; one writes them
            card.save(args.out, backend, model, "pretrained_cnn", margs, train_set.classes)
            run.log_artifact(args.out, "model")
            saved.clear()


if __name__ == "__main__":
    main()
