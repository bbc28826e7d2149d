"""train, finetune, evaluate and export as DVC runs them, on tiny settings."""

import json
import os
import shutil
import sys
import zipfile

import mlflow
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from PIL import Image
from support import run

from pipeline import crossval, evaluate, export, files, finetune, train
from pipeline.data import formats, images
from pipeline.data.sources import standard
from pipeline.errors import ArtifactError
from pipeline.frameworks import card
from pipeline.frameworks.torch import checkpoint, weights


def test_train_stage_writes_checkpoint_metrics_and_curves_and_repeats_them_exactly(workdir, prepared):
    for name in ("a", "b"):
        train.main(["--data", str(prepared), "--out", f"{name}/scratch", "--live", f"{name}/live"])
    for file in ("model.pt", "model.json"):
        assert (workdir / "a/scratch" / file).read_bytes() == (workdir / "b/scratch" / file).read_bytes(), file
    assert (workdir / "a/live/metrics.json").read_bytes() == (workdir / "b/live/metrics.json").read_bytes()
    metrics = json.loads((workdir / "a/live/metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and 0 <= metrics["best"]["epoch"] <= 1
    curve = (workdir / "a/live/plots/metrics/val/loss.tsv").read_text().splitlines()
    assert curve[0] == "step\tloss" and len(curve) == 3
    model, ckpt = checkpoint.load_checkpoint(workdir / "a/scratch/model.pt")
    assert ckpt["classes"] == [str(i) for i in range(10)] and ckpt["arch"] == "scratch_cnn"
    model_card = card.read_card(workdir / "a/scratch")
    assert (model_card.framework, model_card.arch, list(model_card.classes)) == (
        "torch", "scratch_cnn", ckpt["classes"],
    )
    assert "tensorflow" not in sys.modules  # the torch path never pays for TensorFlow's import


def test_finetune_stage_repeats_exactly_and_logs_both_phases(workdir, prepared, mlflow_store):
    for name in ("a", "b"):
        finetune.main(["--data", str(prepared), "--out", f"{name}/finetune", "--live", f"{name}/live"])
    assert (workdir / "a/finetune/model.pt").read_bytes() == (workdir / "b/finetune/model.pt").read_bytes()
    curve = (workdir / "a/live/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert len(curve) == 1 + 2  # head epoch + one unfrozen epoch, one curve
    client = mlflow.MlflowClient(mlflow_store)
    runs = client.search_runs([client.get_experiment_by_name("cnn-pipeline").experiment_id], "tags.stage LIKE '%'")
    assert {r.data.tags["weights_sha256"] for r in runs} == {weights.PACKAGE_SHA256}
    dataset = json.loads((prepared / "dataset.json").read_text())
    tagged = {(r.data.tags["dataset_sha256"], r.data.tags["data_source"]) for r in runs}
    assert tagged == {(dataset["sha256"], "digits")}
    assert all(r.data.params["finetune.backbone"] == "timm:tf_efficientnet_lite0" for r in runs)


def test_evaluate_reports_metrics_per_class_figures_and_a_confusion_plot(workdir, trained, mlflow_store):
    evaluate.main([
        "--model", "scratch", "--data", str(trained / "data/prepared"), "--models", str(trained / "models"),
        "--live", "live",
    ])
    written = json.loads((workdir / "live/metrics.json").read_text())
    metrics = written["test"]
    assert set(metrics) == {"acc", "top_k_acc", "top_k", "balanced_acc", "precision_macro", "recall_macro",
                            "f1_macro", "loss", "ece", "images", "roc_auc_macro"}
    assert metrics["top_k"] == 5 and metrics["top_k_acc"] >= metrics["acc"]
    assert set(written["calibrated"]) == {"temperature", "ece", "loss"} and written["model"]["parameters"] > 0
    calibration = json.loads((workdir / "live/calibration.json").read_text())
    assert calibration["temperature"] == written["calibrated"]["temperature"] and calibration["fitted_on"] == "val"
    confusion = json.loads((workdir / "live/confusion.json").read_text())
    assert sum(map(sum, confusion["counts"])) == metrics["images"]
    images = {p.name for p in (workdir / "live/plots/images").iterdir()}
    assert images == {"reliability.png", "gradcam.png", "errors.png", "confusion_counts.png",
                      "confusion_normalised.png"}
    assert metrics["images"] == len(formats.load_split(trained / "data/prepared", "test"))
    per_class = json.loads((workdir / "live/per_class.json").read_text())
    assert sorted(per_class) == [str(i) for i in range(10)]
    assert sum(c["support"] for c in per_class.values()) == metrics["images"]
    rows = json.loads((workdir / "live/plots/sklearn/confusion_matrix.json").read_text())
    assert len(rows) == metrics["images"] and set(rows[0]) == {"actual", "predicted"}
    client = mlflow.MlflowClient(mlflow_store)
    (run,) = client.search_runs([client.get_experiment_by_name("cnn-pipeline").experiment_id], "tags.stage LIKE '%'")
    assert run.info.run_name == "evaluate@scratch"
    assert run.data.tags["dataset_sha256"] == json.loads((trained / "data/prepared/dataset.json").read_text())["sha256"]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"plots", "per_class.json", "calibration.json"}
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots >= {"plots/gradcam.png", "plots/errors.png", "plots/reliability.png"}
    assert run.data.tags["framework"] == "torch" and "tensorflow" not in sys.modules


def test_classification_metrics_match_hand_computed_values():
    labels = np.array([0, 0, 1, 1])
    proba = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.3, 0.7]])
    summary, per_class = evaluate.classification_metrics(labels, proba, ("cat", "dog"))
    assert summary["test/acc"] == 0.75
    assert per_class["cat"]["recall"] == 0.5 and per_class["dog"]["precision"] == pytest.approx(2 / 3, abs=1e-6)
    assert summary["test/loss"] == pytest.approx(-np.mean(np.log([0.9, 0.4, 0.8, 0.7])))


