"""Pick the best exported model and register it in the MLflow Model Registry with an alias.

Reads, per model in `--models`: the metrics of the stage that trained it
(`dvclive/<train|finetune>/metrics.json`: the validation figures of the restored best epoch)
and its export folder (`exports/<model>/`, verified). The model with the best
`register.select_by` (validation accuracy by default, or validation loss; never a test
figure, which must stay an unbiased estimate) is registered as a version of
`register.model_name` (the same ONNX file is always the same version), and `register.alias`
moves to it when it beats the version holding the alias (`tracking.models.register`):
`mlflow models serve -m "models:/<model_name>@champion"` serves the best model so far.

Writes `dvclive/register/metrics.json` (each candidate's score) and `selection.json` (the
model chosen and why). Version numbers and whether the alias moved live in MLflow only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pipeline import cli, config, files
from pipeline.config import check
from pipeline.data import formats
from pipeline.errors import ArtifactError
from pipeline.tracking.run import stage_run

SELECTORS = {"val_acc": True, "val_loss": False}  # the training stages' best/<name>; True: higher is better


@dataclass(frozen=True)
class RegisterParams:
    model_name: str = "cnn-pipeline"  # the registered model
    alias: str = "champion"
    select_by: Literal["val_acc", "val_loss"] = "val_acc"

    def __post_init__(self) -> None:
        for key in ("model_name", "alias"):
            value = getattr(self, key)
            valid = re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", value)
            check(bool(valid), key, f"must be up to 100 letters, digits, '_', '.' or '-', got {value!r}")
        check(not re.fullmatch(r"v\d+|latest", self.alias), "alias", f"{self.alias!r} is reserved by MLflow")


def scores(models: list[str], curves: dict[str, dict], select_by: str) -> dict[str, float]:
    """Each model's `select_by` from its training metrics (`best/<select_by>`)."""
    out = {}
    for m in models:
        value = curves[m].get("best", {}).get(select_by)
        if not isinstance(value, int | float):
            raise ArtifactError(f"dvclive/{cli.PRODUCERS.get(m, m)}/metrics.json: no best/{select_by} for {m}; "
                                "rerun its training stage")
        out[m] = float(value)
    return out


def choose(found: dict[str, float], higher_is_better: bool) -> str:
    """The best model; on a tie, the first listed (`--models` order)."""
    best = max if higher_is_better else min
    target = best(found.values())
    return next(m for m, v in found.items() if v == target)


def main(argv: list[str] | None = None) -> None:
    args = cli.parse(argv, __doc__, ("--models", {"nargs": "+", "default": ["scratch", "finetune"]}),
                     cli.path("--data", "data/prepared"), cli.path("--exports", "exports"),
                     cli.path("--curves", "dvclive"), cli.path("--live", "dvclive/register"))
    p = config.load("register", RegisterParams)
    curves = {m: formats.read_json(args.curves / cli.PRODUCERS.get(m, m) / "metrics.json", f"{m}'s training metrics")
              for m in args.models}
    found = scores(args.models, curves, p.select_by)
    chosen = choose(found, SELECTORS[p.select_by])
    export_dir = args.exports / chosen
    files.verify_folder(export_dir, f"export@{chosen}")
    test = formats.load_split(args.data, "test")
    tags = formats.dataset_tags(args.data)
    with stage_run("register", {"register": p, "models": list(args.models)}, args.live) as run:
        run.set_tags({**tags, "chosen": chosen, "registered_model": p.model_name})
        run.log_summary({f"{m}/{p.select_by}": v for m, v in found.items()})
        candidate = {"model": chosen, "score": found[chosen], "select_by": p.select_by,
                     "higher_is_better": SELECTORS[p.select_by], "dataset_sha256": tags["dataset_sha256"],
                     "onnx_sha256": files.sha256_file(export_dir / "model.onnx")}
        files.write_json(run.live_dir / "selection.json", {
            "model": chosen, "select_by": p.select_by, "score": found[chosen], "registered_model": p.model_name,
            "alias": p.alias, "onnx_sha256": candidate["onnx_sha256"]})
        print(f"register: {chosen} ({p.select_by} {found[chosen]:.4f}) -> {p.model_name}")
        run.register_model(p.model_name, p.alias, candidate, export_dir, test.images[:1],
                           {"model": chosen, **tags, "pipeline.onnx_sha256": candidate["onnx_sha256"]})


if __name__ == "__main__":
    main()
