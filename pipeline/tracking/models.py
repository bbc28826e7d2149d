"""The MLflow worker's model calls: an export logged as an MLflow model, and the Model
Registry's versions and alias. Only `tracking.worker` imports this (it imports MLflow).

- `log_model`: the export folder as a pyfunc model from code (`pipeline/serving/pyfunc.py`, the
  `pipeline` package copied beside it; ONNX file and model.json as artifacts), with its
  signature (class, probability, probabilities out; the input is `serving.contract`'s), an input
  example (a test image), exact pip requirements, and the given metrics linked to it.
- `register`: a version of a registered model for one logged model (the same ONNX file twice
  is one version), and the alias moved to it when it beats the version holding the alias on
  the selection metric; a champion chosen on another dataset or by another metric always
  gives way, as its score says nothing about this data.
"""

from __future__ import annotations

import shutil
import sys
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

PACKAGE = Path(__file__).resolve().parents[1]  # pipeline/
ONNX_TAG, DATASET_TAG = "pipeline.onnx_sha256", "dataset_sha256"
SELECT_TAG, SCORE_TAG = "pipeline.select_by", "pipeline.score"
REQUIREMENTS = ("mlflow", "onnxruntime", "numpy", "pandas", "pillow", "pyyaml")  # what serving/pyfunc.py imports


def say(message: str) -> None:
    print(f"mlflow: {message}", file=sys.stderr, flush=True)


def signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    # No input schema: MLflow would cast JSON's numbers to its dtype before the model sees them
    # (0.5 to 0) and answer a shape mismatch with the whole input; serving.contract checks instead
    return ModelSignature(
        inputs=None,
        outputs=Schema([ColSpec("string", "class"), ColSpec("double", "probability"),
                        ColSpec(Array("double"), "probabilities")]),
        params=ParamSchema([ParamSpec("calibrated", "boolean", False)]),
    )


def code_copy(scratch: Path) -> Path:
    """The pipeline package's Python files (no caches) in `scratch`, for the model to carry."""
    target = Path(scratch) / "code" / "pipeline"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(PACKAGE, target, ignore=lambda _, names: [n for n in names if n == "__pycache__"
                                                               or n.endswith((".pyc", ".pyo"))])
    return target


def log_model(mlflow: Any, export_dir: Path, example: np.ndarray, scratch: Path, tags: dict[str, str],
              linked: dict[str, float], dataset: Any = None) -> str:
    """Log `export_dir` as this run's MLflow model, named after `tags["model"]`; returns its id.
    Its source is the run's (the stage's file), not this worker's."""
    export_dir = Path(export_dir)
    run = mlflow.active_run()
    source = mlflow.get_run(run.info.run_id).data.tags.get("mlflow.source.name") if run else None
    tags = {**({"mlflow.source.name": source} if source else {}), **tags}
    with warnings.catch_warnings():  # MLflow asks for type hints on `predict`: the signature above says it all
        warnings.filterwarnings("ignore", message=".*type hints.*", category=UserWarning)
        info = mlflow.pyfunc.log_model(
            name=tags.get("model", "model"),
            python_model=str(PACKAGE / "serving" / "pyfunc.py"),
            artifacts={"onnx": str(export_dir / "model.onnx"), "card": str(export_dir / "model.json")},
            code_paths=[str(code_copy(scratch))],
            signature=signature(),
            input_example=example,
            pip_requirements=[f"{name}=={metadata.version(name)}" for name in REQUIREMENTS],
            tags=tags,
            model_type="image-classifier",
        )
    if linked:
        mlflow.log_metrics(linked, model_id=info.model_id, dataset=dataset)
    return info.model_id


def find_model(mlflow: Any, experiment_id: str, onnx_sha256: str) -> str | None:
    """The newest logged model of this ONNX file, if any."""
    found = mlflow.search_logged_models(
        experiment_ids=[experiment_id], filter_string=f"tags.`{ONNX_TAG}` = '{onnx_sha256}'", max_results=1,
        order_by=[{"field_name": "creation_time", "ascending": False}], output_format="list",
    )
    return found[0].model_id if found else None


def beats(new: dict, champion: Any | None) -> tuple[bool, str]:
    """Whether `new` ({'score', 'select_by', 'higher_is_better', 'dataset_sha256'}) takes the
    alias from `champion` (a ModelVersion, or None), and why."""
    if champion is None:
        return True, "no version held the alias"
    tags = champion.tags
    if tags.get(DATASET_TAG) != new["dataset_sha256"]:
        return True, f"version {champion.version} was chosen on another dataset"
    if tags.get(SELECT_TAG) != new["select_by"] or SCORE_TAG not in tags:
        return True, f"version {champion.version} was chosen by {tags.get(SELECT_TAG)!r}, not {new['select_by']!r}"
    old = float(tags[SCORE_TAG])
    better = new["score"] > old if new["higher_is_better"] else new["score"] < old
    verdict = "beats" if better else "does not beat"
    return better, f"{new['select_by']} {new['score']:.6g} {verdict} version {champion.version}'s {old:.6g}"


def register(mlflow: Any, client: Any, name: str, alias: str, model_id: str, new: dict) -> None:
    """Register `model_id` under `name` (reusing the version of the same ONNX file) and move
    `alias` to it when it beats the version holding it; say what happened."""
    from mlflow.exceptions import MlflowException

    if not client.search_registered_models(f"name = '{name}'"):
        about = "Image classifiers from the CNN pipeline: a pyfunc over the ONNX export, images in, probabilities out."
        client.create_registered_model(name, description=about)
    same = [v for v in client.search_model_versions(f"name = '{name}'") if v.tags.get(ONNX_TAG) == new["onnx_sha256"]]
    tags = {ONNX_TAG: new["onnx_sha256"], DATASET_TAG: new["dataset_sha256"], SELECT_TAG: new["select_by"],
            SCORE_TAG: repr(float(new["score"])), "model": new["model"]}
    if same:
        version = same[0]
    else:
        version = mlflow.register_model(f"models:/{model_id}", name, tags=tags)
    try:
        champion = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        champion = None
    if champion is not None and champion.version == version.version:
        say(f"{name} version {version.version} ({new['model']}) already holds @{alias}")
        return
    moved, why = beats(new, champion)
    if moved:
        client.set_registered_model_alias(name, alias, version.version)
    say(f"{name} version {version.version} ({new['model']}, {new['select_by']} {new['score']:.6g}): "
        f"{'now' if moved else 'not'} @{alias}: {why}")
