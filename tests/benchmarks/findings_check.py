"""Shared checks of a report's findings and sanity checks (used by the experiment smoke tests)."""

from __future__ import annotations

from benchmarks.stats import Effect, verdict

_EFFECT_FIELDS = ("estimate", "low", "high", "n", "unit", "method", "scale", "null", "se", "df")


def check_findings(doc: dict, report: str, n_findings: int, n_sanity: int | None = None) -> None:
    """Findings present, each verdict recomputed from its recorded effect, Markdown consistent.

    Args:
        doc: the parsed results.json.
        report: the report.md text.
        n_findings: the number of findings the configuration must record.
        n_sanity: the number of sanity checks it must record (None: any).
    """
    findings = doc["findings"]
    assert len(findings) == n_findings, [f["text"] for f in findings]
    assert "claims" not in doc and "claims_summary" not in doc, "no PASS/FAIL claims (schema 3)"
    counts = {"HOLDS": 0, "REFUTED": 0, "INCONCLUSIVE": 0}
    for f in findings:
        e = f["effect"]
        assert f["metric"] and f["direction"] in (">", "<") and f["min_effect"] >= 0
        assert e["unit"] and e["method"] and e["n"] >= 0
        nan = float("nan")
        eff = Effect(
            **{k: (nan if k == "estimate" and e[k] is None else e[k]) for k in _EFFECT_FIELDS}
        )
        assert f["verdict"] == verdict(eff, f["direction"], f["min_effect"]), f["text"]
        counts[f["verdict"]] += 1
        assert f"**{f['verdict']}** — {f['text']}" in report
    assert doc["findings_summary"] == counts
    if n_sanity is not None:
        assert len(doc["sanity"]) == n_sanity, [c["text"] for c in doc["sanity"]]
    for c in doc["sanity"]:
        assert isinstance(c["passed"], bool) and c["evidence"]
        assert c["text"] in report
    assert doc["sanity_summary"]["passed"] == sum(c["passed"] for c in doc["sanity"])
