"""ImpressionLog validates on construction and on load: corrupt columns and files give a clear
error naming the column and the value, never a numpy traceback or a silently wrong log."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simenv import BatchedRecEnv, Columns, EnvConfig, ImpressionLog, LogFormatError, collect
from simenv.log import FORMAT_VERSION
from simenv.policies import UniformPolicy

N_ITEMS, N_USERS, SLATE = 50, 20, 4


def _columns(n: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    """Valid columns of n rows (n a multiple of SLATE)."""
    rng = np.random.default_rng(seed)
    req = np.repeat(np.arange(n // SLATE), SLATE)
    fb = rng.integers(0, 4, n)
    return {
        Columns.USER: rng.integers(0, N_USERS, n),
        Columns.TIME: np.sort(rng.random(n) * 5.0),
        Columns.SESSION: rng.integers(0, 3, n).astype(np.int32),
        "session_step": rng.integers(0, 5, n).astype(np.int32),
        Columns.REQUEST: req,
        Columns.POSITION: np.tile(np.arange(SLATE), n // SLATE).astype(np.int16),
        Columns.ITEM: rng.integers(0, N_ITEMS, n),
        Columns.FEEDBACK: fb.astype(np.int8),
        Columns.WATCH: np.where(fb > 0, rng.random(n) * 10, 0.0).astype(np.float32),
        Columns.REWARD: (fb > 0) - 2.0 * (fb == 3),
        Columns.PROPENSITY: np.where(rng.random(n) < 0.2, np.nan, rng.uniform(1e-3, 1.0, n)),
    }


META = {"world": {"n_items": N_ITEMS, "n_users": N_USERS}, "slate_size": SLATE}

INT_COLUMNS = [
    Columns.USER,
    Columns.SESSION,
    "session_step",
    Columns.REQUEST,
    Columns.POSITION,
    Columns.ITEM,
    Columns.FEEDBACK,
]
# column -> values that must be refused, each with the text the message must show
BAD_VALUES: dict[str, list[tuple[object, str]]] = {
    **{c: [(1.5, "1.5"), (np.nan, "nan"), (np.inf, "inf"), (-1, "-1")] for c in INT_COLUMNS},
    Columns.USER: [(1.5, "1.5"), (-3, "-3"), (N_USERS, str(N_USERS)), (2**63, "")],
    Columns.ITEM: [(0.25, "0.25"), (-1, "-1"), (N_ITEMS + 7, str(N_ITEMS + 7)), (np.nan, "nan")],
    Columns.POSITION: [(SLATE, str(SLATE)), (40_000, "40000"), (-1, "-1"), (2.5, "2.5")],
    Columns.FEEDBACK: [(4, "4"), (-1, "-1"), (300, "300"), (1.5, "1.5")],
    Columns.TIME: [(np.nan, "nan"), (np.inf, "inf"), (-0.5, "-0.5"), (-np.inf, "-inf")],
    Columns.WATCH: [(np.nan, "nan"), (-1.0, "-1"), (np.inf, "inf")],
    Columns.REWARD: [(np.nan, "nan"), (np.inf, "inf"), (-np.inf, "-inf")],
    Columns.PROPENSITY: [(0.0, "0"), (-0.25, "-0.25"), (1.5, "1.5"), (np.inf, "inf")],
}
CASES = [(c, v, text) for c, values in BAD_VALUES.items() for v, text in values]


def _corrupt(cols: dict, column: str, value: float | int, row: int) -> dict:
    """Columns with ``value`` written at ``row``, in a dtype that can hold it (as a careless
    writer of a file would store it)."""
    a = np.asarray(cols[column])
    if isinstance(value, float) and not (np.isfinite(value) and value.is_integer()):
        a = a.astype(np.float64)
    elif isinstance(value, int) and not np.can_cast(np.min_scalar_type(value), a.dtype):
        a = a.astype(np.uint64 if value >= 2**63 else np.int64)
    else:
        a = a.copy()
    a[row] = value
    return {**cols, column: a}


def test_valid_columns_construct_and_load_back(tmp_path):
    log = ImpressionLog(_columns(), meta=META)
    assert len(log) == 12 and log[Columns.POSITION].dtype == np.int16
    assert ImpressionLog.load(log.save(tmp_path / "ok.npz")).equals(log)
    # whole-number floats are integers without loss; an empty float column is fine
    cols = {**_columns(), Columns.ITEM: _columns()[Columns.ITEM].astype(np.float64)}
    assert ImpressionLog(cols).equals(ImpressionLog(_columns()))
    assert len(ImpressionLog({c: np.zeros(0) for c in _columns()})) == 0


@settings(max_examples=60, deadline=None, derandomize=True)
@given(case=st.sampled_from(CASES), row=st.integers(0, 11))
def test_a_corrupt_value_names_its_column_and_value(case, row):
    column, value, text = case
    with pytest.raises(ValueError, match=f"column '{column}'") as err:
        ImpressionLog(_corrupt(_columns(), column, value, row), meta=META)
    assert text in str(err.value) and f"row {row}" in str(err.value), str(err.value)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda c: {**c, Columns.TIME: c[Columns.TIME][:-1]}, "column 'time' has 11 rows"),
        (lambda c: {**c, Columns.ITEM: c[Columns.ITEM].reshape(3, 4)}, "'item' must be 1-D"),
        (lambda c: {**c, Columns.USER: c[Columns.USER].astype(str)}, "'user' must hold integers"),
        (lambda c: {**c, Columns.TIME: c[Columns.TIME].astype(str)}, "'time' must hold real"),
        (lambda c: {**c, Columns.WATCH: c[Columns.WATCH] * 1j}, "'watch' must hold real"),
        (lambda c: {k: v for k, v in c.items() if k != "reward"}, r"missing \['reward'\]"),
        (lambda c: {**c, "clicks": c[Columns.ITEM]}, r"unknown names \['clicks'\]"),
    ],
)
def test_malformed_columns_raise(change, match):
    with pytest.raises(ValueError, match=match):
        ImpressionLog(change(_columns()), meta=META)


def test_candidates_are_validated():
    cols = _columns()
    good = np.array([[1, 2, -1], [3, 4, 5], [0, -1, -1]])
    ImpressionLog(cols, good, np.arange(3), META)
    for cand, match in [
        (np.array([[1, 2, -2]] * 3), "column 'candidates' must hold -1 or item ids"),
        (np.array([[1, N_ITEMS, 0]] * 3), f"got {N_ITEMS}"),
        (good + 0.5, "'candidates' must hold whole numbers"),
    ]:
        with pytest.raises(ValueError, match=match):
            ImpressionLog(cols, cand, np.arange(3), META)
    with pytest.raises(ValueError, match="candidate_request' must hold request ids"):
        ImpressionLog(cols, good, np.array([0, -1, 2]), META)


def test_collect_writes_nan_propensities_when_the_policy_says_nothing():
    class NoPropensity:
        name = "no-propensity"

        def __init__(self, world):
            self.inner = UniformPolicy(world, EnvConfig.small().slate_size, seed=0)

        def act(self, obs):
            return self.inner.act(obs)[0]

    env = BatchedRecEnv(4, EnvConfig.small())
    log = collect(env, NoPropensity(env.world), n_users=5, seed=0, progress=False)
    assert len(log) > 0 and np.isnan(log[Columns.PROPENSITY]).all()  # NaN: unknown, allowed
    assert log.meta["world"]["n_items"] == env.world.n_items  # the bound the ids are checked on


def _write_npz(path: Path, columns: dict, n_rows: int | None = None, meta=None) -> Path:
    n = len(next(iter(columns.values()))) if n_rows is None else n_rows
    header = {"format": "simenv.ImpressionLog", "version": FORMAT_VERSION, "n_rows": n}
    header["meta"] = META if meta is None else meta
    arrays = {f"col__{c}": np.asarray(a) for c, a in columns.items()}
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(case=st.sampled_from(CASES), row=st.integers(0, 11))
def test_a_file_with_a_corrupt_value_raises_log_format_error(tmp_path, case, row):
    column, value, text = case
    path = _write_npz(tmp_path / "bad.npz", _corrupt(_columns(), column, value, row))
    with pytest.raises(LogFormatError, match=f"column '{column}'") as err:
        ImpressionLog.load(path)
    assert str(path) in str(err.value) and text in str(err.value)


def test_files_whose_shapes_lie_are_refused_before_reading(tmp_path):
    cols = _columns()
    with pytest.raises(LogFormatError, match="do not have the 13 rows"):
        ImpressionLog.load(_write_npz(tmp_path / "rows.npz", cols, n_rows=13))
    with pytest.raises(LogFormatError, match="meta must be a dict"):
        ImpressionLog.load(_write_npz(tmp_path / "meta.npz", cols, meta=[1, 2]))
    # a .npy header (CRC intact) that promises 10^11 rows: refused from the header alone,
    # nothing of that size allocated or read
    good = _write_npz(tmp_path / "good.npz", cols)
    forged = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        forged, {"descr": "<i8", "fortran_order": False, "shape": (10**11,)}
    )
    forged.write(cols[Columns.USER].astype("<i8").tobytes())
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w") as dst:
        for name in src.namelist():
            data = forged.getvalue() if name == "col__user.npy" else src.read(name)
            dst.writestr(name, data)
    with pytest.raises(LogFormatError, match="needs 800000000000 bytes"):
        ImpressionLog.load(path)


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    cut=st.floats(0.0, 1.0),
    flips=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(1, 255)), max_size=4),
)
def test_random_damage_is_detected_or_harmless(tmp_path, cut, flips):
    """Truncations and random byte changes: LogFormatError, or (bytes zip ignores, such as a
    header timestamp) exactly the saved log. Never another exception, never other data."""
    log = ImpressionLog(_columns(40, seed=1), np.arange(30).reshape(10, 3), np.arange(10), META)
    raw = bytearray(log.save(tmp_path / "good.npz").read_bytes())
    for where, xor in flips:
        raw[min(int(where * len(raw)), len(raw) - 1)] ^= xor
    if not flips:
        raw = raw[: int(cut * len(raw))]  # a truncation (cut = 1.0: the whole file)
    path = tmp_path / "damaged.npz"
    path.write_bytes(bytes(raw))
    try:
        back = ImpressionLog.load(path)
    except LogFormatError as e:
        assert str(path) in str(e)
        return
    assert back.equals(log)
