"""The experiments and their config fields read from the source, without importing it.

Importing the experiment modules imports torch, faiss and the models: 10-15 s on a busy
2-core machine. The command line reads this static manifest first, so that a mistyped name
or ``--set`` field, or a value of the wrong type, fails at once; the registry (the import)
stays the authority and checks everything again.

What is read: every ``@experiment("name", "description", ConfigClass)`` decorator in the
experiment modules, and each config class's annotated fields, following base classes
defined in the same module or imported from another ``benchmarks`` module. Whatever cannot
be read this way (a computed name, a base class from elsewhere, an annotation that is not
built from ``int``, ``float``, ``str``, ``bool``, ``tuple``, ``Literal`` and ``None``) is left
to the registry: the manifest never rejects what the registry would accept.
"""

from __future__ import annotations

import ast
import importlib.util
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["StaticExperiment", "read_manifest", "resolve_annotation"]

_BASE = "ExperimentConfig"
_TYPES: dict[str, Any] = {
    "int": int,
    "float": float,
    "str": str,
    "bool": bool,
    "tuple": tuple,
    "None": None,
    "Literal": typing.Literal,
    "Optional": typing.Optional,
    "Union": typing.Union,
}


@dataclass(frozen=True)
class StaticExperiment:
    """An experiment as its source declares it.

    Attributes:
        name: the registered name.
        module: the module that registers it.
        fields: config field name -> annotation text, or None when the config class could
            not be followed to :class:`~benchmarks.registry.ExperimentConfig`.
    """

    name: str
    module: str
    fields: dict[str, str] | None


def _source(module: str) -> ast.Module | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    try:
        return ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None


def _fields(tree: ast.Module, module: str, cls: str, depth: int = 0) -> dict[str, str] | None:
    """Annotated fields of class ``cls`` of ``module`` and its bases; None if not followable."""
    if depth > 8:
        return None
    node = next(
        (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls),
        None,
    )
    if node is None:
        return _imported_fields(tree, cls, depth)
    out: dict[str, str] = {}
    for base in node.bases:
        if not isinstance(base, ast.Name):
            return None
        if base.id == _BASE:
            continue
        inherited = _fields(tree, module, base.id, depth + 1)
        if inherited is None:
            return None
        out.update(inherited)
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            text = ast.unparse(stmt.annotation)
            if "ClassVar" not in text:
                out[stmt.target.id] = text
    return out


def _imported_fields(tree: ast.Module, cls: str, depth: int) -> dict[str, str] | None:
    """Fields of a class imported with ``from benchmarks.X import cls``."""
    for n in tree.body:
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("benchmarks."):
            for alias in n.names:
                if (alias.asname or alias.name) == cls:
                    other = _source(n.module)
                    if other is None:
                        return None
                    return _fields(other, n.module, alias.name, depth + 1)
    return None


def read_manifest(modules: list[str]) -> dict[str, StaticExperiment] | None:
    """Every experiment the modules declare, by name; None if a module cannot be read.

    Args:
        modules: dotted names of the experiment modules.

    Returns:
        name -> :class:`StaticExperiment`, or None when some module is missing, does not
        parse, or registers an experiment whose name or config is not a plain literal /
        class name (then only the registry can tell).
    """
    found: dict[str, StaticExperiment] = {}
    for module in modules:
        tree = _source(module)
        if tree is None:
            return None
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for deco in node.decorator_list:
                if not (
                    isinstance(deco, ast.Call)
                    and isinstance(deco.func, ast.Name)
                    and deco.func.id == "experiment"
                ):
                    continue
                args = list(deco.args) + [kw.value for kw in deco.keywords]
                if len(args) < 3 or not (
                    isinstance(args[0], ast.Constant) and isinstance(args[0].value, str)
                ):
                    return None
                cfg = args[2]
                fields = _fields(tree, module, cfg.id) if isinstance(cfg, ast.Name) else None
                found[args[0].value] = StaticExperiment(args[0].value, module, fields)
    return found


def resolve_annotation(text: str) -> Any | None:
    """The type an annotation's text names, from builtins and typing only; None if other."""
    try:
        return eval(compile(text, "<annotation>", "eval"), {"__builtins__": {}}, dict(_TYPES))
    except Exception:  # a name from elsewhere (an enum, a config class): the registry decides
        return None
