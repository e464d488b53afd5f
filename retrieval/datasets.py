"""Real interaction data in the simulator's log format: MovieLens-100K.

:func:`load_movielens_100k` reads MovieLens-100K (943 users, 1,682 movies, 100,000 ratings
from 1997-98) and turns it into the structures every tower and loss of ``retrieval`` trains
on from simulator logs: an :class:`~simenv.log.ImpressionLog` with one row per rating and an
:class:`~simenv.types.ItemCatalog` built from the titles and genres, so that
:class:`~simenv.history.EventSequences`, :func:`~retrieval.data.next_item_examples`,
:func:`~retrieval.data.causal_windows`, :func:`~retrieval.data.eval_set` and
:func:`~retrieval.train.fit_two_tower` work on it unchanged.

Where the files come from (the first that applies):

1. ``path`` given: a folder holding the original GroupLens files ``u.data`` and ``u.item``
   (the ``ml-100k`` folder of ``ml-100k.zip``) or RecBole's atomic files ``ml-100k.inter``
   and ``ml-100k.item``; one of those files itself; or a ``.zip`` / ``.whl`` archive that
   holds either pair (GroupLens' ``ml-100k.zip``, the ``recbole`` wheel).
2. No path: the copy inside the ``recbole`` wheel on PyPI. :func:`fetch_recbole_wheel`
   downloads it once with ``pip download --no-deps recbole==1.2.1`` into a cache folder
   (``$SIMENV_CACHE_DIR``, else ``./.cache/movielens``; git ignores ``.cache/``); the files
   are read out of the zip with the standard library, recbole is never installed, and
   their SHA-256 is checked against the copy in recbole 1.2.1.

**Licence.** MovieLens data sets are published by GroupLens Research (University of
Minnesota) for research use under their own terms: no redistribution without separate
permission, no commercial use without permission, acknowledge the data set in publications
(F. M. Harper and J. A. Konstan, "The MovieLens Datasets: History and Context", ACM TiiS 5(4),
2015) and no endorsement implied. This project therefore never ships or commits the data; it
reads a copy the user obtained.

How the ratings become a log (one request per rating, position 0):

- every rating is a positive engagement event, as in SASRec and in Klenitskiy & Vasilev's
  protocol (all interactions are implicit feedback): ``LIKE`` for a rating >= 4 (the
  ``like_threshold``), ``CLICK`` below it. Both are positives (targets); the event type
  only tells the sequence towers, as an input, how much the user liked the past movies. A
  low rating is not mapped to ``DISLIKE``, which would drop about a fifth of the events
  from the targets and depart from the published protocol. ``like_threshold=None`` gives
  every event the type ``CLICK``.
- ``time`` is the Unix timestamp in days. A user rated many movies within the same second
  (about half the ratings share their second with another of the user's); such ties keep
  the order of the file (a stable sort) and are spaced 1 ms apart, so that every
  time-based history lookup of :class:`EventSequences` sees one strict order.
- ``reward`` holds the rating (1-5; 1 for every event of a file without ratings, whose events
  are all ``CLICK``), ``watch`` 0, ``propensity`` NaN (no logging policy);
  ``session`` and ``session_step`` are 0.
- users and items get compact ids ``0..U-1`` and ``0..N-1`` in the order of their original
  ids (kept in :attr:`InteractionDataset.user_tokens` / ``item_tokens``).

The catalog: ``title_tokens`` are the lowercased words of the title (the year in
parentheses dropped) followed by one ``genre:<name>`` token per genre, ids from a sorted
vocabulary (0 = padding); categorical columns ``genre`` (the first of the movie's genres in
GroupLens' order, 19 values) and ``year`` (release year, 0 = unknown, else
``year - first_year + 1``); ``release_time`` is 0 for every movie, so every movie can be
recommended at any time (MovieLens release dates are cinema dates, not catalog arrivals,
and some lie after the movie's first rating).

The leave-one-out protocol of sequential recommendation (:func:`leave_one_out`): per user,
the last interaction is the test target and the one before it the validation target; the
query is the history of everything before the target; ranking is over the full catalog
(:func:`full_catalog_top_k`, no sampled metrics) with the user's earlier items removed
(each (user, movie) pair occurs once in MovieLens, so a seen movie is never the target).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from retrieval.data import EvalSet, eval_set
from retrieval.metrics import hit_rate_at_k, mean_over_users, ndcg_at_k
from retrieval.model import TwoTowerModel
from retrieval.train import to_torch_obs
from simenv.export import ExportFormatError, parse_atomic
from simenv.history import EventSequences, take_obs
from simenv.log import ImpressionLog
from simenv.types import Columns, EventType, ItemCatalog

__all__ = [
    "DatasetError",
    "InteractionDataset",
    "LeaveOneOut",
    "MOVIELENS_100K_SIZE",
    "MOVIELENS_GENRES",
    "RECBOLE_VERSION",
    "SeenItems",
    "default_cache_dir",
    "fetch_recbole_wheel",
    "full_catalog_top_k",
    "leave_one_out",
    "load_movielens_100k",
    "next_item_metrics",
    "seen_items",
]

#: Genre names of MovieLens-100K in the order of ``u.genre`` (the flag columns of ``u.item``).
MOVIELENS_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
#: (ratings, users, items) of the complete MovieLens-100K.
MOVIELENS_100K_SIZE = (100_000, 943, 1_682)
#: The recbole release whose wheel carries the copy of MovieLens-100K that is read by default.
RECBOLE_VERSION = "1.2.1"
_WHEEL_DIR = "recbole/dataset_example/ml-100k"
_WHEEL_SHA256 = {  # of the two files inside recbole-1.2.1-py3-none-any.whl
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
}
_GROUPLENS = ("u.data", "u.item")
_ATOMIC = ("ml-100k.inter", "ml-100k.item")
_TIE_STEP_S = 1e-3  # seconds between ratings a user gave within the same second
_MANUAL = (
    "Without network access, download MovieLens-100K yourself from "
    "https://grouplens.org/datasets/movielens/100k/ (ml-100k.zip; mind its licence) and pass "
    "its path (the zip, or the folder with u.data and u.item), or place "
    "recbole-{version}-py3-none-any.whl in {cache}."
)


class DatasetError(ValueError):
    """A data file is missing, truncated, damaged or not in the expected format."""


# --------------------------------------------------------------------------- the dataset


@dataclass(frozen=True, eq=False)
class InteractionDataset:
    """Real interactions as a simulator log plus a public catalog.

    Attributes:
        name: dataset name (``"movielens-100k"``).
        log: one row per interaction (see the module docstring for the mapping).
        catalog: the public item content (titles, genres, year).
        user_tokens: str ``(U,)`` original id of each compact user id.
        item_tokens: str ``(N,)`` original id of each compact item id.
        item_titles: the title of each item, as in the source file.
        vocabulary: word of each title token id (index 0 is ``"<pad>"``).
        source: where the data was read from.
    """

    name: str
    log: ImpressionLog
    catalog: ItemCatalog
    user_tokens: np.ndarray
    item_tokens: np.ndarray
    item_titles: tuple[str, ...]
    vocabulary: tuple[str, ...]
    source: str

    @property
    def n_users(self) -> int:
        """Number of users U."""
        return int(self.user_tokens.size)

    @property
    def n_items(self) -> int:
        """Catalog size N (every item of the item file, rated or not)."""
        return self.catalog.n_items

    def __len__(self) -> int:
        return len(self.log)

    def sequences(self) -> EventSequences:
        """Every user's events in time order."""
        return EventSequences.from_log(self.log, self.n_items)

    def summary(self) -> dict[str, Any]:
        """Counts for reports."""
        per_user = np.bincount(self.log[Columns.USER], minlength=self.n_users)
        return {
            "dataset": self.name,
            "interactions": len(self.log),
            "users": self.n_users,
            "items": self.n_items,
            "rated_items": int(np.unique(self.log[Columns.ITEM]).size),
            "density": len(self.log) / max(self.n_users * self.n_items, 1),
            "events_per_user_median": float(np.median(per_user)) if per_user.size else 0.0,
            "like_share": float(np.mean(self.log[Columns.FEEDBACK] == EventType.LIKE)),
            "vocab_size": self.catalog.vocab_size,
            "source": self.source,
        }


