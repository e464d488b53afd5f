"""The report writer: ``reports/NAME/report.md`` + ``results.json`` + PNGs, and the index.

An experiment fills a :class:`Report` through its :class:`~benchmarks.runner.RunContext`
(``ctx.report``) and never writes Markdown by hand::

    rows = aggregate_over_seeds(per_seed_rows, by=["world", "policy", "model"],
                                metrics=["recall@100", "wall_s"])
    report.table("Recall", rows, fmt={"recall@100": ".3f", "wall_s": ".1f"})
    eff = paired_effect_over_seeds(two_tower_recall_per_seed, popular_recall_per_seed,
                                   relative=True)  # per-user arrays, one pair per seed
    report.finding("two towers beat top-popular on recall@100 by at least 5%", eff,
                   metric="recall@100", direction=">", min_effect=0.05)
    report.sanity("the oracle's recall is 1", passed=bool(oracle_recall == 1.0),
                  evidence=f"oracle recall {oracle_recall:.3f}")
    report.figure("recall_vs_k", fig, "Recall@K against K", data={"k": ks, "recall": r})
    report.headline(f"two-tower recall@100 = {rows[0]['recall@100'].format('.3f')}")

A **finding** is judged from an effect and its 95% interval (:mod:`benchmarks.stats`):
HOLDS, REFUTED or INCONCLUSIVE, never from two bare means. A **sanity check** is something
the design guarantees; it is listed apart and a failed one fails ``--strict``.

``write()`` renders both files first and then replaces each atomically (temp file +
``os.replace``), so a failure never leaves a half-written file. results.json is strict JSON:
numpy types are converted and NaN / inf become ``null``, listed under ``non_finite``. Its
``schema`` is 3: findings and sanity checks only (schema 2 also had the PASS/FAIL ``claims``
and ``claims_summary`` of bare comparisons, removed; :func:`write_index` still reads such
files and ignores those keys).
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import io
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.provenance import Provenance
from benchmarks.stats import Effect, aggregate_over_seeds, format_number, verdict
from simenv.atomic import atomic_write as _atomic_write

__all__ = [
    "RunInfo",
    "Finding",
    "SanityCheck",
    "Report",
    "to_jsonable",
    "atomic_write",
    "write_index",
    "ROW_KEYS",
    "REPORT_FILE",
    "RESULTS_FILE",
    "INDEX_FILE",
]

REPORT_FILE = "report.md"
RESULTS_FILE = "results.json"
INDEX_FILE = "index.md"
# results.json schema. 2: findings (three-way verdicts) and sanity checks; 3: the legacy
# PASS/FAIL claims (``claims``, ``claims_summary``) are gone.
SCHEMA_VERSION = 3
ROW_KEYS = ("world", "policy", "model")  # every results row names these, plus seeds and wall time

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# --------------------------------------------------------------------------- JSON and files


def to_jsonable(value: Any, path: str = "$", non_finite: list[str] | None = None) -> Any:
    """Convert ``value`` to strict-JSON types (dict / list / str / int / float / bool / None).

    numpy scalars and arrays become Python numbers and lists; tuples become lists; dataclass
    instances become dicts of their fields; objects with ``to_json()`` (the summaries of
    :mod:`benchmarks.stats`) use it; enums become their name; paths become strings.
    NaN and infinities become ``None`` and their location is appended to ``non_finite``.

    Args:
        value: the value to convert.
        path: location of ``value`` used in messages and in ``non_finite`` (JSONPath-like).
        non_finite: list that collects the paths of non-finite floats (optional).

    Returns:
        The converted value.

    Raises:
        ValueError: for a type with no JSON form (names the path and the type), or a dict
            key that is not a string, int or enum.
    """
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isfinite(v):
            return v
        if non_finite is not None:
            non_finite.append(path)
        return None
    if hasattr(value, "to_json") and callable(value.to_json):
        return to_jsonable(value.to_json(), path, non_finite)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: to_jsonable(getattr(value, f.name), f"{path}.{f.name}", non_finite)
            for f in dataclasses.fields(value)
        }
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise ValueError(f"{path}: numpy array of dtype {value.dtype} has no JSON form")
        return to_jsonable(value.tolist(), path, non_finite)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if isinstance(k, enum.Enum):
                k = k.name
            elif isinstance(k, (int, np.integer)) and not isinstance(k, bool):
                k = str(int(k))
            elif not isinstance(k, str):
                raise ValueError(f"{path}: dict key {k!r} must be a str, int or enum")
            out[k] = to_jsonable(v, f"{path}.{k}", non_finite)
        return out
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, f"{path}[{i}]", non_finite) for i, v in enumerate(value)]
    raise ValueError(f"{path}: value of type {type(value).__name__} has no JSON form")


def atomic_write(path: Path | str, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` atomically: a temp file in the same folder, then os.replace.

    Readers see either the old file or the complete new one, never a partial file; on any
    error the temp file is removed and the old file (if any) is left untouched.

    Args:
        path: destination file; its folder is created if missing.
        data: text (written as UTF-8) or bytes.

    Returns:
        The destination path.
    """
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    return _atomic_write(path, lambda fh: fh.write(payload))


