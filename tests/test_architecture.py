"""Who imports whom: the packages of mhsa_core depend on each other one way.

Every `import` of src/mhsa_core is read with `ast` (also those inside
functions: a lazy import is still a dependency) and mapped to its package:
`mhsa_core.consistency.matrix` is "consistency", a top-level module
(`mhsa_core.cli`, `mhsa_core._subprocess`) is its own. The graph of those
must have no cycle: a cycle is two packages that cannot be understood, tested
or changed apart (the consistency tool and the bench once imported each
other, through the CLI).

`mhsa_core/__init__.py`, the package's public face, is no node: importing
any submodule runs it, and it imports its names lazily (PEP 562) and only
when asked. A name taken from it (`from mhsa_core import
MultiHeadSelfAttention2D`) counts as the module that defines the name.
"""

import ast
from pathlib import Path

import pytest

import mhsa_core

SRC = Path(mhsa_core.__file__).resolve().parent
ROOT = "mhsa_core"
# The packages the architecture names (docs/architecture.md); the test covers
# every module, these must at least be there.
PACKAGES = ("consistency", "bench", "layers", "convert", "reference", "distribution")


def _module_name(path):
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(dotted):
    """Whether `dotted` (mhsa_core.x.y) is a module or package of the source."""
    path = SRC.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imported(tree, module, is_package):
    """The mhsa_core modules a module's syntax tree imports."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == ROOT}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package upwards
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != ROOT:
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if _is_module(sub):
                    found.add(sub)
                elif source == ROOT and alias.name in mhsa_core._LAZY:
                    found.add(mhsa_core._LAZY[alias.name])  # the lazy public names
                else:
                    found.add(source)
    return found


def _package(module):
    """The node of a module: its top-level package or module under mhsa_core."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the root __init__


def package_graph():
    """{package: {packages it imports}} of every module of src/mhsa_core."""
    graph = {}
    for path in sorted(SRC.rglob("*.py")):
        module = _module_name(path)
        source = _package(module)
        if source is None:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        targets = {
            _package(m) for m in _imported(tree, module, path.name == "__init__.py")
        }
        graph.setdefault(source, set()).update(
            t for t in targets if t is not None and t != source
        )
    return graph


def find_cycle(graph):
    """A cycle of `graph` as [a, b, ..., a], or None."""
    state = {}  # node -> "open" (on the current path) or "done"

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, path + [nxt])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [node])
            if cycle:
                return cycle
    return None


def _edges(graph):
    return "\n".join(
        f"  {a} -> {', '.join(sorted(b)) or '-'}" for a, b in sorted(graph.items())
    )


def test_package_graph_has_no_cycle():
    graph = package_graph()
    assert set(PACKAGES) <= set(graph), sorted(graph)
    cycle = find_cycle(graph)
    assert cycle is None, (
        f"import cycle between packages: {' -> '.join(cycle)}\n"
        f"the package graph:\n{_edges(graph)}"
    )


def test_layers_do_not_import_convert():
    """Converters fill a layer (convert -> layers), never the other way."""
    graph = package_graph()
    assert "convert" not in graph["layers"], _edges(graph)
    assert "layers" in graph["convert"], _edges(graph)


def test_the_tools_do_not_import_each_other():
    """The consistency tool and the bench share `_subprocess` and `_text`;
    only the top-level `cli` imports both."""
    graph = package_graph()
    assert "bench" not in graph["consistency"], _edges(graph)
    assert "consistency" not in graph["bench"], _edges(graph)
    assert {"consistency", "bench"} <= graph["cli"], _edges(graph)


@pytest.mark.parametrize(
    "graph, cycle",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"b", "c"}, "b": set(), "c": {"c2"}, "c2": {"c"}}, ["c", "c2", "c"]),
    ],
    ids=["acyclic", "three", "two-off-the-path"],
)
def test_find_cycle(graph, cycle):
    """The checker itself: it finds a cycle where there is one."""
    assert find_cycle(graph) == cycle


def test_imports_are_read_from_inside_functions_and_relative():
    tree = ast.parse(
        "def f():\n    from mhsa_core.layers import mhsa2d\n"
        "from . import budgets\nfrom .. import reference\nimport numpy\n"
        "from mhsa_core import mhsa_block, __version__\n"
    )
    assert _imported(tree, "mhsa_core.consistency.checks", False) == {
        "mhsa_core.layers.mhsa2d",
        "mhsa_core.consistency.budgets",
        "mhsa_core.reference",
        "mhsa_core.layers.block",  # a lazy name: the module that defines it
        "mhsa_core",  # the root itself: no node
    }


def test_the_entry_point_is_the_top_level_cli():
    """`mhsa-core` (pyproject's [project.scripts]) runs `mhsa_core.cli:main`,
    the module that dispatches to both tools."""
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((SRC.parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["mhsa-core"] == "mhsa_core.cli:main"
