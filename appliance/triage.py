"""Study-level triage: a priority and a sortable score from the models' findings.

Priority, most pressing first:

- ``urgent``: some finding of severity ``urgent`` is positive at its operating point;
- ``review``: some finding of severity ``review`` is positive;
- ``routine``: at least one model analyzed an image and nothing is positive;
- ``not_analyzed``: nothing was analyzed (no model applies, every model abstained or failed,
  or analysis has not run yet).

The score orders studies within a priority: for urgent/review, the highest probability among
the positive findings of that severity; for routine, the highest probability of any finding
(a routine study close to a threshold comes before a clearly negative one). The worklist order
is priority, then score (descending), then arrival (oldest first).

Only the newest version of each model counts for a study: an explicit re-analysis with a newer
model version keeps the older results for audit but supersedes them for triage.  Only results
computed on an image's current bytes count: a result on bytes since replaced is superseded
(moved to ``superseded_results`` by the worker), and is ignored here even before it is moved.
"""
from __future__ import annotations

import json
from typing import Any, Iterable

import sqlite_utils

from .lifecycle import JOB_OUTSTANDING, ResultStatus, StudyEvent, marks, move_study, words

PRIORITY_RANK = {"urgent": 0, "review": 1, "routine": 2, "not_analyzed": 3}
WORKLIST_ORDER = "priority_rank ASC, score DESC, first_received_at ASC"


def _version_key(version: str) -> tuple[tuple[int, int, str], ...]:
    """Dotted parts compared as numbers where they are digits (1.10 > 1.9), as text otherwise;
    at the same position text sorts before a number (2.0-rc1 < 2.0 < 2.0.1), so any two
    versions compare."""
    return tuple((1, int(p), "") if p.isdigit() else (0, 0, p) for p in version.split("."))


def current_results(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep, per model, only the rows of its newest version present in ``rows``."""
    rows = list(rows)
    newest: dict[str, str] = {}
    for row in rows:
        model, version = row["model_id"], row["model_version"]
        if model not in newest or _version_key(version) > _version_key(newest[model]):
            newest[model] = version
    return [r for r in rows if newest.get(r["model_id"]) == r["model_version"]]


def assess(rows: Iterable[dict[str, Any]]) -> tuple[str, float]:
    """(priority, score) for a study from its analysis result rows."""
    analyzed = False
    best: dict[str, float] = {}
    top_any = 0.0
    for row in current_results(rows):
        if row["status"] != ResultStatus.ANALYZED:
            continue
        analyzed = True
        for finding in json.loads(row["findings_json"]):
            p = float(finding["probability"])
            top_any = max(top_any, p)
            if finding["positive"]:
                severity = finding.get("severity", "review")
                best[severity] = max(best.get(severity, 0.0), p)
    for severity in ("urgent", "review"):
        if severity in best:
            return severity, round(best[severity], 6)
    if analyzed:
        return "routine", round(top_any, 6)
    return "not_analyzed", 0.0


def update_study(tx: sqlite_utils.Database, study_uid: str, now: str) -> str:
    """Recompute a study's priority and score inside the caller's transaction, and move its state
    (:func:`appliance.lifecycle.move_study`: analysis done, or still queued).

    Returns the new priority; records an ``urgent`` event when a study becomes urgent.
    """
    rows = [
        dict(zip(("model_id", "model_version", "status", "findings_json"), r))
        for r in tx.execute(
            "SELECT r.model_id, r.model_version, r.status, r.findings_json FROM analysis_results r "
            "JOIN instances i ON i.sop_instance_uid = r.sop_instance_uid AND i.sha256 = r.sha256 "
            "WHERE r.study_uid = ?",
            (study_uid,),
        ).fetchall()
    ]
    priority, score = assess(rows)
    before = tx.execute("SELECT priority FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
    outstanding = tx.execute(
        f"SELECT COUNT(*) FROM analysis_jobs WHERE study_uid = ? AND state IN ({marks(JOB_OUTSTANDING)})",
        (study_uid, *words(JOB_OUTSTANDING)),
    ).fetchone()[0]
    tx.execute(
        "UPDATE studies SET priority = ?, priority_rank = ?, score = ? WHERE study_uid = ?",
        (priority, PRIORITY_RANK[priority], score, study_uid),
    )
    if before is not None:
        move_study(tx, study_uid, StudyEvent.ANALYSIS_QUEUED if outstanding else StudyEvent.ANALYSIS_DONE)
    if priority == "urgent" and (before is None or before[0] != "urgent"):
        tx.execute(
            "INSERT INTO events (at, kind, study_uid, detail) VALUES (?, 'urgent', ?, ?)",
            (now, study_uid, json.dumps({"score": score})),
        )
    return priority
