"""The one place that makes runs tiny and isolated: each test in its own temporary folder,
on the CPU, with its own MLflow store."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from support import REPO, TINY_PARAMS, run, shared_folder, stage_env

# Stages run on the CPU in tests whatever the machine has; DVC must not phone home.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ.setdefault("GIT_AUTHOR_NAME", "test")
os.environ.setdefault("GIT_AUTHOR_EMAIL", "test@example.com")
os.environ.setdefault("GIT_COMMITTER_NAME", "test")
os.environ.setdefault("GIT_COMMITTER_EMAIL", "test@example.com")


@pytest.fixture(scope="session", autouse=True)
def _xdist_groups_hold(request: pytest.FixtureRequest) -> None:
    """`--dist loadgroup` keeps each `xdist_group` on one worker by suffixing its tests' node ids
    with `@<group>`; pytest 9.2.0 drops that suffix (pytest-xdist issue 1386) and the groups are
    silently split, each worker building the group's fixture again. Fail every test instead (an
    autouse session fixture comes before the group's own; an error raised at collection on a
    worker reaches the terminal as an xdist INTERNALERROR without its message)."""
    session = request.session
    if not os.environ.get("PYTEST_XDIST_WORKER") or not session.config.getoption("loadgroup", False):
        return  # not a worker of --dist loadgroup
    split = [item.nodeid for item in session.items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
    if split:
        pytest.fail(f"--dist loadgroup is not grouping ({split[0]} has no @group suffix): pytest "
                    f"{pytest.__version__} with this pytest-xdist splits groups (pytest-xdist issue 1386); "
                    "install the pinned versions: make setup", pytrace=False)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def _migrated_store(tmp_path_factory) -> Path:
    """One MLflow SQLite store with its schema created; each test gets a copy (creating the
    schema takes seconds, copying the file does not)."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(autouse=True)
def _environment_restored():
    """Each test leaves the worker's environment as it found it. A test that runs a stage's entry
    point in-process sets runtime.portable's pins there (portable.pin), and every later test's
    stage subprocess inherited them: a `portable: false` control run was pinned all the same
    (CI failed on it under xdist, passing alone)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def mlflow_store(tmp_path_factory, _migrated_store, monkeypatch) -> str:
    path = tmp_path_factory.mktemp("mlflow-store") / "mlflow.db"
    shutil.copy(_migrated_store, path)
    uri = f"sqlite:///{path}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A temporary folder holding the tiny params.yaml, made the current directory."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_text(TINY_PARAMS)
    monkeypatch.chdir(work)
    return work


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, _migrated_store) -> Path:
    """The digits ingested and prepared once per test run with the tiny params."""

    def build(work: Path) -> None:
        (work / "params.yaml").write_text(TINY_PARAMS)
        shutil.copy(_migrated_store, work / "mlflow.db")
        for stage in ("ingest", "prepare"):
            run([sys.executable, "-m", "pipeline", stage], cwd=work, env=stage_env(work))

    return shared_folder(tmp_path_factory, "prepared", "prepared", build) / "data" / "prepared"


@pytest.fixture(scope="session")
def trained(prepared, tmp_path_factory) -> Path:
    """Both models trained and evaluated once per test run on the tiny params (export reads the
    temperature evaluate fits, from dvclive/evaluate/<model>/); returns the work folder."""

    def build(work: Path) -> None:
        for stage in (["train"], ["finetune"], ["evaluate", "--model", "scratch"], ["evaluate", "--model", "finetune"]):
            run([sys.executable, "-m", "pipeline", *stage], cwd=work, env=stage_env(work))

    return shared_folder(tmp_path_factory, "prepared", "trained", build)


# Fixtures that run pipeline stages in subprocesses: a test using one is slow (make test-fast skips it).
STAGE_FIXTURES = {"prepared", "trained"}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if STAGE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def pytest_collection_finish(session) -> None:
    """TensorFlow stays out of pytest's own process: torch._dynamo, which any torch optimizer
    imports, segfaults once TensorFlow is loaded. Keras tests run it in subprocesses."""
    assert "tensorflow" not in sys.modules, "a test module imported TensorFlow at collection; run it in a subprocess"


