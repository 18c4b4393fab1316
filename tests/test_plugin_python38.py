"""The plugin package runs inside Volatility on every Python it supports (3.8+).

No interpreter older than the project's own is installed here, so this reads the code instead:
every module defers its annotations (``from __future__ import annotations``, so ``X | None``
and ``list[int]`` there are never evaluated), and no expression evaluated at run time uses
PEP 604 unions or PEP 585 generics.  ``vermin`` (scripts/test.sh) covers the standard library
and syntax (``zip(strict=...)``, ``match``, new modules).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PLUGIN_DIR = Path(__file__).resolve().parents[1] / "volatility_plugins"
MODULES = sorted(PLUGIN_DIR.rglob("*.py"))
# Subscripting these at run time needs Python 3.9 (PEP 585).
BUILTIN_GENERICS = {"list", "dict", "tuple", "set", "frozenset", "type"}
ABC_GENERICS = {"Callable", "Iterable", "Iterator", "Sequence", "Mapping", "Generator"}


def _annotation_nodes(tree: ast.AST) -> set[int]:
    """ids of every node inside an annotation (deferred by the __future__ import)."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        annotations = []
        if isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            annotations.append(node.returns)
            args = node.args
            for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
                if arg is not None:
                    annotations.append(arg.annotation)
        for annotation in annotations:
            if annotation is not None:
                inside.update(id(n) for n in ast.walk(annotation))
    return inside


def _abc_names(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "collections.abc":
            names.update(alias.asname or alias.name for alias in node.names)
    return names & ABC_GENERICS


def runtime_problems(source: str) -> list[str]:
    tree = ast.parse(source)
    problems = []
    has_future = any(
        isinstance(node, ast.ImportFrom)
        and node.module == "__future__"
        and any(alias.name == "annotations" for alias in node.names)
        for node in tree.body
    )
    annotated = _annotation_nodes(tree)
    if annotated and not has_future:
        problems.append("no 'from __future__ import annotations'")
    deferred = annotated if has_future else set()
    generics = BUILTIN_GENERICS | _abc_names(tree)
    for node in ast.walk(tree):
        if id(node) in deferred:
            continue
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.value, ast.Name)
            and node.value.id in generics
        ):
            problems.append(f"line {node.lineno}: {node.value.id}[...] evaluated at run time")
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            sides = (node.left, node.right)
            if any(isinstance(s, ast.Constant) and s.value is None for s in sides):
                problems.append(f"line {node.lineno}: 'X | None' evaluated at run time")
    return problems


@pytest.mark.parametrize("module", MODULES, ids=lambda p: str(p.relative_to(PLUGIN_DIR)))
def test_plugin_module_runs_on_python_38(module):
    assert runtime_problems(module.read_text()) == []


def test_the_check_finds_what_python_38_rejects():
    assert runtime_problems("X = int | None\n") == ["line 1: 'X | None' evaluated at run time"]
    assert runtime_problems("def f(x: int | None): ...\n") == [
        "no 'from __future__ import annotations'",
        "line 1: 'X | None' evaluated at run time",
    ]
    source = (
        "from __future__ import annotations\n"
        "from collections.abc import Callable\n"
        "A = tuple[int, int]\n"
        "B = Callable[[int], int]\n"
        "def f(x: list[int] | None) -> dict[str, int]: ...\n"
    )
    assert runtime_problems(source) == [
        "line 3: tuple[...] evaluated at run time",
        "line 4: Callable[...] evaluated at run time",
    ]
