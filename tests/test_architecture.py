"""The architecture checks itself: import contracts (.importlinter) and no import cycles.

``lint-imports`` (run by ``make lint``) checks the layers, the leaves, that ``cxr_ray`` never
imports ``trainers``/``jobs`` and that no sibling packages form a cycle. The cycle check here
is finer: module by module with grimp (import-linter's graph library), counting imports made
inside functions, and including a package ``__init__`` <-> its own module cycle, which
import-linter's sibling contract does not look at.
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Every import cycle between modules, one cycle per strongly connected component.

    Each cycle is a closed path ``[a, b, ..., a]`` (Tarjan's algorithm, then a shortest way
    round from the component's first module).
    """
    edges = {m: sorted(graph.find_modules_directly_imported_by(m) & graph.modules) for m in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(start: str) -> None:  # iterative Tarjan: no recursion limit on big graphs
        work = [(start, iter(edges[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            child = next(it, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        comp.append(m)
                        if m == node:
                            break
                    if len(comp) > 1 or node in edges[node]:
                        components.append(sorted(comp))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(edges[child])))
            elif child in on_stack:
                low[node] = min(low[node], index[child])

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return [_shortest_loop(comp, edges) for comp in components]


def _shortest_loop(component: list[str], edges: dict[str, list[str]]) -> list[str]:
    members, start = set(component), component[0]
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in edges[node]:
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if child in members and child not in parents:
                    parents[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"no loop through {start}")  # a component always has one


def describe(graph: grimp.ImportGraph, cycle: list[str]) -> str:
    """``a -> b (l.12) -> a (l.40, in a function)``: the lines that make the cycle."""
    parts = [cycle[0]]
    for importer, imported in itertools.pairwise(cycle):
        lines = [d["line_number"] for d in graph.get_import_details(importer=importer, imported=imported)]
        parts.append(f"{imported} (l.{','.join(map(str, lines)) or '?'} of {importer})")
    return " -> ".join(parts)


def _assert_acyclic(graph: grimp.ImportGraph) -> None:
    cycles = import_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(describe(graph, c) for c in cycles)


def test_cxr_ray_has_no_import_cycles_between_modules():
    _assert_acyclic(grimp.build_graph("cxr_ray", cache_dir=None))


def _write_package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture
def tiny_package(tmp_path, monkeypatch):
    """A generated package ``cyc`` on sys.path (grimp finds packages by import spec)."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def make(files: dict[str, str]) -> grimp.ImportGraph:
        _write_package(tmp_path, files)
        return grimp.build_graph("cyc", cache_dir=None)

    yield make
    for name in [m for m in sys.modules if m == "cyc" or m.startswith("cyc.")]:
        del sys.modules[name]


def test_the_cycle_check_finds_a_cycle_made_by_an_import_inside_a_function(tiny_package):
    graph = tiny_package(
        {
            "cyc/__init__.py": "",
            "cyc/a/__init__.py": "",
            "cyc/a/low.py": "def f():\n    from cyc.b import high\n    return high\n",
            "cyc/b/__init__.py": "",
            "cyc/b/high.py": "\n\nfrom cyc.a import mid\n",
            "cyc/a/mid.py": "from cyc.a import low\n",
            "cyc/c.py": "import cyc.a.low\n",  # imports into the cycle, is not part of it
        }
    )
    assert import_cycles(graph) == [["cyc.a.low", "cyc.b.high", "cyc.a.mid", "cyc.a.low"]]
    with pytest.raises(AssertionError) as err:
        _assert_acyclic(graph)
    assert "cyc.a.low -> cyc.b.high (l.2 of cyc.a.low) -> cyc.a.mid (l.3 of cyc.b.high)" in str(err.value)


def test_the_cycle_check_finds_a_package_init_cycle_and_passes_a_dag(tiny_package):
    graph = tiny_package(
        {
            "cyc/__init__.py": "from cyc.engine import run\n",
            "cyc/engine.py": "import cyc\n",
            "cyc/leaf.py": "",
            "cyc/user.py": "from cyc import leaf\nfrom cyc.engine import run\n",
        }
    )
    assert import_cycles(graph) == [["cyc", "cyc.engine", "cyc"]]
    graph.remove_import(importer="cyc.engine", imported="cyc")
    assert import_cycles(graph) == []


def _lint_imports() -> str:
    exe = Path(sys.executable).with_name("lint-imports")
    cmd = str(exe) if exe.exists() else shutil.which("lint-imports")
    if cmd is None:
        pytest.skip("lint-imports is not installed (pip install -e '.[dev]')")
    return cmd


def test_import_contracts_are_kept():
    proc = subprocess.run(
        [_lint_imports(), "--no-cache", "--no-logo"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = re.search(r"Contracts: (\d+) kept, (\d+) broken", proc.stdout)
    assert m and int(m.group(1)) >= 4 and m.group(2) == "0", proc.stdout


def test_import_contracts_catch_a_layer_a_leaf_and_an_entrypoint_violation(tmp_path):
    """A scratch copy with three bad imports made inside functions breaks three contracts."""
    for pkg in ("cxr_ray", "trainers", "jobs"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path)
    with (tmp_path / "cxr_ray/io/uris.py").open("a") as f:
        f.write("\n\ndef _up():\n    from cxr_ray.scoring import schema\n\n    return schema\n")
    with (tmp_path / "cxr_ray/labels.py").open("a") as f:
        f.write("\n\ndef _up():\n    import cxr_ray.models.card\n    import trainers\n")
    proc = subprocess.run(
        [_lint_imports(), "--no-cache", "--no-logo"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = " ".join(proc.stdout.split())  # rich wraps long lines
    assert proc.returncode == 1, out
    assert "cxr_ray.io is not allowed to import cxr_ray.scoring" in out
    assert "cxr_ray.labels is not allowed to import cxr_ray.models" in out
    assert "cxr_ray is not allowed to import trainers" in out
    assert "No cycles are allowed in cxr_ray" in out  # io -> scoring -> ... -> io