@dataclass(frozen=True)
class _RawItems:
    tokens: np.ndarray  # str (N,)
    titles: tuple[str, ...]
    years: np.ndarray  # int64 (N,), -1 unknown
    genres: tuple[tuple[int, ...], ...]  # genre ids per item


@dataclass(frozen=True)
class _RawInteractions:
    users: np.ndarray  # str (E,)
    items: np.ndarray  # str (E,)
    ratings: np.ndarray  # float64 (E,)
    timestamps: np.ndarray  # int64 (E,) seconds


# --------------------------------------------------------------------------- parsing


def _decode(data: bytes, source: str, encodings: tuple[str, ...]) -> str:
    for enc in encodings:
        try:
            return data.decode(enc)
        except UnicodeDecodeError:
            continue
    raise DatasetError(f"{source} is not text in {' or '.join(encodings)}")


def _lines(text: str) -> list[str]:
    lines = text.replace("\r\n", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _split_fixed(lines: list[str], sep: str, width: int, source: str, first: int) -> np.ndarray:
    """Rows of exactly ``width`` fields as a str array ``(R, width)``; else a DatasetError."""
    rows = [line.split(sep) for line in lines]
    bad = [i for i, r in enumerate(rows) if len(r) != width]
    if bad:
        i = bad[0]
        hint = " (the file looks truncated)" if i == len(rows) - 1 else ""
        raise DatasetError(
            f"{source}: line {first + i} has {len(rows[i])} {sep!r}-separated fields, expected "
            f"{width}{hint}: {lines[i][:80]!r}"
        )
    return np.array(rows, dtype=str) if rows else np.zeros((0, width), dtype=str)


def _numbers(text: np.ndarray, kind: type, what: str, source: str, first: int) -> np.ndarray:
    try:
        return text.astype(np.int64) if kind is int else text.astype(np.float64)
    except (ValueError, OverflowError):
        for i, s in enumerate(text.tolist()):
            try:
                kind(s)
            except (ValueError, OverflowError):
                raise DatasetError(
                    f"{source}: line {first + i}: {what} must be "
                    f"{'an integer' if kind is int else 'a number'}, got {s!r}"
                ) from None
        raise DatasetError(f"{source}: {what} is out of range") from None


def _parse_grouplens_data(data: bytes, source: str) -> _RawInteractions:
    r"""``u.data``: ``user \\t item \\t rating \\t timestamp``, no header."""
    lines = _lines(_decode(data, source, ("utf-8", "latin-1")))
    if not lines:
        raise DatasetError(f"{source} is empty: expected lines 'user<TAB>item<TAB>rating<TAB>time'")
    cells = _split_fixed(lines, "\t", 4, source, 1)
    return _RawInteractions(
        users=_canonical_tokens(cells[:, 0]),
        items=_canonical_tokens(cells[:, 1]),
        ratings=_finite(_numbers(cells[:, 2], float, "rating", source, 1), "rating", source, 1),
        timestamps=_numbers(cells[:, 3], int, "timestamp", source, 1),
    )


def _finite(values: np.ndarray, what: str, source: str, first: int) -> np.ndarray:
    """``values`` if all finite, else a DatasetError naming the first bad line."""
    bad = ~np.isfinite(values)
    if bad.any():
        i = int(np.argmax(bad))
        raise DatasetError(f"{source}: line {first + i}: {what} must be finite, got {values[i]}")
    return values


_YEAR_IN_TITLE = re.compile(r"\s*\((\d{4})\)\s*$")


def _parse_grouplens_item(data: bytes, source: str) -> _RawItems:
    """``u.item`` (latin-1): ``id|title|release date|video date|url|19 genre flags``."""
    lines = _lines(_decode(data, source, ("utf-8", "latin-1")))
    if not lines:
        raise DatasetError(f"{source} is empty: expected lines 'id|title|date|...|19 genre flags'")
    width = 5 + len(MOVIELENS_GENRES)
    cells = _split_fixed(lines, "|", width, source, 1)
    flags = cells[:, 5:]
    if not np.isin(flags, ("0", "1")).all():
        r = int(np.argmax(~np.isin(flags, ("0", "1")).all(axis=1)))
        raise DatasetError(f"{source}: line {r + 1}: the 19 genre flags must be 0 or 1")
    titles, years = [], []
    for title, date in zip(cells[:, 1].tolist(), cells[:, 2].tolist(), strict=True):
        m = _YEAR_IN_TITLE.search(title)
        year = -1
        if date.strip()[-4:].isdigit():
            year = int(date.strip()[-4:])
        elif m:
            year = int(m.group(1))
        titles.append(_YEAR_IN_TITLE.sub("", title))
        years.append(year)
    genres = tuple(tuple(np.nonzero(row == "1")[0].tolist()) for row in flags)
    return _RawItems(
        _canonical_tokens(cells[:, 0]), tuple(titles), np.array(years, np.int64), genres
    )


def _atomic(data: bytes, source: str) -> Any:
    try:
        return parse_atomic(_decode(data, source, ("utf-8",)), source)
    except ExportFormatError as e:
        raise DatasetError(str(e)) from None


def _parse_atomic_inter(data: bytes, source: str) -> _RawInteractions:
    """RecBole ``.inter``: ``user_id:token  item_id:token  rating:float  timestamp:float``."""
    tab = _atomic(data, source)
    for f in ("user_id", "item_id", "timestamp"):
        if not tab.has(f):
            raise DatasetError(f"{source}: no {f!r} field; its fields are {list(tab.names)}")
    if len(tab) == 0:
        raise DatasetError(f"{source} has a header but no interactions")
    ts = _numbers(tab.text("timestamp"), float, "timestamp", source, 2)
    if not np.all(np.isfinite(ts)) or np.any(ts != np.round(ts)):
        raise DatasetError(f"{source}: timestamps must be whole seconds")
    ratings = (
        _finite(_numbers(tab.text("rating"), float, "rating", source, 2), "rating", source, 2)
        if tab.has("rating")
        else np.full(len(tab), np.nan)  # no ratings in the file (see _build_dataset)
    )
    return _RawInteractions(
        _canonical_tokens(tab.text("user_id")),
        _canonical_tokens(tab.text("item_id")),
        ratings,
        ts.astype(np.int64),
    )


def _parse_atomic_item(data: bytes, source: str) -> _RawItems:
    """RecBole ``.item``: ``item_id  movie_title:token_seq  release_year:token  class:token_seq``."""
    tab = _atomic(data, source)
    if not tab.has("item_id"):
        raise DatasetError(f"{source}: no 'item_id' field; its fields are {list(tab.names)}")
    n = len(tab)
    titles = tab.text("movie_title").tolist() if tab.has("movie_title") else [""] * n
    years = np.full(n, -1, np.int64)
    if tab.has("release_year"):
        y = tab.text("release_year")
        ok = np.char.isdigit(y)
        years[ok] = y[ok].astype(np.int64)
    index = {g: i for i, g in enumerate(MOVIELENS_GENRES)}
    genres = []
    for line, names in enumerate(tab.sequences("class") if tab.has("class") else [[]] * n):
        unknown = [g for g in names if g not in index]
        if unknown:
            raise DatasetError(
                f"{source}: line {line + 2}: unknown genres {unknown}; MovieLens genres are "
                f"{list(MOVIELENS_GENRES)}"
            )
        genres.append(tuple(sorted({index[g] for g in names})))
    return _RawItems(_canonical_tokens(tab.text("item_id")), tuple(titles), years, tuple(genres))


def _canonical_tokens(tokens: np.ndarray) -> np.ndarray:
    """Ids as text without surrounding blanks (``" 12"`` and ``"12"`` are one user)."""
    return np.char.strip(np.asarray(tokens, dtype=str))


def _id_order(tokens: np.ndarray) -> np.ndarray:
    """Indices that sort distinct tokens: numerically when all are integers, else as text.

    Numeric order without converting (ids of any length): by the number of digits after
    leading zeros, then by those digits as text, then by the token itself (``"07"`` after
    ``"7"``).
    """
    if tokens.size and np.all(np.char.isdigit(tokens)):
        digits = np.char.lstrip(tokens, "0")
        return np.lexsort((tokens, digits, np.char.str_len(digits)))
    return np.argsort(tokens, kind="stable")


# --------------------------------------------------------------------------- building


_WORD = re.compile(r"[^\W_]+")


def _catalog(items: _RawItems) -> tuple[ItemCatalog, tuple[str, ...]]:
    """Catalog and vocabulary from titles, genres and years (see the module docstring)."""
    words = [
        _WORD.findall(t.lower()) + [f"genre:{MOVIELENS_GENRES[g].lower()}" for g in gs]
        for t, gs in zip(items.titles, items.genres, strict=True)
    ]
    vocab = ("<pad>", *sorted({w for ws in words for w in ws}))
    ids = {w: i for i, w in enumerate(vocab)}
    n = len(words)
    width = max(1, max((len(ws) for ws in words), default=0))
    tokens = np.zeros((n, width), dtype=np.int64)
    for r, ws in enumerate(words):  # once per item at load time, not a hot path
        tokens[r, : len(ws)] = [ids[w] for w in ws]
    primary = np.array([gs[0] if gs else 0 for gs in items.genres], dtype=np.int64)
    known = items.years >= 0
    first = int(items.years[known].min()) if known.any() else 0
    year = np.where(known, items.years - first + 1, 0).astype(np.int64)
    catalog = ItemCatalog(
        title_tokens=tokens,
        vocab_size=len(vocab),
        categorical=np.stack([primary, year], axis=1),
        categorical_names=("genre", "year"),
        categorical_cardinalities=(len(MOVIELENS_GENRES), int(year.max()) + 1 if n else 1),
        release_time=np.zeros(n, dtype=np.float32),
    )
    return catalog, vocab


def _build_dataset(
    inter: _RawInteractions,
    items: _RawItems,
    name: str,
    source: str,
    like_threshold: float | None = 4,
) -> InteractionDataset:
    """Build the log and catalog from parsed interactions and items (see the module docstring).

    Raises:
        DatasetError: for duplicate item ids, interactions naming items the item file lacks,
            or non-finite ratings / timestamps.
    """
    order_i = _id_order(items.tokens)
    item_tokens = items.tokens[order_i]
    if item_tokens.size == 0:
        raise DatasetError(f"{source}: the item file lists no items")
    sorted_tokens = np.sort(item_tokens)
    dup = sorted_tokens[1:][sorted_tokens[1:] == sorted_tokens[:-1]]
    if dup.size:
        raise DatasetError(
            f"{source}: the item file lists item ids more than once: {np.unique(dup)[:5].tolist()}"
        )
    # compact item id of each interaction, by a vectorised search in the sorted ids
    by_text = np.argsort(item_tokens)
    pos_c = np.minimum(np.searchsorted(sorted_tokens, inter.items), item_tokens.size - 1)
    found = sorted_tokens[pos_c] == inter.items
    if not found.all():
        missing = np.unique(inter.items[~found])
        raise DatasetError(
            f"{source}: {missing.size} item ids of the interactions are not in the item file "
            f"(first: {missing[:5].tolist()}); are the two files from the same data set?"
        )
    item_idx = by_text[pos_c]  # compact id (position in item_tokens)
    user_tokens_all, user_idx = np.unique(inter.users, return_inverse=True)
    order_u = _id_order(user_tokens_all)
    rank_u = np.empty_like(order_u)
    rank_u[order_u] = np.arange(order_u.size)
    user_idx = rank_u[user_idx.reshape(-1)]
    user_tokens = user_tokens_all[order_u]
    if not np.all(np.isfinite(inter.ratings) | np.isnan(inter.ratings)):
        raise DatasetError(f"{source}: ratings must be finite")
    if inter.timestamps.size and inter.timestamps.min() < 0:
        i = int(np.argmax(inter.timestamps < 0))
        raise DatasetError(
            f"{source}: timestamps must be >= 0 (seconds since 1970), got {inter.timestamps[i]}"
        )
    # time order per user; ties (same second) keep the file order
    e = inter.timestamps.size
    order = np.lexsort((np.arange(e), inter.timestamps, user_idx))
    u, i, ts = user_idx[order], item_idx[order], inter.timestamps[order]
    rating = inter.ratings[order]
    new = np.r_[True, (u[1:] != u[:-1]) | (ts[1:] != ts[:-1])] if e else np.zeros(0, bool)
    tie_rank = np.arange(e) - np.maximum.accumulate(np.where(new, np.arange(e), 0))
    step = (
        _TIE_STEP_S
        if (tie_rank.max(initial=0) + 1) * _TIE_STEP_S < 1
        else 1.0 / (tie_rank.max(initial=0) + 1)
    )
    time_days = (ts.astype(np.float64) + tie_rank * step) / 86_400.0
    if like_threshold is None:
        feedback = np.full(e, EventType.CLICK, dtype=np.int8)
    else:
        feedback = np.where(rating >= like_threshold, EventType.LIKE, EventType.CLICK)
    cols = {
        Columns.USER: u.astype(np.int64),
        Columns.TIME: time_days,
        Columns.SESSION: np.zeros(e, np.int32),
        "session_step": np.zeros(e, np.int32),
        Columns.REQUEST: np.arange(e, dtype=np.int64),
        Columns.POSITION: np.zeros(e, np.int16),
        Columns.ITEM: i.astype(np.int64),
        Columns.FEEDBACK: feedback.astype(np.int8),
        Columns.WATCH: np.zeros(e, np.float32),
        Columns.REWARD: np.where(np.isnan(rating), 1.0, rating).astype(np.float32),
        Columns.PROPENSITY: np.full(e, np.nan, np.float32),
    }
    meta = {
        "dataset": name,
        "source": source,
        "like_threshold": like_threshold,
        "time_unit": "days since 1970-01-01 UTC (ties within a user's second 1 ms apart)",
        "reward": "rating",
    }
    catalog, vocab = _catalog(
        _RawItems(
            item_tokens,
            tuple(items.titles[j] for j in order_i),
            items.years[order_i],
            tuple(items.genres[j] for j in order_i),
        )
    )
    try:
        log = ImpressionLog(cols, meta=meta)
    except ValueError as e:  # a value the checks above missed: still the file's fault
        raise DatasetError(f"{source}: {e}") from e
    return InteractionDataset(
        name=name,
        log=log,
        catalog=catalog,
        user_tokens=user_tokens,
        item_tokens=item_tokens,
        item_titles=tuple(items.titles[j] for j in order_i),
        vocabulary=vocab,
        source=source,
    )


# --------------------------------------------------------------------------- sources


def default_cache_dir() -> Path:
    """``$SIMENV_CACHE_DIR/movielens`` if set, else ``./.cache/movielens`` (git-ignored)."""
    root = os.environ.get("SIMENV_CACHE_DIR")
    return (Path(root) if root else Path.cwd() / ".cache") / "movielens"


def fetch_recbole_wheel(
    cache_dir: str | os.PathLike[str] | None = None,
    version: str = RECBOLE_VERSION,
    timeout_s: float = 180.0,
) -> Path:
    """The ``recbole`` wheel in ``cache_dir``, downloaded with pip if it is not there yet.

    Runs ``python -m pip download --no-deps --only-binary=:all: recbole==VERSION`` (pip's own
    index configuration applies) into a temporary folder and moves the wheel into the cache
    when complete, so an interrupted download never leaves a partial wheel behind.

    Args:
        cache_dir: where the wheel is kept (default :func:`default_cache_dir`).
        version: the recbole release.
        timeout_s: give up after this many seconds (pip's socket timeout is at most 30 s).

    Returns:
        The wheel's path.

    Raises:
        DatasetError: when pip fails (no network, no such version), times out or cannot run;
            the message says how to provide the data by hand.
    """
    if not re.fullmatch(r"[0-9][0-9A-Za-z.+-]*", str(version)):
        raise ValueError(f"version must be a release number like '1.2.1', got {version!r}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    wheel = cache / f"recbole-{version}-py3-none-any.whl"
    if wheel.is_file():
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    manual = _MANUAL.format(version=version, cache=cache)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache))
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--no-input", "--disable-pip-version-check", "--timeout", str(int(min(30, timeout_s))),
        "--retries", "2", "--dest", str(tmp), f"recbole=={version}",
    ]  # fmt: skip
    try:
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout_s, check=False
            )
        except subprocess.TimeoutExpired:
            raise DatasetError(
                f"pip download of recbole=={version} did not finish within {timeout_s:g} s "
                f"(no network?). {manual}"
            ) from None
        except OSError as e:
            raise DatasetError(f"could not run pip ({e}). {manual}") from None
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout or "").strip().splitlines()[-3:])
            raise DatasetError(
                f"could not download recbole=={version} with pip (exit {proc.returncode}: "
                f"{tail}). {manual}"
            )
        got = sorted(tmp.glob("recbole-*.whl"))
        if not got:
            raise DatasetError(f"pip download of recbole=={version} produced no wheel. {manual}")
        os.replace(got[0], wheel)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return wheel


