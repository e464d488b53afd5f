"""Maximum inner product search (MIPS) over cached item vectors.

The two towers bind late: item vectors are computed once and cached, and a user vector is
computed per request, so candidate generation is a maximum inner product search over the
cached item vectors (lecture: "MIPS (maximum inner product search)"; "item vectors need not
be recomputed per user, they can be cached"). This module serves that search:

- ``kind="exact"``: brute force, batched torch matmul + top-k over item chunks, with
  exclusion and eligibility masks applied inside the chunk (masked matmul + top-k).
- ``kind="hnsw"``: a faiss HNSW graph (``IndexHNSWFlat``) over the MIPS-to-L2 reduction of
  the items, plus an exactly scored side set of the longest vectors.
- ``kind="ivf"``: a faiss inverted file (``IndexIVFFlat``, inner-product metric).
- ``kind="ivfpq"``: a faiss inverted file of 4-bit product-quantised codes scanned with SIMD
  lookup tables (``IndexIVFPQFastScan``, inner product), whose shortlist of
  ``refine_factor * k`` candidates is re-ranked by exact inner products from the stored
  vectors (what ``IndexRefineFlat`` does, without a second copy of the vectors). The codes
  take ``pq_m / 2`` bytes per item instead of ``4 d``, and scanning them is several times
  faster than scanning float vectors, which pays at millions of items.

Why torch and not faiss for the exact kind: measured on the project's 2-core machine
(1,000,000 x 64 items, 1,000 queries, top-100) faiss ``IndexFlatIP`` answered about
80 queries/s against 400 for one torch matmul + topk, because faiss collects the top-k of
every query with a heap after each BLAS block while torch selects with a vectorised
``topk``. The exact kind goes one step further than plain ``topk``: inside each chunk it
takes the maximum of every block of ``exact_block`` scores, keeps the ``k`` best blocks and
runs ``topk`` only over their ``k * exact_block`` scores. The k best scores of a row always
lie in its k best blocks (each of them is at most as large as the maximum of its block, and
a block left out has k kept blocks whose maxima are at least as large), so the result is
exact, not approximate. Same workload, one thread, CPU seconds: 3.2 s against 4.2 s for
the same chunks and score buffer with plain ``topk`` (``benchmarks.search.torch_topk``, the
baseline of ``python -m benchmarks perf``).

Constraints (``search(..., exclude=, allowed=)``): items a user already consumed
(``exclude``), and eligibility (``allowed``: a boolean mask over the items, per query or for
all queries, or a :class:`ReleaseCutoff` so unreleased items are never returned). The exact
kind masks scores to ``-inf`` before the top-k. The approximate kinds over-fetch (search
``k + margin``), filter, and search again only the rows that came up short (vectorised over
rows; one faiss call per group of rows with the same settings, never per user): IVF rows
whose probed cells ran dry probe twice as many cells, other rows fetch four times as many.
A mask shared by all queries is pushed into faiss as an ``IDSelectorBitmap``. HNSW rows
still short when the fetch would pass a quarter of the catalog are answered by the exact
kind. So a row is short only when fewer than ``k`` items are eligible; short rows are padded
with id ``-1`` and score ``-inf``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass

import faiss
import numpy as np
import torch

from simenv.arrays import check_item_ids
from simenv.clock import observed_time, released
from simenv.device import check_device, resolve_device

__all__ = [
    "IndexConfig",
    "ItemIndex",
    "ReleaseCutoff",
    "build_index",
    "recall_vs_exact",
]

KINDS = ("exact", "hnsw", "ivf", "ivfpq")
_IVF_KINDS = ("ivf", "ivfpq")
METRICS = ("ip", "cosine")

# Scores buffer of the exact search: at most this many float32 scores at once (256 MiB).
_SCORE_BUDGET = 1 << 26
# Cosine: vectors with a smaller norm are treated as having this norm (a zero vector stays 0).
_NORM_EPS = 1e-12


@dataclass(frozen=True)
class IndexConfig:
    """How the item index is built and searched.

    Attributes:
        kind: ``"exact"`` (brute force in torch, always correct), ``"hnsw"`` (faiss HNSW
            graph), ``"ivf"`` (faiss inverted file, k-means cells) or ``"ivfpq"`` (inverted
            file of 4-bit PQ codes with fast scan, shortlist re-ranked exactly).
        metric: ``"ip"`` (inner product, the two-tower dot product) or ``"cosine"``
            (items and queries are l2-normalised, then inner product).
        hnsw_m: HNSW ``M``: links per node per layer. Memory grows as ``N * M * 8`` bytes on
            top of the vectors; a larger M gives better recall at a given efSearch and a
            slower build. Typical 16-64; 32 suits d = 32-128.
        ef_construction: HNSW ``efConstruction``: candidate-list size while inserting.
            Higher builds a better graph (recall at a given efSearch), slower to build.
            Typical 40 (faiss default) to 500; 200 is a good default.
        ef_search: HNSW ``efSearch``: candidate-list size while searching; faiss uses
            ``max(efSearch, k)``. Recall rises and queries/s fall as it grows. Typical
            16-1024; top-100 at recall 0.95 took efSearch 384 on 20,000 clustered
            vectors (d = 64) and more than 512 on 100,000. Tune with
            ``benchmarks.search.operating_points``.
        ivf_nlist: IVF number of k-means cells; ``0`` picks ``round(4 * sqrt(N))``, capped
            so every cell has at least 39 training points (faiss' minimum). Typical
            ``4 * sqrt(N)`` to ``16 * sqrt(N)``; more cells make each probe cheaper and
            the k-means training longer.
        ivf_nprobe: IVF cells visited per query (capped at nlist; also ``"ivfpq"``). The
            search time grows about linearly in nprobe, recall saturates; ``nprobe = nlist`` is exact. Typical
            1-256; top-100 at recall 0.95 took about 10% of nlist on clustered vectors
            (48 of 512 cells at N = 20,000, 128 of 1,265 at N = 100,000). Tune with
            ``benchmarks.search.operating_points``.
        pq_m: ``"ivfpq"``: sub-quantisers M (4-bit codes, so M / 2 bytes per item); ``0``
            picks ``d / 2`` (two dimensions per code). Must divide d and be even (fast scan
            packs codes in pairs). More sub-quantisers: better codes, slower scans.
        refine_factor: ``"ivfpq"``: the PQ scan returns ``refine_factor * k`` candidates,
            re-ranked by exact inner products (1: no re-ranking beyond the k). Typical 2-16:
            recall rises toward the IVF-Flat recall at the same nprobe.
        train_size: k-means and PQ training points (a seeded random subset of the items;
            ``0``: all of them). faiss needs at least 39 per cell.
        threads: threads for torch and faiss while building and searching; ``0`` leaves
            both libraries' settings as they are. Both settings are restored afterwards.
        exact_chunk: items per matmul block in the exact search. The score buffer holds
            ``min(B, 2**26 / exact_chunk) x exact_chunk`` floats (256 MiB at most).
        exact_block: block size of the block-max top-k selection in the exact search
            (see the module docstring); ``0`` runs plain ``torch.topk`` over each chunk.
        hnsw_side_share: HNSW only: share of the longest item vectors kept out of the graph
            and scored exactly on every query (see :class:`ItemIndex`). Typical 0.01.
        hnsw_norm_ratio: HNSW only: every item longer than this many times the median norm
            is also kept out of the graph and scored exactly. Typical 3 (lognormal norms
            with sigma 0.3 put 0.01% of the items there; sigma 1 puts 14%).
        seed: seed of faiss' k-means initialisation (IVF). HNSW levels come from faiss'
            fixed internal seed; an HNSW build is deterministic only with ``threads=1``.
        exact_fallback: HNSW only: whether rows that the graph leaves short under
            ``exclude`` / ``allowed`` are answered by exact search (recommended; without it
            such rows are padded with ``-1``). IVF needs none: it probes more cells.
        device: where the exact search runs (torch): ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or
            ``"auto"`` (see :mod:`simenv.device`). The index keeps a copy of the vectors
            there; queries move there per call and results come back as numpy. faiss (HNSW,
            IVF) stays on the CPU; their exact fallback and :meth:`ItemIndex.search_exact`
            use the device.
    """

    kind: str = "exact"
    metric: str = "ip"
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    ivf_nlist: int = 0
    ivf_nprobe: int = 16
    pq_m: int = 0
    refine_factor: int = 4
    train_size: int = 0
    threads: int = 0
    exact_chunk: int = 262144
    exact_block: int = 64
    hnsw_side_share: float = 0.01
    hnsw_norm_ratio: float = 3.0
    seed: int = 0
    exact_fallback: bool = True
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_device("device", self.device)
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        positive = {
            "hnsw_m": self.hnsw_m,
            "ef_construction": self.ef_construction,
            "ef_search": self.ef_search,
            "ivf_nprobe": self.ivf_nprobe,
            "refine_factor": self.refine_factor,
            "exact_chunk": self.exact_chunk,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        non_negative = {
            "ivf_nlist": self.ivf_nlist,
            "pq_m": self.pq_m,
            "train_size": self.train_size,
            "threads": self.threads,
            "exact_block": self.exact_block,
            "seed": self.seed,
        }
        for name, value in non_negative.items():
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not 0.0 <= self.hnsw_side_share <= 0.5:
            raise ValueError(f"hnsw_side_share must be in [0, 0.5], got {self.hnsw_side_share!r}")
        if not self.hnsw_norm_ratio >= 1.0:
            raise ValueError(f"hnsw_norm_ratio must be >= 1, got {self.hnsw_norm_ratio!r}")


@dataclass(frozen=True)
class ReleaseCutoff:
    """Eligibility by release time: item i is allowed for query b iff ``release_time[i] <= time[b]``.

    Attributes:
        release_time: float ``(N,)`` release time of each item (days), e.g.
            ``ItemCatalog.release_time``.
        time: float ``(B,)`` the time of each query (days), or one float for all queries,
            e.g. ``obs["context"][:, 0]``.
    """

    release_time: np.ndarray
    time: np.ndarray | float


@contextlib.contextmanager
def _num_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch and faiss threads (``0``: leave them), then restore."""
    if n <= 0:
        yield
        return
    old_torch, old_faiss = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old_torch)
        faiss.omp_set_num_threads(old_faiss)


