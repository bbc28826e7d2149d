"""Benchmarks: each module measures one target and reports it; nothing here is asserted in tests."""

from __future__ import annotations

import os
import platform
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def report(title: str, lines: list[str], name: str) -> None:
    """Print a benchmark's results and write them to bench/results/<name>.md (gitignored)."""
    text = "\n".join([f"# {title}", "", f"- machine: {machine()}", "", *lines])
    print(text)
    out = REPO / "bench" / "results" / f"{name}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text + "\n")
