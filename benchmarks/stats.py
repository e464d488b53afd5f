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
