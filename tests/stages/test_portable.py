"""`runtime.portable`: results that do not depend on which x86-64 CPU computes them.

One machine cannot be another CPU, but it can be the paths another CPU would take: the
libraries' own switches cap their ISA (an AVX2 laptop's paths), and the affinity mask gives a
stage one core instead of two. In portable mode every such variation must give the same bytes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from support import TINY_PARAMS, run, shared_folder, stage_env

from pipeline import config
from pipeline.config import ConfigError
from pipeline.frameworks.interface import RuntimeParams
from pipeline.runtime import portable

# what a user's shell might hold: the widest paths exposed, or an AVX2 machine's paths
EXPOSED = {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "ALL"}
# the control's shell: the widest paths, and no pin left over (one would make it portable too)
UNPINNED = {**EXPOSED, "MKL_CBWR": None, "MKL_ENABLE_INSTRUCTIONS": None}
MASKED = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def test_portable_is_on_by_default_and_must_be_a_boolean(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("runtime: {threads: 2}\n")
    assert portable.requested(params) is True
    params.write_text("runtime: {portable: false}\n")
    assert portable.requested(params) is False
    params.write_text("runtime: {portable: 'yes'}\n")
    with pytest.raises(ConfigError, match=r"runtime.portable: expected true or false, got 'yes'"):
        portable.requested(params)


def test_portable_needs_a_fixed_thread_count(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("runtime: {threads: auto}\n")
    with pytest.raises(ConfigError, match=r"runtime.threads: auto follows the machine's cores.*portable: false"):
        config.load("runtime", RuntimeParams, params)
    assert RuntimeParams(threads="auto", portable=False).threads == "auto"


def test_the_pins_override_what_the_shell_set(monkeypatch):
    for name in portable.PINS:
        monkeypatch.setenv(name, "shell")  # recorded, so monkeypatch takes back what pin sets
        monkeypatch.delenv(name)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx512")
    assert portable.pin(False) == {} and os.environ["ATEN_CPU_CAPABILITY"] == "avx512"
    assert portable.pin(True) == portable.PINS
    assert {k: os.environ[k] for k in portable.PINS} == portable.PINS
    assert "ATEN_CPU_CAPABILITY=avx2" in portable.record(True)["numeric_switches"]


def train(work: Path, prepared: Path, shell: dict[str, str | None], one_core: bool = False) -> dict[str, bytes]:
    """The train stage in `work`, its environment changed by `shell` (None unsets); its model
    folder and curves, byte for byte."""
    env = {**stage_env(work), **shell}
    env = {name: value for name, value in env.items() if value is not None}
    core = min(os.sched_getaffinity(0))
    cmd = [sys.executable, "-m", "pipeline", "train", "--data", str(prepared), "--out", "models/scratch",
           "--live", "dvclive/train"]
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True,
                          preexec_fn=(lambda: os.sched_setaffinity(0, {core})) if one_core else None)
    assert done.returncode == 0, done.stderr[-3000:]
    found = [p for folder in ("models/scratch", "dvclive/train") for p in sorted((work / folder).rglob("*"))]
    return {str(p.relative_to(work)): p.read_bytes() for p in found if p.is_file()}


def tags(work: Path) -> dict[str, str]:
    client = mlflow.MlflowClient(f"sqlite:///{work}/mlflow.db")
    experiment = client.get_experiment_by_name("cnn-pipeline")
    (last,) = client.search_runs([experiment.experiment_id], "tags.stage = 'train'", max_results=1)
    return last.data.tags


def has_avx512() -> bool:
    return portable.cpu_isa() in ("avx512", "amx")


# The digits stored at their own 8 px, as the default prepare stores them, and resized to 16
# inside the CNN: at the tiny params' stored 16 px the unpinned run happened to match the
# pinned one bit for bit (measured), so the control below could not tell them apart.
# two threads: the test pins one core under them too (test_portable_training_is_the_same_...)
STORED_AT_8 = TINY_PARAMS.replace("prepare: {seed: 0, image_size: 16,", "prepare: {seed: 0,").replace(
    "runtime: {threads: 1,", "runtime: {threads: 2,")


@pytest.fixture(scope="session")
def prepared_at_8(tmp_path_factory) -> Path:
    def build(work: Path) -> None:
        (work / "params.yaml").write_text(STORED_AT_8)
        for stage in ("ingest", "prepare"):
            run([sys.executable, "-m", "pipeline", stage], cwd=work, env=stage_env(work))

    return shared_folder(tmp_path_factory, "prepared-at-8", "prepared", build) / "data" / "prepared"


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_portable_training_is_the_same_under_other_isa_paths_and_fewer_cores(framework, tmp_path, prepared_at_8):
    prepared = prepared_at_8
    params = STORED_AT_8.replace("framework: torch", f"framework: {framework}")
    outputs, recorded = {}, {}
    for name, extra, one_core in (("exposed", EXPOSED, False), ("masked", MASKED, False), ("one-core", EXPOSED, True)):
        work = tmp_path / name
        work.mkdir()
        (work / "params.yaml").write_text(params)
        outputs[name] = train(work, prepared, extra, one_core)
        recorded[name] = tags(work)
    assert outputs["masked"] == outputs["exposed"], "an AVX2 machine's paths changed the portable result"
    assert outputs["one-core"] == outputs["exposed"], "one core (two threads) changed the portable result"
    for t in recorded.values():
        assert t["portable"] == "true" and "MKL_CBWR=COMPATIBLE" in t["numeric_switches"] and t["threads"] == "2"
        assert t["cpu_isa"] == portable.cpu_isa() and t["cpu"]
        if framework == "torch":
            assert t["aten_cpu_capability"] == "AVX2"  # pinned before torch loaded, the shell's avx512 overridden

    if framework == "torch" and has_avx512():
        # the control: without the pins this CPU's own paths give other bytes, so the test can tell
        work = tmp_path / "fastest"
        work.mkdir()
        fastest = params.replace("runtime: {threads: 2,", "runtime: {threads: 2, portable: false,")
        (work / "params.yaml").write_text(fastest)
        assert train(work, prepared, UNPINNED) != outputs["exposed"]
        assert tags(work)["aten_cpu_capability"] in ("AVX512", "AVX512_BF16", "AMX")
