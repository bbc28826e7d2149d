"""The house's shape, read from the code (ast), so it cannot erode: the layers import downwards
only, and dvc.yaml lists exactly the pipeline code each stage runs.

A stage's code is the import closure of what its cmd runs (`python -m pipeline <stage>`: the
package, `pipeline/__main__.py` and `pipeline/<stage>.py`). Every `import` counts, also one
inside a function (a lazy import still shapes the outputs), except those under
`if TYPE_CHECKING:` (never run). dvc.yaml lists that closure, less the modules that hold only
a docstring, naming a folder where every module of it with code is in the closure and every
other module by its path.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest
from ruamel.yaml import YAML
from support import REPO

PACKAGE = REPO / "pipeline"
STAGES = ("ingest", "prepare", "audit", "train", "crossval", "finetune", "evaluate", "export", "register", "report",
          "sync")
SHARED = ("config", "files", "errors", "cli")  # the only modules beside the stages at the top
MAX_LINES = 300  # a module read in one sitting
FRAMEWORK_LIBRARIES = (
    "torch", "torchvision", "timm", "tensorflow", "keras", "tf2onnx", "ai_edge_litert", "onnxruntime",
)


def module_path(name: str) -> Path | None:
    """pipeline.a.b -> pipeline/a/b.py or pipeline/a/b/__init__.py; None outside the package."""
    if name != "pipeline" and not name.startswith("pipeline."):
        return None
    base = REPO.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(tree: ast.Module) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    return skipped


@cache
def imports(path: Path, run_time_only: bool = True) -> frozenset[str]:
    """Every module name `path` imports (with its parent packages), absolute."""
    tree = ast.parse(path.read_text())
    skipped = _type_checking_only(tree) if run_time_only else set()
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; use absolute imports"
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            found.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return frozenset(found)


# Observers: code a stage runs that can change none of its outputs, so no stage lists it in
# dvc.yaml and editing it reruns nothing. Reporters talk to MLflow only (DVCLive files, which DVC
# tracks, are written by tracking/run.py, which stays a dep); guards refuse or hold a run (workspace
# claims, Ctrl-C) but compute nothing it writes. Two tests below hold them to that.
REPORTERS = ("pipeline.tracking.store", "pipeline.tracking.connect", "pipeline.tracking.worker",
             "pipeline.tracking.models", "pipeline.tracking.restore")
GUARDS = ("pipeline.runtime.workspace", "pipeline.runtime.interrupts")
OBSERVERS = REPORTERS + GUARDS
# What the rest of the package takes from an observer other than functions returning None,
# context managers yielding None and constants, and why none of it can reach an output.
OBSERVER_VALUES = {
    "pipeline.tracking.store.load_tracking_params": "MLflow's connection settings",
    "pipeline.tracking.store.MlflowWorker": "the MLflow worker process; its calls return None",
    "pipeline.tracking.store.SilentWorker": "the worker of ranks > 0: logs nothing",
    "pipeline.tracking.store._take_worker": "the MLflow worker process; its calls return None",
    "pipeline.tracking.store.experiment_name": "the MLflow experiment",
    "pipeline.tracking.store.tracking_uri": "the MLflow store",
    "pipeline.tracking.store.sqlite_file": "the MLflow store's file, which sync reads",
    "pipeline.tracking.store.repo_root": "where the store and training checkpoints live, never what a stage writes",
    "pipeline.tracking.store.flatten": "params and metrics as MLflow keys",
    "pipeline.tracking.store.git_tags": "MLflow tags",
    "pipeline.tracking.store.group_name": "the MLflow parent run's name",
    "pipeline.tracking.restore.reconcile": "sync's one-line summary, printed",
    "pipeline.tracking.connect.open_store": "the sweep's MLflow experiment id",
    "pipeline.runtime.workspace.driver": "the run's driver process, for MLflow tags",
}


def closure(roots: list[Path], observers: bool = False) -> set[Path]:
    """The modules `roots` run; without `observers`, less the observers and what only they import."""
    seen: set[Path] = set()
    todo = list(roots)
    while todo:
        path = todo.pop()
        if path in seen or (not observers and module_name(path) in OBSERVERS):
            continue
        seen.add(path)
        todo += [p for name in imports(path) if (p := module_path(name)) is not None]
    return seen


def stage_closure(stage: str) -> set[Path]:
    return closure([PACKAGE / "__init__.py", PACKAGE / "__main__.py", PACKAGE / f"{stage}.py"])


def has_code(path: Path) -> bool:
    """False for a module that is only its docstring (a package's __init__.py, say): it shapes nothing."""
    body = ast.parse(path.read_text()).body
    has_docstring = bool(body) and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
    return bool(body[1:] if has_docstring else body)


def as_deps(paths: set[Path]) -> set[str]:
    """The closure as dvc.yaml lists it: the modules with code, as whole folders where every
    such module in the folder is in it."""
    deps = {p.relative_to(REPO).as_posix() for p in paths if has_code(p)}
    folders = sorted({p.parent for p in paths if p.parent != PACKAGE}, key=lambda f: len(f.parts))
    for folder in folders:
        contents = {p.relative_to(REPO).as_posix() for p in folder.rglob("*.py") if has_code(p)}
        if contents <= deps:
            rel = folder.relative_to(REPO).as_posix()
            deps = {d for d in deps if not d.startswith(rel + "/")} | {rel}
    return deps


def dvc_stages() -> dict[str, dict]:
    return YAML(typ="safe", pure=True).load((REPO / "dvc.yaml").read_text())["stages"]


def layer_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE).parts
    if len(rel) == 1 and path.stem in STAGES:
        return "stage"
    layers = {"data": "data", "evaluation": "evaluation", "frameworks": "frameworks"}
    return layers.get(rel[0], "shared") if len(rel) > 1 else "shared"


