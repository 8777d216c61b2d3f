"""Small JSON endpoints polled by the pages: worklist refresh and urgent alerts.

Polling endpoints are ``@passive``: they do not keep a session alive, so an unattended screen
still signs out after the idle timeout.  Acknowledging an alert is a state change and needs the
CSRF header like any other POST.
"""
from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, g, jsonify, request

from appliance import audit

from .. import queries
from ..security import database, passive
from .worklist import filters

bp = Blueprint("api", __name__, url_prefix="/api")


@bp.get("/worklist")
@passive
def worklist() -> Any:
    result = queries.worklist(database(), page_size=current_app.config["WORKLIST_PAGE_SIZE"], **filters())
    return jsonify(result)


def _unacknowledged(after: int) -> list[dict[str, Any]]:
    db = database()
    rows = db.query(
        "SELECT e.id, e.at, e.study_uid, s.priority, p.patient_id, p.name FROM events e "
        "JOIN studies s ON s.study_uid = e.study_uid JOIN patients p ON p.id = s.patient_pk "
        "WHERE e.kind = 'urgent' AND e.id > ? AND s.priority = 'urgent' ORDER BY e.id DESC LIMIT 20", (after,))
    return [{"id": r["id"], "study_uid": r["study_uid"], "patient_id": r["patient_id"],
             "patient_name": queries.patient_name(r["name"]), "at": queries.local_time(r["at"])} for r in rows]


@bp.get("/alerts")
@passive
def alerts() -> Any:
    """Urgent studies this user has not acknowledged yet (newest first)."""
    return jsonify(alerts=_unacknowledged(g.user.alert_ack_event_id))


@bp.post("/alerts/ack")
def acknowledge() -> Any:
    """Acknowledge alerts up to an event id (the newest the user saw)."""
    body = request.get_json(silent=True) or {}
    try:
        upto = int(body.get("upto", 0))
    except (TypeError, ValueError):
        return jsonify(error="upto must be an event id"), 400
    db = database()
    newest = db.query("SELECT COALESCE(MAX(id), 0) AS n FROM events")[0]["n"]
    upto = max(g.user.alert_ack_event_id, min(upto, newest))
    with db.atomic() as tx:
        tx.execute("UPDATE users SET alert_ack_event_id = ? WHERE id = ?", (upto, g.user.id))
        audit.record_tx(tx, g.user.username, "alert_ack", detail={"upto_event": upto})
    return jsonify(acknowledged=upto, alerts=_unacknowledged(upto))
