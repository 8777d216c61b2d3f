"""A clinician's review of a study's AI findings: one verdict per current finding and a note.

A review is recorded together with its audit entry and the study's ``reviewed`` event
(:func:`appliance.lifecycle.move_study`), in one transaction.  Later stages (sent, report back)
are not undone by a new review, and earlier reviews stay: the study view lists them all, newest
first.

Findings are named ``<result id>:<finding code>`` (:func:`finding_key`); only the findings of a
study's current results (:func:`appliance.triage.current_results`) can be given a verdict.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import sqlite_utils

from . import audit, lifecycle, triage
from .db import Database
from .errors import ApplianceError
from .lifecycle import StudyEvent

VERDICTS = ("agree", "disagree", "uncertain")
NOTE_MAX = 2000  # characters kept of a note


class ReviewError(ApplianceError):
    """A review was refused.  ``code``: ``no_study``, ``bad_verdict`` (not one of
    :data:`VERDICTS`) or ``unknown_finding`` (not a finding of the study's current results)."""

    code = "review_refused"

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(message)


def finding_key(result_id: int, code: str) -> str:
    return f"{result_id}:{code}"


def finding_keys(database: Database | sqlite_utils.Database, study_uid: str) -> set[str]:
    """The findings of ``study_uid`` a review can give a verdict on (``database`` may be a
    transaction)."""
    rows = database.query("SELECT id, model_id, model_version, findings_json FROM analysis_results "
                          "WHERE study_uid = ?", (study_uid,))
    return {finding_key(r["id"], f["code"]) for r in triage.current_results(rows)
            for f in json.loads(r["findings_json"])}


def record_review(database: Database, study_uid: str, actor: str, verdicts: Mapping[str, str], note: str = "") -> int:
    """Record ``actor``'s review of ``study_uid`` (verdicts by :func:`finding_key`; findings left
    out have no verdict) and return its id.  Raises :class:`ReviewError`."""
    for key, value in verdicts.items():
        if value not in VERDICTS:
            raise ReviewError("bad_verdict", f"verdict for {key} must be one of {', '.join(VERDICTS)}")
    note = note.strip()[:NOTE_MAX]
    chosen = dict(sorted(verdicts.items()))
    with database.atomic() as tx:
        if not tx.execute("SELECT 1 FROM studies WHERE study_uid = ?", (study_uid,)).fetchone():
            raise ReviewError("no_study", "no such study")
        # Checked inside the transaction: a re-analysis cannot slip in between check and write.
        unknown = set(chosen) - finding_keys(tx, study_uid)
        if unknown:
            raise ReviewError("unknown_finding", f"not a current finding of the study: {', '.join(sorted(unknown))}")
        review_id = tx.execute(
            "INSERT INTO reviews (study_uid, username, at, verdicts_json, note) VALUES (?, ?, ?, ?, ?) RETURNING id",
            (study_uid, actor, audit.utc_now(), json.dumps(chosen, sort_keys=True), note)).fetchone()[0]
        lifecycle.move_study(tx, study_uid, StudyEvent.REVIEWED)
        audit.record_tx(tx, actor, "review", study_uid, {"verdicts": chosen, "note_chars": len(note)})
    return int(review_id)


def list_reviews(database: Database, study_uid: str) -> list[dict[str, Any]]:
    """The study's reviews, newest first, with their verdicts decoded (``verdicts``)."""
    rows = database.query("SELECT * FROM reviews WHERE study_uid = ? ORDER BY id DESC", (study_uid,))
    return [{**r, "verdicts": json.loads(r["verdicts_json"])} for r in rows]
