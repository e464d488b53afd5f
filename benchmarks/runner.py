"""Running one experiment: the :class:`RunContext` it receives and the run/record loop.

``run_experiment`` builds the report, the context and the provenance, calls the
experiment's ``run(cfg, ctx)``, records a traceback instead of crashing when it raises,
writes ``reports/NAME/{report.md,results.json}`` and regenerates ``reports/index.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import sys
import time
import traceback
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from benchmarks.provenance import collect_provenance
from benchmarks.registry import Experiment
from benchmarks.report import RESULTS_FILE, Report, RunInfo, write_index

__all__ = [
    "RunContext",
    "Timer",
    "RunOutcome",
    "seed_sequence",
    "derive_rng",
    "derive_seed",
    "apply_threads",
    "export_thread_env",
    "run_experiment",
]

_SEED_MASK = (1 << 63) - 1  # derived integer seeds fit int64 and torch.manual_seed


def _key_int(key: Any) -> int:
    """A spawn-key entry: a non-negative int, or a string hashed stably (BLAKE2b, 64 bit)."""
    if isinstance(key, str):
        return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big")
    if isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
        if int(key) < 0:
            raise ValueError(f"rng keys must be >= 0 when ints, got {int(key)}")
        return int(key)
    raise ValueError(f"rng keys must be str or non-negative int, got {type(key).__name__} {key!r}")


def seed_sequence(seed: int, *keys: str | int) -> np.random.SeedSequence:
    """The seed sequence for ``seed`` and a path of keys (``"world"``, ``"users"``, 3...).

    Different key paths give statistically independent streams; the same ``(seed, keys)``
    gives the same stream in every process (string keys are hashed with BLAKE2b, not with
    Python's salted ``hash``).

    Args:
        seed: the run's seed, a non-negative int.
        *keys: names (str) or indices (non-negative int) saying what the stream is for.

    Returns:
        ``np.random.SeedSequence(entropy=seed, spawn_key=keys)``.

    Raises:
        ValueError: for a negative or non-int seed, or a bad key.
    """
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be a non-negative int, got {type(seed).__name__} {seed!r}")
    if int(seed) < 0:
        raise ValueError(f"seed must be a non-negative int, got {int(seed)}")
    return np.random.SeedSequence(entropy=int(seed), spawn_key=tuple(_key_int(k) for k in keys))


def derive_rng(seed: int, *keys: str | int) -> np.random.Generator:
    """A numpy Generator (PCG64) for ``(seed, *keys)``; see :func:`seed_sequence`."""
    return np.random.Generator(np.random.PCG64(seed_sequence(seed, *keys)))


def derive_seed(seed: int, *keys: str | int) -> int:
    """An integer seed in ``[0, 2**63)`` for ``(seed, *keys)``, for APIs that take an int."""
    state = seed_sequence(seed, *keys).generate_state(1, dtype=np.uint64)
    return int(state[0]) & _SEED_MASK


def apply_threads(threads: int | None) -> None:
    """Set torch's and faiss's thread counts (each only if installed).

    Args:
        threads: the thread count; ``None`` leaves the libraries' defaults.

    Raises:
        ValueError: if ``threads`` is not a positive int.
    """
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")
    if importlib.util.find_spec("torch") is not None:
        import torch

        torch.set_num_threads(threads)
    if importlib.util.find_spec("faiss") is not None:
        import faiss

        faiss.omp_set_num_threads(threads)


@dataclass
class Timer:
    """Wall time of one ``with ctx.timer(...)`` block, in seconds (set when it exits)."""

    seconds: float = 0.0


@dataclass
class RunContext:
    """What an experiment's ``run(cfg, ctx)`` receives besides its config.

    Attributes:
        name: the experiment's name.
        seeds: the seeds to cover, in order (3 by default, 1 under ``--quick``).
        quick: True under ``--quick``.
        out_dir: ``reports/NAME``: where the report goes; extra artefacts may go here too.
        report: the :class:`~benchmarks.report.Report` to fill.
        threads: the thread count applied to torch / faiss (``None``: library defaults).
        quiet: True under ``--quiet``: no progress bars, no log lines.
        device: ``--device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``): where the
            experiments that support it train and search (passed to ``TrainConfig.device``,
            ``IndexConfig.device``).
        timings: named wall times accumulated by :meth:`timer` (recorded in results.json).
    """

    name: str
    seeds: tuple[int, ...]
    quick: bool
    out_dir: Path
    report: Report
    threads: int | None = None
    quiet: bool = False
    device: str = "cpu"
    timings: dict[str, float] = field(default_factory=dict)
    _t0: float = field(default_factory=time.perf_counter, repr=False)

    def rng(self, seed: int, *keys: str | int) -> np.random.Generator:
        """An independent numpy Generator for ``seed`` and what it is for.

        Example: ``world_rng = ctx.rng(seed, "world")``; ``ctx.rng(seed, "users", 2)``.
        The same ``(seed, keys)`` gives the same numbers in any experiment and process.
        """
        return derive_rng(seed, *keys)

    def seed_int(self, seed: int, *keys: str | int) -> int:
        """An int seed for ``(seed, *keys)``, for constructors that take an int seed."""
        return derive_seed(seed, *keys)

    def torch_generator(self, seed: int, *keys: str | int) -> Any:
        """A CPU ``torch.Generator`` seeded from ``(seed, *keys)``."""
        import torch

        gen = torch.Generator()
        gen.manual_seed(derive_seed(seed, *keys))
        return gen

    def progress(
        self,
        iterable: Iterable[Any] | None = None,
        desc: str | None = None,
        total: int | None = None,
        **kwargs: Any,
    ) -> Any:
        """A tqdm progress bar on stderr (disabled by ``--quiet``).

        Args:
            iterable: what to iterate over (or ``None`` and call ``.update`` yourself).
            desc: label, prefixed by the experiment's name.
            total: number of items when ``iterable`` has no length.
            **kwargs: passed on to tqdm.
        """
        label = f"{self.name}: {desc}" if desc else self.name
        kwargs.setdefault("leave", False)
        kwargs.setdefault("dynamic_ncols", True)
        kwargs.setdefault("mininterval", 0.5)
        return tqdm(
            iterable, desc=label, total=total, disable=self.quiet, file=sys.stderr, **kwargs
        )

    def log(self, message: str) -> None:
        """Print a line to stderr without breaking progress bars (silent under --quiet)."""
        if not self.quiet:
            tqdm.write(f"[{self.name}] {message}", file=sys.stderr)

    @contextlib.contextmanager
    def timer(self, name: str | None = None) -> Iterator[Timer]:
        """Time a block; ``name`` accumulates into :attr:`timings` (and results.json).

        Example::

            with ctx.timer("train") as t:
                model.fit(log)
            row["wall_s"] = t.seconds
        """
        t = Timer()
        start = time.perf_counter()
        try:
            yield t
        finally:
            t.seconds = time.perf_counter() - start
            if name is not None:
                self.timings[name] = self.timings.get(name, 0.0) + t.seconds

    def elapsed(self) -> float:
        """Seconds since the context was created (the run's start)."""
        return time.perf_counter() - self._t0


@dataclass(frozen=True)
class RunOutcome:
    """What the CLI needs to know after one experiment ran.

    Attributes:
        name: the experiment.
        ok: False if it raised (or its report could not be written).
        n_pass: sanity checks that passed.
        n_fail: sanity checks that failed: something the design
            guarantees did not happen (``--strict`` exits 1 on these).
        verdicts: findings per verdict (``HOLDS``, ``REFUTED``, ``INCONCLUSIVE``).
        wall_time_s: wall time of the run.
        report_path: path of report.md (``None`` if it could not be written).
        headline: the headline written to the index.
    """

    name: str
    ok: bool
    n_pass: int
    n_fail: int
    wall_time_s: float
    report_path: Path | None
    headline: str
    verdicts: dict[str, int] = field(default_factory=dict)


def _remove_stale_figures(out_dir: Path) -> None:
    """Delete the PNGs a previous run of this experiment recorded (they may not be redone)."""
    try:
        old = json.loads((out_dir / RESULTS_FILE).read_text(encoding="utf-8"))
        files = [f["file"] for f in old.get("figures", [])]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return
    for name in files:
        p = out_dir / str(name)
        if p.parent == out_dir and p.suffix == ".png":
            with contextlib.suppress(OSError):
                p.unlink()


def run_experiment(
    exp: Experiment,
    cfg: Any,
    *,
    out_root: Path | str,
    seeds: Sequence[int],
    quick: bool,
    command: str,
    overrides: Mapping[str, str] | None = None,
    threads: int | None = None,
    quiet: bool = False,
    argv: list[str] | None = None,
    device: str = "cpu",
    order: Sequence[str] = (),
) -> RunOutcome:
    """Run one experiment and write its report, then regenerate the reports index.

    An exception inside ``exp.run`` is caught: its traceback goes into the report (status
    ``error``) and the outcome says ``ok=False``; ``KeyboardInterrupt`` still stops.

    Args:
        exp: the experiment.
        cfg: its config (already built and validated).
        out_root: the reports root; the report goes to ``out_root/NAME``.
        seeds: the seeds to cover.
        quick: the profile flag passed to the context.
        command: the canonical command line reproducing this run.
        overrides: the ``--set`` overrides applied to ``cfg`` (recorded).
        threads: thread count for torch / faiss (``None``: library defaults).
        quiet: disable progress bars and log lines.
        argv: raw argument vector (defaults to ``sys.argv``).
        device: the torch device of the run (recorded in results.json).
        order: experiment order for the index.

    Returns:
        A :class:`RunOutcome`.
    """
    out_root = Path(out_root)
    out_dir = out_root / exp.name
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_figures(out_dir)
    seeds = tuple(int(s) for s in seeds)
    provenance = collect_provenance(command, argv, threads, device)
    info = RunInfo(exp.name, exp.description, cfg, seeds, quick, dict(overrides or {}))
    report = Report(info, out_dir, provenance)
    ctx = RunContext(exp.name, seeds, quick, out_dir, report, threads, quiet, device)
    start = time.perf_counter()
    try:
        apply_threads(threads)
        exp.run(cfg, ctx)
    except Exception:  # recorded in the report; `all` goes on
        report.record_error(traceback.format_exc())
    wall = time.perf_counter() - start
    path: Path | None
    try:
        path = report.write(wall, ctx.timings)
    except Exception:  # e.g. disk full: say so, let `all` go on
        print(f"[{exp.name}] could not write its report:", file=sys.stderr)
        traceback.print_exc()
        path = None
    write_index(out_root, order)
    checks = [c.passed for c in report.sanity_checks]
    n_pass = sum(checks)
    counts = report.verdict_counts()
    return RunOutcome(
        name=exp.name,
        ok=not report.failed and path is not None,
        n_pass=n_pass,
        n_fail=len(checks) - n_pass,
        wall_time_s=wall,
        report_path=path,
        headline=report.headline_text(),
        verdicts={k: counts[k] for k in ("HOLDS", "REFUTED", "INCONCLUSIVE")},
    )


def export_thread_env(threads: int | None) -> None:
    """Export thread-count variables so libraries imported later start with them."""
    if threads is None:
        return
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
