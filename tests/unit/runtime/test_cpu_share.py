"""`runtime.threads: auto`: the cores shared out among the DVC queue's live workers."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from pipeline import config
from pipeline.config import ConfigError
from pipeline.experiments import queue_workers
from pipeline.frameworks.interface import RuntimeParams
from pipeline.runtime import cpu_share

# a stand-in for `dvc exp queue-worker <node>`: its cmdline is what DVC's is; it runs a
# stage-like child that reports what cpu_share sees from inside the queue
WORKER = """
import subprocess, sys, time
if sys.argv[-1] == "report":
    from pipeline.runtime import cpu_share
    from pipeline.experiments import queue_workers
    print(queue_workers.workers_around(), cpu_share.auto_threads(cores=8), flush=True)
else:
    time.sleep(float(sys.argv[1]))
"""


def fake_worker(node: str, seconds: float = 30) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, str(seconds), "exp", "queue-worker", f"{node}@localhost"])


def report_from_inside(node: str) -> str:
    """What a stage started by the worker `node` sees (the stage is the worker's grandchild)."""
    inner = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {WORKER!r}, 'report'], check=True)"
    script = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {inner!r}], check=True)"
    done = subprocess.run([sys.executable, "-c", script, "exp", "queue-worker", f"{node}@localhost"],
                          capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.strip()


def test_outside_a_queue_a_stage_gets_every_core():
    assert queue_workers.workers_around() == 0
    assert cpu_share.auto_threads(cores=8) == 8
    assert RuntimeParams(threads="auto", portable=False).thread_count == cpu_share.available_cores()


def test_the_cores_are_divided_among_the_live_workers_of_this_queue_only():
    others = [fake_worker("dvc-exp-abc123-2"), fake_worker("dvc-exp-abc123-3"), fake_worker("dvc-exp-ffffff-1")]
    try:
        time.sleep(0.5)
        # this queue: the reporting worker and two siblings; the other repo's worker is not counted
        assert report_from_inside("dvc-exp-abc123-1") == "3 2"
    finally:
        for p in others:
            p.kill()
            p.wait()
    assert report_from_inside("dvc-exp-abc123-1") == "1 8"


@pytest.mark.parametrize("cores, workers, threads", [(2, 2, 1), (2, 4, 1), (16, 3, 5), (1, 0, 1)])
def test_auto_threads_never_drops_below_one(cores, workers, threads):
    assert cpu_share.auto_threads(cores=cores, workers=workers) == threads


def test_a_fixed_count_is_kept_and_nonsense_is_refused(tmp_path):
    assert RuntimeParams(threads=3).thread_count == 3
    params = tmp_path / "params.yaml"
    params.write_text("runtime: {threads: many}\n")
    with pytest.raises(ConfigError, match=r"runtime.threads: 'many' \(str\) is not valid"):
        config.load("runtime", RuntimeParams, params)
    params.write_text("runtime: {threads: 0}\n")
    with pytest.raises(ConfigError, match="must be 'auto' or at least 1, got 0"):
        config.load("runtime", RuntimeParams, params)
