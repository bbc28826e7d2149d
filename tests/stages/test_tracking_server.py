"""A team's set-up: stages logging to a real `mlflow server` (database backend, artifact store
on the server), as colleagues share one."""

from __future__ import annotations

import os
import sys

import mlflow
import pytest
from support import REPO, TINY_PARAMS, free_port, mlflow_server, run

from pipeline.tracking import lockfile, store

pytestmark = pytest.mark.slow  # a server and a stage in subprocesses


@pytest.fixture
def server(tmp_path):
    """`mlflow server` on a free localhost port: SQLite backend, artifacts served from its own folder."""
    home = tmp_path / "server"
    with mlflow_server(home) as uri:
        yield uri, home


def test_a_stage_logs_to_a_shared_server_and_its_artifacts_go_to_the_server(server, tmp_path):
    uri, home = server
    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_text(TINY_PARAMS)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": uri}
    run([sys.executable, "-m", "pipeline", "ingest"], cwd=work, env=env)

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(store.DEFAULT_EXPERIMENT)
    # the server's artifact store, not a folder on the client's disk that colleagues cannot see
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    (ingest,) = client.search_runs([experiment.experiment_id], "tags.stage = 'ingest'")
    assert ingest.info.status == "FINISHED" and ingest.data.metrics["images"] == 1797
    assert client.list_artifacts(ingest.info.run_id), "the run's artifacts did not reach the server"
    assert any(p.is_file() for p in (home / "artifacts").rglob("*"))
    assert not (work / store.ARTIFACT_DIR).exists()


def test_sync_restores_a_skipped_stage_on_the_server_with_its_artifacts(server, tmp_path):
    """`pipeline.sync` against a server: the restored run and its artifacts go through it; a
    second sync adds nothing."""
    from support import lock_entry, write_lock

    uri, home = server
    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_text(TINY_PARAMS)
    entry = lock_entry(work, "ingest", {"dvclive/ingest/metrics.json": '{"images": 7}',
                                        "data/ingested/classes.json": '["a", "b"]'}, {"data": {"source": "digits"}})
    entry["outs"] = [entry["outs"][0], {"path": "data/ingested", "md5": lockfile.dir_md5(work / "data/ingested")}]
    write_lock(work, {"ingest": entry})
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": uri}
    for _ in range(2):
        run([sys.executable, "-m", "pipeline", "sync"], cwd=work, env=env)

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(store.DEFAULT_EXPERIMENT)
    (ingest,) = client.search_runs([experiment.experiment_id], "tags.stage = 'ingest'")
    assert ingest.info.run_name == "ingest (restored)" and ingest.data.metrics == {"images": 7.0}
    assert [a.path for a in client.list_artifacts(ingest.info.run_id, "ingested")] == ["ingested/classes.json"]
    assert list((home / "artifacts").rglob("classes.json"))
    assert not (work / store.ARTIFACT_DIR).exists()


def test_sync_with_the_server_down_mirrors_into_the_offline_store(tmp_path):
    from support import lock_entry, write_lock

    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_text(TINY_PARAMS + "tracking: {offline_fallback: true, timeout_seconds: 1, "
                                                    "http_retries: 0}\n")
    write_lock(work, {"ingest": lock_entry(work, "ingest", {"dvclive/ingest/metrics.json": '{"images": 7}'}, {})})
    env = {**os.environ, "PYTHONPATH": str(REPO),
           "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    done = run([sys.executable, "-m", "pipeline", "sync"], cwd=work, env=env)
    assert "unreachable" in done.stderr
    offline = mlflow.MlflowClient(f"sqlite:///{work / store.OFFLINE_STORE}")
    experiment = offline.get_experiment_by_name(store.DEFAULT_EXPERIMENT)
    (ingest,) = offline.search_runs([experiment.experiment_id], "tags.stage = 'ingest'")
    assert ingest.data.metrics == {"images": 7.0}
