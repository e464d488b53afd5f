"""Experiments as parallel tasks: ``python -m benchmarks all --backend ray|processes``.

Each experiment is one task (Ray task or local process, through :func:`simenv.shard.map_shards`)
that runs :func:`benchmarks.runner.run_experiment` exactly as the serial loop does and writes
its report; the parent regenerates the index once all have finished. An experiment's numbers
depend only on its config and seeds (every random draw comes from ``derive_rng(seed, ...)``),
so they are the same as in a serial run; only wall times differ.

Parallelism is per experiment, not per seed: an experiment's report combines its seeds
(tables with mean ± std, verdicts over seeds) inside its own ``run``, so splitting one
experiment's seeds over tasks would need every experiment to merge partial reports.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.registry import Registry
from benchmarks.report import write_index
from benchmarks.runner import RunOutcome, run_experiment
from simenv.shard import map_shards

__all__ = ["ExperimentTask", "run_experiments"]


@dataclass(frozen=True)
class ExperimentTask:
    """One experiment to run: its name in the registry, its config and run options.

    Attributes:
        name: the experiment's registered name.
        cfg: its config (a frozen dataclass, picklable).
        seeds: the seeds to cover.
        quick: the ``--quick`` flag.
        command: the canonical command that reproduces its numbers.
        overrides: the ``--set`` overrides applied to ``cfg``.
        out_root: absolute reports root (a Ray worker may run in another folder).
        threads: torch / faiss threads inside the task.
        argv: the parent's argument vector (recorded in results.json).
        order: experiment order for the index.
        device: the ``--device`` of the run (torch device of the experiments).
        cost: expected run time (any unit); the costliest tasks are submitted first, so that
            a long experiment does not start last (outcomes keep the order of ``tasks``).
    """

    name: str
    cfg: Any
    seeds: tuple[int, ...]
    quick: bool
    command: str
    overrides: dict[str, str]
    out_root: Path
    threads: int | None
    argv: list[str]
    order: tuple[str, ...]
    device: str = "cpu"
    cost: float = 0.0


def _run_task(task: ExperimentTask, registry: Registry) -> RunOutcome:
    """Run one experiment inside a worker (no progress bars: workers share the terminal)."""
    exp = registry.get(task.name)
    return run_experiment(
        exp,
        task.cfg,
        out_root=task.out_root,
        seeds=task.seeds,
        quick=task.quick,
        command=task.command,
        overrides=task.overrides,
        threads=task.threads,
        device=task.device,
        quiet=True,
        argv=task.argv,
        order=task.order,
    )


def run_experiments(
    tasks: Sequence[ExperimentTask],
    registry: Registry,
    backend: str,
    workers: int | None = None,
    on_done: Callable[[int, RunOutcome], None] | None = None,
) -> list[RunOutcome]:
    """Run experiments in parallel on ``backend``; outcomes in the order of ``tasks``.

    The registry is shared with the workers (inherited under ``fork``, cloudpickled once on
    Ray), so experiments registered by ``--module`` or in-process run too. The index under each
    task's ``out_root`` is regenerated after all tasks finish.

    Args:
        tasks: the experiments.
        registry: the registry holding them.
        backend: ``"serial"``, ``"processes"`` or ``"ray"`` (see :mod:`simenv.shard`).
        workers: parallel tasks (default: all CPUs).
        on_done: called in this process as each experiment finishes.

    Returns:
        One :class:`RunOutcome` per task.
    """
    tasks = [dataclasses.replace(t, out_root=Path(t.out_root).resolve()) for t in tasks]
    # longest first (stable: equal costs keep their order); a worker takes the next task
    # as soon as it is free, so a long task submitted last would finish long after the rest
    submit = sorted(range(len(tasks)), key=lambda i: -tasks[i].cost)

    def done(j: int, outcome: RunOutcome) -> None:
        if on_done is not None:
            on_done(submit[j], outcome)

    ran = map_shards(
        _run_task, [tasks[i] for i in submit], registry, backend, workers, progress=False,
        on_result=done,
    )  # fmt: skip
    outcomes: list[RunOutcome] = [None] * len(tasks)  # type: ignore[list-item]
    for j, i in enumerate(submit):
        outcomes[i] = ran[j]
    for root in sorted({t.out_root for t in tasks}):
        write_index(root, tasks[0].order)
    return outcomes
