"""Files from outside are untrusted: random byte changes and truncations of RecBole exports,
CSV/TSV tables and atomic files give ExportFormatError, or (RecBole exports, which carry a
SHA-256 of every file) exactly what was written, never another exception or other data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simenv.export import (
    ExportFormatError,
    export_recbole,
    export_table,
    parse_atomic,
    read_recbole,
    read_table,
)
from simenv.log import ImpressionLog
from tests.simenv.test_export import hand_catalog, hand_log

FUZZ = settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
DAMAGE = st.one_of(
    st.tuples(st.just("cut"), st.floats(0.0, 1.0)),  # keep this fraction of the bytes
    st.tuples(
        st.just("flip"), st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), min_size=1)
    ),
    st.tuples(st.just("insert"), st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=4))),
)


def _damage(raw: bytes, damage) -> bytes:
    kind, arg = damage
    if kind == "cut":
        return raw[: int(arg * len(raw))]
    if kind == "insert":
        at = int(arg[0] * len(raw))
        return raw[:at] + arg[1] + raw[at:]
    out = bytearray(raw)
    for where, xor in arg:
        out[min(int(where * len(out)), len(out) - 1)] ^= xor
    return bytes(out)


FILES = {"inter": "toy.inter", "user": "toy.user", "item": "toy.item", "meta": "toy.simenv.json"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recbole")
    paths = export_recbole(
        hand_log(), folder, "toy", hand_catalog(), user_columns={"age": np.arange(5) * 10}
    )
    return folder, {kind: p.read_bytes() for kind, p in paths.items()}


def test_sidecar_records_every_file_digest(exported):
    folder, raw = exported
    side = json.loads(raw["meta"])
    assert side["version"] == 2 and set(side["sha256"]) == {"inter", "user", "item", "sidecar"}
    back = read_recbole(folder, "toy")
    assert back.log.equals(hand_log())
    # one digit changed: the text still parses into a valid log, the digest catches it
    inter = folder / "toy.inter"
    inter.write_bytes(raw["inter"].replace(b"\t7\t0\t2.5\t", b"\t7\t0\t3.5\t"))
    with pytest.raises(ExportFormatError, match="SHA-256 mismatch"):
        read_recbole(folder, "toy")
    inter.write_bytes(raw["inter"])
    (folder / "toy.simenv.json").write_bytes(raw["meta"].replace(b'"x": 1', b'"x": 2'))
    with pytest.raises(ExportFormatError, match="changed after the export"):
        read_recbole(folder, "toy")
    (folder / "toy.simenv.json").write_bytes(raw["meta"])


@FUZZ
@given(kind=st.sampled_from(["inter", "user", "item", "meta"]), damage=DAMAGE)
def test_damaged_recbole_export_is_an_error_or_exactly_the_export(tmp_path, exported, kind, damage):
    folder, raw = exported
    for k, data in raw.items():
        (tmp_path / FILES[k]).write_bytes(_damage(data, damage) if k == kind else data)
    try:
        back = read_recbole(tmp_path, "toy")
    except ExportFormatError as e:
        assert str(tmp_path) in str(e)
        return
    ref = read_recbole(folder, "toy")
    assert back.log.equals(ref.log)
    assert np.array_equal(back.users, ref.users)
    for f in ("title_tokens", "categorical", "release_time"):
        assert np.array_equal(getattr(back.catalog, f), getattr(ref.catalog, f)), f


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
@FUZZ
@given(damage=DAMAGE)
def test_damaged_table_is_an_error_or_a_valid_log(tmp_path, suffix, damage):
    path = export_table(hand_log(), tmp_path / f"t{suffix}")
    good = path.read_bytes()
    path.write_bytes(_damage(good, damage))
    try:
        back = read_table(path)
    except ExportFormatError as e:
        assert str(path) in str(e)
        return
    assert isinstance(back, ImpressionLog)  # every column passed ImpressionLog's checks
    if damage[0] == "cut":  # cut at a line end: the rows before it, unchanged
        ref = hand_log()
        for c, a in back.columns.items():
            assert np.array_equal(a, ref[c][: len(back)], equal_nan=True), c


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes_as_an_atomic_file(data):
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    try:
        table = parse_atomic(text, "fuzz")
    except ExportFormatError:
        return
    for name in table.names:
        assert table.text(name).shape == (len(table),)
