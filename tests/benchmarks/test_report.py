"""Report writer, statistics and seeding helpers of the benchmark suite."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from scipy import stats as sst

from benchmarks.provenance import Provenance, collect_provenance, git_info, package_versions
from benchmarks.registry import ExperimentConfig, param
from benchmarks.report import Report, RunInfo, atomic_write, to_jsonable, write_index
from benchmarks.runner import derive_rng, derive_seed, seed_sequence
from benchmarks.stats import (
    aggregate_over_seeds,
    bootstrap_ci,
    mean_std,
    online_summary,
    paired_effect,
    paired_ratio,
    ratio_effect,
    side_by_side,
    t_interval,
)

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"  # regenerate golden files deliberately

# Provenance fields that change from run to run; masked when comparing real runs.
VOLATILE = {"started_at", "wall_time_s", "timings_s", "versions", "git", "machine", "argv"}


@dataclass(frozen=True)
class GoldenConfig(ExperimentConfig):
    """Config of the fixed report."""

    n_users: int = param(100, "users per seed")
    temperature: float = param(0.5, "softmax temperature")
    towers: tuple[str, ...] = param(("mean", "transformer"), "user towers compared")


FIXED = Provenance(
    command="python -m benchmarks golden --quick --seeds 2 --set n_users=100",
    argv=("benchmarks/__main__.py", "golden", "--quick", "--seeds", "2"),
    started_at="2026-01-01T00:00:00Z",
    git={"commit": "0123456789abcdef", "dirty": False},
    versions={"python": "3.11.0", "numpy": "2.0.0"},
    machine={"cpu_count": 2, "platform": "Linux"},
    threads=1,
)

PER_SEED = [  # one row per (setting, seed); exact binary fractions keep the golden stable
    {"world": "tiny", "policy": "random", "model": "mean", "seed": 0, "recall": 0.5, "wall_s": 1.0},
    {
        "world": "tiny",
        "policy": "random",
        "model": "mean",
        "seed": 1,
        "recall": 0.25,
        "wall_s": 2.0,
    },
    {"world": "tiny", "policy": "random", "model": "tf", "seed": 1, "recall": 0.75, "wall_s": 4.0},
    {"world": "tiny", "policy": "random", "model": "tf", "seed": 0, "recall": 0.625, "wall_s": 3.0},
]


def build_report(out_dir: Path, provenance: Provenance = FIXED) -> Report:
    info = RunInfo(
        "golden",
        "A fixed report that pins the Markdown and JSON layout.",
        GoldenConfig(),
        (0, 1),
        True,
        {"n_users": "100"},
    )
    r = Report(info, out_dir, provenance)
    r.section("Method", "Two towers on a tiny world; recall@10 over the whole catalog.")
    r.seed_table("Recall@10", PER_SEED, ["recall"], fmt={"recall": ".3f", "wall_s": ".2f"})
    r.table(
        "Odd cells",
        [{"op": "dot | cos", "value": 1.5, "missing": None, "bad": float("nan"), "n": 3}],
        fmt=".2f",
    )
    per_seed = {r["model"]: {} for r in PER_SEED}
    for row in PER_SEED:
        per_seed[row["model"]][row["seed"]] = row["recall"]
    r.finding(  # paired by seed: seed s trains both towers on the same log
        "the transformer tower beats mean pooling on recall@10 by at least 0.05",
        paired_effect(
            [per_seed["tf"][s] for s in (0, 1)], [per_seed["mean"][s] for s in (0, 1)], unit="seeds"
        ),
        metric="recall@10",
        min_effect=0.05,
    )
    r.finding(
        "the treatment earns at least 0.1 more reward per user",
        paired_effect([1.0, 1.5, 2.0, 2.5], [0.5, 1.25, 1.5, 2.25]),
        metric="reward per user",
        min_effect=0.1,
        note="four users, exact binary fractions",
    )
    r.finding(
        "the index is at least 100x faster than brute force",
        ratio_effect([2.0, 4.0, 3.25], [1.0, 2.0, 1.5], bar=100.0),
        metric="queries per second",
    )
    r.sanity("the ratio is above one", np.bool_(paired_ratio([2, 4], [1, 2]).ratio > 1), "2.0×")
    fig = Figure(figsize=(2, 2))
    fig.add_subplot().bar(["mean", "tf"], [0.375, 0.6875])
    r.figure(
        "recall", fig, "Recall by tower", data={"tower": ["mean", "tf"], "recall": [0.375, 0.6875]}
    )
    r.add_result("spread", mean_std([1.0, 2.0]))
    r.add_result("count", np.int64(3))
    r.add_result("curve", np.arange(3, dtype=np.float32) / 2)
    r.add_result("diverged", float("inf"))
    r.headline("transformer recall@10 0.688 vs mean pooling 0.375")
    return r


def mask(doc):
    """Replace volatile provenance values by a marker, keeping the structure."""
    return {k: ("<masked>" if k in VOLATILE else v) for k, v in doc.items()}


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8"), f"differs from {path}; see the diff"


# ------------------------------------------------------------------------- golden files


def test_markdown_matches_golden(tmp_path):
    r = build_report(tmp_path)
    check_golden("report_small.md", r.render_markdown(12.5, {"train": 3.25}))


def test_results_json_matches_golden(tmp_path):
    r = build_report(tmp_path)
    path = r.write(12.5, {"train": 3.25})
    assert path == tmp_path / "report.md"
    text = (tmp_path / "results.json").read_text(encoding="utf-8")
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    check_golden("results_small.json", json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    assert (tmp_path / "report.md").read_text(encoding="utf-8") == (
        GOLDEN / "report_small.md"
    ).read_text(encoding="utf-8")
    assert (tmp_path / "recall.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_json_structure_with_real_provenance(tmp_path):
    real = collect_provenance(FIXED.command, threads=1)
    build_report(tmp_path, real).write(0.75)
    doc = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    golden = json.loads((GOLDEN / "results_small.json").read_text(encoding="utf-8"))
    assert mask(doc) == mask(golden)
    assert set(doc["versions"]) >= {"python", "numpy", "torch", "gymnasium", "faiss", "scipy"}
    assert set(doc["git"]) == {"commit", "dirty"}
    assert doc["machine"]["cpu_count"] == os.cpu_count()
    assert "hostname" not in json.dumps(doc["machine"]).lower()
    assert doc["wall_time_s"] == 0.75


def test_golden_content_is_computed_from_numbers(tmp_path):
    doc = build_report(tmp_path).to_json(12.5)
    recall = doc["tables"][0]["rows"]
    # mean pooling: seeds (0.5, 0.25); transformer: seeds sorted to (0.625, 0.75).
    assert recall[0]["recall"]["values"] == [0.5, 0.25]
    assert recall[0]["recall"]["mean"] == 0.375
    assert recall[0]["recall"]["std"] == pytest.approx(math.sqrt(0.03125))
    assert recall[1]["recall"]["values"] == [0.625, 0.75]
    assert recall[1]["seeds"] == "0,1"
    verdicts = [f["verdict"] for f in doc["findings"]]
    assert verdicts == ["INCONCLUSIVE", "HOLDS", "REFUTED"]
    assert doc["findings_summary"] == {"HOLDS": 1, "REFUTED": 1, "INCONCLUSIVE": 1}
    assert doc["sanity_summary"] == {"passed": 1, "failed": 0}
    assert "claims" not in doc and "claims_summary" not in doc  # schema 3: no PASS/FAIL claims
    assert doc["schema"] == 3
    # paired over seeds: differences 0.125 and 0.5; over users: 0.5, 0.25, 0.5, 0.25
    assert doc["findings"][0]["effect"]["estimate"] == 0.3125
    assert doc["findings"][1]["effect"]["estimate"] == 0.375
    assert doc["non_finite"] == ["$.tables[1].rows[0].bad", "$.results.diverged"]
    assert doc["results"]["diverged"] is None
    assert doc["results"]["curve"] == [0.0, 0.5, 1.0]
    assert doc["results"]["spread"] == {
        "mean": 1.5,
        "std": math.sqrt(0.5),
        "n": 2,
        "values": [1.0, 2.0],
    }


# ------------------------------------------------------------------------- verdict lines


def test_refuted_finding_and_failed_sanity_check_render_with_numbers(tmp_path):
    r = Report(RunInfo("x", "d", GoldenConfig(), (0,), True), tmp_path, FIXED)
    assert r.headline_text() == "(no headline)"
    # per-user differences all negative: the claimed gain is refuted
    f = r.finding(
        "recall beats popular",
        paired_effect([0.25, 0.5, 0.25, 0.5], [0.5, 0.75, 0.5, 0.625]),
        metric="recall",
    )
    assert f.verdict == "REFUTED"
    c = r.sanity("oracle beats random", bool(0.2125 > 0.3), "0.2125 vs 0.3")
    assert not c.passed
    md = r.render_markdown(1.0)
    assert "## Findings (0 HOLDS, 1 REFUTED, 0 INCONCLUSIVE)" in md
    assert f"- **REFUTED** — recall beats popular — recall: {f.evidence()}" in md
    assert "means 0.375 vs 0.594" in f.evidence()
    assert "## Sanity checks (0 passed, 1 failed)" in md
    assert "- **FAILED** — oracle beats random — 0.2125 vs 0.3" in md
    assert "claims" not in md.lower() and "PASS" not in md  # no PASS/FAIL bare comparisons
    assert r.headline_text() == "0 HOLDS, 1 REFUTED, 0 INCONCLUSIVE of 1 findings"
    counts = r.verdict_counts()
    assert counts["REFUTED"] == 1 and counts["sanity_failed"] == 1


def test_bare_comparison_api_is_gone():
    # Verdicts come from an interval (finding) or a design guarantee (sanity), never from
    # comparing two bare means.
    for name in ("claim", "claim_compare", "claims"):
        assert not hasattr(Report, name), name
    import benchmarks.report as report_module

    assert not hasattr(report_module, "Claim")


def test_finding_and_sanity_reject_bad_input(tmp_path):
    r = Report(RunInfo("x", "d", GoldenConfig(), (0,), True), tmp_path, FIXED)
    with pytest.raises(ValueError, match="passed must be a bool"):
        r.sanity("c", 1, "e")
    with pytest.raises(ValueError, match="effect must be a benchmarks.stats.Effect"):
        r.finding("c", 0.5, metric="m")
    eff = paired_effect([1.0, 2.0], [0.5, 1.0])
    with pytest.raises(ValueError, match="direction must be one of"):
        r.finding("c", eff, metric="m", direction="==")
    with pytest.raises(ValueError, match="min_effect must be a number >= 0"):
        r.finding("c", eff, metric="m", min_effect=-0.1)
    assert r.findings == [] and r.sanity_checks == []


def test_error_is_recorded_and_headlined(tmp_path):
    r = Report(RunInfo("x", "d", GoldenConfig(), (0,), True), tmp_path, FIXED)
    r.section("Before", "kept")
    r.record_error("Traceback (most recent call last):\nRuntimeError: boom")
    r.write(0.5)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["status"] == "error"
    assert doc["headline"] == "ERROR: RuntimeError: boom"
    md = (tmp_path / "report.md").read_text()
    assert "## Error" in md and "RuntimeError: boom" in md and "## Before" in md


# ------------------------------------------------------------------------- inputs


def test_table_and_figure_and_result_validation(tmp_path):
    r = Report(RunInfo("x", "d", GoldenConfig(), (0,), True), tmp_path, FIXED)
    with pytest.raises(ValueError, match="rows must not be empty"):
        r.table("t", [])
    with pytest.raises(ValueError, match=r"columns \['nope'\] appear in no row"):
        r.table("t", [{"a": 1}], columns=["a", "nope"])
    with pytest.raises(ValueError, match="figure name must match"):
        r.figure("../evil", Figure(), "c")
    r.figure("ok", Figure(figsize=(1, 1)), "c")
    with pytest.raises(ValueError, match="already used"):
        r.figure("ok.png", Figure(figsize=(1, 1)), "c")
    r.add_result("k", 1)
    with pytest.raises(ValueError, match="already set"):
        r.add_result("k", 2)
    with pytest.raises(ValueError, match=r"\$\.results\.obj: value of type object"):
        r.add_result("obj", object())
    with pytest.raises(ValueError, match="rows\\[1\\] lacks column"):
        r.seed_table("s", [PER_SEED[0], {"world": "w"}], ["recall"])


def test_to_jsonable_converts_numpy_and_marks_non_finite():
    nf: list[str] = []
    out = to_jsonable(
        {
            "a": np.float32(0.5),
            "b": np.array([1.0, np.nan, -np.inf]),
            "c": (np.int64(2), np.bool_(False)),
            3: Path("x/y"),
        },
        "$",
        nf,
    )
    assert out == {"a": 0.5, "b": [1.0, None, None], "c": [2, False], "3": "x/y"}
    assert nf == ["$.b[1]", "$.b[2]"]
    json.dumps(out, allow_nan=False)
    assert type(out["a"]) is float and type(out["c"][0]) is int and type(out["c"][1]) is bool


def test_figure_png_is_deterministic(tmp_path):
    def draw(out):
        r = Report(RunInfo("x", "d", GoldenConfig(), (0,), True), out, FIXED)
        fig = Figure(figsize=(2, 2))
        fig.add_subplot().plot([0, 1, 2], [0.1, 0.5, 0.2])
        return r.figure("line", fig, "c").read_bytes()

    assert draw(tmp_path / "a") == draw(tmp_path / "b")


# ------------------------------------------------------------------------- atomic writes


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    atomic_write(target, "old\n")

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)  # simenv.atomic does the fsync
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, "new content that must not appear\n")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temp left

    fresh = tmp_path / "sub" / "report.md"
    with pytest.raises(OSError):
        atomic_write(fresh, "x")
    assert not fresh.exists() and list(fresh.parent.iterdir()) == []


def test_report_write_renders_before_writing(tmp_path, monkeypatch):
    r = build_report(tmp_path)
    r.write(1.0)
    before = {p: p.read_bytes() for p in (tmp_path / "report.md", tmp_path / "results.json")}

    def broken_render(*args, **kwargs):
        raise RuntimeError("render failed")

    monkeypatch.setattr(r, "render_markdown", broken_render)
    with pytest.raises(RuntimeError, match="render failed"):
        r.write(2.0)
    assert {p: p.read_bytes() for p in before} == before  # neither file touched
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------- index


def _results(dir_: Path, name: str, **doc) -> None:
    (dir_ / name).mkdir(parents=True, exist_ok=True)
    (dir_ / name / "results.json").write_text(json.dumps({"experiment": name, **doc}))


def test_index_lists_every_experiment_in_order(tmp_path):
    _results(
        tmp_path,
        "zeta",
        status="ok",
        headline="recall 0.41",
        findings_summary={"HOLDS": 2, "REFUTED": 1, "INCONCLUSIVE": 0},
        sanity_summary={"passed": 3, "failed": 1},
        seeds=[0, 1, 2],
        profile="full",
        wall_time_s=3.0,
    )
    _results(
        tmp_path, "alpha", status="error", headline="ERROR: boom | x", profile="full", seeds=[0, 1]
    )
    _results(tmp_path, "mid", status="ok", headline="h", seeds=[0], profile="quick")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{not json")
    path = write_index(tmp_path, order=["zeta", "alpha"])
    text = path.read_text()
    lines = text.splitlines()
    rows = [ln for ln in lines if ln.startswith("| [")]
    assert rows == [
        "| [zeta](zeta/report.md) | recall 0.41 | 2 HOLDS / 1 REFUTED / 0 INCONCLUSIVE "
        "| 3 passed / 1 failed | 0,1,2 | full | 3.00 s |",
        "| [alpha](alpha/report.md) | ERROR: boom \\| x | ERROR | — | 0,1 | full | — |",
        "| [broken](broken/report.md) | unreadable results.json | — | — | — | — | — |",
        "| [mid](mid/report.md) | h | no findings | — | 0 | quick (indicative) | — |",
    ]
    # one quick, one-seed report among full ones: the index marks its verdicts as indicative
    assert "Rows marked (indicative) ran the quick profile or one seed" in text
    assert "In all: 2 HOLDS, 1 REFUTED, 0 INCONCLUSIVE; sanity checks 3 passed, 1 failed." in text
    _results(tmp_path, "mid", status="ok", headline="h", seeds=[0, 1, 2], profile="full")
    assert "indicative" not in write_index(tmp_path).read_text()
    # only quick one-seed reports (make demo): said plainly
    quick = tmp_path / "quick"
    _results(quick, "a", status="ok", headline="h", seeds=[0], profile="quick")
    text = write_index(quick).read_text()
    assert "**Quick profile, one seed: verdicts are indicative.**" in text


def test_index_reads_results_of_older_schemas(tmp_path):
    # schema 2 wrote PASS/FAIL "claims" beside the findings; older files had only claims.
    # Neither crashes the index, and those claims are neither counted nor shown.
    _results(
        tmp_path,
        "two",
        schema=2,
        status="ok",
        headline="h2",
        findings_summary={"HOLDS": 1, "REFUTED": 0, "INCONCLUSIVE": 2},
        sanity_summary={"passed": 1, "failed": 0},
        claims_summary={"pass": 3, "fail": 1},
        claims=[{"text": "a beats b", "verdict": "PASS", "passed": True, "evidence": "e"}],
        seeds=[0, 1, 2],
        profile="full",
        wall_time_s=1.0,
    )
    _results(
        tmp_path,
        "one",
        schema=1,
        status="ok",
        headline="h1",
        claims_summary={"pass": 2, "fail": 0},
        seeds=[0, 1, 2],
        profile="full",
    )
    text = write_index(tmp_path, order=["two", "one"]).read_text()
    rows = [ln for ln in text.splitlines() if ln.startswith("| [")]
    assert rows == [
        "| [two](two/report.md) | h2 | 1 HOLDS / 0 REFUTED / 2 INCONCLUSIVE "
        "| 1 passed / 0 failed | 0,1,2 | full | 1.00 s |",
        "| [one](one/report.md) | h1 | no findings | — | 0,1,2 | full | — |",
    ]
    assert "claims" not in text.lower() and "PASS" not in text
    assert "In all: 1 HOLDS, 0 REFUTED, 2 INCONCLUSIVE; sanity checks 1 passed, 0 failed." in text


def test_index_without_reports(tmp_path):
    assert "No reports yet." in write_index(tmp_path / "new").read_text()


# ------------------------------------------------------------------------- statistics


def test_mean_std_exact():
    s = mean_std([1.0, 2.0, 4.0])
    assert s.mean == pytest.approx(7 / 3)
    assert s.std == pytest.approx(
        math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    )
    assert s.n == 3 and s.values == (1.0, 2.0, 4.0)
    assert s.format(".2f") == "2.33 ± 1.53"
    one = mean_std([0.5])
    assert one.std is None and one.format(".2f") == "0.50 (n=1)"
    with pytest.raises(ValueError, match="at least one value"):
        mean_std([])


def test_t_interval_matches_scipy():
    x = np.random.default_rng(3).normal(2.0, 1.5, size=7)
    ci = t_interval(x)
    lo, hi = sst.t.interval(0.95, df=6, loc=x.mean(), scale=sst.sem(x))
    assert (ci.low, ci.high) == (pytest.approx(lo, rel=1e-12), pytest.approx(hi, rel=1e-12))
    ci90 = t_interval(x, level=0.9)
    assert ci90.half_width < ci.half_width
    single = t_interval([1.0])
    assert single.low is None and single.format() == "1 (n=1)"
    with pytest.raises(ValueError, match=r"level must be in \(0, 1\)"):
        t_interval(x, level=1.0)


def test_bootstrap_ci_is_seeded_and_close_to_t():
    x = np.random.default_rng(0).exponential(1.0, size=400)
    a = bootstrap_ci(x, np.random.default_rng(7), n_resamples=2000)
    b = bootstrap_ci(x, np.random.default_rng(7), n_resamples=2000, chunk_elements=1000)
    c = bootstrap_ci(x, np.random.default_rng(8), n_resamples=2000)
    assert a.low is not None and a.high is not None and a.method == "bootstrap"
    assert (a.low, a.high) != (c.low, c.high)  # a different seed resamples differently
    assert bootstrap_ci(x, np.random.default_rng(7)) == a  # same seed, same interval
    assert b.low == pytest.approx(a.low, abs=0.03)  # chunking changes draws, not the answer
    t = t_interval(x)
    assert a.half_width == pytest.approx(t.half_width, rel=0.15)
    assert a.low < x.mean() < a.high
    with pytest.raises(ValueError, match="numpy.random.Generator"):
        bootstrap_ci(x, 7)


def test_online_summary_over_users_and_seeds():
    seeds = [np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 4.0, 6.0, 8.0])]
    s = online_summary(seeds)
    assert s.mean == pytest.approx((2.5 + 5.0) / 2)
    pooled = np.concatenate(seeds)
    hw_users = sst.t.ppf(0.975, 7) * pooled.std(ddof=1) / math.sqrt(8)
    assert s.users.half_width == pytest.approx(hw_users)
    hw_seeds = sst.t.ppf(0.975, 1) * np.std([2.5, 5.0], ddof=1) / math.sqrt(2)
    assert s.seeds.half_width == pytest.approx(hw_seeds)
    assert [ci.mean for ci in s.per_seed] == [2.5, 5.0]
    assert s.format(".3g") == f"3.75 (95% CI ±{hw_users:.3g} users, ±{hw_seeds:.3g} seeds)"
    assert online_summary([seeds[0]]).format(".3g").endswith(", 1 seed)")


def test_paired_ratio_and_side_by_side():
    r = paired_ratio([2.0, 8.0], [1.0, 2.0])
    assert r.ratio == pytest.approx(math.sqrt(2 * 4))  # geometric mean of 2 and 4
    logs = np.log([2.0, 4.0])
    hw = sst.t.ppf(0.975, 1) * logs.std(ddof=1) / math.sqrt(2)
    assert r.low == pytest.approx(math.exp(logs.mean() - hw))
    assert r.high == pytest.approx(math.exp(logs.mean() + hw))
    assert paired_ratio([3.0], [1.5]).format() == "2× (n=1)"
    with pytest.raises(ValueError, match="must be > 0"):
        paired_ratio([1.0, 0.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="must pair up"):
        paired_ratio([1.0], [1.0, 2.0])
    line = side_by_side("faiss", [4.0, 4.0], "torch", [1.0, 1.0], unit="ms")
    assert line == "faiss: 4 ± 0 ms | torch: 1 ± 0 ms | torch/faiss = 0.25× [0.25, 0.25]"


def test_aggregate_over_seeds_groups_and_checks():
    rows = aggregate_over_seeds(PER_SEED, by=["model"], metrics=["recall"])
    assert [r["model"] for r in rows] == ["mean", "tf"]
    assert rows[1]["recall"].values == (0.625, 0.75)  # sorted by seed
    with pytest.raises(ValueError, match="repeats a seed"):
        aggregate_over_seeds(PER_SEED + [PER_SEED[0]], by=["model"], metrics=["recall"])


# ------------------------------------------------------------------------- seeding, provenance


def test_derived_rngs_are_stable_and_independent():
    a = derive_rng(0, "world").integers(0, 2**31, size=4)
    assert np.array_equal(a, derive_rng(0, "world").integers(0, 2**31, size=4))
    assert not np.array_equal(a, derive_rng(0, "users").integers(0, 2**31, size=4))
    assert not np.array_equal(a, derive_rng(1, "world").integers(0, 2**31, size=4))
    assert not np.array_equal(
        derive_rng(0, "world", 1).random(4), derive_rng(0, "world", 2).random(4)
    )
    # Golden: string keys hash with BLAKE2b, so every process and machine agrees.
    assert seed_sequence(0, "world").spawn_key == (6355075502240600847,)
    assert 0 <= derive_seed(5, "torch") < 2**63
    assert derive_seed(5, "torch") == derive_seed(5, "torch") != derive_seed(6, "torch")
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        derive_rng(-1)
    with pytest.raises(ValueError, match="rng keys must be"):
        derive_rng(0, 1.5)


def test_provenance_outside_git(tmp_path):
    assert git_info(tmp_path) == {"commit": "unknown", "dirty": None}
    v = package_versions()
    assert v["numpy"] == np.__version__


def test_seed_table_online_columns(tmp_path):
    r = Report(RunInfo("x", "d", GoldenConfig(), (0, 1), False), tmp_path, FIXED)
    users = {0: np.array([1.0, 2.0, 3.0]), 1: np.array([2.0, 2.5, 4.5])}
    rows = [
        {"world": "w", "policy": "p", "model": "m", "seed": s, "reward": u, "hit": 0.5, "wall_s": 1}
        for s, u in users.items()
    ]
    out = r.seed_table("Online", rows, ["hit"], online=["reward"], fmt=".3g")
    expected = online_summary([users[0], users[1]])
    assert out[0]["reward"] == expected
    doc = r.to_json(1.0)
    table = doc["tables"][0]
    assert table["columns"] == ["world", "policy", "model", "seeds", "reward", "hit", "wall_s"]
    cell = table["rows"][0]["reward"]
    assert cell["mean"] == pytest.approx(2.5)
    assert cell["seeds"]["n"] == 2 and cell["users"]["n"] == 6
    md = r.render_markdown(1.0)
    assert f"| w | p | m | 0,1 | {expected.format('.3g')} | 0.5 ± 0 | 1 ± 0 |" in md
    assert "95% CI half-widths over users and over seeds" in md
