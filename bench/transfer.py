"""Benchmark: the default recipe on a small photo set against a linear probe, each scored on
photos it never saw.

    python -m bench.transfer                       # 100 pets photos per class, seed 2026
    python -m bench.transfer --folder PATH --per-class 100 --seed 7
    python -m bench.transfer --set train.epochs=100   # a param changed, as dvc exp run -S

Draws `--per-class` photos of each class of `--folder` (seeded), runs the real `dvc repro` in a
temporary copy of the repository with only `data.source: folder` and `data.folder` set, and
scores both exports through `pipeline.serving.predict` on every photo of the folder left out
of the draw. Beside them, in the same run, the baseline the fine-tune must beat: scikit-learn's
LogisticRegression (C=1, standardised features) on the same backbone's pooled ImageNet features
of the prepared training split, at the fine-tune's input size, scored on the same held-out
photos. Results go to stdout and bench/results/transfer.md; nothing here is asserted in tests.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench import folder_parser, parse_folder_args, parse_sets, report, set_params
from bench.pipeline import bench_env, copy_repo


def draw(folder: Path, per_class: int, seed: int, dest: Path) -> dict[str, list[Path]]:
    """Symlinks to `per_class` photos of each class under `dest`; the photos left out, by class."""
    rng, rest = random.Random(seed), {}
    for cls in sorted(p for p in folder.iterdir() if p.is_dir()):
        photos = sorted(p for p in cls.iterdir() if p.is_file())
        chosen = set(rng.sample(range(len(photos)), min(per_class, len(photos))))
        (dest / cls.name).mkdir(parents=True)
        for i, photo in enumerate(photos):
            if i in chosen:
                os.symlink(photo.resolve(), dest / cls.name / photo.name)
        rest[cls.name] = [p for i, p in enumerate(photos) if i not in chosen]
    return rest


def held_out_accuracy(export: Path, rest: dict[str, list[Path]]) -> float:
    from pipeline.serving import predict

    onnx_bytes, meta = predict.read_export(export)
    paths = [p for photos in rest.values() for p in photos]
    rows = predict.classify(paths, onnx_bytes, meta, 64, os.cpu_count() or 1)
    truth = {str(p): cls for cls, photos in rest.items() for p in photos}
    classes = meta["classes"]
    return float(np.mean([truth[r["path"]] == classes[int(np.argmax(r["probabilities"]))] if "probabilities" in r
                          else False for r in rows]))


def probe_baseline(repo: Path, rest: dict[str, list[Path]]) -> float:
    """LogisticRegression on the backbone's pooled features: trained on the prepared train split,
    scored on the held-out photos (read as the fine-tune's export reads them)."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from pipeline.data import formats
    from pipeline.frameworks.torch import model as torch_model
    from pipeline.frameworks.torch import recipe
    from pipeline.frameworks.torch import weights as pretrained
    from pipeline.serving import predict

    card = json.loads((repo / "models/finetune/model.json").read_text())
    margs = card["model_args"]
    net, _ = pretrained.load_pretrained(margs["backbone"], pretrained.PACKAGE_WEIGHTS, pretrained.PACKAGE_SHA256)
    model = torch_model.PretrainedCNN(**{k: tuple(v) if isinstance(v, list) else v for k, v in margs.items()},
                                      net=net).eval()
    device = torch.device("cpu")
    meta = json.loads((repo / "exports/finetune/model.json").read_text())

    def features(images: np.ndarray) -> np.ndarray:
        with model.head_removed():
            return recipe.predict_logits(model, images, device, 64, False).numpy()

    train = formats.load_split(repo / "data/prepared", "train")
    classes = list(train.classes)
    held = np.stack([predict.load(p, meta) for photos in rest.values() for p in photos])
    labels = np.array([classes.index(cls) for cls, photos in rest.items() for _ in photos])
    fitted = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
    fitted.fit(features(train.images), train.labels)
    return float((fitted.predict(features(held)) == labels).mean())


def main() -> None:
    parser = folder_parser(__doc__)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=2026)
    args = parse_folder_args(parser)
    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as tmp:
        subset, repo = Path(tmp) / "photos", Path(tmp) / "repo"
        rest = draw(args.folder, args.per_class, args.seed, subset)
        repo.mkdir()
        copy_repo(repo)
        changed = parse_sets(args.set)
        set_params(repo, {"data.source": "folder", "data.folder": str(subset), **changed})
        done = subprocess.run(["dvc", "repro"], cwd=repo, env=bench_env(repo), capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"dvc repro failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
        said = [line for line in done.stdout.splitlines() if line.startswith(("finetune: head_l2", "train: "))]
        own = {m: json.loads((repo / f"dvclive/evaluate/{m}/metrics.json").read_text())["test"]["acc"]
               for m in ("scratch", "finetune")}
        held = {m: held_out_accuracy(repo / "exports" / m, rest) for m in ("scratch", "finetune")}
        probe = probe_baseline(repo, rest)
    n_rest = sum(len(p) for p in rest.values())
    lines = [
        f"- data: {args.per_class} photos per class of `{args.folder}` (seed {args.seed}); scored on the "
        f"{n_rest} photos left out; default params but `data.source` and `data.folder`"
        + "".join(f", `{change}`" for change in args.set),
        *(f"- the stages' choices: {line}" for line in said),
        "",
        "| model | its own test split | the held-out photos | held-out / probe's |",
        "|---|---|---|---|",
        *(f"| {m} | {own[m]:.4f} | {held[m]:.4f} | {held[m] / probe:.3f} |" for m in ("finetune", "scratch")),
        f"| linear probe (LogisticRegression C=1 on the backbone's features) | | {probe:.4f} | 1 |",
    ]
    report("Small photo sets: the recipe against a linear probe", lines, "transfer")


if __name__ == "__main__":
    main()
