"""The verdict machinery: effects with intervals (checked against scipy) and three-way verdicts.

Calibration on synthetic data: A/A comparisons (no true effect) must give HOLDS or REFUTED in
at most 10% of cases for a claim with minimum effect 0 (nominal 5%), a planted effect must be
found, and the printed minimum detectable effect must be detected with about 80% power.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sst

from benchmarks.stats import (
    Effect,
    combine_seeds,
    one_sample_effect,
    paired_effect,
    paired_effect_over_seeds,
    paired_ratio,
    ratio_effect,
    unpaired_effect,
    verdict,
)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ------------------------------------------------------------------ intervals against scipy


def test_paired_t_matches_scipy_ttest_rel():
    rng = _rng(1)
    control = rng.normal(5.0, 2.0, 300)
    treatment = control + rng.normal(0.3, 1.0, 300)
    eff = paired_effect(treatment, control)
    ci = sst.ttest_rel(treatment, control).confidence_interval(0.95)
    assert eff.estimate == pytest.approx(float(np.mean(treatment - control)), rel=1e-12)
    assert (eff.low, eff.high) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert eff.n == 300 and eff.unit == "users" and eff.df == 299
    assert eff.treatment == pytest.approx(treatment.mean()) and eff.control == pytest.approx(
        control.mean()
    )


def test_one_sample_matches_scipy_ttest_1samp():
    x = _rng(2).normal(1.2, 0.5, 7)
    eff = one_sample_effect(x, 1.0, unit="seeds")
    ci = sst.ttest_1samp(x, 1.0).confidence_interval(0.95)
    assert (eff.low + 1.0, eff.high + 1.0) == pytest.approx((ci.low, ci.high), rel=1e-10)
    rel = one_sample_effect(x, 2.0, relative=True)
    assert rel.estimate == pytest.approx(x.mean() / 2.0 - 1.0)
    assert rel.high - rel.low == pytest.approx((eff.high - eff.low) / 2.0, rel=1e-10)


def test_welch_matches_scipy_ttest_ind():
    rng = _rng(3)
    a, b = rng.normal(1.0, 1.0, 40), rng.normal(0.5, 3.0, 90)
    eff = unpaired_effect(a, b)
    ci = sst.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (eff.low, eff.high) == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert "Welch" in eff.method and eff.n == 130


def test_ratio_effect_is_the_log_scale_t_interval():
    num, den = np.array([2.0, 4.1, 3.0, 2.6]), np.array([1.0, 2.0, 1.4, 1.3])
    eff = ratio_effect(num, den, bar=1.5)
    logs = np.log(num / den)
    ci = sst.ttest_1samp(logs, 0.0).confidence_interval(0.95)
    assert eff.estimate == pytest.approx(math.exp(logs.mean()))
    assert (eff.low, eff.high) == pytest.approx((math.exp(ci.low), math.exp(ci.high)))
    assert eff.estimate == pytest.approx(paired_ratio(num, den).ratio)
    assert eff.null == 1.5 and verdict(eff, ">") == "HOLDS"  # every ratio is about 2 > 1.5
    assert verdict(ratio_effect(num, den, bar=3.0), ">") == "REFUTED"


def test_relative_delta_method_agrees_with_the_bootstrap():
    rng = _rng(4)
    control = rng.gamma(2.0, 5.0, 3000)
    treatment = control * 1.05 + rng.normal(0.0, 2.0, 3000)
    t = paired_effect(treatment, control, relative=True)
    b = paired_effect(treatment, control, relative=True, method="bootstrap", rng=_rng(5))
    assert t.estimate == pytest.approx(treatment.mean() / control.mean() - 1.0)
    assert b.estimate == pytest.approx(t.estimate)
    assert t.low == pytest.approx(b.low, abs=0.15 * (t.high - t.low))
    assert t.high == pytest.approx(b.high, abs=0.15 * (t.high - t.low))
    assert t.scale == "relative" and "%" in t.format()


def test_bootstrap_is_seeded():
    rng = _rng(6)
    a, b = rng.normal(size=200), rng.normal(size=200)
    one = paired_effect(a, b, method="bootstrap", rng=_rng(7))
    two = paired_effect(a, b, method="bootstrap", rng=_rng(7))
    assert (one.low, one.high) == (two.low, two.high)  # same seed, same process: same draws


def test_combine_seeds_is_a_t_interval_over_the_seed_effects():
    rng = _rng(8)
    per = []
    for shift in (0.2, 0.35, 0.3):
        c = rng.normal(size=500)
        per.append(paired_effect(c + shift + rng.normal(0, 0.5, 500), c))
    eff = combine_seeds(per)
    est = np.array([e.estimate for e in per])
    ci = sst.ttest_1samp(est, 0.0).confidence_interval(0.95)
    assert (eff.low, eff.high) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert eff.n == 3 and eff.unit == "seeds" and eff.n_inner == 1500 and eff.df == 2
    assert eff.per_seed == pytest.approx(tuple(est))
    assert combine_seeds(per[:1]) is per[0]  # one seed: its interval over users
    with pytest.raises(ValueError, match="one scale"):
        combine_seeds([per[0], paired_effect([2.0, 3.0], [1.0, 1.0], relative=True)])


def test_paired_effect_over_seeds_pairs_inside_each_seed():
    rng = _rng(9)
    ts, cs = [], []
    for _ in range(3):
        c = rng.normal(10.0, 5.0, 400)  # large between-user spread, cancelled by pairing
        ts.append(c + 0.5 + rng.normal(0.0, 0.1, 400))
        cs.append(c)
    eff = paired_effect_over_seeds(ts, cs)
    assert eff.low > 0.3 and eff.high < 0.7 and verdict(eff, ">", 0.25) == "HOLDS"
    unpaired = unpaired_effect(np.concatenate(ts), np.concatenate(cs))
    assert unpaired.high - unpaired.low > 5 * (eff.high - eff.low) / 4.3  # pairing matters


# ------------------------------------------------------------------ verdict rules


def _eff(est, lo, hi, scale="absolute", null=0.0):
    return Effect(est, lo, hi, 10, "users", "fixed", scale=scale, null=null)


@pytest.mark.parametrize(
    ("est", "lo", "hi", "direction", "min_effect", "expected"),
    [
        (0.5, 0.2, 0.8, ">", 0.0, "HOLDS"),
        (0.5, 0.2, 0.8, ">", 0.5, "HOLDS"),  # estimate reaches the minimum
        (0.5, 0.2, 0.8, ">", 0.6, "INCONCLUSIVE"),  # significant but below the minimum
        (0.1, 0.05, 0.15, ">", 0.2, "REFUTED"),  # the whole interval below the minimum
        (-0.5, -0.8, -0.2, ">", 0.0, "REFUTED"),  # the other direction
        (0.1, -0.2, 0.4, ">", 0.0, "INCONCLUSIVE"),
        (-0.5, -0.8, -0.2, "<", 0.0, "HOLDS"),
        (-0.5, -0.8, -0.2, "<", 0.3, "HOLDS"),
        (-0.1, -0.15, -0.05, "<", 0.2, "REFUTED"),
        (0.5, 0.2, 0.8, "<", 0.0, "REFUTED"),
        (0.0, 0.0, 0.0, ">", 0.0, "INCONCLUSIVE"),  # exactly no effect: neither side
        (0.5, None, None, ">", 0.0, "INCONCLUSIVE"),  # no interval
        (float("nan"), 0.1, 0.2, ">", 0.0, "INCONCLUSIVE"),
    ],
)
def test_verdict_rules(est, lo, hi, direction, min_effect, expected):
    assert verdict(_eff(est, lo, hi), direction, min_effect) == expected


def test_ratio_verdicts_against_a_bar():
    assert verdict(_eff(150.0, 120.0, 180.0, "ratio", 100.0), ">") == "HOLDS"
    assert verdict(_eff(90.0, 80.0, 99.0, "ratio", 100.0), ">") == "REFUTED"
    assert verdict(_eff(110.0, 95.0, 130.0, "ratio", 100.0), ">") == "INCONCLUSIVE"
    assert verdict(_eff(0.5, 0.4, 0.6, "ratio", 1.0), "<") == "HOLDS"  # slower
    # a ratio margin: at least 10% above the bar
    assert verdict(_eff(105.0, 101.0, 108.0, "ratio", 100.0), ">", 0.1) == "REFUTED"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"direction": "=="}, "direction"),
        ({"min_effect": -0.1}, "min_effect"),
        ({"min_effect": float("inf")}, "min_effect"),
        ({"min_effect": "1"}, "min_effect"),
    ],
)
def test_verdict_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        verdict(_eff(0.5, 0.2, 0.8), **kwargs)


def test_effect_functions_reject_bad_input():
    with pytest.raises(ValueError, match="aligned per unit"):
        paired_effect([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        paired_effect([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="method"):
        paired_effect([1.0, 2.0], [1.0, 1.0], method="z")
    with pytest.raises(ValueError, match="rng"):
        paired_effect([1.0, 2.0], [1.0, 1.0], method="bootstrap")
    with pytest.raises(ValueError, match="mean is not 0"):
        paired_effect([1.0, 2.0], [1.0, -1.0], relative=True)
    with pytest.raises(ValueError, match="one array per seed"):
        paired_effect_over_seeds([[1.0, 2.0]], [])
    with pytest.raises(ValueError, match="bar"):
        ratio_effect([2.0, 3.0], [1.0, 1.0], bar=0.0)
    with pytest.raises(ValueError, match="> 0"):
        ratio_effect([2.0, -3.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="reference"):
        one_sample_effect([1.0, 2.0], float("nan"))
    with pytest.raises(ValueError, match="scale"):
        Effect(1.0, 0.0, 2.0, 3, "users", "x", scale="log")


def test_one_unit_gives_no_interval_and_inconclusive():
    eff = paired_effect([2.0], [1.0])
    assert eff.low is None and eff.high is None and eff.mde() is None
    assert verdict(eff, ">") == "INCONCLUSIVE"
    assert "no interval" in eff.format()


# ------------------------------------------------------------------ calibration


def test_calibration_aa_paired_over_users():
    """200 A/A comparisons, paired over users, one seed: false verdicts at about 5%."""
    rng = _rng(10)
    n_users, reps = 300, 200
    base = rng.gamma(2.0, 4.0, (reps, n_users))  # heavy-ish per-user outcomes
    a = base + rng.normal(0.0, 3.0, (reps, n_users))
    b = base + rng.normal(0.0, 3.0, (reps, n_users))
    verdicts = [verdict(paired_effect(a[i], b[i]), ">") for i in range(reps)]
    wrong = sum(v != "INCONCLUSIVE" for v in verdicts) / reps
    assert wrong <= 0.10, wrong


def test_calibration_aa_over_seeds_with_seed_effects():
    """A/A with seed-to-seed variation (each seed a new world): t over seeds stays calibrated."""
    rng = _rng(11)
    reps, seeds, n_users = 200, 3, 200
    wrong = 0
    for _ in range(reps):
        ts, cs = [], []
        for _ in range(seeds):
            base = rng.normal(10.0, 3.0, n_users)
            # each arm's per-seed training noise moves its mean: the spread a seed adds
            ts.append(base + rng.normal(0.0, 0.3) + rng.normal(0.0, 1.0, n_users))
            cs.append(base + rng.normal(0.0, 0.3) + rng.normal(0.0, 1.0, n_users))
        wrong += verdict(paired_effect_over_seeds(ts, cs), ">") != "INCONCLUSIVE"
    assert wrong / reps <= 0.10, wrong / reps


def test_planted_effect_is_found_and_a_large_sample_refutes_a_big_claim():
    rng = _rng(12)
    holds = 0
    for _ in range(100):
        c = rng.normal(5.0, 2.0, 500)
        t = c - 0.4 + rng.normal(0.0, 1.0, 500)  # one bad item per slate: -0.4 per user
        holds += verdict(paired_effect(c, t), ">", 0.1) == "HOLDS"
    assert holds >= 95
    # no effect, many users, a claimed minimum of 0.2: refuted, not inconclusive
    c = rng.normal(5.0, 2.0, 20_000)
    t = c + rng.normal(0.0, 1.0, 20_000)
    assert verdict(paired_effect(t, c), ">", 0.2) == "REFUTED"


def test_mde_is_detected_with_about_80_percent_power():
    rng = _rng(13)
    n, sd = 200, 1.0
    probe = paired_effect(rng.normal(0.0, sd, n), np.zeros(n))
    mde = probe.mde()
    expected_mde = (sst.t.ppf(0.975, n - 1) + sst.t.ppf(0.8, n - 1)) * probe.se
    assert mde == pytest.approx(expected_mde)
    true_mde = (sst.norm.ppf(0.975) + sst.norm.ppf(0.8)) * sd / math.sqrt(n)
    hits = sum(
        verdict(paired_effect(rng.normal(true_mde, sd, n), np.zeros(n)), ">") == "HOLDS"
        for _ in range(400)
    )
    assert 0.72 <= hits / 400 <= 0.88, hits / 400


def test_half_width_on_each_scale():
    assert Effect(1.0, 0.5, 1.7, 10, "users", "t").half_width == pytest.approx(0.6)
    assert Effect(
        2.0, 1.0, 4.0, 5, "reps", "t", scale="ratio", null=1.0
    ).half_width == pytest.approx(math.log(2.0))
    assert Effect(1.0, None, None, 1, "users", "t").half_width is None
