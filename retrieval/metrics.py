"""Offline retrieval metrics: full catalog, batched numpy, never sampled.

Every per-user metric takes the arrays of a batch of B users and returns a float64 array
``(B,)``. A user for whom a metric is undefined (no held-out positive, an empty ranker list,
no retrieved item) gets ``NaN`` there, never a made-up 0 or 1; :func:`mean_over_users`
averages over the users where the metric is defined. Nothing else produces NaN.

Conventions:

- Item ids are int64 in ``[0, N)``; ``-1`` pads a row (a short retrieved list, fewer
  held-out positives, a ranker list shorter than k).
- ``retrieved`` ``(B, K)``: ranked lists, best first, no repeated id within a row.
- ``positives`` ``(B, P)``: held-out positives of each user, in any order; repeats count
  once.
- Membership is found by sorting (row-offset keys + ``searchsorted``), never by a Python
  loop per user or a ``(B, K, P)`` comparison.

Lecture terms: recall relative to the ranker ("completeness matters, not against the
positives but against what the ranker likes") is :func:`rrr_at_k`; folding ("different
groups overlap in the vector space") is measured by :func:`leakage_at_k`,
:func:`normalised_leakage`, :func:`cross_group_auc` and :func:`group_centroid_similarity`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata

from simenv.clock import released

__all__ = [
    "ItemSegment",
    "coverage",
    "cross_group_auc",
    "group_centroid_similarity",
    "hit_rate_at_k",
    "item_segments",
    "leakage_at_k",
    "mean_over_users",
    "ndcg_at_k",
    "normalised_leakage",
    "popularity_bias",
    "recall_at_k",
    "recall_by_segment",
    "rrr_at_k",
    "rrr_curve",
    "weighted_rrr_at_k",
]

# Elements per row block in cross_group_auc (bounds rankdata's temporaries to ~100 MiB).
_AUC_BLOCK = 1 << 21


class ItemSegment(enum.IntEnum):
    """Item segment codes returned by :func:`item_segments`."""

    HEAD = 0
    TORSO = 1
    TAIL = 2
    COLD = 3


# ------------------------------------------------------------------------- validation
def _ids(name: str, x: np.ndarray, ndim: int = 2, n_items: int | None = None) -> np.ndarray:
    """Integer id array of ``ndim`` dims with values in ``[-1, n_items)`` as int64."""
    a = np.asarray(x)
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integer ids, got dtype {a.dtype}")
    a = a.astype(np.int64, copy=False)
    if a.size and a.min() < -1:
        raise ValueError(f"{name} ids must be >= -1 (-1 = padding), got min {a.min()}")
    if n_items is not None and a.size and a.max() >= n_items:
        raise ValueError(f"{name} ids must be < n_items={n_items}, got max {a.max()}")
    return a


def _groups(name: str, x: np.ndarray, length: int | None = None) -> np.ndarray:
    """Non-negative integer group labels, 1-D, optionally of a given length."""
    a = np.asarray(x)
    if a.ndim != 1 or (length is not None and a.shape[0] != length):
        want = f"({length},)" if length is not None else "1-D"
        raise ValueError(f"{name} must have shape {want}, got {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integer group ids, got dtype {a.dtype}")
    a = a.astype(np.int64, copy=False)
    if a.size and a.min() < 0:
        raise ValueError(f"{name} must be >= 0, got min {a.min()}")
    return a


def _check_k(k: int, width: int, name: str = "retrieved") -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= width:
        raise ValueError(f"k must be an int in [1, {width}] (the width of {name}), got {k!r}")
    return int(k)


def _same_batch(**arrays: np.ndarray) -> int:
    sizes = {name: a.shape[0] for name, a in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"batch sizes differ: {sizes}")
    return next(iter(sizes.values()))


def _check_unique_rows(name: str, a: np.ndarray) -> None:
    """Raise if a row of ``a`` repeats a (non-padding) id."""
    if a.shape[1] < 2:
        return
    s = np.sort(a, axis=1)
    dup = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)
    if dup.any():
        row = int(np.flatnonzero(dup.any(axis=1))[0])
        raise ValueError(f"{name} must not repeat an item within a row; row {row} does")


def _dedupe_rows(a: np.ndarray) -> np.ndarray:
    """Rows sorted, each repeated id after its first occurrence replaced by -1."""
    s = np.sort(a, axis=1)
    if s.shape[1] > 1:
        s[:, 1:][s[:, 1:] == s[:, :-1]] = -1
    return s


def _positions(lists: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Position of each ``queries[b, j]`` in row ``lists[b]``; ``K`` where absent or -1.

    Args:
        lists: int64 (B, K), ids >= -1, no repeats within a row (else the first counts).
        queries: int64 (B, Q).

    Returns:
        int64 (B, Q) positions in ``[0, K]``.
    """
    b, width = lists.shape
    if width == 0 or queries.size == 0:
        return np.full(queries.shape, width, dtype=np.int64)
    m = int(max(lists.max(), queries.max(), 0)) + 2  # key stride > every id + 1
    rows = np.arange(b, dtype=np.int64)[:, None]
    keys = (rows * m + lists).ravel()  # padding -1 maps to row*m - 1, never a real key
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    q_keys = rows * m + queries  # (B, Q)
    pos = np.minimum(np.searchsorted(sorted_keys, q_keys), sorted_keys.size - 1)
    found = (sorted_keys[pos] == q_keys) & (queries >= 0)
    return np.where(found, order[pos] % width, width)


