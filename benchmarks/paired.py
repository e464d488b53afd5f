"""Per-evaluation-user metric values over seeds, and the paired effects built from them.

Offline comparisons pair on the evaluation users: within one seed every variant is scored
on the same held-out users of the same log, so the per-user difference of a metric cancels
what the users share (how hard their held-out items are to find) and carries only the
variants' effect. Each seed gives one paired effect over its users; several seeds are
combined by a Student-t interval over the per-seed effects
(:func:`benchmarks.stats.paired_effect_over_seeds`), because a seed replicates the whole
experiment (world, log, training, users).

Choices between variants (the best softmax, the best transformer, a temperature) are made
here on the validation period only (:func:`choose_on_validation`): the test users only ever
report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from benchmarks.stats import Effect, combine_seeds, paired_effect, unpaired_effect

__all__ = ["PerUser", "choose_on_validation", "undefined_effect", "spearman_effect"]


def undefined_effect(unit: str, why: str, scale: str = "absolute") -> Effect:
    """An effect with no estimate and no interval (its verdict is INCONCLUSIVE).

    Args:
        unit: the unit of resampling the effect would have had.
        why: the reason, shown as the method in the evidence line.
        scale: ``"absolute"`` or ``"relative"``.
    """
    return Effect(math.nan, None, None, 0, unit, why, scale=scale)


@dataclass
class PerUser:
    """Per-evaluation-user metric arrays of each arm (a variant, or variant × setting) and seed.

    ``add(arm, seed, per_user)`` stores the arrays of one evaluation (e.g. the second value of
    :func:`benchmarks.common.evaluate_per_user`); :meth:`effect` pairs two arms user by user
    within each seed and combines the seeds.
    """

    values: dict[tuple[str, int], dict[str, np.ndarray]] = field(default_factory=dict)

    def add(self, arm: str, seed: int, per_user: Mapping[str, np.ndarray]) -> None:
        """Record ``arm``'s per-user arrays for ``seed`` (metrics merge with earlier ones)."""
        entry = self.values.setdefault((str(arm), int(seed)), {})
        for metric, v in per_user.items():
            entry[str(metric)] = np.asarray(v, dtype=np.float64)

    def seeds(self, arm: str) -> list[int]:
        """The seeds recorded for ``arm``, sorted."""
        return sorted(s for a, s in self.values if a == arm)

    def has(self, *arms: str, metric: str | None = None) -> bool:
        """True when every arm has at least one seed (and ``metric``, if named, in each)."""
        for arm in arms:
            seeds = self.seeds(arm)
            if not seeds:
                return False
            if metric is not None and any(metric not in self.values[arm, s] for s in seeds):
                return False
        return True

    def arrays(self, arm: str, metric: str) -> list[np.ndarray]:
        """``arm``'s per-user arrays of ``metric``, one per seed in seed order."""
        return [self.values[arm, s][metric] for s in self.seeds(arm)]

    def _pairs(self, treatment: str, control: str, metric: str) -> list[int]:
        for arm in (treatment, control):
            if not self.has(arm, metric=metric):
                raise ValueError(f"no per-user values of {metric!r} recorded for arm {arm!r}")
        st, sc = self.seeds(treatment), self.seeds(control)
        if st != sc:
            raise ValueError(
                f"arms {treatment!r} and {control!r} must cover the same seeds, got {st} and {sc}"
            )
        return st

    def effect(
        self,
        treatment: str,
        control: str,
        metric: str,
        *,
        relative: bool = False,
        control_scale: float = 1.0,
        unit: str = "test users",
    ) -> Effect:
        """Paired effect of ``treatment`` over ``control`` on ``metric``, combined over seeds.

        Within a seed, the users where either arm's value is undefined (NaN) are left out of
        both arms (the same users stay paired). Seeds with no user left are skipped.

        Args:
            treatment: the arm claimed better (or worse, for a "<" finding).
            control: the arm it is compared with.
            metric: the metric key.
            relative: ``mean(treatment) / mean(control) - 1`` (delta-method interval per seed)
                instead of the mean difference.
            control_scale: multiplies the control's values first: a non-inferiority claim
                "within 3% of the control" is ``control_scale=0.97`` with minimum effect 0;
                "at most 5% above" is ``control_scale=1.05`` with direction ``"<"``.
            unit: what a unit inside a seed is, for the evidence line.

        Returns:
            The :class:`~benchmarks.stats.Effect` (one seed: paired t over its users; several:
            t over the per-seed paired effects). Undefined (INCONCLUSIVE) when no seed has a
            user with both values, or a relative effect's control mean is 0 in some seed.
        """
        if not (math.isfinite(control_scale) and control_scale > 0):
            raise ValueError(f"control_scale must be a finite number > 0, got {control_scale!r}")
        per_seed = []
        for s in self._pairs(treatment, control, metric):
            t, c = self.values[treatment, s][metric], self.values[control, s][metric]
            if t.shape != c.shape:
                raise ValueError(
                    f"arms {treatment!r} and {control!r} were evaluated on different users in "
                    f"seed {s}: {t.size} and {c.size} values of {metric!r}"
                )
            keep = np.isfinite(t) & np.isfinite(c)
            if not keep.any():
                continue
            t, c = t[keep], control_scale * c[keep]
            if relative and float(c.mean()) == 0.0:
                return undefined_effect(
                    unit, f"relative effect undefined: the control's mean is 0 in seed {s}",
                    "relative",
                )  # fmt: skip
            per_seed.append(paired_effect(t, c, relative=relative, unit=unit))
        if not per_seed:
            return undefined_effect(
                unit, "no user with a defined value", "relative" if relative else "absolute"
            )
        return combine_seeds(per_seed)

    def unpaired(
        self,
        treatment: str,
        control: str,
        metric: str,
        *,
        relative: bool = False,
        unit: str = "test users",
    ) -> Effect:
        """Welch effect per seed (the arms met different users), combined over seeds.

        For arms evaluated on different user sets within a seed (e.g. two logs with different
        held-out users); undefined values are dropped from each arm separately.
        """
        per_seed = []
        for s in self._pairs(treatment, control, metric):
            t, c = self.values[treatment, s][metric], self.values[control, s][metric]
            t, c = t[np.isfinite(t)], c[np.isfinite(c)]
            if t.size == 0 or c.size == 0:
                continue
            if relative and float(c.mean()) == 0.0:
                return undefined_effect(
                    unit, f"relative effect undefined: the control's mean is 0 in seed {s}",
                    "relative",
                )  # fmt: skip
            per_seed.append(unpaired_effect(t, c, relative=relative, unit=unit))
        if not per_seed:
            return undefined_effect(
                unit, "no user with a defined value", "relative" if relative else "absolute"
            )
        return combine_seeds(per_seed)


