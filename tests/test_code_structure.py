"""The shape of the source tree: no import cycles between lmgen's modules and no private (underscore) names
imported from another module (design.md: pass dependencies in; what another module needs is public)."""

from __future__ import annotations

import ast
from pathlib import Path

import lmgen

SRC = Path(lmgen.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names) for every import of lmgen modules in `path`, TYPE_CHECKING blocks included."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("lmgen"):
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names if a.name.startswith("lmgen"))
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        for target, names in imports(path):
            for name in names or [""]:
                full = f"{target}.{name}" if name else target
                dest = full if full in modules else target
                if dest in modules and dest != mod:
                    edges[mod].add(dest)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_private_names_imported_across_modules():
    bad = []
    for path in SRC.rglob("*.py"):
        for target, names in imports(path):
            bad += [f"{module_name(path)} imports {target}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, "\n".join(bad)


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def defined_names(path: Path) -> set[str]:
    """Names a module defines itself (functions, classes, assignments), not the ones it imports."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def test_names_are_imported_from_their_home():
    """No re-export shims: `from lmgen.a.b import X` finds X defined in lmgen.a.b itself (the top-level `lmgen`
    package, the public API, is the one exception)."""
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    bad = []
    for path in list(SRC.rglob("*.py")) + list((SRC.parent.parent / "tests").glob("*.py")):
        for target, names in imports(path):
            if target == "lmgen" or target not in modules:
                continue
            home = defined_names(modules[target])
            bad += [f"{path.name} imports {n} from {target}" for n in names
                    if n not in home and f"{target}.{n}" not in modules]
    assert not bad, "\n".join(bad)
