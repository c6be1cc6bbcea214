"""The library's imports point downstream (README, Layout): a module never imports one
above it, at the top of the file or inside a function. Read from the source, so an
import added anywhere fails here."""
import ast
from pathlib import Path

import pytest

from conftest import REPO_ROOT

# module prefix -> the packages it must not import (everything above it)
ABOVE = {
    "pipeline.tokenizer": ("pipeline.model", "pipeline.losses", "pipeline.data", "pipeline.objectives",
                           "pipeline.engine", "pipeline.checkpoint", "pipeline.trainer"),
    "pipeline.model": ("pipeline.losses", "pipeline.data", "pipeline.objectives", "pipeline.engine",
                       "pipeline.checkpoint", "pipeline.trainer"),
    "pipeline.losses": ("pipeline.model", "pipeline.data", "pipeline.objectives", "pipeline.engine",
                        "pipeline.checkpoint", "pipeline.trainer"),
    "pipeline.data": ("pipeline.losses", "pipeline.objectives", "pipeline.engine", "pipeline.checkpoint",
                      "pipeline.trainer"),
    "pipeline.objectives": ("pipeline.engine", "pipeline.checkpoint", "pipeline.trainer"),
    "pipeline.engine": ("pipeline.data", "pipeline.objectives", "pipeline.checkpoint", "pipeline.trainer"),
    "pipeline.checkpoint": ("pipeline.objectives", "pipeline.data", "pipeline.engine", "pipeline.trainer"),
    "eval": ("pipeline.objectives", "pipeline.engine", "pipeline.trainer"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


SOURCES = sorted([*(REPO_ROOT / "pipeline").rglob("*.py"), *(REPO_ROOT / "eval").rglob("*.py")])


def upward_imports(name: str, path: Path) -> list[str]:
    forbidden = [above for prefix, aboves in ABOVE.items() if name == prefix or name.startswith(prefix + ".")
                 for above in aboves]
    return sorted(i for i in imported(path) for above in forbidden if i == above or i.startswith(above + "."))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_no_module_imports_one_above_it(path):
    assert upward_imports(module_name(path), path) == []


def test_the_check_sees_an_upward_import(tmp_path):
    """The check itself: a function-local import of the objectives in a data module is found."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from pipeline.objectives import TrainModule\n")
    assert upward_imports("pipeline.data.probe", probe) == ["pipeline.objectives", "pipeline.objectives.TrainModule"]
    assert upward_imports("pipeline.trainer", probe) == []
