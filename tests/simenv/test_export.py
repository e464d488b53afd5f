"""Export of ImpressionLog to RecBole atomic files and CSV/TSV: golden text, round trips, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simenv import BatchedRecEnv, EnvConfig, UniformPolicy, collect
from simenv.export import (
    ExportFormatError,
    export_recbole,
    export_table,
    format_numbers,
    parse_atomic,
    read_atomic,
    read_recbole,
    read_table,
)
from simenv.log import ImpressionLog
from simenv.types import Columns, EventType, ItemCatalog

C, L_, D, I_ = EventType.CLICK, EventType.LIKE, EventType.DISLIKE, EventType.IMPRESSION


def hand_log() -> ImpressionLog:
    # user, time, session, step, request, position, item, feedback, watch, reward, propensity
    rows = [
        (3, 0.5, 0, 0, 7, 0, 4, C, 2.5, 1.0, 0.25),
        (3, 0.5, 0, 0, 7, 1, 2, I_, 0.0, 0.0, 0.125),
        (1, 1.25, 1, 2, 8, 0, 0, L_, 7.0, 2.0, float("nan")),
        (1, 1.25, 1, 2, 8, 1, 1, D, 0.5, -1.0, 0.1),
    ]
    cols = list(zip(*rows, strict=True))
    names = [
        Columns.USER, Columns.TIME, Columns.SESSION, "session_step", Columns.REQUEST,
        Columns.POSITION, Columns.ITEM, Columns.FEEDBACK, Columns.WATCH, Columns.REWARD,
        Columns.PROPENSITY,
    ]  # fmt: skip
    return ImpressionLog({n: np.array(c) for n, c in zip(names, cols, strict=True)}, meta={"x": 1})


def hand_catalog() -> ItemCatalog:
    return ItemCatalog(
        title_tokens=np.array(
            [[5, 6, 0, 0], [7, 0, 0, 0], [0, 0, 0, 0], [8, 9, 5, 0], [1, 0, 0, 0]]
        ),
        vocab_size=12,
        categorical=np.array([[0, 1], [2, 0], [1, 1], [0, 0], [3, 1]]),
        categorical_names=("creator", "group"),
        categorical_cardinalities=(5, 2),
        release_time=np.array([-1.5, 0.0, 2.0, 0.1, 3.0], dtype=np.float32),
    )


def test_recbole_files_golden(tmp_path):
    paths = export_recbole(
        hand_log(), tmp_path, "toy", hand_catalog(), user_columns={"age": np.arange(5) * 10}
    )
    assert set(paths) == {"inter", "item", "user", "meta"}
    assert paths["inter"].read_text() == (
        "user_id:token\titem_id:token\ttimestamp:float\tlabel:float\tfeedback:token\t"
        "session:float\tsession_step:float\trequest_id:token\tposition:float\twatch:float\t"
        "reward:float\tpropensity:float\n"
        "3\t4\t0.5\t1.0\t1\t0\t0\t7\t0\t2.5\t1.0\t0.25\n"
        "3\t2\t0.5\t0.0\t0\t0\t0\t7\t1\t0.0\t0.0\t0.125\n"
        "1\t0\t1.25\t1.0\t2\t1\t2\t8\t0\t7.0\t2.0\tnan\n"
        "1\t1\t1.25\t0.0\t3\t1\t2\t8\t1\t0.5\t-1.0\t0.1\n"
    )
    assert paths["item"].read_text() == (
        "item_id:token\ttitle:token_seq\tcreator:token\tgroup:token\trelease_time:float\n"
        "0\t5 6\t0\t1\t-1.5\n1\t7\t2\t0\t0.0\n2\t\t1\t1\t2.0\n3\t8 9 5\t0\t0\t0.1\n"
        "4\t1\t3\t1\t3.0\n"
    )
    assert paths["user"].read_text() == "user_id:token\tage:token\n1\t10\n3\t30\n"
    side = json.loads(paths["meta"].read_text())
    assert side["n_rows"] == 4 and side["meta"] == {"x": 1}


def test_recbole_round_trip_of_a_collected_log(tmp_path):
    env = BatchedRecEnv(8, EnvConfig.small())
    log = collect(env, UniformPolicy(env.world, 5), n_users=40, seed=3, progress=False)
    assert log.candidates is None and len(log) > 100
    group = env.world.users.group
    export_recbole(log, tmp_path / "sim", "sim", env.world.catalog, {"group": group})
    back = read_recbole(tmp_path / "sim", "sim")
    assert back.log.equals(log)
    cat, got = env.world.catalog, back.catalog
    for f in ("title_tokens", "categorical", "release_time"):
        a, b = getattr(cat, f), getattr(got, f)
        assert a.dtype == b.dtype and np.array_equal(a, b), f
    assert (got.vocab_size, got.categorical_names, got.categorical_cardinalities) == (
        cat.vocab_size, cat.categorical_names, cat.categorical_cardinalities,
    )  # fmt: skip
    users = np.unique(log[Columns.USER])
    np.testing.assert_array_equal(back.users, users)
    np.testing.assert_array_equal(back.user_columns["group"], group[users])
    assert back.user_columns["group"].dtype == group.dtype


def test_positives_only(tmp_path):
    export_recbole(hand_log(), tmp_path, "p", positives_only=True)
    tab = read_atomic(tmp_path / "p.inter")
    assert tab.numbers("label").tolist() == [1.0, 1.0]
    assert tab.text("item_id").tolist() == ["4", "0"]
    back = read_recbole(tmp_path, "p")
    assert back.log.equals(hand_log().positives()) and back.catalog is None


@pytest.mark.parametrize("suffix,sep", [(".csv", ","), (".tsv", "\t")])
def test_table_golden_and_round_trip(tmp_path, suffix, sep):
    log = hand_log()
    path = export_table(log, tmp_path / f"log{suffix}")
    lines = path.read_text().splitlines()
    assert lines[0].split(sep) == [*log.columns, "label"]
    assert lines[3].split(sep) == [
        "1",
        "1.25",
        "1",
        "2",
        "8",
        "0",
        "0",
        "2",
        "7.0",
        "2.0",
        "nan",
        "1",
    ]
    back = read_table(path)
    assert back.equals(ImpressionLog(log.columns))  # meta is not part of a plain table
    # columns in another order, extra columns: still read
    cols = [lines[0].split(sep)[::-1]] + [ln.split(sep)[::-1] for ln in lines[1:]]
    (tmp_path / f"rev{suffix}").write_text("\n".join(sep.join(c) for c in cols) + "\n")
    assert read_table(tmp_path / f"rev{suffix}").equals(back)


def test_table_separator_rules(tmp_path):
    with pytest.raises(ValueError, match="cannot tell the separator"):
        export_table(hand_log(), tmp_path / "log.txt")
    path = export_table(hand_log(), tmp_path / "log.txt", sep="\t")
    assert read_table(path, sep="\t").equals(ImpressionLog(hand_log().columns))
    with pytest.raises(ValueError, match="sep must be"):
        export_table(hand_log(), tmp_path / "log.csv", sep=";")


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=40),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=40),
)
def test_numbers_read_back_bit_for_bit(f32, f64):
    for values, dtype in ((f32, np.float32), (f64, np.float64)):
        a = np.array(values, dtype=dtype)
        back = format_numbers(a).astype(np.float64).astype(dtype)  # what any CSV reader does
        assert np.array_equal(a, back, equal_nan=True)
        num = ~np.isnan(a)
        assert np.array_equal(np.signbit(a[num]), np.signbit(back[num]))  # -0.0 stays -0.0


def test_format_numbers_small_cases():
    x = np.array([np.float32(1) + np.float32(2**-23)], dtype=np.float32)
    text = format_numbers(x)
    assert text.astype(np.float64).astype(np.float32)[0] == x[0]
    assert format_numbers(np.array([7, -3], np.int16)).tolist() == ["7", "-3"]
    assert format_numbers(np.array([True, False])).tolist() == ["1", "0"]
    with pytest.raises(ValueError, match="1-D"):
        format_numbers(np.zeros((2, 2)))


def test_parse_atomic_formats():
    tab = parse_atomic("a:token\tb:float\tc:token_seq\r\n1\t2.5\tx y\r\n3\t-1\t\r\n", "t")
    assert tab.names == ("a", "b", "c") and tab.types == ("token", "float", "token_seq")
    assert tab.numbers("b").tolist() == [2.5, -1.0]
    assert tab.sequences("c") == [["x", "y"], []]
    assert len(parse_atomic("a:token\n")) == 0
    with pytest.raises(ExportFormatError, match="empty"):
        parse_atomic("", "t")
    with pytest.raises(ExportFormatError, match="not name:type"):
        parse_atomic("a:int\n1\n", "t")
    with pytest.raises(ExportFormatError, match="twice"):
        parse_atomic("a:token\ta:float\n1\t2\n", "t")
    with pytest.raises(ExportFormatError, match=r"line 3 has 1 .*header has 2 \(the file looks"):
        parse_atomic("a:token\tb:float\n1\t2\n3\n", "t")
    with pytest.raises(ExportFormatError, match=r"line 2 has 1 .*header has 2$"):
        parse_atomic("a:token\tb:float\n1\n3\t4\n", "t")
    with pytest.raises(ExportFormatError, match=r"t: line 3: field 'b' must be a number, got 'x'"):
        parse_atomic("a:token\tb:float\n1\t2\n3\tx\n", "t").numbers("b")
    with pytest.raises(ExportFormatError, match="has no field 'z'"):
        parse_atomic("a:token\n1\n", "t").text("z")


def test_damaged_exports_raise(tmp_path):
    export_recbole(hand_log(), tmp_path, "d", hand_catalog())
    inter = tmp_path / "d.inter"
    good = inter.read_text()
    lines = good.splitlines(keepends=True)
    inter.write_text("".join(lines[:-1]))  # a whole line lost
    with pytest.raises(ExportFormatError, match="has 3 rows, the export wrote 4"):
        read_recbole(tmp_path, "d")
    inter.write_text(good[:-8])  # cut inside the last line
    with pytest.raises(ExportFormatError, match="truncated"):
        read_recbole(tmp_path, "d")
    inter.write_text(good.replace("\t7\t0\t2.5", "\t7\t99999\t2.5"))  # position is int16
    with pytest.raises(ExportFormatError, match=r"line 2: field 'position' = 99999 is outside"):
        read_recbole(tmp_path, "d")
    inter.write_text(good)
    (tmp_path / "d.simenv.json").write_text("{not json")
    with pytest.raises(ExportFormatError, match="not valid JSON"):
        read_recbole(tmp_path, "d")
    (tmp_path / "d.simenv.json").write_text('{"format": "other"}')
    with pytest.raises(ExportFormatError, match="not a simenv export"):
        read_recbole(tmp_path, "d")
    with pytest.raises(ExportFormatError, match="no e.simenv.json"):
        read_recbole(tmp_path, "e")
    with pytest.raises(ExportFormatError, match="no atomic file"):
        read_atomic(tmp_path / "nope.inter")
    (tmp_path / "bin.inter").write_bytes(b"a:token\n\xff\n")
    with pytest.raises(ExportFormatError, match="not UTF-8"):
        read_atomic(tmp_path / "bin.inter")


def test_damaged_tables_raise(tmp_path):
    path = export_table(hand_log(), tmp_path / "t.csv")
    good = path.read_text()
    path.write_text(good[:-5])
    with pytest.raises(ExportFormatError, match="truncated"):
        read_table(path)
    path.write_text(good.replace("user,", "usr,", 1))
    with pytest.raises(ExportFormatError, match=r"lacks columns \['user'\]"):
        read_table(path)
    path.write_text(good.replace("\n3,0.5,", "\n3,half,", 1))
    with pytest.raises(
        ExportFormatError, match=r"line 2: column 'time' must be a number, got 'half'"
    ):
        read_table(path)
    path.write_text("")
    with pytest.raises(ExportFormatError, match="empty"):
        read_table(path)
    with pytest.raises(ExportFormatError, match="no table"):
        read_table(tmp_path / "missing.csv")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="name must be"):
        export_recbole(hand_log(), tmp_path, "a/b")
    with pytest.raises(ValueError, match="log must be an ImpressionLog"):
        export_recbole({"user": [1]}, tmp_path)
    with pytest.raises(ValueError, match=r"user_columns\['age'\] has 2 entries"):
        export_recbole(hand_log(), tmp_path, user_columns={"age": np.arange(2)})
    with pytest.raises(ValueError, match="catalog has 3 items"):
        small = ItemCatalog(
            np.ones((3, 1), np.int64),
            2,
            np.zeros((3, 0), np.int64),
            (),
            (),
            np.zeros(3, np.float32),
        )
        export_recbole(hand_log(), tmp_path, catalog=small)
    with pytest.raises(ValueError, match="log must be an ImpressionLog"):
        export_table(None, tmp_path / "x.csv")
