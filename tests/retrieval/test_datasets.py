"""MovieLens-100K loader, leave-one-out protocol and full-catalog metrics (no network needed)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval import datasets as dsm
from retrieval.data import causal_windows
from retrieval.datasets import (
    MOVIELENS_GENRES,
    DatasetError,
    fetch_recbole_wheel,
    full_catalog_top_k,
    leave_one_out,
    load_movielens_100k,
    next_item_metrics,
    seen_items,
)
from retrieval.losses import RetrievalLossConfig
from retrieval.model import TwoTowerConfig, TwoTowerModel
from retrieval.towers import ItemTowerConfig, UserTowerConfig
from retrieval.train import TrainConfig, fit_two_tower
from simenv.types import Columns, EventType, Obs
from tests.numerics import TEST_THREADS

torch.set_num_threads(
    TEST_THREADS
)  # the suite's count (tests/conftest.py); set early for the fixtures
DAY = 86_400.0

# ---------------------------------------------------------------- a tiny MovieLens, two formats
# items: GroupLens id, title (with year), release date, genres
ITEMS = [
    (1, "Toy Story (1995)", "01-Jan-1995", ["Animation", "Children's", "Comedy"]),
    (2, "GoldenEye (1995)", "01-Jan-1995", ["Action", "Adventure", "Thriller"]),
    (3, "Four Rooms (1995)", "", ["Thriller"]),
    (5, "Copycat (1995)", "01-Jan-1995", ["Crime", "Drama", "Thriller"]),
    (10, "Richard III (1995)", "22-Jan-1996", ["Drama", "War"]),
    (4, "Get Shorty (1994)", "01-Jan-1994", ["Action", "Comedy", "Drama"]),
    (7, "unknown", "", ["unknown"]),  # never rated
]
# ratings in file order: user, item, rating, timestamp (user 2 rates 3 then 1 in one second)
RATINGS = [
    (2, 3, 4, 1000),
    (10, 5, 2, 500),
    (1, 1, 5, 100),
    (2, 1, 3, 1000),
    (1, 2, 3, 50),
    (2, 2, 5, 40),
    (10, 10, 4, 700),
    (1, 4, 1, 200),
    (10, 4, 5, 900),
    (1, 5, 4, 300),
    (2, 4, 2, 2000),
    (10, 1, 3, 900),
]
# expected per user (compact ids: users 1, 2, 10 -> 0, 1, 2; items by id 1,2,3,4,5,7,10 -> 0..6)
ITEM_INDEX = {1: 0, 2: 1, 3: 2, 4: 3, 5: 4, 7: 5, 10: 6}


def _grouplens_item_line(item) -> str:
    iid, title, date, genres = item
    flags = ["1" if g in genres else "0" for g in MOVIELENS_GENRES]
    return "|".join([str(iid), title, date, "", "http://x"] + flags)


def write_grouplens(folder: Path, ratings=RATINGS, items=ITEMS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ratings))
    (folder / "u.item").write_bytes(
        "".join(_grouplens_item_line(it) + "\n" for it in items).encode("latin-1")
    )
    return folder


def _atomic_item_text(items=ITEMS) -> str:
    lines = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    for iid, title, date, genres in items:
        year = date[-4:] if date else title[-5:-1] if title.endswith(")") else "unkonwn"
        bare = title[:-7] if title.endswith(")") else title
        lines.append(f"{iid}\t{bare}\t{year}\t{' '.join(genres)}")
    return "\n".join(lines) + "\n"


def _atomic_inter_text(ratings=RATINGS) -> str:
    head = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    return head + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ratings)


def write_atomic(folder: Path, ratings=RATINGS, items=ITEMS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ml-100k.inter").write_text(_atomic_inter_text(ratings))
    (folder / "ml-100k.item").write_text(_atomic_item_text(items))
    return folder


def write_wheel(path: Path, ratings=RATINGS, items=ITEMS) -> Path:
    """A zip laid out like the recbole wheel (other files around the data)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("recbole/__init__.py", "")
        z.writestr("recbole/dataset_example/ml-100k/ml-100k.inter", _atomic_inter_text(ratings))
        z.writestr("recbole/dataset_example/ml-100k/ml-100k.item", _atomic_item_text(items))
        z.writestr("recbole/dataset_example/ml-100k/ml-100k.user", "user_id:token\n1\n")
        z.writestr("recbole/properties/dataset/ml-100k.yaml", "x: 1\n")
        z.writestr("recbole-1.2.1.dist-info/METADATA", "Name: recbole\n")
    return path


