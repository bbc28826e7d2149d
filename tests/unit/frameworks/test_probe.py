"""The fine-tune's phase 1: a logistic-regression probe solved to convergence, its L2 strength
chosen on held-out data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.frameworks.torch import probe


def blobs(n: int, features: int, classes: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`classes` Gaussian clusters in `features` dimensions, offset and scaled unevenly (raw backbone features are)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centres = torch.randn(classes, features, generator=g) * 3
    x = centres[labels] + spread * torch.randn(n, features, generator=g)
    return x * torch.linspace(0.1, 10, features) + 5, labels


def test_the_probe_separates_clean_classes_and_folds_into_one_linear_on_raw_features():
    x, y = blobs(300, 16, 3, 1.0, seed=0)
    vx, vy = blobs(90, 16, 3, 1.0, seed=0)  # under VAL_MIN_IMAGES: cross-validation chooses
    fitted = probe.fit(x, y, vx, vy, 3)
    head = nn.Linear(16, 3)
    probe.load_into(head, fitted)
    with torch.no_grad():
        assert (head(vx).argmax(1) == vy).float().mean() == 1.0
        mean, std = probe.standardiser(x.double())
        w, b = probe.solve((x.double() - mean) / std, y, 3, fitted.l2)
        assert torch.allclose(head(x).double(), (x.double() - mean) / std @ w + b, atol=1e-4)
    assert fitted.chosen_by == "cross-validation" and fitted.l2 in probe.L2_GRID


def test_the_probe_is_converged_not_a_few_steps_of_descent():
    x, y = blobs(200, 8, 2, 2.0, seed=1)
    x64 = x.double()
    mean, std = probe.standardiser(x64)
    xs = (x64 - mean) / std
    w, b = probe.solve(xs, y, 2, 1e-3)
    w.requires_grad_(True)
    b.requires_grad_(True)
    loss = F.cross_entropy(xs @ w + b, y) + 0.5 * 1e-3 * (w * w).sum()
    loss.backward()
    assert w.grad.abs().max() < 1e-5 and b.grad.abs().max() < 1e-5  # the optimum: zero gradient


def test_noise_gets_a_strong_l2_and_clean_classes_a_weaker_one():
    g = torch.Generator().manual_seed(2)
    noise, labels = torch.randn(120, 40, generator=g), torch.arange(120) % 2
    chosen, how, solved = probe.choose_l2(noise.double(), labels, noise.double(), labels, 2)
    assert chosen >= 1.0 and how == "cross-validation"  # the grid's two strongest: the weights stay near 0
    assert solved is None  # cross-validation fitted no path on the whole split
    x, y = blobs(120, 40, 2, 0.5, seed=3)
    assert probe.choose_l2(x.double(), y, x.double(), y, 2)[0] <= 0.1


def test_a_large_validation_split_chooses_by_itself(monkeypatch):
    monkeypatch.setattr(probe, "VAL_MIN_IMAGES", 50)
    x, y = blobs(100, 8, 2, 1.0, seed=4)
    assert probe.choose_l2(x.double(), y, x.double(), y, 2)[1] == "val"
    assert probe.choose_l2(x.double(), y, x[:40].double(), y[:40], 2)[1] == "cross-validation"


def test_the_val_path_hands_back_the_probe_a_fresh_solve_finds(monkeypatch):
    monkeypatch.setattr(probe, "VAL_MIN_IMAGES", 50)
    x, y = blobs(100, 8, 3, 1.0, seed=5)
    val_x, val_y = blobs(60, 8, 3, 1.0, seed=6)
    l2, how, (w, b) = probe.choose_l2(x.double(), y, val_x.double(), val_y, 3)
    mean, std = probe.standardiser(x.double())
    fresh_w, fresh_b = probe.solve((x.double() - mean) / std, y, 3, l2)
    assert how == "val" and torch.allclose(w, fresh_w, atol=1e-4) and torch.allclose(b, fresh_b, atol=1e-4)
    fitted = probe.fit(x, y, val_x, val_y, 3)  # the probe is that solution, folded onto the raw features
    assert torch.allclose(x @ fitted.weight.T + fitted.bias, (((x.double() - mean) / std) @ w + b).float(), atol=1e-4)


def test_folds_are_stratified_and_the_fit_repeats_bit_for_bit():
    labels = torch.tensor([0] * 7 + [1] * 5)
    fold = probe.folds(labels, 3)
    for k in range(3):
        assert set(labels[fold == k].tolist()) == {0, 1}
    x, y = blobs(150, 12, 3, 1.5, seed=5)
    a, b = probe.fit(x, y, x, y, 3), probe.fit(x, y, x, y, 3)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias) and a.l2 == b.l2


def test_the_standard_error_shrinks_with_the_number_of_images():
    small, large = torch.tensor([0.1, 0.9] * 15), torch.tensor([0.1, 0.9] * 1500)
    assert probe.standard_error(large) < probe.standard_error(small) / 9
    assert probe.standard_error(torch.tensor([0.5])) == float("inf")


@pytest.mark.parametrize("gain", [0.5, 2.0])
def test_phase_2_ships_only_when_it_beats_the_probe_by_more_than_noise(monkeypatch, gain):
    """Phase 2 is scripted to move every weight and to report a val loss `gain` standard errors
    under the probe's: half of one is noise (the probe's weights come back), two is kept."""
    import numpy as np

    from pipeline.data import formats
    from pipeline.frameworks.recipe import FitParams, FitResult
    from pipeline.frameworks.torch import model as torch_model
    from pipeline.frameworks.torch import recipe, transfer

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    labels = np.arange(60) % 3
    images = rng.integers(0, 255, (60, 16, 16, 1)).astype(np.uint8)
    split = formats.Split(images, labels, ("a", "b", "c"))
    model = torch_model.PretrainedCNN("timm:resnet10t", num_classes=3, in_channels=1, image_size=16, input_size=32)
    cpu, p = torch.device("cpu"), FitParams(epochs=2, batch_size=16)
    head, _, margin = transfer.fit_head(model, split, split, p, 0.1, cpu, None)
    probed, head_loss = {k: v.clone() for k, v in model.state_dict().items()}, head.best_val_loss

    def scripted(net, *args, **kwargs):
        with torch.no_grad():
            for w in net.parameters():
                w.add_(1.0)
        return FitResult(best_epoch=1, best_val_loss=head_loss - gain * margin, best_val_acc=1.0, epochs_run=2)

    monkeypatch.setattr(recipe, "fit", scripted)
    phases = transfer.Phases(head_l2=0.1, share=1.0, layer_decay=1.0, freeze_batch_norm=False)
    outcome = transfer.fit(model, split, split, p, phases, cpu, torch.Generator(), None)
    same = all(torch.equal(v, probed[k]) for k, v in model.state_dict().items())
    assert same == (gain < 1) and outcome.choices["phase2"].startswith("kept" if gain > 1 else "discarded")
    assert outcome.results[-1].best_val_loss == (head_loss if gain < 1 else head_loss - gain * margin)


def test_the_path_stops_patience_steps_past_its_lowest_loss_and_chooses_as_the_whole_grid_would(monkeypatch):
    x, y = blobs(150, 30, 3, 2.0, seed=7)
    vx, vy = blobs(90, 30, 3, 2.0, seed=8)
    mean, std = probe.standardiser(x.double())
    fit = [((x.double() - mean) / std, y, (vx.double() - mean) / std, vy)]
    grid = tuple(sorted(probe.L2_GRID, reverse=True))
    totals, path = probe.path_losses(fit, 3, grid)
    best = probe.best_index(totals)
    assert len(totals) == len(path) == best + 1 + probe.PATIENCE < len(grid)  # the weak end was never solved
    monkeypatch.setattr(probe, "PATIENCE", len(grid))
    whole, _ = probe.path_losses(fit, 3, grid)
    assert len(whole) == len(grid) and whole[: len(totals)] == totals and probe.best_index(whole) == best
