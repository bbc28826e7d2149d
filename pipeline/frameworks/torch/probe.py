"""The fine-tune's phase 1: a linear probe on the frozen backbone's pooled features, solved to
convergence, its L2 strength chosen on data the probe did not fit.

The probe is multinomial logistic regression (mean cross-entropy + l2/2 * |W|^2) on features
centred and scaled by the training split's mean and overall spread, minimised in float64 by full-batch
L-BFGS: a convex problem, so its optimum depends on the data and `l2` alone, not on a learning
rate or an epoch count. `l2` auto is the grid value with the lowest held-out log loss: on the
validation split when it holds `VAL_MIN_IMAGES` or more, else (a few dozen images are too
noisy to choose by) by `FOLDS`-fold cross-validation on the training split, which is then
small too. The path runs from the strongest `l2` down, each solve warm-started from the last,
and stops `PATIENCE` steps past the lowest held-out loss so far: that loss is U-shaped in `l2`,
and the weak end, where solves take longest, is where it only climbs.
The solution is folded back into one nn.Linear on the raw features.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

L2_GRID = tuple(10.0 ** (k / 2) for k in range(1, -11, -1))  # 3.2 .. 1e-5, half-decade steps
FOLDS = 5
VAL_MIN_IMAGES = 200  # a smaller val split leaves the choice to cross-validation on train
MAX_ITERATIONS = 200  # L-BFGS steps a solve; the gradient's tolerance ends most sooner
TOLERANCE = 1e-6  # of the gradient's largest entry, where a solve stops
# out_of_fold's: ranking images needs less; on the digits the same 20 label issues at 1e-6, in 0.4x the time
OUT_OF_FOLD_TOLERANCE = 1e-4
# and decade steps: the digits' same label issues in half the time (docs/benchmarks.md#audit)
OUT_OF_FOLD_GRID = tuple(10.0 ** -k for k in range(6))  # 1 .. 1e-5
PATIENCE = 2  # grid steps (a decade) the held-out loss may climb past its lowest before the path stops


@dataclasses.dataclass(frozen=True)
class Probe:
    weight: torch.Tensor  # (classes, features), on the raw features
    bias: torch.Tensor  # (classes,)
    l2: float
    chosen_by: str  # "given", "cross-validation" or "val"


def standardiser(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The features' mean, and one scale for all of them (their root-mean-square spread): one
    scale, not one a feature, as a feature that barely varies on this data (a channel the images
    never light) would otherwise get a weight that phase 2's first batches blow up."""
    mean = x.mean(0)
    return mean, (x - mean).square().mean().sqrt().clamp_min(1e-12).expand(x.shape[1])


