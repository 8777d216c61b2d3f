"""The audit trail: who saw or did what, to which study, when.

Entries go to the ``audit_log`` table only.  They name the user and the study by its UID, never
the patient: the table is the place where patient-linked access is recorded, and application
logs (which may be shipped off the box for support) must not carry names at all.
"""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any, Optional

import sqlite_utils

from .db import Database

log = logging.getLogger(__name__)

# Actions recorded by the UI (kept in one place so the audit viewer can offer a filter).
ACTIONS = (
    "login", "login_failed", "login_locked", "logout", "session_expired", "setup_admin",
    "view_study", "view_image", "review", "forward_request", "alert_ack",
    "user_add", "user_update", "password_change", "pin_change", "language_change",
)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def record(database: Database, actor: str, action: str, study_uid: str = "",
           detail: Optional[dict[str, Any]] = None) -> None:
    """Append one entry in its own transaction (an audit entry must not wait for, or be rolled
    back with, anything else)."""
    text = json.dumps(detail, sort_keys=True, ensure_ascii=False) if detail else ""
    with database.atomic() as tx:
        tx.execute("INSERT INTO audit_log (at, actor, action, study_uid, detail) VALUES (?, ?, ?, ?, ?)",
                   (utc_now(), actor, action, study_uid, text))
    # The application log gets the same fact without anything that could identify the patient.
    log.info("audit: %s %s%s", actor, action, f" study={study_uid}" if study_uid else "")


def record_tx(tx: sqlite_utils.Database, actor: str, action: str, study_uid: str = "",
              detail: Optional[dict[str, Any]] = None) -> None:
    """Append inside the caller's transaction, so an action and its audit entry commit together."""
    text = json.dumps(detail, sort_keys=True, ensure_ascii=False) if detail else ""
    tx.execute("INSERT INTO audit_log (at, actor, action, study_uid, detail) VALUES (?, ?, ?, ?, ?)",
               (utc_now(), actor, action, study_uid, text))
    log.info("audit: %s %s%s", actor, action, f" study={study_uid}" if study_uid else "")


def entries(database: Database, actor: str = "", study_uid: str = "", action: str = "",
            limit: int = 50, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Newest first, filtered by exact user, study UID and action; returns (page, total)."""
    where, params = [], []
    for column, value in (("actor", actor), ("study_uid", study_uid), ("action", action)):
        if value:
            where.append(f"{column} = ?")
            params.append(value)
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    total = database.query(f"SELECT COUNT(*) AS n FROM audit_log{clause}", tuple(params))[0]["n"]
    rows = database.query(f"SELECT * FROM audit_log{clause} ORDER BY id DESC LIMIT ? OFFSET ?",
                          (*params, limit, offset))
    return rows, int(total)
