"""`python -m benchmarks.combine`: runs over disjoint seeds give the findings of one run."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from benchmarks.__main__ import main
from benchmarks.combine import CombineError, combine
from benchmarks.combine import main as combine_main
from benchmarks.registry import ExperimentConfig, Registry, param
from benchmarks.stats import one_sample_effect, paired_effect_over_seeds


@dataclass(frozen=True)
class PairsConfig(ExperimentConfig):
    """Config of the toy paired experiment."""

    n: int = param(400, "users per seed")

    @classmethod
    def quick(cls) -> PairsConfig:
        return replace(cls(), n=300)


def run_pairs(cfg: PairsConfig, ctx) -> None:
    rep = ctx.report
    ts, cs, rows = [], [], []
    for s in ctx.seeds:
        rng = ctx.rng(s, "pairs")
        c = rng.normal(10.0, 2.0, cfg.n)
        shift = 0.4 + 0.3 * rng.standard_normal()  # the seeds disagree, as real ones do
        ts.append(c + shift + rng.normal(0.0, 1.0, cfg.n))
        cs.append(c)
        rows.append({"world": f"w{s}", "policy": "p", "model": "m", "seed": s, "x": float(ts[-1].mean()), "wall_s": 0.0})  # fmt: skip
    rep.finding("T raises x by at least 1%", paired_effect_over_seeds(ts, cs, relative=True),
                metric="x per user (relative)", min_effect=0.01, note="same note")  # fmt: skip
    rep.finding("T lowers x", paired_effect_over_seeds(ts, cs), metric="x per user", direction="<")
    best = int(np.argmax([t.mean() for t in ts]))
    rep.finding(f"the best seed ({ctx.seeds[best]}) beats its control",
                paired_effect_over_seeds(ts[best:best + 1], cs[best:best + 1]), metric="x")  # fmt: skip
    rep.finding(
        "pooled x above 10", one_sample_effect(np.concatenate(ts), 10.0, unit="users"), metric="x"
    )
    rep.finding("seed means above 10", one_sample_effect([t.mean() for t in ts], 10.0), metric="x")
    rep.sanity("x is finite", bool(all(np.isfinite(t).all() for t in ts)), f"{len(ts)} seeds")
    rep.seed_table("X per seed", rows, ["x"])


def registry() -> Registry:
    reg = Registry()
    reg.register("pairs", "Toy paired draws.", PairsConfig, run_pairs)
    return reg


def run(out: Path, seeds: int, first: int, *extra: str) -> Path:
    args = ["pairs", "--quick", "--quiet", "--seeds", str(seeds), "--first-seed", str(first)]
    assert main([*args, "--out", str(out), *extra], registry=registry(), modules=[]) == 0
    return out / "pairs"


def doc(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


@pytest.mark.parametrize("split", [(2, 3), (1, 4)])
def test_runs_over_disjoint_seeds_give_the_single_runs_findings(tmp_path, split):
    whole = doc(run(tmp_path / "whole", 5, 0))
    a = run(tmp_path / "a", split[0], 0)
    b = run(tmp_path / "b", split[1], split[0])
    combine([b, a], tmp_path / "combined")  # order of the arguments does not matter
    got = doc(tmp_path / "combined" / "pairs")
    assert got["seeds"] == [0, 1, 2, 3, 4] and got["profile"] == "quick"
    want = {f["text"]: f for f in whole["findings"] if "per-seed effects" in f["effect"]["method"]}
    assert set(want) == {"T raises x by at least 1%", "T lowers x"}
    assert {f["text"] for f in got["findings"]} == set(want)
    for f in got["findings"]:
        w = want[f["text"]]
        assert f["verdict"] == w["verdict"] and f["note"] == w["note"]
        for key in ("estimate", "low", "high", "se", "treatment", "control", "mde"):
            assert f["effect"][key] == pytest.approx(w["effect"][key], rel=1e-9, abs=1e-12), key
        for key in ("n", "n_inner", "df", "method", "scale"):
            assert f["effect"][key] == w["effect"][key], key
        assert f["effect"]["per_seed"] == pytest.approx(w["effect"]["per_seed"], rel=1e-9)
    # the per-seed choice and the pooled one-sample finding are listed, not recomputed
    text = (tmp_path / "combined" / "pairs" / "report.md").read_text()
    assert "Findings not combined" in text and "pooled x above 10" in text
    assert "seed means above 10" in text
    assert got["sanity"][0]["passed"] is True
    table = next(t for t in got["tables"] if t["title"] == "X per seed")
    assert [int(r["seeds"]) for r in table["rows"]] == [0, 1, 2, 3, 4]
    assert "| [pairs](pairs/report.md)" in (tmp_path / "combined" / "index.md").read_text()


def test_the_verdict_is_judged_again_over_all_seeds(tmp_path):
    a, b = run(tmp_path / "a", 2, 0), run(tmp_path / "b", 3, 2)
    combine([a, b], tmp_path / "c")
    f = doc(tmp_path / "c" / "pairs")["findings"][0]
    per = np.array(
        doc(a)["findings"][0]["effect"]["per_seed"] + doc(b)["findings"][0]["effect"]["per_seed"]
    )
    half = 2.7764451051977987 * per.std(ddof=1) / np.sqrt(5)  # t_{0.975, 4}
    assert f["effect"]["low"] == pytest.approx(per.mean() - half, rel=1e-9)
    assert f["effect"]["high"] == pytest.approx(per.mean() + half, rel=1e-9)


def test_runs_that_cannot_combine_are_refused_with_the_reason(tmp_path, capsys):
    a, b = run(tmp_path / "a", 2, 0), run(tmp_path / "b", 2, 1)
    with pytest.raises(CombineError, match="seed 1 is in both"):
        combine([a, b], tmp_path / "c")
    other = run(tmp_path / "o", 2, 2, "--set", "n=100")
    with pytest.raises(CombineError, match="differs .* in config"):
        combine([a, other], tmp_path / "c")
    full = tmp_path / "f"
    assert main(["pairs", "--quiet", "--seeds", "1", "--first-seed", "5", "--out", str(full)],
                registry=registry(), modules=[]) == 0  # fmt: skip
    with pytest.raises(CombineError, match="in profile"):
        combine([a, full / "pairs"], tmp_path / "c")
    with pytest.raises(CombineError, match="at least two runs"):
        combine([a], tmp_path / "c")
    assert combine_main([str(a), str(tmp_path / "nothing"), "--out", str(tmp_path / "c")]) == 2
    assert "holds no results.json" in capsys.readouterr().err
    bad = json.loads((a / "results.json").read_text())
    bad["status"] = "error"
    (tmp_path / "err").mkdir()
    (tmp_path / "err" / "results.json").write_text(json.dumps(bad))
    with pytest.raises(CombineError, match="status 'error'"):
        combine([tmp_path / "err", other], tmp_path / "c")
    assert not (tmp_path / "c").exists()