def load(path, **kw):
    return load_movielens_100k(path, check_size=False, **kw)


# ---------------------------------------------------------------- golden conversion


def test_grouplens_conversion_golden(tmp_path):
    ds = load(write_grouplens(tmp_path / "ml-100k"))
    log = ds.log
    assert (ds.n_users, ds.n_items, len(ds)) == (3, 7, 12)
    assert ds.user_tokens.tolist() == ["1", "2", "10"]  # numeric order, not "1","10","2"
    assert ds.item_tokens.tolist() == ["1", "2", "3", "4", "5", "7", "10"]
    # rows ordered by (user, time); user 2's two ratings at t=1000 keep the file order (3, 1)
    expected = sorted(
        ((u, t, k, i, r) for k, (u, i, r, t) in enumerate(RATINGS)), key=lambda x: x[:3]
    )
    users = {1: 0, 2: 1, 10: 2}
    np.testing.assert_array_equal(log[Columns.USER], [users[e[0]] for e in expected])
    np.testing.assert_array_equal(log[Columns.ITEM], [ITEM_INDEX[e[3]] for e in expected])
    assert log[Columns.ITEM][4:8].tolist() == [1, 2, 0, 3]  # user 2: items 2, 3, 1, 4
    # time in days; the tie gets +1 ms
    ts = np.array([e[1] for e in expected], dtype=np.float64)
    tie = np.zeros(12)
    tie[[6, 11]] = 1e-3  # the second rating at t=1000 of user 2 and at t=900 of user 10
    np.testing.assert_array_equal(log[Columns.TIME], (ts + tie) / DAY)
    assert np.all(np.diff(log[Columns.TIME][4:8]) > 0)
    ratings = np.array([e[4] for e in expected])
    np.testing.assert_array_equal(log[Columns.REWARD], ratings.astype(np.float32))
    np.testing.assert_array_equal(
        log[Columns.FEEDBACK], np.where(ratings >= 4, EventType.LIKE, EventType.CLICK)
    )
    np.testing.assert_array_equal(log[Columns.REQUEST], np.arange(12))
    assert not log[Columns.POSITION].any() and not log[Columns.SESSION].any()
    assert np.isnan(log[Columns.PROPENSITY]).all()
    # catalog
    cat = ds.catalog
    words = [[ds.vocabulary[t] for t in row if t] for row in cat.title_tokens]
    assert words[0] == ["toy", "story", "genre:animation", "genre:children's", "genre:comedy"]
    assert words[5] == ["unknown", "genre:unknown"]
    assert ds.vocabulary[0] == "<pad>" and list(ds.vocabulary[1:]) == sorted(ds.vocabulary[1:])
    assert cat.vocab_size == len(ds.vocabulary)
    assert cat.categorical_names == ("genre", "year")
    genre = cat.column("genre").tolist()
    assert [MOVIELENS_GENRES[g] for g in genre] == [
        "Animation", "Action", "Thriller", "Action", "Crime", "unknown", "Drama",
    ]  # fmt: skip
    # year: release date's year, else the title's; 0 = unknown; first year (1994) -> 1
    assert cat.column("year").tolist() == [2, 2, 2, 1, 2, 0, 3]
    assert cat.categorical_cardinalities == (19, 4)
    np.testing.assert_array_equal(cat.release_time, np.zeros(7, np.float32))
    assert ds.item_titles[0] == "Toy Story"


