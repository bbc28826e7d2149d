"""The real dvc.yaml, end to end, in a temporary copy of the repository (slow)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from support import copy_project, digit_folder, run

from pipeline.experiments import dvc_queue

# `make e2e` runs pytest -n 2 --dist loadgroup: the tests on tmp_repo are one xdist group, so one
# worker builds it once (about 2 min); the other runs the DVC faults' group and the photos test,
# about 80% as long (docs/benchmarks.md#test-suites). Two groups on tmp_repo would build it twice.
pytestmark = [pytest.mark.slow, pytest.mark.e2e]
ON_REPO = pytest.mark.xdist_group("repo")


@pytest.fixture(scope="session")  # a module fixture is rebuilt each time a worker comes back to the module
def tmp_repo(tmp_path_factory, _migrated_store) -> tuple[Path, dict]:
    """A git + DVC repository holding this project's tracked files and the tiny params, with
    one `dvc repro` committed: every test here starts from it, in any order or alone."""
    repo = tmp_path_factory.mktemp("repo")
    env = copy_project(repo, _migrated_store)
    for cmd in (["dvc", "repro"], ["git", "add", "-A"], ["git", "commit", "-qm", "default run"]):
        run(cmd, repo, env)
    return repo, env


def mlflow_runs(repo: Path) -> list:
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cnn-pipeline")
    # stage runs, not the parent runs that group them
    return client.search_runs([experiment.experiment_id], "tags.stage LIKE '%'", max_results=1000) if experiment else []


def stages_in_git(repo: Path) -> set[str]:
    """The stages whose outputs are all `cache: false`: git holds them, so a clone skips these
    stages and reruns every other one."""
    from dvc.repo import Repo

    with Repo(str(repo)) as project:
        return {s.name for s in project.index.stages if s.outs and not any(o.use_cache for o in s.outs)}


@ON_REPO
def test_forced_stages_give_an_identical_lock_and_then_there_is_nothing_to_do(tmp_repo):
    """Rerun byte-identically: the stages a clone skips are forced here; the clone test reruns
    the others in another folder and checks the same lock (one full rerun, not two)."""
    repo, env = tmp_repo
    first = run(["git", "show", "HEAD:dvc.lock"], repo, env).stdout  # the fixture's committed run
    for out in ("models/scratch/model.pt", "models/finetune/model.pt", "exports/scratch/model.onnx",
                "exports/finetune/model.torchscript.pt",
                "dvclive/evaluate/finetune/plots/sklearn/confusion_matrix.json", "data/prepared/classes.json",
                "dvclive/evaluate/scratch/plots/images/gradcam.png", "reports/report.md",
                "reports/images/finetune_reliability.png", "dvclive/crossval/metrics.json"):
        assert (repo / out).is_file(), out

    forced = stages_in_git(repo)
    assert forced == {"crossval", "evaluate@scratch", "evaluate@finetune", "register", "report"}, forced
    run(["dvc", "repro", "-f", "-s", *sorted(forced)], repo, env)
    assert (repo / "dvc.lock").read_text() == first  # every metric, plot and report hash

    status = run(["dvc", "status"], repo, env).stdout
    # everything up to date; the sync stage is always_changed, and DVC says so
    assert status.split() == ["sync:", "always", "changed"], status
    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], repo, env).stdout)
    (workspace,) = [rev["data"] for rev in metrics.values()]  # one revision: the workspace
    assert "test" in workspace["dvclive/evaluate/scratch/metrics.json"]["data"]
    # the audit's counts, and the test accuracy without the images it flagged beside the plain one
    assert "estimated_noise_rate" in workspace["dvclive/audit/metrics.json"]["data"]
    assert "acc_unflagged" in workspace["dvclive/evaluate/finetune/metrics.json"]["data"]["test"]
    assert (repo / "reports/audit.md").is_file() and (repo / "data/audit/proposal.csv").is_file()
    side_by_side = workspace["dvclive/report/metrics.json"]["data"]
    assert set(side_by_side) == {"scratch", "finetune"} and side_by_side["scratch"]["test_acc"] > 0
    plots = run(["dvc", "plots", "show", "--json"], repo, env).stdout
    assert "Scratch CNN loss" in plots and "confusion" in plots and "Reliability" in plots and "gradcam.png" in plots
    report = (repo / "reports/report.md").read_text()
    assert "| test accuracy |" in report and "(images/scratch_gradcam.png)" in report
    # every stage reported to the store in the repository root, each run tagged with its stage
    stages = {r.data.tags["stage"] for r in mlflow_runs(repo)}
    assert stages == {
        "ingest", "prepare", "audit", "train", "crossval", "finetune",
        "evaluate@scratch", "evaluate@finetune", "export@scratch", "export@finetune", "register", "report",
    }
    # the model register chose holds the alias in the store's registry; the rerun added no version
    selection = json.loads((repo / "dvclive/register/selection.json").read_text())
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("cnn-pipeline", "champion")
    assert champion.tags["model"] == selection["model"] and champion.tags["pipeline.select_by"] == "val_acc"
    assert len(client.search_model_versions("name = 'cnn-pipeline'")) == 1


def assert_store_mirrors_the_lock(repo: Path) -> tuple[list, list]:
    """The clone's default store holds a FINISHED run for every stage dvc.lock records, evaluate's
    metrics on both logged models, a champion that classifies an image, and a parent with every
    model's headline figures; returns the stage runs and the parents."""
    from pipeline import sync
    from pipeline.tracking import lockfile

    uri = f"sqlite:///{repo / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment_id = client.get_experiment_by_name("cnn-pipeline").experiment_id
    runs = client.search_runs([experiment_id], "attributes.status = 'FINISHED'", max_results=1000)
    by_digest = {r.data.tags.get(lockfile.LOCK_TAG): r for r in runs}
    for stage, entry in lockfile.stages(repo, skip=sync.STAGE).items():
        assert by_digest[lockfile.digest(entry)].data.tags["stage"] == stage, stage
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        models = mlflow.search_logged_models(experiment_ids=[experiment_id], output_format="list")
        for name in ("scratch", "finetune"):  # evaluate's metrics, linked to each logged model
            assert any(m.name == name and {"test/acc", "calibrated/ece"} <= {x.key for x in m.metrics or []}
                       for m in models), name
        champion = mlflow.pyfunc.load_model("models:/cnn-pipeline@champion")
        image = np.load(repo / "data/prepared/test_images.npy")[:2]
        answer = champion.predict(image)
    finally:
        mlflow.set_tracking_uri(previous)
    classes = json.loads((repo / "data/prepared/classes.json").read_text())
    assert list(answer["class"]) and set(answer["class"]) <= set(classes)
    parents = [r for r in runs if r.data.tags.get("pipeline.group") == "true"]
    newest = max(parents, key=lambda r: r.info.start_time)
    for model in ("scratch", "finetune"):
        assert {f"{model}/{k}" for k in ("test_acc", "f1_macro", "ece")} <= set(newest.data.metrics)
    assert newest.data.tags["champion"].startswith(json.loads((repo / SELECTION).read_text())["model"])
    assert newest.info.end_time > newest.info.start_time
    return [r for r in runs if "stage" in r.data.tags], parents


