"""Smoke run of the `ann` experiment at a tiny size, and its world vectors."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from benchmarks.ann import AnnConfig, world_vectors
from benchmarks.registry import REGISTRY, make_config
from benchmarks.report import RESULTS_FILE
from benchmarks.runner import run_experiment
from simenv import World, WorldConfig


def test_world_vectors_rank_like_the_true_utility():
    world = World(WorldConfig.small(n_users=50), seed=0)
    items, queries, c = world_vectors(world, 20, seed=1)
    assert items.dtype == queries.dtype == np.float32
    assert items.shape[1] == queries.shape[1] == world.config.latent_dim + 1 + world.config.n_groups
    users = np.sort(np.random.default_rng(1).choice(world.n_users, 20, replace=False))
    util = world.utility(users, np.arange(world.n_items))  # (20, N), -inf across groups
    ip = queries.astype(np.float64) @ items.astype(np.float64).T
    same = np.isfinite(util)
    # within the user's group: inner product = utility + c^2 (exactly, up to float32)
    np.testing.assert_allclose(ip[same], util[same] + c**2, atol=1e-4)
    # every other-group item scores below every own-group item
    for r in range(20):
        assert ip[r][~same[r]].max(initial=-np.inf) < ip[r][same[r]].min()


def test_tiny_run_reports_fronts_and_findings(tmp_path):
    cfg = replace(
        make_config(AnnConfig, quick=True), sizes=(3_000,), queries=40, k=10,
        nprobe=(1, 4, 64), refine=(1, 4), repeats=1,
    )  # fmt: skip
    out = run_experiment(
        REGISTRY.get("ann"), cfg, out_root=tmp_path, seeds=(0,), quick=True,
        command="python -m benchmarks ann (tiny)", threads=1, quiet=True,
    )  # fmt: skip
    res = json.loads((tmp_path / "ann" / RESULTS_FILE).read_text())
    assert res["error"] is None, res["error"]
    assert out.ok
    rows = res["results"]["settings"]
    assert {r["index"] for r in rows} == {"ivf", "ivfpq"}
    assert all(0.0 <= r["recall@10"] <= 1.0 and r["q/s"] > 0 for r in rows)
    # 4 sqrt(N) = 219 cells capped at N / 39 = 76: nprobe 64 probes most of them, so the
    # IVF-Flat recall there is near 1 (a broken index would be far below)
    assert max(r["recall@10"] for r in rows if r["index"] == "ivf") >= 0.95
    kinds = {f["text"].split(":")[0] for f in res["findings"]}
    assert kinds == {"N=3,000"} and len(res["findings"]) == 2
    assert all(f["verdict"] in ("HOLDS", "REFUTED", "INCONCLUSIVE") for f in res["findings"])


def test_config_validation():
    with pytest.raises(ValueError, match="sizes must be >= 100 k"):
        AnnConfig(sizes=(500,), k=10)
    with pytest.raises(ValueError, match="refine"):
        AnnConfig(refine=())
