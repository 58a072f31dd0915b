"""The layout is the architecture: imports between the harness's packages point one way
(commands -> analysis / tuning / perf -> execution -> fitting -> api, settings, evaluation -> store / data), and functions stay short enough to read at once."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: What each package may import from the project (besides itself, ``benchmark`` and ``benchmark.naming``).
#: The pipeline reads top to bottom: data and results, the method contract, fitting one fold, running a grid,
#: tuning and performance tools on top of it, analysis of a store, and the commands.
ALLOWED = {
    "data": set(),
    "store": set(),
    "settings": {"store"},
    "evaluation": set(),
    "api": {"data"},
    "fitting": {"api", "data", "settings", "evaluation", "store"},
    "execution": {"api", "data", "settings", "evaluation", "fitting", "store"},
    "tuning": {"api", "data", "settings", "evaluation", "fitting", "execution", "store"},
    "perf": {"api", "data", "settings", "evaluation", "fitting", "execution", "store"},
    "analysis": {"api", "data", "settings", "evaluation", "store"},
    "commands": {"api", "data", "settings", "evaluation", "fitting", "execution", "tuning", "perf", "store",
                 "analysis", "cli"},
    "methods": {"api", "data"},
}
MAX_LINES, MAX_NESTING = 60, 3
NESTING_NODES = (ast.If, ast.For, ast.While, ast.With, ast.Try, ast.AsyncFor, ast.AsyncWith)


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "methods":
        return "methods"
    if parts[0] == "benchmark" and len(parts) > 1:
        return parts[1] if parts[1] in ALLOWED or parts[1] == "cli" else None
    return None


def project_files():
    for folder in ("benchmark", "methods"):
        yield from sorted((REPO / folder).rglob("*.py"))


def imported_modules(tree: ast.AST):
    """``(line, module)`` of every import; ``from package import name`` also yields ``package.name`` (a
    submodule, when it is one)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name


@pytest.mark.parametrize("path", list(project_files()), ids=lambda p: str(p.relative_to(REPO)))
def test_imports_point_one_way(path):
    own = layer_of(".".join(path.relative_to(REPO).with_suffix("").parts))
    if own not in ALLOWED:
        return
    for line, module in imported_modules(ast.parse(path.read_text())):
        other = layer_of(module)
        assert other is None or other == own or other in ALLOWED[own], (
            f"{path.relative_to(REPO)}:{line}: layer {own!r} imports {module} (layer {other!r})")


def nesting(node: ast.AST, depth: int = 0) -> int:
    deepest = depth
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        deepest = max(deepest, nesting(child, depth + isinstance(child, NESTING_NODES)))
    return deepest


def body_lines(fn: ast.FunctionDef) -> int:
    body = fn.body
    has_doc = isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant)
    start = body[1].lineno if has_doc and len(body) > 1 else body[0].lineno
    return fn.end_lineno - start + 1


@pytest.mark.parametrize("path", list(project_files()), ids=lambda p: str(p.relative_to(REPO)))
def test_functions_are_short_and_shallow(path):
    tree = ast.parse(path.read_text())
    too_long = [
        f"{fn.name} ({body_lines(fn)} lines, nesting {nesting(fn)})"
        for fn in ast.walk(tree)
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        and (body_lines(fn) > MAX_LINES or nesting(fn) > MAX_NESTING)
    ]
    assert not too_long, f"{path.relative_to(REPO)}: {', '.join(too_long)}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> project modules it imports, at module level or inside functions (both can close a circle)."""
    modules = {module_name(p): p for p in project_files()}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for _, imported in imported_modules(ast.parse(path.read_text())):
            while imported and imported not in modules:  # ``benchmark.api.Bag`` -> benchmark.api
                imported = imported.rpartition(".")[0]
            if imported and imported != name and imported not in ("benchmark", "methods"):
                targets.add(imported)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (depth-first search), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = 1, stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            found = None if state.get(nxt) == 2 else visit(nxt)
            if found:
                return found
        state[node], _ = 2, stack.pop()
        return None

    for node in sorted(graph):
        found = None if node in state else visit(node)
        if found:
            return found
    return None


def test_find_cycle_finds_a_circle_and_only_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circles_within_or_across_packages():
    """Function-level imports count too: a circle hidden in a function is still a circle."""
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)
