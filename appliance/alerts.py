"""Urgent-study alerts and their acknowledgement, per user.

An alert is an ``urgent`` event (recorded by :func:`appliance.triage.update_study` when a study
becomes urgent) for a study that is still urgent.  Each user acknowledges alerts up to an event
id (``users.alert_ack_event_id``); the screens show the ones after it until that user does.
"""
from __future__ import annotations

from typing import Any

from . import audit
from .accounts import AccountError, User
from .db import Database

SHOWN_MAX = 20  # the newest this many; the banner names the newest and counts them


def open_alerts(database: Database, after: int) -> list[dict[str, Any]]:
    """Alerts after event id ``after``, newest first: the event's ``id``, ``at`` and
    ``study_uid`` with the patient's ``patient_id`` and DICOM ``name``."""
    return database.query(
        "SELECT e.id, e.at, e.study_uid, p.patient_id, p.name FROM events e "
        "JOIN studies s ON s.study_uid = e.study_uid JOIN patients p ON p.id = s.patient_pk "
        "WHERE e.kind = 'urgent' AND e.id > ? AND s.priority = 'urgent' ORDER BY e.id DESC LIMIT ?",
        (after, SHOWN_MAX))


def acknowledge(database: Database, user: User, upto: int) -> int:
    """``user`` has seen the alerts up to event id ``upto``: record it with its audit entry and
    return the user's acknowledged event id.  It never moves back, nor past the newest event (an
    id from the future would silence alerts not raised yet).  Raises
    :class:`~appliance.accounts.AccountError` for a user that does not exist."""
    with database.atomic() as tx:
        row = tx.execute("SELECT (SELECT COALESCE(MAX(id), 0) FROM events), alert_ack_event_id FROM users "
                         "WHERE id = ?", (user.id,)).fetchone()
        if row is None:
            raise AccountError("no_user", f"no user with id {user.id}")
        newest, current = row
        acknowledged = max(int(current), min(int(upto), int(newest)))
        tx.execute("UPDATE users SET alert_ack_event_id = ? WHERE id = ?", (acknowledged, user.id))
        audit.record_tx(tx, user.username, "alert_ack", detail={"upto_event": acknowledged})
    return acknowledged
