"""Combine runs of one experiment over disjoint seeds into one report.

A finding over several seeds is a t interval over the per-seed paired effects
(:func:`benchmarks.stats.combine_seeds`): each seed is one replication of the whole experiment, and
the interval needs only the per-seed point estimates, which every ``results.json`` stores. So a run
over seeds 0-2 and a run over seeds 3-9 of the same experiment, the same config and the same
profile hold everything a single run over seeds 0-9 would compute for those findings; this module
recomputes them (estimate, interval, verdict) as that single run would, without re-running the
seeds already measured. Every seed's numbers are a function of the seed alone (the experiments
draw from ``ctx.rng(seed, ...)``), which is what makes the split legitimate; the report lists the
source runs (commands, commits, seeds) so a reader can re-run any part.

What is combined:

- findings whose effect is a t interval over per-seed effects (or a one-seed run's effect, which is
  that seed's estimate) with the same claim, metric, direction, minimum effect, scale and inner
  method in every run: the per-seed estimates are pooled in seed order and judged again;
- sanity checks with the same text: passed only if passed in every run;
- tables whose rows are each one seed's (``seeds`` holds one seed): rows concatenated.

What is not: findings computed another way (pooled, timings, one sample over a summary), claims
whose text differs between runs (a choice made per run on validation data, e.g. "the best of 11
variants (X)"), and tables that summarise several seeds per row; the report lists them with the
reason, and the source reports keep them.

Usage::

    python -m benchmarks.combine reports-a/consistency reports-b/consistency --out combined
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.provenance import collect_provenance
from benchmarks.report import RESULTS_FILE, Report, RunInfo, write_index
from benchmarks.stats import Effect, combine_seeds

_T_OVER = re.compile(r"^t over (\d+) per-seed effects \((.*)\)$", re.DOTALL)


class CombineError(ValueError):
    """The runs cannot be combined (named argument, reason)."""


def load_run(path: Path | str) -> dict[str, Any]:
    """One experiment run's ``results.json`` (``path`` is its report folder or the file)."""
    p = Path(path)
    f = p if p.suffix == ".json" else p / RESULTS_FILE
    if not f.is_file():
        raise CombineError(
            f"runs: {str(p)!r} holds no {RESULTS_FILE} (an experiment's report folder)"
        )
    try:
        doc = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CombineError(f"runs: {str(f)!r} is not readable JSON ({e})") from e
    for key in ("experiment", "status", "seeds", "config", "profile", "findings"):
        if key not in doc:
            raise CombineError(
                f"runs: {str(f)!r} has no {key!r} (not a results.json of this project)"
            )
    if doc["status"] != "ok":
        raise CombineError(
            f"runs: {str(f)!r} has status {doc['status']!r}; only runs that finished combine"
        )
    doc["_path"] = str(p)
    return doc


def check_compatible(runs: Sequence[dict[str, Any]]) -> None:
    """Raise :class:`CombineError` unless the runs share experiment, config and profile.

    The seeds must be disjoint, and there must be at least two runs.
    """
    if len(runs) < 2:
        raise CombineError(f"runs: give at least two runs to combine, got {len(runs)}")
    first = runs[0]
    for r in runs[1:]:
        for key in ("experiment", "profile", "config"):
            if r[key] != first[key]:
                raise CombineError(
                    f"runs: {r['_path']!r} differs from {first['_path']!r} in {key} "
                    f"({r[key]!r} vs {first[key]!r}); only runs of one experiment, config and "
                    "profile combine"
                )
    seen: dict[int, str] = {}
    for r in runs:
        for s in r["seeds"]:
            if s in seen:
                raise CombineError(
                    f"runs: seed {s} is in both {seen[s]!r} and {r['_path']!r}; the seeds must "
                    "be disjoint"
                )
            seen[s] = r["_path"]


