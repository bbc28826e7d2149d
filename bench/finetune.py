"""Benchmark: the CPU cost of fine-tuning at photo sizes, each choice against its alternative.

    python -m bench.finetune [--images 192] [--repeats 3]   # pets photos when there, else noise

The finetune params from params.yaml on a photo-sized split (the first `--images` pets photos
at their stored 180 px, the backbone at its pretrained 224; random pixels where
../shared/datasets/pets is missing: the costs do not depend on the content). Side by side in
one process, alternated `--repeats` times so that machine noise hits both alike, medians:

- head phase: the linear probe solved on features computed once, its L2 strength chosen by
  cross-validation (`transfer.fit_head`), against 5 epochs of the same head trained by SGD
  through the frozen backbone every epoch (at 1e-2);
- phase 2 training steps (the top unfreeze_fraction of the backbone) in channels_last
  against the default contiguous layout;
- evaluation in torch.inference_mode against torch.no_grad;
- the stage's allocator setting (`pipeline.__main__.keep_heap`) against glibc's defaults: a
  fresh process each (it is set once a process), running three phase 2 steps and an
  evaluation, alternated.

Each pair is also checked for identical outputs where it must be (cached features and
inference mode change the cost, not the numbers). Results go to stdout and
bench/results/finetune.md; nothing here is asserted in tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

from bench import PETS, REPO, report


def photo_split(n: int, side: int = 180):
    """A Split of `n` photos (pets, resized to `side`) or, without them, of random pixels."""
    from PIL import Image

    from pipeline.data.formats import Split

    files = sorted(PETS.glob("*/*.jpg"))[::7][:n] if PETS.is_dir() else []
    if len(files) == n:
        images = np.stack([np.asarray(Image.open(f).convert("RGB").resize((side, side))) for f in files])
        labels = np.array([int(f.parent.name == "dog") for f in files])
    else:
        rng = np.random.default_rng(0)
        images, labels = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8), rng.integers(0, 2, n)
    return Split(images=images, labels=labels.astype(np.int64), classes=("cat", "dog")), bool(files)


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def allocator_child(heap: bool, images: int) -> float:
    """Seconds of three phase 2 steps and an evaluation in this fresh process."""
    if heap:
        from pipeline.__main__ import keep_heap

        keep_heap()
    import torch

    from pipeline import config, finetune
    from pipeline.frameworks.interface import RuntimeParams
    from pipeline.frameworks.torch import inputs, recipe
    from pipeline.frameworks.torch import model as torch_model
    from pipeline.frameworks.torch import weights as pretrained
    from pipeline.frameworks.torch.backend import TorchBackend

    p = config.load("finetune", finetune.FinetuneParams)
    backend = TorchBackend(config.load("runtime", RuntimeParams), p.seed)
    split, _ = photo_split(images)
    net, _ = pretrained.load_pretrained(p.backbone, p.weights, p.weights_sha256)
    model = torch_model.PretrainedCNN(**finetune.model_args(p, split, torch_model.pretrained_resolution(net)), net=net)
    model.to(backend.device, memory_format=torch.channels_last)
    model.set_trainable(finetune.unfreeze_share(p, split.image_size))
    n = 3 * p.batch_size
    started = time.perf_counter()
    images_ = inputs.Images(split.images[:n], backend.device, p.channels_last)
    optimizer = recipe.make_optimizer([w for w in model.parameters() if w.requires_grad], p)
    scheduler = recipe.make_scheduler(optimizer, p, 3)
    recipe.train_one_epoch(model, images_, recipe.labels_on(split, backend.device)[:n], optimizer, scheduler, p,
                           backend.device, torch.Generator())
    recipe.predict_logits(model, split.images, backend.device, 256, p.channels_last)
    return time.perf_counter() - started


def allocator_pair(images: int, repeats: int) -> tuple[list[float], list[float]]:
    def child(heap: bool) -> float:
        cmd = [sys.executable, "-m", "bench.finetune", "--images", str(images), "--allocator-child", str(int(heap))]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
        return json.loads(done.stdout.splitlines()[-1])["seconds"]

    pairs = [(child(True), child(False)) for _ in range(repeats)]
    return [a for a, _ in pairs], [b for _, b in pairs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--allocator-child", type=int, choices=(0, 1), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.allocator_child is not None:
        print(json.dumps({"seconds": allocator_child(bool(args.allocator_child), args.images)}))
        return
    from pipeline.__main__ import keep_heap

    keep_heap()  # as in the stage's process
    import torch

    from pipeline import config, finetune
    from pipeline.frameworks.interface import RuntimeParams
    from pipeline.frameworks.torch import inputs, recipe, transfer
    from pipeline.frameworks.torch import model as torch_model
    from pipeline.frameworks.torch import weights as pretrained
    from pipeline.frameworks.torch.backend import TorchBackend

    p = config.load("finetune", finetune.FinetuneParams)
    backend = TorchBackend(config.load("runtime", RuntimeParams), p.seed)
    device = backend.device
    split, real = photo_split(args.images)
    train, val = split, split  # the val pass costs what it costs on any photos of this size
    net, _ = pretrained.load_pretrained(p.backbone, p.weights, p.weights_sha256)
    margs = finetune.model_args(p, train, torch_model.pretrained_resolution(net))
    model = torch_model.PretrainedCNN(**margs, net=net).to(device)
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    def head_probe() -> None:
        model.load_state_dict(initial)
        transfer.fit_head(model, train, val, p, None, device, None)

    def head_every_epoch(epochs: int) -> None:
        model.load_state_dict(initial)
        model.set_trainable(0.0)
        q = dataclasses.replace(p, epochs=epochs, lr=1e-2, early_stopping_patience=0)
        recipe.fit(model, train, val, q, device, torch.Generator().manual_seed(0), None, desc="head every epoch")

    def steps(channels_last: bool, n: int = 3) -> Callable[[], None]:
        def run() -> None:
            model.load_state_dict(initial)
            model.set_trainable(finetune.unfreeze_share(p, train.image_size))
            model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            q = dataclasses.replace(p, channels_last=channels_last)
            images = inputs.Images(train.images[: n * p.batch_size], device, channels_last)
            labels = recipe.labels_on(train, device)[: n * p.batch_size]
            optimizer = recipe.make_optimizer([w for w in model.parameters() if w.requires_grad], q)
            scheduler = recipe.make_scheduler(optimizer, q, n)
            recipe.train_one_epoch(model, images, labels, optimizer, scheduler, q, device, torch.Generator())
        return run

    outputs: dict[str, torch.Tensor] = {}

    def predict(mode: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            model.load_state_dict(initial)
            with mode():
                outputs[mode.__name__] = recipe.predict_logits(model, val.images, device, 256, p.channels_last)
        return run

    pairs = {
        "head phase: the probe on features once, l2 by cross-validation / 5 SGD epochs through the backbone": (
            head_probe, lambda: head_every_epoch(5)),
        f"phase 2, 3 steps of {p.batch_size}: channels_last / contiguous": (steps(True), steps(False)),
        f"evaluation of {len(val)} images: inference_mode / no_grad": (
            predict(torch.inference_mode), predict(torch.no_grad)),
    }
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in pairs}
    for _ in range(args.repeats):
        for name, (ours, theirs) in pairs.items():
            times[name][0].append(timed(ours))
            times[name][1].append(timed(theirs))
    times["3 phase 2 steps and an evaluation: keep_heap / glibc defaults (a process each)"] = allocator_pair(
        args.images, args.repeats)
    same = torch.equal(outputs["inference_mode"], outputs["no_grad"])
    lines = [
        f"- data: {len(train)} {'pets photos' if real else 'random-pixel images'} at {train.image_size} px, "
        f"backbone `{p.backbone}` at {margs['input_size']} px, {torch.get_num_threads()} threads, "
        f"medians of {args.repeats}",
        f"- inference_mode logits identical to no_grad's: {same}",
        "",
        "| choice | ours s | alternative s | ratio |",
        "|---|---|---|---|",
    ]
    for name, (ours, theirs) in times.items():
        a, b = statistics.median(ours), statistics.median(theirs)
        lines.append(f"| {name} | {a:.2f} | {b:.2f} | {a / b:.2f} |")
    report("Fine-tuning cost at photo sizes", lines, "finetune")


if __name__ == "__main__":
    main()
