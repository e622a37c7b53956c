"""The package's structure: imports point down (no circle inside fnnet/), and every module imports
on its own in dependency order, in a fresh interpreter."""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fnnet"
# `python -m fnnet` reaches the command line through bench's shim: the one allowed back edge
ALLOWED = {("fnnet.bench", "fnnet.cli")}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """Every fnnet module ``path`` imports, at the top or inside a function (deferred imports count)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
            candidates = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        for c in candidates:
            while c and c not in modules:
                c = c.rpartition(".")[0]
            if c and c != name and c != "fnnet":
                found.add(c)
    return found


def graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {name: {d for d in _imports(path, name, modules) if (name, d) not in ALLOWED}
            for name, path in files.items() if name != "fnnet.__main__"}


def test_no_import_circle_inside_the_package():
    g = graph()
    assert "fnnet.train" in g and "fnnet.step" in g["fnnet.train"]  # the reader sees what it should
    try:
        order = list(graphlib.TopologicalSorter(g).static_order())
    except graphlib.CycleError as err:
        raise AssertionError(f"an import circle: {' -> '.join(err.args[1])}") from None
    # the skeleton sits below every way to train, the dispatcher above them
    assert order.index("fnnet.step") < order.index("fnnet.parallel") < order.index("fnnet.train")
    assert order.index("fnnet.step") < order.index("fnnet.distributed") < order.index("fnnet.train")
    assert "fnnet.train" not in g["fnnet.parallel"] | g["fnnet.distributed"] | g["fnnet.step"]


def test_every_module_imports_in_dependency_order_in_a_fresh_interpreter():
    order = [m for m in graphlib.TopologicalSorter(graph()).static_order() if not m.startswith("fnnet.interop")]
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\nprint(len(sys.argv) - 1)"
    proc = subprocess.run([sys.executable, "-c", code, *order], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.strip()) == len(order)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _cross_module_private_uses(path: Path, name: str, modules: set[str]) -> list[str]:
    """``from .x import _name`` and ``x._name`` where ``x`` is another fnnet module that is not itself
    private (a package's own ``_private`` modules may share their names)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    aliases: dict[str, str] = {}  # a local name bound to an fnnet module -> that module
    found = []
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
            if not target.startswith("fnnet"):
                continue
            for a in node.names:
                full = f"{target}.{a.name}"
                if full in modules:
                    aliases[a.asname or a.name] = full
                elif _private(a.name) and not _private(target.rpartition(".")[2]) and target != name:
                    found.append(f"{name}:{node.lineno} imports {a.name} from {target}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _private(node.attr):
            module = aliases.get(node.value.id)
            if module is not None and module != name and not _private(module.rpartition(".")[2]):
                found.append(f"{name}:{node.lineno} reads {node.value.id}.{node.attr} of {module}")
    return found


def test_no_module_imports_another_modules_private_names():
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    found = [use for name, path in files.items() for use in _cross_module_private_uses(path, name, set(files))]
    assert not found, "\n".join(found)


def _code_lines(fn: ast.AST, source: list[str]) -> int:
    """Lines of code in a function: not blank, not a comment, not its docstring."""
    doc = set()
    body = getattr(fn, "body", [])
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        doc = set(range(body[0].lineno, body[0].end_lineno + 1))
    lines = range(fn.lineno, fn.end_lineno + 1)
    return sum(1 for i in lines if i not in doc and source[i - 1].strip() and not source[i - 1].strip().startswith("#"))


def longest_functions() -> list[tuple[int, str]]:
    out = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        source = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((_code_lines(node, source), f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"))
    return sorted(out, reverse=True)


def test_no_function_in_the_package_is_over_100_lines_of_code():
    longest = longest_functions()
    assert longest[0][0] > 20  # the measure sees real functions
    over = [f"{where}: {n} lines" for n, where in longest if n > 100]
    assert not over, "\n".join(over)
