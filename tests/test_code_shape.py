"""The shape of the code that the project promises (issue: "a round you can read"): no function in src/ over 50
lines, no module over 400, and no import circle between fgrpo's modules (a lower module never imports a higher
one), counting imports inside functions too, not those under ``if TYPE_CHECKING:``."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "fgrpo"
MODULES = {".".join(("fgrpo", *p.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__"): p
           for p in SRC.rglob("*.py")}


def imports_of(path: Path) -> set[str]:
    """The fgrpo modules ``path`` imports (``from fgrpo import x`` counts as fgrpo.x when that is a module)."""
    tree = ast.parse(path.read_text())
    guarded = [n for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)]
    skipped = {id(n) for node in guarded for child in node.body for n in ast.walk(child)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("fgrpo")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fgrpo"):
            out |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                    for a in node.names}
    return {m for m in out if m in MODULES and m != "fgrpo"}


def test_no_function_over_50_lines_and_no_module_over_400():
    long_functions, long_modules = [], []
    for name, path in MODULES.items():
        text = path.read_text()
        if len(text.splitlines()) > 400:
            long_modules.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 50:
                long_functions.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long_functions and not long_modules, long_functions + long_modules


def test_no_import_circle_between_modules():
    graph = {name: imports_of(path) for name, path in MODULES.items()}
    circles = []

    def visit(name: str, trail: list[str]) -> None:
        for target in sorted(graph[name]):
            if target in trail:
                circles.append(" -> ".join(trail[trail.index(target):] + [target]))
            elif target not in done:
                visit(target, trail + [target])
        done.add(name)

    done: set[str] = set()
    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert not circles, circles
