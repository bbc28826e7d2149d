"""One run at a time per workspace: a stage refuses to start while another `dvc repro` or
`dvc exp run` is using the same folder, and stops if params.yaml changes under it.

DVC runs every stage as a child of one `dvc` process, the driver. Two drivers in one
workspace overwrite each other: `dvc exp run -S` writes its values into params.yaml before any
stage runs, so the first run's later stages train with the second one's params, and DVC's own
locks only catch a collision on the same outputs. So each stage, before any work, claims the
workspace for its driver in `.dvc/tmp/pipeline-workspace.json` with the params.yaml digest the
driver started with:
- a claim by another live driver refuses the stage, pointing to DVC's queue (each queued
  experiment runs in its own copy, so queued runs never share a workspace);
- a claim by this driver with another params digest means params.yaml changed during the run:
  the stage stops (also checked at the end of each stage, before DVC records its outputs);
- a `dvc exp run -S key=value` whose values params.yaml does not hold means another `dvc exp
  run` wrote its own between this one's write and its first stage (DVC's lock stops the
  second run only after that write): the stage stops before any work.

A claim names its driver's host, pid and start time, so a killed run cannot leave it stale: a
dead pid, or a pid reused by a newer process, frees the workspace. Run by hand (no dvc
ancestor), a stage is its own driver; outside a DVC repository nothing is claimed.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import socket
from pathlib import Path

from pipeline import config, files
from pipeline.errors import PipelineError

CLAIM_FILE = Path(".dvc") / "tmp" / "pipeline-workspace.json"
QUEUE_HINT = "run experiments side by side with `dvc exp run --queue -S ...` and `dvc queue start -j N`"


class WorkspaceBusy(PipelineError):
    """Another pipeline run is using this workspace, or changed its params.yaml."""


@dataclasses.dataclass(frozen=True)
class Driver:
    """The process whose run a stage belongs to: `dvc repro`, `dvc exp run`, or the stage itself."""

    host: str
    pid: int
    started: float  # the process's start time, epoch seconds: tells a reused pid apart
    command: str
    overrides: tuple[tuple[str, str], ...] = ()  # its `-S key=value`s for params.yaml (`set_params`)

    @property
    def key(self) -> str:
        return f"{self.host}:{self.pid}:{self.started:.2f}"


def is_dvc(cmdline: list[str]) -> bool:
    """`.../bin/dvc ...`, `python .../bin/dvc ...` or `python -m dvc ...`."""
    return any(Path(arg).name == "dvc" for arg in cmdline[:2]) or cmdline[1:3] == ["-m", "dvc"]


def command(cmdline: list[str]) -> str:
    """How the user typed it: `dvc exp run -S ...`, not the interpreter and script paths."""
    for i, arg in enumerate(cmdline[:3]):
        if Path(arg).name == "dvc":
            return " ".join(["dvc", *cmdline[i + 1:]])
    return " ".join(cmdline)


def set_params(cmdline: list[str]) -> tuple[tuple[str, str], ...]:
    """The (key, value) pairs a `dvc exp run` command line sets in params.yaml with `-S` /
    `--set-param` (`key=value`, `params.yaml:key=value`, Hydra's `+key=value`); other files,
    deletions (`~key`) and `--queue` (queued runs use their own copy) give none."""
    if not is_dvc(cmdline) or "exp" not in cmdline or "run" not in cmdline or "--queue" in cmdline:
        return ()
    found, args = [], iter(cmdline)
    for arg in args:
        if arg in ("-S", "--set-param"):
            given = next(args, "")
        elif arg.startswith("--set-param="):
            given = arg.split("=", 1)[1]
        elif arg.startswith("-S") and len(arg) > 2:
            given = arg[2:]
        else:
            continue
        target, _, _ = given.partition("=")
        if ":" in target:
            file, given = given.split(":", 1)
            if Path(file).name != config.PARAMS_FILE.name:
                continue
        key, sep, value = given.lstrip("+").partition("=")
        if sep and key and not key.startswith("~"):
            found.append((key, value))
    return tuple(found)


def unmet(params: dict, overrides: tuple[tuple[str, str], ...]) -> list[str]:
    """'key: value in params.yaml, not the -S value' for each override `params` does not hold.
    Compared as YAML values, as DVC writes them; a key or value this cannot read counts as met,
    so that no run is refused on a doubt."""
    from ruamel.yaml import YAML

    missed = []
    for key, raw in dict(overrides).items():  # a key given twice: the last value wins, as in DVC
        node: object = params
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            try:
                wanted = YAML(typ="safe", pure=True).load(raw)
            except Exception:  # noqa: BLE001 (Hydra syntax YAML does not read, e.g. choice(...))
                continue
            if "," not in raw and wanted != node:
                missed.append(f"{key} is {node!r} in params.yaml, not {wanted!r}")
    return missed


_driver: Driver | None = None


def driver() -> Driver:
    """The nearest dvc ancestor of this process, or this process when none is (run by hand)."""
    global _driver
    if _driver is None:
        import psutil

        me = psutil.Process()
        found = next((p for p in me.parents() if is_dvc(_cmdline(p))), me)
        cmdline = _cmdline(found)
        _driver = Driver(socket.gethostname(), found.pid, found.create_time(), command(cmdline), set_params(cmdline))
    return _driver


def _cmdline(proc) -> list[str]:
    import psutil

    try:
        return proc.cmdline()
    except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
        return []


def alive_since(pid: int) -> float | None:
    """Start time (epoch seconds) of process `pid` on this host, or None if there is none."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def alive(claim: dict) -> bool:
    """Whether the claim's driver is still running (one on another host counts as running)."""
    if claim.get("host") != socket.gethostname():
        return True
    try:
        since = alive_since(int(claim["pid"]))
        return since is not None and abs(since - float(claim["started"])) < 0.01
    except (KeyError, TypeError, ValueError):
        return False


def params_digest(root: Path) -> str:
    path = root / config.PARAMS_FILE
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""


_claimed: tuple[Path, str] | None = None  # (workspace, params digest) once this stage holds it


def claim(root: Path | None = None) -> None:
    """Claim the workspace for this stage's driver, or raise WorkspaceBusy (see the module doc)."""
    global _claimed
    _claimed = None
    root = (root or Path.cwd()).resolve()
    if not (root / ".dvc").is_dir():
        return
    path = root / CLAIM_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    me = driver()
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held for this read-check-write only, released on exit
        digest = params_digest(root)
        if me.overrides and (missed := unmet(_params(root), me.overrides)):
            raise WorkspaceBusy(
                f"params.yaml does not hold this run's -S values: {'; '.join(missed)}. Another `dvc exp run` "
                f"wrote its own in between (this run: `{me.command}`); nothing was trained. Restore it "
                f"(`git checkout -- params.yaml`) and {QUEUE_HINT}")
        held = _read(path)
        if held and held.get("driver") != me.key and alive(held):
            raise WorkspaceBusy(
                f"this workspace is in use by another run: `{held.get('command')}` (pid {held.get('pid')} on "
                f"{held.get('host')}); two runs in one folder overwrite each other's params.yaml and outputs. Wait "
                f"for it, or {QUEUE_HINT} (if no such run exists, delete {path})")
        if held and held.get("driver") == me.key:
            _check(held.get("params"), digest, me)
        else:
            record = {"driver": me.key, "host": me.host, "pid": me.pid, "started": me.started,
                      "command": me.command, "params": digest}
            files.write_json(path, record)
    _claimed = (root, digest)


def check_unchanged() -> None:
    """At a stage's end: params.yaml still reads as when the stage began, or WorkspaceBusy."""
    if _claimed is not None:
        _check(_claimed[1], params_digest(_claimed[0]), driver())


def _check(expected: str | None, now: str, me: Driver) -> None:
    if expected != now:
        raise WorkspaceBusy(
            f"params.yaml changed while this run (`{me.command}`, pid {me.pid}) was using it, most likely "
            f"by another `dvc exp run` in this workspace: its results would not match the params DVC records. "
            f"Restore it (`git checkout -- params.yaml`) and rerun; {QUEUE_HINT}")


def _params(root: Path) -> dict:
    try:
        return config.read_params(root / config.PARAMS_FILE)
    except Exception:  # noqa: BLE001 (an unreadable file is the stage's own params check to report)
        return {}


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: nobody holds it
        return None
    return data if isinstance(data, dict) else None

