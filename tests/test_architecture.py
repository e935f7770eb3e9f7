"""The package's structure as a newcomer meets it: no import cycles between modules, and no private name
(`_x`) used outside the module that defines it (library and benchmarks alike)."""
from __future__ import annotations

import ast
import re
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "honeypotnet"
BENCH = ROOT / "bench"


def _module_name(path: Path) -> str:
    base = ROOT / "src" if path.is_relative_to(ROOT / "src") else ROOT
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _files() -> list[Path]:
    return sorted([*SRC.rglob("*.py"), *BENCH.rglob("*.py")])


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(path: Path) -> list[tuple[str, list[str], ast.AST]]:
    """(imported module, names taken from it, node) for every import in the file, at any depth."""
    module = _module_name(path)
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node, path.name == "__init__.py")
            out.append((target, [a.name for a in node.names], node))
    return out


def _known_modules() -> set[str]:
    return {_module_name(p) for p in _files()}


def test_no_import_cycles():
    known = _known_modules()
    graph: dict[str, set[str]] = {}
    for path in _files():
        mod = _module_name(path)
        deps = set()
        for target, names, _ in _imports(path):
            for cand in [f"{target}.{n}" for n in names] + [target]:
                if cand in known and cand != mod:
                    deps.add(cand)
                    break
        graph[mod] = deps
    # a package's __init__ importing its own submodules is how packages are built, not a cycle
    for mod, deps in graph.items():
        graph[mod] = {d for d in deps if not d.startswith(mod + ".")}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_private_name_is_used_outside_its_module():
    known = _known_modules()
    found = []
    for path in _files():
        tree = ast.parse(path.read_text())
        aliases = {}  # local name -> our module it refers to
        for target, names, node in _imports(path):
            if isinstance(node, ast.ImportFrom):
                for a in node.names:
                    if _private(a.name):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {a.name} from {target}")
                    if f"{target}.{a.name}" in known:
                        aliases[a.asname or a.name] = f"{target}.{a.name}"
            else:
                for a in node.names:
                    if a.name in known:
                        aliases[a.asname or a.name.split(".")[0]] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not found, "\n".join(found)


def test_the_repository_stands_alone():
    """Code, help texts, tests and docs cite nothing a user of the repository does not have: no internal
    specification file, no issue numbers."""
    needle = re.compile(r"PAPER\.md|[Ii]ssue #?[0-9]")
    hits = []
    files = [*_files(), *(ROOT / "tests").glob("*.py"), *(ROOT / "docs").rglob("*.md"), ROOT / "README.md",
             *(SRC / "configs").glob("*.toml")]
    for path in files:
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if needle.search(line) and path.name != "test_architecture.py":
                hits.append(f"{path.relative_to(ROOT)}:{i}")
    assert not hits, f"{len(hits)} lines: {hits[:20]}"


def test_every_user_of_a_shared_run_is_scheduled_with_it():
    """conftest's SHARED_RUNS lists the test files of each costly session fixture, so pytest-xdist runs them on one
    worker and makes the fixture once: a file that names the fixture and is not listed would make it again on
    another worker (minutes). Every listed file exists and names its fixture."""
    from conftest import SHARED_RUNS

    tests = ROOT / "tests"
    for run, listed in SHARED_RUNS.items():
        users = {p.name for p in tests.glob("test_*.py") if re.search(rf"\b{run}\b", p.read_text())}
        assert users == set(listed), (run, sorted(users ^ set(listed)))