def test_a_model_trained_on_other_classes_is_refused(workdir, trained):
    other = workdir / "prepared"
    shutil.copytree(trained / "data/prepared", other)
    (other / "classes.json").write_text(json.dumps([f"c{i}" for i in range(10)]))
    files.write_checksums(other)  # a consistent folder of other data, not a damaged one
    with pytest.raises(
        formats.DataError, match=r"models/scratch was trained on classes \['0'.*classes.json lists \['c0'",
    ):
        evaluate.main(
            ["--model", "scratch", "--data", str(other), "--models", str(trained / "models"), "--live", "live"],
        )


def export_file(name: str) -> str:
    return {"torchscript": "model.torchscript.pt", "onnx": "model.onnx", "onnx_int8": "model_int8.onnx"}[name]


@pytest.mark.parametrize("model", ["scratch", "finetune"])
def test_export_ships_onnx_and_torchscript_that_agree_with_pytorch(workdir, trained, model, repo_root):
    prepared = trained / "data/prepared"
    export.main([
        "--model", model, "--data", str(prepared), "--models", str(trained / "models"), "--out", "out",
        "--live", "live", "--evaluation", str(trained / "dvclive/evaluate" / model),
    ])
    parity = json.loads((workdir / "live/metrics.json").read_text())
    assert parity["onnx"]["top1_agreement"] == 1.0 and parity["onnx"]["max_abs_diff"] < 1e-4
    assert set(parity) == {"torchscript", "onnx", "onnx_int8"}
    for name, result in parity.items():  # each format's own test accuracy and size on disk
        assert 0 < result["test_acc"] <= 1 and result["bytes"] == (workdir / "out" / export_file(name)).stat().st_size
    if model == "scratch":  # trained enough for the default int8 gate (the fine-tune here is near chance)
        assert parity["onnx_int8"]["top1_agreement"] >= 0.98 and parity["onnx_int8"]["max_abs_diff"] < 0.25
    assert parity["onnx_int8"]["bytes"] < parity["onnx"]["bytes"] / 3
    meta = json.loads((workdir / "out/model.json").read_text())
    assert meta["classes"] == [str(i) for i in range(10)]
    fitted = json.loads((trained / "dvclive/evaluate" / model / "calibration.json").read_text())["temperature"]
    assert meta["calibration"]["temperature"] == fitted != 1.0  # evaluate's, for serving to apply

    # A consumer needs nothing from this repository: the ONNX file carries classes and input format.
    onnx_model = onnx.load(str(workdir / "out/model.onnx"))
    embedded = {p.key: json.loads(p.value) for p in onnx_model.metadata_props}
    assert embedded["classes"] == meta["classes"] and embedded["input"]["layout"] == "NCHW"
    test = formats.load_split(prepared, "test")
    x = np.array(test.images[:7]).transpose(0, 3, 1, 2).astype(np.float32) / 255
    session = ort.InferenceSession(str(workdir / "out/model.onnx"), providers=["CPUExecutionProvider"])
    proba = session.run(None, {"image": x})[0]  # a batch size the export never saw
    assert proba.shape == (7, 10) and np.allclose(proba.sum(1), 1, atol=1e-5)

    # nothing in the archive depends on where the repository or the venv lives
    with zipfile.ZipFile(workdir / "out/model.torchscript.pt") as archive:
        names = archive.namelist()
        assert not [n for n in names if n.endswith(".debug_pkl")]
        assert not any(
            str(repo_root).encode() in archive.read(n) or sys.prefix.encode() in archive.read(n) for n in names
        )
    assert str(repo_root).encode() not in (workdir / "out/model.onnx").read_bytes()
    assert "tensorflow" not in sys.modules

    extra = {"model.json": ""}
    scripted = torch.jit.load(str(workdir / "out/model.torchscript.pt"), _extra_files=extra)
    assert json.loads(extra["model.json"])["classes"] == meta["classes"]
    with torch.no_grad():
        assert np.allclose(scripted(torch.from_numpy(x)).numpy(), proba, atol=1e-5)

    # A new image file, read as model.json says, is exactly the array the model was tested on.
    pre = meta["preprocessing"]
    manifest = formats.read_manifest(prepared / "manifest.csv", ("path", "split", "index"))
    row = manifest[manifest["split"] == "test"].iloc[3]
    digit = standard.read_array_dataset("digits", None).splits[""][0][int(row["path"])]
    Image.fromarray(digit).convert("LA").save(workdir / "new.png")  # another mode, the same pixels
    served = images.load_for_model(workdir / "new.png", pre["image_size"], pre["channels"], pre["resize"])
    assert np.array_equal(served, test.images[row["index"]])


