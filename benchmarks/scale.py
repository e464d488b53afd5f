"""scale: a world of N items x N users, 10·N logged impressions, one epoch, exact retrieval.

For each N (default 1M, 3M, 10M) four stages run one after another, each in a fresh process
(``multiprocessing`` spawn) so that its peak resident memory (``VmHWM``) is its own:

1. **world**: build ``World(n_items=N, n_users=N)``.
2. **collect**: build the world again (setup, not counted), then collect about
   ``impressions_per_user * N`` impressions with :func:`simenv.shard.collect_sharded`
   (``n_shards`` shards on ``workers`` local processes or Ray) straight into a
   :mod:`simenv.logstore` store on disk: each shard writes its own part, the parts are merged
   chunk by chunk, so the log is never whole in memory. The number of user episodes comes from
   a small pilot collection (rows per episode) on the same world.
3. **train**: one epoch of ``fit_two_tower`` (ID item tower with sparse gradients and
   SparseAdam, mean-pooling user tower, sampled softmax with in-batch + uniform negatives and
   logQ). ``fit_two_tower`` cannot stream from a memory-mapped log: it materialises every
   training example (history of L events per positive). What streams is the scan of the log:
   the engagement rows (click, like, dislike: a few % of the rows) are read chunk by chunk from
   the store, and only they are held; the epoch runs over all their positives, split into
   ``train_chunks`` consecutive ``fit_two_tower`` calls (the model carries over; each call
   starts a new optimiser).
4. **retrieve**: item vectors of all N items, then exact top-k (``ItemIndex(kind="exact")``,
   chunked matmul + top-k) for ``retrieval_users`` users with history (drawn with replacement
   when the log has fewer).

Peak memory is the stage process's ``VmHWM`` after resetting it (``/proc/self/clear_refs``) at
the start of the timed part, so it includes what the process holds (the world in *collect*)
but not setup peaks; the collection's worker processes are reported apart (largest worker's
peak; with ``fork`` they share the world's pages with the parent, so parent + workers
over-counts).

Growth from the smallest to the largest N is reported as exponents (``time ∝ N^b``). The
stage timings come from different moments of a long run on a shared machine, so the findings
are measured **side by side** in one process instead: the per-impression cost of collection and
the per-query cost of exact retrieval at the smallest and the largest N, alternated over
``sbs_reps`` repetitions (ratio with a log-scale t interval over repetitions).
"""

from __future__ import annotations

import functools
import json
import math
import multiprocessing
import os
import resource
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.registry import ExperimentConfig, experiment, param
from benchmarks.runner import RunContext, derive_seed
from simenv.atomic import atomic_write

STAGES = ("world", "collect", "train", "retrieve")
_GIB = 1024.0**3