def _pearson_rows(rx: np.ndarray, ry: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row pair of ``rx`` and ``ry`` ``(R, n)``."""
    rx = rx - rx.mean(axis=1, keepdims=True)
    ry = ry - ry.mean(axis=1, keepdims=True)
    den = np.sqrt((rx * rx).sum(axis=1) * (ry * ry).sum(axis=1))
    out = np.full(rx.shape[0], np.nan)
    np.divide((rx * ry).sum(axis=1), den, out=out, where=den > 0)
    return out


def spearman_effect(
    x: np.ndarray,
    y: np.ndarray,
    rng: np.random.Generator,
    *,
    control_y: np.ndarray | None = None,
    reference: float = 0.0,
    n_resamples: int = 400,
    level: float = 0.95,
    unit: str = "items",
    chunk_elements: int = 1 << 22,
) -> Effect:
    """Spearman's rho of ``(x, y)`` against a bar, or against rho of ``(x, control_y)``.

    One seed's effect with a percentile-bootstrap interval over the units (items): the
    values are ranked once over all units (average ranks for ties; rho is the Pearson
    correlation of the ranks), and each resample draws units with replacement and
    correlates their ranks (for thousands of items the same distribution as re-ranking
    each resample, at a fraction of the cost). With ``control_y`` both correlations are
    computed on the same resample (paired), so what the two share cancels. Combine several
    seeds with :func:`benchmarks.stats.combine_seeds`.

    Args:
        x: ``(n,)`` e.g. log training counts of the warm items.
        y: ``(n,)`` e.g. the item-vector norms of one model.
        rng: generator of the resample indices.
        control_y: ``(n,)`` the other model's values (None: compare with ``reference``).
        reference: the bar (used without ``control_y``).
        n_resamples: bootstrap resamples (>= 100), drawn in chunks of ``chunk_elements``.
        level: confidence level.
        unit: what a unit is.
        chunk_elements: upper bound on resample indices drawn at once.

    Returns:
        An :class:`~benchmarks.stats.Effect` of ``rho(x, y) - reference`` or
        ``rho(x, y) - rho(x, control_y)``; undefined when a correlation is (constant input).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    cy = None if control_y is None else np.asarray(control_y, dtype=np.float64)
    if x.ndim != 1 or y.shape != x.shape or (cy is not None and cy.shape != x.shape):
        raise ValueError(
            f"x, y and control_y must be 1-D of one length, got {x.shape}, {y.shape}, "
            f"{None if cy is None else cy.shape}"
        )
    if int(n_resamples) < 100:
        raise ValueError(f"n_resamples must be >= 100, got {n_resamples}")
    from scipy.stats import rankdata

    n = x.size
    rx, ry = rankdata(x), rankdata(y)  # (n,) ranks over all units
    rc = None if cy is None else rankdata(cy)

    def stat(idx: np.ndarray) -> np.ndarray:  # (R, n) indices -> (R,) effects
        rho = _pearson_rows(rx[idx], ry[idx])
        return rho - (_pearson_rows(rx[idx], rc[idx]) if rc is not None else reference)

    whole = np.arange(n)[None, :]
    rho_t = float(_pearson_rows(rx[whole], ry[whole])[0])
    rho_c = reference if rc is None else float(_pearson_rows(rx[whole], rc[whole])[0])
    est = rho_t - rho_c
    what = "rho difference" if cy is not None else f"rho - {reference:g}"
    if not math.isfinite(est) or n < 3:
        return undefined_effect(unit, f"Spearman {what} undefined (constant input)")
    rows = max(1, int(chunk_elements) // n)
    boot = np.concatenate(
        [
            stat(rng.integers(0, n, size=(min(rows, int(n_resamples) - s), n)))
            for s in range(0, int(n_resamples), rows)
        ]
    )  # (n_resamples,)
    boot = boot[np.isfinite(boot)]
    alpha = 0.5 * (1.0 - level)
    lo, hi = (float(v) for v in np.quantile(boot, [alpha, 1.0 - alpha]))
    return Effect(
        estimate=est,
        low=lo,
        high=hi,
        n=n,
        unit=unit,
        method=f"percentile bootstrap over {unit} ({int(n_resamples)} resamples)",
        se=float(boot.std(ddof=1)),
        level=level,
        treatment=rho_t,
        control=rho_c,
    )


def choose_on_validation(
    valid_scores: Mapping[str, Sequence[float]], higher_is_better: bool = True
) -> str:
    """The candidate with the best validation score averaged over seeds.

    Only validation-period numbers may enter here; the test period only reports the chosen
    candidate's result. Ties go to the first candidate in the mapping's order.

    Args:
        valid_scores: candidate -> its validation score in each seed.
        higher_is_better: maximise (True) or minimise the mean score.

    Returns:
        The chosen candidate's name.

    Raises:
        ValueError: if there is no candidate, or a candidate has no finite score.
    """
    if not valid_scores:
        raise ValueError("valid_scores must name at least one candidate, got none")
    means = {}
    for name, scores in valid_scores.items():
        arr = np.asarray(list(scores), dtype=np.float64)
        if arr.size == 0 or not np.isfinite(arr).all():
            raise ValueError(
                f"candidate {name!r} needs finite validation scores, got {arr.tolist()}"
            )
        means[name] = float(arr.mean())
    sign = 1.0 if higher_is_better else -1.0
    return max(means, key=lambda n: sign * means[n])
