"""Forwarding as the screens show it: outbox states in plain words, sizes, and which operator
actions apply to an item.

The outbox itself (states, retries, audit) is :mod:`appliance.forward`; this module only turns
its read-outs into what a clinic user reads, so the study view and the status screen agree.
"""
from __future__ import annotations

from typing import Any

from flask import current_app
from flask_babel import gettext as _

from appliance.db import Database
from appliance.forward import destination_status, study_forwarding, study_reports
from appliance.lifecycle import OUTBOX_ACTIVE, OutboxState, marks, words
from web.core.formatting import human_bytes, local_time

# The buttons offered per item state.  The backend would also cancel a ``delivered`` item or
# retry a waiting one at once, but on the touchscreen those are more confusing than useful:
# a delivered item only waits for the hub to list it.
CANCELLABLE = (OutboxState.QUEUED, OutboxState.SENDING, OutboxState.FAILED)
RETRYABLE = (OutboxState.FAILED, OutboxState.CANCELLED)
# Items still trying: their last transient error and next retry are worth showing.
TRYING = OUTBOX_ACTIVE
# The item states the status screen counts.
COUNTED = (*OUTBOX_ACTIVE, OutboxState.FAILED)


def state_words(state: str) -> str:
    names: dict[str, str] = {OutboxState.QUEUED: _("Queued"), OutboxState.SENDING: _("Sending"),
                             OutboxState.DELIVERED: _("Delivered, awaiting confirmation"),
                             OutboxState.CONFIRMED: _("Sent and confirmed"), OutboxState.FAILED: _("Failed"),
                             OutboxState.CANCELLED: _("Cancelled")}
    return names.get(state, state)


def _when(iso: str) -> str:
    return local_time(iso) if iso else ""


def study_items(database: Database, study_uid: str) -> list[dict[str, Any]]:
    """Per destination, the study's latest outbox item with its words and the actions allowed."""
    out = []
    # With the configuration, the AI objects a waiting item will also send count as pending.
    for item in study_forwarding(database, study_uid, current_app.config.get("APPLIANCE")):
        trying = item["state"] in TRYING
        out.append({
            **item, "state_words": state_words(item["state"]), "trying": trying,
            "next_attempt": _when(item["next_attempt_at"]) if trying else "",
            "last_error": item["last_error"] if trying else "",
            "can_cancel": item["state"] in CANCELLABLE, "can_retry": item["state"] in RETRYABLE,
            "requested_at": _when(item["created_at"]),
        })
    return out


def study_report_list(database: Database, study_uid: str) -> list[dict[str, Any]]:
    """Reports that came back, with their kind in words and the local time received."""
    kinds = {"sr": _("Structured report"), "pdf": _("PDF report")}
    return [{**r, "kind_words": kinds.get(r["kind"], r["kind"]), "received": _when(r["received_at"])}
            for r in study_reports(database, study_uid)]


def outbox_depth(database: Database) -> dict[str, int]:
    """Items per state the status screen shows (delivered ones wait for the hub's listing)."""
    counts = {r["state"]: r["n"] for r in database.query(
        f"SELECT state, COUNT(*) AS n FROM outbox_items WHERE state IN ({marks(COUNTED)}) GROUP BY state",
        words(COUNTED))}
    return {state: int(counts.get(state, 0)) for state in words(COUNTED)}


def destinations_overview(database: Database, config: Any) -> list[dict[str, Any]]:
    """destination_status() with sizes and times as people read them."""
    return [{**d, "bytes_pending_words": human_bytes(d["bytes_pending"]),
             "last_success": _when(d["last_success_at"]), "next_retry": _when(d["next_retry_at"])}
            for d in destination_status(database, config)]