def solve(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float,
          start: tuple[torch.Tensor, torch.Tensor] | None = None,
          tolerance: float = TOLERANCE) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) minimising mean cross-entropy + l2/2 |W|^2 on centred, scaled float64 `x`."""
    w = torch.zeros(x.shape[1], classes, dtype=torch.float64) if start is None else start[0].clone()
    b = torch.zeros(classes, dtype=torch.float64) if start is None else start[1].clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=MAX_ITERATIONS, history_size=20, tolerance_grad=tolerance,
                                  tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach(), b.detach()


Solution = tuple[torch.Tensor, torch.Tensor]  # (W, b) on the centred, scaled features


Fold = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # fit x, y; held-out x, y


def path_losses(fits: list[Fold], classes: int, grid: tuple[float, ...],
                tolerance: float = TOLERANCE) -> tuple[list[float], list[list[Solution]]]:
    """Held-out log loss summed over `fits` (each one's mean times its held-out count) at each l2
    of `grid`, strongest first, and every fit's solution there; it ends `PATIENCE` steps past
    the lowest, so it may be shorter than `grid`."""
    totals: list[float] = []
    path: list[list[Solution]] = []
    starts: list[Solution | None] = [None] * len(fits)
    for l2 in grid:
        starts = [solve(x, y, classes, l2, start, tolerance) for (x, y, _, _), start in zip(fits, starts, strict=True)]
        totals.append(sum(F.cross_entropy(hx @ w + b, hy).item() * len(hy)
                          for (_, _, hx, hy), (w, b) in zip(fits, starts, strict=True)))
        path.append(starts)
        if len(totals) - 1 - best_index(totals) >= PATIENCE:
            break
    return totals, path


def best_index(losses: list[float]) -> int:
    """The lowest loss's index; the first (the stronger l2) on a tie."""
    return min(range(len(losses)), key=lambda i: (losses[i], i))


def folds(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Each image's fold, stratified: within a class, images (in split order, which follows
    content hashes) are dealt round-robin, so every fold holds every class."""
    fold = torch.empty_like(labels)
    for c in labels.unique():
        where = (labels == c).nonzero().flatten()
        fold[where] = torch.arange(len(where)) % k
    return fold


def fold_fits(x: torch.Tensor, y: torch.Tensor, k: int) -> tuple[list[Fold], list[torch.Tensor]]:
    """`k` stratified folds (`folds`): each one's fit on the others and held-out rows, both
    standardised by the fit's statistics, and each one's held-out mask."""
    fold, fits, held = folds(y, k), [], []
    for i in range(k):
        fit_rows, held_rows = fold != i, fold == i
        mean, std = standardiser(x[fit_rows])
        fits.append(((x[fit_rows] - mean) / std, y[fit_rows], (x[held_rows] - mean) / std, y[held_rows]))
        held.append(held_rows)
    return fits, held


def choose_l2(x: torch.Tensor, y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
              classes: int) -> tuple[float, str, Solution | None]:
    """The grid's l2 of lowest held-out log loss (the stronger on a tie), how it was held out,
    and, when the path was fitted on all of (x, y) (held out on val), its solution there: the
    probe itself, so no second solve."""
    grid = tuple(sorted(L2_GRID, reverse=True))
    k = min(FOLDS, int(torch.bincount(y).min()))
    if len(val_y) < VAL_MIN_IMAGES and k >= 2:
        fits, _ = fold_fits(x, y, k)
        totals, _ = path_losses(fits, classes, grid)
        best = best_index(totals)
        return grid[best], "cross-validation", None
    mean, std = standardiser(x)
    totals, path = path_losses([((x - mean) / std, y, (val_x - mean) / std, val_y)], classes, grid)
    best = best_index(totals)
    return grid[best], "val", path[best][0]


def principal_components(x: torch.Tensor, dims: int) -> torch.Tensor:
    """`x` (float64) centred and projected onto its top `dims` principal directions, scaled to
    unit root-mean-square: no labels used, so no fold learns from another's."""
    centred = x - x.mean(0)
    if dims >= min(x.shape):
        return centred
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    z = centred @ v[:dims].T
    return z / z.square().mean().sqrt().clamp_min(1e-12)


def out_of_fold(features: np.ndarray, labels: np.ndarray, classes: int, k: int,
                dims: int = 256) -> tuple[np.ndarray, float]:
    """Each image's class probabilities from a probe that never saw it: `k` stratified folds
    (`folds`), the l2 of lowest summed held-out loss on the path, and at it each fold's held-out
    images scored by the solution fitted on the others. (The l2 is chosen on those same held-out
    images: one number for the whole set, which flatters the probabilities little.) The probe
    reads the features' top `dims` principal components: on all 1,280 of the digits' features
    it took 2.4 times as long for 0.0006 more out-of-fold accuracy (docs/benchmarks.md#audit)."""
    y = torch.as_tensor(labels)
    fits, held = fold_fits(principal_components(torch.as_tensor(features).double(), dims), y, k)
    totals, path = path_losses(fits, classes, OUT_OF_FOLD_GRID, OUT_OF_FOLD_TOLERANCE)
    best = best_index(totals)
    probs = torch.empty(len(y), classes, dtype=torch.float64)
    for (_, _, hx, _), rows, (w, b) in zip(fits, held, path[best], strict=True):
        probs[rows] = torch.softmax(hx @ w + b, dim=1)
    return probs.numpy(), OUT_OF_FOLD_GRID[best]


def fit(features: torch.Tensor, labels: torch.Tensor, val_features: torch.Tensor, val_labels: torch.Tensor,
        classes: int, l2: float | None = None) -> Probe:
    """The probe on (features, labels); `l2` None chooses it (`choose_l2`)."""
    x, y = features.double().cpu(), labels.cpu()
    how, solved = "given", None
    if l2 is None:
        l2, how, solved = choose_l2(x, y, val_features.double().cpu(), val_labels.cpu(), classes)
    mean, std = standardiser(x)
    w, b = solved or solve((x - mean) / std, y, classes, l2)
    weight = (w / std[:, None]).T  # x_std @ w = x @ (w / std) - (mean / std) @ w
    return Probe(weight.float().contiguous(), (b - (mean / std) @ w).float(), l2, how)


def load_into(linear: nn.Linear, probe: Probe) -> None:
    with torch.no_grad():
        linear.weight.copy_(probe.weight)
        linear.bias.copy_(probe.bias)


def log_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each image's cross-entropy."""
    return F.cross_entropy(logits.double(), labels.cpu(), reduction="none")


def standard_error(losses: torch.Tensor) -> float:
    """The standard error of a mean loss: how far it could move on another draw of the split."""
    n = len(losses)
    return float(losses.std(unbiased=True)) / math.sqrt(n) if n > 1 else math.inf