SELECTION = "dvclive/register/selection.json"


@ON_REPO
def test_a_clone_a_run_cache_pull_and_an_applied_experiment_all_leave_a_complete_store(tmp_repo, tmp_path):
    """What DVC holds is what MLflow shows: after `git clone` + `dvc repro` (stages whose outputs
    are committed are skipped), after `dvc pull --run-cache` + `dvc repro` (nothing runs), and
    after `dvc exp apply` of an experiment logged to another store."""
    from pipeline.tracking import restore

    origin, env = tmp_repo
    first = tmp_path / "first"
    run(["git", "clone", "-q", str(origin), str(first)], tmp_path, env)
    log = run(["dvc", "repro"], first, env).stdout
    ran = {line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage")}
    every = set(yaml.safe_load((first / "dvc.lock").read_text())["stages"])
    assert ran == every - stages_in_git(first), log  # committed outputs skipped, the rest rerun here
    # byte-identical in another folder: every model, export, feature file and curve hash
    assert (first / "dvc.lock").read_text() == run(["git", "show", "HEAD:dvc.lock"], first, env).stdout
    runs, parents = assert_store_mirrors_the_lock(first)
    restored = {r.data.tags["stage"] for r in runs if restore.RESTORED_TAG in r.data.tags}
    assert {"evaluate@scratch", "evaluate@finetune", "report"} <= restored and "train" not in restored
    assert len(parents) == 1
    again = run(["dvc", "repro"], first, env).stdout
    assert [line for line in again.splitlines() if line.startswith("Running stage")] == ["Running stage 'sync':"]
    assert len(mlflow_runs(first)) == len(runs)  # mirrored already: nothing added
    remote = tmp_path / "remote"  # a colleague's remote: the first clone pushes its outputs and run-cache
    run(["dvc", "remote", "add", "--local", "team", str(remote)], first, env)
    run(["dvc", "push", "--run-cache", "-r", "team"], first, env)

    second = tmp_path / "second"
    run(["git", "clone", "-q", str(origin), str(second)], tmp_path, env)
    run(["dvc", "remote", "add", "--local", "team", str(remote)], second, env)
    run(["dvc", "pull", "--run-cache", "-r", "team"], second, env)
    log = run(["dvc", "repro"], second, env).stdout
    assert [line for line in log.splitlines() if line.startswith("Running stage")] == ["Running stage 'sync':"]
    runs, _ = assert_store_mirrors_the_lock(second)
    assert all(restore.RESTORED_TAG in r.data.tags for r in runs)

    # an experiment run against a colleague's store, applied here: this store learns its results
    elsewhere = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'colleague.db'}"}
    run(["dvc", "exp", "run", "-q", "-n", "shorter", "-S", "train.epochs=1"], second, elsewhere)
    run(["git", "checkout", "-q", "--", "."], second, env)
    run(["dvc", "checkout", "-q"], second, env)
    run(["dvc", "exp", "apply", "shorter"], second, env)
    log = run(["dvc", "repro"], second, env).stdout
    assert [line for line in log.splitlines() if line.startswith("Running stage")] == ["Running stage 'sync':"]
    runs, _ = assert_store_mirrors_the_lock(second)
    train = [r for r in runs if r.data.tags["stage"] == "train"]
    assert sorted(r.data.params["train.epochs"] for r in train) == ["1", "2"]


