"""The package's import map: no circles, and imports at the top of each module.

The map is read from the source with `ast` (nothing is imported): an arrow from module A to module B for every
`import` of B in A, at any depth of A's code (an import inside a function still is a dependency), plus an arrow to
each package B lives in that A is not itself part of (importing `litattn.data.base` runs `litattn/data/__init__.py`
first). Imports under `if TYPE_CHECKING:` are annotations only and never run, so they are not arrows.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the installed package -> its folder (pyproject's package-dir: pretrain/ and finetune/ install inside litattn)
PACKAGES = {"litattn": ROOT / "litattn", "litattn.pretrain": ROOT / "pretrain", "litattn.finetune": ROOT / "finetune"}
# Imports allowed inside a function: heavy optional dependencies, loaded only by the commands that need them.
LAZY_OK = {"matplotlib", "transformers"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """(import node, inside a function?) for every import that runs, skipping `if TYPE_CHECKING:` blocks."""

    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    yield from walk(ast.Module(body=[other], type_ignores=[]), in_function)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_function
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            yield from walk(child, inner)

    yield from walk(tree, False)


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, known: dict[str, Path]) -> list[str]:
    """The absolute names an import statement loads (a `from m import name` loads m.name when that is a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: from the importing module's package upwards
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in known else prefix for alias in node.names]


def import_map() -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    """(arrows: module -> modules of the package it imports, imports inside functions as (module, statement))."""
    known = modules()
    arrows: dict[str, set[str]] = {name: set() for name in known}
    inner = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, in_function in _imports(tree):
            for target in _targets(name, path.name == "__init__.py", node, known):
                if in_function:
                    inner.append((name, target, ast.unparse(node)))
                while target and target not in known:  # `from litattn.x import some_function` -> litattn.x
                    target = target.rpartition(".")[0]
                parents = []
                while target:
                    if target != name and not name.startswith(target + "."):
                        parents.append(target)  # the module, and each package it lives in that `name` is not in
                    target = target.rpartition(".")[0]
                arrows[name].update(t for t in parents if t in known)
    return arrows, inner


def circles(arrows: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(arrows[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(arrows):
        if v not in index:
            visit(v)
    return found


def test_the_circle_finder_finds_a_circle_and_a_self_free_chain():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_the_map_reads_function_level_and_relative_imports_and_skips_type_checking(tmp_path, monkeypatch):
    pkg = tmp_path / "litattn"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import b\n")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from litattn import c\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from litattn.a import x\n")
    (pkg / "c.py").write_text("from litattn.sub.b import f\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGES", {"litattn": pkg})
    arrows, inner = import_map()
    assert arrows["litattn.a"] == set()  # TYPE_CHECKING only
    assert arrows["litattn.sub.b"] == {"litattn.a"}  # inside a function, still an arrow
    assert arrows["litattn.c"] == {"litattn.sub.b", "litattn.sub"}  # and the package it lives in
    assert arrows["litattn.sub"] == {"litattn.sub.b"}  # relative import
    assert [(m, t) for m, t, _ in inner] == [("litattn.sub.b", "litattn.a")]


def test_the_package_has_no_import_circles():
    arrows, _ = import_map()
    assert len(arrows) > 40 and "litattn.model" in arrows and "litattn.pretrain.pretrain" in arrows
    assert circles(arrows) == []


def test_imports_sit_at_the_top_of_each_module():
    """Except heavy optional dependencies (matplotlib, transformers), loaded by the commands that plot or convert."""
    _, inner = import_map()
    hidden = [f"{module}: {statement}" for module, target, statement in inner if target.split(".")[0] not in LAZY_OK]
    assert hidden == []