def test_export_is_byte_identical_on_rerun(workdir, trained, repo_root):
    # Two processes, as DVC runs it: within one process TorchScript renames a class it has
    # compiled before, so only a fresh process shows what a rerun writes.
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    for name in ("a", "b"):
        run([sys.executable, "-m", "pipeline", "export", "--model", "finetune",
             "--data", str(trained / "data/prepared"), "--models", str(trained / "models"), "--out", name,
             "--live", f"live-{name}", "--evaluation", str(trained / "dvclive/evaluate/finetune")],
            cwd=workdir, env=env)
    for file in ("model.onnx", "model.torchscript.pt", "model.json"):
        assert (workdir / "a" / file).read_bytes() == (workdir / "b" / file).read_bytes(), file
    assert (workdir / "live-a/metrics.json").read_bytes() == (workdir / "live-b/metrics.json").read_bytes()


def test_an_export_that_drifts_from_pytorch_is_refused():
    p = export.ExportParams(max_abs_diff=1.0e-6, min_top1_agreement=1.0)
    export.check_parity("onnx", {"max_abs_diff": 1.0e-7, "top1_agreement": 1.0}, p, "models/m")
    with pytest.raises(
        export.ExportMismatch, match=r"onnx export of models/m disagrees with the torch model.*max_abs_diff 1e-06",
    ):
        export.check_parity("onnx", {"max_abs_diff": 1.0e-3, "top1_agreement": 1.0}, p, "models/m")
    with pytest.raises(export.ExportMismatch, match="min_top1_agreement 1.0"):
        export.check_parity("onnx", {"max_abs_diff": 0.0, "top1_agreement": 0.99}, p, "models/m")
    # quantised formats answer to the int8 thresholds, looser by design, and only to them
    q = export.ExportParams(int8_max_abs_diff=0.05, int8_min_top1_agreement=0.98)
    export.check_parity("tflite_int8", {"max_abs_diff": 0.03, "top1_agreement": 0.99}, q, "models/m", "keras")
    with pytest.raises(export.ExportMismatch, match=r"tflite_int8 export .* keras model.*int8_max_abs_diff 0.05"):
        export.check_parity("tflite_int8", {"max_abs_diff": 0.06, "top1_agreement": 1.0}, q, "models/m", "keras")
    with pytest.raises(export.ExportMismatch, match=r"allowed: max_abs_diff 0.0001"):
        export.check_parity("tflite", {"max_abs_diff": 0.03, "top1_agreement": 1.0}, q, "models/m", "keras")
    # past its gate an int8 file is withheld, named with the reason; a float file still stops the stage
    good, moved = {"max_abs_diff": 1e-5, "top1_agreement": 1.0}, {"max_abs_diff": 0.41, "top1_agreement": 0.99}
    withheld = export.gate({"onnx": good, "onnx_int8": moved}, q, "models/m", "torch")
    assert list(withheld) == ["onnx_int8"] and "int8_max_abs_diff 0.05" in withheld["onnx_int8"]
    with pytest.raises(export.ExportMismatch, match="onnx export of models/m"):
        export.gate({"onnx": moved, "onnx_int8": good}, q, "models/m", "torch")


