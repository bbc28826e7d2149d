"""Benchmarks: each module measures one target and reports it; nothing here is asserted in tests."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PETS = REPO.parent / "shared" / "datasets" / "pets"


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def set_params(repo: Path, changes: dict[str, str]) -> None:
    """Change `section.key` values of `repo`'s params.yaml, as `dvc exp run -S` does (comments kept)."""
    from ruamel.yaml import YAML

    yaml = YAML()  # round-trip: the comments stay
    path = repo / "params.yaml"
    params = yaml.load(path.read_text())
    for key, value in changes.items():
        section, name = key.split(".", 1)
        params[section][name] = YAML(typ="safe", pure=True).load(value)
    with path.open("w") as f:
        yaml.dump(params, f)


def parse_sets(sets: list[str]) -> dict[str, str]:
    """`--set section.key=value` arguments as a dict."""
    return dict(s.split("=", 1) for s in sets)


def folder_parser(doc: str | None) -> argparse.ArgumentParser:
    """A photo-folder benchmark's command line: `--folder` (the pets photos by default) and
    `--set section.key=value`; the module adds its own."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--folder", type=Path, default=PETS)
    parser.add_argument("--set", action="append", default=[], help="section.key=value, as dvc exp run -S")
    return parser


def parse_folder_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The arguments, the folder checked to exist."""
    args = parser.parse_args()
    if not args.folder.is_dir():
        sys.exit(f"{args.folder}: no such folder (the pets photos live in ../shared/datasets/pets)")
    return args


def report(title: str, lines: list[str], name: str) -> None:
    """Print a benchmark's results and write them to bench/results/<name>.md (gitignored)."""
    text = "\n".join([f"# {title}", "", f"- machine: {machine()}", "", *lines])
    print(text)
    out = REPO / "bench" / "results" / f"{name}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text + "\n")
