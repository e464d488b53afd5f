"""Command line of the benchmark suite.

``python -m benchmarks NAME [--quick] [--seeds N] [--out DIR] [--threads T] [--quiet]
[--backend serial|processes|ray] [--workers W]``

``NAME`` is an experiment, ``all`` (every registered experiment, in order; a failing one is
recorded and the others still run) or ``list`` (names, descriptions and config fields).
Each experiment writes ``DIR/NAME/report.md`` and ``results.json``; ``DIR/index.md`` is
regenerated after each one and its path printed at the end. ``--backend processes|ray``
runs the experiments as parallel tasks (one per experiment; see ``benchmarks.parallel``):
same numbers and reports, the index regenerated when all are done.

Exit codes: 0 success; 1 an experiment (or an experiment module) failed, or, with
``--strict``, a sanity check failed; 2 bad usage (unknown name, bad option, invalid config).
"""

from __future__ import annotations

import argparse
import difflib
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.registry import (
    EXPERIMENT_MODULES,
    REGISTRY,
    Experiment,
    Registry,
    UnknownExperimentError,
    config_fields,
    make_config,
    parse_value,
)
from benchmarks.report import INDEX_FILE, format_seconds
from benchmarks.runner import RunOutcome, export_thread_env, run_experiment
from simenv.device import check_device
from simenv.shard import BACKENDS

EPILOG = """examples:
  python -m benchmarks list
  python -m benchmarks all --quick                 # what `make demo` runs
  python -m benchmarks NAME --seeds 5 --threads 1
  python -m benchmarks NAME --set n_users=500      # override a config field
  python -m benchmarks all --set NAME.n_users=500  # under `all`, prefix the experiment
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m benchmarks``."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run benchmark experiments and write Markdown + JSON reports.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", metavar="NAME", help="an experiment name, `all`, or `list`")
    p.add_argument(
        "--quick",
        action="store_true",
        help="small profile (minutes on 2 cores) and 1 seed unless --seeds says otherwise",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        metavar="N",
        help="number of seeds, run as FIRST..FIRST+N-1 (default 3, or 1 with --quick)",
    )
    p.add_argument(
        "--first-seed", type=int, default=0, metavar="FIRST", help="first seed (default 0)"
    )
    p.add_argument("--out", type=Path, default=Path("reports"), metavar="DIR", help="reports root")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="T",
        help="threads for torch and faiss (default: the libraries' own)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        metavar="D",
        help="torch device of the experiments that train or search on one: cpu (default), "
        "cuda, cuda:N or auto; recorded in results.json",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or progress lines")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (typed from its annotation); repeatable; "
        "under `all` write NAME.KEY=VALUE",
    )
    p.add_argument(
        "--module",
        dest="modules",
        action="append",
        default=[],
        metavar="MODULE",
        help="also import this module to register experiments (your own); repeatable",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 if any sanity check fails (not only on errors); findings never fail a run",
    )
    p.add_argument(
        "--exclude",
        default="",
        metavar="NAMES",
        help="under `all`: comma-separated experiments to leave out (e.g. scale,ann, the "
        "hours-long machine benchmarks that `make reports` runs apart)",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="serial",
        help="run the experiments one after another (serial), as local processes, or as Ray "
        "tasks (pip install -e .[ray]); same numbers, reports and index (default serial)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="W",
        help="experiments run at once under --backend processes|ray (default: all CPUs)",
    )
    return p


def _excluded(args: argparse.Namespace) -> list[str]:
    """The experiment names of ``--exclude`` (comma-separated, blanks ignored)."""
    return [n.strip() for n in args.exclude.split(",") if n.strip()]


def _describe(exp: Experiment) -> list[str]:
    """Lines describing one experiment for ``list``."""
    cls = exp.config_cls
    lines = [
        f"{exp.name}",
        f"    {exp.description}",
        f"    config: {cls.__module__}.{cls.__name__}",
    ]
    try:
        full, quick = cls.full(), cls.quick()
    except Exception as e:  # a broken profile should not hide the others
        lines.append(f"    (cannot build its profiles: {type(e).__name__}: {e})")
        full = quick = None
    for f in config_fields(cls):
        if full is not None:
            v_full, v_quick = getattr(full, f.name), getattr(quick, f.name)
            value = f"{v_full!r}" + (f" (quick: {v_quick!r})" if v_quick != v_full else "")
        else:
            value = repr(f.default)
        lines.append(f"    --set {f.name}=  [{f.type_name}] {value}")
        lines.append(f"          {f.help}")
    return lines


def _split_overrides(
    items: Sequence[str], selected: Sequence[Experiment], registry: Registry, all_mode: bool
) -> dict[str, dict[str, str]]:
    """Map ``--set`` items to experiment -> {field: text}; raises ValueError on misuse."""
    out: dict[str, dict[str, str]] = {e.name: {} for e in selected}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip()
        prefix, dot, rest = key.partition(".")
        if dot and prefix in registry:
            if prefix not in out:
                raise ValueError(f"--set {item!r} names experiment {prefix!r}, which is not run")
            target, key = prefix, rest
        elif all_mode:
            raise ValueError(f"under `all`, --set needs NAME.KEY=VALUE, got {item!r}")
        else:
            target = selected[0].name
        if key in out[target]:
            raise ValueError(f"--set gives {target}.{key} twice")
        out[target][key] = value
    return out


def _out_problem(out: Path) -> str | None:
    """Why ``--out`` cannot hold the reports, or None.

    An existing file, a file where a parent folder should be, or a folder without write
    permission.
    """
    if out.exists() and not out.is_dir():
        return f"--out {out} is an existing file; the reports need a folder (another path?)"
    parent = out
    while not parent.exists():
        if parent.parent == parent:
            return None
        parent = parent.parent
    if not parent.is_dir():
        return f"--out {out}: {parent} is a file, so the folder cannot be created"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"--out {out}: no permission to write in {parent}"
    return None


def _static_problem(args: argparse.Namespace) -> str | None:
    """The first error in NAME or ``--set`` that the experiments' source shows, or None.

    Reads :func:`benchmarks.manifest.read_manifest` (no import of the experiments); where the
    manifest cannot tell, it says nothing and the registry decides after the import.
    """
    from benchmarks.manifest import read_manifest, resolve_annotation

    manifest = read_manifest(list(EXPERIMENT_MODULES))
    if manifest is None:
        return None
    if args.name == "all":
        unknown = sorted(set(_excluded(args)) - set(manifest))
        if unknown:
            return f"--exclude: unknown experiment(s) {unknown}; registered: {', '.join(manifest)}"
        selected = [e for e in manifest.values() if e.name not in _excluded(args)]
    elif args.name in manifest:
        selected = [manifest[args.name]]
    else:
        close = difflib.get_close_matches(args.name, list(manifest), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown experiment {args.name!r}{hint}; registered: {', '.join(manifest)}"
    try:
        overrides = _split_overrides(args.overrides, selected, manifest, args.name == "all")
        for exp in selected:
            if exp.fields is None:
                continue
            unknown = sorted(set(overrides[exp.name]) - set(exp.fields))
            if unknown:
                return (
                    f"unknown config field(s) {unknown} for {exp.name}; "
                    f"fields: {', '.join(exp.fields)}"
                )
            for key, text in overrides[exp.name].items():
                tp = resolve_annotation(exp.fields[key])
                if tp is not None:
                    parse_value(text, tp, key)
    except ValueError as e:
        return str(e)
    return None


def _command(
    exp: Experiment, args: argparse.Namespace, n_seeds: int, overrides: dict[str, str]
) -> str:
    """The canonical single-experiment command that reproduces this run's numbers."""
    parts = ["python", "-m", "benchmarks", exp.name]
    if args.quick:
        parts.append("--quick")
    parts += ["--seeds", str(n_seeds)]
    if args.first_seed:
        parts += ["--first-seed", str(args.first_seed)]
    if args.threads is not None:
        parts += ["--threads", str(args.threads)]
    if args.device != "cpu":
        parts += ["--device", args.device]
    for k, v in overrides.items():
        parts += ["--set", f"{k}={v}"]
    if exp.module not in EXPERIMENT_MODULES and exp.module != "__main__":
        parts += ["--module", exp.module]
    return shlex.join(parts)