def _read_pair(path: Path) -> tuple[_RawInteractions, _RawItems, str]:
    """Parse the interaction and item files found at ``path`` (folder, file or archive)."""
    if path.is_dir():
        for names, kind in ((_GROUPLENS, "grouplens"), (_ATOMIC, "atomic")):
            if all((path / n).is_file() for n in names):
                inter, item = ((path / n).read_bytes() for n in names)
                return _parse(kind, inter, item, str(path / names[0]), str(path / names[1]))
        sub = path / "ml-100k"
        if sub.is_dir():
            return _read_pair(sub)
        raise DatasetError(
            f"{path} holds neither u.data + u.item (GroupLens) nor ml-100k.inter + ml-100k.item "
            f"(RecBole); it has {sorted(p.name for p in path.iterdir())[:10]}"
        )
    if not path.exists():
        raise DatasetError(f"no MovieLens data at {path}")
    if path.name in _GROUPLENS or path.name in _ATOMIC:
        return _read_pair(path.parent)
    if zipfile.is_zipfile(path):
        return _read_archive(path)
    raise DatasetError(
        f"{path} is neither a folder, a MovieLens file (u.data, u.item, ml-100k.inter, "
        "ml-100k.item) nor a zip archive (a truncated download is not a valid zip either)"
    )


