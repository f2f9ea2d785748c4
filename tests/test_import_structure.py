"""The import structure of spectra/, read from the code (ast), not by importing it.

Imports run one way: ternary math and formats at the bottom, kernels below the model and ignorant of it, CLI on
top. Every import of a spectra module counts (module level and inside functions; only `if TYPE_CHECKING:`
blocks, which never run, are left out), so a cycle cannot hide behind a function-level import. The one
exception is a function-level import of a module that needs an optional dependency (it imports triton,
lm_eval, ... at module level, itself or through the spectra modules it imports): that import is deferred for
the dependency's sake, and such a module may not close a cycle either way since nothing imports it eagerly.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL_DEPENDENCIES = ("triton", "transformers", "gguf", "lm_eval", "matplotlib")
PACKAGE = ROOT / "spectra"
# Modules the GPU kernels must never import: kernels sit below the model and know nothing of it.
ABOVE_KERNELS = ("spectra.model", "spectra.linear", "spectra.checkpoint", "spectra.generate", "spectra.decode_graph",
                 "spectra.packed")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _catches_import_error(node: ast.AST) -> bool:
    return isinstance(node, ast.Try) and any(
        isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError") for h in node.handlers)


def _import_nodes(tree: ast.AST):
    """(import node, inside a function?, inside a `try: ... except ImportError`?) for every import outside
    `if TYPE_CHECKING:`."""
    stack = [(tree, False, False)]
    while stack:
        node, in_function, guarded = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend((n, in_function, guarded) for n in child.orelse)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_function, guarded
            stack.append((child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)),
                          guarded or _catches_import_error(child)))


def imports_of(path: Path, modules: set[str], function_level: bool | None = None) -> set[str]:
    """The spectra modules `path` imports, with the packages whose __init__ each import runs; only those at
    module level (`function_level` False) or inside functions (True), else all. Names outside spectra are
    are kept only for an optional dependency imported unguarded (not in a `try: ... except ImportError`)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node, in_function, guarded in _import_nodes(ast.parse(path.read_text(), str(path))):
        if function_level is not None and in_function != function_level:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import name` imports pkg, and pkg.name when name is a submodule
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            if not target.startswith("spectra"):
                if target.split(".")[0] in OPTIONAL_DEPENDENCIES and not guarded:
                    found.add(target.split(".")[0])
                continue
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
                prefix = ".".join(parts[:i])
                # a package's own __init__ is under way when its modules load: not an edge
                if prefix in modules and prefix != name and not name.startswith(prefix + "."):
                    found.add(prefix)
    return found


def _needing_optional_dependency(eager: dict[str, set[str]]) -> set[str]:
    """Modules that import an optional dependency at module level, themselves or through spectra modules."""
    needing = {name for name, targets in eager.items() if targets & set(OPTIONAL_DEPENDENCIES)}
    changed = True
    while changed:
        grown = {name for name, targets in eager.items() if targets & needing}
        changed = not grown <= needing
        needing |= grown
    return needing


def import_graph(exempt_optional: bool = True) -> dict[str, set[str]]:
    """Module -> the spectra modules it imports, at module level or in functions (with `exempt_optional`,
    function-level imports of modules that need an optional dependency aside)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    eager = {name: imports_of(path, modules, function_level=False) for name, path in files.items()}
    deferred = {name: imports_of(path, modules, function_level=True) for name, path in files.items()}
    optional = _needing_optional_dependency(eager) if exempt_optional else set()
    return {name: {t for t in eager[name] | (deferred[name] - optional) if t in modules} for name in files}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle():
    graph = import_graph()
    assert _cycles(graph) == []


def test_kernels_know_nothing_of_the_model():
    graph = import_graph(exempt_optional=False)
    bad = {name: sorted(t for t in targets if t.startswith(ABOVE_KERNELS))
           for name, targets in graph.items() if name.startswith("spectra.kernels")}
    assert {name: targets for name, targets in bad.items() if targets} == {}


def test_the_walker_sees_function_level_imports(tmp_path):
    # the test must fail on a cycle closed only inside a function
    pkg = tmp_path / "spectra"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("def x():\n    from .a import y\n    return y\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import y\n")
    modules = {"spectra", "spectra.a", "spectra.b", "spectra.c"}
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        graph = {m: imports_of(tmp_path / (m.replace(".", "/") + ".py") if m != "spectra" else pkg / "__init__.py",
                               modules) for m in modules}
    finally:
        ROOT = saved
    assert graph["spectra.c"] == set()
    assert _cycles(graph) == [["spectra.a", "spectra.b"]]


def _module_attribute_uses(path: Path) -> list[tuple[str, str, int]]:
    """(module, attribute, line) for every `alias.attr` in `path` where `alias` names a spectra module imported
    with `from <package> import <module>` (a renamed or removed function shows up here, not in ruff)."""
    tree = ast.parse(path.read_text())
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == "spectra"):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                parent = ".".join(base + ([node.module] if node.module else []))
            else:
                parent = node.module
            for alias in node.names:
                candidate = ROOT.joinpath(*f"{parent}.{alias.name}".split("."))
                if candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file():
                    aliases[alias.asname or alias.name] = f"{parent}.{alias.name}"
    return [(aliases[n.value.id], n.attr, n.lineno) for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases]


def test_modules_and_benchmarks_use_only_what_the_modules_they_import_define():
    # `spectra bench gemm` called bench.copy_bandwidth after a refactor moved it to kernels.timing: an
    # AttributeError on the GPU only, where no CPU test reaches that line
    import importlib

    missing, checked = [], 0
    for path in sorted([*PACKAGE.rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]):
        for module, attr, line in _module_attribute_uses(path):
            try:
                target = importlib.import_module(module)
            except ImportError:  # an optional dependency this environment lacks
                continue
            checked += 1
            if not hasattr(target, attr):
                missing.append(f"{path.relative_to(ROOT)}:{line}: {module}.{attr}")
    assert not missing, missing
    assert checked > 100  # the walker finds the module-attribute uses of the package and the benchmarks


def test_every_environment_switch_is_in_the_architecture_table():
    import re

    used = set()
    for path in PACKAGE.rglob("*.py"):
        used |= set(re.findall(r"""environ(?:\.get\(|\[)["'](SPECTRA_[A-Z_]+)""", path.read_text()))
    table = (ROOT / "docs" / "architecture.md").read_text().split("## Environment switches", 1)[1]
    documented = set(re.findall(r"^\| `(SPECTRA_[A-Z_]+)` \|", table, re.MULTILINE))
    assert used and used == documented, (sorted(used - documented), sorted(documented - used))
