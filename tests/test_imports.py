"""No import cycle among jsft's modules, function-level imports counted (an import inside a function that would
close a cycle is a cycle all the same: it only moves the failure to the call).

Edges: `import jsft.a.b` and `from jsft.a import b` (b a module) -> jsft.a.b; `from jsft.a import name` (a name
in jsft/a/__init__.py or jsft/a.py) -> jsft.a; relative imports resolved. The parent packages Python initializes
on the way (jsft/__init__.py for every `jsft.x`) are not edges: every module would be in a cycle with them.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_files(package_dir: Path) -> dict[str, Path]:
    """{dotted module name: file} for every .py under package_dir (a package's __init__.py is the package)."""
    modules = {}
    for path in package_dir.rglob("*.py"):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """{module: the package's modules it imports anywhere in its file (top level or inside functions)}."""
    modules = module_files(package_dir)
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names if alias.name in modules)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # from . import x, from ..data import y
                    parents = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parents + ([base] if base else []))
                for alias in node.names:
                    if f"{base}.{alias.name}" in modules:
                        edges.add(f"{base}.{alias.name}")
                    elif base in modules:
                        edges.add(base)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a list of modules, the first repeated at the end) per strongly connected group of modules."""
    cycles, done = [], set()
    for start in sorted(graph):
        if start in done:
            continue
        # the modules reachable from start that reach start again: start's strongly connected group
        reach = _reachable(graph, start)
        group = {m for m in reach if start in _reachable(graph, m)}
        done |= group | {start}
        if start in reach:
            cycles.append(_path_back(graph, start, group))
    return cycles


def _reachable(graph, start) -> set[str]:
    seen, todo = set(), list(graph[start])
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
    return seen


def _path_back(graph, start, group) -> list[str]:
    """The shortest import chain start -> ... -> start inside its group (breadth first)."""
    previous, frontier = {}, [start]
    while frontier:
        following = []
        for m in frontier:
            for n in sorted(graph[m] & (group | {start})):
                if n == start:
                    chain = [m]
                    while chain[-1] != start:
                        chain.append(previous[chain[-1]])
                    return [start, *reversed(chain[:-1]), start]
                if n not in previous:
                    previous[n] = m
                    following.append(n)
        frontier = following
    raise AssertionError(f"{start} is in no cycle")


def test_no_import_cycle_among_jsft_modules():
    graph = import_graph(ROOT / "jsft")
    assert "jsft.train" in graph and "jsft.data.pipeline" in graph  # the walk found the package
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (function-level imports counted):\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_cycle_hidden_in_a_function(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.c import helper\n")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from .sub import helper\n    return helper\n")
    (pkg / "sub" / "c.py").write_text("import os\n\ndef helper():\n    from ..a import b\n    return b\n")
    (pkg / "d.py").write_text("import pkg.a\n")  # imports into the cycle, is not in it
    graph = import_graph(pkg)
    assert graph["pkg.b"] == {"pkg.sub"} and graph["pkg.sub.c"] == {"pkg.a"} and graph["pkg.d"] == {"pkg.a"}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c", "pkg.a"]]
    (pkg / "sub" / "c.py").write_text("def helper():\n    return 1\n")
    assert find_cycles(import_graph(pkg)) == []
