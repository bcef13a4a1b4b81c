"""The architecture checks itself: import contracts (.importlinter), no import cycles, and no
function in ``cxr_ray`` over 80 lines.

``lint-imports`` (run by ``make lint``) checks the layers, the leaves, that ``cxr_ray`` never
imports ``trainers``/``jobs`` and that no sibling packages form a cycle. The cycle check here
is finer: module by module with grimp (import-linter's graph library), counting imports made
inside functions, and including a package ``__init__`` <-> its own module cycle, which
import-linter's sibling contract does not look at (cycles: networkx's strongly connected
components).
"""

from __future__ import annotations

import ast
import itertools
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]


def module_edges(graph: grimp.ImportGraph) -> dict[str, set[str]]:
    """Each module of the graph and the modules of the graph it imports (in functions too)."""
    return {m: graph.find_modules_directly_imported_by(m) & graph.modules for m in graph.modules}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component (networkx), sorted by its first module.

    Each cycle is a closed path ``[a, b, ..., a]``: a shortest way round from the component's
    first module (by name; ties between equally short ways broken by name too).
    """
    g = nx.DiGraph()  # built in sorted order, so the shortest paths found do not vary by run
    g.add_nodes_from(sorted(edges))
    g.add_edges_from(sorted((a, b) for a, bs in edges.items() for b in bs))
    found = []
    for component in nx.strongly_connected_components(g):
        start = min(component)
        if len(component) == 1 and not g.has_edge(start, start):
            continue  # a module alone, importing nothing that imports it back
        if g.has_edge(start, start):
            found.append([start, start])
            continue
        sub = g.subgraph(component)
        ways = [nx.shortest_path(sub, start, last) for last in sub.predecessors(start)]
        found.append([*min(ways, key=lambda way: (len(way), way)), start])
    return sorted(found)


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Every import cycle between modules of ``graph`` (see ``cycles``)."""
    return cycles(module_edges(graph))


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


# Graphs and the cycles the hand-written Tarjan implementation this file used before networkx
# returned for them (its output recorded, then that implementation deleted; it also agreed with
# ``cycles`` on 600 seeded random graphs of 1-40 modules).
TARJAN_CYCLES = [
    (
        {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"e"}, "e": {"d"}, "f": {"f", "a"}, "g": set()},
        [["a", "b", "c", "a"], ["d", "e", "d"], ["f", "f"]],
    ),
    ({"p": {"q", "t"}, "q": {"r"}, "r": {"s"}, "s": {"p"}, "t": {"p"}, "u": {"p"}}, [["p", "t", "p"]]),
    ({"x": {"y", "z"}, "y": {"z"}, "z": set()}, []),
    ({"k1": {"k2"}, "k2": {"k3", "k1x"}, "k3": {"k1"}, "k1x": {"k2"}}, [["k1", "k2", "k3", "k1"]]),
]


@pytest.mark.parametrize(("edges", "expected"), TARJAN_CYCLES)
def test_networkx_cycles_are_the_old_tarjan_ones(edges, expected):
    assert cycles(edges) == expected


MAX_FUNCTION_LINES = 80


def long_functions(package: Path, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    """``("path:line name", lines)`` of every function or method (nested ones too) in
    ``package`` longer than ``limit`` lines, counted as ``end_lineno - lineno + 1`` of the
    ``def`` (body and docstring; decorators not counted), longest first."""
    found = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > limit:
                    found.append((f"{path.relative_to(package.parent)}:{node.lineno} {node.name}", lines))
    return sorted(found, key=lambda item: (-item[1], item[0]))


def test_no_function_in_cxr_ray_is_over_80_lines():
    offenders = long_functions(ROOT / "cxr_ray")
    print("\n".join(f"{lines:4d} lines  {where}" for where, lines in offenders))
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(
        f"  {where}: {lines}" for where, lines in offenders
    )


def test_the_function_length_check_counts_def_to_last_line(tmp_path):
    statements = [f"x{i} = {i}" for i in range(77)]
    ok = ["@staticmethod", "def ok():", '    """Doc."""', *(f"    {x}" for x in statements), "    return 0"]
    long = ["class C:", "    def long(self):", "        def inner():", "            pass"]
    long += [*(f"        {x}" for x in statements), "        return 1"]
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("\n".join([*ok, "", *long, ""]))
    # ok: 80 lines from its def (the decorator not counted); long: 2 + 1 + 77 + 1 = 81
    assert long_functions(tmp_path / "pkg") == [("pkg/m.py:84 long", 81)]


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
