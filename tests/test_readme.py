"""Every Python snippet of README.md runs, so the README's examples cannot break unseen.

The snippets are read from README.md itself. Sizes are made small by the substitutions below
(each must match its snippet exactly once, so an edited README fails here until this table
follows it); everything else runs as written. The MovieLens snippet reads tiny files in the
GroupLens format through the same loader call a user makes with their own copy
(``load_movielens_100k(path)``): the real data needs a download this machine cannot make.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.retrieval.test_datasets import write_grouplens

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)

# first line that identifies a snippet -> (old, new) substitutions that make it small
SMALL: dict[str, list[tuple[str, str]]] = {
    "import gymnasium as gym": [
        ("num_envs=1024", "num_envs=8"),
    ],
    "from simenv import BatchedRecEnv": [
        ("BatchedRecEnv(2048, EnvConfig())", "BatchedRecEnv(64, EnvConfig.small(slate_size=10))"),
        ("n_users=30_000", "n_users=400"),
        ("uniform=1024", "uniform=64"),
        ("TrainConfig(epochs=5)", "TrainConfig(epochs=1, batch_size=256, progress=False)"),
    ],
    "from stable_baselines3 import PPO": [
        ("n_users=300, seed=10", "n_users=60, seed=10"),
        ("DummyVecEnv([make] * 8)", "DummyVecEnv([make] * 2)"),
        ("model.learn(8192)", "model.learn(128)"),
    ],
    "from retrieval.datasets import": [
        ("load_movielens_100k()", "load_movielens_100k(MOVIELENS_PATH, check_size=False)"),
        ("ds.n_items, history_length=50)", "ds.n_items, history_length=8)"),
        ("TrainConfig(epochs=3, causal=True, history_length=50)",
         "TrainConfig(epochs=1, causal=True, history_length=8, progress=False)"),
    ],
}  # fmt: skip
# snippet -> what it must print (a regular expression)
PRINTS = {
    "from simenv import BatchedRecEnv": r"test recall@100 = (0\.\d{3}|1\.000) over [1-9]\d* users",
    "from retrieval.datasets import": r"'hr@10': .*'ndcg@10': ",
}


def _key(snippet: str) -> str:
    for key in SMALL:
        if snippet.startswith(key):
            return key
    raise AssertionError(f"a README snippet this test does not know; add it to SMALL:\n{snippet}")


def test_every_snippet_is_known():
    assert len(SNIPPETS) == len(SMALL) and sorted(map(_key, SNIPPETS)) == sorted(SMALL)


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.splitlines()[0] for s in SNIPPETS])
def test_readme_snippet_runs(snippet, tmp_path, capsys):
    key = _key(snippet)
    code = snippet
    for old, new in SMALL[key]:
        assert code.count(old) == 1, f"README changed: {old!r} is no longer in the snippet"
        code = code.replace(old, new)
    namespace = {"__name__": "__readme__"}
    if key == "from retrieval.datasets import":
        namespace["MOVIELENS_PATH"] = write_grouplens(tmp_path / "ml-100k", *_tiny_movielens())
    exec(compile(code, f"README.md snippet {key!r}", "exec"), namespace)
    out = capsys.readouterr().out
    if key in PRINTS:
        assert re.search(PRINTS[key], out), out


def _tiny_movielens():
    """Ratings and items in the GroupLens layout: 30 users, 40 movies, 12 ratings each."""
    import numpy as np

    from tests.retrieval.test_datasets import MOVIELENS_GENRES

    rng = np.random.default_rng(0)
    items = [
        (i, f"Movie {i} ({1990 + i % 9})", f"01-Jan-{1990 + i % 9}", [MOVIELENS_GENRES[1 + i % 18]])
        for i in range(1, 41)
    ]
    ratings = [
        (u, int(i), int(rng.integers(1, 6)), 880_000_000 + 1000 * u + 60 * j)
        for u in range(1, 31)
        for j, i in enumerate(rng.choice(np.arange(1, 41), size=12, replace=False))
    ]
    return ratings, items
