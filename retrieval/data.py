"""Training and evaluation data for the candidate generator, built from an impression log.

Everything a tower sees is an *observation* in the env's format (``simenv.types.Obs``): the
user's engagement events before the request (items, event types, days since, mask) and the
request context (time, session, position in session). Building the same observation from a
log as the env gives online keeps training and serving consistent.

- :class:`EventSequences`: per-user chronological engagement events (CSR arrays).
- :func:`next_item_examples`: one example per positive event: the observation at its request
  and the positive item (pooled towers; works for every tower).
- :func:`causal_windows`: windows of L events with the next positive at every position (the
  transformer's all-positions-at-once training).
- :func:`impression_examples`: the observation of each request with its shown items and click
  labels (the impression-aware loss).
- :func:`eval_set`: held-out users of a later period: the observation at their first
  held-out request and their held-out positives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simenv.log import ImpressionLog
from simenv.types import Columns, EventType, Obs

__all__ = [
    "EventSequences",
    "NextItemExamples",
    "ImpressionExamples",
    "CausalWindows",
    "EvalSet",
    "next_item_examples",
    "impression_examples",
    "causal_windows",
    "eval_set",
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
    """

    users: np.ndarray
    offsets: np.ndarray
    items: np.ndarray
    events: np.ndarray
    times: np.ndarray
    n_items: int

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
        return cls(users, offsets, items, fb[keep][order].astype(np.int64), t, int(n_items))

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
            Obs.USER: users.copy(),
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
class NextItemExamples:
    """One example per positive: the observation at its request, and the positive item.

    Attributes:
        obs: batched observation dict (M, L).
        target: int64 (M,) the positive item.
        user: int64 (M,) user ids (for accidental-hit masks).
    """

    obs: dict[str, np.ndarray]
    target: np.ndarray
    user: np.ndarray

    def __len__(self) -> int:
        return int(self.target.size)

    def batch(self, rows: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Observation and targets of some rows."""
        return take_obs(self.obs, rows), self.target[rows]


def next_item_examples(
    log: ImpressionLog, sequences: EventSequences, length: int
) -> NextItemExamples:
    """Examples "history before the request -> positive item" for every positive in ``log``.

    ``sequences`` should hold the events of every period up to ``log``'s end (so histories
    include earlier periods).
    """
    fb = log[Columns.FEEDBACK]
    rows = np.nonzero(is_positive(fb))[0]
    u = log[Columns.USER][rows]
    obs = sequences.history(
        u, log[Columns.TIME][rows], length, log[Columns.SESSION][rows], log["session_step"][rows]
    )
    return NextItemExamples(obs, log[Columns.ITEM][rows].astype(np.int64), u.astype(np.int64))


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


@dataclass(frozen=True, eq=False)
class CausalWindows:
    """Windows of L consecutive events per user with the next positive at each position.

    Attributes:
        obs: observation dict (W, L); ``dt`` is measured from the window's last target time
            (the same for every position: per-position time features are approximate in this
            mode; a tower with ``use_context=False`` has no mismatch).
        targets: int64 (W, L) the item of the next event when it is a positive, else -1.
        user: int64 (W,).
    """

    obs: dict[str, np.ndarray]
    targets: np.ndarray
    user: np.ndarray

    def __len__(self) -> int:
        return int(self.targets.shape[0])


def causal_windows(
    sequences: EventSequences, length: int, event_mask: np.ndarray | None = None
) -> CausalWindows:
    """Cut each user's events into windows of ``length`` inputs (right-aligned, left padding).

    Position i of a window holds event j and is trained to predict event j+1 (if positive).
    ``event_mask`` (E,) marks events that may be *targets* (e.g. only training-period events);
    any event may be an input.
    """
    e = sequences
    n_ev = np.diff(e.offsets)
    pos = is_positive(e.events)
    tmask = pos if event_mask is None else pos & event_mask
    # number of inputs per user = events - 1 (the last event has no next)
    n_in = np.maximum(n_ev - 1, 0)
    n_win = -(-n_in // length)
    w_user_row = np.repeat(np.arange(e.users.size), n_win)
    # window w of a user covers inputs [end - length, end) with end = n_in - w*length (from the end)
    w_rank = np.arange(w_user_row.size) - np.repeat(np.cumsum(n_win) - n_win, n_win)
    w_end = e.offsets[w_user_row] + n_in[w_user_row] - w_rank * length  # exclusive input end
    idx = w_end[:, None] - length + np.arange(length)[None, :]
    valid = idx >= e.offsets[w_user_row][:, None]
    idx_c = np.where(valid, idx, 0)
    tgt_idx = idx_c + 1
    targets = np.where(valid & tmask[tgt_idx], e.items[tgt_idx], -1)
    keep = (targets >= 0).any(axis=1)
    idx_c, valid, targets, w_user_row, w_end = (
        idx_c[keep],
        valid[keep],
        targets[keep],
        w_user_row[keep],
        w_end[keep],
    )
    t_ref = e.times[w_end]  # time of the last target of the window
    obs = {
        Obs.ITEMS: np.where(valid, e.items[idx_c], 0).astype(np.int64),
        Obs.EVENTS: np.where(valid, e.events[idx_c], 0).astype(np.int64),
        Obs.DT: np.where(valid, t_ref[:, None] - e.times[idx_c], 0.0).astype(np.float32),
        Obs.MASK: valid.astype(np.int8),
        Obs.CONTEXT: np.stack([t_ref, np.zeros_like(t_ref), np.zeros_like(t_ref)], axis=1).astype(
            np.float32
        ),
        Obs.USER: e.users[w_user_row].astype(np.int64),
    }
    return CausalWindows(obs, targets.astype(np.int64), e.users[w_user_row].astype(np.int64))


@dataclass(frozen=True, eq=False)
class EvalSet:
    """Held-out evaluation queries.

    Attributes:
        obs: observation (B, L) at each user's first held-out request.
        positives: int64 (B, P) the user's held-out positives (-1 padding), in time order.
        next_item: int64 (B,) the first held-out positive.
        user: int64 (B,).
        time: float64 (B,) query time.
    """

    obs: dict[str, np.ndarray]
    positives: np.ndarray
    next_item: np.ndarray
    user: np.ndarray
    time: np.ndarray

    def __len__(self) -> int:
        return int(self.user.size)

    def subset(self, rows: np.ndarray) -> EvalSet:
        """Some of the queries."""
        return EvalSet(
            take_obs(self.obs, rows),
            self.positives[rows],
            self.next_item[rows],
            self.user[rows],
            self.time[rows],
        )


def eval_set(
    held_out: ImpressionLog,
    sequences: EventSequences,
    length: int,
    max_positives: int = 50,
    max_users: int | None = None,
    seed: int = 0,
) -> EvalSet:
    """Queries for users with a positive in ``held_out`` (a later period of the log).

    The query is the user's first held-out request *that has a positive*, with the history of
    every event before it (``sequences`` covers all periods); the targets are all of the user's
    held-out positives from that request on. Users are subsampled to ``max_users`` with ``seed``.
    """
    c = held_out.columns
    pos_rows = np.nonzero(is_positive(c[Columns.FEEDBACK]))[0]
    order = pos_rows[
        np.lexsort(
            (c[Columns.REQUEST][pos_rows], c[Columns.TIME][pos_rows], c[Columns.USER][pos_rows])
        )
    ]
    u = c[Columns.USER][order]
    first = np.r_[True, u[1:] != u[:-1]] if u.size else np.zeros(0, bool)
    users = u[first]
    starts = np.nonzero(first)[0]
    if max_users is not None and users.size > max_users:
        pick = np.sort(
            np.random.default_rng(seed).choice(users.size, size=max_users, replace=False)
        )
        users, starts = users[pick], starts[pick]
    ends = np.r_[np.nonzero(first)[0][1:], u.size]
    ends = ends[np.searchsorted(np.nonzero(first)[0], starts)]
    head = order[starts]
    obs = sequences.history(
        users, c[Columns.TIME][head], length, c[Columns.SESSION][head], c["session_step"][head]
    )
    n = users.size
    idx = starts[:, None] + np.arange(max_positives)[None, :]
    valid = idx < ends[:, None]
    items = c[Columns.ITEM][order]
    positives = np.where(valid, items[np.where(valid, idx, 0)] if items.size else 0, -1).astype(
        np.int64
    )
    positives = _dedupe_rows(positives)
    return EvalSet(
        obs,
        positives,
        positives[:, 0].copy() if n else np.zeros(0, np.int64),
        users.astype(np.int64),
        c[Columns.TIME][head].astype(np.float64),
    )


def _dedupe_rows(a: np.ndarray) -> np.ndarray:
    """Keep the first occurrence of each id per row, in order; -1 padding at the end."""
    order = np.argsort(a, axis=1, kind="stable")
    s = np.take_along_axis(a, order, axis=1)
    first_sorted = np.ones_like(s, dtype=bool)
    first_sorted[:, 1:] = s[:, 1:] != s[:, :-1]
    keep = np.empty_like(first_sorted)
    np.put_along_axis(keep, order, first_sorted, axis=1)
    keep &= a >= 0
    front = np.argsort(~keep, axis=1, kind="stable")  # kept ids first, original order
    out = np.take_along_axis(np.where(keep, a, -1), front, axis=1)
    return out
