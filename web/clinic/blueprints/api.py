"""Small JSON endpoints polled by the pages: worklist refresh and urgent alerts.

Polling endpoints are ``@passive``: they do not keep a session alive, so an unattended screen
still signs out after the idle timeout.  Acknowledging an alert is a state change and needs the
CSRF header like any other POST.
"""
from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, g, jsonify, request

from appliance import alerts as urgent_alerts
from web.core.formatting import local_time, patient_name
from web.core.security import database, passive

from .. import queries
from .worklist import filters

bp = Blueprint("api", __name__, url_prefix="/api")


@bp.get("/worklist")
@passive
def worklist() -> Any:
    result = queries.worklist(database(), page_size=current_app.config["WORKLIST_PAGE_SIZE"], **filters())
    return jsonify(result)


def _shown(after: int) -> list[dict[str, Any]]:
    return [{"id": r["id"], "study_uid": r["study_uid"], "patient_id": r["patient_id"],
             "patient_name": patient_name(r["name"]), "at": local_time(r["at"])}
            for r in urgent_alerts.open_alerts(database(), after)]


@bp.get("/alerts")
@passive
def alerts() -> Any:
    """Urgent studies this user has not acknowledged yet (newest first)."""
    return jsonify(alerts=_shown(g.user.alert_ack_event_id))


@bp.post("/alerts/ack")
def acknowledge() -> Any:
    """Acknowledge alerts up to an event id (the newest the user saw)."""
    body = request.get_json(silent=True)
    try:
        upto = int(body.get("upto", 0) if isinstance(body, dict) else 0)
    except (TypeError, ValueError):
        return jsonify(error="upto must be an event id"), 400
    acknowledged = urgent_alerts.acknowledge(database(), g.user, upto)
    return jsonify(acknowledged=acknowledged, alerts=_shown(acknowledged))
