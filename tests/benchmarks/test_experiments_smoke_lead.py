"""Smoke runs of the lead experiments (losses, consistency, loop, perf-env) in-process, each
with tiny config overrides on the quick world (a few seconds each).

Each run must write report.md, results.json (strict JSON: no NaN/Infinity tokens) and its
figures, record no error, and record findings whose verdicts agree with their effects (and
the sanity checks the configuration implies); then a few numbers each experiment promises are
checked (rows it must hold, ratios it must compute).
Budgets: 0.2 logged episodes per user, one epoch, one distillation loss, a handful of online
users, two loop rounds, a few timed env steps.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks.registry import REGISTRY, make_config
from benchmarks.runner import run_experiment
from tests.benchmarks.findings_check import check_findings

# experiment -> --set overrides (as text, parsed like the CLI does)
OFFLINE = dict(episodes_per_user="0.2", epochs="1", batch_size="512")
SMOKE = {
    "losses": {**OFFLINE, "dim": "8"},
    "consistency": {
        "log_scale": "0.07", "ranker_slates": "400", "epochs": "1", "batch_size": "512",
        "max_examples_per_epoch": "2048", "losses": "kl", "weights": "1.0", "teacher_queries": "200",
        "valid_users": "12", "test_users": "16", "ks": "50,100", "select_k": "50", "map_ks": "50",
        "noise_levels": "2.0", "map_weights": "1.0", "quotas": "20,20,10,10",
    },
    "loop": {
        "rounds": "2", "users_per_round": "30", "quota": "50", "ranker_epochs": "1",
        "generator_epochs": "1", "teacher_queries": "100", "explore_quota": "5",
    },
    "ranker": {
        "log_scale": "0.07", "max_slates_per_epoch": "400", "valid_users": "12", "test_users": "16",
        "generator_epochs": "1", "volumes": "1.0",
        "variants": "log: + own closed-loop log,improved + a second self-logging round",
    },
    "perf-env": {
        "n_items": "2000", "batch": "200", "sync_batch": "4", "steps": "3", "sync_steps": "2",
        "repeats": "1", "scaling_batches": "10,100", "build_items": "1000", "build_users": "1000",
        "build_repeats": "1",
    },
}  # fmt: skip
N_FINDINGS = {"losses": 5, "perf-env": 3, "consistency": 12, "loop": 8, "ranker": 4}
N_SANITY = {"losses": 0, "perf-env": 1, "consistency": 1, "loop": 1, "ranker": 1}
ROW_COLUMNS = ("world", "policy", "model", "seeds", "wall_s")


@pytest.fixture(scope="module", autouse=True)
def _registered():
    REGISTRY.load(
        [f"benchmarks.{m}" for m in ("losses", "consistency", "loop", "ranker", "perf_env")]
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _strict_json(text: str) -> dict:
    def reject(token: str) -> float:
        raise AssertionError(f"results.json holds a non-standard token {token}")

    return json.loads(text, parse_constant=reject)


def _run(name, tmp_path):
    exp = REGISTRY.get(name)
    cfg = make_config(exp.config_cls, quick=True, overrides=SMOKE[name])
    out = run_experiment(
        exp, cfg, out_root=tmp_path, seeds=(0,), quick=True,
        command=f"python -m benchmarks {name} --quick (smoke test)", overrides=SMOKE[name],
        threads=1, quiet=True,
    )  # fmt: skip
    folder = tmp_path / name
    report = (folder / "report.md").read_text(encoding="utf-8")
    doc = _strict_json((folder / "results.json").read_text(encoding="utf-8"))
    assert out.ok, doc.get("error")
    assert doc["status"] == "ok" and doc["error"] is None
    assert doc["experiment"] == name and doc["profile"] == "quick" and doc["seeds"] == [0]
    assert doc["overrides"] == SMOKE[name]
    assert (tmp_path / "index.md").exists()
    # findings: present, verdicts recomputed from their effects, Markdown consistent
    check_findings(doc, report, N_FINDINGS[name], N_SANITY[name])
    assert out.verdicts == doc["findings_summary"]
    assert out.n_pass == doc["sanity_summary"]["passed"]
    assert out.n_fail == doc["sanity_summary"]["failed"]
    # figures: every recorded PNG exists and is embedded
    assert doc["figures"]
    for fig in doc["figures"]:
        assert (folder / fig["file"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({fig['file']})" in report
    assert doc["headline"] and not doc["headline"].startswith("ERROR")
    return doc, report


def _seed_tables(doc):
    for table in doc["tables"]:
        for col in ROW_COLUMNS:
            assert col in table["columns"], (table["title"], col)
        for row in table["rows"]:
            assert row["seeds"] == "0" and row["wall_s"]["mean"] >= 0
    return [{r["model"]: r for r in t["rows"]} for t in doc["tables"]]


def test_losses(tmp_path):
    doc, _ = _run("losses", tmp_path)
    (rows,) = _seed_tables(doc)
    assert len(rows) == 11 and len(doc["results"]["rows"]) == 11
    for name in ("impression BCE", "BCE (mixed neg.)", "BPR (mixed neg.)", "full softmax",
                 "softmax in-batch (logQ3)", "softmax mixed (logQ derived)"):  # fmt: skip
        assert name in rows
    for r in rows.values():
        assert 0 <= r["recall@10"]["mean"] <= r["recall@100"]["mean"] <= 1
        assert r["tau"]["mean"] > 0


def test_consistency(tmp_path):
    doc, report = _run("consistency", tmp_path)
    offline, online = _seed_tables({"tables": doc["tables"][:2]})
    assert list(offline) == ["positives only", "distilled kl, lambda=1"]
    for r in offline.values():
        rrr = [r[f"rrr@{k}"]["mean"] for k in (50, 100)]
        assert rrr == sorted(rrr) and 0 <= rrr[0] and rrr[-1] <= 1  # nested top-K lists
    for r in online.values():
        assert r["reward"]["users"]["n"] == 16
    titles = [t["title"] for t in doc["tables"]]
    for part in (
        "The thesis",
        "Regime map",
        "Multiple sources: each source",
        "Multiple sources: reward",
    ):
        assert any(t.startswith(part) for t in titles), part
    thesis = next(t for t in doc["tables"] if t["title"].startswith("The thesis"))
    assert [r["K"] for r in thesis["rows"]] == [50, 100]
    shares = next(t for t in doc["tables"] if t["title"].startswith("Multiple sources: each"))
    for r in shares["rows"]:
        assert (
            0 <= r["exclusive share (offline)"] <= r["share of the ranker's top-10 (offline)"] <= 1
        )
    assert len(doc["results"]["regime_map"]) == 2  # (the ranker, sigma 2) x K=50 x lambda=1


def test_loop(tmp_path):
    doc, _ = _run("loop", tmp_path)
    table = doc["tables"][0]
    _seed_tables({"tables": [table]})
    keys = [(r["policy"], r["model"]) for r in table["rows"]]
    policies = sorted({p for p, _ in keys})
    assert len(policies) == 3
    assert sorted(keys) == sorted((p, f"round {i}") for p in policies for i in range(3))
    for r in table["rows"]:
        assert r["reward"]["users"]["n"] == 30
        leak = r["leakage@100"]["mean"]
        # the random start has no generator; every retrained round has one
        assert (leak is None) if r["model"] == "round 0" else 0 <= leak <= 1
        assert 0 <= r["gini"]["mean"] <= 1


def test_ranker(tmp_path):
    doc, _ = _run("ranker", tmp_path)
    variants = next(t for t in doc["tables"] if t["title"].startswith("Single-stage reward"))
    _seed_tables({"tables": [variants]})
    names = [r["model"] for r in variants["rows"]]
    assert names == [
        "current recipe",
        "log: + own closed-loop log",
        "improved recipe",
        "improved + a second self-logging round",
    ]
    policy = {r["model"]: r["policy"] for r in variants["rows"]}
    assert policy["improved + a second self-logging round"].endswith("+ own log + own log")
    assert policy["improved recipe"].endswith(")" + " + own log")
    diag = next(t for t in doc["tables"] if t["title"].startswith("Diagnosis"))
    assert [r["variant"] for r in diag["rows"]] == names[1:]
    against = [r["against"] for r in diag["rows"]]
    assert against == ["current recipe", "current recipe", "improved recipe"]
    probed = next(t for t in doc["tables"] if t["title"].startswith("Where the served items sit"))
    by = {r["model"]: r for r in probed["rows"]}
    assert set(by) == {"oracle-utility", "oracle-expected-reward", "current recipe",
                       "improved recipe", "improved + a second self-logging round"}  # fmt: skip
    assert by["oracle-utility"]["oracle_overlap"]["mean"] > 0.99
    for r in probed["rows"]:
        assert 0 <= r["percentile"]["mean"] <= 1 and 0 <= r["oracle_never_shown"]["mean"] <= 1
    second = next(f for f in doc["findings"] if f["text"].startswith("(b) exposure: improved +"))
    assert second["text"].endswith("over the improved recipe")
    assert second["metric"].endswith("(relative to the improved recipe)")
    shares = doc["results"]["oracle_share"]
    assert 0 < shares["current"][0] < 1 and 0 < shares["improved"][0] < 1


def test_perf_env(tmp_path):
    doc, report = _run("perf-env", tmp_path)
    res = doc["results"]
    fast, slow = res["batched_user_steps_per_s"], res["sync_user_steps_per_s"]
    assert len(fast) == len(slow) == 1 and min(fast + slow) > 0
    assert res["ratio"] == pytest.approx(np.median(fast) / np.median(slow))
    assert res["build"]["items"] == 1000 and res["build"]["users"] == 1000
    assert len(res["build"]["seconds"]) == len(res["build"]["peak_bytes"]) == 1
    assert min(res["build"]["seconds"]) > 0 and min(res["build"]["peak_bytes"]) > 0
    assert len(res["batched_user_steps_per_wall_s"]) == 1 and len(res["build"]["wall_seconds"]) == 1
    scaling = next(t for t in doc["tables"] if t["title"].startswith("Scaling"))
    assert [r["B"] for r in scaling["rows"]] == [10, 100]
    assert all(r["user_steps_per_s"] > 0 for r in scaling["rows"])
    assert "Building a big world" in report
