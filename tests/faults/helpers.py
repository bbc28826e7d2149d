"""What every fault case asserts about a failed command: its exit code, a short message that
names the file or key and the fix, and no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from support import REPO, stage_env

__all__ = ["REPO", "assert_expected_failure", "snapshot", "stage", "stage_env"]


def stage(cwd: Path, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m pipeline <args>` in `cwd`, not asserting its outcome."""
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env or stage_env(),
                          capture_output=True, text=True, timeout=timeout)


PROGRESS = ("epoch/s", "s/epoch", "it/s", "s/it")  # tqdm's bars


def message_lines(stderr: str) -> list[str]:
    """stderr less progress bars and MLflow's own INFO log lines."""
    return [line for line in stderr.splitlines()
            if line.strip() and " INFO " not in line and not any(bar in line for bar in PROGRESS)]


def assert_expected_failure(done: subprocess.CompletedProcess, *needles: str, code: int = 1) -> str:
    """Exit `code`, no traceback, at most three lines, the first `error:`, each needle in them."""
    lines = message_lines(done.stderr)
    text = "\n".join(lines)
    assert done.returncode == code, f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-4000:]
    assert len(lines) <= 3, text
    for needle in needles:
        assert needle in text, f"{needle!r} not in:\n{text}"
    return text


def snapshot(*folders: Path) -> dict[str, bytes]:
    """Every file under `folders`, by path: compare before and after a fault."""
    return {str(p): p.read_bytes() for folder in folders for p in sorted(Path(folder).rglob("*")) if p.is_file()}