def test_atomic_and_grouplens_formats_agree(tmp_path):
    a = load(write_grouplens(tmp_path / "g"))
    b = load(write_atomic(tmp_path / "a"))
    for c in a.log.columns:
        np.testing.assert_array_equal(a.log[c], b.log[c], err_msg=c)
    for f in ("title_tokens", "categorical", "release_time"):
        np.testing.assert_array_equal(getattr(a.catalog, f), getattr(b.catalog, f), err_msg=f)
    assert a.vocabulary == b.vocabulary and a.item_titles == b.item_titles


def test_like_threshold(tmp_path):
    folder = write_grouplens(tmp_path / "g")
    all_click = load(folder, like_threshold=None).log[Columns.FEEDBACK]
    assert (all_click == EventType.CLICK).all()
    strict = load(folder, like_threshold=5).log
    np.testing.assert_array_equal(
        strict[Columns.FEEDBACK] == EventType.LIKE, strict[Columns.REWARD] >= 5
    )
    with pytest.raises(ValueError, match="like_threshold"):
        load(folder, like_threshold=float("nan"))


@pytest.mark.parametrize("how", ["folder", "parent", "file", "zip", "wheel-dir"])
def test_every_way_to_point_at_the_files(tmp_path, how):
    ref = load(write_grouplens(tmp_path / "ref" / "ml-100k"))
    if how == "folder":
        path = tmp_path / "ref" / "ml-100k"
    elif how == "parent":  # the folder above ml-100k/
        path = tmp_path / "ref"
    elif how == "file":
        path = write_atomic(tmp_path / "a") / "ml-100k.inter"
    elif how == "zip":  # GroupLens' ml-100k.zip layout
        path = tmp_path / "ml-100k.zip"
        with zipfile.ZipFile(path, "w") as z:
            z.write(tmp_path / "ref" / "ml-100k" / "u.data", "ml-100k/u.data")
            z.write(tmp_path / "ref" / "ml-100k" / "u.item", "ml-100k/u.item")
            z.writestr("ml-100k/README", "readme")
    else:
        path = write_wheel(tmp_path / "recbole-9.9.9-py3-none-any.whl")
    ds = load(path)
    for c in ref.log.columns:
        np.testing.assert_array_equal(ds.log[c], ref.log[c], err_msg=c)


# ---------------------------------------------------------------- the default path: the wheel


@pytest.fixture
def fake_pip(monkeypatch):
    """Replace pip by a function; records calls."""
    calls = []

    def install(behaviour):
        def run(cmd, **kw):
            calls.append((cmd, kw))
            return behaviour(cmd, **kw)

        monkeypatch.setattr(dsm.subprocess, "run", run)
        return calls

    return install