def _read_archive(path: Path) -> tuple[_RawInteractions, _RawItems, str]:
    try:
        with zipfile.ZipFile(path) as z:
            members = {PurePosixPath(n).name: n for n in z.namelist() if not n.endswith("/")}
            for names, kind in ((_ATOMIC, "atomic"), (_GROUPLENS, "grouplens")):
                if all(n in members for n in names):
                    data = [z.read(members[n]) for n in names]  # zipfile checks each CRC
                    where = [f"{path}!{members[n]}" for n in names]
                    if members[names[0]].startswith(_WHEEL_DIR):
                        _check_wheel_copy(names, data, path)
                    return _parse(kind, data[0], data[1], where[0], where[1])
    except (
        zipfile.BadZipFile,
        zlib.error,
        EOFError,
        OSError,
        RuntimeError,
        NotImplementedError,
    ) as e:
        raise DatasetError(
            f"{path} is a damaged or truncated archive ({type(e).__name__}: {e}); delete it and "
            "download it again"
        ) from e
    raise DatasetError(
        f"{path} holds neither u.data + u.item nor ml-100k.inter + ml-100k.item "
        f"(for the recbole wheel: {_WHEEL_DIR}/)"
    )


def _check_wheel_copy(names: tuple[str, ...], data: list[bytes], path: Path) -> None:
    for n, d in zip(names, data, strict=True):
        digest = hashlib.sha256(d).hexdigest()
        want = _WHEEL_SHA256.get(n)
        if want is not None and digest != want and f"recbole-{RECBOLE_VERSION}-" in path.name:
            raise DatasetError(
                f"{path}!{n} has SHA-256 {digest}, the copy in recbole {RECBOLE_VERSION} has "
                f"{want}: a damaged or altered wheel; delete it and download it again"
            )


