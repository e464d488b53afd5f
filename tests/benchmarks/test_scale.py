"""The scale benchmark: a tiny in-process run end to end, and one stage in a fresh process."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks.registry import REGISTRY, make_config
from benchmarks.runner import run_experiment
from benchmarks.scale import ScaleConfig, run_stage

TINY = {
    "sizes": "1000,3000",
    "retrieval_users": "200",
    "retrieval_batches": "2",
    "sbs_reps": "2",
    "sbs_queries": "100",
    "pilot_users": "60",
    "num_envs": "128",
}


@pytest.fixture(scope="module", autouse=True)
def _registered():
    REGISTRY.load(["benchmarks.scale"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_scale_quick_runs_every_stage_and_reports(tmp_path):
    data = tmp_path / "data"
    overrides = {**TINY, "data_dir": str(data)}
    exp = REGISTRY.get("scale")
    cfg = make_config(exp.config_cls, quick=True, overrides=overrides)
    out = run_experiment(
        exp,
        cfg,
        out_root=tmp_path / "reports",
        seeds=(0,),
        quick=True,
        command="python -m benchmarks scale --quick (smoke test)",
        overrides=overrides,
        threads=1,
        quiet=True,
    )
    doc = json.loads((tmp_path / "reports" / "scale" / "results.json").read_text())
    assert out.ok, doc.get("error")
    assert not data.exists()  # logs and checkpoints removed (keep_data=False)
    stages = doc["results"]["stages"]
    assert set(stages) == {"1000", "3000"}
    for st in stages.values():
        c, t, r = st["collect"], st["train"], st["retrieve"]
        assert c["rows"] == sum(c["shard_rows"]) and len(c["shard_rows"]) == cfg.n_shards
        assert t["examples"] == sum(t["chunk_examples"]) > 0
        assert r["users"] == sum(r["batch_queries"]) == 200  # with replacement if needed
        for s in st.values():
            assert s["seconds"] > 0 and s["peak_gib"] > 0
    sbs = doc["results"]["side_by_side"]
    assert all(len(v) == 2 and min(v) > 0 for v in sbs.values())
    assert [f["verdict"] in ("HOLDS", "REFUTED", "INCONCLUSIVE") for f in doc["findings"]] == [
        True,
        True,
    ]
    sanity = {s["text"].split(" ")[0]: s["passed"] for s in doc["sanity"]}
    assert sanity["every"] and sanity["retrieval"]  # memory fits; valid ids
    assert "the" in sanity  # impressions vs plan: recorded (a 60-user pilot may miss by >15%)
    titles = [t["title"] for t in doc["tables"]]
    assert titles[0].startswith("Time (s) and peak memory") and len(titles) == 3


def test_world_stage_in_a_fresh_process_measures_its_own_peak(tmp_path):
    p = {"n": 20_000, "world_seed": 0, "dir": str(tmp_path / "w"), "threads": 1}
    out = run_stage("world", p, fresh=True)
    # the process's peak holds the world's arrays (plus the interpreter), its start RSS does not
    assert out["peak_gib"] > out["world_gib"] > 0
    assert out["peak_gib"] - out["rss_after_setup_gib"] >= 0.5 * out["world_gib"]
    assert np.load(tmp_path / "w" / "release_time.npy").shape == (20_000,)
    with pytest.raises(RuntimeError, match="stage 'world' at N=-1 failed in its process"):
        run_stage("world", {**p, "n": -1}, fresh=True)  # the child raises on a bad config


@pytest.mark.parametrize(
    "change, match",
    [
        ({"sizes": (3000, 2000)}, "sizes must be >= 2 increasing values >= 1000"),
        ({"sizes": (3000,)}, "sizes must be >= 2 increasing values"),
        ({"backend": "dask"}, "backend must be serial, processes or ray"),
        ({"n_shards": 0}, "n_shards must be >= 1"),
        ({"retrieval_users": 2, "retrieval_batches": 3}, "retrieval_batches must be <="),
    ],
)
def test_bad_config_is_named(change, match):
    with pytest.raises(ValueError, match=match):
        ScaleConfig(**change)
