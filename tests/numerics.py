"""Float comparisons that hold on any machine, and the suite's thread count.

Two float32 results of the same formula computed with a different batch size, chunking,
thread count or BLAS kernel (AVX-512 here, AVX2 on an AMD EPYC, another blocking for
another matrix shape) are not bitwise equal: each kernel sums the products of a dot
product in its own order. What float32 arithmetic does promise is a bound on how far apart
two summation orders can land (Higham, "Accuracy and Stability of Numerical Algorithms",
2nd ed., eq. 4.4, recursive summation of ``n`` terms):

    |fl(sum x_i) - sum x_i| <= gamma_{n-1} * sum |x_i|,   gamma_k = k u / (1 - k u),

with ``u = 2**-24`` the unit roundoff of float32. Two orders of the same sum therefore differ
by at most ``2 gamma_{n-1} sum |x_i|``. A network of ``depth`` such reductions (layers)
compounds this to first order: ``2 * depth * gamma_n * scale``. :func:`reorder_tolerance`
returns that bound with ``scale`` the magnitude of the terms (by default the largest
absolute value of the expected result, which is the right size for well-conditioned
sums of terms of one sign and an underestimate under heavy cancellation: pass ``scale``
explicitly then).

Bitwise equality stays where the code promises it: the same computation rerun with the same
seed and the same shapes (a rerun), a pure gather / copy / integer operation, or one
documented at the assertion.

``SIMENV_TEST_THREADS`` (default 1) sets torch's and faiss' thread count for the whole suite
(see ``tests/conftest.py``); ``.ci/run`` runs the numerics tests a second time with 2, so
that an assertion which depends on the order of summation shows up on this machine too.
"""

from __future__ import annotations

import os

import numpy as np
import torch

__all__ = [
    "TEST_THREADS",
    "U32",
    "assert_reordered_close",
    "assert_top_k_of",
    "network_reductions",
    "reorder_tolerance",
]

#: unit roundoff of float32, u = 2**-24 (half the machine epsilon)
U32 = float(np.finfo(np.float32).eps) / 2


def _threads() -> int:
    raw = os.environ.get("SIMENV_TEST_THREADS", "1")
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"SIMENV_TEST_THREADS must be a positive int, got {raw!r}") from None
    if n < 1:
        raise ValueError(f"SIMENV_TEST_THREADS must be a positive int, got {raw!r}")
    return n


#: torch / faiss threads the suite runs with (``SIMENV_TEST_THREADS``, default 1)
TEST_THREADS = _threads()


def reorder_tolerance(terms: int, depth: int = 1, scale: float = 1.0) -> float:
    """Largest difference two summation orders of float32 reductions can produce.

    Args:
        terms: the longest reduction (dot-product length, number of summed rows).
        depth: how many reductions are chained (layers of a network).
        scale: magnitude of the summed terms (``sum |x_i|`` for a single sum).

    Returns:
        ``2 * depth * gamma_terms * scale`` with ``gamma_n = n u / (1 - n u)``, ``u = 2**-24``.
    """
    if terms < 1 or depth < 1:
        raise ValueError(f"terms and depth must be >= 1, got terms={terms}, depth={depth}")
    gamma = terms * U32 / (1.0 - terms * U32)
    return 2.0 * depth * gamma * float(scale)


def network_reductions(module: torch.nn.Module, *other_sums: int) -> tuple[int, int]:
    """``(terms, depth)`` of a network for :func:`reorder_tolerance`.

    ``terms`` is the widest ``Linear`` input (or a longer sum named in ``other_sums``, such as a
    pooled history length); ``depth`` the number of ``Linear`` layers, an upper bound on the
    longest chain of reductions (at least 1).
    """
    linear = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    terms = max([1, *(m.in_features for m in linear), *other_sums])
    return terms, max(1, len(linear))


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def assert_reordered_close(
    actual, expected, *, terms: int, depth: int = 1, scale: float | None = None, msg: str = ""
) -> None:
    """Assert two results of one float32 formula agree up to a reordering of its sums.

    Infinities (masked scores) must sit at the same places with the same sign; NaN at the
    same places; finite values within :func:`reorder_tolerance` (``scale`` defaults to the
    largest finite absolute value of ``expected``, at least 1e-30).

    Args:
        actual: tensor or array.
        expected: tensor or array of the same shape.
        terms: the longest reduction in the formula.
        depth: chained reductions (layers).
        scale: magnitude of the summed terms; None: ``max |expected|``.
        msg: prefix for the failure message.
    """
    a, e = _np(actual).astype(np.float64), _np(expected).astype(np.float64)
    assert a.shape == e.shape, f"{msg} shapes differ: {a.shape} vs {e.shape}"
    nan_a, nan_e = np.isnan(a), np.isnan(e)
    assert np.array_equal(nan_a, nan_e), f"{msg} NaN at different places"
    inf_a, inf_e = np.isinf(a), np.isinf(e)
    assert np.array_equal(inf_a, inf_e) and np.array_equal(a[inf_a], e[inf_e]), (
        f"{msg} infinities at different places"
    )
    fin = ~(nan_e | inf_e)
    if not fin.any():
        return
    if scale is None:
        scale = max(float(np.abs(e[fin]).max()), 1e-30)
    tol = reorder_tolerance(terms, depth, scale)
    diff = float(np.abs(a[fin] - e[fin]).max())
    assert diff <= tol, (
        f"{msg} max |difference| {diff:.3g} exceeds the float32 reordering bound {tol:.3g} "
        f"(terms={terms}, depth={depth}, scale={scale:.3g})"
    )


def assert_top_k_of(ids, reference, *, tol: float, msg: str = "") -> None:
    """Assert ``ids`` (B, k) are a best-first top-k of ``reference`` (B, N) up to ``tol``.

    Id -1 (padding) stands for a missing item, score -inf.

    For results computed in another batch layout than the reference: two items whose scores
    lie within the reordering bound may come in either order, so the ids themselves are not
    compared. Instead each row's ids are distinct and their reference scores, in the returned
    order, match the k best reference scores within ``tol`` (exactly for -inf).

    Args:
        ids: int (B, k) item ids, best first.
        reference: float (B, N) scores of every item.
        tol: the largest difference the two computations can have (:func:`reorder_tolerance`).
        msg: prefix for the failure message.
    """
    ids, ref = _np(ids), _np(reference).astype(np.float64)
    k = ids.shape[1]
    srt = np.sort(ids, axis=1)
    twice = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
    assert not twice.any(), f"{msg} an item appears twice in a row"
    got = np.where(ids >= 0, np.take_along_axis(ref, np.maximum(ids, 0), axis=1), -np.inf)
    want = -np.sort(-ref, axis=1)[:, :k]
    assert np.array_equal(np.isinf(got), np.isinf(want)), f"{msg} -inf at other ranks"
    fin = np.isfinite(want)
    diff = float(np.abs(got[fin] - want[fin]).max()) if fin.any() else 0.0
    assert diff <= 2 * tol, (
        f"{msg} a returned item's score is {diff:.3g} below the k best, more than 2 x {tol:.3g}"
    )