def _seed_effects(f: dict[str, Any], n_seeds: int) -> tuple[list[float], str, list[int]] | None:
    """(per-seed estimates, inner method, inner units per seed) of a finding, or None."""
    e = f["effect"]
    if n_seeds == 1 and e.get("unit") != "seeds":
        return [float(e["estimate"])], str(e["method"]), [int(e["n"])]
    m = _T_OVER.match(str(e.get("method", "")))
    per = e.get("per_seed") or []
    if e.get("unit") != "seeds" or m is None or int(m.group(1)) != n_seeds or len(per) != n_seeds:
        return None
    total = int(e.get("n_inner") or n_seeds)
    each = [total // n_seeds] * n_seeds
    each[0] += total - sum(each)
    return [float(v) for v in per], m.group(2), each


def _key(f: dict[str, Any]) -> tuple[Any, ...]:
    e = f["effect"]
    return (f["text"], f["metric"], f["direction"], float(f["min_effect"]), e.get("scale"))


def combine_findings(
    runs: Sequence[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """The combined findings (in the first run's order) and those left out, with the reason.

    Each combined finding is ``{"text", "metric", "direction", "min_effect", "effect", "note"}``
    with ``effect`` a :class:`~benchmarks.stats.Effect` recomputed over every seed.
    """
    order = sorted(range(len(runs)), key=lambda i: min(runs[i]["seeds"]))
    by_run = [{_key(f): f for f in r["findings"]} for r in runs]
    combined, left = [], []
    for f0 in runs[0]["findings"]:
        k = _key(f0)
        missing = [runs[i]["_path"] for i in range(len(runs)) if k not in by_run[i]]
        if missing:
            left.append({"finding": f0["text"], "reason": f"not in {', '.join(missing)} (the claim differs, e.g. a choice made per run)"})  # fmt: skip
            continue
        stubs: list[Effect] = []
        methods = set()
        bad = ""
        for i in order:
            f = by_run[i][k]
            got = _seed_effects(f, len(runs[i]["seeds"]))
            if got is None:
                bad = f"in {runs[i]['_path']} it is not a t interval over per-seed effects ({f['effect'].get('method')})"
                break
            ests, method, inner = got
            methods.add(method)
            e = f["effect"]
            stubs += [
                Effect(
                    estimate=v,
                    low=None,
                    high=None,
                    n=n,
                    unit="seeds",
                    method=method,
                    scale=e.get("scale", "absolute"),
                    null=float(e.get("null", 0.0)),
                    level=float(e.get("level", 0.95)),
                    treatment=e.get("treatment"),
                    control=e.get("control"),
                )  # fmt: skip
                for v, n in zip(ests, inner, strict=True)
            ]
        if not bad and len(methods) != 1:
            bad = f"the inner methods differ between runs ({sorted(methods)})"
        if bad:
            left.append({"finding": f0["text"], "reason": bad})
            continue
        notes = [by_run[i][k].get("note", "") for i in order]
        note = (
            notes[0]
            if len(set(notes)) == 1
            else " | ".join(
                f"seeds {_span(runs[i]['seeds'])}: {n}"
                for i, n in zip(order, notes, strict=True)
                if n
            )
        )
        combined.append({
            "text": f0["text"], "metric": f0["metric"], "direction": f0["direction"],
            "min_effect": float(f0["min_effect"]), "effect": combine_seeds(stubs, stubs[0].level), "note": note,
        })  # fmt: skip
    first_keys = set(by_run[0])
    for i in range(1, len(runs)):
        for k, f in by_run[i].items():
            if k not in first_keys:
                first_keys.add(k)
                left.append({"finding": f["text"], "reason": f"not in {runs[0]['_path']} (the claim differs, e.g. a choice made per run)"})  # fmt: skip
    return combined, left


def combine_sanity(runs: Sequence[dict[str, Any]]) -> list[tuple[str, bool, str]]:
    """Sanity checks present in every run: passed only where every run passed."""
    order = sorted(range(len(runs)), key=lambda i: min(runs[i]["seeds"]))
    out = []
    for c0 in runs[0].get("sanity", []):
        found = [
            next((c for c in runs[i].get("sanity", []) if c["text"] == c0["text"]), None)
            for i in order
        ]
        if any(c is None for c in found):
            continue
        ev = "; ".join(f"seeds {_span(runs[i]['seeds'])}: {c['evidence']}" for i, c in zip(order, found, strict=True))  # fmt: skip
        out.append((c0["text"], all(bool(c["passed"]) for c in found), ev))
    return out


def _cell(v: Any) -> Any:
    return v["mean"] if isinstance(v, dict) and "mean" in v else v


def combine_tables(runs: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Per-seed tables (every row one seed's) concatenated in seed order; the titles left out."""
    order = sorted(range(len(runs)), key=lambda i: min(runs[i]["seeds"]))
    out, left = [], []
    for t0 in runs[0].get("tables", []):
        found = [
            next((t for t in runs[i].get("tables", []) if t["title"] == t0["title"]), None)
            for i in order
        ]
        per_seed = all(
            t is not None and t["rows"] and all(re.fullmatch(r"\d+", str(r.get("seeds", ""))) for r in t["rows"])
            for t in found
        )  # fmt: skip
        if not per_seed:
            left.append(t0["title"])
            continue
        rows = [{c: _cell(r.get(c)) for c in t0["columns"]} for t in found for r in t["rows"]]  # type: ignore[union-attr]
        out.append(
            {
                "title": t0["title"],
                "columns": t0["columns"],
                "rows": rows,
                "note": t0.get("note", ""),
            }
        )
    return out, left


def _span(seeds: Sequence[int]) -> str:
    s = sorted(seeds)
    return (
        f"{s[0]}-{s[-1]}"
        if s == list(range(s[0], s[-1] + 1)) and len(s) > 1
        else ", ".join(map(str, s))
    )


def combine(paths: Sequence[Path | str], out_root: Path | str, command: str | None = None) -> Path:
    """Write the combined report of the runs at ``paths`` to ``out_root/NAME``; return report.md."""
    runs = [load_run(p) for p in paths]
    check_compatible(runs)
    runs = sorted(runs, key=lambda r: min(r["seeds"]))
    first = runs[0]
    seeds = tuple(sorted(s for r in runs for s in r["seeds"]))
    name = first["experiment"]
    cmd = (
        command
        or "python -m benchmarks.combine " + " ".join(str(p) for p in paths) + f" --out {out_root}"
    )
    info = RunInfo(
        name, first.get("description", ""), first["config"], seeds, first["profile"] == "quick"
    )
    prov = collect_provenance(cmd, threads=first.get("threads"), device=first.get("device", "cpu"))
    rep = Report(info, Path(out_root) / name, prov)
    findings, left = combine_findings(runs)
    for f in findings:
        rep.finding(f["text"], f["effect"], metric=f["metric"], direction=f["direction"], min_effect=f["min_effect"], note=f["note"])  # fmt: skip
    for text, passed, ev in combine_sanity(runs):
        rep.sanity(text, passed, ev)
    c = rep.verdict_counts()
    rep.headline(
        f"{name} over seeds {_span(seeds)} (combined from {len(runs)} runs): {c['HOLDS']} HOLDS, "
        f"{c['REFUTED']} REFUTED, {c['INCONCLUSIVE']} INCONCLUSIVE"
    )
    rep.section(
        "How this report was made",
        "The findings above are recomputed over every seed from the per-seed effects of the source runs below "
        "(a t interval over the per-seed paired effects, as a single run over these seeds computes it); each "
        "source run is one experiment, config and profile, over disjoint seeds. Means are averages of the "
        "per-seed means.",
    )
    rep.table(
        "Source runs",
        [
            {
                "seeds": _span(r["seeds"]),
                "command": r.get("command", ""),
                "commit": str(r.get("git", {}).get("commit", "unknown"))[:12],
                "dirty": r.get("git", {}).get("dirty"),
                "wall time (min)": (r.get("wall_time_s") or 0) / 60,
                "report": r["_path"],
            }
            for r in runs
        ],  # fmt: skip
        fmt={"wall time (min)": ".1f"},
    )
    rep.table(
        "Config (the same in every source run)",
        [{"field": k, "value": json.dumps(v)} for k, v in first["config"].items()],
    )
    if left:
        rep.table("Findings not combined (see the source reports)", left)
    tables, left_tables = combine_tables(runs)
    for t in tables:
        rep.table(t["title"], t["rows"], t["columns"], fmt=".3f", note=t["note"])
    if left_tables:
        rep.section(
            "Tables not combined",
            "These tables summarise several seeds per row; see the source reports: "
            + "; ".join(left_tables)
            + ".",
        )
    rep.add_result("sources", [{"path": r["_path"], "seeds": r["seeds"], "git": r.get("git", {}), "command": r.get("command")} for r in runs])  # fmt: skip
    wall = sum(float(r.get("wall_time_s") or 0.0) for r in runs)
    path = rep.write(wall)
    write_index(out_root)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.combine",
        description="Combine runs of one experiment over disjoint seeds into one report "
        "(findings recomputed over all seeds).",
    )
    ap.add_argument("runs", nargs="+", help="report folders (reports/NAME) of the runs to combine")
    ap.add_argument("--out", required=True, help="reports root of the combined report")
    args = ap.parse_args(argv)
    try:
        path = combine(args.runs, args.out)
    except CombineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