def _parse(
    kind: str, inter: bytes, item: bytes, inter_src: str, item_src: str
) -> tuple[_RawInteractions, _RawItems, str]:
    if kind == "grouplens":
        data, items = _parse_grouplens_data(inter, inter_src), _parse_grouplens_item(item, item_src)
        return data, items, inter_src
    return _parse_atomic_inter(inter, inter_src), _parse_atomic_item(item, item_src), inter_src


def load_movielens_100k(
    path: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    like_threshold: float | None = 4,
    check_size: bool = True,
    download: bool = True,
    timeout_s: float = 180.0,
) -> InteractionDataset:
    """MovieLens-100K as an :class:`InteractionDataset` (log + catalog).

    Args:
        path: a folder with ``u.data`` + ``u.item`` or ``ml-100k.inter`` + ``ml-100k.item``,
            one of those files, or a ``.zip`` / ``.whl`` holding either pair. None: the copy
            in the recbole wheel (downloaded with pip into ``cache_dir`` if needed).
        cache_dir: where the wheel is cached (default :func:`default_cache_dir`).
        like_threshold: ratings ``>=`` this are ``LIKE`` events, lower ones ``CLICK``
            (None: all ``CLICK``); both are positives.
        check_size: require the complete data set (100,000 ratings, 943 users, 1,682
            items); a truncated file that still parses is caught here. Turn off to read a
            subset or a file of your own in the same format.
        download: allow the pip download when ``path`` is None and the wheel is not cached.
        timeout_s: limit of the download.

    Returns:
        The dataset.

    Raises:
        DatasetError: when a file is missing, truncated, damaged or in an unexpected format,
            or the download fails.
    """
    if like_threshold is not None and not np.isfinite(like_threshold):
        raise ValueError(f"like_threshold must be a finite number or None, got {like_threshold}")
    if path is None:
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        wheel = cache / f"recbole-{RECBOLE_VERSION}-py3-none-any.whl"
        if not wheel.is_file():
            if not download:
                raise DatasetError(
                    f"{wheel} is not there and download=False. "
                    + _MANUAL.format(version=RECBOLE_VERSION, cache=cache)
                )
            wheel = fetch_recbole_wheel(cache, RECBOLE_VERSION, timeout_s)
        target = wheel
    else:
        target = Path(path)
    inter, items, source = _read_pair(target)
    ds = _build_dataset(inter, items, "movielens-100k", source, like_threshold)
    if check_size:
        got = (len(ds.log), ds.n_users, ds.n_items)
        if got != MOVIELENS_100K_SIZE:
            raise DatasetError(
                f"{source}: {got[0]:,} ratings, {got[1]:,} users, {got[2]:,} items; "
                f"MovieLens-100K has {MOVIELENS_100K_SIZE[0]:,}, {MOVIELENS_100K_SIZE[1]:,} and "
                f"{MOVIELENS_100K_SIZE[2]:,}: a truncated file or another data set "
                "(pass check_size=False to read it anyway)"
            )
    return ds


