"""Log stores (simenv.logstore): memory-mapped columns on disk, appended and merged chunk-wise."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from simenv import Columns, EnvConfig, ImpressionLog, LogFormatError, PopularityPolicy
from simenv.logstore import (
    LogStoreWriter,
    concat_log_stores,
    iter_log_store,
    open_log_store,
    store_nbytes,
    write_log_store,
)
from simenv.shard import collect_sharded, merge_shard_logs


def make_log(n_req: int, seed: int, k: int = 3, with_candidates: bool = True) -> ImpressionLog:
    rng = np.random.default_rng(seed)
    n = n_req * k
    cols = {
        Columns.USER: rng.integers(0, 50, n),
        Columns.TIME: rng.random(n) * 10,
        Columns.SESSION: rng.integers(0, 5, n),
        "session_step": rng.integers(0, 9, n),
        Columns.REQUEST: np.repeat(np.arange(n_req), k),
        Columns.POSITION: np.tile(np.arange(k), n_req),
        Columns.ITEM: rng.integers(0, 1000, n),
        Columns.FEEDBACK: rng.integers(0, 4, n),
        Columns.WATCH: rng.random(n),
        Columns.REWARD: rng.random(n),
        Columns.PROPENSITY: np.where(rng.random(n) < 0.2, np.nan, rng.random(n)),
    }
    cand = creq = None
    if with_candidates:
        cand = rng.integers(-1, 1000, (n_req, 7))
        creq = np.arange(n_req)
    return ImpressionLog(cols, cand, creq, {"seed": seed, "world": {"n_items": 1000}})


def test_round_trip_memory_mapped_and_in_memory(tmp_path):
    log = make_log(40, 0)
    path = write_log_store(log, tmp_path / "s")
    mapped = open_log_store(path)
    assert mapped.equals(log)
    assert open_log_store(path, mmap=False).equals(log)
    assert isinstance(mapped.columns[Columns.ITEM].base, np.memmap)  # a view, not a copy
    assert not mapped.columns[Columns.ITEM].flags.writeable
    # 55 bytes per row (the simenv.log dtypes) + 8 * (7 + 1) per candidate set + the header
    assert store_nbytes(path) - (path / "header.json").stat().st_size == 120 * 55 + 40 * 64
    empty = open_log_store(write_log_store(ImpressionLog.empty({"a": 1}), tmp_path / "e"))
    assert len(empty) == 0 and empty.meta == {"a": 1} and empty.candidates is None


def test_chunked_append_and_concat_equal_the_in_memory_merge(tmp_path):
    parts = [make_log(5, 1), make_log(0, 2, with_candidates=False), make_log(8, 3)]
    ref = merge_shard_logs(parts, {"m": 1})
    for i, p in enumerate(parts):
        write_log_store(p, tmp_path / f"p{i}")
    out = concat_log_stores(
        [tmp_path / f"p{i}" for i in range(3)], tmp_path / "all", {"m": 1}, rows_per_chunk=4
    )
    assert open_log_store(out).equals(ref)
    chunks = list(iter_log_store(out, rows_per_chunk=7))
    assert [len(c[Columns.USER]) for c in chunks] == [7] * 5 + [4]
    for c in ref.columns:
        joined = np.concatenate([ch[c] for ch in chunks])
        assert np.array_equal(joined, ref[c], equal_nan=True), c
    (only,) = list(iter_log_store(out, rows_per_chunk=100, columns=[Columns.ITEM]))
    assert list(only) == [Columns.ITEM] and np.array_equal(only[Columns.ITEM], ref[Columns.ITEM])
    with pytest.raises(ValueError, match="unknown names \\['items'\\]"):
        next(iter_log_store(out, columns=["items"]))


def test_incomplete_or_damaged_stores_are_refused(tmp_path):
    path = write_log_store(make_log(6, 4), tmp_path / "s")
    with pytest.raises(ValueError, match="exists; pass overwrite=True"):
        write_log_store(make_log(2, 5), path)
    col = path / f"col.{Columns.ITEM}.bin"
    col.write_bytes(col.read_bytes()[:-8])
    with pytest.raises(LogFormatError, match="col.item.bin has 136 bytes, the header promises 144"):
        open_log_store(path)
    header = json.loads((path / "header.json").read_text())
    header["version"] = 99
    (path / "header.json").write_text(json.dumps(header))
    with pytest.raises(LogFormatError, match="log store version 99"):
        open_log_store(path)
    (path / "header.json").unlink()
    with pytest.raises(LogFormatError, match="no log store at"):
        open_log_store(path)
    with pytest.raises(RuntimeError, match="stop"), LogStoreWriter(tmp_path / "never") as w:
        w.append(make_log(3, 6))
        raise RuntimeError("stop")
    assert not (tmp_path / "never").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temporary folder left behind
    with LogStoreWriter(tmp_path / "w") as w, pytest.raises(ValueError, match="one width"):
        w.append(make_log(2, 7))
        w.append_candidates(np.zeros((1, 3), np.int64), np.zeros(1, np.int64))


def test_collect_sharded_to_a_store_equals_the_in_memory_log(tmp_path):
    cfg = EnvConfig.small()
    factory = functools.partial(PopularityPolicy, slate_size=cfg.slate_size, epsilon=0.1)
    run = dict(n_users=60, n_shards=4, seed=1, num_envs=8, progress=False)
    ref = collect_sharded(cfg, factory, **run)
    on_disk = collect_sharded(
        cfg, factory, backend="processes", workers=2, out=tmp_path / "log", **run
    )
    assert on_disk.equals(ref)
    assert isinstance(on_disk.columns[Columns.USER].base, np.memmap)
    assert [p.name for p in tmp_path.iterdir()] == ["log"]  # the shard parts are gone