@ON_REPO
def test_experiments_appear_in_dvc_exp_show_and_in_the_root_mlflow_store(tmp_repo):
    repo, env = tmp_repo
    # train alone: the keras and clone tests run experiments through the stages below it
    run(["dvc", "exp", "run", "-n", "fast-lr", "-S", "train.lr=0.01", "train"], repo, env)
    # --temp runs in .dvc/tmp/exps/...; its MLflow runs must still reach <repo>/mlflow.db
    run(["dvc", "exp", "run", "--temp", "-n", "one-epoch", "-S", "train.epochs=1", "train"], repo, env)

    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo, env).stdout)
    names = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp["revs"]:
                names[exp.get("name") or rev.get("name")] = rev
    assert {"fast-lr", "one-epoch"} <= set(names)
    params = names["fast-lr"]["data"]["params"]["params.yaml"]["data"]["train"]
    assert params["lr"] == 0.01

    tagged = {(r.data.tags.get("dvc_exp_name"), r.data.tags["stage"]) for r in mlflow_runs(repo)}
    assert ("fast-lr", "train") in tagged
    assert ("one-epoch", "train") in tagged
    assert not any(p.name == "mlflow.db" for p in (repo / ".dvc" / "tmp").rglob("mlflow.db"))


def no_worker_left(repo: Path) -> None:
    """Wait until earlier tests' queue workers of `repo` have idled out (within 20 s): one still
    alive would take the experiment a test queues next, and `dvc queue start` would spawn none."""
    deadline = time.monotonic() + 120
    while workers := dvc_queue.workers_of(repo):
        assert time.monotonic() < deadline, [w.pid for w in workers]
        time.sleep(1.0)


