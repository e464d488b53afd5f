"""Summary statistics used by every benchmark report.

Four kinds of summary, each a small frozen value type with ``format(spec)`` (the report's
Markdown cell) and ``to_json()`` (the results.json entry):

- :class:`MeanStd` — mean and sample standard deviation over seeds (``mean_std``), the cell
  "mean ± std" of every results table; ``aggregate_over_seeds`` builds a whole table of them.
- :class:`ConfidenceInterval` — a 95% interval for a mean: Student-t (``t_interval``; the
  normal approximation with the small-sample t quantile) or a seeded percentile bootstrap
  (``bootstrap_ci``).
- :class:`OnlineSummary` — what the evaluation protocol asks of online rollouts: the mean
  reward with a 95% CI over users and over seeds (``online_summary``).
- :class:`RatioSummary` — a ratio of two quantities measured side by side (interleaved
  repetitions, so machine noise hits both): geometric mean of the paired ratios with a t
  interval on the log scale (``paired_ratio``, ``side_by_side``).

And the evidence behind every finding of a report: an :class:`Effect` (paired over users,
combined over seeds, against a bar, or a side-by-side ratio) and its three-way
:func:`verdict` (HOLDS / REFUTED / INCONCLUSIVE against a stated minimum effect).

All functions take plain sequences or numpy arrays and work on whole arrays at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "MeanStd",
    "ConfidenceInterval",
    "OnlineSummary",
    "RatioSummary",
    "mean_std",
    "t_interval",
    "bootstrap_ci",
    "online_summary",
    "paired_ratio",
    "side_by_side",
    "aggregate_over_seeds",
    "format_number",
    "Effect",
    "VERDICTS",
    "verdict",
    "paired_effect",
    "paired_effect_over_seeds",
    "combine_seeds",
    "one_sample_effect",
    "ratio_effect",
    "unpaired_effect",
]


def format_number(value: Any, spec: str = ".4g") -> str:
    """Format one number for a Markdown cell; ``None`` renders as an em dash.

    Args:
        value: a float, int, numpy scalar or ``None``.
        spec: a format spec for floats, e.g. ``".3f"`` or ``".4g"``.

    Returns:
        The text; non-finite floats render as ``nan`` / ``inf`` / ``-inf``.
    """
    if value is None:
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return format(value, spec)


def _as_1d(values: Any, name: str) -> np.ndarray:
    """Convert to a non-empty 1-D float64 array or raise ValueError naming ``name``."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} must hold at least one value, got an empty array")
    return arr


def _check_level(level: float) -> float:
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    return float(level)


def _t_quantile(level: float, dof: int) -> float:
    """Two-sided Student-t quantile ``t_{(1+level)/2, dof}``."""
    from scipy import stats as _st  # lazy: keeps `python -m benchmarks list` fast

    return float(_st.t.ppf(0.5 * (1.0 + level), dof))