@dataclass(frozen=True)
class ScaleConfig(ExperimentConfig):
    """Scale benchmark: time and peak memory of each stage as the world grows."""

    sizes: tuple[int, ...] = param(
        (1_000_000, 3_000_000, 10_000_000), "N values (items = users = N), increasing"
    )
    impressions_per_user: float = param(
        10.0, "logged impressions per world user: 10 gives 100M impressions at N = 10M"
    )
    n_shards: int = param(16, "shards of the collection (fixes the log; not the workers)")
    backend: str = param("processes", "collection backend: serial, processes or ray")
    workers: int = param(2, "collection workers")
    num_envs: int = param(4096, "env slots per shard")
    epsilon: float = param(0.05, "uniform exploration of the popularity behaviour policy")
    pilot_users: int = param(2000, "user episodes of the pilot that sizes the collection")
    dim: int = param(32, "embedding dimension d of the two towers")
    history_length: int = param(32, "history length L of the user tower")
    batch_size: int = param(1024, "training batch")
    uniform_negatives: int = param(1024, "uniform negatives per training batch")
    train_chunks: int = param(4, "consecutive fit_two_tower calls that make up the epoch")
    retrieval_users: int = param(100_000, "users whose exact top-k is computed")
    retrieval_batches: int = param(5, "query batches (timed one by one)")
    k: int = param(100, "top-k of the retrieval")
    threads: int = param(1, "torch threads of training and retrieval")
    sbs_reps: int = param(5, "side-by-side repetitions (smallest vs largest N) of the findings")
    sbs_steps: int = param(20, "env steps per side-by-side collection repetition")
    sbs_queries: int = param(2000, "queries per side-by-side retrieval repetition")
    collect_ratio_bar: float = param(
        1.5, "finding bar: per-impression collection cost at the largest N vs the smallest"
    )
    retrieval_ratio_slack: float = param(
        1.2, "finding bar: per-query exact retrieval cost ratio <= slack x the ratio of N"
    )
    memory_budget_gib: float = param(24.0, "memory of the machine the stages must fit in")
    fresh_processes: bool = param(
        True, "run each stage in a fresh process (its own peak memory); False: in this one"
    )
    data_dir: str = param("", "folder for logs and checkpoints (default: a temporary one)")
    keep_data: bool = param(
        False,
        "keep the logs and checkpoints after the run; a rerun with the same data_dir and "
        "config then reuses the finished stages (resumes a long run)",
    )

    def __post_init__(self) -> None:
        sizes = tuple(int(s) for s in self.sizes)
        if len(sizes) < 2 or any(s < 1000 for s in sizes) or list(sizes) != sorted(set(sizes)):
            raise ValueError(f"sizes must be >= 2 increasing values >= 1000, got {self.sizes}")
        if self.backend not in ("serial", "processes", "ray"):
            raise ValueError(f"backend must be serial, processes or ray, got {self.backend!r}")
        for name in (
            "n_shards",
            "workers",
            "num_envs",
            "pilot_users",
            "dim",
            "history_length",
            "batch_size",
            "train_chunks",
            "retrieval_users",
            "retrieval_batches",
            "k",
            "threads",
            "sbs_reps",
            "sbs_steps",
            "sbs_queries",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.uniform_negatives < 0:
            raise ValueError(f"uniform_negatives must be >= 0, got {self.uniform_negatives}")
        if not self.impressions_per_user > 0:
            raise ValueError(f"impressions_per_user must be > 0, got {self.impressions_per_user}")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {self.epsilon}")
        if self.retrieval_batches > self.retrieval_users:
            raise ValueError("retrieval_batches must be <= retrieval_users")
        for name in ("collect_ratio_bar", "retrieval_ratio_slack", "memory_budget_gib"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @classmethod
    def quick(cls) -> ScaleConfig:
        return replace(
            cls(),
            sizes=(3_000, 9_000),
            n_shards=4,
            num_envs=256,
            pilot_users=100,
            dim=16,
            history_length=8,
            batch_size=128,
            uniform_negatives=128,
            train_chunks=2,
            retrieval_users=1000,
            retrieval_batches=3,
            sbs_reps=3,
            sbs_steps=5,
            sbs_queries=300,
            fresh_processes=False,
        )


# --------------------------------------------------------------------------- measurement


def _status_kib(key: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (None where there is no /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0); a no-op elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _gib(kib: int | None) -> float | None:
    return None if kib is None else kib * 1024.0 / _GIB


def _children_peak_gib() -> float:
    """Largest peak RSS of the finished child processes (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024.0 / _GIB


class _Stage:
    """Times the measured part of a stage and reads its peak memory."""

    def __init__(self) -> None:
        self.setup_start = time.perf_counter()
        self.out: dict[str, Any] = {"rss_start_gib": _gib(_status_kib("VmRSS"))}

    def start(self) -> None:
        self.out["setup_seconds"] = time.perf_counter() - self.setup_start
        self.out["rss_after_setup_gib"] = _gib(_status_kib("VmRSS"))
        _reset_peak()
        self.t0 = time.perf_counter()

    def stop(self) -> dict[str, Any]:
        self.out["seconds"] = time.perf_counter() - self.t0
        self.out["peak_gib"] = _gib(_status_kib("VmHWM"))
        return self.out


# --------------------------------------------------------------------------- stages


def _world_config(p: dict[str, Any]) -> Any:
    from simenv import EnvConfig, WorldConfig

    return EnvConfig(world=WorldConfig(n_items=p["n"], n_users=p["n"]))


def _build_world(p: dict[str, Any]) -> Any:
    from simenv import World

    cfg = _world_config(p)
    return World(cfg.world, seed=p["world_seed"], user_model=cfg.user_model)


def _catalog(p: dict[str, Any]) -> Any:
    """The item catalog saved by the world stage, memory-mapped."""
    from simenv.types import ItemCatalog

    d = Path(p["dir"])
    meta = json.loads((d / "catalog.json").read_text())
    return ItemCatalog(
        title_tokens=np.load(d / "title_tokens.npy", mmap_mode="r"),
        vocab_size=meta["vocab_size"],
        categorical=np.load(d / "categorical.npy", mmap_mode="r"),
        categorical_names=tuple(meta["categorical_names"]),
        categorical_cardinalities=tuple(meta["categorical_cardinalities"]),
        release_time=np.load(d / "release_time.npy"),
    )


def _save_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (a resumed run never reads half a file)."""
    atomic_write(path, lambda f: f.write(json.dumps(obj).encode()))


def stage_world(p: dict[str, Any]) -> dict[str, Any]:
    """Build the world; save its public catalog for the later stages (not timed)."""
    st = _Stage()
    st.start()
    world = _build_world(p)
    out = st.stop()
    # resident growth over the build: what holding the world costs (no read of the hidden truth)
    out["world_gib"] = _gib(_status_kib("VmRSS")) - out["rss_after_setup_gib"]
    d = Path(p["dir"])
    d.mkdir(parents=True, exist_ok=True)
    cat = world.catalog
    for name in ("title_tokens", "categorical", "release_time"):
        arr = getattr(cat, name)
        atomic_write(d / f"{name}.npy", lambda f, a=arr: np.save(f, a))
    _save_json(
        d / "catalog.json",
        {
            "vocab_size": int(cat.vocab_size),
            "categorical_names": list(cat.categorical_names),
            "categorical_cardinalities": [int(c) for c in cat.categorical_cardinalities],
        },
    )
    return out


def stage_collect(p: dict[str, Any]) -> dict[str, Any]:
    """Collect ~impressions_per_user * N impressions with sharded rollouts into a log store."""
    from simenv import BatchedRecEnv, PopularityPolicy, collect
    from simenv.logstore import store_nbytes
    from simenv.shard import ShardRun, collect_sharded

    st = _Stage()
    cfg = _world_config(p)
    world = _build_world(p)
    factory = functools.partial(PopularityPolicy, slate_size=cfg.slate_size, epsilon=p["epsilon"])
    # pilot: rows per user episode on this world, to size the collection (setup, not timed)
    pilot = collect(
        BatchedRecEnv(min(p["num_envs"], p["pilot_users"]), cfg, world=world),
        factory(world, seed=p["pilot_seed"]),
        p["pilot_users"],
        seed=p["pilot_seed"],
        progress=False,
    )
    rows_per_user = len(pilot) / p["pilot_users"]
    target = p["impressions_per_user"] * p["n"]
    n_users = max(1, math.ceil(target / rows_per_user))
    del pilot
    st.start()
    info: list[ShardRun] = []
    log = collect_sharded(
        cfg,
        factory,
        n_users,
        n_shards=p["n_shards"],
        seed=p["seed"],
        world=world,
        num_envs=p["num_envs"],
        backend=p["backend"],
        workers=p["workers"],
        progress=p["progress"],
        out=Path(p["dir"]) / "log",
        run_info=info,
    )
    out = st.stop()
    run = info[0]
    out.update(
        rows=len(log),
        target_rows=target,
        n_user_episodes=n_users,
        rows_per_user_pilot=rows_per_user,
        worker_peak_gib=_children_peak_gib(),
        shard_seconds=list(run.shard_seconds),
        shard_rows=list(run.shard_rows),
        merge_seconds=run.merge_seconds,
        backend=run.backend,
        disk_gib=store_nbytes(Path(p["dir"]) / "log") / _GIB,
    )
    return out


def _engagement_log(store: Path) -> Any:
    """The engagement rows (click, like, dislike) of a store, read chunk by chunk."""
    from simenv import ImpressionLog
    from simenv.history import ENGAGEMENT
    from simenv.logstore import iter_log_store, open_log_store
    from simenv.types import Columns

    codes = [int(e) for e in ENGAGEMENT]
    parts: dict[str, list[np.ndarray]] = {}
    for chunk in iter_log_store(store, rows_per_chunk=4_000_000):
        keep = np.isin(chunk[Columns.FEEDBACK], codes)
        for c, a in chunk.items():
            parts.setdefault(c, []).append(a[keep])
    meta = open_log_store(store).meta
    return ImpressionLog({c: np.concatenate(v) for c, v in parts.items()}, meta=meta)


def _model(p: dict[str, Any], catalog: Any) -> Any:
    from retrieval.model import TwoTowerConfig, TwoTowerModel
    from retrieval.towers import ItemTowerConfig, UserTowerConfig

    cfg = TwoTowerConfig(
        item=ItemTowerConfig(kind="id", dim=p["dim"], sparse=True, seed=p["model_seed"]),
        user=UserTowerConfig(kind="mean", seed=p["model_seed"]),
    )
    return TwoTowerModel.build(cfg, catalog)


def stage_train(p: dict[str, Any]) -> dict[str, Any]:
    """One epoch of fit_two_tower over the positives of the log, in train_chunks calls."""
    import torch

    from retrieval.losses import NegativeSamplerConfig, RetrievalLossConfig
    from retrieval.train import TrainConfig, fit_two_tower, save_checkpoint
    from simenv.history import EventSequences

    torch.set_num_threads(p["threads"])
    st = _Stage()
    catalog = _catalog(p)
    torch.manual_seed(p["model_seed"])  # script-level seeding, as in a CleanRL __main__
    model = _model(p, catalog)
    st.start()
    eng = _engagement_log(Path(p["dir"]) / "log")
    seq = EventSequences.from_log(eng, catalog.n_items)
    pos = eng.positives()
    loss = RetrievalLossConfig(
        kind="sampled_softmax",
        negatives=NegativeSamplerConfig(
            in_batch=True, uniform=p["uniform_negatives"], logq="negatives_only"
        ),
    )
    bounds = np.linspace(0, len(pos), p["train_chunks"] + 1).astype(np.int64)
    chunk_s, chunk_n, losses = [], [], []
    for c in range(p["train_chunks"]):
        part = pos.select(np.arange(bounds[c], bounds[c + 1]))
        tcfg = TrainConfig(
            epochs=1,
            batch_size=p["batch_size"],
            history_length=p["history_length"],
            weight_decay=0.0,
            threads=p["threads"],
            seed=p["model_seed"] + c,
            progress=False,
        )
        t = time.perf_counter()
        res = fit_two_tower(model, loss, part, seq, tcfg, release_time=catalog.release_time)
        chunk_s.append(time.perf_counter() - t)
        chunk_n.append(len(part))
        losses.append(float(res.history[-1]["loss"]) if res.history else float("nan"))
    out = st.stop()
    save_checkpoint(model, Path(p["dir"]) / "model.pt")
    out.update(
        engagement_rows=len(eng),
        examples=int(len(pos)),
        chunk_seconds=chunk_s,
        chunk_examples=chunk_n,
        chunk_loss=losses,
        examples_per_s=len(pos) / max(sum(chunk_s), 1e-9),
    )
    return out


def _queries(p: dict[str, Any], n_users: int, model: Any, seq: Any, t_end: float) -> np.ndarray:
    """User vectors (n_users, d) of seeded users with history, at the log's end.

    Distinct users while the log has enough users with history; otherwise (the smallest
    worlds log fewer users than ``retrieval_users``) drawn with replacement, so every size
    answers the same number of queries (the search cost does not depend on who asks).
    """
    import torch

    rng = np.random.default_rng(p["query_seed"])
    users = rng.choice(seq.users, size=n_users, replace=n_users > seq.users.size)
    out = []
    with torch.no_grad():
        for s in range(0, users.size, 8192):
            u = users[s : s + 8192]
            obs = seq.history(u, np.full(u.size, t_end), p["history_length"])
            out.append(model.user_vectors(obs).numpy())
    return np.concatenate(out).astype(np.float32)


def stage_retrieve(p: dict[str, Any]) -> dict[str, Any]:
    """Item vectors of the whole catalog and exact top-k for retrieval_users users."""
    import torch

    from retrieval.index import IndexConfig, ItemIndex
    from retrieval.train import load_checkpoint
    from simenv.history import EventSequences

    torch.set_num_threads(p["threads"])
    st = _Stage()
    catalog = _catalog(p)
    model = _model(p, catalog)
    load_checkpoint(model, Path(p["dir"]) / "model.pt")
    model.eval()
    eng = _engagement_log(Path(p["dir"]) / "log")
    seq = EventSequences.from_log(eng, catalog.n_items)
    t_end = float(eng["time"].max()) + 1e-3
    q = _queries(p, p["retrieval_users"], model, seq, t_end)
    del eng
    st.start()
    t = time.perf_counter()
    with torch.no_grad():
        vecs = model.all_item_vectors().numpy()  # (N, d)
    index = ItemIndex(IndexConfig(kind="exact", threads=p["threads"]), vecs)
    vec_s = time.perf_counter() - t
    batch_s, batch_n = [], []
    for rows in np.array_split(np.arange(q.shape[0]), p["retrieval_batches"]):
        t = time.perf_counter()
        ids, _ = index.search(q[rows], p["k"])
        batch_s.append(time.perf_counter() - t)
        batch_n.append(int(rows.size))
    out = st.stop()
    out.update(
        users=int(q.shape[0]),
        users_with_history=int(seq.users.size),
        item_vectors_seconds=vec_s,
        batch_seconds=batch_s,
        batch_queries=batch_n,
        queries_per_s=q.shape[0] / max(sum(batch_s), 1e-9),
        valid_ids=bool(np.all((ids >= 0) & (ids < catalog.n_items))),
    )
    return out


def stage_side_by_side(p: dict[str, Any]) -> dict[str, Any]:
    """Per-impression collection and per-query retrieval cost, smallest vs largest N, alternated."""
    import torch

    from retrieval.index import IndexConfig, ItemIndex
    from retrieval.train import load_checkpoint
    from simenv import BatchedRecEnv, PopularityPolicy, collect
    from simenv.history import EventSequences

    torch.set_num_threads(p["threads"])
    sides = {}
    for name, sp in (("small", p["small"]), ("large", p["large"])):
        world = _build_world(sp)
        cfg = _world_config(sp)
        catalog = _catalog(sp)
        model = _model(sp, catalog)
        load_checkpoint(model, Path(sp["dir"]) / "model.pt")
        model.eval()
        eng = _engagement_log(Path(sp["dir"]) / "log")
        seq = EventSequences.from_log(eng, catalog.n_items)
        q = _queries(sp, p["sbs_queries"], model, seq, float(eng["time"].max()) + 1e-3)
        with torch.no_grad():
            vecs = model.all_item_vectors().numpy()
        sides[name] = dict(world=world, cfg=cfg, q=q, index=ItemIndex(IndexConfig(), vecs))
        del eng, seq, model
    out: dict[str, list[float]] = {
        f"{m}_{s}": [] for m in ("collect_s_per_row", "query_s") for s in ("small", "large")
    }
    for rep in range(p["sbs_reps"]):
        order = ("small", "large") if rep % 2 == 0 else ("large", "small")
        for name in order:  # alternate which side goes first, so drifts cancel
            side = sides[name]
            env = BatchedRecEnv(p["num_envs"], side["cfg"], world=side["world"])
            policy = PopularityPolicy(
                side["world"], side["cfg"].slate_size, epsilon=p["epsilon"], seed=rep
            )
            t = time.perf_counter()
            # enough users that no slot idles within sbs_steps steps (a bounded list)
            n_users = p["num_envs"] * p["sbs_steps"]
            log = collect(env, policy, n_users, seed=rep, max_steps=p["sbs_steps"], progress=False)
            out[f"collect_s_per_row_{name}"].append((time.perf_counter() - t) / max(len(log), 1))
            t = time.perf_counter()
            side["index"].search(side["q"], p["k"])
            out[f"query_s_{name}"].append((time.perf_counter() - t) / side["q"].shape[0])
    return out


_STAGE_FNS = {
    "world": stage_world,
    "collect": stage_collect,
    "train": stage_train,
    "retrieve": stage_retrieve,
    "side_by_side": stage_side_by_side,
}


def _stage_entry(name: str, p: dict[str, Any], result: str) -> None:
    """Entry of a fresh stage process: run the stage, write its result as JSON."""
    os.environ.setdefault("OMP_NUM_THREADS", str(p.get("threads", 1)))
    out = _STAGE_FNS[name](p)
    _save_json(Path(result), out)


def run_stage(name: str, p: dict[str, Any], fresh: bool) -> dict[str, Any]:
    """Run stage ``name`` in a fresh spawned process (or in this one); its result dict."""
    if not fresh:
        return _STAGE_FNS[name](p)
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        proc = multiprocessing.get_context("spawn").Process(
            target=_stage_entry, args=(name, p, str(result))
        )
        proc.start()
        proc.join()
        if proc.exitcode != 0 or not result.exists():
            raise RuntimeError(
                f"stage {name!r} at N={p.get('n')} failed in its process (exit code "
                f"{proc.exitcode}; -9 means it was killed, e.g. out of memory)"
            )
        return json.loads(result.read_text())


# --------------------------------------------------------------------------- the experiment


def _exponent(sizes: list[int], values: list[float]) -> float | None:
    """Least-squares slope of log(value) on log(N): value ∝ N^slope."""
    x = np.log(np.asarray(sizes, dtype=np.float64))
    y = np.asarray(values, dtype=np.float64)
    if np.any(~np.isfinite(y)) or np.any(y <= 0):
        return None
    return float(np.polyfit(x, np.log(y), 1)[0])


def _params(cfg: ScaleConfig, ctx: RunContext, seed: int, n: int, root: Path) -> dict[str, Any]:
    p = {k: v for k, v in asdict(cfg).items() if k not in ("sizes", "data_dir", "keep_data")}
    p.update(
        n=int(n),
        dir=str(root / f"n{n}"),
        seed=derive_seed(seed, "scale", "collect"),
        world_seed=derive_seed(seed, "scale", "world"),
        pilot_seed=derive_seed(seed, "scale", "pilot"),
        model_seed=derive_seed(seed, "scale", "model") % (2**31),
        query_seed=derive_seed(seed, "scale", "queries"),
        progress=not ctx.quiet,
    )
    return p


@experiment(
    "scale",
    "Time and peak memory of world build, sharded collection, one training epoch and exact "
    "retrieval as the world grows (default 1M, 3M, 10M items x users, 10 impressions per user).",
    ScaleConfig,
)
def run(cfg: ScaleConfig, ctx: RunContext) -> None:
    seed = ctx.seeds[0]  # one long run; the intervals are over repetitions inside it
    root = Path(cfg.data_dir) if cfg.data_dir else Path(tempfile.mkdtemp(prefix="simenv-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in cfg.sizes]
    res: dict[int, dict[str, Any]] = {}
    try:
        for n in sizes:
            p = _params(cfg, ctx, seed, n, root)
            res[n] = {}
            for stage in STAGES:
                saved = Path(p["dir"]) / f"stage-{stage}.json"
                if cfg.keep_data and saved.exists():  # resume a long run of the same config
                    doc = json.loads(saved.read_text())
                    same = {k: v for k, v in p.items() if k != "progress"}
                    if {k: v for k, v in doc.get("params", {}).items() if k != "progress"} == same:
                        res[n][stage] = {**doc["result"], "reused": True}
                        ctx.log(f"N={n:,}: {stage} reused from {saved}")
                        continue
                ctx.log(f"N={n:,}: {stage}")
                with ctx.timer(f"{stage}_n{n}"):
                    res[n][stage] = run_stage(stage, p, cfg.fresh_processes)
                r = res[n][stage]
                _save_json(saved, {"params": p, "result": r})
                ctx.log(f"N={n:,}: {stage} {r['seconds']:.1f} s, peak {r['peak_gib']} GiB")
        ctx.log("side by side: smallest vs largest N")
        p = {
            **_params(cfg, ctx, seed, sizes[0], root),
            "small": _params(cfg, ctx, seed, sizes[0], root),
            "large": _params(cfg, ctx, seed, sizes[-1], root),
        }
        saved = root / "side_by_side.json"
        doc = json.loads(saved.read_text()) if cfg.keep_data and saved.exists() else {}
        if doc.get("params") == json.loads(json.dumps(p)):
            sbs = doc["result"]
            ctx.log(f"side by side reused from {saved}")
        else:
            sbs = run_stage("side_by_side", p, cfg.fresh_processes)
            _save_json(saved, {"params": p, "result": sbs})
    finally:
        if not cfg.keep_data:
            shutil.rmtree(root, ignore_errors=True)
    _report(cfg, ctx, sizes, res, sbs, seed)


def _report(
    cfg: ScaleConfig,
    ctx: RunContext,
    sizes: list[int],
    res: dict[int, dict[str, Any]],
    sbs: dict[str, list[float]],
    seed: int,
) -> None:
    from matplotlib.figure import Figure

    from benchmarks.stats import ratio_effect

    rep = ctx.report
    rows = []
    for n in sizes:
        w, c, t, r = (res[n][s] for s in STAGES)
        rows.append(
            {
                "N": n,
                "world_s": w["seconds"],
                "world_peak_gib": w["peak_gib"],
                "collect_s": c["seconds"],
                "collect_peak_gib": c["peak_gib"],
                "worker_peak_gib": c["worker_peak_gib"],
                "train_s": t["seconds"],
                "train_peak_gib": t["peak_gib"],
                "retrieve_s": r["seconds"],
                "retrieve_peak_gib": r["peak_gib"],
            }
        )
    rep.table(
        "Time (s) and peak memory (GiB) of each stage",
        rows,
        fmt={"N": ",d"} | {k: ".3g" for k in rows[0] if k != "N"},
        note="Peak: VmHWM of the stage's own process from the start of its timed part "
        "(collect includes the world it holds; worker_peak is the largest collection worker, "
        "which shares the world with the parent under fork). "
        + ("Fresh process per stage." if cfg.fresh_processes else "Stages ran in one process."),
    )
    detail = []
    for n in sizes:
        c, t, r = res[n]["collect"], res[n]["train"], res[n]["retrieve"]
        detail.append(
            {
                "N": n,
                "impressions": c["rows"],
                "user_episodes": c["n_user_episodes"],
                "impressions_per_s": c["rows"] / c["seconds"],
                "merge_s": c["merge_seconds"],
                "log_disk_gib": c["disk_gib"],
                "train_examples": t["examples"],
                "train_examples_per_s": t["examples_per_s"],
                "retrieval_queries": r["users"],
                "users_with_history": r.get("users_with_history"),
                "item_vectors_s": r["item_vectors_seconds"],
                "queries_per_s": r["queries_per_s"],
                "world_resident_gib": res[n]["world"]["world_gib"],
            }
        )
    rep.table(
        "What each stage did",
        detail,
        fmt={"N": ",d", "impressions": ",d", "user_episodes": ",d", "train_examples": ",d"}
        | {
            k: ".3g"
            for k in detail[0]
            if k not in ("N", "impressions", "user_episodes", "train_examples")
        },
        note=f"Collection: {cfg.n_shards} shards on backend {res[sizes[-1]]['collect']['backend']!r} "
        f"with {cfg.workers} workers, written to a simenv.logstore store. Training: one epoch over "
        f"the positives in {cfg.train_chunks} fit_two_tower calls (the examples are materialised: "
        "fit_two_tower does not stream; the log scan does). Retrieval: exact top-"
        f"{cfg.k}, {cfg.threads} thread(s).",
    )
    growth = []
    for stage in STAGES:
        secs = [res[n][stage]["seconds"] for n in sizes]
        peaks = [res[n][stage]["peak_gib"] for n in sizes]
        growth.append(
            {
                "stage": stage,
                "time_exponent": _exponent(sizes, secs),
                "memory_exponent": None if None in peaks else _exponent(sizes, peaks),
                f"time_x_{sizes[0]:,}_to_{sizes[-1]:,}": secs[-1] / secs[0],
                f"memory_x_{sizes[0]:,}_to_{sizes[-1]:,}": None
                if None in peaks
                else peaks[-1] / peaks[0],
            }
        )
    rep.table(
        "Growth with N (value ∝ N^exponent, least squares over the sizes)",
        growth,
        fmt=".3g",
        note="Descriptive: each size ran at a different time on a shared machine; the findings "
        "below compare sizes side by side instead.",
    )
    fig = Figure(figsize=(8, 3.2))
    ax1, ax2 = fig.subplots(1, 2)
    for stage in STAGES:
        ax1.loglog(sizes, [res[n][stage]["seconds"] for n in sizes], "o-", label=stage)
        peaks = [res[n][stage]["peak_gib"] for n in sizes]
        if None not in peaks:
            ax2.loglog(sizes, peaks, "o-", label=stage)
    ax1.set(xlabel="N (items = users)", ylabel="seconds", title="time")
    ax2.set(xlabel="N (items = users)", ylabel="GiB", title="peak memory")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    rep.figure(
        "scale",
        fig,
        "Time and peak memory of each stage against N (log-log).",
        data={"sizes": sizes, "results": {str(n): res[n] for n in sizes}},
    )
    # ---- findings, side by side in one process
    small, large = sizes[0], sizes[-1]
    coll = ratio_effect(
        sbs["collect_s_per_row_large"],
        sbs["collect_s_per_row_small"],
        bar=cfg.collect_ratio_bar,
        unit="alternated repetitions",
    )
    rep.finding(
        f"collection cost per impression at N={large:,} is less than "
        f"{cfg.collect_ratio_bar:g}x that at N={small:,} (the simulator and the logging policy "
        "scale with the impressions, not the catalog)",
        coll,
        metric="seconds per impression, ratio largest / smallest N",
        direction="<",
    )
    bar = cfg.retrieval_ratio_slack * large / small
    retr = ratio_effect(
        sbs["query_s_large"], sbs["query_s_small"], bar=bar, unit="alternated repetitions"
    )
    rep.finding(
        f"exact retrieval cost per query grows at most linearly in the catalog: the ratio "
        f"N={large:,} / N={small:,} is below {cfg.retrieval_ratio_slack:g} x {large / small:g} "
        f"= {bar:g}",
        retr,
        metric="seconds per query, ratio largest / smallest N",
        direction="<",
    )
    peak_all = max(
        max(res[n][s]["peak_gib"] or 0.0 for s in STAGES) + res[n]["collect"]["worker_peak_gib"]
        for n in sizes
    )
    rep.sanity(
        f"every stage fits in {cfg.memory_budget_gib:g} GiB at every size (collection: parent "
        "+ largest worker, an over-count under fork)",
        passed=bool(peak_all <= cfg.memory_budget_gib),
        evidence=f"largest {peak_all:.2f} GiB",
    )
    off = [abs(res[n]["collect"]["rows"] / res[n]["collect"]["target_rows"] - 1) for n in sizes]
    rep.sanity(
        "the collections logged the planned impressions within 15% (pilot-sized)",
        passed=bool(max(off) <= 0.15),
        evidence=", ".join(
            f"N={n:,}: {res[n]['collect']['rows']:,} of {res[n]['collect']['target_rows']:,.0f}"
            for n in sizes
        ),
    )
    rep.sanity(
        "retrieval returned valid item ids at every size",
        passed=bool(all(res[n]["retrieve"]["valid_ids"] for n in sizes)),
        evidence=f"{len(sizes)} sizes",
    )
    rep.add_result("stages", {str(n): res[n] for n in sizes})
    rep.add_result("side_by_side", sbs)
    rep.add_result("seed", seed)
    rep.headline(
        f"N={large:,}: "
        + ", ".join(
            f"{s} {res[large][s]['seconds']:.0f} s / {res[large][s]['peak_gib'] or float('nan'):.1f} GiB"
            for s in STAGES
        )
    )
