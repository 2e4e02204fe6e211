"""The nanopost-internal import graph has no cycle: dependencies go one way.

Every `import` and `from ... import` in every module is read with `ast`, at the top level and inside
functions alike (a lazy import only hides a cycle until the function runs). `from a import b` counts
as an import of the module `a.b` when that is a module of the package, else of `a`. Importing a
submodule also runs its package's `__init__.py`; that implicit edge is left out (a package importing
its own submodules is how packages are built), while a written import of a package is an edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "nanopost"

# Cycles known and accepted, each as the sorted tuple of its modules, with the reason. Empty: none.
ALLOWED_CYCLES: set[tuple[str, ...]] = set()


def module_names(package_dir: Path) -> dict[str, Path]:
    """dotted module name -> file, for every .py file under the package directory."""
    names = {}
    for file in sorted(package_dir.rglob("*.py")):
        parts = list(file.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = file
    return names


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports anywhere in its code."""
    modules = module_names(package_dir)
    root = package_dir.name
    graph: dict[str, set[str]] = {}
    for name, file in modules.items():
        is_package = file.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"), str(file))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: `from .x import y` inside package p is p.x
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    targets.add(sub if sub in modules else source)
        graph[name] = {t for t in targets if t in modules and t != name and t.split(".")[0] == root}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module, each as a path a -> b -> ... -> a."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm; the graph has a few dozen nodes
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_path(graph, group) for group in groups]


def _cycle_path(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """One cycle through the group, starting from its first module by name."""
    start = min(group)
    path, seen = [start], {start}
    while True:
        nxt = sorted(w for w in graph[path[-1]] if w in group)
        back = [w for w in nxt if w == start]
        if back and len(path) > 1:
            return path + [start]
        fresh = [w for w in nxt if w not in seen]
        if not fresh:  # any cycle in the group closes on a module already on the path
            w = next(w for w in nxt if w in seen)
            return path[path.index(w):] + [w]
        path.append(fresh[0])
        seen.add(fresh[0])


def test_finds_a_cycle_through_a_lazy_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from .sub import c\n")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.c import g\n")  # c -> its package: not an edge
    (pkg / "sub" / "c.py").write_text("import os\nfrom .. import a\n")
    graph = import_graph(pkg)
    assert graph["pkg.b"] == {"pkg.sub.c"} and graph["pkg.sub.c"] == {"pkg.a"}
    assert graph["pkg.sub"] == {"pkg.sub.c"}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]


def test_nanopost_imports_have_no_cycle():
    graph = import_graph(PACKAGE_DIR)
    assert "nanopost.rewards" in graph and "nanopost.plumbing.safe_math" in graph["nanopost.rewards"]
    cycles = [c for c in find_cycles(graph) if tuple(sorted(set(c))) not in ALLOWED_CYCLES]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


# ---------------------------------------------------------------- tiers

SUBPACKAGES = ("plumbing", "fast", "tools")

# Edges that cross the tiers' direction today. The plumbing loads the reward models of
# --reward-models for the GRPO loop (lazily, only when a run names one); once reward-model scoring
# and training live apart, this edge goes. The set must shrink, never grow.
KNOWN_CROSSINGS = {
    ("nanopost.plumbing.user_rewards", "nanopost.tools.reward_model"),
}


def tier(module: str) -> str:
    """core, plumbing, fast or tools: the subpackage a module sits in (core: the package's top)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in SUBPACKAGES else "core"


def crossings(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """Imports of the tools from outside them, and of the plumbing or the tools by the fast path."""
    bad = set()
    for a, targets in graph.items():
        for b in targets:
            if tier(b) == "tools" and tier(a) != "tools":
                bad.add((a, b))
            elif tier(a) == "fast" and tier(b) in ("plumbing", "tools"):
                bad.add((a, b))
    return bad


def test_tier_of_a_module():
    assert tier("nanopost.grpo") == "core" and tier("nanopost.tasks.countdown") == "core"
    assert tier("nanopost.plumbing.hf_io") == "plumbing" and tier("nanopost.fast.lm_head") == "fast"
    assert tier("nanopost.tools") == "tools" and tier("nanopost") == "core"
    graph = {"nanopost.model": {"nanopost.fast.fused", "nanopost.tools.plot"},
             "nanopost.fast.fused": {"nanopost.plumbing.files"}, "nanopost.tools.plot": {"nanopost.model"}}
    assert crossings(graph) == {("nanopost.model", "nanopost.tools.plot"),
                                ("nanopost.fast.fused", "nanopost.plumbing.files")}


def test_nothing_outside_the_tools_imports_them():
    graph = import_graph(PACKAGE_DIR)
    assert {"nanopost.tools.monitor", "nanopost.plumbing.hf_io", "nanopost.fast.fused"} <= set(graph)
    found = crossings(graph)
    assert not found - KNOWN_CROSSINGS, f"imports against the tiers: {sorted(found - KNOWN_CROSSINGS)}"
    assert not KNOWN_CROSSINGS - found, f"gone, drop from KNOWN_CROSSINGS: {sorted(KNOWN_CROSSINGS - found)}"


def test_the_core_imports_no_tools():
    # DESIGN.md: nothing in the core imports the tools, lazily or not, and no crossing is allowed here.
    graph = import_graph(PACKAGE_DIR)
    assert {"nanopost.grpo_loop", "nanopost.tasks.countdown"} <= set(graph)
    found = sorted((a, b) for a, targets in graph.items() if tier(a) == "core" for b in targets if tier(b) == "tools")
    assert not found, f"the core imports the tools: {found}"


def test_the_plumbing_takes_nothing_from_the_core_but_the_model():
    # It loads, saves and wraps the model; the checks that need the tasks or the schedules stay in
    # the loops (GRPOConfig), so the options in plumbing/options.py need none of the core.
    graph = import_graph(PACKAGE_DIR)
    assert "nanopost.plumbing.options" in graph
    found = sorted((a, b) for a, targets in graph.items() if tier(a) == "plumbing"
                   for b in targets if tier(b) == "core" and b != "nanopost.model")
    assert not found, f"the plumbing imports the core: {found}"