def _tiny_hashes(monkeypatch, wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        digests = {
            n: hashlib.sha256(z.read(f"recbole/dataset_example/ml-100k/{n}")).hexdigest()
            for n in ("ml-100k.inter", "ml-100k.item")
        }
    monkeypatch.setattr(dsm, "_WHEEL_SHA256", digests)


def test_default_path_downloads_the_wheel_with_pip_once(tmp_path, fake_pip, monkeypatch):
    src = write_wheel(tmp_path / "src.whl")
    _tiny_hashes(monkeypatch, src)

    def pip_download(cmd, **kw):
        dest = Path(cmd[cmd.index("--dest") + 1])
        (dest / "recbole-1.2.1-py3-none-any.whl").write_bytes(src.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "Saved", "")

    calls = fake_pip(pip_download)
    cache = tmp_path / "cache"
    ds = load(None, cache_dir=cache)
    assert len(ds) == 12 and "recbole-1.2.1-py3-none-any.whl!" in ds.source
    ((cmd, kw),) = calls
    assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"]
    assert "recbole==1.2.1" in cmd and kw["timeout"] > 0
    assert sorted(p.name for p in cache.iterdir()) == ["recbole-1.2.1-py3-none-any.whl"]
    load(None, cache_dir=cache)  # cached: pip is not called again
    assert len(calls) == 1


def test_wheel_with_other_content_is_rejected(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    write_wheel(cache / "recbole-1.2.1-py3-none-any.whl")  # not the real files
    with pytest.raises(DatasetError, match="SHA-256"):
        load(None, cache_dir=cache, download=False)


def test_pip_failure_gives_a_clear_error(tmp_path, fake_pip):
    fake_pip(
        lambda cmd, **kw: subprocess.CompletedProcess(
            cmd,
            1,
            "",
            "WARNING: Retrying\nERROR: No matching distribution found for recbole==1.2.1",
        )
    )
    with pytest.raises(DatasetError) as e:
        load(None, cache_dir=tmp_path / "c")
    msg = str(e.value)
    assert "could not download recbole==1.2.1" in msg and "No matching distribution" in msg
    assert "grouplens.org" in msg and "recbole-1.2.1-py3-none-any.whl" in msg
    assert [p.name for p in (tmp_path / "c").iterdir()] == []  # no partial download left


def test_pip_timeout_gives_a_clear_error(tmp_path, fake_pip):
    def hang(cmd, **kw):
        raise subprocess.TimeoutExpired(cmd, kw["timeout"])

    fake_pip(hang)
    with pytest.raises(DatasetError, match="did not finish within 7 s"):
        fetch_recbole_wheel(tmp_path, timeout_s=7)
    with pytest.raises(DatasetError, match="download=False"):
        load(None, cache_dir=tmp_path, download=False)


def test_real_pip_without_an_index_fails_fast_and_clearly(tmp_path, monkeypatch):
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    with pytest.raises(DatasetError, match=r"could not download recbole==1\.2\.1 with pip"):
        fetch_recbole_wheel(tmp_path / "cache", timeout_s=60)


def test_fetch_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="version"):
        fetch_recbole_wheel(tmp_path, version="1.2; rm -rf /")
    with pytest.raises(ValueError, match="timeout_s"):
        fetch_recbole_wheel(tmp_path, timeout_s=0)


# ---------------------------------------------------------------- clear errors


def _rewrite(path: Path, text: str) -> Path:
    path.write_text(text)
    return path.parent


def test_missing_or_unrecognised_paths(tmp_path):
    with pytest.raises(DatasetError, match="no MovieLens data"):
        load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="neither u.data"):
        load(tmp_path / "empty")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DatasetError, match="neither a folder"):
        load(tmp_path / "x.txt")
    only = write_grouplens(tmp_path / "only")
    (only / "u.item").unlink()
    with pytest.raises(DatasetError, match="neither u.data"):
        load(only)


def test_truncated_files(tmp_path):
    g = write_grouplens(tmp_path / "g")
    text = (g / "u.data").read_text()
    _rewrite(g / "u.data", text[: text.rindex("\t")])  # cut inside the last line
    with pytest.raises(DatasetError, match=r"line 12 has 3 .* \(the file looks truncated\)"):
        load(g)
    a = write_atomic(tmp_path / "a")
    text = (a / "ml-100k.item").read_text()
    _rewrite(a / "ml-100k.item", text[: text.rindex("\t")])
    with pytest.raises(DatasetError, match="truncated"):
        load(a)
    # cut on a line boundary: parses, but is not the complete data set
    g2 = write_grouplens(tmp_path / "g2", ratings=RATINGS[:-1])
    with pytest.raises(DatasetError, match=r"11 ratings.*MovieLens-100K has 100,000"):
        load_movielens_100k(g2)


