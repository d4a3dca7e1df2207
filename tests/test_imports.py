"""The import graph of the package: no cycles, and the project's own modules imported at the top of a file only (the
registries, which import a family or a reward on first use, are the exception)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("grpo_img", "policies", "rewards", "benchmarks")
REGISTRIES = {"policies/__init__.py", "rewards/__init__.py"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(node: ast.AST) -> list[str]:
    """Project modules named by one import statement (`from a.b import c` names a.b, and a.b.c if it is a module)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    else:
        return []
    return [n for n in names if n.split(".")[0] in PACKAGES]


def files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_own_modules_are_imported_at_the_top_of_files_only():
    offenders = []
    for path in files():
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if project_imports(node) and id(node) not in top and str(path.relative_to(ROOT)) not in REGISTRIES:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"function-level imports of the project's own modules: {offenders}"


def test_no_import_cycles():
    modules = {module_name(p): p for p in files()}
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        targets = {t for node in tree.body for t in project_imports(node) if t in modules}
        # importing a.b.c runs a/__init__ and a/b/__init__ first
        parents = {".".join(t.split(".")[:i]) for t in targets for i in range(1, t.count(".") + 1)}
        graph[name] = (targets | {p for p in parents if p in modules}) - {name}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(target):] + [node, target])
                                     if target in trail else f"import cycle through {node} -> {target}")
            if target not in state:
                visit(target, trail + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert len(graph) > 30  # the whole package was read