def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` as float64, NaN where ``den == 0`` (no warning)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _discounts(n: int) -> np.ndarray:
    """``1 / log2(j + 2)`` for positions ``j = 0 .. n - 1`` (DCG discount)."""
    return 1.0 / np.log2(np.arange(n, dtype=np.float64) + 2.0)


def mean_over_users(values: np.ndarray) -> float:
    """Mean of a per-user metric over the users where it is defined (NaN skipped).

    Returns NaN only when no user has a defined value (e.g. nobody has a positive).
    """
    v = np.asarray(values, dtype=np.float64)
    defined = ~np.isnan(v)
    return float(v[defined].mean()) if defined.any() else math.nan


# ------------------------------------------------------------- against held-out positives
def _hits(
    retrieved: np.ndarray, positives: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Validate the inputs and locate the positives in the top-k.

    Returns:
        positions (B, P) of the distinct positives in the top-k (``k`` where not
        retrieved), the number of distinct positives (B,), and k.
    """
    r = _ids("retrieved", retrieved)
    p = _ids("positives", positives)
    _same_batch(retrieved=r, positives=p)
    k = _check_k(k, r.shape[1])
    _check_unique_rows("retrieved", r)
    p = _dedupe_rows(p)
    return _positions(r[:, :k], p), (p >= 0).sum(axis=1), k


def recall_at_k(
    retrieved: np.ndarray, positives: np.ndarray, k: int, capped: bool = True
) -> np.ndarray:
    """Recall@k of each user: retrieved positives in the top-k over the number of positives.

    ``recall = |top-k ∩ positives| / min(|positives|, k)`` (``capped=True``, the default:
    a user with more than k positives can still reach 1), or ``/ |positives|`` with
    ``capped=False``.

    Args:
        retrieved: int ``(B, K)`` ranked lists, ``-1`` padding, no repeats in a row.
        positives: int ``(B, P)`` held-out positives, ``-1`` padding.
        k: cut-off, ``1 <= k <= K``.
        capped: denominator ``min(|positives|, k)`` (True) or ``|positives|`` (False).

    Returns:
        float64 ``(B,)`` in ``[0, 1]``; NaN for users without a positive.
    """
    pos, n_pos, k = _hits(retrieved, positives, k)
    hits = (pos < k).sum(axis=1)
    return _divide(hits, np.minimum(n_pos, k) if capped else n_pos)


def ndcg_at_k(retrieved: np.ndarray, positives: np.ndarray, k: int) -> np.ndarray:
    """NDCG@k with binary gains.

    ``DCG = sum over top-k positions j (0-based) holding a positive of 1 / log2(j + 2)``;
    the ideal DCG puts ``min(|positives|, k)`` positives at the top:
    ``IDCG = sum_{j < min(|P|, k)} 1 / log2(j + 2)``.

    Returns:
        float64 ``(B,)`` in ``[0, 1]``; NaN for users without a positive.
    """
    pos, n_pos, k = _hits(retrieved, positives, k)
    disc = np.append(_discounts(k), 0.0)  # position k (= not retrieved) gains 0
    dcg = disc[pos].sum(axis=1)
    ideal = np.concatenate([[0.0], np.cumsum(_discounts(k))])[np.minimum(n_pos, k)]
    return _divide(dcg, ideal)


def hit_rate_at_k(retrieved: np.ndarray, positives: np.ndarray, k: int) -> np.ndarray:
    """1 if at least one positive is in the top-k, else 0; NaN for users without a positive."""
    pos, n_pos, k = _hits(retrieved, positives, k)
    hit = (pos < k).any(axis=1).astype(np.float64)
    return np.where(n_pos > 0, hit, np.nan)


# --------------------------------------------------------------- relative to the ranker
def _ranker_positions(
    generator: np.ndarray, ranker: np.ndarray, gen_name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Positions (B, k) of the ranker's items in the generator lists; validity mask (B, k)."""
    g = _ids(gen_name, generator)
    r = _ids("ranker_topk", ranker)
    _same_batch(**{gen_name: g, "ranker_topk": r})
    if g.shape[1] < 1 or r.shape[1] < 1:
        raise ValueError(
            f"{gen_name} and ranker_topk need at least one column, got {g.shape}, {r.shape}"
        )
    _check_unique_rows(gen_name, g)
    _check_unique_rows("ranker_topk", r)
    return _positions(g, r), r >= 0


def rrr_at_k(generator_topK: np.ndarray, ranker_topk: np.ndarray) -> np.ndarray:  # noqa: N803
    """Recall relative to the ranker: ``RRR@K,k = |G_K ∩ R_k| / k``.

    ``G_K`` is the generator's top-K over the whole catalog (all K columns of
    ``generator_topK``), ``R_k`` the ranker's top-k over the whole catalog. ``k`` is the
    number of real (non ``-1``) entries of the user's ranker row.

    Args:
        generator_topK: int ``(B, K)``.
        ranker_topk: int ``(B, k)``.

    Returns:
        float64 ``(B,)`` in ``[0, 1]``; NaN for a user whose ranker row is empty.
    """
    pos, valid = _ranker_positions(generator_topK, ranker_topk, "generator_topK")
    found = (pos < generator_topK.shape[1]) & valid
    return _divide(found.sum(axis=1), valid.sum(axis=1))


def weighted_rrr_at_k(generator_topK: np.ndarray, ranker_topk: np.ndarray) -> np.ndarray:  # noqa: N803
    """Rank-weighted RRR: the ranker's favourites count more.

    The j-th item of ``R_k`` (0-based) carries gain ``1 / log2(j + 2)``; the score is the
    gain of the ``R_k`` items found in ``G_K`` over the gain of all real ``R_k`` items (the
    ideal, reached when ``G_K`` holds all of ``R_k``).

    Returns:
        float64 ``(B,)`` in ``[0, 1]``; NaN for a user whose ranker row is empty.
    """
    pos, valid = _ranker_positions(generator_topK, ranker_topk, "generator_topK")
    gain = _discounts(ranker_topk.shape[1])[None, :] * valid  # (B, k)
    found = pos < generator_topK.shape[1]
    return _divide((gain * found).sum(axis=1), gain.sum(axis=1))


def rrr_curve(
    generator_ranked: np.ndarray,
    ranker_topk: np.ndarray,
    Ks: Sequence[int] = (50, 100, 200, 500),  # noqa: N803
    weighted: bool = False,
) -> dict[int, np.ndarray]:
    """RRR@K,k for several K from one ranked generator list (positions found once).

    Args:
        generator_ranked: int ``(B, Kmax)`` the generator's ranked list, best first.
        ranker_topk: int ``(B, k)``.
        Ks: cut-offs, each in ``[1, Kmax]``.
        weighted: rank-weighted RRR (:func:`weighted_rrr_at_k`) instead of plain.

    Returns:
        ``{K: float64 (B,)}``; NaN for users whose ranker row is empty.
    """
    pos, valid = _ranker_positions(generator_ranked, ranker_topk, "generator_ranked")
    kmax = generator_ranked.shape[1]
    ks = [int(_check_k(K, kmax, "generator_ranked")) for K in Ks]
    gain = (_discounts(ranker_topk.shape[1])[None, :] if weighted else 1.0) * valid  # (B, k)
    total = gain.sum(axis=1)
    return {K: _divide((gain * (pos < K)).sum(axis=1), total) for K in ks}


# --------------------------------------------------------------------------- folding
def leakage_at_k(
    retrieved: np.ndarray, item_group: np.ndarray, user_group: np.ndarray, k: int
) -> np.ndarray:
    """Share of a user's top-k retrieved items from groups other than the user's.

    Disjoint groups (think languages): a user never engages outside their group, so any
    other-group item retrieved is folding at work.

    Args:
        retrieved: int ``(B, K)``, ``-1`` padding.
        item_group: int ``(N,)`` group of each item.
        user_group: int ``(B,)`` group of each user.
        k: cut-off, ``1 <= k <= K``.

    Returns:
        float64 ``(B,)`` in ``[0, 1]`` over the real entries of the top-k; NaN for a user
        with none.
    """
    ig = _groups("item_group", item_group)
    r = _ids("retrieved", retrieved, n_items=ig.shape[0])
    ug = _groups("user_group", user_group, length=r.shape[0])
    k = _check_k(k, r.shape[1])
    top = r[:, :k]
    valid = top >= 0
    other = (ig[np.where(valid, top, 0)] != ug[:, None]) & valid  # (B, k)
    return _divide(other.sum(axis=1), valid.sum(axis=1))


def normalised_leakage(
    retrieved: np.ndarray,
    item_group: np.ndarray,
    user_group: np.ndarray,
    k: int,
    eligible: np.ndarray | None = None,
) -> np.ndarray:
    """Leakage@k divided by the leakage of random retrieval, so random = 1 and 0 = none.

    Random retrieval (uniform over the eligible items) has expected leakage equal to the
    share of eligible items outside the user's group: over the whole catalog by default,
    or over ``eligible`` (bool ``(N,)`` or ``(B, N)``, e.g. released items).

    Returns:
        float64 ``(B,)`` (>= 0, may exceed 1); NaN where leakage@k is NaN or where every
        eligible item is in the user's group (random retrieval cannot leak).
    """
    leak = leakage_at_k(retrieved, item_group, user_group, k)
    ig = np.asarray(item_group, dtype=np.int64)
    ug = np.asarray(user_group, dtype=np.int64)
    n, b = ig.shape[0], ug.shape[0]
    if eligible is None:
        counts = np.bincount(ig, minlength=int(max(ig.max(initial=0), ug.max(initial=0))) + 1)
        outside, total = n - counts[ug], np.full(b, n)
    else:
        e = np.asarray(eligible)
        if e.dtype != np.bool_ or e.shape not in ((n,), (b, n)):
            raise ValueError(
                f"eligible must be a bool mask of shape ({n},) or ({b}, {n}), "
                f"got dtype {e.dtype} shape {e.shape}"
            )
        if e.ndim == 1:
            counts = np.bincount(
                ig[e], minlength=int(max(ig.max(initial=0), ug.max(initial=0))) + 1
            )
            outside, total = int(e.sum()) - counts[ug], np.full(b, int(e.sum()))
        else:
            outside = (e & (ig[None, :] != ug[:, None])).sum(axis=1)
            total = e.sum(axis=1)
    random_share = _divide(outside, total)
    return _divide(leak, np.where(np.isnan(random_share), 0.0, random_share))


def cross_group_auc(
    scores: np.ndarray,
    item_group: np.ndarray,
    user_group: np.ndarray,
    positives: np.ndarray,
    eligible: np.ndarray | None = None,
) -> np.ndarray:
    """Per user: P[score(in-group non-positive item) > score(other-group item)].

    Ties count 1/2. Computed exactly by the Mann-Whitney rank-sum: the eligible in-group
    non-positive items (A) and the eligible other-group items (O) of each row are ranked
    together (average ranks for ties; other items are NaN and left out of the ranking),
    and ``AUC = (sum of A's ranks - |A| (|A| + 1) / 2) / (|A| |O|)``. 0.5 means the model
    cannot tell the user's group from the others (fully folded), 1 means every in-group
    item outscores every other-group item (groups separated). Positives are left out of A
    so the metric measures the space, not the fit to the held-out items.

    Args:
        scores: float ``(B, N)`` the model's score of every item for every user.
        item_group: int ``(N,)``.
        user_group: int ``(B,)``.
        positives: int ``(B, P)`` held-out positives, ``-1`` padding.
        eligible: optional bool ``(N,)`` or ``(B, N)`` items to consider (e.g. released).

    Returns:
        float64 ``(B,)`` in ``[0, 1]``; NaN where A or O is empty.
    """
    s = np.asarray(scores)
    if s.ndim != 2 or not np.issubdtype(s.dtype, np.floating):
        raise ValueError(f"scores must be a 2-D float array (B, N), got {s.dtype} {s.shape}")
    b, n = s.shape
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite; found NaN or inf")
    ig = _groups("item_group", item_group, length=n)
    ug = _groups("user_group", user_group, length=b)
    p = _ids("positives", positives, n_items=n)
    _same_batch(scores=s, positives=p)
    if eligible is not None:
        e = np.asarray(eligible)
        if e.dtype != np.bool_ or e.shape not in ((n,), (b, n)):
            raise ValueError(
                f"eligible must be a bool mask of shape ({n},) or ({b}, {n}), "
                f"got dtype {e.dtype} shape {e.shape}"
            )
        e = np.broadcast_to(e, (b, n))
    out = np.full(b, np.nan)
    block = max(1, _AUC_BLOCK // max(n, 1))
    for r0 in range(0, b, block):  # row blocks bound the memory; each block is vectorised
        r1 = min(b, r0 + block)
        same = ig[None, :] == ug[r0:r1, None]  # (rb, N)
        pos = np.zeros((r1 - r0, n), dtype=bool)
        pr = p[r0:r1]
        rr = np.broadcast_to(np.arange(r1 - r0)[:, None], pr.shape)
        pos[rr[pr >= 0], pr[pr >= 0]] = True
        a = same & ~pos
        o = ~same
        if eligible is not None:
            a &= e[r0:r1]
            o &= e[r0:r1]
        x = np.where(a | o, s[r0:r1].astype(np.float64), np.nan)
        ranks = rankdata(x, method="average", axis=1, nan_policy="omit")  # (rb, N)
        n_a = a.sum(axis=1).astype(np.float64)
        n_o = o.sum(axis=1).astype(np.float64)
        u = np.where(a, ranks, 0.0).sum(axis=1) - n_a * (n_a + 1) / 2  # Mann-Whitney U
        out[r0:r1] = _divide(u, n_a * n_o)
    return out


def group_centroid_similarity(
    item_vectors: np.ndarray,
    item_group: np.ndarray,
    n_groups: int | None = None,
    normalise: bool = True,
) -> np.ndarray:
    """Cosine similarity between group centroids ``(G, G)`` (for the folding plot).

    The centroid of a group is the mean of its items' vectors, each first scaled to unit
    length when ``normalise`` (the default: directions, so that a few long popular vectors
    do not decide the centroid). Separated groups give off-diagonal values near or below 0;
    folded groups give values near 1. A zero centroid has similarity 0 with everything.

    Args:
        item_vectors: float ``(N, d)``.
        item_group: int ``(N,)``.
        n_groups: G; default ``max(item_group) + 1``. Every group must have an item.
        normalise: scale each item vector to unit length before averaging.

    Returns:
        float64 ``(G, G)``, symmetric, diagonal 1 (0 for a zero centroid).
    """
    v = np.asarray(item_vectors, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"item_vectors must be 2-D (N, d), got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError("item_vectors must be finite; found NaN or inf")
    ig = _groups("item_group", item_group, length=v.shape[0])
    g = int(ig.max(initial=-1)) + 1 if n_groups is None else n_groups
    if not isinstance(g, int) or g < 1 or (ig.size and ig.max() >= g):
        raise ValueError(f"n_groups must be an int > max(item_group)={ig.max()}, got {g!r}")
    sizes = np.bincount(ig, minlength=g)
    if (sizes == 0).any():
        raise ValueError(f"every group needs an item; empty groups {np.flatnonzero(sizes == 0)}")
    if normalise:
        v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-300)
    sums = np.zeros((g, v.shape[1]))
    np.add.at(sums, ig, v)
    centroids = sums / sizes[:, None]  # (G, d)
    norms = np.linalg.norm(centroids, axis=1, keepdims=True)
    unit = np.divide(centroids, norms, out=np.zeros_like(centroids), where=norms > 0)
    return unit @ unit.T


# ------------------------------------------------------------------- catalog-level
def coverage(retrieved: np.ndarray, n_items: int, k: int | None = None) -> float:
    """Distinct items retrieved (in the top-k of any user; all columns by default) / N."""
    if not isinstance(n_items, (int, np.integer)) or n_items < 1:
        raise ValueError(f"n_items must be an int >= 1, got {n_items!r}")
    r = _ids("retrieved", retrieved, n_items=int(n_items))
    top = r if k is None else r[:, : _check_k(k, r.shape[1])]
    return float(np.unique(top[top >= 0]).size / n_items)


def popularity_bias(
    retrieved: np.ndarray, item_popularity: np.ndarray, k: int | None = None
) -> np.ndarray:
    """Mean log popularity of each user's retrieved items: ``mean(log(1 + count))``.

    Popularity counts get +1 so that never-seen items (count 0) have a finite log (0).

    Args:
        retrieved: int ``(B, K)``, ``-1`` padding.
        item_popularity: ``(N,)`` non-negative counts (e.g. training interactions).
        k: cut-off (default all K columns).

    Returns:
        float64 ``(B,)``; NaN for a user with no retrieved item.
    """
    pop = np.asarray(item_popularity, dtype=np.float64)
    if pop.ndim != 1 or not np.isfinite(pop).all() or (pop < 0).any():
        raise ValueError("item_popularity must be a 1-D array of finite counts >= 0")
    r = _ids("retrieved", retrieved, n_items=pop.shape[0])
    top = r if k is None else r[:, : _check_k(k, r.shape[1])]
    valid = top >= 0
    logp = np.log1p(pop)[np.where(valid, top, 0)] * valid  # (B, k)
    return _divide(logp.sum(axis=1), valid.sum(axis=1))


# ------------------------------------------------------------------------ segments
def item_segments(
    train_counts: np.ndarray,
    release_time: np.ndarray,
    cutoff: float,
    head_share: float = 0.2,
    tail_share: float = 0.5,
) -> np.ndarray:
    """Segment code (:class:`ItemSegment`) of every item: HEAD, TORSO, TAIL or COLD.

    Precisely:

    - COLD: released after the training cut-off, ``release_time > cutoff``; the rest are
      warm (``n_warm`` items).
    - Warm items are ordered by training count, most counted first, equal counts by item
      id. HEAD: the first ``ceil(head_share * n_warm)``; TAIL: the last
      ``floor(tail_share * n_warm)``; TORSO: those in between.
    - A warm item never seen in training (count 0) is TAIL wherever it falls in the order.

    Args:
        train_counts: ``(N,)`` interactions of each item in the training split (>= 0).
        release_time: ``(N,)`` release time (days).
        cutoff: the training cut-off time (days).
        head_share: share of warm items in the head, ``[0, 1]``.
        tail_share: share of warm items in the tail, ``[0, 1 - head_share]``.

    Returns:
        int8 ``(N,)`` segment codes.
    """
    c = np.asarray(train_counts)
    if c.ndim != 1 or not np.isfinite(c.astype(np.float64)).all() or (c < 0).any():
        raise ValueError("train_counts must be a 1-D array of finite counts >= 0")
    rt = np.asarray(release_time, dtype=np.float64)
    if rt.shape != c.shape:
        raise ValueError(f"release_time must have shape {c.shape}, got {rt.shape}")
    if not math.isfinite(cutoff):
        raise ValueError(f"cutoff must be a finite time, got {cutoff!r}")
    if not 0.0 <= head_share <= 1.0:
        raise ValueError(f"head_share must be in [0, 1], got {head_share!r}")
    if not 0.0 <= tail_share <= 1.0 - head_share:
        raise ValueError(
            f"tail_share must be in [0, 1 - head_share={1 - head_share}], got {tail_share!r}"
        )
    seg = np.full(c.shape[0], ItemSegment.COLD, dtype=np.int8)
    warm = np.flatnonzero(released(rt, cutoff))  # simenv.clock
    n_warm = warm.size
    order = warm[np.lexsort((warm, -c[warm]))]  # most counted first, ties by id
    n_head = math.ceil(head_share * n_warm - 1e-9)
    n_tail = math.floor(tail_share * n_warm + 1e-9)
    seg[order] = ItemSegment.TORSO
    seg[order[:n_head]] = ItemSegment.HEAD
    seg[order[n_warm - n_tail :]] = ItemSegment.TAIL
    seg[warm[c[warm] == 0]] = ItemSegment.TAIL
    return seg


def recall_by_segment(
    retrieved: np.ndarray,
    positives: np.ndarray,
    segments: np.ndarray,
    k: int,
    capped: bool = True,
) -> dict[str, float]:
    """Recall@k over the positives of each item segment, averaged over users.

    For segment s, each user's positives are restricted to the items of s and
    :func:`recall_at_k` is taken (denominator ``min(|positives in s|, k)``, or
    ``|positives in s|`` with ``capped=False``); the mean is over users with at least one
    positive in s.

    Args:
        retrieved: int ``(B, K)``.
        positives: int ``(B, P)``, ``-1`` padding.
        segments: int ``(N,)`` codes from :func:`item_segments`.
        k: cut-off.
        capped: denominator ``min(|P_s|, k)`` (True) or ``|P_s|`` (False).

    Returns:
        ``{"head": r, "torso": r, "tail": r, "cold": r}``; NaN for a segment none of whose
        items is a positive of any user.
    """
    seg = np.asarray(segments)
    if seg.ndim != 1 or not np.issubdtype(seg.dtype, np.integer):
        raise ValueError(f"segments must be a 1-D integer array, got {seg.dtype} {seg.shape}")
    if seg.size and (seg.min() < 0 or seg.max() > max(ItemSegment)):
        raise ValueError(f"segments must be ItemSegment codes in [0, {max(ItemSegment)}]")
    p = _ids("positives", positives, n_items=seg.shape[0])
    _ids("retrieved", retrieved, n_items=seg.shape[0])
    p_seg = seg[np.where(p >= 0, p, 0)]
    return {
        s.name.lower(): mean_over_users(
            recall_at_k(retrieved, np.where((p >= 0) & (p_seg == s), p, -1), k, capped)
        )
        for s in ItemSegment
    }
