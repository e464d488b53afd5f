"""``ImpressionLog``: what a recommender saw happen, one row per shown item.

Columnar numpy arrays; saved as ``.npz`` with a format version, written atomically (temp
file + rename); time-based and leave-last-out splits.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from simenv.atomic import atomic_write
from simenv.types import Columns, EventType

__all__ = ["ImpressionLog", "LogFormatError", "FORMAT_VERSION"]

FORMAT_VERSION = 1

# column name -> dtype; the order is the on-disk order
_COLUMNS: dict[str, np.dtype] = {
    Columns.USER: np.dtype(np.int64),
    Columns.TIME: np.dtype(np.float64),
    Columns.SESSION: np.dtype(np.int32),
    "session_step": np.dtype(np.int32),
    Columns.REQUEST: np.dtype(np.int64),
    Columns.POSITION: np.dtype(np.int16),
    Columns.ITEM: np.dtype(np.int64),
    Columns.FEEDBACK: np.dtype(np.int8),
    Columns.WATCH: np.dtype(np.float32),
    Columns.REWARD: np.dtype(np.float32),
    Columns.PROPENSITY: np.dtype(np.float32),
}


class LogFormatError(ValueError):
    """A saved log is missing, truncated, corrupt or of another format version."""


@dataclass(eq=False)
class ImpressionLog:
    """Impressions: one row per shown item, columns as numpy arrays of equal length.

    Columns (see :class:`simenv.types.Columns`): ``user`` int64, ``time`` float64 (days),
    ``session`` int32 (the user's session index), ``session_step`` int32 (slate index within
    the session), ``request`` int64 (one id per slate), ``position`` int16 (slate position),
    ``item`` int64, ``feedback`` int8 (:class:`EventType`: IMPRESSION, CLICK, LIKE, DISLIKE),
    ``watch`` float32 (minutes), ``reward`` float32 (the step reward, on the clicked row),
    ``propensity`` float32 (the behaviour policy's probability of this item at this position
    given the items above it, a Plackett-Luce factor; NaN if the policy did not say).

    Candidate sets, when the policy exposed them: ``candidates`` int64 (R, K) with -1 padding
    and ``candidate_request`` int64 (R,) naming the slate each row belongs to.

    ``meta`` is a JSON-able dict (world config, seeds, policy, ...).
    """

    columns: dict[str, np.ndarray]
    candidates: np.ndarray | None = None
    candidate_request: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.columns, dict):
            raise ValueError(f"columns must be a dict of arrays, got {type(self.columns).__name__}")
        if not isinstance(self.meta, dict):
            raise ValueError(f"meta must be a dict, got {type(self.meta).__name__}")
        missing = [c for c in _COLUMNS if c not in self.columns]
        if missing:
            raise ValueError(f"columns is missing {missing}; required: {list(_COLUMNS)}")
        extra = [c for c in self.columns if c not in _COLUMNS]
        if extra:
            raise ValueError(f"columns has unknown names {extra}; allowed: {list(_COLUMNS)}")
        n = None
        cols = {}
        for name, dtype in _COLUMNS.items():
            a = np.asarray(self.columns[name])
            if a.ndim != 1:
                raise ValueError(f"column {name!r} must be 1-D, got shape {a.shape}")
            if n is None:
                n = a.shape[0]
            elif a.shape[0] != n:
                raise ValueError(f"column {name!r} has {a.shape[0]} rows, expected {n}")
            cols[name] = _cast(name, a, dtype)
        self.columns = cols
        _check_values(cols, _id_bounds(self.meta))
        if (self.candidates is None) != (self.candidate_request is None):
            raise ValueError("candidates and candidate_request must be given together")
        if self.candidates is not None:
            self.candidates = _cast("candidates", np.asarray(self.candidates), np.dtype(np.int64))
            self.candidate_request = _cast(
                "candidate_request", np.asarray(self.candidate_request), np.dtype(np.int64)
            )
            if self.candidates.ndim != 2 or self.candidate_request.shape != (
                self.candidates.shape[0],
            ):
                raise ValueError(
                    "candidates must be (R, K) and candidate_request (R,), got "
                    f"{self.candidates.shape} and {self.candidate_request.shape}"
                )
            n_items = _id_bounds(self.meta).get(Columns.ITEM)
            _check_range("candidates", self.candidates.ravel(), -1, n_items, "-1 or item ids")
            _check_range("candidate_request", self.candidate_request, 0, None, "request ids")

    @classmethod
    def _trusted(
        cls,
        columns: dict[str, np.ndarray],
        candidates: np.ndarray | None,
        candidate_request: np.ndarray | None,
        meta: dict[str, Any],
    ) -> ImpressionLog:
        """A log from parts of already validated logs (rows selected or concatenated).

        Skips the O(rows) validation: selecting or concatenating valid rows of the right
        dtypes gives valid rows, and splits of a 100M-row log should not re-check them.
        """
        log = cls.__new__(cls)
        log.columns, log.candidates, log.candidate_request, log.meta = (
            columns,
            candidates,
            candidate_request,
            meta,
        )
        return log

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return int(self.columns[Columns.USER].shape[0])

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def __getattr__(self, name: str) -> np.ndarray:
        cols = self.__dict__.get("columns")
        if cols is not None and name in cols:
            return cols[name]
        raise AttributeError(name)

    @property
    def n_requests(self) -> int:
        """Number of slates."""
        return int(np.unique(self.columns[Columns.REQUEST]).size)

    @classmethod
    def empty(cls, meta: dict[str, Any] | None = None) -> ImpressionLog:
        """A log with no rows."""
        return cls({c: np.zeros(0, dtype=d) for c, d in _COLUMNS.items()}, meta=dict(meta or {}))

    def select(self, rows: np.ndarray) -> ImpressionLog:
        """A new log with the given rows (bool mask or indices); candidate sets follow."""
        rows = np.asarray(rows)
        if rows.dtype != np.bool_ and not np.issubdtype(rows.dtype, np.integer):
            raise ValueError(f"rows must be a bool mask or integer indices, got dtype {rows.dtype}")
        cols = {c: a[rows] for c, a in self.columns.items()}
        cand = creq = None
        if self.candidates is not None:
            keep = np.isin(self.candidate_request, np.unique(cols[Columns.REQUEST]))
            cand, creq = self.candidates[keep], self.candidate_request[keep]
        return ImpressionLog._trusted(cols, cand, creq, dict(self.meta))

    def positives(self, include_dislikes: bool = False) -> ImpressionLog:
        """Rows with a click or like (and dislikes if asked), in the log's order."""
        fb = self.columns[Columns.FEEDBACK]
        keep = (fb == EventType.CLICK) | (fb == EventType.LIKE)
        if include_dislikes:
            keep |= fb == EventType.DISLIKE
        return self.select(keep)

    def sorted(self) -> ImpressionLog:
        """Rows ordered by (time, request, position), stable."""
        c = self.columns
        order = np.lexsort((c[Columns.POSITION], c[Columns.REQUEST], c[Columns.TIME]))
        return self.select(order)

    @staticmethod
    def concat(logs: list[ImpressionLog], meta: dict[str, Any] | None = None) -> ImpressionLog:
        """Rows of several logs after one another (request ids must not collide)."""
        if not logs:
            return ImpressionLog.empty(meta)
        cols = {c: np.concatenate([lg.columns[c] for lg in logs]) for c in _COLUMNS}
        with_cand = [lg for lg in logs if lg.candidates is not None]
        cand = creq = None
        if with_cand:
            width = max(lg.candidates.shape[1] for lg in with_cand)
            cand = np.concatenate(
                [
                    np.pad(
                        lg.candidates,
                        ((0, 0), (0, width - lg.candidates.shape[1])),
                        constant_values=-1,
                    )
                    for lg in with_cand
                ]
            )
            creq = np.concatenate([lg.candidate_request for lg in with_cand])
        if meta is None:  # rows of valid logs under the first log's meta: still valid
            return ImpressionLog._trusted(cols, cand, creq, dict(logs[0].meta))
        return ImpressionLog(cols, cand, creq, dict(meta))

    # ------------------------------------------------------------------ splits
    def split_by_time(
        self, train_end: float, valid_end: float
    ) -> tuple[ImpressionLog, ImpressionLog, ImpressionLog]:
        """Train ``time < train_end``, validation ``[train_end, valid_end)``, test ``>= valid_end``."""
        if not np.isfinite(train_end) or not np.isfinite(valid_end) or train_end > valid_end:
            raise ValueError(
                f"need finite train_end <= valid_end, got train_end={train_end}, valid_end={valid_end}"
            )
        t = self.columns[Columns.TIME]
        return (
            self.select(t < train_end),
            self.select((t >= train_end) & (t < valid_end)),
            self.select(t >= valid_end),
        )

    def time_quantiles(self, *qs: float) -> list[float]:
        """Times at the given quantiles of the rows (e.g. ``0.8, 0.9`` for a split)."""
        for q in qs:
            if not 0.0 <= q <= 1.0:
                raise ValueError(f"quantiles must be in [0, 1], got {q}")
        if len(self) == 0:
            raise ValueError("time_quantiles of an empty log")
        return [float(x) for x in np.quantile(self.columns[Columns.TIME], qs)]

    def leave_last_out(
        self, n_test: int = 1, n_valid: int = 1
    ) -> tuple[ImpressionLog, ImpressionLog, ImpressionLog]:
        """Per user: the slates from the n_test-th last positive on go to test, the n_valid before to validation.

        Rows are ordered per user by (time, request, position). A user's rows from the slate of
        their ``n_test``-th last positive (click or like) on are test; from the slate of their
        ``(n_test + n_valid)``-th last positive up to the test cut, validation; the rest, train.
        Users with fewer than ``n_test + n_valid`` positives keep all rows in train.
        """
        if n_test < 1 or n_valid < 0:
            raise ValueError(
                f"need n_test >= 1 and n_valid >= 0, got n_test={n_test}, n_valid={n_valid}"
            )
        n = len(self)
        c = self.columns
        order = np.lexsort(
            (c[Columns.POSITION], c[Columns.REQUEST], c[Columns.TIME], c[Columns.USER])
        )
        users, req = c[Columns.USER][order], c[Columns.REQUEST][order]
        fb = c[Columns.FEEDBACK][order]
        idx = np.arange(n)
        new_user = np.r_[True, users[1:] != users[:-1]] if n else np.zeros(0, bool)
        uid = np.cumsum(new_user) - 1  # compact user index per row (users are contiguous)
        new_req = new_user | np.r_[True, req[1:] != req[:-1]] if n else np.zeros(0, bool)
        req_start = np.maximum.accumulate(np.where(new_req, idx, 0))  # first row of the row's slate
        pos_rows = np.nonzero((fb == EventType.CLICK) | (fb == EventType.LIKE))[0]
        n_users = int(uid[-1]) + 1 if n else 0
        n_pos = np.bincount(uid[pos_rows], minlength=n_users)
        # rank of each positive counted from its user's last positive (0 = last)
        from_end = np.cumsum(n_pos)[uid[pos_rows]] - 1 - np.arange(pos_rows.size)
        never = np.iinfo(np.int64).max

        def cut(rank: int) -> np.ndarray:
            at = np.full(n_users, never, dtype=np.int64)
            sel = pos_rows[from_end == rank]
            at[uid[sel]] = req_start[sel]
            at[n_pos < n_test + n_valid] = never
            return at

        part = np.zeros(n, dtype=np.int8)  # 0 train, 1 valid, 2 test (sorted order)
        if n_valid:
            part[idx >= cut(n_test + n_valid - 1)[uid]] = 1
        part[idx >= cut(n_test - 1)[uid]] = 2
        split = np.empty_like(part)
        split[order] = part
        return self.select(split == 0), self.select(split == 1), self.select(split == 2)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``.npz`` atomically (temp file in the same folder, then rename)."""
        path = Path(path)
        if path.suffix != ".npz":
            path = (
                path.with_suffix(path.suffix + ".npz") if path.suffix else path.with_suffix(".npz")
            )
        arrays: dict[str, np.ndarray] = {f"col__{c}": a for c, a in self.columns.items()}
        if self.candidates is not None:
            arrays["candidates"] = self.candidates
            arrays["candidate_request"] = self.candidate_request
        header = {
            "format": "simenv.ImpressionLog",
            "version": FORMAT_VERSION,
            "n_rows": len(self),
            "meta": self.meta,
        }
        arrays["header"] = np.frombuffer(
            json.dumps(header, default=json_default).encode(), dtype=np.uint8
        )
        return atomic_write(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ImpressionLog:
        """Read a log written by :meth:`save`; raise :class:`LogFormatError` if it is not valid."""
        path = Path(path)
        if not path.exists():
            raise LogFormatError(f"no impression log at {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                files = set(z.files)
                if "header" not in files:
                    raise LogFormatError(f"{path} is not a simenv impression log (no header)")
                header = json.loads(bytes(z["header"]).decode())
                fmt = header.get("format") if isinstance(header, dict) else type(header).__name__
                if fmt != "simenv.ImpressionLog":
                    raise LogFormatError(f"{path} is not a simenv impression log (format {fmt!r})")
                if header.get("version") != FORMAT_VERSION:
                    raise LogFormatError(
                        f"{path} has log format version {header.get('version')}, this simenv reads version {FORMAT_VERSION}"
                    )
                missing = [c for c in _COLUMNS if f"col__{c}" not in files]
                if missing:
                    raise LogFormatError(f"{path} is missing columns {missing}")
                n_rows = header.get("n_rows")
                if isinstance(n_rows, bool) or not isinstance(n_rows, int) or n_rows < 0:
                    raise LogFormatError(
                        f"{path}: the header's n_rows is not a row count: {n_rows!r}"
                    )
                # shapes from the .npy headers before any data is read: a damaged or crafted
                # shape must not make numpy allocate (or read) what the file cannot hold
                shapes = {c: _member_shape(z, f"col__{c}") for c in _COLUMNS}
                bad = [c for c, shape in shapes.items() if shape != (n_rows,)]
                if bad:
                    raise LogFormatError(
                        f"{path}: columns {bad} do not have the {n_rows} rows the header promises"
                    )
                has_cand = "candidates" in files
                if has_cand != ("candidate_request" in files):
                    raise LogFormatError(f"{path}: candidates without candidate_request or back")
                if has_cand:
                    c_shape = _member_shape(z, "candidates")
                    r_shape = _member_shape(z, "candidate_request")
                    if len(c_shape) != 2 or r_shape != c_shape[:1]:
                        raise LogFormatError(
                            f"{path}: candidates {c_shape} and candidate_request {r_shape} "
                            "do not fit (R, K) and (R,)"
                        )
                cols = {c: z[f"col__{c}"] for c in _COLUMNS}
                cand = z["candidates"] if has_cand else None
                creq = z["candidate_request"] if has_cand else None
        except LogFormatError:
            raise
        except (
            zipfile.BadZipFile,
            EOFError,
            OSError,
            ValueError,
            KeyError,
            json.JSONDecodeError,
            RuntimeError,  # zipfile on damaged flags: "encrypted", NotImplementedError, ...
            MemoryError,  # a shape that passed the checks above but cannot be allocated
        ) as e:
            raise LogFormatError(f"{path} is truncated or corrupt: {type(e).__name__}: {e}") from e
        try:
            return cls(cols, cand, creq, header.get("meta", {}))
        except ValueError as e:
            raise LogFormatError(f"{path}: {e}") from e

    def equals(self, other: ImpressionLog) -> bool:
        """Same columns, candidates and meta (exact)."""
        if len(self) != len(other) or self.meta != other.meta:
            return False
        if not all(
            np.array_equal(self.columns[c], other.columns[c], equal_nan=c == Columns.PROPENSITY)
            for c in _COLUMNS
        ):
            return False
        if (self.candidates is None) != (other.candidates is None):
            return False
        return self.candidates is None or (
            np.array_equal(self.candidates, other.candidates)
            and np.array_equal(self.candidate_request, other.candidate_request)
        )

    def summary(self) -> dict[str, float]:
        """Counts and rates, for reports."""
        fb = self.columns[Columns.FEEDBACK]
        n = max(len(self), 1)
        return {
            "rows": len(self),
            "requests": self.n_requests,
            "users": int(np.unique(self.columns[Columns.USER]).size),
            "items": int(np.unique(self.columns[Columns.ITEM]).size),
            "click_rate": float(
                ((fb == EventType.CLICK) | (fb == EventType.LIKE) | (fb == EventType.DISLIKE)).sum()
                / n
            ),
            "like_rate": float((fb == EventType.LIKE).sum() / n),
            "dislike_rate": float((fb == EventType.DISLIKE).sum() / n),
        }


def json_default(o: Any) -> Any:
    """``json.dumps(default=...)`` for metadata: numpy scalars and arrays, objects with ``to_dict``."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    raise TypeError(f"meta value of type {type(o).__name__} is not JSON-serialisable")