# --------------------------------------------------------------------------- leave-one-out


@dataclass(frozen=True, eq=False)
class SeenItems:
    """Items each query's user engaged with before the query, in CSR form.

    Attributes:
        offsets: int64 ``(B + 1,)``; the items of query b are ``items[offsets[b]:offsets[b+1]]``.
        items: int64 ``(E,)``.
    """

    offsets: np.ndarray
    items: np.ndarray

    def rows(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """(row within the block, item) pairs of queries ``lo..hi-1``, for masking."""
        s, e = int(self.offsets[lo]), int(self.offsets[hi])
        counts = np.diff(self.offsets[lo : hi + 1])
        return np.repeat(np.arange(hi - lo), counts), self.items[s:e]


def seen_items(sequences: EventSequences, ev: EvalSet) -> SeenItems:
    """Every item in ``sequences`` the query's user engaged with strictly before the query time."""
    start, end = sequences.count_before(ev.user, ev.time)
    n = end - start
    offsets = np.r_[0, np.cumsum(n)].astype(np.int64)
    idx = np.repeat(start - offsets[:-1], n) + np.arange(int(offsets[-1]))
    return SeenItems(offsets, sequences.items[idx].astype(np.int64))


@dataclass(frozen=True, eq=False)
class LeaveOneOut:
    """The leave-one-out split of sequential recommendation.

    Attributes:
        train: every interaction but each user's last two (users with fewer than two keep all).
        valid: each user's second-to-last interaction.
        test: each user's last interaction.
        seq_train: the training events (train on these).
        valid_set: queries at the validation interaction (history = the training events
            before it), target = its item.
        test_set: queries at the test interaction (history = every earlier event, the
            validation one included), target = its item.
        valid_seen: the items of each validation query's full history (to exclude).
        test_seen: the same for the test queries.
    """

    train: ImpressionLog
    valid: ImpressionLog
    test: ImpressionLog
    seq_train: EventSequences
    valid_set: EvalSet
    test_set: EvalSet
    valid_seen: SeenItems
    test_seen: SeenItems


def leave_one_out(
    log: ImpressionLog,
    n_items: int,
    history_length: int,
    max_users: int | None = None,
    seed: int = 0,
) -> LeaveOneOut:
    """Split ``log`` by the leave-one-out protocol (last positive: test, the one before: valid).

    Built on :meth:`ImpressionLog.leave_last_out` and :func:`retrieval.data.eval_set`, so a
    simulator log with slates splits the same way (the slate of the last positive and
    everything after it are test).

    Args:
        log: interactions (e.g. :attr:`InteractionDataset.log`).
        n_items: catalog size.
        history_length: L of the query observations.
        max_users: evaluate at most this many users (a seeded subsample; None: all).
        seed: seed of the subsample.
    """
    if (
        isinstance(history_length, bool)
        or not isinstance(history_length, int)
        or history_length < 1
    ):
        raise ValueError(f"history_length must be an integer >= 1, got {history_length!r}")
    if max_users is not None and (not isinstance(max_users, int) or max_users < 1):
        raise ValueError(f"max_users must be None or an integer >= 1, got {max_users!r}")
    train, valid, test = log.leave_last_out(n_test=1, n_valid=1)
    seq_train = EventSequences.from_log(train, n_items)
    seq_trval = EventSequences.from_log(ImpressionLog.concat([train, valid]), n_items)
    seq_all = EventSequences.from_log(log, n_items)
    vs = eval_set(valid, seq_trval, history_length, 1, max_users, seed)
    ts = eval_set(test, seq_all, history_length, 1, max_users, seed)
    return LeaveOneOut(
        train, valid, test, seq_train, vs, ts, seen_items(seq_trval, vs), seen_items(seq_all, ts)
    )


@torch.no_grad()
def full_catalog_top_k(
    model: TwoTowerModel,
    ev: EvalSet,
    k: int,
    seen: SeenItems | None = None,
    release_time: np.ndarray | None = None,
    batch_size: int = 1024,
) -> np.ndarray:
    """Top-k items of every query over the whole catalog (no sampling).

    Args:
        model: a two-tower model.
        ev: the queries.
        k: list length.
        seen: items to exclude per query (e.g. :attr:`LeaveOneOut.test_seen`).
        release_time: ``(N,)`` item release times; items released after the query time are
            excluded (None: none excluded).
        batch_size: queries scored at once.

    Returns:
        int64 ``(B, k)`` item ids, best first.
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= model.n_items:
        raise ValueError(f"k must be an integer in [1, {model.n_items}], got {k!r}")
    if seen is not None and seen.offsets.size != len(ev) + 1:
        raise ValueError(f"seen covers {seen.offsets.size - 1} queries, ev has {len(ev)}")
    was = model.training
    model.eval()
    sim = model.similarity
    items = sim.prepare(model.all_item_vectors())  # (N, d), on the model's device
    dev = items.device
    rel = (
        None
        if release_time is None
        else torch.as_tensor(release_time, dtype=torch.float64, device=dev)
    )
    out = np.empty((len(ev), k), dtype=np.int64)
    for lo in range(0, len(ev), batch_size):
        hi = min(len(ev), lo + batch_size)
        rows = np.arange(lo, hi)
        obs = {key: v.to(dev) for key, v in to_torch_obs(take_obs(ev.obs, rows)).items()}
        u = sim.prepare(model.user_vectors(obs))  # (b, d)
        sc = u @ items.T  # (b, N); the temperature does not change the order
        if rel is not None:
            now = torch.from_numpy(ev.time[rows]).to(dev)
            sc.masked_fill_(rel[None, :] > now[:, None], float("-inf"))
        if seen is not None:
            r, c = seen.rows(lo, hi)
            sc[torch.from_numpy(r).to(dev), torch.from_numpy(c).to(dev)] = float("-inf")
        out[lo:hi] = torch.topk(sc, k, dim=1).indices.cpu().numpy()
    model.train(was)
    return out


def next_item_metrics(
    model: TwoTowerModel, ev: EvalSet, seen: SeenItems | None = None, k: int = 10
) -> dict[str, float]:
    """HR@k and NDCG@k of the held-out next item over the full catalog, averaged over users.

    With one target per query, HR@k = 1[rank < k] and NDCG@k = 1 / log2(rank + 2) when
    ``rank < k`` (rank 0-based), else 0.
    """
    top = full_catalog_top_k(model, ev, k, seen)
    return {
        f"hr@{k}": mean_over_users(hit_rate_at_k(top, ev.positives, k)),
        f"ndcg@{k}": mean_over_users(ndcg_at_k(top, ev.positives, k)),
    }
