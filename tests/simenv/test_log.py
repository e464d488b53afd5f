"""ImpressionLog (persistence, atomic writes, damaged files, splits) and collect()."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simenv import (
    BatchedRecEnv,
    Columns,
    EnvConfig,
    EventType,
    ImpressionLog,
    InGroupPolicy,
    LogFormatError,
    UniformPolicy,
    collect,
)
from simenv.log import FORMAT_VERSION
from simenv.types import obs_users

C, L_, D, I_ = EventType.CLICK, EventType.LIKE, EventType.DISLIKE, EventType.IMPRESSION


def _hand_log(rows, meta=None, candidates=None, candidate_request=None) -> ImpressionLog:
    """rows: (user, time, request, position, item, feedback); other columns derived."""
    a = np.array(rows, dtype=np.float64)
    n = len(rows)
    fb = a[:, 5].astype(np.int8)
    cols = {
        Columns.USER: a[:, 0].astype(np.int64),
        Columns.TIME: a[:, 1],
        Columns.SESSION: np.zeros(n, np.int32),
        "session_step": (a[:, 2] % 10).astype(np.int32),
        Columns.REQUEST: a[:, 2].astype(np.int64),
        Columns.POSITION: a[:, 3].astype(np.int16),
        Columns.ITEM: a[:, 4].astype(np.int64),
        Columns.FEEDBACK: fb,
        Columns.WATCH: np.where(fb > 0, 2.5, 0.0).astype(np.float32),
        Columns.REWARD: (fb == C) + 2.0 * (fb == L_) - (fb == D),
        Columns.PROPENSITY: np.linspace(0.1, 0.9, n).astype(np.float32),
    }
    return ImpressionLog(cols, candidates, candidate_request, dict(meta or {}))


# user 1: positives in requests 10, 12, 14 (a dislike in 13 is not a positive);
# user 2: one positive; user 3: positives in 30 and 32. Rows shuffled on purpose.
HAND = [
    (1, 1.0, 10, 0, 100, C), (1, 1.0, 10, 1, 101, I_),
    (1, 2.0, 11, 0, 102, I_), (1, 2.0, 11, 1, 103, I_),
    (1, 3.0, 12, 0, 104, I_), (1, 3.0, 12, 1, 105, L_),
    (1, 4.0, 13, 0, 106, D), (1, 4.0, 13, 1, 107, I_),
    (1, 5.0, 14, 0, 108, C), (1, 5.0, 14, 1, 109, I_),
    (2, 1.5, 20, 0, 200, I_), (2, 1.5, 20, 1, 201, C),
    (2, 2.5, 21, 0, 202, I_), (2, 2.5, 21, 1, 203, I_),
    (3, 0.5, 30, 0, 300, L_), (3, 0.5, 30, 1, 301, I_),
    (3, 0.7, 31, 0, 302, I_), (3, 0.7, 31, 1, 303, I_),
    (3, 0.9, 32, 0, 304, I_), (3, 0.9, 32, 1, 305, C),
]  # fmt: skip


@pytest.fixture
def hand_log() -> ImpressionLog:
    rows = [HAND[i] for i in np.random.default_rng(0).permutation(len(HAND))]
    cand = np.array([[100, 101, 7], [104, 105, -1], [300, 301, 9]])
    return _hand_log(rows, {"policy": "hand", "n": 3}, cand, np.array([10, 12, 30]))


def _requests(log):
    return set(np.unique(log.request).tolist())


# ---------------------------------------------------------------- persistence
def test_save_load_round_trip(tmp_path, hand_log):
    meta = {"policy": "hand", "seeds": [1, 2], "nested": {"a": 1.5, "b": None}, "np": np.int64(4)}
    log = ImpressionLog(hand_log.columns, hand_log.candidates, hand_log.candidate_request, meta)
    path = log.save(tmp_path / "log.npz")
    back = ImpressionLog.load(path)
    assert back.equals(log)
    assert back.meta == {
        "policy": "hand",
        "seeds": [1, 2],
        "nested": {"a": 1.5, "b": None},
        "np": 4,
    }
    for c in log.columns:
        assert back[c].dtype == log[c].dtype
    np.testing.assert_array_equal(back.candidates, log.candidates)
    np.testing.assert_array_equal(back.candidate_request, [10, 12, 30])
    # NaN propensities survive; an empty log too; no candidates stays None
    nan = ImpressionLog({**log.columns, Columns.PROPENSITY: np.full(len(log), np.nan)})
    assert ImpressionLog.load(nan.save(tmp_path / "nan.npz")).equals(nan)
    empty = ImpressionLog.empty({"x": 1})
    back = ImpressionLog.load(empty.save(tmp_path / "empty.npz"))
    assert back.equals(empty) and len(back) == 0 and back.candidates is None
    # suffix handling
    assert log.save(tmp_path / "plain") == tmp_path / "plain.npz"
    assert log.save(tmp_path / "x.v1") == tmp_path / "x.v1.npz"
    assert log.save(tmp_path / "sub" / "dir" / "l.npz").exists()


def test_equals_detects_differences(hand_log):
    other = hand_log.select(np.arange(len(hand_log)))
    assert other.equals(hand_log)
    changed = dict(hand_log.columns)
    changed[Columns.ITEM] = changed[Columns.ITEM].copy()
    changed[Columns.ITEM][3] += 1
    assert not ImpressionLog(
        changed, hand_log.candidates, hand_log.candidate_request, hand_log.meta
    ).equals(hand_log)
    assert not ImpressionLog(hand_log.columns, meta=hand_log.meta).equals(hand_log)
    assert not ImpressionLog(
        hand_log.columns, hand_log.candidates, hand_log.candidate_request, {}
    ).equals(hand_log)


def test_save_leaves_no_temp_files(tmp_path, hand_log):
    for _ in range(3):
        hand_log.save(tmp_path / "log.npz")
    assert sorted(os.listdir(tmp_path)) == ["log.npz"]


@pytest.mark.parametrize("where", ["savez", "replace", "interrupt"])
def test_failed_write_keeps_the_old_file(tmp_path, hand_log, monkeypatch, where):
    path = hand_log.save(tmp_path / "log.npz")
    old_bytes = path.read_bytes()
    new = hand_log.select(np.arange(4))
    if where == "savez":

        def broken_savez(f, **arrays):
            f.write(b"PK\x03\x04 half a zip")
            raise OSError("No space left on device")

        monkeypatch.setattr(np, "savez", broken_savez)
        exc = OSError
    elif where == "replace":

        def broken_replace(src, dst):
            raise OSError("rename failed")

        monkeypatch.setattr(os, "replace", broken_replace)
        exc = OSError
    else:

        def interrupted_savez(f, **arrays):
            f.write(b"PK")
            raise KeyboardInterrupt

        monkeypatch.setattr(np, "savez", interrupted_savez)
        exc = KeyboardInterrupt
    with pytest.raises(exc):
        new.save(path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["log.npz"]
    assert path.read_bytes() == old_bytes
    assert ImpressionLog.load(path).equals(hand_log)


def _write_npz(path: Path, header: dict | list | None, columns: dict) -> Path:
    arrays = {f"col__{c}": a for c, a in columns.items()}
    if header is not None:
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def test_damaged_files_raise_log_format_error(tmp_path, hand_log):
    good = hand_log.save(tmp_path / "good.npz")
    raw = good.read_bytes()
    n = len(hand_log)
    header = {"format": "simenv.ImpressionLog", "version": FORMAT_VERSION, "n_rows": n, "meta": {}}
    cols = hand_log.columns
    cases = {
        "missing": (tmp_path / "nope.npz", "no impression log"),
        "empty": (tmp_path / "empty.npz", "truncated or corrupt"),
        "half": (tmp_path / "half.npz", "truncated or corrupt"),
        "tail": (tmp_path / "tail.npz", "truncated or corrupt"),
        "garbage": (tmp_path / "garbage.npz", "truncated or corrupt"),
        "no_header": (_write_npz(tmp_path / "nh.npz", None, cols), "no header"),
        "format": (
            _write_npz(tmp_path / "fmt.npz", {**header, "format": "other"}, cols),
            "not a simenv impression log",
        ),
        "not_a_dict": (
            _write_npz(tmp_path / "list.npz", [1, 2], cols),
            "not a simenv impression log",
        ),
        "version": (
            _write_npz(tmp_path / "v.npz", {**header, "version": 99}, cols),
            f"version 99, this simenv reads version {FORMAT_VERSION}",
        ),
        "column": (
            _write_npz(
                tmp_path / "col.npz", header, {k: v for k, v in cols.items() if k != "item"}
            ),
            "missing columns \\['item'\\]",
        ),
        "rows": (
            _write_npz(tmp_path / "rows.npz", {**header, "n_rows": n + 1}, cols),
            f"do not have the {n + 1} rows",
        ),
        "n_rows": (
            _write_npz(
                tmp_path / "nr.npz", {k: v for k, v in header.items() if k != "n_rows"}, cols
            ),
            "n_rows",
        ),
        "ragged": (
            _write_npz(tmp_path / "rag.npz", header, {**cols, "time": cols["time"][:-1]}),
            "time",
        ),
    }
    (tmp_path / "empty.npz").write_bytes(b"")
    (tmp_path / "half.npz").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "tail.npz").write_bytes(raw[:-1])
    (tmp_path / "garbage.npz").write_bytes(np.random.default_rng(0).bytes(3000))
    for name, (path, message) in cases.items():
        with pytest.raises(LogFormatError, match=message) as err:
            ImpressionLog.load(path)
        assert str(path) in str(err.value), name
        assert isinstance(err.value, ValueError)


def test_every_single_byte_corruption_is_detected_or_harmless(tmp_path, hand_log):
    raw = hand_log.save(tmp_path / "good.npz").read_bytes()
    path = tmp_path / "bad.npz"
    harmless, offsets = 0, range(0, len(raw), max(1, len(raw) // 250))
    for offset in offsets:
        damaged = bytearray(raw)
        damaged[offset] ^= 0xFF
        path.write_bytes(damaged)
        try:
            back = ImpressionLog.load(path)
        except LogFormatError:
            continue
        assert back.equals(hand_log), offset  # e.g. a timestamp in a zip header
        harmless += 1
    assert harmless < len(offsets) // 3  # most flips hit data or structure and are caught


# ---------------------------------------------------------------- splits
@settings(max_examples=60, deadline=None, derandomize=True)
@given(a=st.floats(-1.0, 6.0), b=st.floats(-1.0, 6.0))
def test_split_by_time_partitions_rows(a, b):
    log = _hand_log(HAND)
    lo, hi = min(a, b), max(a, b)
    parts = log.split_by_time(lo, hi)
    keys = [set(zip(p.request.tolist(), p.position.tolist(), strict=True)) for p in parts]
    assert sum(len(k) for k in keys) == len(log)
    assert set.union(*keys) == set(zip(log.request.tolist(), log.position.tolist(), strict=True))
    assert np.all(parts[0].time < lo)
    assert np.all((parts[1].time >= lo) & (parts[1].time < hi))
    assert np.all(parts[2].time >= hi)


def test_split_by_time_rejects_bad_bounds():
    log = _hand_log(HAND)
    for a, b in ((2.0, 1.0), (np.nan, 1.0), (0.0, np.inf)):
        with pytest.raises(ValueError, match="train_end"):
            log.split_by_time(a, b)
    assert log.time_quantiles(0.0, 1.0) == [0.5, 5.0]
    with pytest.raises(ValueError, match="quantiles"):
        log.time_quantiles(1.5)
    with pytest.raises(ValueError, match="empty"):
        ImpressionLog.empty().time_quantiles(0.5)


def test_leave_last_out_hand_case(hand_log):
    train, valid, test = hand_log.leave_last_out()
    assert _requests(train) == {10, 11, 20, 21}
    assert _requests(valid) == {12, 13, 30, 31}
    assert _requests(test) == {14, 32}
    assert len(train) + len(valid) + len(test) == len(hand_log)
    # whole slates move together; candidate sets and meta follow their requests
    assert all(
        np.bincount(p.request)[np.unique(p.request)].tolist() == [2] * p.n_requests
        for p in (train, valid, test)
    )
    assert set(train.candidate_request.tolist()) == {10}
    assert set(valid.candidate_request.tolist()) == {12, 30}
    assert test.candidates.shape == (0, 3)
    assert train.meta == hand_log.meta
    # no validation part
    train, valid, test = hand_log.leave_last_out(n_test=1, n_valid=0)
    # (user 2's single positive is now enough: its slate and the ones after it are test)
    assert _requests(test) == {14, 20, 21, 32} and len(valid) == 0
    assert _requests(train) == {10, 11, 12, 13, 30, 31}
    # two test positives: user 1 only (user 3 has 2 < 3 positives, user 2 has 1)
    train, valid, test = hand_log.leave_last_out(n_test=2, n_valid=1)
    assert _requests(test) == {12, 13, 14}
    assert _requests(valid) == {10, 11}
    assert _requests(train) == {20, 21, 30, 31, 32}
    with pytest.raises(ValueError, match="n_test"):
        hand_log.leave_last_out(n_test=0)


def test_select_positives_sorted_concat(hand_log):
    pos = hand_log.positives()
    assert set(pos.feedback.tolist()) == {C, L_}
    assert len(pos) == 6
    assert len(hand_log.positives(include_dislikes=True)) == 7
    s = hand_log.sorted()
    assert np.all(np.diff(s.time) >= 0)
    both = ImpressionLog.concat(
        [hand_log.select(np.arange(5)), hand_log.select(np.arange(5, len(hand_log)))]
    )
    assert len(both) == len(hand_log)
    np.testing.assert_array_equal(both.item, hand_log.item)
    summary = hand_log.summary()
    assert summary["rows"] == 20 and summary["requests"] == 10 and summary["users"] == 3
    assert summary["click_rate"] == pytest.approx(7 / 20)


# ---------------------------------------------------------------- collect
class _CandidatePolicy:
    """The in-group policy, exposing a candidate set (the slate plus a few more items)."""

    name = "with-candidates"

    def __init__(self, world, k):
        self.inner = InGroupPolicy(world, k, epsilon=0.2, seed=3)
        self.last_candidates = None

    def act(self, obs):
        slates, prop = self.inner.act(obs)
        extra = np.full((slates.shape[0], 3), -1)
        self.last_candidates = np.concatenate([slates, extra], axis=1)
        return slates, prop


def _spy(env):
    """Record every reset and step of ``env`` (a direct measure, independent of collect)."""
    calls = []
    reset, step = env.reset, env.step

    def spy_reset(**kw):
        out = reset(**kw)
        calls.append(("reset", None, out))
        return out

    def spy_step(actions):
        out = step(actions)
        calls.append(("step", np.array(actions), out))
        return out

    env.reset, env.step = spy_reset, spy_step
    return calls


def _episodes(calls, b):
    """The finished episodes: (user, return, length, first step index, slot)."""
    obs = calls[0][2][0]
    resetting = np.zeros(b, bool)
    ret, length, start = np.zeros(b), np.zeros(b, int), np.zeros(b, int)
    user = obs_users(obs).copy()
    done_eps, autoreset_steps = [], 0
    for t, (_, _, out) in enumerate(calls[1:]):
        obs, rew, term, trunc, _ = out
        autoreset_steps += int(resetting.sum())
        act = ~resetting
        ret[act] += rew[act]
        length[act] += 1
        for i in np.nonzero((term | trunc) & act)[0]:
            done_eps.append((int(user[i]), float(ret[i]), int(length[i]), int(start[i]), int(i)))
        resetting = term | trunc
        # the next step of an ended slot is its autoreset: a new user from then on
        user[resetting] = -1
        ret[resetting], length[resetting] = 0.0, 0
        newly = (user == -1) & ~resetting
        user[newly] = obs_users(obs)[newly]
        start[newly] = t + 1
        user[resetting] = -1
    return done_eps, autoreset_steps


@pytest.mark.parametrize("n_users,b", [(40, 8), (5, 8)])
def test_collect_records_whole_episodes(n_users, b):
    env = BatchedRecEnv(b, EnvConfig.small())
    w = env.world
    calls = _spy(env)
    policy = UniformPolicy(w, 5, seed=1)
    log = collect(env, policy, n_users=n_users, seed=4, progress=False, meta={"note": "t"})
    assert log.meta["episodes_finished"] == n_users and log.meta["note"] == "t"
    assert log.meta["policy"] == "uniform" and log.meta["seed"] == 4
    assert log.meta["env_steps"] == len(calls) - 1
    # distinct users, each with one whole episode
    users = np.unique(log.user)
    assert users.size == n_users
    episodes, _ = _episodes(calls, b)
    # a user's recorded episode is their earliest (ties: the lower slot; with fewer users than
    # slots, collect pads the higher slots with repeats of the users, not recorded)
    first = {}
    for u, r, n, _, _ in sorted(episodes, key=lambda e: (e[3], e[4])):
        first.setdefault(u, (r, n))
    for u in users:
        rows = log.user == u
        r, n = first[int(u)]
        assert np.unique(log.request[rows]).size == n  # every slate of the episode, no more
        assert log.reward[rows].sum() == pytest.approx(r, abs=1e-4)  # rewards sum to the return
        # the episode's slates in order: session / step counters consistent, time increasing
        req = np.unique(log.request[rows])
        per = [np.nonzero(rows & (log.request == q))[0][0] for q in req]
        sess, step, t = log.session[per], log.session_step[per], log.time[per]
        assert sess[0] == 0 and step[0] == 0
        assert np.all(np.diff(t) > 0)
        nxt = np.diff(sess) == 1
        assert np.all(np.where(nxt, step[1:] == 0, (np.diff(sess) == 0) & (np.diff(step) == 1)))
    # never rows from an autoreset step: the rows equal the recorded episodes' slates exactly
    assert log.n_requests == sum(first[int(u)][1] for u in users)
    # each slate has k positions with at most one positive
    k = 5
    counts = np.bincount(log.request)
    assert np.all(counts[np.unique(log.request)] == k)
    assert np.all(log.position.reshape(-1, k) == np.arange(k))  # rows in slate order
    assert np.all((log.feedback.reshape(-1, k) > 0).sum(axis=1) <= 1)
    # no cross-group positives (the uniform policy shows plenty of other-group items)
    same = w.items.group[log.item] == w.users.group[log.user]
    assert (~same).mean() > 0.3
    assert np.all(log.feedback[~same] == EventType.IMPRESSION)
    # never unreleased items, and items released after time 0 do appear
    assert np.all(w.items.release_time[log.item] <= log.time)
    assert (w.items.release_time[log.item] > 0).any() or n_users < 10
    # the logged propensities are the policy's
    assert np.all((log.propensity > 0) & (log.propensity <= 1))


def test_collect_candidates_and_propensities_round_trip(tmp_path):
    env = BatchedRecEnv(6, EnvConfig.small())
    policy = _CandidatePolicy(env.world, 5)
    log = collect(env, policy, n_users=12, seed=0, progress=False)
    assert log.candidates.shape == (log.n_requests, 8)
    np.testing.assert_array_equal(np.sort(log.candidate_request), np.unique(log.request))
    by_req = dict(zip(log.candidate_request.tolist(), log.candidates.tolist(), strict=True))
    for q in np.unique(log.request)[:50]:
        rows = np.nonzero(log.request == q)[0]
        assert by_req[int(q)][:5] == log.item[rows].tolist()
    back = ImpressionLog.load(log.save(tmp_path / "c.npz"))
    assert back.equals(log)
    # same seed, same log
    again = collect(
        BatchedRecEnv(6, EnvConfig.small()),
        _CandidatePolicy(env.world, 5),
        n_users=12,
        seed=0,
        progress=False,
    )
    assert again.equals(log)


def test_collect_max_steps_cuts_episodes():
    env = BatchedRecEnv(4, EnvConfig.small())
    log = collect(env, UniformPolicy(env.world, 5), n_users=50, max_steps=6, progress=False)
    assert log.meta["env_steps"] == 6 and log.meta["episodes_finished"] < 50
    assert log.n_requests <= 6 * 4


def test_collect_more_users_than_the_population_wraps():
    env = BatchedRecEnv(16, EnvConfig.small(max_steps=3))
    log = collect(env, UniformPolicy(env.world, 5), n_users=320, seed=1, progress=False)
    counts = np.bincount(log.user, minlength=300)
    assert np.all(counts > 0)  # every user of the permutation once, then 20 more
    assert (counts > np.median(counts)).sum() == 20


class _SlatesOnly:
    """act returns slates only; propensities (a known function of item and position) optional."""

    name = "slates-only"

    def __init__(self, world, expose):
        self.inner = UniformPolicy(world, 5, seed=0)
        self.expose = expose

    @staticmethod
    def fake_propensity(slates):
        # in (0, 1]: a log holds probabilities
        pos = np.arange(slates.shape[1])
        return ((slates % 97 + 1) / 98.0 + 0.001 * pos).astype(np.float32)

    def act(self, obs):
        slates, _ = self.inner.act(obs)
        if self.expose:
            self.last_propensities = self.fake_propensity(slates)
        return slates


def test_collect_propensities_from_tuple_attribute_or_nan():
    env = BatchedRecEnv(4, EnvConfig.small())
    log = collect(env, _SlatesOnly(env.world, expose=True), n_users=6, progress=False)
    expect = ((log.item % 97 + 1) / 98.0 + 0.001 * log.position).astype(np.float32)
    np.testing.assert_allclose(log.propensity, expect, rtol=1e-6)
    log = collect(env, _SlatesOnly(env.world, expose=False), n_users=6, progress=False)
    assert len(log) > 0 and np.all(np.isnan(log.propensity))
    # a tuple-returning policy: the logged values are the Plackett-Luce factors it returned
    policy = UniformPolicy(env.world, 5, seed=0)
    log = collect(env, policy, n_users=6, progress=False)
    n_rel = (env.world.items.release_time[None, :] <= log.time[:, None]).sum(axis=1)
    np.testing.assert_allclose(log.propensity, 1.0 / (n_rel - log.position), rtol=1e-5)
