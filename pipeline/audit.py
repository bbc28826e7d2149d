"""Audit the data: label issues, outliers and poor images in every split, for a person to act on.

Reads the prepared splits (`data/prepared`) and the pretrained backbone the fine-tune starts
from. The backbone's pooled features of every image (train, val and test, unaugmented) are
computed once and kept (`data/audit/features.npy`); a linear probe on them, fitted in
`folds` stratified folds over all images, gives each image class probabilities from a model
that never saw it (`probe.out_of_fold`). `pipeline.evaluation.audit` turns those into label
issues (cleanlab), the features into outliers (distance to the nearest class mean) and the
pixels into poor images.
Writes `data/audit/`: `issues.csv` (path, split, index, kind, score, given and suggested label),
`proposal.csv` (the flagged images in the exclude file's format, to copy into
`data/review/exclude.csv` after a look), `applied.csv` (what training applies on its own:
nothing unless `apply` is drop or relabel); `reports/audit.md` with galleries in
`reports/audit/`; the counts and the estimated noise rate in `dvclive/audit/`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from pipeline import cli, config, files
from pipeline.config import check
from pipeline.data import formats, review
from pipeline.evaluation import audit, audit_report
from pipeline.frameworks import shapes
from pipeline.frameworks.interface import RuntimeParams
from pipeline.frameworks.torch import model as torch_model
from pipeline.frameworks.torch import probe, transfer
from pipeline.frameworks.torch import weights as pretrained
from pipeline.frameworks.torch.backend import TorchBackend
from pipeline.tracking.run import stage_run


@dataclass(frozen=True)
class AuditParams:
    folds: int = 5  # out-of-fold probabilities: each image scored by a probe fitted on the other folds
    backbone: str = pretrained.PACKAGE_BACKBONE  # the features' backbone: the fine-tune's by default
    weights: str = pretrained.PACKAGE_WEIGHTS
    weights_sha256: str = pretrained.PACKAGE_SHA256
    input_size: int | Literal["auto"] = "auto"  # auto: as finetune.input_size auto
    batch_size: int = 256
    # cleanlab's rule; prune_by_class: on 5% flipped digits recall 0.96 at precision 0.88, where
    # prune_by_noise_rate found 0.89 at 0.86; the same on two classes (docs/benchmarks.md#audit)
    filter_by: Literal["prune_by_noise_rate", "prune_by_class", "both", "confident_learning"] = "prune_by_class"
    # an outlier's distance to the nearest class mean is beyond Q3 + this x IQR (Tukey's "far out")
    outlier_fence: float = 3.0
    gallery_images: int = 16  # shown per gallery of the report
    # what training (train, finetune, crossval) applies on its own to flagged train and val
    # images: none; drop (every flagged one); relabel (label issues take the suggested label)
    apply: Literal["none", "drop", "relabel"] = "none"

    def __post_init__(self) -> None:
        check(2 <= self.folds <= 20, "folds", f"must be in 2..20, got {self.folds}")
        size = self.input_size
        check(size == "auto" or 16 <= size <= 1024, "input_size", f"must be 'auto' or in 16..1024, got {size}")
        check(self.outlier_fence > 0, "outlier_fence", f"must be > 0, got {self.outlier_fence}")
        torch_model.parse_backbone(self.backbone)


def load_all(prepared) -> tuple[list[formats.Split], pd.DataFrame]:
    """Every split, in SPLITS order, and their manifest rows in that order."""
    splits = [formats.load_split(prepared, s) for s in formats.SPLITS]
    manifest = formats.read_manifest(prepared / "manifest.csv")
    order = {s: i for i, s in enumerate(formats.SPLITS)}
    rows = manifest.assign(_o=manifest["split"].map(order)).sort_values(["_o", "index"], kind="stable")
    return splits, rows.drop(columns="_o").reset_index(drop=True)


def features_of(p: AuditParams, splits: list[formats.Split], device, prepared) -> tuple[np.ndarray, dict]:
    """Every split's pooled features, split by split as finetune's phase 1 computes them (so
    that it can take them: `transfer.cached_features`), and their key."""
    net, sha256 = pretrained.load_pretrained(p.backbone, p.weights, p.weights_sha256)
    side, channels = splits[0].image_size, splits[0].channels
    size = shapes.pretrained_input_size(side, torch_model.pretrained_resolution(net), channels)
    margs = {"backbone": p.backbone, "num_classes": splits[0].num_classes, "in_channels": channels,
             "image_size": side, "input_size": size if p.input_size == "auto" else p.input_size,
             "mean": torch_model.IMAGENET_MEAN, "std": torch_model.IMAGENET_STD}
    model = torch_model.PretrainedCNN(**margs, net=net)
    features = transfer.pooled_features(model, [s.images for s in splits], device, p.batch_size)
    key = transfer.features_key(margs, sha256, p.batch_size, True, prepared)
    return np.concatenate([f.numpy() for f in features]), key


def issues_table(rows: pd.DataFrame, labels: audit.Labels, outlier: tuple, poor: dict, classes) -> pd.DataFrame:
    """One row per (image, issue kind) flagged, the most certain first within each kind."""
    found = {"label_issue": (labels.flagged, labels.quality), "outlier": outlier, **poor}
    tables = []
    for kind in audit.KINDS:
        flagged, score = found[kind]
        where = np.flatnonzero(flagged)
        # label quality, contrast, darkness and sharpness: lower is worse; the rest: higher
        order = where[np.argsort(score[where] if kind not in ("outlier", "bright", "odd_aspect") else -score[where],
                                 kind="stable")]
        tables.append(pd.DataFrame({
            "path": rows["path"].to_numpy()[order], "split": rows["split"].to_numpy()[order],
            "index": rows["index"].to_numpy()[order], "kind": kind, "score": np.round(score[order], 6),
            "given_label": [classes[i] for i in rows["label_index"].to_numpy()[order]],
            "suggested_label": [classes[i] if kind == "label_issue" else "" for i in labels.suggested[order]],
        }))
    return pd.concat(tables, ignore_index=True)


def proposal(issues: pd.DataFrame) -> list[tuple[str, str, str, str]]:
    """The flagged images as exclude-file rows: relabel a label issue, drop the rest; one per path."""
    out, seen = [], set()
    for r in issues.itertuples():
        if r.path in seen:
            continue
        seen.add(r.path)
        if r.kind == "label_issue":
            why = f"label issue: given {r.given_label}, quality {r.score:.3f}"
            out.append((r.path, "relabel", r.suggested_label, why))
        else:
            out.append((r.path, "drop", "", f"{r.kind} (score {r.score:.3g})"))
    return out


def applied(issues: pd.DataFrame, how: str, classes) -> pd.DataFrame:
    """What training applies to its train and val images: nothing for `none`."""
    columns = ["path", "split", "index", "action", "label"]
    train_val = issues[issues["split"].isin(["train", "val"])]
    if how == "drop":
        chosen = train_val.drop_duplicates("path").assign(action="drop", label="")
    elif how == "relabel":
        chosen = train_val[train_val["kind"] == "label_issue"].assign(
            action="relabel", label=lambda t: [str(classes.index(c)) for c in t["suggested_label"]])
    else:
        chosen = pd.DataFrame(columns=columns)
    return chosen[columns].sort_values(["split", "index"], kind="stable")


def main(argv: list[str] | None = None) -> None:
    args = cli.parse(argv, __doc__, cli.path("--data", "data/prepared"), cli.path("--out", "data/audit"),
                     cli.path("--report", "reports"), cli.path("--live", "dvclive/audit"))
    p = config.load("audit", AuditParams)
    rt = config.load("runtime", RuntimeParams)
    files.verify_folder(args.data, "prepare")
    backend = TorchBackend(rt, 0)  # threads and deterministic kernels: the features' bytes
    splits, rows = load_all(args.data)
    images, labels = np.concatenate([np.asarray(s.images) for s in splits]), np.concatenate([s.labels for s in splits])
    classes = splits[0].classes
    rows["label_index"] = labels
    with stage_run("audit", {"audit": p, "runtime": rt}, live_dir=args.live) as run:
        started = time.perf_counter()
        features, key = features_of(p, splits, backend.device, args.data)
        timing = {"features_seconds": time.perf_counter() - started}
        k = min(p.folds, int(np.bincount(labels, minlength=len(classes)).min()))
        small = splits[0].image_size < shapes.PHOTO_SIZE  # strokes, not photos: their pixels say more
        probs, l2 = probe.out_of_fold(audit.with_pixels(features, images) if small else features, labels,
                                      len(classes), k)
        timing["probe_seconds"] = time.perf_counter() - started - sum(timing.values())
        found = audit.label_issues(labels, probs, p.filter_by)
        outlier = audit.outliers(features, labels, len(classes), p.outlier_fence)
        timing["cleanlab_seconds"] = time.perf_counter() - started - sum(timing.values())
        poor = audit.poor_images(images, rows["width"].to_numpy(float), rows["height"].to_numpy(float))
        issues = issues_table(rows, found, outlier, poor, classes)
        with files.atomic_dir(args.out) as tmp:
            np.save(tmp / "features.npy", features)
            files.write_json(tmp / "features.json", {"key": key, "splits": {
                name: len(s) for name, s in zip(formats.SPLITS, splits, strict=True)}})
            formats.write_table(tmp / "issues.csv", issues)
            review.write_changes(tmp / "proposal.csv", proposal(issues))
            formats.write_table(tmp / "applied.csv", applied(issues, p.apply, list(classes)))
        flagged_test = issues.loc[issues["split"] == "test", "path"].nunique()
        summary = {"images": len(labels), "flagged_images": int(issues["path"].nunique()),
                   "estimated_noise_rate": round(found.noise_rate, 6),
                   "probe_out_of_fold_acc": float((probs.argmax(1) == labels).mean()),
                   "flagged_test_images": int(flagged_test),
                   **{f"issues/{kind}": int((issues["kind"] == kind).sum()) for kind in audit.KINDS}}
        run.log_summary(summary)
        reads = f"the features of `{p.backbone}`" + (" and the pixels" if small else "")
        run.log_choices({"folds": k, "probe_l2": f"{l2:.3g}", "probe_reads": reads})
        audit_report.write(args.report, issues, images, rows, summary, p, classes, reads)
        run.log_timing({**timing, "audit_seconds": time.perf_counter() - started})
        print("audit: " + ", ".join(f"{k} {v:.1f}" for k, v in timing.items()))
        run.log_artifact(args.out / "issues.csv", "audit")
        run.log_artifact(args.out / "proposal.csv", "audit")
        run.log_artifact(args.report / "audit.md", "audit")
        run.log_artifact(args.report / "audit", "audit/audit")
        print(f"audit: {summary['flagged_images']} of {len(labels)} images flagged: "
              + ", ".join(f"{summary[f'issues/{k}']} {k}" for k in audit.KINDS if summary[f"issues/{k}"])
              + f"; estimated label noise {found.noise_rate:.1%}; see {args.report / 'audit.md'}")


if __name__ == "__main__":
    main()