@dataclass(frozen=True)
class MeanStd:
    """Mean and sample standard deviation (ddof=1) of one quantity over seeds.

    Attributes:
        mean: arithmetic mean of ``values``.
        std: sample standard deviation (ddof=1); ``None`` when ``n == 1`` (undefined).
        n: number of values (seeds).
        values: the raw values, in seed order.
    """

    mean: float
    std: float | None
    n: int
    values: tuple[float, ...]

    def format(self, spec: str = ".4g") -> str:
        """Render ``"mean ± std"``, or ``"mean (n=1)"`` when the std is undefined."""
        if self.std is None:
            return f"{format_number(self.mean, spec)} (n=1)"
        return f"{format_number(self.mean, spec)} ± {format_number(self.std, spec)}"

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict: mean, std, n and the per-seed values."""
        return {"mean": self.mean, "std": self.std, "n": self.n, "values": list(self.values)}


def mean_std(values: Sequence[float] | np.ndarray) -> MeanStd:
    """Mean and sample standard deviation over seeds.

    Args:
        values: one value per seed, at least one.

    Returns:
        A :class:`MeanStd`; ``std`` is ``None`` for a single value.

    Raises:
        ValueError: if ``values`` is empty or not 1-D.
    """
    arr = _as_1d(values, "values")
    std = float(arr.std(ddof=1)) if arr.size > 1 else None
    return MeanStd(float(arr.mean()), std, int(arr.size), tuple(float(v) for v in arr))


@dataclass(frozen=True)
class ConfidenceInterval:
    """A two-sided confidence interval for a mean.

    Attributes:
        mean: the point estimate.
        low: lower bound; ``None`` when undefined (a single observation).
        high: upper bound; ``None`` when undefined.
        n: number of observations behind the interval.
        level: confidence level, e.g. 0.95.
        method: ``"t"`` (Student-t) or ``"bootstrap"`` (percentile bootstrap).
    """

    mean: float
    low: float | None
    high: float | None
    n: int
    level: float = 0.95
    method: str = "t"

    @property
    def half_width(self) -> float | None:
        """Half the interval's width (``None`` when undefined)."""
        if self.low is None or self.high is None:
            return None
        return 0.5 * (self.high - self.low)

    def format(self, spec: str = ".4g") -> str:
        """Render ``"mean [low, high]"``, or ``"mean (n=1)"`` when undefined."""
        if self.low is None or self.high is None:
            return f"{format_number(self.mean, spec)} (n={self.n})"
        lo, hi = format_number(self.low, spec), format_number(self.high, spec)
        return f"{format_number(self.mean, spec)} [{lo}, {hi}]"

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict of every attribute."""
        return {
            "mean": self.mean,
            "low": self.low,
            "high": self.high,
            "n": self.n,
            "level": self.level,
            "method": self.method,
        }


def t_interval(values: Sequence[float] | np.ndarray, level: float = 0.95) -> ConfidenceInterval:
    """Student-t confidence interval for the mean: ``x̄ ± t_{(1+level)/2, n-1} · s / √n``.

    The t quantile makes it right for a handful of seeds and turns into the normal
    approximation for thousands of users.

    Args:
        values: the observations (per user, or per seed), at least one.
        level: confidence level in (0, 1).

    Returns:
        A :class:`ConfidenceInterval`; its bounds are ``None`` for a single observation.

    Raises:
        ValueError: on an empty input or a level outside (0, 1).
    """
    level = _check_level(level)
    arr = _as_1d(values, "values")
    n = int(arr.size)
    mean = float(arr.mean())
    if n < 2:
        return ConfidenceInterval(mean, None, None, n, level, "t")
    half = _t_quantile(level, n - 1) * float(arr.std(ddof=1)) / math.sqrt(n)
    return ConfidenceInterval(mean, mean - half, mean + half, n, level, "t")


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    rng: np.random.Generator,
    n_resamples: int = 2000,
    level: float = 0.95,
    chunk_elements: int = 1 << 22,
) -> ConfidenceInterval:
    """Percentile-bootstrap confidence interval for the mean, seeded explicitly.

    Resamples are drawn in chunks of at most ``chunk_elements`` indices so memory stays
    bounded for many users; each chunk is one vectorised draw and one mean per row.

    Args:
        values: the observations, at least one.
        rng: the generator every resample index is drawn from (e.g. ``ctx.rng(seed, "boot")``).
        n_resamples: number of bootstrap resamples, at least 100.
        level: confidence level in (0, 1).
        chunk_elements: upper bound on indices drawn at once.

    Returns:
        A :class:`ConfidenceInterval` with ``method="bootstrap"``.

    Raises:
        ValueError: on an empty input, a bad level, or ``n_resamples < 100``.
    """
    level = _check_level(level)
    arr = _as_1d(values, "values")
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if int(n_resamples) < 100:
        raise ValueError(f"n_resamples must be >= 100, got {n_resamples}")
    n = int(arr.size)
    if n < 2:
        return ConfidenceInterval(float(arr.mean()), None, None, n, level, "bootstrap")
    rows_per_chunk = max(1, int(chunk_elements) // n)
    means = np.empty(int(n_resamples), dtype=np.float64)
    for start in range(0, int(n_resamples), rows_per_chunk):
        rows = min(rows_per_chunk, int(n_resamples) - start)
        idx = rng.integers(0, n, size=(rows, n))  # (rows, n) resample indices
        means[start : start + rows] = arr[idx].mean(axis=1)  # (rows,)
    alpha = 0.5 * (1.0 - level)
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return ConfidenceInterval(float(arr.mean()), float(low), float(high), n, level, "bootstrap")


@dataclass(frozen=True)
class OnlineSummary:
    """Online-evaluation summary: mean with 95% CIs over users and over seeds.

    Attributes:
        mean: mean of the per-seed means (each seed weighs the same).
        users: t interval over all users of all seeds pooled together.
        seeds: t interval over the per-seed means (bounds ``None`` with one seed).
        per_seed: t interval over users within each seed, in seed order.
    """

    mean: float
    users: ConfidenceInterval
    seeds: ConfidenceInterval
    per_seed: tuple[ConfidenceInterval, ...]

    def format(self, spec: str = ".4g") -> str:
        """Render e.g. ``"0.512 (95% CI ±0.008 users, ±0.021 seeds)"``."""
        level = f"{round(self.users.level * 100):d}%"
        users_hw = self.users.half_width
        users = "n/a users" if users_hw is None else f"±{format_number(users_hw, spec)} users"
        seeds_hw = self.seeds.half_width
        seeds = "1 seed" if seeds_hw is None else f"±{format_number(seeds_hw, spec)} seeds"
        return f"{format_number(self.mean, spec)} ({level} CI {users}, {seeds})"

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict with the three intervals."""
        return {
            "mean": self.mean,
            "users": self.users.to_json(),
            "seeds": self.seeds.to_json(),
            "per_seed": [ci.to_json() for ci in self.per_seed],
        }