def _as_matrix(name: str, x: np.ndarray | torch.Tensor, dim: int | None = None) -> np.ndarray:
    """A finite float32 C-contiguous ``(n, d)`` copy-free view (or copy) of ``x``."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} must have {dim} columns (the index dim), got shape {x.shape}")
    if x.shape[1] < 1:
        raise ValueError(f"{name} must have at least one column, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} must be finite; found NaN or inf")
    return x


def _normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit l2 norm (cosine metric); a zero row stays zero."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # (n, 1)
    return np.ascontiguousarray(x / np.maximum(norms, _NORM_EPS), dtype=np.float32)


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    return int(k)


def _sorted_contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Bool array shaped like ``keys``: which of them occur in the sorted 1-D ``sorted_keys``."""
    if sorted_keys.size == 0:
        return np.zeros(keys.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.size - 1)
    return sorted_keys[pos] == keys


def _chunk_topk(s: torch.Tensor, k: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of each row of ``s`` (b, n), selecting through block maxima when it pays.

    Returns values (b, k) sorted descending and column indices (b, k) into ``s``.
    """
    b, n = s.shape
    n_blocks = n // block if block > 1 else 0
    if n_blocks < 4 * k:  # too few blocks for the selection to save work
        return torch.topk(s, k, dim=1)
    head = s[:, : n_blocks * block].reshape(b, n_blocks, block)  # (b, nb, block), a view
    block_max = head.amax(dim=2)  # (b, nb)
    best_blocks = torch.topk(block_max, k, dim=1, sorted=False).indices  # (b, k)
    offsets = torch.arange(block, device=s.device)
    cand = (best_blocks.unsqueeze(2) * block + offsets).reshape(b, k * block)
    if n_blocks * block < n:  # the ragged tail of the chunk is always a candidate
        tail = torch.arange(n_blocks * block, n, device=s.device).expand(b, -1)  # (b, n - nb*block)
        cand = torch.cat([cand, tail], dim=1)
    values, pos = torch.topk(s.gather(1, cand), k, dim=1)  # (b, k)
    return values, cand.gather(1, pos)


def _pad_results(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cast, mark ``-inf`` scores as missing (id -1), and pad the columns up to ``k``."""
    ids = np.asarray(ids, dtype=np.int64).copy()
    scores = np.asarray(scores, dtype=np.float32).copy()
    ids[~np.isfinite(scores)] = -1
    scores[ids < 0] = -np.inf
    if ids.shape[1] < k:
        pad = k - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return ids, scores


class _Constraints:
    """``exclude`` / ``allowed`` of one search call, validated, in numpy and torch form."""

    def __init__(self, n_items: int, n_queries: int, exclude, allowed) -> None:
        self.n_items = n_items
        self.exclude: np.ndarray | None = None  # (B, E) int64, -1 padding
        self.exclude_keys: np.ndarray | None = None  # sorted row * N + id
        self.global_mask: np.ndarray | None = None  # (N,) bool
        self.row_mask: np.ndarray | None = None  # (B, N) bool
        self.release_time: np.ndarray | None = None  # (N,) float32 (simenv.clock)
        self.times: np.ndarray | None = None  # (B,) float32, the observed time (simenv.clock)
        if exclude is not None:
            ex = np.asarray(exclude)
            if ex.ndim != 2 or ex.shape[0] != n_queries:
                raise ValueError(
                    f"exclude must be 2-D (B={n_queries}, E) with -1 padding, got shape {ex.shape}"
                )
            ex = check_item_ids("exclude", ex, n_items, padding=True)
            if ex.size and (ex >= 0).any():
                self.exclude = ex
                rows = np.broadcast_to(np.arange(n_queries)[:, None], ex.shape)
                self.exclude_keys = np.sort(rows[ex >= 0] * n_items + ex[ex >= 0])
        if isinstance(allowed, ReleaseCutoff):
            rt = np.asarray(allowed.release_time, dtype=np.float64)
            if rt.shape != (n_items,):
                raise ValueError(
                    f"allowed.release_time must have shape ({n_items},), got {rt.shape}"
                )
            t = np.asarray(allowed.time, dtype=np.float64)
            if t.ndim == 0:
                t = np.full(n_queries, float(t))
            if t.shape != (n_queries,):
                raise ValueError(
                    f"allowed.time must be a float or have shape ({n_queries},), got {t.shape}"
                )
            if np.isnan(rt).any() or np.isnan(t).any():
                raise ValueError("allowed.release_time and allowed.time must not contain NaN")
            # one definition of "released" (simenv.clock): compare in float32, so every path
            # below (numpy, searchsorted counts, torch masks) agrees with the env
            self.release_time, self.times = rt.astype(np.float32), observed_time(t)
        elif allowed is not None:
            m = np.asarray(allowed)
            if m.dtype != np.bool_:
                raise ValueError(
                    f"allowed must be a bool mask (N,) or (B, N), or a ReleaseCutoff; "
                    f"got dtype {m.dtype}"
                )
            if m.shape == (n_items,):
                self.global_mask = m
            elif m.shape == (n_queries, n_items):
                self.row_mask = m
            else:
                raise ValueError(
                    f"allowed mask must have shape ({n_items},) or ({n_queries}, {n_items}), "
                    f"got {m.shape}"
                )

    @property
    def any(self) -> bool:
        return (
            self.exclude is not None
            or self.global_mask is not None
            or self.row_mask is not None
            or self.times is not None
        )

    def allowed_counts(self, n_queries: int, per_query_only: bool = False) -> np.ndarray:
        """Number of allowed items per query, int64 (B,), before ``exclude``.

        With ``per_query_only`` the shared mask is ignored (faiss applies it itself).
        """
        counts = np.full(n_queries, self.n_items, dtype=np.int64)
        if self.global_mask is not None and not per_query_only:
            counts[:] = self.global_mask.sum()
        if self.row_mask is not None:
            counts = self.row_mask.sum(axis=1).astype(np.int64)
        if self.times is not None:
            rt = self.release_time
            if self.global_mask is not None and not per_query_only:
                rt = rt[self.global_mask]
            counts = np.searchsorted(np.sort(rt), self.times, side="right").astype(np.int64)
        return counts

    def eligible_counts(self, n_queries: int) -> np.ndarray:
        """Exact number of eligible items per query, int64 (B,): allowed and not excluded."""
        counts = self.allowed_counts(n_queries)
        if self.exclude is not None:
            ex = np.sort(self.exclude, axis=1)  # (B, E)
            first = np.ones_like(ex, dtype=bool)
            first[:, 1:] = ex[:, 1:] != ex[:, :-1]  # count each excluded id once
            rows = np.arange(n_queries)
            counts -= (first & self.allowed(ex, rows)).sum(axis=1)
        return counts

    def n_excluded(self, n_queries: int) -> np.ndarray:
        if self.exclude is None:
            return np.zeros(n_queries, dtype=np.int64)
        return (self.exclude >= 0).sum(axis=1)

    def allowed(self, ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Bool (b, f): which ids (b, f), -1 = none, are allowed for global query rows (b,)."""
        ok = ids >= 0
        safe = np.where(ok, ids, 0)
        if self.global_mask is not None:
            ok &= self.global_mask[safe]
        if self.row_mask is not None:
            ok &= self.row_mask[rows[:, None], safe]
        if self.times is not None:
            ok &= released(self.release_time[safe], self.times[rows][:, None])  # simenv.clock
        return ok

    def eligible(self, ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Bool (b, f): which ids (b, f) may be served to global query rows (b,)."""
        ok = self.allowed(ids, rows)
        if self.exclude_keys is not None:
            ok &= ~_sorted_contains(self.exclude_keys, rows[:, None] * self.n_items + ids)
        return ok

    def torch_masker(self, rows: np.ndarray, device: torch.device | None = None):
        """A function ``mask(scores (b, n), j0)`` that sets ineligible scores to ``-inf``.

        Its tensors live on ``device`` (the scores' device; default the CPU).
        """

        def t_(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(device or "cpu")

        ex = t_(self.exclude[rows]) if self.exclude is not None else None
        blocked = t_(~self.global_mask) if self.global_mask is not None else None  # (N,)
        row_mask = t_(self.row_mask[rows]) if self.row_mask is not None else None
        if self.times is not None:
            rt = t_(self.release_time)  # (N,)
            t = t_(self.times[rows])  # (b,)
        neg_inf = float("-inf")

        def mask(s: torch.Tensor, j0: int) -> None:
            b, n = s.shape
            j1 = j0 + n
            if blocked is not None:
                s.masked_fill_(blocked[j0:j1].unsqueeze(0), neg_inf)
            if row_mask is not None:
                s.masked_fill_(~row_mask[:, j0:j1], neg_inf)
            if self.times is not None:
                s.masked_fill_(rt[j0:j1].unsqueeze(0) > t.unsqueeze(1), neg_inf)
            if ex is not None:
                hit = (ex >= j0) & (ex < j1)  # (b, E)
                r = torch.arange(b, device=s.device).unsqueeze(1).expand_as(ex)[hit]
                s[r, ex[hit] - j0] = neg_inf

        return mask


class ItemIndex:
    """A MIPS index over cached item vectors; build it with :func:`build_index`.

    Item ids are row numbers of the vectors given to :func:`build_index`, continued by
    :meth:`add`. The index keeps a float32 copy of the vectors (l2-normalised under the
    cosine metric) for the exact search, the exact fallback and :func:`recall_vs_exact`.

    HNSW: the graph indexes ``[x, sqrt(R^2 - |x|^2)]`` with L2 distance and is queried with
    ``[q, 0]``, which ranks by inner product. The longest vectors (the longest
    ``hnsw_side_share`` of the items, and all longer than ``hnsw_norm_ratio`` times the
    median norm) are kept in a side set scored exactly on every query and merged with the
    graph's answer; R is the longest norm left in the graph. Scores returned by HNSW are
    recomputed exactly from the stored vectors.
    """

    def __init__(self, config: IndexConfig, item_vectors: np.ndarray | torch.Tensor) -> None:
        self.config = config
        self._faiss: faiss.Index | None = None
        self._quantizer: faiss.Index | None = None
        self.rebuild(item_vectors)

    # ------------------------------------------------------------------ building
    @property
    def n_items(self) -> int:
        """Number of indexed items N."""
        return int(self._vectors.shape[0])

    @property
    def dim(self) -> int:
        """Vector dimension d."""
        return int(self._vectors.shape[1])

    @property
    def vectors(self) -> np.ndarray:
        """The indexed vectors, float32 ``(N, d)`` (normalised under cosine); read-only."""
        v = self._vectors.view()
        v.flags.writeable = False
        return v

    @property
    def nlist(self) -> int:
        """Number of IVF cells (0 for the other kinds)."""
        return int(self._faiss.nlist) if self.config.kind in _IVF_KINDS else 0

    def _prepare(self, name: str, x: np.ndarray | torch.Tensor, dim: int | None = -1) -> np.ndarray:
        """Validated float32 ``(n, d)`` (``dim=-1``: the index dim), normalised under cosine."""
        x = _as_matrix(name, x, dim=self.dim if dim == -1 else dim)
        return _normalise(x) if self.config.metric == "cosine" else x

    def rebuild(self, item_vectors: np.ndarray | torch.Tensor) -> ItemIndex:
        """Replace all items by ``item_vectors`` (N, d) and rebuild (IVF: retrain k-means).

        Use it after a training step changed the item tower: pass the tower's freshly
        cached item vectors (a numpy array or a torch tensor, detached and moved to CPU
        here). The dimension may change.

        Returns:
            ``self``.
        """
        x = self._prepare("item_vectors", item_vectors, dim=None)
        if x.shape[0] < 1:
            raise ValueError("item_vectors must have at least one row")
        self._vectors = x
        self._device = resolve_device(self.config.device)
        self._vectors_t = torch.from_numpy(x).to(self._device)  # the exact search's copy
        self._faiss, self._quantizer = None, None
        cfg = self.config
        with _num_threads(cfg.threads):
            if cfg.kind == "hnsw":
                # MIPS -> nearest neighbour (Bachrach et al. 2014): with R >= every graph item
                # norm, ||[q, 0] - [x, sqrt(R^2 - |x|^2)]||^2 = |q|^2 + R^2 - 2 q.x, so the L2
                # ranking of the augmented vectors is the inner-product ranking. An HNSW graph
                # over raw inner products (not a metric) reached recall@100 0.86 where this one
                # reached 0.98 at efSearch 512 on clustered vectors with varied norms.
                # The longest vectors stay out of the graph: after augmentation a vector much
                # longer than the bulk sits far from every other node, loses its in-links to
                # pruning and becomes unreachable (measured: 3 vectors 50x longer than the
                # rest, top-1 for most queries, were never returned). The longest
                # hnsw_side_share of the items and all longer than hnsw_norm_ratio x the
                # median norm are scored exactly instead; R is the longest norm left.
                n = x.shape[0]
                norms = np.linalg.norm(x, axis=1)
                order = np.argsort(norms, kind="stable")
                n_side = max(
                    int(cfg.hnsw_side_share * n),
                    int((norms > cfg.hnsw_norm_ratio * np.median(norms)).sum()),
                )
                n_side = min(n_side, n - 1)  # at least one node in the graph
                self._graph_ids = np.sort(order[: n - n_side])  # global id of each node
                self._side_ids = np.sort(order[n - n_side :])
                self._side_budget = 2 * max(n_side, 32)  # add(): rebuild beyond this
                self._radius = float(norms[self._graph_ids].max())
                index = faiss.IndexHNSWFlat(self.dim + 1, cfg.hnsw_m, faiss.METRIC_L2)
                index.hnsw.efConstruction = cfg.ef_construction
                index.hnsw.efSearch = cfg.ef_search
                index.add(self._augment(x[self._graph_ids]))
                self._faiss = index
            elif cfg.kind in _IVF_KINDS:
                n = x.shape[0]
                if cfg.ivf_nlist > n:
                    raise ValueError(
                        f"ivf_nlist must be <= the number of items {n}, got {cfg.ivf_nlist}"
                    )
                # auto: 4 sqrt(N) cells, at least 39 training points per cell
                nlist = cfg.ivf_nlist or max(1, min(round(4 * math.sqrt(n)), n // 39))
                quantizer = faiss.IndexFlatIP(self.dim)
                if cfg.kind == "ivf":
                    index = faiss.IndexIVFFlat(
                        quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT
                    )
                else:
                    m = cfg.pq_m or max(2, self.dim // 2)
                    if self.dim % m or m % 2:
                        raise ValueError(
                            f"pq_m must be even and divide d={self.dim}, got {m} (0 picks d/2)"
                        )
                    # 4-bit codes scanned by SIMD lookup tables (fast scan), inner product
                    index = faiss.IndexIVFPQFastScan(
                        quantizer, self.dim, nlist, m, 4, faiss.METRIC_INNER_PRODUCT
                    )
                index.cp.seed = cfg.seed
                train = x
                if 0 < cfg.train_size < n:  # a seeded subset: k-means cost grows with it
                    pick = np.random.default_rng(cfg.seed).choice(n, cfg.train_size, replace=False)
                    train = x[np.sort(pick)]
                index.train(train)
                index.add(x)
                index.nprobe = min(cfg.ivf_nprobe, nlist)
                self._faiss, self._quantizer = index, quantizer
        return self

    def _augment(self, x: np.ndarray) -> np.ndarray:
        """Items ``(n, d)`` -> ``(n, d + 1)``: append ``sqrt(R^2 - |x|^2)`` (MIPS to L2)."""
        extra = np.sqrt(np.maximum(self._radius**2 - np.einsum("nd,nd->n", x, x), 0.0))
        return np.ascontiguousarray(np.hstack([x, extra[:, None]]), dtype=np.float32)

    def add(self, new_vectors: np.ndarray | torch.Tensor) -> np.ndarray:
        """Append newly released items; returns their ids ``N, ..., N + n - 1`` (int64).

        IVF adds them to the existing cells (no retraining: call :meth:`rebuild` once the
        catalog has changed a lot). HNSW links them into the graph, except vectors longer
        than the graph's radius R, which join the exactly scored side set; once that set
        has doubled since the build (and holds over 64 items) the graph is rebuilt.
        """
        x = self._prepare("new_vectors", new_vectors)
        start = self.n_items
        if x.shape[0] == 0:
            return np.arange(start, start, dtype=np.int64)
        self._vectors = np.ascontiguousarray(np.concatenate([self._vectors, x], axis=0))
        self._vectors_t = torch.from_numpy(self._vectors).to(self._device)
        new_ids = np.arange(start, self.n_items, dtype=np.int64)
        if self.config.kind == "hnsw":
            long = np.linalg.norm(x, axis=1) > self._radius
            self._side_ids = np.concatenate([self._side_ids, new_ids[long]])
            if len(self._side_ids) > self._side_budget:
                self.rebuild(self._vectors)
                return new_ids
            x, self._graph_ids = x[~long], np.concatenate([self._graph_ids, new_ids[~long]])
            x = self._augment(x)
        if self._faiss is not None and len(x):
            with _num_threads(self.config.threads):
                self._faiss.add(x)
        return new_ids

    def set_search_params(
        self,
        *,
        ef_search: int | None = None,
        nprobe: int | None = None,
        refine_factor: int | None = None,
    ) -> None:
        """Change the search-time knobs of an approximate index (efSearch, nprobe, refine)."""
        if refine_factor is not None:
            if self.config.kind != "ivfpq":
                raise ValueError(f"refine_factor applies to kind 'ivfpq', not {self.config.kind!r}")
            if isinstance(refine_factor, bool) or not isinstance(refine_factor, int):
                raise ValueError(f"refine_factor must be an int >= 1, got {refine_factor!r}")
            if refine_factor < 1:
                raise ValueError(f"refine_factor must be an int >= 1, got {refine_factor!r}")
            self.config = dataclasses.replace(self.config, refine_factor=refine_factor)
        if ef_search is not None:
            if self.config.kind != "hnsw":
                raise ValueError(f"ef_search applies to kind 'hnsw', not {self.config.kind!r}")
            self.config = dataclasses.replace(self.config, ef_search=ef_search)
            self._faiss.hnsw.efSearch = ef_search
        if nprobe is not None:
            if self.config.kind not in _IVF_KINDS:
                raise ValueError(
                    f"nprobe applies to kinds 'ivf' and 'ivfpq', not {self.config.kind!r}"
                )
            self.config = dataclasses.replace(self.config, ivf_nprobe=nprobe)
            self._faiss.nprobe = min(nprobe, self.nlist)

    # ------------------------------------------------------------------ searching
    def search(
        self,
        queries: np.ndarray | torch.Tensor,
        k: int,
        exclude: np.ndarray | None = None,
        allowed: np.ndarray | ReleaseCutoff | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items by inner product (or cosine) for each query, batched.

        Args:
            queries: float ``(B, d)`` user vectors.
            k: results per query, ``>= 1``.
            exclude: int ``(B, E)`` items each query must not get (already consumed),
                padded with ``-1``.
            allowed: bool ``(N,)`` (same for all queries) or ``(B, N)``, or a
                :class:`ReleaseCutoff` (item ``i`` allowed for query ``b`` iff
                ``release_time[i] <= time[b]``).

        Returns:
            ``(ids int64 (B, k), scores float32 (B, k))``, scores descending. When fewer
            than ``k`` items are eligible for a query, its row ends with id ``-1`` and score
            ``-inf``. Approximate kinds may miss items (see :func:`recall_vs_exact`) but
            never return an excluded or ineligible one.
        """
        q = self._prepare("queries", queries)
        k = _check_k(k)
        cons = _Constraints(self.n_items, q.shape[0], exclude, allowed)
        with _num_threads(self.config.threads):
            if self.config.kind == "exact" or q.shape[0] == 0:
                return self._exact(q, k, cons, np.arange(q.shape[0]))
            return self._approximate(q, k, cons)

    def search_exact(
        self,
        queries: np.ndarray | torch.Tensor,
        k: int,
        exclude: np.ndarray | None = None,
        allowed: np.ndarray | ReleaseCutoff | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`search` but always exact (brute force), whatever the kind."""
        q = self._prepare("queries", queries)
        k = _check_k(k)
        cons = _Constraints(self.n_items, q.shape[0], exclude, allowed)
        with _num_threads(self.config.threads):
            return self._exact(q, k, cons, np.arange(q.shape[0]))

    def _exact(
        self, q: np.ndarray, k: int, cons: _Constraints, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Masked chunked matmul + top-k for query rows ``rows`` (global row numbers)."""
        n, b = self.n_items, q.shape[0]
        kk = min(k, n)
        chunk = min(self.config.exact_chunk, n)
        q_block = max(1, min(b, _SCORE_BUDGET // chunk))
        dev = self._device
        buf = torch.empty(q_block * chunk, dtype=torch.float32, device=dev)
        out_v = torch.empty(b, kk, dtype=torch.float32, device=dev)
        out_i = torch.empty(b, kk, dtype=torch.int64, device=dev)
        qt = torch.from_numpy(q).to(dev)
        x = self._vectors_t
        for q0 in range(0, b, q_block):
            q1 = min(b, q0 + q_block)
            mask = cons.torch_masker(rows[q0:q1], dev) if cons.any else None
            best_v = best_i = None
            for j0 in range(0, n, chunk):
                xc = x[j0 : j0 + chunk]  # (c, d)
                s = buf[: (q1 - q0) * xc.shape[0]].view(q1 - q0, xc.shape[0])
                torch.matmul(qt[q0:q1], xc.T, out=s)  # (b, c) inner products
                if mask is not None:
                    mask(s, j0)
                v, i = _chunk_topk(s, min(kk, xc.shape[0]), self.config.exact_block)
                i = i + j0
                if best_v is not None:  # merge with the running top-k of earlier chunks
                    both = torch.cat([best_v, v], dim=1)  # chunks narrower than k: fewer
                    v, pos = torch.topk(both, min(kk, both.shape[1]), dim=1)
                    i = torch.cat([best_i, i], dim=1).gather(1, pos)
                best_v, best_i = v, i
            out_v[q0:q1], out_i[q0:q1] = best_v, best_i
        return _pad_results(out_i.cpu().numpy(), out_v.cpu().numpy(), k)

    def _faiss_search(
        self, q: np.ndarray, f: int, nprobe: int, selector=None, side_mask=None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """One faiss call: ids (b, f), -1 for none, best first; IVF also gives scores (b, f).

        HNSW answers L2 distances of the augmented vectors; their inner products are
        recomputed by :meth:`_scores` for the ids finally kept.
        """
        if self.config.kind in _IVF_KINDS:
            params = faiss.SearchParametersIVF(nprobe=nprobe)
            if selector is not None:
                params.sel = selector
            if self.config.kind == "ivf":
                dist, ids = self._faiss.search(q, f, params=params)
                return ids, dist
            # IVF-PQ fast scan: a shortlist of refine_factor * f by approximate (PQ) scores,
            # re-ranked by exact inner products from the stored vectors
            short = min(self.n_items, f * self.config.refine_factor)
            _, cand = self._faiss.search(q, short, params=params)  # (b, short)
            exact = self._scores(q, cand)  # (b, short), -inf on -1
            top = np.argsort(-exact, axis=1, kind="stable")[:, :f]  # (b, f) best first
            ids = np.take_along_axis(cand, top, axis=1)
            return ids, np.take_along_axis(exact, top, axis=1)
        params = None
        if selector is not None:
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=self._faiss.hnsw.efSearch)
        qa = np.hstack([q, np.zeros((q.shape[0], 1), dtype=np.float32)])  # (b, d + 1)
        dist, local = self._faiss.search(qa, min(f, len(self._graph_ids)), params=params)
        ids = np.where(local >= 0, self._graph_ids[np.maximum(local, 0)], -1)  # (b, f')
        if len(self._side_ids) == 0:
            return ids, None
        # inner products back from the L2 distances, only to merge with the side set
        sq = np.einsum("bd,bd->b", q, q)[:, None]
        approx = np.where(local >= 0, (sq + self._radius**2 - dist) / 2, -np.inf)
        side = q @ self._vectors[self._side_ids].T  # (b, n_side) exact inner products
        if side_mask is not None:  # the shared ``allowed`` mask, applied to the side set
            side[:, ~side_mask] = -np.inf
        side_i = np.broadcast_to(self._side_ids, side.shape)
        if side.shape[1] > f:  # only the side set's own top-f can make the merged top-f
            part = np.argpartition(-side, f - 1, axis=1)[:, :f]
            side, side_i = np.take_along_axis(side, part, 1), np.take_along_axis(side_i, part, 1)
        both_s = np.concatenate([approx, side], axis=1)
        both_i = np.concatenate([ids, side_i], axis=1)
        top = np.argsort(-both_s, axis=1, kind="stable")[:, :f]  # (b, f) best first
        top_s = np.take_along_axis(both_s, top, axis=1)
        return np.where(np.isfinite(top_s), np.take_along_axis(both_i, top, axis=1), -1), None

    def _scores(self, q: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Exact inner products of queries (b, d) with their items ids (b, f); -inf for -1."""
        safe = np.where(ids >= 0, ids, 0)
        s = np.empty(ids.shape, dtype=np.float32)
        step = max(1, (1 << 22) // max(1, ids.shape[1] * self.dim))  # <= 16 MiB of gathered rows
        for r0 in range(0, ids.shape[0], step):
            rows = slice(r0, r0 + step)
            s[rows] = np.einsum("bfd,bd->bf", self._vectors[safe[rows]], q[rows])  # (b, f)
        return np.where(ids >= 0, s, -np.inf).astype(np.float32)

    def _approximate(
        self, q: np.ndarray, k: int, cons: _Constraints
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search faiss with over-fetch, filtering and re-search of the short rows.

        Every row carries a fetch size f (and, for IVF, an nprobe); rows with equal
        settings share one faiss call. A row is short when it got fewer eligible items than
        it has (``min(k, #eligible)``). A short row is searched again: IVF with twice the
        nprobe when the probed cells ran dry (the answer held -1), otherwise with four times
        the fetch. HNSW rows whose fetch would pass ``max(4k, N/4)`` go to exact search
        (``exact_fallback``); an IVF row that ran dry with every cell probed was exhaustive.
        """
        n, b = self.n_items, q.shape[0]
        is_ivf = self.config.kind in _IVF_KINDS
        nprobe0 = min(self.config.ivf_nprobe, self.nlist) if is_ivf else 0
        if not cons.any:
            ids, dist = self._faiss_search(q, min(k, n), nprobe0)
            if (ids >= 0).all():  # the common case: nothing to filter or repair
                if dist is None:  # HNSW: exact scores, best first
                    dist = self._scores(q, ids)
                    order = np.argsort(-dist, axis=1, kind="stable")
                    ids, dist = (
                        np.take_along_axis(ids, order, 1),
                        np.take_along_axis(dist, order, 1),
                    )
                return _pad_results(ids, dist, k)
        selector = bitmap = side_mask = None
        if cons.global_mask is not None:  # shared mask: faiss skips the blocked ids itself
            local = cons.global_mask if is_ivf else cons.global_mask[self._graph_ids]
            bitmap = np.packbits(local, bitorder="little")  # faiss' bit order
            selector = faiss.IDSelectorBitmap(len(local), faiss.swig_ptr(bitmap))
            side_mask = None if is_ivf else cons.global_mask[self._side_ids]

        out_i = np.full((b, k), -1, dtype=np.int64)
        out_s = np.full((b, k), -np.inf, dtype=np.float32)
        target = np.minimum(cons.eligible_counts(b), k)  # (B,) results each row can have
        # First fetch: k plus all a row can lose to ``exclude``, divided by the share of items
        # its per-query mask allows, rounded up to a power of two so rows share faiss calls.
        allowed = np.maximum(cons.allowed_counts(b, per_query_only=True), 1)
        need = (k + cons.n_excluded(b)) * (n / allowed) * 1.25
        fetch = np.minimum(2 ** np.ceil(np.log2(np.maximum(need, k))), n).astype(np.int64)
        nprobe = np.full(b, nprobe0, dtype=np.int64)
        pending = target > 0
        fallback = np.zeros(b, dtype=bool)
        cap = max(4 * k, n // 4) if self.config.exact_fallback else n
        while pending.any():
            setting = fetch * (n + 1) + nprobe  # (B,) one key per (fetch, nprobe) pair
            first = setting[pending].min()
            rows = np.flatnonzero(pending & (setting == first))
            f, p = int(fetch[rows[0]]), int(nprobe[rows[0]])
            ids, dist = self._faiss_search(q[rows], f, p, selector, side_mask)  # (r, f)
            ok = cons.eligible(ids, rows)  # (r, f)
            order = np.argsort(~ok, axis=1, kind="stable")[:, :k]  # eligible first, in order
            got_ids = np.where(
                np.take_along_axis(ok, order, axis=1), np.take_along_axis(ids, order, axis=1), -1
            )  # (r, min(k, f))
            width = order.shape[1]
            out_i[rows, :width] = got_ids
            out_s[rows, :width] = (
                self._scores(q[rows], got_ids)
                if dist is None
                else np.where(got_ids >= 0, np.take_along_axis(dist, order, axis=1), -np.inf)
            )
            pending[rows] = False
            short = ok.sum(axis=1) < target[rows]
            if not short.any():
                continue
            if is_ivf:
                dry = (ids < 0).any(axis=1)  # the probed cells held fewer than f items
                more_cells = short & dry & (p < self.nlist)
                nprobe[rows[more_cells]] = min(2 * p, self.nlist)
                more_fetch = short & ~dry & (f < n)
                fetch[rows[more_fetch]] = min(4 * f, n)
                pending[rows[more_cells | more_fetch]] = True
            else:
                grow = short & (f < n) & (4 * f <= cap)
                fetch[rows[grow]] = min(4 * f, n)
                pending[rows[grow]] = True
                fallback[rows[short & ~grow]] = self.config.exact_fallback
        del bitmap  # the selector reads it until here
        if fallback.any():
            rows = np.flatnonzero(fallback)
            out_i[rows], out_s[rows] = self._exact(q[rows], k, cons, rows)
        if not is_ivf:  # HNSW ranked by float32 L2 distances: order by the exact scores
            order = np.argsort(-out_s, axis=1, kind="stable")
            out_i, out_s = np.take_along_axis(out_i, order, 1), np.take_along_axis(out_s, order, 1)
        return out_i, out_s


def build_index(
    item_vectors: np.ndarray | torch.Tensor, config: IndexConfig | None = None
) -> ItemIndex:
    """Build an :class:`ItemIndex` over item vectors ``(N, d)`` (e.g. a tower's cached ones).

    Args:
        item_vectors: float ``(N, d)``, numpy or torch (detached and moved to CPU here).
        config: the :class:`IndexConfig`; default exact inner-product search.
    """
    return ItemIndex(config if config is not None else IndexConfig(), item_vectors)


def recall_vs_exact(
    index: ItemIndex,
    queries: np.ndarray | torch.Tensor,
    k: int,
    exclude: np.ndarray | None = None,
    allowed: np.ndarray | ReleaseCutoff | None = None,
    exact: tuple[np.ndarray, np.ndarray] | None = None,
) -> float:
    """Recall@k of ``index.search`` against exact search on the same vectors.

    ``exact``: the exact answer ``(ids, scores)`` of these queries and constraints, if already
    computed (:meth:`ItemIndex.search_exact`; a sweep over settings computes it once).

    Per query: the number of returned items that belong to the exact top-k, divided by the
    size of the exact top-k (``k``, or fewer when fewer items are eligible); averaged over
    queries with at least one eligible item. Ties: an item whose exact score equals the
    exact k-th score (within ``1e-5`` of the row's largest absolute score, float32
    rounding of two different matmul orders) counts as a hit, since exact search could
    have returned it just as well.
    """
    ann_ids, _ = index.search(queries, k, exclude=exclude, allowed=allowed)
    if exact is None:
        exact = index.search_exact(queries, k, exclude=exclude, allowed=allowed)
    ex_ids, ex_scores = exact
    if ex_ids.shape != ann_ids.shape:
        raise ValueError(f"exact must hold (B, k) = {ann_ids.shape} results, got {ex_ids.shape}")
    q = index._prepare("queries", queries)
    b = q.shape[0]
    n_exact = (ex_ids >= 0).sum(axis=1)  # (B,) size of the exact answer
    rows = np.arange(b)[:, None]
    ex_keys = np.sort((rows * index.n_items + ex_ids)[ex_ids >= 0])
    valid = ann_ids >= 0
    in_exact = valid & _sorted_contains(ex_keys, rows * index.n_items + ann_ids)  # (B, k)
    safe = np.where(valid, ann_ids, 0)
    true = np.einsum("bkd,bd->bk", index.vectors[safe], q)  # (B, k) exact scores of the answer
    kth = ex_scores[np.arange(b), np.maximum(n_exact - 1, 0)]  # (B,) exact k-th score
    scale = np.abs(ex_scores[:, 0]).clip(min=1e-30)  # (B,)
    tie = valid & (true >= (kth - 1e-5 * scale)[:, None])
    hits = np.minimum((in_exact | tie).sum(axis=1), n_exact)
    defined = n_exact > 0
    if not defined.any():
        raise ValueError("no query has an eligible item; recall is undefined")
    return float(np.mean(hits[defined] / n_exact[defined]))