def all_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_yaml_lists_exactly_the_code_each_stage_runs(stage):
    spec = dvc_stages()[stage]
    spec = spec.get("do", spec)  # foreach stages keep theirs under do:
    assert re.search(rf"python -m pipeline {stage}(\s|$)", spec["cmd"]), (
        f"{stage}: cmd should be `python -m pipeline {stage} ...`"
    )
    listed = {d for d in spec["deps"] if d.startswith("pipeline")}
    # an always_changed stage runs every time and writes nothing DVC tracks: code deps would
    # only churn dvc.lock
    expected = set() if spec.get("always_changed") else as_deps(stage_closure(stage))
    assert not expected - listed, f"dvc.yaml stage '{stage}' misses deps {sorted(expected - listed)}"
    assert not listed - expected, (
        f"dvc.yaml stage '{stage}' lists deps its code never imports {sorted(listed - expected)}"
    )


def test_every_stage_module_is_a_stage_in_dvc_yaml():
    assert set(dvc_stages()) == set(STAGES)
    assert {p.stem for p in all_modules() if layer_of(p) == "stage"} == set(STAGES)


@pytest.mark.parametrize("path", all_modules(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_imports_point_down_the_layers(path):
    """A stage imports no stage; the shared layers import no stage (nor the entry point); the
    data layer imports no framework, ours or a library; only frameworks/torch/ imports torch's
    family and only frameworks/keras/ TensorFlow's."""
    names = imports(path, run_time_only=False)
    layer = layer_of(path)
    stages = {n for n in names if n in {f"pipeline.{s}" for s in STAGES} | {"pipeline.__main__"}}
    if layer == "stage":
        assert stages - {f"pipeline.{path.stem}"} == set(), f"{path.name} imports another stage: {sorted(stages)}"
    elif path.name != "__main__.py":
        assert not stages, f"{path.relative_to(REPO)} ({layer} layer) imports a stage: {sorted(stages)}"
    if layer in ("data", "evaluation"):
        frameworks = {n for n in names if n.split(".")[0] in FRAMEWORK_LIBRARIES or n.startswith("pipeline.frameworks")}
        assert not frameworks, f"{path.relative_to(REPO)} ({layer} layer) imports a framework: {sorted(frameworks)}"
    # anywhere in pipeline/: torch's family only in frameworks/torch/, TensorFlow's only in frameworks/keras/
    rel = path.relative_to(PACKAGE).parts
    own = rel[1] if len(rel) > 2 and rel[0] == "frameworks" else None
    for library, package in (("torch", "torch"), ("torchvision", "torch"), ("timm", "torch"),
                             ("tensorflow", "keras"), ("keras", "keras"), ("tf2onnx", "keras")):
        if own != package:
            where = path.relative_to(REPO)
            assert library not in names, f"{where} imports {library}, which only frameworks/{package}/ may"


def test_the_top_of_the_package_is_the_stages():
    top = {p.stem for p in PACKAGE.glob("*.py")}
    expected = {*STAGES, "__init__", "__main__", *SHARED}
    assert top == expected, (f"pipeline/ holds {sorted(top - expected)} beside the stages: move them into the package "
                             f"they belong to; missing: {sorted(expected - top)}")


@pytest.mark.parametrize("path", all_modules(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_no_module_is_too_long_to_read_in_one_sitting(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(REPO)}: {lines} lines; split it by job (at most {MAX_LINES})"


def readme_tree() -> dict[str, set[str]]:
    """The README's layout block as {folder under pipeline/ ('' for the top): the .py files its lines list}.
    A folder's lines run from its `name/` line to the next folder's; nesting follows the indentation."""
    block = (REPO / "README.md").read_text().split("## Layout", 1)[1].split("```")[1]
    listed: dict[str, set[str]] = {}
    stack: list[tuple[int, str]] = []
    for line in block.splitlines():
        words = line.split()
        if not words:
            continue
        indent = len(line) - len(line.lstrip())
        if words[0] == "pipeline/" and indent == 0:
            stack = [(0, "")]
            listed[""] = set()
            continue
        if not stack or indent == 0:  # before pipeline/, or past it (tests/, docs/...)
            stack = []
            continue
        if words[0].endswith("/"):
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, stack[-1][1] + words[0]))
            listed[stack[-1][1]] = set()
        listed[stack[-1][1]] |= set(re.findall(r"(?<![\w.])\w+\.py\b", line))
    return listed


def test_the_readme_tree_lists_every_module_where_it_is():
    actual: dict[str, set[str]] = {}
    for path in all_modules():
        if path.name != "__init__.py":
            folder = path.parent.relative_to(PACKAGE).as_posix()
            actual.setdefault("" if folder == "." else folder + "/", set()).add(path.name)
    listed = readme_tree()
    for folder in sorted(set(actual) | set(listed)):
        where = f"pipeline/{folder}"
        assert folder in listed, f"README.md's layout has no line for {where}"
        assert folder in actual, f"README.md's layout lists {where}, which holds no module"
        assert listed[folder] == actual[folder], (
            f"README.md's layout under {where}: missing {sorted(actual[folder] - listed[folder])}, "
            f"not there {sorted(listed[folder] - actual[folder])}"
        )


def test_the_closure_sees_lazy_imports_and_skips_type_checking_ones():
    train = {p.relative_to(REPO).as_posix() for p in stage_closure("train")}
    assert "pipeline/frameworks/keras/backend.py" in train  # imported inside registry.backend_class
    finetune = {p.relative_to(REPO).as_posix() for p in stage_closure("finetune")}
    assert not any(p.startswith("pipeline/frameworks/keras") for p in finetune)
    assert "pipeline/tracking/worker.py" not in train  # a separate process that writes only to MLflow


def test_no_module_imports_itself_through_others():
    """No import circle, not even under TYPE_CHECKING: each layer reads from the ones below."""
    graph = {module_name(p): {n for n in imports(p, run_time_only=False) if module_path(n) and n != module_name(p)}
             for p in all_modules()}
    graph = {m: {n for n in deps if n in graph and not m.startswith(n + ".") and not n.startswith(m + ".")}
             for m, deps in graph.items()}  # a package and its own modules are one place

    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return [*path, start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
        return None

    circles = {" -> ".join(c) for m in graph if (c := cycle_from(m))}
    assert not circles, f"import circles: {sorted(circles)}"


@pytest.mark.parametrize("path", all_modules(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_reporters_are_imported_by_no_layer_beneath_the_stages(path):
    """The data, frameworks and evaluation layers compute outputs: they never reach MLflow's side."""
    if layer_of(path) in ("data", "frameworks", "evaluation"):
        found = {n for n in imports(path, run_time_only=False) if n in REPORTERS}
        assert not found, f"{path.relative_to(REPO)} imports {sorted(found)}, which only report to MLflow"


def observer_uses() -> dict[str, set[str]]:
    """Each observer name the rest of the package uses (`from obs import x`, `obs.x`): {name: users}."""
    used: dict[str, set[str]] = {}
    for path in all_modules():
        me = module_name(path)
        if me in OBSERVERS:
            continue
        tree, aliases = ast.parse(path.read_text()), {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    if full in OBSERVERS:
                        aliases[alias.asname or alias.name] = full
                    elif node.module in OBSERVERS:
                        used.setdefault(full, set()).add(me)
            elif isinstance(node, ast.Import):
                aliases.update({a.asname or a.name: a.name for a in node.names if a.name in OBSERVERS})
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                used.setdefault(f"{aliases[node.value.id]}.{node.attr}", set()).add(me)
    return used


def test_observers_hand_back_nothing_a_stage_computes_with():
    """What the package takes from an observer is a function returning None, a context manager
    yielding None, a constant, or a value OBSERVER_VALUES names with the reason it reaches no
    output: so an observer's edit cannot change what a stage writes."""
    definitions = {}
    for name in OBSERVERS:
        for node in ast.parse(module_path(name).read_text()).body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                definitions[f"{name}.{node.name}"] = node
    unexplained = {}
    for name, users in observer_uses().items():
        node = definitions.get(name)
        returns = ast.unparse(node.returns) if isinstance(node, ast.FunctionDef) and node.returns else None
        if name.rsplit(".", 1)[1].isupper() or returns in ("None", "Iterator[None]"):
            continue
        if name not in OBSERVER_VALUES:
            unexplained[name] = sorted(users)
    assert not unexplained, f"values taken from observers with no reason they reach no output: {unexplained}"
    assert set(OBSERVER_VALUES) <= set(observer_uses()), "OBSERVER_VALUES names something nothing uses"


