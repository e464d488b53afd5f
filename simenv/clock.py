"""One clock: what "item i is released at time t" means, everywhere.

The simulator keeps each user's clock in float64 days; observations and logs carry it as
float32 (``obs[Obs.CONTEXT][:, 0]``, the log's time column holds those float32 values), and
release times are float32. The definition shared by the env, the logging policies, the agents,
retrieval and the observation is

    released(i, t)  <=>  release_time[i] <= float32(t)

i.e. the comparison is made on the time the observation carries. Release times are float32
numbers, so comparing them with an observed time in float32 or in float64 gives the same answer;
only code that holds the float64 clock itself (the simulator, oracles) must round it first,
which :func:`released` does. (Before, the env compared with the float64 clock while policies
compared with the float32 observation: a clock just below a release time rounds up to it, the
policy saw the item as released and the env rejected it.) Rounding is monotone, so anything
released by the float64 clock is also released by this definition.
"""

from __future__ import annotations

import numpy as np

__all__ = ["observed_time", "released", "format_time"]


def observed_time(t: np.ndarray | float) -> np.ndarray:
    """The clock as observations carry it: float32 (same shape), the time "released" is decided at."""
    return np.asarray(t, dtype=np.float64).astype(np.float32)


def released(release_time: np.ndarray | float, t: np.ndarray | float) -> np.ndarray:
    """Bool array: ``release_time <= float32(t)``, with numpy broadcasting of the two shapes.

    Args:
        release_time: release times (rounded to float32 if given in another dtype).
        t: times (a float64 clock or an observed float32 time; broadcast against
            ``release_time``, e.g. ``released(rt[None, :], t[:, None])`` for a (B, N) mask).
    """
    return np.asarray(release_time, dtype=np.float32) <= observed_time(t)


def format_time(t: float) -> str:
    """A time with every digit that tells two float64 values apart (``%.17g``)."""
    return f"{float(t):.17g}"
