"""The training loop: augmentation, determinism, early stopping."""

import dataclasses

import numpy as np
import pytest
import torch

from pipeline import data, engine, models, runtime
from pipeline.config import ConfigError


def test_random_shift_translates_each_image_and_fills_with_zeros():
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 3, 3] = 1.0  # one lit pixel per image
    shifted = engine.random_shift(x, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == x.shape
    assert torch.equal(shifted.sum((1, 2, 3)), torch.ones(64))  # 2 px from the centre never leaves the image
    positions = {tuple(torch.nonzero(img[0])[0].tolist()) for img in shifted}
    assert len(positions) > 5  # offsets differ between images
    assert all(1 <= r <= 5 and 1 <= c <= 5 for r, c in positions)


def test_random_shift_of_zero_is_the_identity():
    x = torch.rand(4, 3, 8, 8)
    assert torch.equal(engine.random_shift(x, 0, torch.Generator()), x)


def test_to_tensors_gives_channels_first_in_channels_last_memory():
    split = data.Split(np.zeros((2, 5, 5, 3), np.uint8), np.array([0, 1]), ("a", "b"))
    images, labels = engine.to_tensors(split)
    assert images.shape == (2, 3, 5, 5)
    assert images.is_contiguous(memory_format=torch.channels_last)


def tiny_splits():
    rng = np.random.default_rng(0)
    labels = np.arange(96) % 3
    images = np.zeros((96, 8, 8, 1), np.uint8)
    for i, label in enumerate(labels):  # class k lights rows 2k..2k+1: learnable in a few steps
        images[i, 2 * label : 2 * label + 2] = 200
    images = np.clip(images + rng.integers(0, 40, images.shape), 0, 255).astype(np.uint8)
    split = data.Split(images, labels, ("a", "b", "c"))
    return split, data.Split(images[:30], labels[:30], split.classes)


def train_once(p: engine.FitParams) -> tuple[models.ScratchCNN, engine.FitResult]:
    runtime.configure(runtime.RuntimeParams(threads=2, device="cpu"))
    generator = runtime.seed_everything(p.seed)
    model = models.ScratchCNN(num_classes=3, in_channels=1, image_size=8)
    train, val = tiny_splits()
    return model, engine.fit(model, train, val, p, torch.device("cpu"), generator)


def test_fit_twice_with_one_seed_gives_identical_weights():
    p = engine.FitParams(epochs=2, batch_size=16)
    (a, _), (b, _) = train_once(p), train_once(p)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_fit_learns_a_separable_problem():
    # no shifts: the class is encoded by which rows are lit
    _, result = train_once(engine.FitParams(epochs=6, batch_size=16, lr=1.0e-2, augment_shift=0))
    assert result.best_val_acc == 1.0


def test_early_stopping_stops_after_patience_and_restores_the_best_epoch(monkeypatch):
    scripted = iter([1.0, 0.5, 0.7, 0.8, 0.9, 0.1])  # best at epoch 1; patience 2 stops after epoch 3
    snapshots = []

    def fake_evaluate(model, images, labels, device, p):
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(scripted), 0.5

    monkeypatch.setattr(engine, "evaluate", fake_evaluate)
    model, result = train_once(engine.FitParams(epochs=6, batch_size=16, early_stopping_patience=2))
    assert (result.best_epoch, result.epochs_run, result.best_val_loss) == (1, 4, 0.5)
    assert all(torch.equal(v, snapshots[1][k]) for k, v in model.state_dict().items())
    assert not all(torch.equal(v, snapshots[3][k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "constant"])
def test_every_optimizer_and_schedule_runs(optimizer, schedule):
    _, result = train_once(engine.FitParams(epochs=1, batch_size=32, optimizer=optimizer, schedule=schedule))
    assert np.isfinite(result.best_val_loss)


def test_fit_params_reject_a_negative_learning_rate():
    with pytest.raises(ConfigError, match="lr: must be in"):
        dataclasses.replace(engine.FitParams(), lr=-1.0)


def test_configure_switches_on_deterministic_kernels_and_pins_threads():
    torch.use_deterministic_algorithms(False)
    device = runtime.configure(runtime.RuntimeParams(threads=1, device="cpu"))
    assert device == torch.device("cpu")
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.get_num_threads() == 1
    runtime.configure(runtime.RuntimeParams(threads=2, device="cpu"))


def test_asking_for_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="runtime.device is 'cuda' but torch sees no CUDA device"):
        runtime.configure(runtime.RuntimeParams(device="cuda"))
