"""Smoke run of the `perf` experiment with tiny sizes, and its bare training loop.

The run writes report.md and results.json with every claim computed (PASS or FAIL from the
numbers; which way they go on tiny sizes is not the point here). The bare loop is checked
against ``fit_two_tower``'s loss on the same batch and weights, so that the reference the
throughput ratio divides by really does the same arithmetic.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from benchmarks.perf import BareLoop, PerfConfig
from benchmarks.registry import EXPERIMENT_MODULES, REGISTRY, make_config
from benchmarks.report import REPORT_FILE, RESULTS_FILE
from benchmarks.runner import run_experiment
from retrieval.frequency import ExactItemFrequency
from retrieval.losses import NegativeSamplerConfig, RetrievalLossConfig, build_loss
from retrieval.model import TwoTowerConfig, TwoTowerModel
from retrieval.similarity import SimilarityConfig
from retrieval.towers import ItemTowerConfig, UserTowerConfig
from retrieval.train import TrainConfig

TINY = dict(
    train_items=2_000, train_episodes=300, train_max_steps=10, train_batch=32,
    train_uniform=64, train_dim=8, train_steps=2, train_repeats=2, train_scaling_batches=(16,),
    train_scaling_items=(1_000, 2_000), index_items=3_000, index_dim=8, index_queries=20,
    index_k=10, index_repeats=1, index_scaling_items=(500,), trained_world="tiny",
    trained_epochs=1, trained_queries=50, hnsw_ef=(16, 32), ivf_nprobe=(1, 4),
    device_section="off",  # the device section has its own smoke test below
)  # fmt: skip
# the GPU command's code path (python -m benchmarks perf --device cuda --set sections=devices)
# on the CPU at tiny sizes; a GPU runs the sizes
DEVICE_TINY = dict(
    sections=("devices",), device_section="on", device_sizes=("2000:8:32:64", "3000:8:32:64"),
    device_steps=2, device_repeats=2, device_ratio_items=3_000,
)  # fmt: skip


def test_perf_is_registered():
    assert "benchmarks.perf" in EXPERIMENT_MODULES
    assert REGISTRY.get("perf").config_cls is PerfConfig


def test_tiny_run_writes_report_and_results_with_findings(tmp_path):
    cfg = replace(PerfConfig.quick(), **TINY)
    out = run_experiment(
        REGISTRY.get("perf"), cfg, out_root=tmp_path, seeds=(0,), quick=True,
        command="python -m benchmarks perf (tiny)", threads=1, quiet=True,
    )  # fmt: skip
    res = json.loads((tmp_path / "perf" / RESULTS_FILE).read_text())
    assert res["error"] is None, res["error"]
    assert out.ok and res["status"] == "ok"
    findings = res["findings"]
    # training bar fp32 + bf16, two ratios to the bare loop, sparse recall, exact vs torch,
    # ANN recall + speed (or one sanity check when no setting reaches the recall on tiny data)
    assert len(findings) + len(res["sanity"]) in (7, 8) and len(findings) >= 6
    assert all(f["verdict"] in ("HOLDS", "REFUTED", "INCONCLUSIVE") for f in findings)
    r = res["results"]
    # every side-by-side ratio is a finite positive number computed from its two parts
    tr = r["training"]
    for mode in ("dense", "sparse", "bf16"):
        m = tr[mode]
        assert m["ours"] > 0 and m["bare"] > 0
        assert m["ratio"] == pytest.approx(
            np.median(np.array(m["runs"]["ours"]) / m["runs"]["bare"])
        )
    assert "env" not in r and "device" not in r  # perf-env measures the simulator
    sizes = [row["items"] for row in r["index"]["exact_scaling"]]
    assert sizes == [500, 3_000]
    assert {row["index"] for row in r["index"]["operating_points"]} == {"hnsw", "ivf"}
    assert all(0.0 <= row["recall@10"] <= 1.0 for row in r["index"]["operating_points"])
    assert [row["items"] for row in tr["scaling_items"]] == [1_000, 2_000]
    md = (tmp_path / "perf" / REPORT_FILE).read_text()
    for title in ("Side by side", "Training throughput", "Exact search", "HNSW and IVF"):
        assert title in md
    for fig in res["figures"]:
        assert (tmp_path / "perf" / fig["file"]).stat().st_size > 0


def test_device_section_alone(tmp_path):
    cfg = replace(PerfConfig.quick(), **DEVICE_TINY)
    out = run_experiment(
        REGISTRY.get("perf"), cfg, out_root=tmp_path, seeds=(0,), quick=True,
        command="python -m benchmarks perf --set sections=devices (tiny)", threads=1,
        quiet=True,
    )  # fmt: skip
    res = json.loads((tmp_path / "perf" / RESULTS_FILE).read_text())
    assert res["error"] is None, res["error"]
    assert out.ok
    dev = res["results"]["device"]
    assert [(row["items"], row["precision"]) for row in dev["rows"]] == [
        (2_000, "fp32"), (2_000, "bf16"), (3_000, "fp32"), (3_000, "bf16")
    ]  # fmt: skip
    for row in dev["rows"]:
        assert row["fit_two_tower ex/s"] > 0 and row["bare loop ex/s"] > 0
    # the bar at device_ratio_items, fp32 and bf16; nothing from the sections not run
    assert [f["text"].split("(")[-1] for f in res["findings"]] == ["fp32)", "bf16)"]
    assert "training" not in res["results"] and "index" not in res["results"]
    assert (
        "fit_two_tower against a bare torch loop on the device"
        in (tmp_path / "perf" / REPORT_FILE).read_text()
    )


def test_quick_profile_and_bad_values():
    q = make_config(PerfConfig, quick=True)
    assert q.trained_world == "quick" and q.threads == 1
    with pytest.raises(ValueError, match="trained_world"):
        PerfConfig(trained_world="huge")
    with pytest.raises(ValueError, match="index_k"):
        PerfConfig(index_k=200, index_scaling_items=(100,))
    with pytest.raises(ValueError, match="train_batch"):
        PerfConfig(train_batch=1)
    with pytest.raises(ValueError, match="hnsw_ef"):
        PerfConfig(hnsw_ef=())
    with pytest.raises(ValueError, match="device_sizes entries must be 'N:d:B:U'"):
        PerfConfig(device_sizes=("100000:64:1024",))
    with pytest.raises(ValueError, match="device_section"):
        PerfConfig(device_section="gpu")
    with pytest.raises(ValueError, match="sections must be"):
        PerfConfig(sections=("env",))


@pytest.mark.parametrize("sparse", [False, True])
def test_bare_loop_computes_the_loss_of_fit_two_tower(sparse):
    torch.set_num_threads(1)
    n, b, u, d, length = 50, 8, 16, 4, 5
    rng = np.random.default_rng(0)
    items = rng.integers(0, n, (40, length))
    mask = (rng.random((40, length)) < 0.7).astype(np.int8)
    mask[3] = 0  # an empty history: the learned empty vector
    target = rng.integers(0, n, 40)
    user_pos = np.where(rng.random((40, 3)) < 0.5, rng.integers(0, n, (40, 3)), -1)
    bare = BareLoop(items, mask, target, user_pos, n, d, b, u, sparse, 0, TrainConfig())
    model = TwoTowerModel.build(
        TwoTowerConfig(
            item=ItemTowerConfig(kind="id", dim=d, n_items=n),
            user=UserTowerConfig(kind="mean"),
            similarity=SimilarityConfig(
                kind="cosine", temperature=None, learnable_temperature=True
            ),
        ),
        None,
    )
    with torch.no_grad():  # same weights; a temperature away from 1 so that tau matters
        model.item_tower.embedding.weight.copy_(bare.table)
        bare.empty.copy_(torch.randn(d))
        model.user_tower.empty.copy_(bare.empty)
        bare.log_tau.fill_(-0.7)
        model.similarity.log_tau.fill_(-0.7)
    freq = ExactItemFrequency(n)
    freq.update(target)
    rows = torch.arange(b)
    gen = torch.Generator()
    gen.set_state(bare.gen.get_state())  # the same uniform draws as the bare step's
    loss_bare = bare.step(rows)
    loss_fn = build_loss(
        RetrievalLossConfig(negatives=NegativeSamplerConfig(in_batch=True, uniform=u)),
        n,
        model.similarity,
    )
    obs = {"item_ids": torch.from_numpy(items[:b]), "mask": torch.from_numpy(mask[:b])}
    pos = torch.from_numpy(target[:b])
    with torch.no_grad():
        ours = loss_fn(
            model.user_vectors(obs), pos, model.item_vectors(pos),
            encode_items=model.item_tower, generator=gen, frequency=freq,
            user_positive_ids=torch.from_numpy(user_pos[:b]),
        )  # fmt: skip
    assert loss_bare == pytest.approx(float(ours), rel=1e-5)


def test_a_failing_section_keeps_what_was_measured_before(tmp_path, monkeypatch):
    import benchmarks.perf as perf

    def broken(*args, **kwargs):
        raise RuntimeError("index section broke")

    monkeypatch.setattr(perf, "_index_section", broken)
    cfg = replace(PerfConfig.quick(), **TINY)
    out = run_experiment(
        REGISTRY.get("perf"), cfg, out_root=tmp_path, seeds=(0,), quick=True,
        command="python -m benchmarks perf (tiny, broken)", threads=1, quiet=True,
    )  # fmt: skip
    assert not out.ok
    res = json.loads((tmp_path / "perf" / RESULTS_FILE).read_text())
    assert res["status"] == "error" and "index section broke" in res["error"]
    assert "training" in res["results"]  # the training section's figures were kept
    md = (tmp_path / "perf" / REPORT_FILE).read_text()
    assert "Training throughput" in md