def online_summary(
    per_seed_values: Sequence[Sequence[float] | np.ndarray], level: float = 0.95
) -> OnlineSummary:
    """Summarise an online metric measured per user, for one or more seeds.

    Args:
        per_seed_values: one array per seed of per-user values (e.g. each user's return).
        level: confidence level in (0, 1).

    Returns:
        An :class:`OnlineSummary`.

    Raises:
        ValueError: if no seed is given or a seed has no users.
    """
    level = _check_level(level)
    if len(per_seed_values) == 0:
        raise ValueError("per_seed_values must hold at least one seed, got none")
    arrays = [_as_1d(v, f"per_seed_values[{i}]") for i, v in enumerate(per_seed_values)]
    per_seed = tuple(t_interval(a, level) for a in arrays)
    seed_means = np.array([ci.mean for ci in per_seed])  # (S,)
    seeds = t_interval(seed_means, level)
    users = t_interval(np.concatenate(arrays), level)
    return OnlineSummary(seeds.mean, users, seeds, per_seed)


@dataclass(frozen=True)
class RatioSummary:
    """Ratio of two quantities measured side by side, over paired repetitions.

    Attributes:
        ratio: geometric mean of the paired ratios ``numerator_i / denominator_i``.
        low: lower CI bound (t interval on the log ratios, exponentiated); ``None`` if n=1.
        high: upper CI bound; ``None`` if n=1.
        n: number of pairs.
        level: confidence level.
    """

    ratio: float
    low: float | None
    high: float | None
    n: int
    level: float = 0.95

    def format(self, spec: str = ".3g") -> str:
        """Render ``"3.71× [3.5, 3.93]"``, or ``"3.71× (n=1)"``."""
        if self.low is None or self.high is None:
            return f"{format_number(self.ratio, spec)}× (n={self.n})"
        lo, hi = format_number(self.low, spec), format_number(self.high, spec)
        return f"{format_number(self.ratio, spec)}× [{lo}, {hi}]"

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict of every attribute."""
        return {
            "ratio": self.ratio,
            "low": self.low,
            "high": self.high,
            "n": self.n,
            "level": self.level,
        }


def paired_ratio(
    numerator: Sequence[float] | np.ndarray,
    denominator: Sequence[float] | np.ndarray,
    level: float = 0.95,
) -> RatioSummary:
    """Geometric-mean ratio of paired positive measurements with a log-scale t interval.

    Pair ``i`` must come from the same repetition (measured side by side), so common noise
    cancels in ``log(numerator_i) - log(denominator_i)``.

    Args:
        numerator: positive values, one per repetition.
        denominator: positive values, same length.
        level: confidence level in (0, 1).

    Returns:
        A :class:`RatioSummary`.

    Raises:
        ValueError: on length mismatch or a non-positive value.
    """
    level = _check_level(level)
    num = _as_1d(numerator, "numerator")
    den = _as_1d(denominator, "denominator")
    if num.shape != den.shape:
        raise ValueError(
            f"numerator and denominator must pair up, got lengths {num.size} and {den.size}"
        )
    if not (np.all(num > 0) and np.all(den > 0)):
        raise ValueError(
            "numerator and denominator must be > 0 for a ratio, got "
            f"min {num.min():.4g} and {den.min():.4g}"
        )
    ci = t_interval(np.log(num) - np.log(den), level)  # CI of the mean log ratio
    if ci.low is None or ci.high is None:
        return RatioSummary(math.exp(ci.mean), None, None, ci.n, level)
    return RatioSummary(math.exp(ci.mean), math.exp(ci.low), math.exp(ci.high), ci.n, level)


def side_by_side(
    name_a: str,
    values_a: Sequence[float] | np.ndarray,
    name_b: str,
    values_b: Sequence[float] | np.ndarray,
    unit: str = "",
    spec: str = ".3g",
) -> str:
    """One line comparing two quantities measured side by side, with their ratio b / a.

    Example: ``"faiss: 4.56 ± 0.1 ms | torch: 1.23 ± 0.05 ms | torch/faiss = 0.27× [0.25,
    0.29]"``.

    Args:
        name_a: label of the first quantity (the ratio's denominator).
        values_a: its values, one per repetition.
        name_b: label of the second quantity (the ratio's numerator).
        values_b: its values, paired with ``values_a``.
        unit: unit appended to both means (e.g. ``"ms"``).
        spec: format spec for every number.

    Returns:
        The formatted line.
    """
    suffix = f" {unit}" if unit else ""
    a = mean_std(values_a).format(spec)
    b = mean_std(values_b).format(spec)
    ratio = paired_ratio(values_b, values_a).format(spec)
    return f"{name_a}: {a}{suffix} | {name_b}: {b}{suffix} | {name_b}/{name_a} = {ratio}"


def aggregate_over_seeds(
    rows: Iterable[Mapping[str, Any]],
    by: Sequence[str],
    metrics: Sequence[str],
    online: Sequence[str] = (),
    seed_key: str = "seed",
    reducer: Callable[[Sequence[float]], Any] = mean_std,
) -> list[dict[str, Any]]:
    """Collapse one row per (setting, seed) into one row per setting with "mean ± std" cells.

    Rows are grouped by the values of ``by`` (in first-appearance order). Each output row
    holds the ``by`` values, a ``seeds`` column (e.g. ``"0,1,2"``), for each metric the
    reducer's result (a :class:`MeanStd` by default) over the group's rows in seed order,
    and for each ``online`` column an :class:`OnlineSummary` (mean, 95% CI over users and
    over seeds) of the per-user arrays the rows hold there.

    Args:
        rows: per-seed rows, each with every ``by`` key, ``seed_key``, every metric (a
            number) and every ``online`` column (a 1-D array of per-user values).
        by: the columns naming a setting (world config, behaviour policy, model config...).
        metrics: the numeric columns to aggregate (wall time included, if wanted).
        online: the per-user columns summarised with :func:`online_summary`.
        seed_key: the column holding the seed.
        reducer: maps the list of per-seed values to a table cell.

    Returns:
        The aggregated rows.

    Raises:
        ValueError: if a row lacks a required key, or a setting repeats a seed.
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    needed = [*by, seed_key, *metrics, *online]
    for i, row in enumerate(rows):
        missing = [k for k in needed if k not in row]
        if missing:
            raise ValueError(f"rows[{i}] lacks column(s) {missing}; every row needs {needed}")
        groups.setdefault(tuple(row[k] for k in by), []).append(row)
    out: list[dict[str, Any]] = []
    for key, group in groups.items():
        group = sorted(group, key=lambda r: r[seed_key])
        seeds = [int(r[seed_key]) for r in group]
        if len(set(seeds)) != len(seeds):
            raise ValueError(
                f"setting {dict(zip(by, key, strict=True))} repeats a seed: seeds {seeds}"
            )
        agg: dict[str, Any] = dict(zip(by, key, strict=True))
        agg["seeds"] = ",".join(str(s) for s in seeds)
        for m in metrics:
            agg[m] = reducer([float(r[m]) for r in group])
        for m in online:
            agg[m] = online_summary([np.asarray(r[m], dtype=np.float64) for r in group])
        out.append(agg)
    return out


# --------------------------------------------------------------------------- effects and verdicts
#
# A *finding* is a claim about the direction and size of an effect: "treatment beats control on
# reward by at least 2%". Its evidence is an :class:`Effect`: a point estimate, a 95% interval,
# the unit of resampling (users, seeds, repetitions) and how the interval was computed. The
# verdict (:func:`verdict`) is three-way:
#
# - HOLDS: the interval lies entirely on the claimed side of "no effect" and the point estimate
#   reaches the minimum effect of interest;
# - REFUTED: the interval lies entirely below the minimum effect (on the claimed side's scale);
#   with a minimum effect of 0 that is "entirely in the opposite direction";
# - INCONCLUSIVE: anything else (including an undefined interval, e.g. one seed with no users).
#
# Paired designs (the same users meet both agents; the same evaluation users score both models)
# use per-unit differences. Several seeds are combined by a Student-t interval over the per-seed
# paired effects (each seed is one replication of the whole experiment: world, log, training,
# users), which is conservative with 3 seeds (t_{0.975, 2} = 4.30) but has the right coverage;
# a bootstrap over 3 seeds would not.

VERDICTS = ("HOLDS", "REFUTED", "INCONCLUSIVE")
DIRECTIONS = (">", "<")
SCALES = ("absolute", "relative", "ratio")
DEFAULT_POWER = 0.8


@dataclass(frozen=True)
class Effect:
    """An estimated effect with its confidence interval and how it was obtained.

    The effect is on one of three scales:

    - ``"absolute"``: treatment − control (or value − reference), in the metric's units;
      "no effect" is 0.
    - ``"relative"``: treatment / control − 1 (a fraction: 0.05 means +5%); "no effect" is 0.
    - ``"ratio"``: a ratio measured side by side (geometric mean of paired ratios), compared
      with a bar ``null`` (1 for "faster at all", 100 for "at least 100x"); intervals are
      computed on the log scale.

    Attributes:
        estimate: the point estimate on the effect's scale.
        low: lower bound of the interval; ``None`` when undefined (too few units).
        high: upper bound; ``None`` when undefined.
        n: number of resampling units behind the interval (users, seeds, repetitions).
        unit: what a unit is (``"users"``, ``"seeds"``, ``"repetitions"``...).
        method: how the interval was computed, in words (printed in the evidence line).
        scale: ``"absolute"``, ``"relative"`` or ``"ratio"``.
        null: the value meaning "no effect" (0 for differences; the bar for ratios).
        se: standard error on the interval's working scale (log scale for ratios).
        df: degrees of freedom of the t quantile (``None`` for a normal/bootstrap interval).
        level: confidence level.
        treatment: mean of the treatment side (for the evidence line), if any.
        control: mean of the control side / the reference, if any.
        per_seed: the per-seed effects when several seeds were combined.
        n_inner: total inner units (e.g. users over all seeds) when ``unit`` is seeds.
    """

    estimate: float
    low: float | None
    high: float | None
    n: int
    unit: str
    method: str
    scale: str = "absolute"
    null: float = 0.0
    se: float | None = None
    df: float | None = None
    level: float = 0.95
    treatment: float | None = None
    control: float | None = None
    per_seed: tuple[float, ...] = ()
    n_inner: int | None = None

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {self.scale!r}")
        if self.scale == "ratio" and not self.null > 0:
            raise ValueError(f"a ratio effect needs a positive bar (null), got {self.null!r}")

    @property
    def half_width(self) -> float | None:
        """Half the interval's width on the effect's scale (``None`` when undefined).

        For a ratio it is the half-width on the log scale (``log(high / low) / 2``).
        """
        if not self.defined:
            return None
        lo, hi = float(self.low), float(self.high)  # type: ignore[arg-type]
        if self.scale == "ratio":
            return 0.5 * math.log(hi / lo) if lo > 0 else None
        return 0.5 * (hi - lo)

    @property
    def defined(self) -> bool:
        """True when the interval exists and every bound is finite."""
        vals = (self.estimate, self.low, self.high)
        return all(v is not None and math.isfinite(v) for v in vals)

    def margins(self) -> tuple[float, float, float] | None:
        """(estimate, low, high) as distances from "no effect" on the working scale.

        Differences: the values themselves minus ``null`` (0). Ratios: log(value / null).
        ``None`` when the interval is undefined.
        """
        if not self.defined:
            return None
        vals = (float(self.estimate), float(self.low), float(self.high))  # type: ignore[arg-type]
        if self.scale == "ratio":
            if min(vals) <= 0:
                return None
            return tuple(math.log(v / self.null) for v in vals)  # type: ignore[return-value]
        return tuple(v - self.null for v in vals)  # type: ignore[return-value]

    def mde(self, power: float = DEFAULT_POWER) -> float | None:
        """Minimum detectable effect at this sample size.

        The true effect that a two-sided test at ``1 - level`` detects with probability
        ``power``.

        ``(q_{(1+level)/2} + q_{power}) · se`` with Student-t quantiles on ``df`` degrees of
        freedom (normal quantiles when ``df`` is None). On the ratio scale it is returned as a
        multiplicative factor (``exp`` of the log-scale MDE), e.g. 1.08 = "8% faster".
        """
        if self.se is None or not math.isfinite(self.se):
            return None
        from scipy import stats as _st

        if self.df is not None and self.df >= 1:
            q = _st.t.ppf(0.5 * (1.0 + self.level), self.df) + _st.t.ppf(power, self.df)
        else:
            q = _st.norm.ppf(0.5 * (1.0 + self.level)) + _st.norm.ppf(power)
        m = float(q) * float(self.se)
        return math.exp(m) if self.scale == "ratio" else m

    def format(self, spec: str = ".3g") -> str:
        """Render the estimate and interval, e.g. ``"+0.41 [+0.12, +0.70]"`` or ``"+4.1%"``."""

        def f(v: float | None) -> str:
            if v is None:
                return "—"
            if self.scale == "relative":
                return format_number(100.0 * v, "+" + spec) + "%"
            if self.scale == "ratio":
                return format_number(v, spec) + "×"
            return format_number(v, "+" + spec)

        if self.low is None or self.high is None:
            return f"{f(self.estimate)} (no interval: n={self.n} {self.unit})"
        return f"{f(self.estimate)} [{f(self.low)}, {f(self.high)}]"

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict of every attribute plus the MDE."""
        return {
            "estimate": self.estimate,
            "low": self.low,
            "high": self.high,
            "n": self.n,
            "unit": self.unit,
            "method": self.method,
            "scale": self.scale,
            "null": self.null,
            "se": self.se,
            "df": self.df,
            "level": self.level,
            "treatment": self.treatment,
            "control": self.control,
            "per_seed": list(self.per_seed),
            "n_inner": self.n_inner,
            "mde": self.mde(),
        }


def verdict(effect: Effect, direction: str = ">", min_effect: float = 0.0) -> str:
    """The three-way verdict of a finding.

    Args:
        effect: the estimated effect.
        direction: ``">"`` (the claim says the effect is positive: treatment above control,
            value above the bar) or ``"<"`` (negative: below).
        min_effect: the minimum effect of interest, >= 0, on the effect's scale (absolute:
            metric units; relative: a fraction, 0.02 = 2%; ratio: a fraction of the bar on the
            log scale, ``log(1 + min_effect)``, usually 0 for a bar).

    Returns:
        ``"HOLDS"`` if the interval lies on the claimed side of no effect and the estimate
        reaches ``min_effect``; ``"REFUTED"`` if the interval lies entirely below
        ``min_effect`` on the claimed side (with ``min_effect = 0``: entirely in the opposite
        direction); ``"INCONCLUSIVE"`` otherwise, and whenever the interval is undefined.

    Raises:
        ValueError: for an unknown direction or a negative / non-finite ``min_effect``.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if not (isinstance(min_effect, (int, float, np.floating, np.integer)) and min_effect >= 0):
        raise ValueError(f"min_effect must be a number >= 0, got {min_effect!r}")
    if not math.isfinite(float(min_effect)):
        raise ValueError(f"min_effect must be finite, got {min_effect!r}")
    m = effect.margins()
    if m is None:
        return "INCONCLUSIVE"
    est, low, high = m
    if direction == "<":
        est, low, high = -est, -high, -low
    threshold = math.log1p(float(min_effect)) if effect.scale == "ratio" else float(min_effect)
    if low > 0 and est >= threshold:
        return "HOLDS"
    if high < threshold or high < 0:
        return "REFUTED"
    return "INCONCLUSIVE"


def _t_effect(
    diffs: np.ndarray, level: float
) -> tuple[float, float | None, float | None, float | None, int | None]:
    """Mean, t-interval bounds, standard error and dof of per-unit values."""
    n = int(diffs.size)
    mean = float(diffs.mean())
    if n < 2:
        return mean, None, None, None, None
    se = float(diffs.std(ddof=1)) / math.sqrt(n)
    half = _t_quantile(level, n - 1) * se
    return mean, mean - half, mean + half, se, n - 1


def _check_pair(treatment: Any, control: Any) -> tuple[np.ndarray, np.ndarray]:
    a = _as_1d(treatment, "treatment")
    b = _as_1d(control, "control")
    if a.shape != b.shape:
        raise ValueError(
            "treatment and control must be aligned per unit (same users in the same order), "
            f"got lengths {a.size} and {b.size}"
        )
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("treatment and control must be finite (a NaN or inf was given)")
    return a, b


def paired_effect(
    treatment: Sequence[float] | np.ndarray,
    control: Sequence[float] | np.ndarray,
    *,
    relative: bool = False,
    method: str = "t",
    rng: np.random.Generator | None = None,
    n_resamples: int = 2000,
    level: float = 0.95,
    unit: str = "users",
) -> Effect:
    """The paired effect of treatment over control from per-unit values of one seed.

    Unit ``i`` of both arrays must be the same unit (the same user meeting both agents, the
    same evaluation user scored by both models), so everything the two share cancels in the
    difference.

    Absolute (default): mean of ``treatment_i − control_i``. Relative: ``mean(treatment) /
    mean(control) − 1``; its t interval uses the delta method (the standard error of a ratio
    of paired means: ``sd(t_i − r·c_i) / (√n · mean(c))``).

    Args:
        treatment: per-unit values under the treatment.
        control: per-unit values under the control, aligned with ``treatment``.
        relative: report the relative effect instead of the difference.
        method: ``"t"`` (Student-t on the paired differences) or ``"bootstrap"`` (percentile
            bootstrap over units, resampling pairs; needs ``rng``).
        rng: the generator for the bootstrap.
        n_resamples: bootstrap resamples (>= 100).
        level: confidence level in (0, 1).
        unit: what a unit is, for the evidence line.

    Returns:
        An :class:`Effect` (``n`` = number of units).

    Raises:
        ValueError: on misaligned or non-finite inputs, an unknown method, a bootstrap without
            an rng, or a relative effect over a control whose mean is 0.
    """
    level = _check_level(level)
    a, b = _check_pair(treatment, control)
    n = int(a.size)
    mean_a, mean_b = float(a.mean()), float(b.mean())
    if relative and mean_b == 0:
        raise ValueError("a relative effect needs a control whose mean is not 0")
    if method == "t":
        if relative:
            r = mean_a / mean_b
            est = r - 1.0
            if n < 2:
                lo = hi = se = df = None
            else:
                se = float(np.std(a - r * b, ddof=1)) / (math.sqrt(n) * abs(mean_b))
                half = _t_quantile(level, n - 1) * se
                lo, hi, df = est - half, est + half, n - 1
            desc = f"paired t over {unit} (delta method)"
        else:
            est, lo, hi, se, df = _t_effect(a - b, level)
            desc = f"paired t over {unit}"
    elif method == "bootstrap":
        if not isinstance(rng, np.random.Generator):
            raise ValueError("method='bootstrap' needs rng, a numpy.random.Generator")
        if int(n_resamples) < 100:
            raise ValueError(f"n_resamples must be >= 100, got {n_resamples}")
        est = mean_a / mean_b - 1.0 if relative else mean_a - mean_b
        if n < 2:
            lo = hi = se = df = None
        else:
            rows = max(1, (1 << 22) // n)
            stats_ = np.empty(int(n_resamples))
            for s in range(0, int(n_resamples), rows):
                m = min(rows, int(n_resamples) - s)
                idx = rng.integers(0, n, size=(m, n))  # (m, n) resampled units, pairs kept
                ra, rb = a[idx].mean(axis=1), b[idx].mean(axis=1)  # (m,)
                stats_[s : s + m] = ra / rb - 1.0 if relative else ra - rb
            alpha = 0.5 * (1.0 - level)
            lo, hi = (float(v) for v in np.quantile(stats_, [alpha, 1.0 - alpha]))
            se, df = float(stats_.std(ddof=1)), n - 1
        desc = f"paired bootstrap over {unit} ({int(n_resamples)} resamples)"
    else:
        raise ValueError(f"method must be 't' or 'bootstrap', got {method!r}")
    return Effect(
        estimate=float(est),
        low=lo,
        high=hi,
        n=n,
        unit=unit,
        method=desc,
        scale="relative" if relative else "absolute",
        se=se,
        df=df,
        level=level,
        treatment=mean_a,
        control=mean_b,
    )


def combine_seeds(per_seed: Sequence[Effect], level: float = 0.95) -> Effect:
    """Combine per-seed effects (same scale) by a Student-t interval over seeds.

    Each seed is one replication of the whole experiment (world, log, training, users); the
    interval over the per-seed point estimates therefore covers the seed-to-seed variation
    as well as the user sampling inside each seed. With one seed, the seed's own effect (its
    interval over users) is returned unchanged.

    Args:
        per_seed: one :class:`Effect` per seed, all on the same scale.
        level: confidence level.

    Returns:
        The combined :class:`Effect` (``unit="seeds"``, ``per_seed`` = the seed estimates,
        ``n_inner`` = total inner units).

    Raises:
        ValueError: on an empty list or mixed scales.
    """
    level = _check_level(level)
    if len(per_seed) == 0:
        raise ValueError("per_seed must hold at least one seed's effect, got none")
    scales = {e.scale for e in per_seed}
    if len(scales) != 1:
        raise ValueError(f"per-seed effects must share one scale, got {sorted(scales)}")
    if len(per_seed) == 1:
        return per_seed[0]
    est = np.array([e.estimate for e in per_seed], dtype=np.float64)
    mean, lo, hi, se, df = _t_effect(est, level)
    inner = sum(e.n for e in per_seed)
    first = per_seed[0]
    tr = [e.treatment for e in per_seed]
    co = [e.control for e in per_seed]
    return Effect(
        estimate=mean,
        low=lo,
        high=hi,
        n=len(per_seed),
        unit="seeds",
        method=f"t over {len(per_seed)} per-seed effects ({first.method})",
        scale=first.scale,
        null=first.null,
        se=se,
        df=df,
        level=level,
        treatment=None if None in tr else float(np.mean(tr)),
        control=None if None in co else float(np.mean(co)),
        per_seed=tuple(float(v) for v in est),
        n_inner=int(inner),
    )


def paired_effect_over_seeds(
    treatments: Sequence[Sequence[float] | np.ndarray],
    controls: Sequence[Sequence[float] | np.ndarray],
    *,
    relative: bool = False,
    method: str = "t",
    rngs: Sequence[np.random.Generator] | None = None,
    level: float = 0.95,
    unit: str = "users",
) -> Effect:
    """Paired effect per seed (:func:`paired_effect`), combined over seeds (:func:`combine_seeds`).

    Args:
        treatments: one array of per-unit values per seed.
        controls: one array per seed, each aligned with the same seed's treatment array.
        relative: relative effects (each seed's ratio of means − 1).
        method: ``"t"`` or ``"bootstrap"`` inside each seed.
        rngs: one generator per seed for the bootstrap.
        level: confidence level.
        unit: what a unit inside a seed is.

    Returns:
        One seed: the paired effect over its units; several: a t interval over the seeds'
        paired effects.
    """
    if len(treatments) != len(controls) or len(treatments) == 0:
        raise ValueError(
            "treatments and controls must hold one array per seed, the same number of seeds, "
            f"got {len(treatments)} and {len(controls)}"
        )
    if method == "bootstrap" and (rngs is None or len(rngs) != len(treatments)):
        raise ValueError("method='bootstrap' needs rngs, one numpy Generator per seed")
    per = [
        paired_effect(
            t,
            c,
            relative=relative,
            method=method,
            rng=None if rngs is None else rngs[i],
            level=level,
            unit=unit,
        )
        for i, (t, c) in enumerate(zip(treatments, controls, strict=True))
    ]
    return combine_seeds(per, level)


def one_sample_effect(
    values: Sequence[float] | np.ndarray,
    reference: float,
    *,
    relative: bool = False,
    level: float = 0.95,
    unit: str = "seeds",
) -> Effect:
    """A measured quantity against a fixed reference (a bar), with a t interval over units.

    Args:
        values: one measurement per unit (seed, repetition); at least two for an interval.
        reference: the bar.
        relative: effect as ``mean / reference − 1`` (interval scaled the same way).
        level: confidence level.
        unit: what a unit is.

    Returns:
        An :class:`Effect` of ``mean(values) − reference`` (or the relative version).

    Raises:
        ValueError: on empty / non-finite values, or a relative effect against reference 0.
    """
    level = _check_level(level)
    x = _as_1d(values, "values")
    if not np.isfinite(x).all():
        raise ValueError("values must be finite (a NaN or inf was given)")
    ref = float(reference)
    if not math.isfinite(ref):
        raise ValueError(f"reference must be finite, got {reference!r}")
    if relative and ref == 0:
        raise ValueError("a relative effect needs a reference that is not 0")
    scale = 1.0 / abs(ref) if relative else 1.0
    mean, lo, hi, se, df = _t_effect((x - ref) * scale, level)
    return Effect(
        estimate=mean,
        low=lo,
        high=hi,
        n=int(x.size),
        unit=unit,
        method=f"t over {unit}",
        scale="relative" if relative else "absolute",
        se=se,
        df=df,
        level=level,
        treatment=float(x.mean()),
        control=ref,
    )


def ratio_effect(
    numerator: Sequence[float] | np.ndarray,
    denominator: Sequence[float] | np.ndarray,
    *,
    bar: float = 1.0,
    level: float = 0.95,
    unit: str = "repetitions",
) -> Effect:
    """A ratio measured side by side, against a bar: geometric mean with a log-scale t interval.

    Pair ``i`` comes from one repetition (e.g. two timings taken back to back), so machine
    noise common to both cancels in ``log(numerator_i / denominator_i)``.

    Args:
        numerator: positive values, one per repetition.
        denominator: positive values, paired with ``numerator``.
        bar: the ratio the claim compares with (1: "faster at all"; 100: "at least 100x").
        level: confidence level.
        unit: what a repetition is.

    Returns:
        An :class:`Effect` on the ratio scale with ``null = bar``.
    """
    r = paired_ratio(numerator, denominator, level)
    num = _as_1d(numerator, "numerator")
    den = _as_1d(denominator, "denominator")
    logs = np.log(num) - np.log(den)
    se = float(logs.std(ddof=1)) / math.sqrt(logs.size) if logs.size > 1 else None
    if not (isinstance(bar, (int, float, np.floating, np.integer)) and bar > 0):
        raise ValueError(f"bar must be a positive number, got {bar!r}")
    return Effect(
        estimate=r.ratio,
        low=r.low,
        high=r.high,
        n=r.n,
        unit=unit,
        method=f"t on log ratios over {unit}",
        scale="ratio",
        null=float(bar),
        se=se,
        df=(r.n - 1) if r.n > 1 else None,
        level=level,
        treatment=float(np.exp(np.log(num).mean())),
        control=float(np.exp(np.log(den).mean())),
    )


def unpaired_effect(
    treatment: Sequence[float] | np.ndarray,
    control: Sequence[float] | np.ndarray,
    *,
    relative: bool = False,
    level: float = 0.95,
    unit: str = "users",
) -> Effect:
    """Welch's interval for a difference of means of two independent samples.

    Use only where the design cannot pair (different users, different populations); a paired
    design should use :func:`paired_effect`. Relative: delta method on the ratio of means.
    """
    level = _check_level(level)
    a = _as_1d(treatment, "treatment")
    b = _as_1d(control, "control")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("treatment and control must be finite (a NaN or inf was given)")
    ma, mb = float(a.mean()), float(b.mean())
    if relative and mb == 0:
        raise ValueError("a relative effect needs a control whose mean is not 0")
    if a.size < 2 or b.size < 2:
        est = ma / mb - 1.0 if relative else ma - mb
        lo = hi = se = df = None
    else:
        va, vb = float(a.var(ddof=1)) / a.size, float(b.var(ddof=1)) / b.size
        if va + vb == 0:
            df = float(a.size + b.size - 2)
        else:
            df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
        if relative:
            r = ma / mb
            est = r - 1.0
            se = math.sqrt(va + r * r * vb) / abs(mb)  # delta method for ma / mb
        else:
            est = ma - mb
            se = math.sqrt(va + vb)
        from scipy import stats as _st

        half = float(_st.t.ppf(0.5 * (1.0 + level), df)) * se
        lo, hi = est - half, est + half
    return Effect(
        estimate=float(est),
        low=lo,
        high=hi,
        n=int(a.size + b.size),
        unit=unit,
        method=f"Welch t over {unit} (unpaired)",
        scale="relative" if relative else "absolute",
        se=se,
        df=df,
        level=level,
        treatment=ma,
        control=mb,
    )
