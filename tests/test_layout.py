"""The house's plan (docs/design.md, Layout; pipeline/__init__.py): every package and top-level
module stands on a floor, a module never imports one on a floor above it (at the top of
the file or inside a function), and no modules import each other in a circle. Read from
the source, so an import added anywhere fails here."""
import ast
from pathlib import Path

import pytest

from conftest import REPO_ROOT

# Bottom to top. A module may import modules of its own floor's package or below, never
# above; the library (pipeline) never imports the applications built on it.
FLOORS = [
    ("pipeline.redact", "pipeline.ranks", "pipeline.tokenizer", "pipeline.cli"),  # shared leaves
    ("pipeline.model",),
    ("pipeline.config", "pipeline.pixels"),
    ("pipeline.losses",),
    ("pipeline.data",),
    ("pipeline.objectives",),
    ("pipeline.weights",),
    ("pipeline.tracking",),
    ("pipeline.train",),
    ("data_prep",),
    ("eval",),
    ("launch",),
    ("bench",),
]
# Beside the floors: evaluation needs the encoder, never the training code (an export, or
# the trainer's module read through its encoder: eval/during_training.py)
APART = {"eval": ("pipeline.objectives", "pipeline.train")}
PACKAGES = ("pipeline", "eval", "launch", "data_prep", "bench")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for package in PACKAGES for p in sorted((REPO_ROOT / package).rglob("*.py"))}


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def floor_of(name: str) -> int | None:
    if name == "pipeline":  # the package's own __init__: a docstring
        return 0
    return next((i for i, prefixes in enumerate(FLOORS) for p in prefixes if within(name, p)), None)


def imported(source: str) -> set[str]:
    """Every dotted name an import statement names (a `from a.b import c` names a.b and a.b.c)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def project_modules(names: set[str], modules) -> set[str]:
    """The project's modules among imported names (a name's longest prefix that is one)."""
    out = set()
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name:
            out.add(name)
    return out


def upward_imports(name: str, imports: set[str]) -> list[str]:
    """What `name` imports from above its floor, or from a package it stands apart from."""
    floor = floor_of(name)
    bad = {i for i in imports if (floor_of(i) or 0) > floor}
    bad |= {i for prefix, apart in APART.items() if within(name, prefix)
            for i in imports for a in apart if within(i, a)}
    return sorted(bad)


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of a module graph: its strongly connected components of more
    than one module, and modules that import themselves (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


GRAPH = {name: project_modules(imported(path.read_text()), MODULES) - {name} for name, path in MODULES.items()}


def test_every_package_and_module_has_a_floor():
    assert [name for name in MODULES if floor_of(name) is None] == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_imports_one_above_it(name):
    assert upward_imports(name, GRAPH[name]) == []


def test_no_import_circle():
    assert circles(GRAPH) == []


@pytest.mark.parametrize("floor", range(len(FLOORS) - 1), ids=lambda i: FLOORS[i][0])
def test_the_check_sees_an_upward_import_into_each_floor(floor):
    """The check itself: a module planted in each package (or a top-level module itself)
    that imports, even inside a function, the floor above is found; the same import from
    the floor above is not."""
    above = FLOORS[floor + 1][0]
    probe = f"def f():\n    from {above}.x import y\n"
    for prefix in FLOORS[floor]:  # a probe inside a package, or a name within a top-level module
        planted = f"{prefix}.probe"
        assert upward_imports(planted, project_modules(imported(probe), {above, *MODULES})) == [above], planted
    assert upward_imports(f"{above}.probe", {FLOORS[floor][0]}) == []


def test_the_check_sees_eval_import_the_trainer():
    assert upward_imports("eval.probe", {"pipeline.train.trainer"}) == ["pipeline.train.trainer"]


def test_the_check_sees_a_planted_circle():
    """Two modules of one package that import each other (the loader and its samples once
    did, through StreamSpec), and a longer one: the checkpoint files importing the
    importer (checkpoint.py and interop.py once imported each other)."""
    graph = {**GRAPH, "pipeline.data.probe_a": {"pipeline.data.probe_b"}, "pipeline.data.probe_b": {"pipeline.data.probe_a"}}
    assert circles(graph) == [["pipeline.data.probe_a", "pipeline.data.probe_b"]]
    graph = {**GRAPH, "pipeline.weights.files": GRAPH["pipeline.weights.files"] | {"pipeline.weights.interop"}}
    assert circles(graph) == [["pipeline.weights.checkpoint", "pipeline.weights.export", "pipeline.weights.files",
                               "pipeline.weights.interop"]]


ENTRY_POINTS = sorted(name for name, path in MODULES.items()
                      if path.name == "__main__.py" or 'if __name__ == "__main__":' in path.read_text())


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_every_entry_point_opens_with_the_shared_command_line(name):
    """Every command we ship imports pipeline.cli at module level: its output is redacted,
    and the no-telemetry defaults are set before any library that reads them is imported
    (the flow itself runs under a network guard in tests/test_demo.py)."""
    top = ast.parse(MODULES[name].read_text()).body
    assert any(isinstance(node, ast.ImportFrom) and node.module == "pipeline.cli" for node in top), name


def test_the_no_telemetry_defaults_leave_a_users_choice_alone():
    from pipeline.cli import keep_local
    env = {}
    assert keep_local(env) == {"MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_DISABLE_TELEMETRY": "1",
                               "NO_ALBUMENTATIONS_UPDATE": "1"} and env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    env = {"MLFLOW_DISABLE_TELEMETRY": "false"}  # MLflow's telemetry turned back on: nothing else overrides it
    keep_local(env)
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "false" and "DO_NOT_TRACK" not in env
    env = {"DO_NOT_TRACK": "false", "NO_ALBUMENTATIONS_UPDATE": "0"}
    assert keep_local(env) == {}