def test_an_int8_file_past_its_gate_is_withheld_and_the_float_files_ship(workdir, trained, capsys):
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["export"]["int8_max_abs_diff"] = 1e-9  # no int8 file moves its probabilities this little
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    export.main([
        "--model", "scratch", "--data", str(trained / "data/prepared"), "--models", str(trained / "models"),
        "--out", "out", "--live", "live", "--evaluation", str(trained / "dvclive/evaluate/scratch"),
    ])
    parity = json.loads((workdir / "live/metrics.json").read_text())
    assert parity["onnx_int8"]["shipped"] == 0 and parity["onnx"]["shipped"] == parity["torchscript"]["shipped"] == 1
    assert parity["onnx_int8"]["max_abs_diff"] > 1e-9  # its figures kept beside the verdict
    assert not (workdir / "out/model_int8.onnx").exists() and (workdir / "out/model.onnx").is_file()
    assert "export@scratch: onnx_int8 withheld, not shipped: onnx_int8 export of" in capsys.readouterr().out


def test_a_model_folder_is_checked_before_any_framework_loads(tmp_path):
    with pytest.raises(
        ArtifactError, match=r"model.json: not found; .*not a trained model folder.*old single-file layout",
    ):
        (tmp_path / "scratch.pt").write_bytes(b"")
        card.read_card(tmp_path / "scratch")
    (tmp_path / "m").mkdir()
    (tmp_path / "m/model.json").write_text(
        json.dumps({"framework": "jax", "arch": "a", "model_args": {}, "classes": []}),
    )
    with pytest.raises(ArtifactError, match=r"framework 'jax' is not known; valid: \['torch', 'keras'\]"):
        card.read_card(tmp_path / "m")


def test_a_refused_export_leaves_the_previous_one_whole(workdir, trained):
    args = [
        "--model", "scratch", "--data", str(trained / "data/prepared"), "--models", str(trained / "models"),
        "--out", "out", "--live", "live", "--evaluation", str(trained / "dvclive/evaluate/scratch"),
    ]
    export.main(args)
    before = {p.name: p.read_bytes() for p in (workdir / "out").iterdir()}
    params = (workdir / "params.yaml").read_text().replace("export: {", "export: {max_abs_diff: 1.0e-12, ")
    (workdir / "params.yaml").write_text(params)
    with pytest.raises(export.ExportMismatch, match=r"export of .*models/scratch disagrees with the torch model"):
        export.main(args)
    assert {p.name: p.read_bytes() for p in (workdir / "out").iterdir()} == before
    assert not [p for p in workdir.iterdir() if p.name.startswith(".out.")]  # no temporary folder left behind


def test_crossval_trains_each_fold_and_reports_mean_and_spread(workdir, prepared, mlflow_store):
    """Three stratified folds of train + val on the tiny params: a child MLflow run per fold
    under one `crossval` run, and the summary equal to the folds' own figures."""
    params = (workdir / "params.yaml").read_text().replace("crossval: {folds: 0}", "crossval: {folds: 3, seed: 0}")
    (workdir / "params.yaml").write_text(params)
    crossval.main(["--data", str(prepared), "--live", "live"])
    summary = json.loads((workdir / "live/metrics.json").read_text())
    folds = json.loads((workdir / "live/folds.json").read_text())
    assert summary["folds"] == 3 and [f["fold"] for f in folds] == [0, 1, 2]
    accuracies = [f["val_acc"] for f in folds]
    assert summary["val_acc_mean"] == pytest.approx(np.mean(accuracies))
    assert summary["val_acc_std"] == pytest.approx(np.std(accuracies))
    train, val = (formats.load_split(prepared, s) for s in ("train", "val"))
    assert sum(f["val_images"] for f in folds) == len(train) + len(val)  # every image held out once
    client = mlflow.MlflowClient(mlflow_store)
    runs = client.search_runs([client.get_experiment_by_name("cnn-pipeline").experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "crossval"]
    children = sorted(r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id)
    assert children == ["crossval/fold0", "crossval/fold1", "crossval/fold2"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert parent.data.metrics["val_acc_mean"] == pytest.approx(summary["val_acc_mean"])
    crossval.main(["--data", str(prepared), "--live", "again"])  # deterministic, like train
    assert (workdir / "again/folds.json").read_bytes() == (workdir / "live/folds.json").read_bytes()


def test_crossval_is_off_by_default_and_refuses_folds_a_class_cannot_fill(workdir, prepared):
    crossval.main(["--data", str(prepared), "--live", "live"])
    assert json.loads((workdir / "live/metrics.json").read_text()) == {"folds": 0}
    with pytest.raises(formats.DataError, match=r"crossval.folds=5, but a class has only 2"):
        crossval.fold_indices(np.array([0, 0, 1, 1, 1, 1, 1]), 5, 0)