@ON_REPO
def test_an_experiment_whose_worker_died_is_queued_again_once_instead_of_hanging(tmp_repo, capsys):
    """A worker killed mid-run leaves DVC calling its experiment 'Running' for ever, as DVC's
    workers starting together sometimes do (dvc#10673): the wait sees no worker and no
    experiment process of the queue twice, marks it failed in DVC's queue and queues it again
    with the same params (once: `resolved` in tests/unit/experiments/test_batch.py)."""
    repo, env = tmp_repo
    run(["git", "checkout", "-q", "--", "params.yaml"], repo, env)

    def queue(name: str) -> str:
        run(["dvc", "exp", "run", "--queue", "-q", "-n", name, "-S", "train.seed=8", "train"], repo, env)
        return name

    def kill_the_worker() -> None:
        deadline = time.monotonic() + 120
        while not dvc_queue.experiments_running(repo):
            assert time.monotonic() < deadline, dvc_queue.status(env, repo)
            time.sleep(0.5)
        for worker in dvc_queue.workers_of(repo):
            for process in [*worker.children(recursive=True), worker]:
                process.kill()

    no_worker_left(repo)
    queue("killed")
    dvc_queue.start(1, env, repo)
    kill_the_worker()
    requeued = []

    def again(name: str) -> str:
        requeued.append(queue(f"{name}-again"))
        return requeued[-1]

    assert dvc_queue.wait_for(["killed"], repo, env, 1, timeout=600, requeue=again) == {"killed": "Success"}
    assert requeued == ["killed-again"] and "killed-again" in dvc_queue.landed(repo)
    assert "killed was lost" in capsys.readouterr().err
    assert dvc_queue.status(env, repo)["killed"] == "Failed"  # not 'Running' for ever, as DVC alone leaves it


@ON_REPO
def test_a_three_trial_sweep_queues_experiments_and_applies_the_best(tmp_repo):
    repo, env = tmp_repo
    run(["git", "checkout", "-q", "--", "params.yaml"], repo, env)
    (repo / "tiny-sweep.yaml").write_text(
        'objective: {metric: "dvclive/train/metrics.json:best.val_loss"}\n'
        "prune: {stage: train, metric: val/loss, warmup_epochs: 0, startup_trials: 1}\n"
        "params:\n  train.lr: {low: 1.0e-3, high: 3.0e-2, log: true}\n  train.batch_size: {choices: [32, 64]}\n")
    done = run([sys.executable, "-m", "pipeline.experiments.sweep", "--trials", "3", "--jobs", "2",
                "--space", "tiny-sweep.yaml", "--study", "tiny", "--target", "train"], repo, env)
    import optuna

    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{repo / 'optuna.db'}")
    trials = study.trials
    assert len(trials) == 3 and all(t.state.is_finished() for t in trials), done.stdout
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete and {t.user_attrs["dvc_exp"] for t in trials} == {"tiny-0", "tiny-1", "tiny-2"}
    for t in trials:  # every trial reported its epochs to the study from inside the train stage
        assert sorted(t.intermediate_values) in ([0, 1], [0]), t
    # DVC's metrics are the objective: each complete trial's value is its experiment's best val loss
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo, env).stdout)
    metrics = {exp.get("name"): exp["revs"][0]["data"] for base in shown for exp in base.get("experiments") or []}
    for t in complete:
        data = metrics[t.user_attrs["dvc_exp"]]
        assert data["metrics"]["dvclive/train/metrics.json"]["data"]["best"]["val_loss"] == t.value
        assert data["params"]["params.yaml"]["data"]["train"]["lr"] == t.params["train.lr"]
    # the best trial is applied to the workspace
    best = study.best_trial
    applied = yaml.safe_load((repo / "params.yaml").read_text())["train"]
    assert applied["lr"] == best.params["train.lr"] and applied["batch_size"] == best.params["train.batch_size"]
    assert f"best: trial {best.number} (tiny-{best.number})" in done.stdout
    # MLflow: one sweep parent, each trial's pipeline run nested under it, its train run under that
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cnn-pipeline")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`pipeline.experiments.sweep` = 'tiny'")
    assert parent.info.status == "FINISHED" and parent.data.tags["best_experiment"] == f"tiny-{best.number}"
    groups = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(g.info.run_name for g in groups) == ["tiny-0", "tiny-1", "tiny-2"]
    for g in groups:
        (stage_run,) = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{g.info.run_id}'")
        assert stage_run.data.tags["stage"] == "train"
    run(["git", "checkout", "-q", "--", "params.yaml"], repo, env)


