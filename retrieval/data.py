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

from simenv.arrays import unique_rows
from simenv.history import (
    EventSequences,
    ImpressionExamples,
    impression_examples,
    is_positive,
    take_obs,
)
from simenv.log import ImpressionLog
from simenv.types import Columns, Obs

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
class CausalWindows:
    """Windows of L consecutive events per user with the next positive at each position.

    Every position gets its own request context: position i predicts the event after it,
    and the model must see there what serving shows at that event's request.

    Attributes:
        obs: observation dict (W, L). ``context`` is per position, float32 ``(W, L, 3)``:
            the (time, session, position in session) of the request of the event that
            position predicts (zeros on padding). ``dt`` is each event's age at the time of
            the window's last target; the sequence towers read only the intervals between
            consecutive events and from the most recent event to the request
            (:func:`retrieval.towers.user.event_gaps`), in which this reference cancels
            except for the last event, where it is that position's own request time: each
            position sees exactly the intervals that serving would show at its request.
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
    tgt_c = np.where(valid, idx_c + 1, 0)  # (W, L) the event each position predicts
    context = np.stack(
        [e.times[tgt_c], e.sessions[tgt_c], e.steps[tgt_c]], axis=-1
    )  # (W, L, 3) the request of that event: its own time, session and position
    obs = {
        Obs.ITEMS: np.where(valid, e.items[idx_c], 0).astype(np.int64),
        Obs.EVENTS: np.where(valid, e.events[idx_c], 0).astype(np.int64),
        Obs.DT: np.where(valid, t_ref[:, None] - e.times[idx_c], 0.0).astype(np.float32),
        Obs.MASK: valid.astype(np.int8),
        Obs.CONTEXT: np.where(valid[..., None], context, 0.0).astype(np.float32),
        Obs.USER: e.users[w_user_row, None].astype(np.int64),  # (n, 1) as the envs emit it
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
    positives = unique_rows(positives)
    return EvalSet(
        obs,
        positives,
        positives[:, 0].copy() if n else np.zeros(0, np.int64),
        users.astype(np.int64),
        c[Columns.TIME][head].astype(np.float64),
    )