# --------------------------------------------------------------------------- validation


def _member_shape(z: Any, name: str) -> tuple[int, ...]:
    """Shape of array ``name`` of an open ``.npz`` from its ``.npy`` header, data unread.

    Raises:
        ValueError: if the header is damaged, or promises more bytes than the member holds.
    """
    info = z.zip.getinfo(f"{name}.npy")
    with z.zip.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        header_bytes = f.tell()
    n_bytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if n_bytes > info.file_size - header_bytes:
        raise ValueError(
            f"array {name!r} of shape {shape} needs {n_bytes} bytes, its member holds "
            f"{info.file_size - header_bytes}"
        )
    return tuple(int(x) for x in shape)


#: feedback codes a log may hold (EventType values)
_FEEDBACK = (EventType.IMPRESSION, EventType.CLICK, EventType.LIKE, EventType.DISLIKE)


def _first(bad: np.ndarray) -> int:
    return int(np.argmax(bad))


def _cast(name: str, a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``a`` as ``dtype``, refusing any conversion that would change a value.

    Integer columns take integers that fit the dtype, or floats that are whole numbers in
    range (an empty float column, as ``np.zeros(0)`` gives, is fine); float columns take any
    real numbers (float64 -> float32 rounds, as it must). Strings, objects, complex: refused.
    """
    kind = a.dtype.kind
    if dtype.kind == "i":
        info = np.iinfo(dtype)
        if kind in "iu":
            if a.size and (a.min() < info.min or a.max() > info.max):
                bad = (a < info.min) | (a > info.max)
                i = _first(bad)
                raise ValueError(
                    f"column {name!r} must fit {dtype} [{info.min}, {info.max}], got {a[i]} at row {i}"
                )
            return a.astype(dtype, copy=False)
        if kind == "f":
            if a.size:
                with np.errstate(invalid="ignore"):
                    # bounds as exact powers of two: float(info.max) would round up past it
                    bad = (
                        ~np.isfinite(a)
                        | (a != np.floor(a))
                        | (a < info.min)
                        | (a >= -float(info.min))
                    )
                if bad.any():
                    i = _first(bad)
                    raise ValueError(
                        f"column {name!r} must hold whole numbers in {dtype} range "
                        f"[{info.min}, {info.max}], got {a[i]!r} at row {i} (dtype {a.dtype})"
                    )
            return a.astype(dtype)
        if kind == "b":
            return a.astype(dtype)
        raise ValueError(f"column {name!r} must hold integers ({dtype}), got dtype {a.dtype}")
    if kind in "fiub":
        return a.astype(dtype, copy=False)
    raise ValueError(f"column {name!r} must hold real numbers ({dtype}), got dtype {a.dtype}")


def _id_bounds(meta: dict[str, Any]) -> dict[str, int]:
    """Exclusive upper bounds of id columns that ``meta`` names, if it names them.

    ``collect`` records the world's config as ``meta["world"]`` (``n_users``, ``n_items``) and
    the slate size as ``meta["slate_size"]`` (positions).
    """

    def count(v: Any) -> int | None:
        ok = isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1
        return int(v) if ok else None

    world = meta.get("world")
    world = world if isinstance(world, dict) else {}
    found = {
        Columns.USER: count(world.get("n_users")),
        Columns.ITEM: count(world.get("n_items")),
        Columns.POSITION: count(meta.get("slate_size")),
    }
    return {c: v for c, v in found.items() if v is not None}


def _check_range(name: str, a: np.ndarray, low: int, high: int | None, what: str) -> None:
    """Every value of integer column ``a`` in ``[low, high)`` (no upper bound if None)."""
    if not a.size:
        return
    lo, hi = a.min(), a.max()
    if lo >= low and (high is None or hi < high):
        return
    bad = (a < low) if high is None else (a < low) | (a >= high)
    i = _first(bad)
    bound = f"[{low}, {high})" if high is not None else f">= {low}"
    raise ValueError(f"column {name!r} must hold {what} {bound}, got {a[i]} at row {i}")


def _check_values(cols: dict[str, np.ndarray], bounds: dict[str, int]) -> None:
    """Vectorised O(rows) checks of every column's meaning (see ImpressionLog)."""
    _check_range(Columns.USER, cols[Columns.USER], 0, bounds.get(Columns.USER), "user ids")
    _check_range(Columns.ITEM, cols[Columns.ITEM], 0, bounds.get(Columns.ITEM), "item ids")
    _check_range(Columns.REQUEST, cols[Columns.REQUEST], 0, None, "request ids")
    _check_range(Columns.SESSION, cols[Columns.SESSION], 0, None, "session indices")
    _check_range("session_step", cols["session_step"], 0, None, "slate indices")
    _check_range(
        Columns.POSITION, cols[Columns.POSITION], 0, bounds.get(Columns.POSITION), "slate positions"
    )
    fb = cols[Columns.FEEDBACK]
    if fb.size and (fb.min() < min(_FEEDBACK) or fb.max() > max(_FEEDBACK)):
        i = _first((fb < min(_FEEDBACK)) | (fb > max(_FEEDBACK)))
        raise ValueError(
            f"column {Columns.FEEDBACK!r} must hold EventType codes "
            f"{[int(c) for c in _FEEDBACK]} (impression, click, like, dislike), got {fb[i]} at row {i}"
        )
    for name, low, what in (
        (Columns.TIME, 0.0, "finite times >= 0 (days)"),
        (Columns.WATCH, 0.0, "finite watch minutes >= 0"),
        (Columns.REWARD, -np.inf, "finite rewards"),
    ):
        a = cols[name]
        bad = ~np.isfinite(a) | (a < low)
        if bad.any():
            i = _first(bad)
            raise ValueError(f"column {name!r} must hold {what}, got {a[i]} at row {i}")
    p = cols[Columns.PROPENSITY]
    with np.errstate(invalid="ignore"):
        bad = ~(np.isnan(p) | ((p > 0) & (p <= 1)))
    if bad.any():
        i = _first(bad)
        raise ValueError(
            f"column {Columns.PROPENSITY!r} must hold probabilities in (0, 1] or NaN "
            f"(not recorded), got {p[i]} at row {i}"
        )