def test_unexpected_formats(tmp_path):
    g = write_grouplens(tmp_path / "g")
    _rewrite(g / "u.data", "1\t1\tfive\t100\n")
    with pytest.raises(DatasetError, match=r"line 1: rating must be a number, got 'five'"):
        load(g)
    _rewrite(g / "u.data", "")
    with pytest.raises(DatasetError, match="empty"):
        load(g)
    _rewrite(g / "u.data", "1\t99\t3\t100\n")
    with pytest.raises(DatasetError, match=r"not in the item file \(first: \['99'\]\)"):
        load(g)
    g = write_grouplens(tmp_path / "dup", items=[*ITEMS, ITEMS[2]])
    with pytest.raises(DatasetError, match=r"lists item ids more than once: \['3'\]"):
        load(g)
    g = write_grouplens(tmp_path / "g2")
    (g / "u.item").write_text("1|Toy Story (1995)|01-Jan-1995\n")
    with pytest.raises(DatasetError, match=r"line 1 has 3 '\|'-separated fields, expected 24"):
        load(g)
    a = write_atomic(tmp_path / "a")
    _rewrite(a / "ml-100k.inter", "user item rating time\n1 1 5 100\n")
    with pytest.raises(DatasetError, match="not name:type"):
        load(a)
    _rewrite(a / "ml-100k.inter", "user_id:token\titem:token\n1\t1\n")
    with pytest.raises(DatasetError, match="no 'item_id' field"):
        load(a)
    a = write_atomic(tmp_path / "a2")
    _rewrite(a / "ml-100k.item", "item_id:token\tclass:token_seq\n1\tCartoon\n")
    with pytest.raises(DatasetError, match=r"unknown genres \['Cartoon'\]"):
        load(a)
    a = write_atomic(tmp_path / "a3")
    (a / "ml-100k.inter").write_bytes(
        b"user_id:token\titem_id:token\ttimestamp:float\n\xff\t1\t1\n"
    )
    with pytest.raises(DatasetError, match="not text in utf-8"):
        load(a)


