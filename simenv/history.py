"""Observations rebuilt from an impression log: the user's history at any request.

An agent online sees :class:`simenv.types.Obs` observations; offline training must see the
same thing. :class:`EventSequences` holds every user's engagement events (click, like,
dislike) in time order and rebuilds the observation of any (user, time): the last L events
strictly before that time, with the days since each. :func:`impression_examples` gives the
observation of every request of a log with its shown items and click labels (the
impression-aware data of rankers and of the impression-aware retrieval loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simenv.log import ImpressionLog
from simenv.types import Columns, EventType, Obs

__all__ = [
    "ENGAGEMENT",
    "EventSequences",
    "ImpressionExamples",
    "impression_examples",
    "is_positive",
    "take_obs",
]

ENGAGEMENT = (EventType.CLICK, EventType.LIKE, EventType.DISLIKE)


def is_positive(feedback: np.ndarray) -> np.ndarray:
    """Click or like (a dislike is a click with a negative reaction: not a positive)."""
    return (feedback == EventType.CLICK) | (feedback == EventType.LIKE)


def take_obs(obs: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """Rows of a batched observation dict."""
    return {k: v[rows] for k, v in obs.items()}


@dataclass(frozen=True, eq=False)
class EventSequences:
    """Per-user chronological engagement events (click, like, dislike) as CSR arrays.

    Attributes:
        users: int64 (U,) sorted user ids that have events.
        offsets: int64 (U + 1,) event range of each user.
        items, events: int64 (E,) item id and EventType of each event.
        times: float64 (E,) request time of each event (days).
        n_items: catalog size.
        sessions: int64 (E,) the user's session index at the event's request (zeros when
            unknown).
        steps: int64 (E,) the request's position (slate index) within its session (zeros
            when unknown).
    """

    users: np.ndarray
    offsets: np.ndarray
    items: np.ndarray
    events: np.ndarray
    times: np.ndarray
    n_items: int
    sessions: np.ndarray | None = None
    steps: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name in ("sessions", "steps"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, np.zeros(self.items.shape, np.int64))

    @classmethod
    def from_log(cls, log: ImpressionLog, n_items: int) -> EventSequences:
        """Engagement rows of ``log``, ordered by (user, time, request)."""
        fb = log[Columns.FEEDBACK]
        keep = np.isin(fb, [int(e) for e in ENGAGEMENT])
        u, t, r = log[Columns.USER][keep], log[Columns.TIME][keep], log[Columns.REQUEST][keep]
        order = np.lexsort((r, t, u))
        u, t = u[order], t[order]
        items = log[Columns.ITEM][keep][order]
        if items.size and (items.min() < 0 or items.max() >= n_items):
            raise ValueError(f"log has item ids outside [0, {n_items - 1}]")
        users, starts = np.unique(u, return_index=True)
        offsets = np.r_[starts, u.size].astype(np.int64)
        sessions = log[Columns.SESSION][keep][order].astype(np.int64)
        steps = log["session_step"][keep][order].astype(np.int64)
        return cls(
            users,
            offsets,
            items,
            fb[keep][order].astype(np.int64),
            t,
            int(n_items),
            sessions,
            steps,
        )

    def __len__(self) -> int:
        return int(self.items.size)

    def user_index(self, users: np.ndarray) -> np.ndarray:
        """Row of each user in ``self.users``, or -1 for users without events."""
        users = np.asarray(users, dtype=np.int64)
        pos = np.searchsorted(self.users, users)
        pos_c = np.minimum(pos, max(self.users.size - 1, 0))
        found = (
            (self.users.size > 0) & (self.users[pos_c] == users)
            if self.users.size
            else np.zeros(users.shape, bool)
        )
        return np.where(found, pos_c, -1)

    def count_before(self, users: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(start, end) event range of each user's events strictly before ``times``."""
        ui = self.user_index(users)
        has = ui >= 0
        lo = np.where(has, self.offsets[np.maximum(ui, 0)], 0)
        start = lo.copy()
        hi = np.where(has, self.offsets[np.maximum(ui, 0) + 1], 0)
        t = np.asarray(times, dtype=np.float64)
        # vectorised binary search of the first event with time >= t inside [lo, hi)
        while True:
            active = lo < hi
            if not active.any():
                break
            mid = (lo + hi) // 2
            go_right = active & (self.times[np.minimum(mid, max(self.times.size - 1, 0))] < t)
            lo = np.where(go_right, mid + 1, lo)
            hi = np.where(active & ~go_right, mid, hi)
        return start, lo

    def history(
        self,
        users: np.ndarray,
        times: np.ndarray,
        length: int,
        sessions: np.ndarray | None = None,
        positions: np.ndarray | None = None,
        end: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """Observations (B, L) of ``users`` at ``times``: their last L events before then.

        ``end`` (exclusive event index) overrides the time search when already known.
        """
        users = np.asarray(users, dtype=np.int64)
        times = np.asarray(times, dtype=np.float64)
        start, stop = self.count_before(users, times)
        if end is not None:
            stop = end
        b = users.size
        idx = stop[:, None] - length + np.arange(length)[None, :]  # (B, L) oldest first
        valid = idx >= start[:, None]
        idx_c = np.where(valid, idx, 0)
        if self.items.size == 0:
            valid[:] = False
            idx_c[:] = 0
            items = np.zeros((b, length), np.int64)
            events = np.zeros((b, length), np.int64)
            ev_t = np.zeros((b, length))
        else:
            items = np.where(valid, self.items[idx_c], 0)
            events = np.where(valid, self.events[idx_c], 0)
            ev_t = self.times[idx_c]
        dt = np.where(valid, times[:, None] - ev_t, 0.0).astype(np.float32)
        ctx = np.stack(
            [
                times,
                np.zeros(b) if sessions is None else sessions,
                np.zeros(b) if positions is None else positions,
            ],
            axis=1,
        ).astype(np.float32)
        return {
            Obs.ITEMS: items.astype(np.int64),
            Obs.EVENTS: events.astype(np.int64),
            Obs.DT: dt,
            Obs.MASK: valid.astype(np.int8),
            Obs.CONTEXT: ctx,
            Obs.USER: users[:, None].copy(),  # (B, 1) as the envs emit it
        }

    def positives_matrix(self, users: np.ndarray, width: int = 64) -> np.ndarray:
        """(B, width) the last ``width`` positive items of each user (-1 padding), for masking."""
        pos = is_positive(self.events)
        ui = self.user_index(users)
        # positives per user in CSR form
        p_items = self.items[pos]
        p_user_row = np.repeat(np.arange(self.users.size), np.diff(self.offsets))[pos]
        p_off = np.r_[0, np.cumsum(np.bincount(p_user_row, minlength=self.users.size))]
        has = ui >= 0
        s = np.where(has, p_off[np.maximum(ui, 0)], 0)
        e = np.where(has, p_off[np.maximum(ui, 0) + 1], 0)
        idx = e[:, None] - width + np.arange(width)[None, :]
        valid = idx >= s[:, None]
        out = np.where(valid, p_items[np.where(valid, idx, 0)] if p_items.size else 0, -1)
        return out.astype(np.int64)


@dataclass(frozen=True, eq=False)
class ImpressionExamples:
    """Requests with their shown items and click labels (impression-aware training).

    Attributes:
        obs: observation dict (R, L) of each request.
        items: int64 (R, k) shown items.
        labels: float32 (R, k) 1 for a click (any reaction), 0 for shown and not clicked.
    """

    obs: dict[str, np.ndarray]
    items: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.items.shape[0])


def impression_examples(
    log: ImpressionLog, sequences: EventSequences, length: int
) -> ImpressionExamples:
    """One example per request of ``log`` (rows grouped by request, ordered by position)."""
    c = log.columns
    order = np.lexsort((c[Columns.POSITION], c[Columns.REQUEST]))
    req = c[Columns.REQUEST][order]
    first = np.r_[True, req[1:] != req[:-1]] if req.size else np.zeros(0, bool)
    n_req = int(first.sum())
    sizes = np.diff(np.r_[np.nonzero(first)[0], req.size])
    if sizes.size and np.any(sizes != sizes[0]):
        raise ValueError("impression_examples needs slates of one size")
    k = int(sizes[0]) if sizes.size else 0
    head = order[first]
    obs = sequences.history(
        c[Columns.USER][head],
        c[Columns.TIME][head],
        length,
        c[Columns.SESSION][head],
        c["session_step"][head],
    )
    items = c[Columns.ITEM][order].reshape(n_req, k)
    fb = c[Columns.FEEDBACK][order].reshape(n_req, k)
    labels = np.isin(fb, [int(e) for e in ENGAGEMENT]).astype(np.float32)
    return ImpressionExamples(obs, items.astype(np.int64), labels)
