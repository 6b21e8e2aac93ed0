"""The package's import graph: dependencies point one way, down the layers, and never in a circle.

Every `import` counts, also those inside functions (they hide the real graph otherwise). A function
level import is allowed only with a comment saying why (start-up time), on its line or just above.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
# Lowest first. A module may import from its own layer (without a cycle) or from any layer below.
LAYERS = (
    ("aigc", "aigc.errors", "aigc.fsutil", "aigc.config", "aigc.jinja_sandbox"),
    ("aigc.tokenizer",),
    ("aigc.artifacts",),
    ("aigc.models",),
    ("aigc.data", "aigc.chat"),
    ("aigc.plots",),
    ("aigc.train",),
    ("aigc.textstream", "aigc.sampling", "aigc.structured", "aigc.guidance", "aigc.generate", "aigc.tools"),
    ("aigc.evaluate",),
    ("aigc.interop", "aigc.report"),
    ("aigc.demo",),
    ("aigc.serve",),
    ("aigc.cli", "aigc.__main__"),
)


def layer_of(module: str) -> int:
    """The layer of the longest matching prefix (`aigc` itself only matches exactly)."""
    best, best_len = None, -1
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or (prefix != "aigc" and module.startswith(prefix + "."))
            if matches and len(prefix) > best_len:
                best, best_len = rank, len(prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer; add it to LAYERS in {__file__}")
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[str, ast.stmt, bool]]:
    """(absolute aigc module, node, inside a function) for each import of an aigc module in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside |= {id(sub) for sub in ast.walk(node) if sub is not node}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from aigc.models import lora` imports the submodule when it is one.
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            names = [n for n in names if n == node.module or _is_module(n)]
        else:
            continue
        found += [(n, node, id(node) in inside) for n in names if n == "aigc" or n.startswith("aigc.")]
    return found


def _is_module(name: str) -> bool:
    relative = Path(*name.split("."))
    return (SRC / relative).with_suffix(".py").is_file() or (SRC / relative / "__init__.py").is_file()


def all_sources() -> list[Path]:
    return sorted((SRC / "aigc").rglob("*.py"))


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in all_sources():
        module = module_name(path)
        edges[module] = {name for name, _, _ in imported_modules(path) if name != module}
    return edges


def test_every_import_points_down_or_sideways():
    upward = []
    for module, targets in graph().items():
        for target in targets:
            if layer_of(target) > layer_of(module):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that point up the layers:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    edges = graph()
    # A package's __init__ importing its own submodules is not a cycle of concern; the modules are.
    edges = {m: {t for t in ts if t in edges and not m.startswith(t + ".")} for m, ts in edges.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_imports_inside_functions_say_why():
    bare = []
    for path in all_sources():
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)) and not _commented(lines, sub.lineno):
                    bare.append(f"{path.relative_to(SRC)}:{sub.lineno}")
    assert not bare, "imports inside functions without a comment saying why:\n" + "\n".join(sorted(set(bare)))


def _commented(lines: list[str], lineno: int) -> bool:
    """A comment on the import's line, or above the block of imports (and blank lines) it stands in."""
    if "#" in lines[lineno - 1]:
        return True
    i = lineno - 2
    while i >= 0 and (lines[i].strip().startswith(("import ", "from ")) or not lines[i].strip()):
        if "#" in lines[i]:
            return True
        i -= 1
    return i >= 0 and lines[i].strip().startswith("#")


@pytest.mark.parametrize(
    "module, target", [("aigc.artifacts.run", "aigc.train.loop"), ("aigc.models.gpt", "aigc.serve")]
)
def test_the_checker_catches_an_upward_import(module, target):
    assert layer_of(target) > layer_of(module)