def _dumps(obj: Any) -> str:
    """Strict JSON text (raises on NaN) with stable formatting."""
    return json.dumps(obj, indent=2, allow_nan=False, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------- Markdown helpers


def _md_escape(text: str) -> str:
    """Make ``text`` safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\r\n", "<br>").replace("\n", "<br>")


def _cell(value: Any, spec: str) -> str:
    """Render one table cell: summaries via ``format(spec)``, numbers via ``spec``."""
    if isinstance(value, str):
        return _md_escape(value)
    if hasattr(value, "to_json") and hasattr(value, "format"):
        return _md_escape(value.format(spec))
    if value is None or isinstance(value, (int, float, np.integer, np.floating, np.bool_)):
        return format_number(value, spec)
    return _md_escape(str(value))


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def format_seconds(seconds: float | None) -> str:
    """Human-readable wall time: ``"0.42 s"``, ``"12.3 s"``, ``"4.2 min"``."""
    if seconds is None:
        return "—"
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min"


# --------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class RunInfo:
    """What was asked for: the experiment, its config, its seeds, its profile.

    Attributes:
        name: experiment name (the report folder's name).
        description: one-paragraph description shown under the title.
        config: the experiment's config (a dataclass instance).
        seeds: the seeds the run covers, in order.
        quick: True for the ``--quick`` profile.
        overrides: the ``--set key=value`` overrides applied, as given.
    """

    name: str
    description: str
    config: Any
    seeds: tuple[int, ...]
    quick: bool
    overrides: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Finding:
    """A claim about an effect, judged three ways from its interval.

    Attributes:
        text: the claim as a hypothesis, with its minimum effect in words ("distillation
            raises online reward by at least 2%").
        metric: what is measured (``"reward per user"``, ``"recall@100"``).
        direction: ``">"`` (the effect is claimed positive) or ``"<"`` (negative).
        min_effect: the minimum effect of interest on the effect's scale (>= 0).
        effect: the estimated effect with its interval (:class:`~benchmarks.stats.Effect`).
        verdict: ``"HOLDS"``, ``"REFUTED"`` or ``"INCONCLUSIVE"``.
        note: optional words after the evidence (what the comparison is, a caveat).
    """

    text: str
    metric: str
    direction: str
    min_effect: float
    effect: Effect
    verdict: str
    note: str = ""

    def min_effect_text(self, spec: str = ".3g") -> str:
        """The minimum effect in the effect's units (``"2%"``, ``"0.01"``, ``"bar 100×"``)."""
        e = self.effect
        sign = "+" if self.direction == ">" else "-"
        if self.min_effect == 0 and e.scale != "ratio":
            return "0% (any effect)" if e.scale == "relative" else "0 (any effect)"
        if e.scale == "relative":
            return f"{sign}{format_number(100.0 * self.min_effect, spec)}%"
        if e.scale == "ratio":
            factor = (
                1.0 + self.min_effect if self.direction == ">" else 1.0 / (1.0 + self.min_effect)
            )
            bar = e.null * factor
            return f"{self.direction} {format_number(bar, spec)}×"
        return f"{sign}{format_number(self.min_effect, spec)}"

    def evidence(self, spec: str = ".3g") -> str:
        """One line: effect [CI], the means compared, n and unit, method, minimum effect, MDE."""
        e = self.effect
        parts = [f"effect {e.format(spec)}"]
        if e.treatment is not None and e.control is not None and e.scale != "ratio":
            parts.append(
                f"means {format_number(e.treatment, spec)} vs {format_number(e.control, spec)}"
            )
        hw = e.half_width
        if hw is not None and e.scale == "absolute" and e.control:
            # the interval's precision against the level compared (online: the mean reward)
            share = format_number(100.0 * hw / abs(e.control), spec)
            parts.append(f"half-width {format_number(hw, spec)} ({share}% of the control mean)")
        elif hw is not None and e.scale == "relative":
            parts.append(f"half-width {format_number(100.0 * hw, spec)}% of the control mean")
        unit = f"n={e.n} {e.unit}"
        if e.n_inner is not None:
            unit += f" ({e.n_inner} units in all)"
        parts.append(unit)
        parts.append(e.method)
        parts.append(f"minimum effect {self.min_effect_text(spec)}")
        mde = e.mde()
        if mde is not None:
            if e.scale == "relative":
                parts.append(f"MDE {format_number(100.0 * mde, spec)}%")
            elif e.scale == "ratio":
                parts.append(f"MDE ×{format_number(mde, spec)}")
            else:
                parts.append(f"MDE {format_number(mde, spec)}")
        if e.per_seed:
            per = ", ".join(format_number(v, spec) for v in e.per_seed)
            parts.append(f"per seed: {per}")
        line = "; ".join(parts)
        return f"{line}. {self.note}" if self.note else line

    def line(self) -> str:
        """The Markdown verdict line."""
        return f"- **{self.verdict}** — {self.text} — {self.metric}: {self.evidence()}"

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (the effect in full, the verdict, the evidence line)."""
        return {
            "text": self.text,
            "metric": self.metric,
            "direction": self.direction,
            "min_effect": self.min_effect,
            "verdict": self.verdict,
            "effect": self.effect.to_json(),
            "evidence": self.evidence(),
            "note": self.note,
        }


@dataclass(frozen=True)
class SanityCheck:
    """A check that cannot plausibly fail (the code or the design guarantees it).

    Listed apart from the findings: it guards against a broken run, it is not evidence.

    Attributes:
        text: what is checked.
        passed: the computed result.
        evidence: the numbers behind it.
    """

    text: str
    passed: bool
    evidence: str

    def line(self) -> str:
        """The Markdown line."""
        return f"- {'passed' if self.passed else '**FAILED**'} — {self.text} — {self.evidence}"


class Report:
    """Collects an experiment's tables, findings, sanity checks, figures and results.

    Content (sections, tables, figures) is rendered in the order it is added; findings and
    sanity checks are gathered at the top under the headline; "what was run" (command, seeds,
    config, versions, commit, machine, wall time) closes the report.

    Args:
        info: what was run.
        out_dir: the experiment's report folder (``reports/NAME``); created on write.
        provenance: command, versions, commit, machine, start time.
    """

    def __init__(self, info: RunInfo, out_dir: Path | str, provenance: Provenance) -> None:
        self.info = info
        self.out_dir = Path(out_dir)
        self.provenance = provenance
        self._headline: str | None = None
        self._items: list[tuple[str, dict[str, Any]]] = []
        self._findings: list[Finding] = []
        self._sanity: list[SanityCheck] = []
        self._figures: list[dict[str, Any]] = []
        self._tables: list[dict[str, Any]] = []
        self._results: dict[str, Any] = {}
        self._error: str | None = None
        self._non_finite_added: list[str] = []  # NaN/inf found when tables/figures were added

    # ----------------------------------------------------------------- building

    def headline(self, text: str) -> None:
        """Set the one-line headline shown under the title and in ``reports/index.md``."""
        self._headline = " ".join(str(text).split())

    def section(self, title: str, text: str = "") -> None:
        """Add a ``## title`` section with free Markdown text (method, observations...)."""
        self._items.append(("section", {"title": str(title), "text": str(text)}))

    def table(
        self,
        title: str,
        rows: Sequence[Mapping[str, Any]],
        columns: Sequence[str] | None = None,
        fmt: str | Mapping[str, str] | None = None,
        note: str = "",
    ) -> None:
        """Add a results table (also stored in results.json under ``tables``).

        Cells may be numbers, strings, ``None`` (rendered "—") or summaries from
        :mod:`benchmarks.stats` (``MeanStd`` renders "mean ± std", and so on).

        Args:
            title: the table's heading.
            rows: one mapping per row.
            columns: column order; defaults to every key in first-appearance order.
            fmt: a format spec for every number (``".3f"``), or a per-column mapping
                (columns not named use ``".4g"``).
            note: text printed under the table (e.g. what "±" means).

        Raises:
            ValueError: if there are no rows or ``columns`` names an unknown key.
        """
        rows = [dict(r) for r in rows]
        if not rows:
            raise ValueError(f"table {title!r}: rows must not be empty")
        if columns is None:
            columns = list(dict.fromkeys(k for r in rows for k in r))
        columns = [str(c) for c in columns]
        known = {k for r in rows for k in r}
        unknown = [c for c in columns if c not in known]
        if unknown:
            raise ValueError(f"table {title!r}: columns {unknown} appear in no row")
        if isinstance(fmt, Mapping):
            specs = {c: fmt.get(c, ".4g") for c in columns}
        else:
            specs = {c: fmt or ".4g" for c in columns}
        non_finite: list[str] = []
        json_rows = to_jsonable(
            [{c: r.get(c) for c in columns} for r in rows],
            f"$.tables[{len(self._tables)}].rows",
            non_finite,
        )
        self._non_finite_added += non_finite
        cells = [[_cell(r.get(c), specs[c]) for c in columns] for r in rows]
        entry = {"title": str(title), "columns": columns, "rows": json_rows, "note": str(note)}
        self._tables.append(entry)
        self._items.append(("table", {"title": str(title), "md": _md_table(columns, cells)}))
        if note:
            self._items[-1][1]["note"] = str(note)

    def seed_table(
        self,
        title: str,
        per_seed_rows: Sequence[Mapping[str, Any]],
        metrics: Sequence[str],
        online: Sequence[str] = (),
        by: Sequence[str] = ROW_KEYS,
        fmt: str | Mapping[str, str] | None = None,
        note: str = "",
    ) -> list[dict[str, Any]]:
        """Aggregate one row per (setting, seed) into "mean ± std" rows and add the table.

        Every row names its world config, behaviour policy, model config, seed and wall
        time (the evaluation protocol's rule): each input row must have the ``by`` keys
        (default ``world``, ``policy``, ``model``), ``seed`` and ``wall_s``; the table shows
        ``by``, ``seeds``, the online columns, the metrics and ``wall_s`` (mean ± std
        seconds per seed).

        Args:
            title: the table's heading.
            per_seed_rows: one row per setting and seed.
            metrics: the numeric columns to aggregate (``wall_s`` is added last).
            online: columns holding per-user arrays (online rollouts); shown as the mean
                with 95% CIs over users and over seeds (:func:`~benchmarks.stats.online_summary`).
            by: the columns naming a setting.
            fmt: format specs, as for :meth:`table`.
            note: text under the table; a sentence saying what "±" means is appended.

        Returns:
            The aggregated rows (cells are :class:`~benchmarks.stats.MeanStd`), e.g. for the
            headline (findings take per-user or per-seed values, not these means).
        """
        metrics = [m for m in metrics if m != "wall_s"] + ["wall_s"]
        rows = aggregate_over_seeds(per_seed_rows, by=by, metrics=metrics, online=online)
        n = max(len(r["seeds"].split(",")) for r in rows)
        std_note = (
            f"Cells are mean ± sample std over {n} seeds; wall_s is seconds per seed."
            if n > 1
            else "One seed per row (no std); wall_s is seconds."
        )
        if online:
            std_note += " Online columns: mean (95% CI half-widths over users and over seeds)."
        columns = [*by, "seeds", *online, *metrics]
        self.table(title, rows, columns, fmt, f"{note} {std_note}".strip())
        return rows

    def finding(
        self,
        text: str,
        effect: Effect,
        *,
        metric: str,
        direction: str = ">",
        min_effect: float = 0.0,
        note: str = "",
    ) -> Finding:
        """Record a finding: a claim about an effect, judged HOLDS / REFUTED / INCONCLUSIVE.

        Args:
            text: the claim with its minimum effect in words, e.g. "the distilled pipeline
                earns at least 2% more reward than positives-only".
            effect: the estimated effect (from :func:`~benchmarks.stats.paired_effect`,
                :func:`~benchmarks.stats.paired_effect_over_seeds`,
                :func:`~benchmarks.stats.one_sample_effect`,
                :func:`~benchmarks.stats.ratio_effect`...).
            metric: the metric measured.
            direction: ``">"`` if the claim says the effect is positive, ``"<"`` if negative.
            min_effect: the minimum effect of interest (>= 0) on the effect's scale.
            note: optional words shown after the evidence.

        Returns:
            The recorded :class:`Finding`.

        Raises:
            ValueError: if ``effect`` is not an Effect, or for a bad direction / min_effect.
        """
        if not isinstance(effect, Effect):
            raise ValueError(
                f"finding {text!r}: effect must be a benchmarks.stats.Effect, "
                f"got {type(effect).__name__}"
            )
        v = verdict(effect, direction, min_effect)
        f = Finding(
            " ".join(str(text).split()),
            " ".join(str(metric).split()),
            direction,
            float(min_effect),
            effect,
            v,
            " ".join(str(note).split()),
        )
        self._findings.append(f)
        return f

    def sanity(self, text: str, passed: bool, evidence: str) -> SanityCheck:
        """Record a sanity check: something the design guarantees, listed apart from findings.

        Args:
            text: what is checked.
            passed: the computed result (a bool, never a literal).
            evidence: the numbers behind it.

        Raises:
            ValueError: if ``passed`` is not a bool.
        """
        if not isinstance(passed, (bool, np.bool_)):
            raise ValueError(
                f"sanity check {text!r}: passed must be a bool, got {type(passed).__name__}"
            )
        c = SanityCheck(" ".join(str(text).split()), bool(passed), " ".join(str(evidence).split()))
        self._sanity.append(c)
        return c

    def figure(
        self,
        name: str,
        fig: Any,
        caption: str,
        data: Mapping[str, Any] | None = None,
        dpi: int = 110,
    ) -> Path:
        """Save a matplotlib figure as ``NAME.png`` (Agg, no metadata) and embed it.

        Prefer ``matplotlib.figure.Figure(...)`` over pyplot (no global state). A pyplot
        figure is closed after saving.

        Args:
            name: file stem, letters, digits, ``_ . -``; unique within the report.
            fig: a ``matplotlib.figure.Figure``.
            caption: caption under the image.
            data: the plotted numbers, stored with the figure entry in results.json.
            dpi: resolution.

        Returns:
            The PNG's path.

        Raises:
            ValueError: for a bad or repeated name.
        """
        name = str(name)
        if name.endswith(".png"):
            name = name[:-4]
        if not _NAME_RE.match(name):
            raise ValueError(
                f"figure name must match {_NAME_RE.pattern} (letters, digits, _ . -), got {name!r}"
            )
        if any(f["name"] == name for f in self._figures):
            raise ValueError(f"figure name {name!r} is already used in this report")
        to_jsonable(dict(data or {}), f"figure {name!r} data")  # fail before writing the PNG
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        if not isinstance(fig.canvas, FigureCanvasAgg):
            FigureCanvasAgg(fig)  # attach an Agg canvas: no GUI backend involved
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
        path = atomic_write(self.out_dir / f"{name}.png", buf.getvalue())
        if "matplotlib.pyplot" in sys.modules:
            sys.modules["matplotlib.pyplot"].close(fig)
        non_finite: list[str] = []
        entry = {
            "name": name,
            "file": path.name,
            "caption": str(caption),
            "data": to_jsonable(
                dict(data or {}), f"$.figures[{len(self._figures)}].data", non_finite
            ),
        }
        self._non_finite_added += non_finite
        self._figures.append(entry)
        self._items.append(("figure", {"file": path.name, "caption": str(caption)}))
        return path

    def add_result(self, key: str, value: Any) -> None:
        """Store a figure under ``results[key]`` in results.json (checked convertible now).

        Raises:
            ValueError: for a repeated key or a value with no JSON form.
        """
        key = str(key)
        if key in self._results:
            raise ValueError(f"result key {key!r} is already set")
        to_jsonable(value, f"$.results.{key}")  # fail now, inside the run, not at write time
        self._results[key] = value

    def record_error(self, traceback_text: str) -> None:
        """Mark the run as failed; the traceback is shown in the report and in results.json."""
        self._error = str(traceback_text)

    # ----------------------------------------------------------------- reading

    @property
    def findings(self) -> list[Finding]:
        """The findings recorded so far."""
        return list(self._findings)

    @property
    def sanity_checks(self) -> list[SanityCheck]:
        """The sanity checks recorded so far."""
        return list(self._sanity)

    def verdict_counts(self) -> dict[str, int]:
        """Findings per verdict plus sanity checks passed / failed (index and CLI summary)."""
        out = {
            v: sum(f.verdict == v for f in self._findings)
            for v in ("HOLDS", "REFUTED", "INCONCLUSIVE")
        }
        out["sanity_passed"] = sum(c.passed for c in self._sanity)
        out["sanity_failed"] = sum(not c.passed for c in self._sanity)
        return out

    @property
    def failed(self) -> bool:
        """True once :meth:`record_error` was called."""
        return self._error is not None

    def headline_text(self) -> str:
        """The headline, or one derived from the error / the findings when none was set."""
        if self._error is not None:
            last = self._error.strip().splitlines()[-1] if self._error.strip() else "error"
            return f"ERROR: {last}"
        if self._headline:
            return self._headline
        if self._findings:
            c = self.verdict_counts()
            return (
                f"{c['HOLDS']} HOLDS, {c['REFUTED']} REFUTED, {c['INCONCLUSIVE']} INCONCLUSIVE "
                f"of {len(self._findings)} findings"
            )
        return "(no headline)"

    # ----------------------------------------------------------------- rendering

    def to_json(
        self, wall_time_s: float | None, timings: Mapping[str, float] | None = None
    ) -> dict[str, Any]:
        """The results.json document (strict JSON types)."""
        non_finite: list[str] = []
        p = self.provenance
        doc = {
            "schema": SCHEMA_VERSION,
            "experiment": self.info.name,
            "description": self.info.description,
            "status": "error" if self._error is not None else "ok",
            "headline": self.headline_text(),
            "profile": "quick" if self.info.quick else "full",
            "seeds": list(self.info.seeds),
            "config": to_jsonable(self.info.config, "$.config", non_finite),
            "config_class": _qualname(self.info.config),
            "overrides": dict(self.info.overrides),
            "command": p.command,
            "argv": list(p.argv),
            "started_at": p.started_at,
            "wall_time_s": to_jsonable(wall_time_s, "$.wall_time_s", non_finite),
            "timings_s": to_jsonable(dict(timings or {}), "$.timings_s", non_finite),
            "threads": p.threads,
            "device": p.device,
            "versions": dict(p.versions),
            "git": dict(p.git),
            "machine": dict(p.machine),
            "findings_summary": {
                k: v for k, v in self.verdict_counts().items() if not k.startswith("sanity")
            },
            "sanity_summary": {
                "passed": sum(c.passed for c in self._sanity),
                "failed": sum(not c.passed for c in self._sanity),
            },
            "findings": [f.to_json() for f in self._findings],
            "sanity": [
                {"text": c.text, "passed": c.passed, "evidence": c.evidence} for c in self._sanity
            ],
            "tables": copy.deepcopy(self._tables),
            "figures": copy.deepcopy(self._figures),
            "results": to_jsonable(self._results, "$.results", non_finite),
            "error": self._error,
        }
        # Tables and figure data were converted when added; their NaN/inf were noted then.
        doc["non_finite"] = self._non_finite_added + non_finite
        return doc

    def render_markdown(
        self, wall_time_s: float | None, timings: Mapping[str, float] | None = None
    ) -> str:
        """The report.md text."""
        info, p = self.info, self.provenance
        out: list[str] = [f"# {info.name}", "", f"**{_md_line(self.headline_text())}**", ""]
        if info.description:
            out += [info.description.strip(), ""]
        seeds = ", ".join(str(s) for s in info.seeds)
        out += [
            f"Run: `{p.command}` · profile {'quick' if info.quick else 'full'} · "
            f"seeds {seeds} · wall time {format_seconds(wall_time_s)}",
            "",
        ]
        if self._findings:
            c = self.verdict_counts()
            out += [
                f"## Findings ({c['HOLDS']} HOLDS, {c['REFUTED']} REFUTED, "
                f"{c['INCONCLUSIVE']} INCONCLUSIVE)",
                "",
            ]
            if info.quick or len(info.seeds) < 2:
                out += [
                    "*Quick profile or one seed: verdicts are indicative, not published results.*",
                    "",
                ]
            out += [f.line() for f in self._findings] + [""]
            out += [
                "HOLDS: the 95% interval lies on the claimed side and the estimate reaches the "
                "minimum effect; REFUTED: the interval lies entirely below the minimum effect "
                "(or on the other side); INCONCLUSIVE: neither. MDE: the effect this sample "
                "size detects with 80% power.",
                "",
            ]
        if self._sanity:
            ok = sum(c.passed for c in self._sanity)
            out += [f"## Sanity checks ({ok} passed, {len(self._sanity) - ok} failed)", ""]
            out += [
                "Checks the design guarantees; they guard against a broken run and are not "
                "counted as findings.",
                "",
            ]
            out += [c.line() for c in self._sanity] + [""]
        if self._error is not None:
            out += [
                "## Error",
                "",
                "The experiment raised; everything above and below was recorded before it.",
                "",
                "```text",
                self._error.rstrip(),
                "```",
                "",
            ]
        for kind, item in self._items:
            if kind == "section":
                out += [f"## {item['title']}", ""]
                if item["text"].strip():
                    out += [item["text"].strip(), ""]
            elif kind == "table":
                out += [f"### {item['title']}", "", item["md"], ""]
                if item.get("note"):
                    out += [item["note"], ""]
            else:
                out += [f"![{_md_line(item['caption'])}]({item['file']})", ""]
                out += [f"*{_md_line(item['caption'])}*", ""]
        non_finite = self.to_json(wall_time_s, timings)["non_finite"]
        if non_finite:
            shown = ", ".join(f"`{x}`" for x in non_finite[:10])
            more = f" and {len(non_finite) - 10} more" if len(non_finite) > 10 else ""
            out += [
                f"Note: {len(non_finite)} value(s) were NaN or infinite and are written as "
                f"null in results.json: {shown}{more}.",
                "",
            ]
        out += self._render_run_details(wall_time_s, timings)
        return "\n".join(out).rstrip() + "\n"

    def _render_run_details(
        self, wall_time_s: float | None, timings: Mapping[str, float] | None
    ) -> list[str]:
        info, p = self.info, self.provenance
        git = p.git or {}
        commit = str(git.get("commit", "unknown"))
        dirty = git.get("dirty")
        commit += {True: " (uncommitted changes)", False: "", None: ""}[dirty]
        versions = ", ".join(f"{k} {v}" for k, v in p.versions.items()) or "—"
        machine = ", ".join(f"{k} {v}" for k, v in p.machine.items()) or "—"
        rows = [
            ["command", f"`{_md_escape(p.command)}`"],
            ["profile", "quick" if info.quick else "full"],
            ["seeds", ", ".join(str(s) for s in info.seeds)],
            [
                "overrides",
                _md_escape(", ".join(f"{k}={v}" for k, v in info.overrides.items()) or "none"),
            ],
            ["started (UTC)", p.started_at],
            ["wall time", format_seconds(wall_time_s)],
            ["threads", "library default" if p.threads is None else str(p.threads)],
            ["device", p.device],
            ["git commit", _md_escape(commit)],
            ["packages", _md_escape(versions)],
            ["machine", _md_escape(machine)],
        ]
        if timings:
            rows.append(
                ["timings", ", ".join(f"{k} {format_seconds(v)}" for k, v in timings.items())]
            )
        out = ["## What was run", "", _md_table(["", ""], rows), ""]
        cfg = info.config
        if dataclasses.is_dataclass(cfg):
            cfg_rows = [
                [
                    f"`{f.name}`",
                    _md_escape(repr(getattr(cfg, f.name))),
                    _md_escape(f.metadata.get("help", "")),
                ]
                for f in dataclasses.fields(cfg)
            ]
            out += [f"### Config (`{_qualname(cfg)}`)", ""]
            out += [_md_table(["field", "value", "help"], cfg_rows), ""]
        return out

    def write(
        self, wall_time_s: float | None = None, timings: Mapping[str, float] | None = None
    ) -> Path:
        """Render and atomically write ``report.md`` and ``results.json`` into ``out_dir``.

        Both texts are rendered before anything is written, so a rendering error leaves
        the previous files untouched.

        Args:
            wall_time_s: the run's wall time in seconds.
            timings: named sub-timings (from ``ctx.timer``).

        Returns:
            The path of report.md.
        """
        json_text = _dumps(self.to_json(wall_time_s, timings))
        md_text = self.render_markdown(wall_time_s, timings)
        atomic_write(self.out_dir / RESULTS_FILE, json_text)
        return atomic_write(self.out_dir / REPORT_FILE, md_text)


def _md_line(text: str) -> str:
    return " ".join(str(text).split())


def _qualname(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


# --------------------------------------------------------------------------- the index


def write_index(reports_dir: Path | str, order: Sequence[str] = ()) -> Path:
    """Regenerate ``reports_dir/index.md`` from every ``*/results.json`` below it.

    One table row per experiment: a link to its report, its headline, its findings by verdict
    (HOLDS / REFUTED / INCONCLUSIVE), its sanity checks passed / failed (or ERROR), its seeds,
    its profile and its wall time. When any listed report is a quick profile or has one seed,
    the index says plainly that those verdicts are indicative. Experiments named in ``order``
    come first in that order, the others follow alphabetically. Unreadable results are listed
    as such rather than skipped.

    Args:
        reports_dir: the reports root (``reports/``).
        order: preferred order of experiment names (the registry's).

    Returns:
        The index path.
    """
    root = Path(reports_dir)
    found: dict[str, dict[str, Any] | None] = {}
    if root.is_dir():
        for res in sorted(root.glob(f"*/{RESULTS_FILE}")):
            try:
                found[res.parent.name] = json.loads(res.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                found[res.parent.name] = None
    rank = {name: i for i, name in enumerate(order)}
    names = sorted(found, key=lambda n: (rank.get(n, len(rank)), n))
    rows = []
    indicative = 0  # rows with the quick profile or one seed
    readable = 0
    totals = {"HOLDS": 0, "REFUTED": 0, "INCONCLUSIVE": 0, "passed": 0, "failed": 0}
    for name in names:
        doc = found[name]
        link = f"[{name}]({name}/{REPORT_FILE})"
        if doc is None:
            rows.append([link, f"unreadable {RESULTS_FILE}", "—", "—", "—", "—", "—"])
            continue
        fs = doc.get("findings_summary") or {}
        ss = doc.get("sanity_summary") or {}
        # results.json of schema <= 2 may also hold PASS/FAIL "claims": not counted, not shown
        if doc.get("status") == "error":
            findings = "ERROR"
        elif sum(fs.values()) == 0:
            findings = "no findings"
        else:
            findings = (
                f"{fs.get('HOLDS', 0)} HOLDS / {fs.get('REFUTED', 0)} REFUTED / "
                f"{fs.get('INCONCLUSIVE', 0)} INCONCLUSIVE"
            )
        for k in ("HOLDS", "REFUTED", "INCONCLUSIVE"):
            totals[k] += int(fs.get(k, 0))
        totals["passed"] += int(ss.get("passed", 0))
        totals["failed"] += int(ss.get("failed", 0))
        sanity = (
            "—"
            if not ss or ss.get("passed", 0) + ss.get("failed", 0) == 0
            else f"{ss.get('passed', 0)} passed / {ss.get('failed', 0)} failed"
        )
        seeds = doc.get("seeds") or []
        profile = str(doc.get("profile", "—"))
        readable += 1
        if profile == "quick" or len(seeds) < 2:
            indicative += 1
            profile += " (indicative)"
        rows.append(
            [
                link,
                _md_escape(_md_line(doc.get("headline", ""))),
                findings,
                sanity,
                _md_escape(",".join(str(s) for s in seeds) or "—"),
                _md_escape(profile),
                format_seconds(doc.get("wall_time_s")),
            ]
        )
    lines = [
        "# Benchmark reports",
        "",
        "Generated by `python -m benchmarks`; regenerated after every experiment from the "
        f"`{RESULTS_FILE}` files in this folder. One row per experiment.",
        "",
    ]
    if indicative:
        which = (
            "Quick profile, one seed: verdicts are indicative."
            if indicative == readable
            else "Rows marked (indicative) ran the quick profile or one seed: their verdicts are "
            "indicative."
        )
        lines += [
            f"**{which}** The published set is the full profile with 3 seeds (`make reports`).",
            "",
        ]
    if rows:
        lines.append(
            _md_table(
                [
                    "experiment",
                    "headline",
                    "findings",
                    "sanity checks",
                    "seeds",
                    "profile",
                    "wall time",
                ],
                rows,
            )
        )
        lines += [
            "",
            f"In all: {totals['HOLDS']} HOLDS, {totals['REFUTED']} REFUTED, "
            f"{totals['INCONCLUSIVE']} INCONCLUSIVE; sanity checks {totals['passed']} passed, "
            f"{totals['failed']} failed.",
        ]
    else:
        lines.append("No reports yet.")
    return atomic_write(root / INDEX_FILE, "\n".join(lines) + "\n")