@ON_REPO
def test_an_experiment_queued_as_the_last_worker_leaves_still_runs(tmp_repo, capsys):
    """An idle DVC queue worker shuts itself down once it has found the queue empty, and
    `dvc queue start` spawns none while that worker still answers: an experiment queued in that
    moment waits with no worker (a sweep's third trial hung so in CI, for 900 s). Made here
    directly, that end state: queued, and no worker of the repository alive."""
    repo, env = tmp_repo
    run(["git", "checkout", "-q", "--", "params.yaml"], repo, env)
    no_worker_left(repo)
    run(["dvc", "exp", "run", "--queue", "-q", "-n", "orphan", "-S", "train.seed=7", "train"], repo, env)
    assert dvc_queue.status(env, repo)["orphan"] == "Queued"
    assert dvc_queue.wait_for(["orphan"], repo, env, 1, timeout=300) == {"orphan": "Success"}
    assert "orphan queued with no worker left" in capsys.readouterr().err


@ON_REPO
def test_the_keras_framework_runs_as_an_experiment_and_reruns_byte_identically(tmp_repo):
    """It leaves the workspace on the keras experiment: of the tests on tmp_repo only the folder
    test, which reruns ingest and prepare alone, comes after it."""
    repo, env = tmp_repo
    run(["git", "checkout", "-q", "--", "params.yaml"], repo, env)
    # four epochs: two leave the global-average-pooled head under the 0.9 asserted below
    keras_exp = ["dvc", "exp", "run", "-n", "keras", "-S", "train.framework=keras", "-S", "train.epochs=4"]
    ran = run(keras_exp, repo, env).stdout
    # only the scratch model's stages depend on train: finetune and its evaluation stay cached
    assert (
        "Running stage 'train'" in ran and "Running stage 'export@scratch'" in ran
        and "Running stage 'finetune'" not in ran
    )
    assert json.loads((repo / "models/scratch/model.json").read_text())["framework"] == "keras"
    first = (repo / "dvc.lock").read_text()
    run(["dvc", "repro", "-f", "-s", "train", "evaluate@scratch", "export@scratch"], repo, env)
    assert (repo / "dvc.lock").read_text() == first  # the .keras file, exports, metrics and curves

    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo, env).stdout)
    revs = {
        exp.get("name") or rev.get("name"): rev
        for baseline in shown
        for exp in baseline.get("experiments") or []
        for rev in exp["revs"]
    }
    keras = revs["keras"]["data"]
    assert keras["params"]["params.yaml"]["data"]["train"]["framework"] == "keras"
    assert keras["metrics"]["dvclive/evaluate/scratch/metrics.json"]["data"]["test"]["acc"] > 0.9
    export_metrics = keras["metrics"]["dvclive/export/scratch/metrics.json"]["data"]
    assert set(export_metrics) == {"savedmodel", "tflite", "tflite_int8", "onnx"}
    plots = json.loads(run(["dvc", "plots", "diff", "HEAD", "keras", "--json"], repo, env).stdout)
    loss = plots["Scratch CNN loss"] if "Scratch CNN loss" in plots else plots
    assert "keras" in json.dumps(loss) and "HEAD" in json.dumps(loss)  # both runs' curves in one plot
    tags = {(r.data.tags.get("dvc_exp_name"), r.data.tags["stage"]): r.data.tags for r in mlflow_runs(repo)}
    assert tags[("keras", "train")]["framework"] == "keras" and "tensorflow" in tags[("keras", "train")]


