"""Tools of the search benchmarks: a plain torch baseline, synthetic vectors, operating points.

Benchmark-only code (moved out of :mod:`retrieval.index`, which serves searches):

- :func:`torch_topk`: the exact baseline the index is measured against: torch matmul +
  ``topk`` over the same item chunks and the same reused score buffer as the exact index, so
  that "exact index vs torch" compares the selection algorithm, not allocation;
- :func:`clustered_embeddings`: synthetic vectors shaped like trained two-tower embeddings;
- :func:`operating_points` and :func:`pareto_front`: sweep an approximate index's search
  knobs, measure recall@k against exact search and queries per second, keep the front
  (faiss contrib's ``OperatingPoints``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from retrieval.index import ItemIndex, recall_vs_exact
from simenv.device import resolve_device

__all__ = [
    "OperatingPoint",
    "OperatingPoints",
    "clustered_embeddings",
    "operating_points",
    "pareto_front",
    "torch_topk",
    "verify_setting",
]

# the exact index's score buffer: at most this many float32 scores at once (256 MiB)
SCORE_BUDGET = 1 << 26


def _matrix(name: str, x: np.ndarray | torch.Tensor, dim: int | None = None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"{name} must be 2-D (n, d) with d >= 1, got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} must have {dim} columns, got shape {x.shape}")
    return x


def torch_topk(
    item_vectors: np.ndarray | torch.Tensor,
    queries: np.ndarray | torch.Tensor,
    k: int,
    chunk: int = 262_144,
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Exact baseline: torch matmul + ``torch.topk``, best effort, chunked over items.

    The same work layout as the exact :class:`~retrieval.index.ItemIndex`: queries in blocks
    of ``SCORE_BUDGET / chunk`` rows, items in chunks of ``chunk``, every product written into
    one score buffer allocated once (``torch.matmul(out=)``), each chunk reduced to its top-k
    by plain ``topk`` and merged with the running top-k. Only the selection differs (the
    index selects through block maxima), so the ratio of the two measures that algorithm.

    Args:
        item_vectors: float ``(N, d)``.
        queries: float ``(B, d)``.
        k: results per query; when ``k > N`` the tail is padded with ``-1`` / ``-inf``.
        chunk: items per matmul.
        device: torch device of the products (see :mod:`simenv.device`).

    Returns:
        ``(ids int64 (B, k), scores float32 (B, k))``, scores descending.
    """
    x = _matrix("item_vectors", item_vectors)
    q = _matrix("queries", queries, dim=x.shape[1])
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    dev = resolve_device(device)
    xt, qt = torch.from_numpy(x).to(dev), torch.from_numpy(q).to(dev)
    n, b = x.shape[0], q.shape[0]
    kk = min(int(k), n)
    chunk = min(chunk, n)
    q_block = max(1, min(b, SCORE_BUDGET // chunk))
    buf = torch.empty(q_block * chunk, dtype=torch.float32, device=dev)  # reused
    out_v = torch.empty(b, kk, device=dev)
    out_i = torch.empty(b, kk, dtype=torch.int64, device=dev)
    for q0 in range(0, b, q_block):
        q1 = min(b, q0 + q_block)
        best_v = best_i = None
        for j0 in range(0, n, chunk):
            xc = xt[j0 : j0 + chunk]  # (c, d)
            s = buf[: (q1 - q0) * xc.shape[0]].view(q1 - q0, xc.shape[0])
            torch.matmul(qt[q0:q1], xc.T, out=s)  # (b, c)
            v, i = torch.topk(s, min(kk, xc.shape[0]), dim=1)
            i = i + j0
            if best_v is not None:
                both = torch.cat([best_v, v], dim=1)
                v, pos = torch.topk(both, min(kk, both.shape[1]), dim=1)
                i = torch.cat([best_i, i], dim=1).gather(1, pos)
            best_v, best_i = v, i
        out_v[q0:q1], out_i[q0:q1] = best_v, best_i
    ids, scores = out_i.cpu().numpy(), out_v.cpu().numpy()
    if kk < k:
        ids = np.pad(ids, ((0, 0), (0, k - kk)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, k - kk)), constant_values=-np.inf)
    return ids.astype(np.int64), scores.astype(np.float32)


@dataclass(frozen=True)
class OperatingPoint:
    """One measured setting of an approximate index.

    Attributes:
        settings: the search knobs, e.g. ``(("nprobe", 16), ("refine_factor", 4))``.
        recall: :func:`~retrieval.index.recall_vs_exact` at that setting.
        qps: queries per second (best of the repeats).
    """

    settings: tuple[tuple[str, int], ...]
    recall: float
    qps: float

    @property
    def label(self) -> str:
        """``"nprobe=16, refine_factor=4"``."""
        return ", ".join(f"{k}={v}" for k, v in self.settings)


@dataclass(frozen=True)
class OperatingPoints:
    """A sweep of an approximate index's search knobs (faiss contrib ``OperatingPoints``).

    Attributes:
        all: every measured point, in sweep order.
        pareto: the Pareto-optimal points (no other point is both at least as accurate and
            at least as fast, and better in one), by increasing recall.
        exact_qps: queries per second of exact search on the same queries.
    """

    all: tuple[OperatingPoint, ...]
    pareto: tuple[OperatingPoint, ...]
    exact_qps: float

    def fastest_with_recall(self, target: float) -> OperatingPoint | None:
        """The fastest Pareto point with recall >= target, or None if none reaches it."""
        ok = [p for p in self.pareto if p.recall >= target]
        return max(ok, key=lambda p: p.qps) if ok else None


def pareto_front(points: Sequence[OperatingPoint]) -> tuple[OperatingPoint, ...]:
    """Points not dominated in (recall, qps), by increasing recall (ties: faster first)."""
    ordered = sorted(points, key=lambda p: (-p.recall, -p.qps))
    front, best_qps = [], -math.inf
    for p in ordered:  # by decreasing recall: keep a point only if it is faster than all kept
        if p.qps > best_qps:
            front.append(p)
            best_qps = p.qps
    return tuple(reversed(front))


def _timed(fn: Callable[[], object], repeats: int, timer: Callable[[], float]) -> float:
    best = math.inf
    for _ in range(repeats):
        t0 = timer()
        fn()
        best = min(best, timer() - t0)
    return max(best, 1e-12)


_KNOBS = {"hnsw": ("ef_search",), "ivf": ("nprobe",), "ivfpq": ("nprobe", "refine_factor")}


def operating_points(
    index: ItemIndex,
    queries: np.ndarray | torch.Tensor,
    k: int,
    values: Sequence[int | Mapping[str, int]] | None = None,
    repeats: int = 2,
    timer: Callable[[], float] = time.perf_counter,
    exact_qps: float | None = None,
) -> OperatingPoints:
    """Sweep an approximate index's search knobs; measure recall@k and queries/s; keep the front.

    The index's own settings are restored afterwards.

    Args:
        index: an ``"hnsw"``, ``"ivf"`` or ``"ivfpq"`` index.
        queries: float ``(B, d)``.
        k: results per query.
        values: settings to try: ints (efSearch for HNSW, nprobe for IVF and IVF-PQ) or dicts
            of knobs (e.g. ``{"nprobe": 16, "refine_factor": 4}``); default powers of two
            (efSearch 16..1024, nprobe 1..nlist).
        repeats: timing repeats per setting (the fastest counts).
        timer: the clock; ``time.process_time`` with one thread measures CPU time, which a
            busy shared machine disturbs less than wall time.
        exact_qps: exact search's queries/s on the same queries, if already measured.
    """
    kind = index.config.kind
    if kind not in _KNOBS:
        raise ValueError(f"operating_points needs an approximate index, got kind {kind!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    q = _matrix("queries", queries, dim=index.dim)
    knobs = _KNOBS[kind]
    if values is None:
        top = 1024 if kind == "hnsw" else index.nlist
        values = [v for v in (2**i for i in range(11)) if (kind != "hnsw" or v >= 16) and v <= top]
    settings = [dict(v) if isinstance(v, Mapping) else {knobs[0]: int(v)} for v in values]
    if not settings or any(set(s) - set(knobs) or min(s.values()) < 1 or not s for s in settings):
        raise ValueError(f"values must be ints >= 1 or dicts of {knobs} >= 1, got {values!r}")
    c = index.config
    old = {"ef_search": c.ef_search, "nprobe": c.ivf_nprobe, "refine_factor": c.refine_factor}
    if exact_qps is None:
        exact_qps = len(q) / _timed(lambda: index.search_exact(q, k), repeats, timer)
    exact = index.search_exact(q, k)  # the reference of every setting, computed once
    points = []
    try:
        for s in settings:
            index.set_search_params(**s)
            t = _timed(lambda: index.search(q, k), repeats, timer)
            recall = recall_vs_exact(index, q, k, exact=exact)
            points.append(OperatingPoint(tuple(s.items()), recall, len(q) / t))
    finally:
        index.set_search_params(**{kk: old[kk] for kk in knobs})
    return OperatingPoints(tuple(points), pareto_front(points), float(exact_qps))


def clustered_embeddings(
    n_items: int,
    n_queries: int,
    dim: int,
    n_clusters: int = 64,
    seed: int = 0,
    spread: float = 0.6,
    norm_sigma: float = 0.3,
) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic item and query vectors shaped like trained two-tower embeddings.

    Trained embeddings are not iid Gaussian (on which every ANN index does poorly and no
    index is needed to see it): items gather around topic directions, cluster sizes are
    heavy-tailed, and dot-product models give popular items larger norms. Here: unit
    cluster directions ``c_j``; cluster sizes from a Zipf-like law; item direction
    ``normalise(c_j + spread * eps / sqrt(d))`` times a log-normal norm
    ``exp(norm_sigma * z)``; a query is a random mix of two cluster directions plus noise.

    Returns:
        ``(items float32 (n_items, dim), queries float32 (n_queries, dim))``.
    """
    for name, v in (("n_items", n_items), ("n_queries", n_queries), ("dim", dim)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if not isinstance(n_clusters, int) or not 1 <= n_clusters <= n_items:
        raise ValueError(f"n_clusters must be an int in [1, n_items={n_items}], got {n_clusters!r}")
    rng = np.random.default_rng(seed)

    def unit(x: np.ndarray) -> np.ndarray:
        return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    centres = unit(rng.standard_normal((n_clusters, dim)).astype(np.float32))  # (C, d)
    weights = 1.0 / np.arange(1, n_clusters + 1) ** 0.8
    cluster = rng.choice(n_clusters, size=n_items, p=weights / weights.sum())  # (N,)
    noise = rng.standard_normal((n_items, dim)).astype(np.float32) * (spread / math.sqrt(dim))
    items = unit(centres[cluster] + noise)  # (N, d)
    items *= np.exp(norm_sigma * rng.standard_normal((n_items, 1))).astype(np.float32)
    pair = rng.choice(n_clusters, size=(n_queries, 2), p=weights / weights.sum())  # (B, 2)
    mix = rng.uniform(0.5, 1.0, size=(n_queries, 1)).astype(np.float32)
    q_noise = rng.standard_normal((n_queries, dim)).astype(np.float32) * (spread / math.sqrt(dim))
    queries = mix * centres[pair[:, 0]] + (1 - mix) * centres[pair[:, 1]] + q_noise  # (B, d)
    return np.ascontiguousarray(items), np.ascontiguousarray(queries.astype(np.float32))


def verify_setting(
    index: ItemIndex,
    exact_index: ItemIndex,
    queries: np.ndarray,
    k: int,
    setting: Mapping[str, int],
    repeats: int = 3,
    timer: Callable[[], float] = time.perf_counter,
) -> tuple[np.ndarray, list[float], list[float]]:
    """A chosen setting on held-out queries: per-query recall and side-by-side queries/s.

    The setting was chosen on other queries (a sweep); here it is measured, not chosen. The
    approximate and the exact search alternate ``repeats`` times, so that machine noise
    common to a pair cancels in their ratio (:func:`benchmarks.stats.ratio_effect`).

    Returns:
        ``(recall per query (B,), approximate q/s per repeat, exact q/s per repeat)``.
    """
    index.set_search_params(**setting)
    q = _matrix("queries", queries, dim=index.dim)
    ann_ids = index.search(q, k)[0]
    ex_ids = exact_index.search(q, k)[0]
    n_true = np.maximum((ex_ids >= 0).sum(axis=1), 1)
    rows = np.arange(len(q))[:, None]
    keys = np.sort((rows * index.n_items + ex_ids)[ex_ids >= 0])
    probe = rows * index.n_items + ann_ids
    pos = np.minimum(np.searchsorted(keys, probe), keys.size - 1)
    hit = (keys[pos] == probe) & (ann_ids >= 0)
    recall = hit.sum(axis=1) / n_true
    t_ann, t_exact = [], []
    for _ in range(repeats):
        t_ann.append(len(q) / _timed(lambda: index.search(q, k), 1, timer))
        t_exact.append(len(q) / _timed(lambda: exact_index.search(q, k), 1, timer))
    return recall.astype(np.float64), t_ann, t_exact