def main(
    argv: Sequence[str] | None = None,
    registry: Registry | None = None,
    modules: Sequence[str] | None = None,
) -> int:
    """Run the command line.

    Args:
        argv: arguments without the program name (defaults to ``sys.argv[1:]``).
        registry: the registry to use (defaults to the process-wide one).
        modules: experiment modules to import (defaults to ``EXPERIMENT_MODULES``).

    Returns:
        The exit code.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.first_seed < 0:
        parser.error(f"--first-seed must be >= 0, got {args.first_seed}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.exclude and args.name != "all":
        parser.error("--exclude applies to `all` only")
    problem = _out_problem(args.out)
    if problem:
        parser.error(problem)
    if registry is None and modules is None and not args.modules and args.name != "list":
        # the shipped experiments: names and --set checked from their source, before the
        # 10-15 s import of torch and the models (the registry checks again after it)
        problem = _static_problem(args)
        if problem:
            print(f"python -m benchmarks: error: {problem}", file=sys.stderr)
            print("see `python -m benchmarks list`", file=sys.stderr)
            return 2
    try:
        check_device("--device", args.device)  # spelling only; availability when used
    except ValueError as e:
        parser.error(str(e))
    export_thread_env(args.threads)  # before experiment modules import torch / faiss

    registry = REGISTRY if registry is None else registry
    to_load = list(EXPERIMENT_MODULES if modules is None else modules) + list(args.modules)
    import_failed = registry.load(to_load)
    for mod, tb in import_failed.items():
        print(f"error: could not import experiment module {mod!r}:\n{tb}", file=sys.stderr)

    if args.name == "list":
        if len(registry) == 0:
            print("No experiments registered (benchmarks.registry.EXPERIMENT_MODULES is empty).")
        else:
            print(f"{len(registry)} experiment(s); run one with `python -m benchmarks NAME`:\n")
            for exp in registry:
                print("\n".join(_describe(exp)) + "\n")
        return 1 if import_failed else 0

    if args.name == "all":
        unknown = sorted(set(_excluded(args)) - set(registry.names()))
        if unknown:
            print(
                f"python -m benchmarks: error: --exclude: unknown experiment(s) {unknown}",
                file=sys.stderr,
            )
            return 2
        selected = [e for e in registry if e.name not in _excluded(args)]
        if not selected:
            print(
                "No experiments registered (benchmarks.registry.EXPERIMENT_MODULES is empty); "
                "nothing to run."
            )
            return 1 if import_failed else 0
    else:
        try:
            selected = [registry.get(args.name)]
        except UnknownExperimentError as e:
            print(f"python -m benchmarks: error: {e}", file=sys.stderr)
            print("see `python -m benchmarks list`", file=sys.stderr)
            return 2

    n_seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    seeds = tuple(range(args.first_seed, args.first_seed + n_seeds))
    try:
        overrides = _split_overrides(args.overrides, selected, registry, args.name == "all")
        configs = {
            e.name: make_config(e.config_cls, args.quick, overrides[e.name]) for e in selected
        }
    except ValueError as e:
        print(f"python -m benchmarks: error: {e}", file=sys.stderr)
        return 2

    order = registry.names()
    outcomes = []
    t0 = time.perf_counter()
    if args.backend != "serial":
        outcomes = _run_parallel(args, selected, configs, overrides, seeds, n_seeds, registry)
        selected = []  # done
    for i, exp in enumerate(selected, 1):
        if not args.quiet:
            print(f"[{i}/{len(selected)}] {exp.name}: running", file=sys.stderr, flush=True)
        outcome = run_experiment(
            exp,
            configs[exp.name],
            out_root=args.out,
            seeds=seeds,
            quick=args.quick,
            command=_command(exp, args, n_seeds, overrides[exp.name]),
            overrides=overrides[exp.name],
            threads=args.threads,
            device=args.device,
            quiet=args.quiet,
            order=order,
        )
        outcomes.append(outcome)
        if not args.quiet or not outcome.ok:
            print(_status_line(i, len(selected), outcome), file=sys.stderr, flush=True)
    index = Path(args.out) / INDEX_FILE  # regenerated after every experiment
    failed = [o.name for o in outcomes if not o.ok]
    if not args.quiet and len(outcomes) > 1:
        print(f"total wall time {format_seconds(time.perf_counter() - t0)}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} experiment(s) failed: {', '.join(failed)}", file=sys.stderr)
    print(f"Reports index: {index}")
    if failed or import_failed:
        return 1
    if args.strict and any(o.n_fail for o in outcomes):
        return 1
    return 0


def _status_line(i: int, n: int, outcome: RunOutcome) -> str:
    status = "ok" if outcome.ok else "FAILED"
    v = outcome.verdicts
    return (
        f"[{i}/{n}] {outcome.name}: {status} in {format_seconds(outcome.wall_time_s)}; findings "
        f"{v.get('HOLDS', 0)} HOLDS / {v.get('REFUTED', 0)} REFUTED / "
        f"{v.get('INCONCLUSIVE', 0)} INCONCLUSIVE; sanity checks "
        f"{outcome.n_pass} passed / {outcome.n_fail} failed; {outcome.report_path}"
    )


def _run_parallel(
    args: argparse.Namespace,
    selected: Sequence[Experiment],
    configs: dict[str, object],
    overrides: dict[str, dict[str, str]],
    seeds: tuple[int, ...],
    n_seeds: int,
    registry: Registry,
) -> list[RunOutcome]:
    """``--backend processes|ray``: one task per experiment (see benchmarks.parallel)."""
    from benchmarks.parallel import ExperimentTask, run_experiments
    from benchmarks.registry import FULL_MINUTES

    tasks = [
        ExperimentTask(
            name=exp.name,
            cfg=configs[exp.name],
            seeds=seeds,
            quick=args.quick,
            command=_command(exp, args, n_seeds, overrides[exp.name]),
            overrides=overrides[exp.name],
            out_root=args.out,
            threads=args.threads,
            argv=list(sys.argv),
            order=tuple(registry.names()),
            device=args.device,
            cost=FULL_MINUTES.get(exp.name, 1.0),
        )
        for exp in selected
    ]
    if not args.quiet:
        print(
            f"running {len(tasks)} experiment(s) on backend {args.backend!r} "
            f"(progress bars off inside the workers)",
            file=sys.stderr,
            flush=True,
        )
    finished = 0

    def on_done(_: int, outcome: RunOutcome) -> None:
        nonlocal finished
        finished += 1
        if not args.quiet or not outcome.ok:
            print(_status_line(finished, len(tasks), outcome), file=sys.stderr, flush=True)

    return run_experiments(tasks, registry, args.backend, args.workers, on_done)


if __name__ == "__main__":
    sys.exit(main())