def test_damaged_archives(tmp_path):
    wheel = write_wheel(tmp_path / "w.whl")
    data = wheel.read_bytes()
    (tmp_path / "cut.whl").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError):
        load(tmp_path / "cut.whl")
    # flip a byte of a compressed member: the CRC check catches it
    with zipfile.ZipFile(wheel) as z:
        info = z.getinfo("recbole/dataset_example/ml-100k/ml-100k.inter")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    bad = bytearray(data)
    bad[start + info.compress_size // 2] ^= 0xFF
    (tmp_path / "flip.whl").write_bytes(bytes(bad))
    with pytest.raises(DatasetError, match="damaged or truncated archive"):
        load(tmp_path / "flip.whl")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("a/b.txt", "x")
    with pytest.raises(DatasetError, match="holds neither"):
        load(tmp_path / "other.zip")


# ---------------------------------------------------------------- leave-one-out


def test_leave_one_out_golden(tmp_path):
    ds = load(write_grouplens(tmp_path / "g"))
    seq = ds.sequences()
    loo = leave_one_out(ds.log, ds.n_items, history_length=3)
    # per user: all but the last two events in train; valid = second-to-last; test = last
    for b, u in enumerate(loo.test_set.user.tolist()):
        s, e = seq.offsets[u], seq.offsets[u + 1]
        items = seq.items[s:e]
        assert loo.test_set.positives[b].tolist() == [items[-1]]
        assert loo.test_set.next_item[b] == items[-1]
        assert loo.test_set.time[b] == seq.times[e - 1]
        # the query sees the last 3 events before the target, oldest first
        hist = items[:-1][-3:]
        mask = loo.test_set.obs[Obs.MASK][b]
        assert loo.test_set.obs[Obs.ITEMS][b][mask == 1].tolist() == hist.tolist()
        np.testing.assert_allclose(
            loo.test_set.obs[Obs.DT][b][mask == 1],
            (seq.times[e - 1] - seq.times[s:e][:-1][-3:]).astype(np.float32),
        )
        # seen items: the whole history before the target (longer than L)
        ss = loo.test_seen
        assert sorted(ss.items[ss.offsets[b] : ss.offsets[b + 1]].tolist()) == sorted(
            items[:-1].tolist()
        )
    for b, u in enumerate(loo.valid_set.user.tolist()):
        s, e = seq.offsets[u], seq.offsets[u + 1]
        assert loo.valid_set.positives[b].tolist() == [seq.items[e - 2]]
        vs = loo.valid_seen
        assert sorted(vs.items[vs.offsets[b] : vs.offsets[b + 1]].tolist()) == sorted(
            seq.items[s : e - 2].tolist()
        )
    assert len(loo.train) == 12 - 2 * 3 and len(loo.valid) == len(loo.test) == 3
    np.testing.assert_array_equal(np.diff(loo.seq_train.offsets), [2, 2, 2])
    # the training windows never hold a held-out event
    w = causal_windows(loo.seq_train, 3)
    assert set(w.targets[w.targets >= 0].tolist()) <= set(loo.train[Columns.ITEM].tolist())
    with pytest.raises(ValueError, match="history_length"):
        leave_one_out(ds.log, ds.n_items, 0)


def test_leave_one_out_keeps_short_users_in_train(tmp_path):
    ratings = RATINGS + [(99, 1, 5, 10)]  # a user with one rating
    ds = load(write_grouplens(tmp_path / "g", ratings=ratings))
    loo = leave_one_out(ds.log, ds.n_items, 4)
    short = int(np.nonzero(ds.user_tokens == "99")[0][0])
    assert short not in loo.test_set.user and short in loo.train[Columns.USER]


def _random_model(catalog, seed=0, user="mean"):
    cfg = TwoTowerConfig(
        item=ItemTowerConfig(kind="id", dim=8, seed=seed),
        user=UserTowerConfig(kind=user, n_layers=1, n_heads=1, max_len=4, seed=seed),
    )
    return TwoTowerModel.build(cfg, catalog)


def test_full_catalog_top_k_matches_brute_force(tmp_path):
    ds = load(write_grouplens(tmp_path / "g"))
    loo = leave_one_out(ds.log, ds.n_items, 4)
    model = _random_model(ds.catalog)
    ev, seen = loo.test_set, loo.test_seen
    scores = model.scores(ev.obs).numpy().astype(np.float64)  # (B, N)
    for b in range(len(ev)):
        scores[b, seen.items[seen.offsets[b] : seen.offsets[b + 1]]] = -np.inf
    k = 3
    top = full_catalog_top_k(model, ev, k, seen, batch_size=2)  # several blocks
    want = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(top, want)
    for b in range(len(ev)):  # seen items never come back
        assert not set(top[b]) & set(seen.items[seen.offsets[b] : seen.offsets[b + 1]])
    # HR / NDCG from the exact rank of the target
    rank = np.array([(scores[b] > scores[b, ev.next_item[b]]).sum() for b in range(len(ev))])
    m = next_item_metrics(model, ev, seen, k)
    assert m["hr@3"] == pytest.approx(np.mean(rank < k))
    assert m["ndcg@3"] == pytest.approx(np.mean(np.where(rank < k, 1 / np.log2(rank + 2), 0)))
    with pytest.raises(ValueError, match="k must be"):
        full_catalog_top_k(model, ev, ds.n_items + 1)
    other = seen_items(loo.seq_train, loo.valid_set)
    with pytest.raises(ValueError, match="seen covers"):
        full_catalog_top_k(model, ev.subset(np.arange(1)), 2, other)


def test_release_time_masking(tmp_path):
    ds = load(write_grouplens(tmp_path / "g"))
    loo = leave_one_out(ds.log, ds.n_items, 4)
    model = _random_model(ds.catalog)
    rel = np.zeros(ds.n_items)
    rel[[1, 3]] = np.inf  # never released
    top = full_catalog_top_k(model, loo.test_set, 5, release_time=rel)
    assert not np.isin(top, [1, 3]).any()


@pytest.mark.parametrize(
    "item,user,causal",
    [
        (ItemTowerConfig(kind="id", dim=8), "transformer", True),
        (ItemTowerConfig(kind="bow", dim=8), "mean", False),
        (ItemTowerConfig(kind="features", dim=8, features=("genre", "year")), "gru", True),
        (
            ItemTowerConfig(
                kind="hybrid",
                dim=8,
                parts=(
                    ItemTowerConfig(kind="id", dim=8),
                    ItemTowerConfig(kind="bow", dim=8),
                    ItemTowerConfig(kind="features", dim=8, features=("genre", "year")),
                ),
            ),
            "transformer",
            False,
        ),
    ],
)
def test_every_tower_trains_on_it_unchanged(tmp_path, item, user, causal):
    ds = load(write_grouplens(tmp_path / "g"))
    loo = leave_one_out(ds.log, ds.n_items, 4)
    model = TwoTowerModel.build(
        TwoTowerConfig(item=item, user=UserTowerConfig(kind=user, n_heads=1, max_len=4)),
        ds.catalog,
    )
    res = fit_two_tower(
        model,
        RetrievalLossConfig(kind="full_softmax"),
        loo.train,
        loo.seq_train,
        TrainConfig(epochs=2, batch_size=4, history_length=4, causal=causal, progress=False),
        valid=loo.valid_set,
        release_time=ds.catalog.release_time,
    )
    assert all(np.isfinite(h["loss"]) for h in res.history)
    m = next_item_metrics(model, loo.test_set, loo.test_seen, 2)
    assert 0.0 <= m["hr@2"] <= 1.0


# ---------------------------------------------------------------- the real data (if cached)

REAL = (
    Path(__file__).resolve().parents[2] / ".cache" / "movielens" / "recbole-1.2.1-py3-none-any.whl"
)


@pytest.mark.skipif(not REAL.is_file(), reason="the recbole wheel is not in .cache/movielens")
def test_real_movielens_100k_golden():
    ds = load_movielens_100k(cache_dir=REAL.parent, download=False)
    s = ds.summary()
    assert (s["interactions"], s["users"], s["items"], s["rated_items"]) == (
        100_000,
        943,
        1682,
        1682,
    )
    assert s["like_share"] == 0.55375  # 55,375 ratings of 4 or 5
    assert np.bincount(ds.log[Columns.REWARD].astype(int)).tolist() == [
        0, 6110, 11370, 27145, 34174, 21201,
    ]  # fmt: skip
    assert ds.item_titles[0] == "Toy Story" and ds.catalog.column("year")[0] > 0
    seq = ds.sequences()
    user_of = np.repeat(np.arange(943), np.diff(seq.offsets))
    assert np.all(np.diff(seq.times)[user_of[1:] == user_of[:-1]] > 0)  # one strict order
    loo = leave_one_out(ds.log, ds.n_items, 50)
    assert len(loo.test_set) == len(loo.valid_set) == 943 and len(loo.train) == 100_000 - 2 * 943


def test_valid_score_drives_early_stopping(tmp_path):
    """fit_two_tower(valid_score=...) stops on that score and keeps the best epoch's weights."""
    ds = load(write_grouplens(tmp_path / "g"))
    loo = leave_one_out(ds.log, ds.n_items, 4)
    model = _random_model(ds.catalog)
    scores = iter([0.3, 0.5, 0.4, 0.2, 0.9])
    states = []

    def score(m):
        states.append({k: v.clone() for k, v in m.state_dict().items()})
        return next(scores)

    res = fit_two_tower(
        model, RetrievalLossConfig(kind="full_softmax"), loo.train, loo.seq_train,
        TrainConfig(epochs=5, batch_size=4, history_length=4, patience=2, progress=False),
        valid=loo.valid_set, release_time=ds.catalog.release_time, valid_score=score,
    )  # fmt: skip
    assert [h["valid_recall"] for h in res.history] == [0.3, 0.5, 0.4, 0.2]  # stopped
    assert (res.best_epoch, res.best_recall) == (2, 0.5)
    for k, v in model.state_dict().items():  # the weights of epoch 2 are restored
        assert torch.equal(v, states[1][k]), k
