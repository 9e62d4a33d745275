"""The package's layers as the README's module map draws them: every import of every module
(read with ``ast``, those under ``if TYPE_CHECKING:`` aside) goes to its own layer or below,
the task families never import each other, and no import goes in a circle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "medxfer"
TASK_FAMILIES = {"classification", "segmentation", "detection"}


def readme_layers() -> list[set[str]]:
    """The module map's layers, bottom first: each line ``name, name | what they do``."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"### Module map\n.*?```text\n(.*?)```", text, re.S)
    assert block, "README.md has no module map"
    layers = [
        {name.strip() for name in line.split("|")[0].split(",")}
        for line in block.group(1).splitlines()
        if line.strip()
    ]
    return layers[::-1]


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def lazy_names() -> dict[str, str]:
    """The package root's lazy names (``medxfer.train`` -> ``medxfer.api``): importing one
    imports its module."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "_LAZY":
            return ast.literal_eval(node.value)
    return {}


def imported(path: Path) -> list[tuple[str, int]]:
    """``(module, line)`` of every medxfer import in the file, at any depth (``import``,
    ``from ... import``, a lazy name of the package root, ``importlib.import_module`` of a
    literal name), except the ones a type checker alone reads (``if TYPE_CHECKING:``)."""
    found: list[tuple[str, int]] = []
    lazy = lazy_names()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and ast.unparse(node.test) in TYPE_CHECKING:
            for branch in node.orelse:
                visit(branch)
            return
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] == "medxfer":
                found.append((node.module, node.lineno))
                for a in node.names:
                    name = f"{node.module}.{a.name}"
                    found.append(
                        (lazy.get(a.name, name) if node.module == "medxfer" else name, node.lineno)
                    )
        elif isinstance(node, ast.Import):
            found.extend((a.name, node.lineno) for a in node.names if a.name[:8] == "medxfer.")
        elif _imports_by_name(node):
            found.append((str(node.args[0].value), node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


TYPE_CHECKING = {"TYPE_CHECKING", "typing.TYPE_CHECKING"}


def _imports_by_name(node: ast.AST) -> bool:
    """``importlib.import_module("medxfer....")`` with a literal name."""
    return (
        isinstance(node, ast.Call)
        and ast.unparse(node.func).endswith("import_module")
        and bool(node.args)
        and isinstance(node.args[0], ast.Constant)
    )


def relative_imports(path: Path) -> list[int]:
    return [
        n.lineno
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.ImportFrom) and n.level > 0
    ]


def component(module: str) -> str:
    """``medxfer.segmentation.run`` -> ``segmentation``; the package root is ``medxfer``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "medxfer"


def graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: line}, over the package's own modules."""
    known = modules()
    edges: dict[str, dict[str, int]] = {}
    for name, path in known.items():
        edges[name] = {t: line for t, line in imported(path) if t in known and t != name}
    return edges


def test_every_component_is_in_exactly_one_layer():
    layers = readme_layers()
    placed = [name for layer in layers for name in layer]
    assert len(placed) == len(set(placed)), "a component is drawn in two layers"
    present = {component(m) for m in modules()}
    assert present - set(placed) == set(), "components missing from the module map"
    assert set(placed) - present == set(), "the module map names components that do not exist"


def test_no_import_goes_up_or_across_task_families():
    level = {name: i for i, layer in enumerate(readme_layers()) for name in layer}
    wrong = []
    for source, targets in graph().items():
        for target, line in targets.items():
            a, b = component(source), component(target)
            if level[b] > level[a] or (a != b and {a, b} <= TASK_FAMILIES):
                wrong.append(f"{modules()[source].relative_to(ROOT)}:{line} imports {target}")
    assert wrong == []


def test_imports_are_absolute():
    """A relative import would hide its target from the layer walk."""
    found = [
        f"{p.relative_to(ROOT)}:{line}" for p in modules().values() for line in relative_imports(p)
    ]
    assert found == []


def test_no_import_cycle():
    """Tarjan's strongly connected components of the module graph are all single modules."""
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for v in edges:
        if v not in index:
            connect(v)
    assert cycles == []


def test_the_walk_sees_imports_inside_functions_and_skips_type_checking(tmp_path):
    """The checker itself: a lazy import counts, a TYPE_CHECKING one does not."""
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from medxfer.api import train\n"
        "def f():\n    from medxfer.cli import main\n    import medxfer.study.spec\n"
    )
    names = [m for m, _ in imported(source)]
    assert "medxfer.cli" in names and "medxfer.study.spec" in names
    assert "medxfer.api" not in names
    # the ways round the walk that an outside review found
    source.write_text(
        "import importlib\nfrom typing import TYPE_CHECKING\n"
        "if not TYPE_CHECKING:\n    from medxfer.study import spec\n"
        "from medxfer import train\n"
        "def f():\n    importlib.import_module('medxfer.serve')\n"
        "from ..cli import main\n"
    )
    names = [m for m, _ in imported(source)]
    assert {"medxfer.study", "medxfer.api", "medxfer.serve"} <= set(names)
    assert relative_imports(source) == [8]
