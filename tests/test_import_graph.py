"""attnprog's imports, lazy ones included, point one way: no cycles, and cli -> engine ->
kernels, engine -> synth; synth never imports engine or kernels, nor torch at module level."""

import ast
from pathlib import Path

import attnprog

PACKAGE = Path(attnprog.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imported(node: ast.AST, here: str, is_package: bool, known: set[str]) -> list[str]:
    """The attnprog modules one import statement loads (``from pkg import mod`` names mod)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in known]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: from the module's package, up level - 1 more
        package = here.split(".") if is_package else here.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    names = [f"{base}.{alias.name}" for alias in node.names]
    return [name for name in names if name in known] or ([base] if base in known else [])


def import_graph() -> dict[str, set[str]]:
    found = modules()
    graph = {}
    for name, path in found.items():
        tree = ast.parse(path.read_text())
        is_package = path.name == "__init__.py"
        graph[name] = {target for node in ast.walk(tree)
                       for target in imported(node, name, is_package, set(found))} - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_lazy_imports_inside_functions():
    graph = import_graph()
    assert "attnprog.engine.run.pipeline" in graph["attnprog.cli"]  # imported inside `run`


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_itself_back_through_others():
    assert cycles(import_graph()) == []


def test_synth_never_imports_engine_or_kernels():
    graph = import_graph()
    wrong = {(source, target) for source, targets in graph.items() if source.startswith("attnprog.synth")
             for target in targets if target.startswith(("attnprog.engine", "attnprog.kernels"))}
    assert not wrong


def test_kernels_never_import_engine_synth_or_the_cli():
    graph = import_graph()
    wrong = {(source, target) for source, targets in graph.items()
             if source.startswith("attnprog.kernels") for target in targets
             if target.startswith(("attnprog.engine", "attnprog.synth", "attnprog.cli"))}
    assert not wrong


def test_synth_does_not_import_torch_at_module_level():
    offenders = []
    for name, path in modules().items():
        if not name.startswith("attnprog.synth"):
            continue
        for node in ast.parse(path.read_text()).body:  # top-level statements only
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [name for n in names if n.split(".")[0] == "torch"]
    assert not offenders
