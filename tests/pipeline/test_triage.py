"""Triage rules: priority from severity and operating point, score, newest model version only."""
from __future__ import annotations

import json

from appliance.triage import assess, current_results


def row(model, version, status, *findings):
    return {"model_id": model, "model_version": version, "status": status,
            "findings_json": json.dumps([{"code": c, "probability": p, "positive": pos, "threshold": 0.5,
                                          "severity": sev} for c, p, pos, sev in findings])}


def test_urgent_beats_review_beats_routine():
    assert assess([row("a", "1", "analyzed", ("x", 0.9, True, "urgent"))]) == ("urgent", 0.9)
    assert assess([row("a", "1", "analyzed", ("x", 0.7, True, "review")),
                   row("b", "1", "analyzed", ("y", 0.2, False, "urgent"))]) == ("review", 0.7)
    assert assess([row("a", "1", "analyzed", ("x", 0.4, False, "urgent"))]) == ("routine", 0.4)


def test_nothing_analyzed_is_not_analyzed():
    assert assess([]) == ("not_analyzed", 0.0)
    assert assess([row("router", "1", "abstained"), row("a", "1", "failed")]) == ("not_analyzed", 0.0)


def test_only_the_newest_model_version_counts():
    old = row("a", "1.0.0", "analyzed", ("x", 0.95, True, "urgent"))
    new = row("a", "1.10.0", "analyzed", ("x", 0.10, False, "urgent"))
    assert current_results([old, new]) == [new]
    assert assess([old, new]) == ("routine", 0.1)


def test_versions_with_text_parts_compare():
    # "0" against "0-rc1" at the same position once raised TypeError (int against str).
    final = row("a", "2.0", "analyzed", ("x", 0.9, True, "urgent"))
    candidate = row("a", "2.0-rc1", "analyzed", ("x", 0.2, False, "urgent"))
    assert current_results([final, candidate]) == [final]
    assert current_results([candidate, final]) == [final]
    assert current_results([row("a", "2.0-rc1", "analyzed"), row("a", "2.0.1", "analyzed")])[0]["model_version"] \
        == "2.0.1"
