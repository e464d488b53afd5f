"""The architecture of README/DESIGN, enforced on the source (imports and attribute reads
parsed with ast, nothing imported):

- ``simenv`` imports none of retrieval, ranking, agents, benchmarks;
- ``retrieval`` and ``ranking`` import from simenv only its public data modules (the log, the
  catalog types, histories, ...), never the world, the envs or the user model, and not each
  other, agents or benchmarks;
- nothing outside ``benchmarks`` (and the tests) imports ``benchmarks``;
- the hidden truth ``world.items`` / ``world.users`` is read only inside simenv, by the oracle
  and by the evaluation code listed in ``HIDDEN_READERS``; everything else reads the public
  ``world.catalog``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("simenv", "retrieval", "ranking", "agents", "benchmarks", "examples")
# simenv modules that hold data and its handling, no world / env / user model
PUBLIC_DATA = {
    "simenv.types",
    "simenv.log",
    "simenv.logstore",
    "simenv.history",
    "simenv.atomic",
    "simenv.arrays",
    "simenv.clock",
    "simenv.export",
    "simenv.checkpoint",  # the one checkpoint format (files on disk, no world)
    "simenv.device",  # devices and precision of the torch code (no world)
    "simenv.config",  # check_range, the project's one number validator (configs hold no truth)
}
# package -> top-level packages it must not import
FORBIDDEN = {
    "simenv": {"retrieval", "ranking", "agents", "benchmarks"},
    "retrieval": {"ranking", "agents", "benchmarks"},
    "ranking": {"retrieval", "agents", "benchmarks"},
    "agents": {"benchmarks"},
    "examples": {"benchmarks"},
}
# (file, hidden attribute) -> why that file may read the hidden truth. The oracle agent
# (agents/base.py) needs no entry: it asks the env (env.best_slates), inside simenv.
HIDDEN_READERS = {
    ("agents/loop.py", "users"): "evaluation: leakage@100 of each round needs the users' groups",
    ("benchmarks/common.py", "items"): "evaluation helpers: item segments, folding metrics",
    ("benchmarks/common.py", "users"): "evaluation helpers: the users' groups for folding",
    ("benchmarks/folding.py", "users"): "evaluation: folding is measured on the hidden groups",
    ("benchmarks/ann.py", "items"): "search benchmark data: the world's item vectors (issue 11)",
    ("benchmarks/ann.py", "users"): "search benchmark data: users' preferences as the queries",
}


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py")) if (ROOT / package).is_dir() else []


def _imports(tree: ast.AST, path: Path) -> list[str]:
    """Absolute module names imported anywhere in the file (also inside functions)."""
    out = []
    pkg = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            out += [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
    return out


def _hidden_reads(tree: ast.AST) -> list[tuple[str, int]]:
    """``X.world.items`` / ``world.users`` reads: (attribute, line)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("items", "users"):
            v = node.value
            name = (
                v.id if isinstance(v, ast.Name) else v.attr if isinstance(v, ast.Attribute) else ""
            )
            if name == "world":
                out.append((node.attr, node.lineno))
    return out


SOURCES = [(p, ast.parse(p.read_text(encoding="utf-8"))) for pkg in PACKAGES for p in _files(pkg)]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependencies_point_one_way(package):
    bad = []
    for path, tree in SOURCES:
        if path.relative_to(ROOT).parts[0] != package:
            continue
        for mod in _imports(tree, path):
            top = mod.split(".")[0]
            if top in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(ROOT)} imports {mod}")
            if package in ("retrieval", "ranking") and top == "simenv":
                if not any(mod == m or mod.startswith(m + ".") for m in PUBLIC_DATA):
                    bad.append(f"{path.relative_to(ROOT)} imports {mod} (not a data module)")
    assert not bad, "\n".join(bad)


def test_hidden_truth_is_read_only_by_the_oracle_and_evaluation():
    bad = []
    for path, tree in SOURCES:
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("simenv/"):
            continue
        for attr, line in _hidden_reads(tree):
            if (rel, attr) not in HIDDEN_READERS:
                bad.append(f"{rel}:{line} reads world.{attr} (use world.catalog)")
    assert not bad, "\n".join(bad)
    # every allow-list entry is still needed (a stale entry would hide a new read)
    used = {(p.relative_to(ROOT).as_posix(), a) for p, t in SOURCES for a, _ in _hidden_reads(t)}
    assert set(HIDDEN_READERS) <= used, set(HIDDEN_READERS) - used


def test_the_checks_catch_violations():
    tree = ast.parse(
        "from retrieval.model import X\nimport benchmarks.stats\n"
        "def f(env):\n    from simenv.world import World\n    return env.world.items.latent\n"
    )
    fake = ROOT / "ranking" / "fake.py"
    assert _imports(tree, fake) == ["retrieval.model", "benchmarks.stats", "simenv.world"]
    assert _hidden_reads(tree) == [("items", 5)]
    rel = ast.parse("from .model import X\nfrom . import train\n")
    assert _imports(rel, fake) == ["ranking.model", "ranking.train"]
