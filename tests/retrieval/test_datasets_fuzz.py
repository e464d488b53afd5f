"""The MovieLens loader on damaged files: random byte changes, insertions and truncations of
u.data / u.item, the RecBole atomic pair and a zip give DatasetError or a consistent dataset
(every rating a row of a valid ImpressionLog, ids inside the catalog), never a numpy
traceback."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retrieval.datasets import DatasetError, InteractionDataset
from simenv.types import Columns
from tests.retrieval.test_datasets import load, write_atomic, write_grouplens, write_wheel
from tests.simenv.test_export_fuzz import DAMAGE, _damage

FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
SOURCES = {
    "u.data": ("grouplens", "u.data"),
    "u.item": ("grouplens", "u.item"),
    "ml-100k.inter": ("atomic", "ml-100k.inter"),
    "ml-100k.item": ("atomic", "ml-100k.item"),
    "wheel": ("wheel", None),
}


def _check_consistent(ds: InteractionDataset) -> None:
    log = ds.log
    assert isinstance(ds, InteractionDataset) and len(log) > 0
    assert log[Columns.ITEM].max() < ds.n_items and log[Columns.USER].max() < ds.n_users
    assert ds.item_tokens.size == ds.n_items and ds.user_tokens.size == ds.n_users
    cat = ds.catalog
    assert cat.title_tokens.shape[0] == ds.n_items
    assert cat.title_tokens.min() >= 0 and cat.title_tokens.max() < cat.vocab_size
    for j, card in enumerate(cat.categorical_cardinalities):
        assert 0 <= cat.categorical[:, j].min() and cat.categorical[:, j].max() < card
    assert np.isfinite(log[Columns.REWARD]).all()


@FUZZ
@given(source=st.sampled_from(sorted(SOURCES)), damage=DAMAGE)
def test_damaged_movielens_files(tmp_path, source, damage):
    kind, name = SOURCES[source]
    if kind == "wheel":
        target = write_wheel(tmp_path / "recbole-0.0.1-py3-none-any.whl")
    else:
        folder = (write_grouplens if kind == "grouplens" else write_atomic)(tmp_path / "d")
        target = folder / name
    target.write_bytes(_damage(target.read_bytes(), damage))
    try:
        ds = load(target if kind == "wheel" else target.parent)
    except DatasetError as e:
        assert str(tmp_path) in str(e) or "MovieLens" in str(e), str(e)
        return
    _check_consistent(ds)


@pytest.mark.parametrize(
    ("ratings", "match"),
    [
        ([(1, 1, 5, 10**30)], "timestamp"),  # beyond int64
        ([(1, 1, 5, -86400)], "timestamps must be >= 0"),  # before 1970
        ([(1, 1, "nan", 100)], r"line 1: rating must be finite"),
        ([(1, 1, "inf", 100)], r"line 1: rating must be finite"),
        ([(10**30, 1, 5, 100)], None),  # a huge user id is only a token: fine
    ],
)
def test_out_of_range_values(tmp_path, ratings, match):
    g = write_grouplens(tmp_path / "g", ratings=ratings)
    if match is None:
        _check_consistent(load(g))
        return
    with pytest.raises(DatasetError, match=match):
        load(g)
