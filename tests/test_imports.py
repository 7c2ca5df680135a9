"""The package's import graph: no import cycles (module-level or inside functions), and the artifact layer is a leaf.

The graph is read from the source (every ``import ditdeploy...`` / ``from ditdeploy... import`` statement, at any
depth, mapped to the module it names; an import of a module's own parent package is not an edge: Python has
already imported it). ``ditdeploy.export`` / ``.calibration`` / ``.runtimes`` / ``.bench`` live in top-level folders.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"ditdeploy": "ditdeploy", "export": "ditdeploy.export", "calibration": "ditdeploy.calibration",
           "runtimes": "ditdeploy.runtimes", "bench": "ditdeploy.bench"}
# the artifact layer: errors, the on-disk formats, manifests and the output policy import only each other
ARTIFACT_LAYER = {"ditdeploy.errors", "ditdeploy.system.interrupts", "ditdeploy.config.variants",
                  "ditdeploy.system.cpu_isa", "ditdeploy.sources.shipped", "ditdeploy.artifact.files",
                  "ditdeploy.artifact.manifest", "ditdeploy.artifact.output_policy", "ditdeploy.artifact.formats",
                  "ditdeploy.artifact.onnx_header"}
# Known cycles, each with the reason it is still there. Any other cycle fails; when one of these is broken the test
# says so and the entry goes.
KNOWN_CYCLES = [
    # sample --server: generation dispatches to serving.client, which builds on generation's request/result types
    {"ditdeploy.run.generation", "ditdeploy.serving.client", "ditdeploy.serving.protocol"},
    # inside the artifact layer, function-level: the output policy scans an ONNX output for its external data
    # (graphcheck.scan), and graphcheck resolves those names with artifacts.safe_member
    {"ditdeploy.artifact.files", "ditdeploy.artifact.onnx_header", "ditdeploy.artifact.output_policy"},
]


def modules(root: Path, folders: dict[str, str]) -> dict[str, Path]:
    """Module name -> file for every .py under the package folders."""
    out = {}
    for folder, pkg in folders.items():
        for p in sorted((root / folder).rglob("*.py")):
            parts = list(p.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if folder == "ditdeploy" and parts and parts[0] in folders:  # the mapped folders are not in ditdeploy/
                continue
            out[".".join([pkg, *parts])] = p
    return out


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package modules it imports (at any depth in the file)."""

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for n in names:
                t = owner(n) if n.split(".")[0] == "ditdeploy" else None
                if t and t != m and not m.startswith(t + "."):
                    graph[m].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[set[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(comp)
    return found


def test_no_import_cycles():
    mods = modules(ROOT, FOLDERS)
    assert len(mods) > 100 and "ditdeploy.runtimes.registry" in mods  # the scan sees the whole tree
    found = cycles(import_graph(mods))
    new = [sorted(c) for c in found if c not in KNOWN_CYCLES]
    assert new == [], f"import cycle(s): {new}"
    gone = [sorted(c) for c in KNOWN_CYCLES if c not in found]
    assert gone == [], f"cycle(s) {gone} are broken: remove them from KNOWN_CYCLES"


def test_the_cycle_scan_catches_a_cycle(tmp_path):
    pkg = tmp_path / "ditdeploy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from ditdeploy.b import g\n\ndef f():\n    return g()\n")
    (pkg / "b.py").write_text("def g():\n    from ditdeploy import a  # only a function-level import\n    return a\n")
    (pkg / "c.py").write_text("import ditdeploy.a\n")
    graph = import_graph(modules(tmp_path, {"ditdeploy": "ditdeploy"}))
    assert graph["ditdeploy.c"] == {"ditdeploy.a"}
    assert cycles(graph) == [{"ditdeploy.a", "ditdeploy.b"}]


def test_the_artifact_layer_imports_nothing_above_it():
    mods = modules(ROOT, FOLDERS)
    graph = import_graph(mods)
    # ``from ditdeploy.sources import shipped`` also runs ditdeploy/sources/__init__.py: fine while it imports nothing
    inert = {m for m, p in mods.items() if p.name == "__init__.py" and not graph[m]}
    above = {m: sorted(graph[m] - ARTIFACT_LAYER - inert) for m in ARTIFACT_LAYER}
    # the scan reads them
    assert graph["ditdeploy.artifact.manifest"] >= {"ditdeploy.artifact.files", "ditdeploy.config.variants"}
    assert {m: v for m, v in above.items() if v} == {}
