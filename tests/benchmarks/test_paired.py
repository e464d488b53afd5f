"""Per-user paired effects over seeds (NaN users dropped pairwise, non-inferiority margins,
unpaired arms) and the bootstrap interval of Spearman's rho, against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sst

from benchmarks.paired import PerUser, spearman_effect
from benchmarks.stats import paired_effect, verdict


def _store(rng, n=400, seeds=(0, 1, 2), shift=0.05):
    store = PerUser()
    for s in seeds:
        base = rng.random(n)
        treat = np.clip(base + shift + rng.normal(0, 0.05, n), 0, 1)
        base[rng.random(n) < 0.1] = np.nan  # some users have no defined value
        store.add("a", s, {"recall": treat})
        store.add("b", s, {"recall": base})
    return store


def test_effect_pairs_users_drops_nan_pairs_and_combines_seeds():
    store = _store(np.random.default_rng(0))
    eff = store.effect("a", "b", "recall")
    per = []
    for s in (0, 1, 2):
        a, b = store.values["a", s]["recall"], store.values["b", s]["recall"]
        keep = ~np.isnan(b)
        per.append(paired_effect(a[keep], b[keep]).estimate)
    ci = sst.ttest_1samp(per, 0.0).confidence_interval(0.95)
    assert eff.n == 3 and eff.unit == "seeds" and eff.per_seed == pytest.approx(per)
    assert (eff.low, eff.high) == pytest.approx((ci.low, ci.high))
    assert eff.n_inner == sum(
        int((~np.isnan(store.values["b", s]["recall"])).sum()) for s in (0, 1, 2)
    )
    assert verdict(eff, ">", 0.02) == "HOLDS"


def test_control_scale_is_a_margin():
    rng = np.random.default_rng(1)
    store = PerUser()
    base = rng.random(2000)
    store.add("a", 0, {"m": base * 0.99})  # 1% worse, with no noise
    store.add("b", 0, {"m": base})
    assert verdict(store.effect("a", "b", "m", relative=True), ">") == "REFUTED"
    within = store.effect("a", "b", "m", relative=True, control_scale=0.97)
    assert within.estimate == pytest.approx(0.99 / 0.97 - 1)
    assert verdict(within, ">") == "HOLDS"  # within 3%


def test_one_seed_is_paired_t_over_users_and_bad_inputs_are_rejected():
    store = _store(np.random.default_rng(2), seeds=(5,))
    eff = store.effect("a", "b", "recall")
    assert eff.unit == "test users" and eff.df == eff.n - 1
    store.add("c", 5, {"recall": np.zeros(3)})
    with pytest.raises(ValueError, match="different users"):
        store.effect("a", "c", "recall")
    store.add("d", 6, {"recall": np.zeros(400)})
    with pytest.raises(ValueError, match="same seeds"):
        store.effect("a", "d", "recall")
    with pytest.raises(ValueError, match="no per-user values"):
        store.effect("a", "b", "ndcg")
    zero = PerUser()
    zero.add("x", 0, {"m": np.ones(5)})
    zero.add("y", 0, {"m": np.zeros(5)})
    undefined = zero.effect("x", "y", "m", relative=True)
    assert undefined.low is None and verdict(undefined, ">") == "INCONCLUSIVE"


def test_unpaired_arms_use_welch_per_seed():
    rng = np.random.default_rng(3)
    store = PerUser()
    a, b = rng.normal(1.0, 1.0, 300), rng.normal(0.8, 1.0, 500)
    store.add("a", 0, {"m": a})
    store.add("b", 0, {"m": b})
    eff = store.unpaired("a", "b", "m")
    ci = sst.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (eff.low, eff.high) == pytest.approx((ci.low, ci.high))


def test_spearman_effect_estimate_is_exact_and_interval_covers():
    rng = np.random.default_rng(4)
    x = rng.normal(size=3000)
    y = 0.6 * x + rng.normal(size=3000)
    c = 0.2 * x + rng.normal(size=3000)
    bar = spearman_effect(x, y, np.random.default_rng(0), reference=0.3)
    assert bar.estimate == pytest.approx(sst.spearmanr(x, y).statistic - 0.3)
    assert bar.low < bar.estimate < bar.high and bar.high - bar.low < 0.1
    diff = spearman_effect(x, y, np.random.default_rng(0), control_y=c)
    truth = sst.spearmanr(x, y).statistic - sst.spearmanr(x, c).statistic
    assert diff.estimate == pytest.approx(truth)
    assert verdict(diff, ">", 0.1) == "HOLDS"
    # no relation: the interval of rho covers 0 in most draws (about 95%)
    covered = 0
    for i in range(40):
        r = np.random.default_rng(100 + i)
        e = spearman_effect(r.normal(size=500), r.normal(size=500), r, n_resamples=200)
        covered += e.low < 0 < e.high
    assert covered >= 34
    flat = spearman_effect(x, np.ones_like(x), np.random.default_rng(0))
    assert verdict(flat, ">") == "INCONCLUSIVE"
