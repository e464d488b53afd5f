"""Smoke runs of the offline retrieval experiments (folding, similarity, dimension, item-towers,
user-towers, baselines) in-process, each with a tiny budget on the quick world.

Each run must write report.md, results.json (strict JSON: no NaN/Infinity tokens), its
figures and the index, record no error, and record findings whose verdicts agree with their
effects (and the sanity checks the configuration implies). Budgets: 1 logged episode per
user (instead of 3), one epoch of a few batches, and only the variants the findings need.
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.registry import REGISTRY, make_config
from benchmarks.runner import run_experiment
from tests.benchmarks.findings_check import check_findings

# experiment -> --set overrides (as text, parsed like the CLI does)
TINY = dict(episodes_per_user="1", epochs="1", batch_size="256", max_examples_per_epoch="1024")
SMOKE = {
    "folding": {**TINY, "variants": "impression BCE,softmax uniform"},
    "similarity": {
        **TINY,
        "temperatures": "0.1,1.0",
        "variants": "dot,cosine (tau=1),cosine (learnable tau)",
    },
    "dimension": {**TINY, "dims": "2,32"},
    "item-towers": {**TINY, "variants": "ID,features,hybrid (ID + bag of words + features)"},
    "user-towers": {
        **TINY,
        "dim": "16",
        "causal_batch_size": "32",
        "variants": "mean,transformer causal last-token (all positions)",
    },
    "baselines": {
        **TINY,
        "variants": "top popular,top popular (window),item2item,two-tower",
    },
}
# experiment -> (findings, sanity checks) the smoke configuration records
EXPECTED = {
    "folding": (1, 0),  # impression BCE vs uniform leakage (the only pair run)
    "similarity": (5, 0),  # dot rho, cosine rho, tau=1, learnable vs best fixed, cosine vs dot
    "dimension": (1, 0),  # d=2 vs d=32 (the first d past the true rank 21)
    "item-towers": (4, 1),  # features / hybrid cold, best content tail, hybrid head; params
    "user-towers": (1, 0),  # the best (only) transformer vs the mean
    "baselines": (4, 3),  # two-tower vs top / i2i, cold-start, window; zero by construction
}
ROW_COLUMNS = ("world", "policy", "model", "seeds", "wall_s")


@pytest.fixture(scope="module", autouse=True)
def _registered():
    REGISTRY.load([f"benchmarks.{m}" for m in ("folding", "similarity", "dimension")])
    REGISTRY.load(["benchmarks.item_towers", "benchmarks.user_towers", "benchmarks.baselines"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _strict_json(text: str) -> dict:
    def reject(token: str) -> float:
        raise AssertionError(f"results.json holds a non-standard token {token}")

    return json.loads(text, parse_constant=reject)


@pytest.mark.parametrize("name", list(SMOKE))
def test_experiment_runs_and_reports(name, tmp_path):
    exp = REGISTRY.get(name)
    cfg = make_config(exp.config_cls, quick=True, overrides=SMOKE[name])
    out = run_experiment(
        exp,
        cfg,
        out_root=tmp_path,
        seeds=(0,),
        quick=True,
        command=f"python -m benchmarks {name} --quick (smoke test)",
        overrides=SMOKE[name],
        threads=1,
        quiet=True,
    )
    folder = tmp_path / name
    report = (folder / "report.md").read_text(encoding="utf-8")
    doc = _strict_json((folder / "results.json").read_text(encoding="utf-8"))
    assert out.ok, doc.get("error")
    assert doc["status"] == "ok" and doc["error"] is None
    assert doc["experiment"] == name and doc["profile"] == "quick" and doc["seeds"] == [0]
    assert doc["overrides"] == SMOKE[name]
    assert (tmp_path / "index.md").exists()
    # findings: present, verdicts recomputed from their effects, Markdown consistent
    check_findings(doc, report, *EXPECTED[name])
    assert out.verdicts == doc["findings_summary"]
    assert out.n_pass == doc["sanity_summary"]["passed"]
    # the results table names world, policy, model, seeds and wall time on every row
    table = doc["tables"][0]
    assert table["rows"]
    for col in ROW_COLUMNS:
        assert col in table["columns"]
    models = {r["model"] for r in table["rows"]}
    assert len(models) == len(table["rows"])
    for row in table["rows"]:
        assert row["seeds"] == "0"
        assert row["wall_s"]["mean"] >= 0
    # figures: every recorded PNG exists and is embedded
    assert doc["figures"]
    for fig in doc["figures"]:
        png = folder / fig["file"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({fig['file']})" in report
    assert doc["headline"] and not doc["headline"].startswith("ERROR")


def test_bad_variant_names_are_rejected():
    exp = REGISTRY.get("folding")
    with pytest.raises(ValueError, match=r"variants \['no such loss'\] are not available"):
        make_config(exp.config_cls, quick=True, overrides={"variants": "no such loss"})
    exp = REGISTRY.get("dimension")
    with pytest.raises(ValueError, match="dims must be distinct"):
        make_config(exp.config_cls, quick=True, overrides={"dims": "8,8"})