@ON_REPO
def test_a_dvc_tracked_image_folder_drives_ingest_and_prepare(tmp_repo, tmp_path):
    """The folder workflow of docs/data.md: dvc add, push to a local remote, change an image, repro."""
    repo, env = tmp_repo
    run(["git", "checkout", "-q", "--", "params.yaml"], repo, env)  # the keras test left its experiment's
    folder = repo / "data" / "sources" / "digits"
    digit_folder(folder, per_class=15)
    params = (repo / "params.yaml").read_text().replace(
        "source: digits, folder: data/sources,", "source: folder, folder: data/sources/digits,",
    )
    (repo / "params.yaml").write_text(params)
    run(["dvc", "add", "data/sources/digits"], repo, env)
    run(["dvc", "remote", "add", "-d", "local", str(tmp_path / "remote")], repo, env)
    run(["dvc", "push"], repo, env)
    assert any((tmp_path / "remote").rglob("*")), "dvc push stored nothing"
    run(["dvc", "repro", "prepare"], repo, env)
    manifest = (repo / "data" / "ingested" / "manifest.csv").read_text()
    assert "digit3/015." in manifest

    # change one image: DVC sees the folder and the two stages that read it as changed, no others
    # (the model stages are already out of date here: only prepare was reproduced on the folder)
    from PIL import Image

    before = set(json.loads(run(["dvc", "status", "--json"], repo, env).stdout))
    assert not {"ingest", "prepare", "data/sources/digits.dvc"} & before
    Image.open(folder / "digit2" / "004.png").rotate(90).save(folder / "digit2" / "004.png")
    after = set(json.loads(run(["dvc", "status", "--json"], repo, env).stdout))
    assert after - before == {"ingest", "prepare", "data/sources/digits.dvc"}
    run(["dvc", "add", "data/sources/digits"], repo, env)
    reran = run(["dvc", "repro", "prepare"], repo, env).stdout
    assert "Running stage 'ingest'" in reran and "Running stage 'prepare'" in reran
    assert (repo / "data" / "ingested" / "manifest.csv").read_text() != manifest


def photo_folder(root: Path, per_class: int = 12) -> None:
    """Two classes of small colour photos: distinct crops of scikit-image's cat and coffee."""
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("chelsea", "coffee"):
        photo = Image.fromarray(getattr(skimage.data, name)())
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            side = int(rng.integers(160, 280))
            left, top = int(rng.integers(0, photo.width - side)), int(rng.integers(0, photo.height - side))
            crop = photo.crop((left, top, left + side, top + side)).resize((96, 96))
            crop.save(root / name / f"{i:03d}.jpg", quality=90)


MODELS = ("scratch", "finetune")
PHOTO_PARAMS = """\
runtime: {threads: 1, device: cpu}  # two xdist workers on two cores: see support.TINY_PARAMS
data: {source: folder, folder: data/sources/photos, root: data/sources}
prepare: {seed: 0}
audit: {}
train: {framework: torch, seed: 0, epochs: 2, batch_size: 8}
finetune: {seed: 0, epochs: 1, batch_size: 8}
evaluate: {batch_size: 64}
export: {opset: 18, batch_size: 64, latency_runs: 1, throughput_runs: 0}
crossval: {folds: 0}
register: {}
"""


def test_photos_take_the_photo_paths_and_rerun_byte_identically(tmp_path_factory, _migrated_store):
    """A small colour photo folder with the auto defaults: stored at its own 96 px, crops and
    flips, the scratch CNN at 64 px and the fine-tune at 224; forced again, the stages that
    read photos and train on them give the same lock (the downstream stages' reruns are the
    digits test's: they are the same code on these shapes)."""
    repo = tmp_path_factory.mktemp("photos")
    photo_folder(repo / "data" / "sources" / "photos")
    env = copy_project(repo, _migrated_store, PHOTO_PARAMS)
    run(["dvc", "repro"], repo, env)
    first = (repo / "dvc.lock").read_text()
    run(["dvc", "repro", "-f", "-s", "ingest", "prepare", "train", "finetune"], repo, env)
    assert (repo / "dvc.lock").read_text() == first  # the data, both models, their metrics and curves

    prepared = json.loads((repo / "dvclive/prepare/metrics.json").read_text())
    assert prepared["image_size"] == 96 and prepared["colour"]["channels"] == 3
    cards = {m: json.loads((repo / f"models/{m}/model.json").read_text())["model_args"] for m in MODELS}
    assert cards["scratch"]["input_size"] == 64 and cards["scratch"]["head"] == "gap"
    assert cards["finetune"]["input_size"] == 224
    tags = {r.data.tags["stage"]: r.data.tags for r in mlflow_runs(repo)}
    assert tags["train"]["augment"] == "crop_flip" and tags["finetune"]["unfreeze_fraction"] == "0.3"
    for model in ("scratch", "finetune"):
        parity = json.loads((repo / f"dvclive/export/{model}/metrics.json").read_text())
        assert parity["onnx"]["max_abs_diff"] < 1e-4 and parity["torchscript"]["top1_agreement"] == 1.0
