"""The outbox: durable state of every send, one item per (study, destination).

Item states::

    queued -> sending -> delivered -> confirmed
                 \\-> failed     (a peer refused a dataset, or policy blocked one; reason says which)
    any active state -> cancelled            failed / cancelled -> queued (outbox retry)

Instance states: ``pending`` -> ``sent`` (the peer acknowledged it) -> ``confirmed`` (the peer
lists it in a query); ``refused``, ``blocked`` and ``superseded`` (an AI object whose result was
superseded before it was confirmed: never sent) are final.  Every transition is one SQLite
transaction, so a crash anywhere leaves a state from which the next attempt resumes: it first asks
the hub which instances it already holds and sends only the others.

Network trouble never fails an item: the destination gets a capped, jittered backoff
(``destination_state``) and every item for it waits.  This module holds the transitions and the
read-outs for the UI and CLI; the sending loop is in ``service.py``.
"""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any, Optional

from .. import audit
from ..catalog import failure_notes, study_failures
from ..config import Config
from ..db import Database
from ..store import utc_now
from .errors import ForwardRequestError
from .pacing import backoff_s, in_window

ACTIVE = ("queued", "sending", "delivered")
PRIORITIES = {"urgent": 0, "routine": 1}
# Where an item's instances come from: the clinic's images, plus the box's AI objects if asked.
CLINIC_SOURCES = ("dicom", "import", "recovered")
# The SR and SC UIDs of a study's current results (two parameters: the study UID twice).
_CURRENT_RESULTS = ("FROM analysis_results r JOIN instances s ON s.sop_instance_uid = r.sop_instance_uid "
                    "AND s.sha256 = r.sha256 WHERE r.study_uid = ?")
CURRENT_AI_OBJECTS = (f"(SELECT r.sr_sop_instance_uid {_CURRENT_RESULTS} "
                      f"UNION SELECT r.heatmap_sop_instance_uid {_CURRENT_RESULTS})")


def _later(seconds: float) -> str:
    return (datetime.now(timezone.utc) + timedelta(seconds=seconds)).isoformat(timespec="milliseconds")


# -- requests ---------------------------------------------------------------------------------
def request_forward(database: Database, config: Config, study_uid: str, destination: str,
                    priority: str = "routine", requested_by: str = "system", origin: str = "manual") -> int:
    """Queue ``study_uid`` for ``destination``; returns the outbox item id.

    Idempotent: while an item for the same study and destination is still active its id is
    returned (an urgent request upgrades a routine one).  Raises ConfigError for an unknown
    destination and ForwardRequestError for an unknown study or priority.
    """
    config.destination(destination)
    if priority not in PRIORITIES:
        raise ForwardRequestError(f"priority must be urgent or routine, not {priority!r}")
    now = utc_now()
    with database.atomic() as tx:
        if tx.execute("SELECT 1 FROM studies WHERE study_uid = ?", (study_uid,)).fetchone() is None:
            raise ForwardRequestError(f"no study {study_uid}")
        row = tx.execute(f"SELECT id, priority_rank FROM outbox_items WHERE study_uid = ? AND destination = ? "
                         f"AND state IN {ACTIVE}", (study_uid, destination)).fetchone()
        if row is not None:
            if PRIORITIES[priority] < row[1]:
                tx.execute("UPDATE outbox_items SET priority = ?, priority_rank = ?, updated_at = ? WHERE id = ?",
                           (priority, PRIORITIES[priority], now, row[0]))
            return int(row[0])
        cur = tx.execute(
            "INSERT INTO outbox_items (study_uid, destination, priority, priority_rank, requested_by, origin, "
            "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (study_uid, destination, priority, PRIORITIES[priority], requested_by, origin, now, now))
        item_id = int(cur.lastrowid or 0)
        audit.record_tx(tx, requested_by, "forward_request", study_uid,
                        {"destination": destination, "priority": priority, "outbox_item": item_id, "origin": origin})
    return item_id


def refresh_instances(database: Database, item: dict[str, Any], attach_ai_results: bool) -> None:
    """Add the study's instances the item does not list yet (late images, AI results).

    An AI object goes only while it belongs to a current result (one computed on its image's
    current bytes): the objects of a superseded result are never sent."""
    sources = CLINIC_SOURCES + (("ai",) if attach_ai_results else ())
    with database.atomic() as tx:
        tx.execute(
            f"INSERT OR IGNORE INTO outbox_instances (item_id, sop_instance_uid, bytes_original, updated_at) "
            f"SELECT ?, sop_instance_uid, size, ? FROM instances WHERE study_uid = ? AND source IN "
            f"({', '.join('?' * len(sources))}) AND (source != 'ai' OR sop_instance_uid IN {CURRENT_AI_OBJECTS})",
            (item["id"], utc_now(), item["study_uid"], *sources, item["study_uid"], item["study_uid"]))


# -- the sender's transitions -----------------------------------------------------------------
# For a destination that takes the AI results, a study is sent once its analysis and its AI
# result objects are done, so the hub gets them together (an urgent study waits seconds for its
# SR and heatmap, instead of arriving without them).  Done includes failed: a study whose AI
# objects failed goes with what exists, and its notes, forwarding status and event say so.
STUDY_READY = (
    "(NOT EXISTS (SELECT 1 FROM analysis_jobs j WHERE j.study_uid = o.study_uid "
    "AND j.state IN ('pending', 'running')) "
    "AND NOT EXISTS (SELECT 1 FROM analysis_results r WHERE r.study_uid = o.study_uid "
    "AND r.objects_state IN ('pending', 'building')))"
)
# A batch: items of one destination and one priority sent together (one STOW-RS request, one
# confirming query for all of them) up to about this many bytes of stored files.  Confirmation
# waits for the whole batch, so it stays a few seconds of link time on slow links.
BATCH_ITEMS = 50
BATCH_BYTES = 8 * 1024 * 1024


def _sendable(config: Config, now: Optional[datetime]) -> tuple[str, tuple]:
    """WHERE clause (over ``outbox_items o`` joined with ``destination_state d``) and its
    parameters: active items whose destination is open, not backed off, and study ready."""
    stamp = utc_now()
    open_dests = [d["name"] for d in config["destinations"] if in_window(d["send_window"], now)] or [""]
    without_ai = [d["name"] for d in config["destinations"] if not d["attach_ai_results"]]
    ready = f"AND (o.destination IN ({', '.join('?' * len(without_ai))}) OR {STUDY_READY})" if without_ai \
        else f"AND {STUDY_READY}"
    where = (f"o.state IN {ACTIVE} AND o.destination IN ({', '.join('?' * len(open_dests))}) "
             f"AND o.next_attempt_at <= ? AND COALESCE(d.next_attempt_at, '') <= ? {ready}")
    return where, (*open_dests, stamp, stamp, *without_ai)


def claim_batch(database: Database, config: Config, now: Optional[datetime] = None,
                max_items: int = BATCH_ITEMS, max_bytes: int = BATCH_BYTES) -> list[dict[str, Any]]:
    """The most pressing item that may be sent now, plus further items of the same destination
    and the same priority (oldest first) while the batch holds less than ``max_bytes`` of stored
    files; all marked ``sending``.  Empty if nothing may be sent now."""
    where, params = _sendable(config, now)
    source = "FROM outbox_items o LEFT JOIN destination_state d ON d.name = o.destination"
    size = "(SELECT COALESCE(SUM(i.size), 0) FROM instances i WHERE i.study_uid = o.study_uid)"
    with database.atomic() as tx:
        first = tx.execute(f"SELECT o.id, o.destination, o.priority_rank, {size} {source} WHERE {where} "
                           f"ORDER BY o.priority_rank, o.id LIMIT 1", params).fetchone()
        if first is None:
            return []
        chosen, total = [int(first[0])], int(first[3])
        if max_items > 1 and total < max_bytes:
            for item_id, nbytes in tx.execute(
                    f"SELECT o.id, {size} {source} WHERE {where} AND o.destination = ? AND o.priority_rank = ? "
                    f"AND o.id != ? ORDER BY o.id LIMIT ?", (*params, first[1], first[2], first[0], max_items - 1)):
                if total + int(nbytes) > max_bytes:
                    break
                chosen.append(int(item_id))
                total += int(nbytes)
        stamp = utc_now()
        tx.execute(f"UPDATE outbox_items SET state = CASE WHEN state = 'queued' THEN 'sending' ELSE state END, "
                   f"attempts = attempts + 1, updated_at = ? WHERE id IN ({', '.join('?' * len(chosen))})",
                   (stamp, *chosen))
    return [item for item in (get_item(database, i) for i in chosen) if item is not None]


def claim_next(database: Database, config: Config, now: Optional[datetime] = None) -> Optional[dict[str, Any]]:
    """The most pressing item that may be sent now, marked ``sending``; None if there is none."""
    batch = claim_batch(database, config, now, max_items=1)
    return batch[0] if batch else None


def get_item(database: Database, item_id: int) -> Optional[dict[str, Any]]:
    rows = database.query("SELECT * FROM outbox_items WHERE id = ?", (item_id,))
    return rows[0] if rows else None


def instances(database: Database, item_id: int, states: tuple[str, ...] = ("pending", "sent")) -> list[dict[str, Any]]:
    return database.query(
        f"SELECT o.*, i.file_path, i.sop_class_uid, i.transfer_syntax, i.source FROM outbox_instances o "
        f"JOIN instances i ON i.sop_instance_uid = o.sop_instance_uid WHERE o.item_id = ? "
        f"AND o.state IN ({', '.join('?' * len(states))}) ORDER BY i.source != 'dicom', o.rowid",
        (item_id, *states))


def supersede_instance(tx: Any, sop_instance_uid: str, reason: str, now: str) -> None:
    """Inside ``tx``: entries of ``sop_instance_uid`` not yet confirmed become ``superseded``
    (never sent): the instance was retired while queued."""
    tx.execute("UPDATE outbox_instances SET state = 'superseded', reason = ?, updated_at = ? "
               "WHERE sop_instance_uid = ? AND state IN ('pending', 'sent')", (reason, now, sop_instance_uid))


def set_remote_study(database: Database, item_id: int, remote_study_uid: str) -> None:
    with database.atomic() as tx:
        tx.execute("UPDATE outbox_items SET remote_study_uid = ? WHERE id = ?", (remote_study_uid, item_id))


def mark_instances(database: Database, item_id: Optional[int], updates: list[dict[str, Any]]) -> None:
    """Record per-instance outcomes (keys: sop_instance_uid, state, and optionally item_id (else
    ``item_id``), remote_sop_instance_uid, bytes_sent, transfer_syntax_sent, reason) in one
    transaction."""
    now = utc_now()
    with database.atomic() as tx:
        for u in updates:
            tx.execute(
                "UPDATE outbox_instances SET state = ?, remote_sop_instance_uid = COALESCE(?, remote_sop_instance_uid), "
                "bytes_sent = COALESCE(?, bytes_sent), transfer_syntax_sent = COALESCE(?, transfer_syntax_sent), "
                "reason = COALESCE(?, reason), updated_at = ? WHERE item_id = ? AND sop_instance_uid = ?",
                (u["state"], u.get("remote_sop_instance_uid"), u.get("bytes_sent"), u.get("transfer_syntax_sent"),
                 u.get("reason"), now, u.get("item_id", item_id), u["sop_instance_uid"]))


def confirm_present(database: Database, item_id: int, remote_present: set[str]) -> int:
    """Mark confirmed every instance whose remote UID the hub lists; the rest that were ``sent``
    go back to ``pending``.  Returns how many are confirmed now."""
    rows = instances(database, item_id, ("pending", "sent"))
    now = utc_now()
    with database.atomic() as tx:
        for r in rows:
            if r["remote_sop_instance_uid"] and r["remote_sop_instance_uid"] in remote_present:
                tx.execute("UPDATE outbox_instances SET state = 'confirmed', updated_at = ? WHERE item_id = ? AND "
                           "sop_instance_uid = ?", (now, item_id, r["sop_instance_uid"]))
            elif r["state"] == "sent":
                tx.execute("UPDATE outbox_instances SET state = 'pending', updated_at = ? WHERE item_id = ? AND "
                           "sop_instance_uid = ?", (now, item_id, r["sop_instance_uid"]))
        return int(tx.execute("SELECT COUNT(*) FROM outbox_instances WHERE item_id = ? AND state = 'confirmed'",
                              (item_id,)).fetchone()[0])


def settle(database: Database, item_id: int, attach_ai_results: bool = False) -> str:
    """Move the item to the state its instances imply and return it; on confirmation mark the
    study 'sent' (once every item of the study is confirmed), with an event and an audit entry.
    For a destination that takes the AI results, these record what AI output failed and so was
    not sent (``notes``)."""
    now = utc_now()
    with database.atomic() as tx:
        item = dict(zip(("state", "study_uid", "destination", "requested_by"), tx.execute(
            "SELECT state, study_uid, destination, requested_by FROM outbox_items WHERE id = ?", (item_id,)).fetchone()))
        if item["state"] not in ACTIVE:
            return str(item["state"])
        counts = dict(tx.execute("SELECT state, COUNT(*) FROM outbox_instances WHERE item_id = ? GROUP BY state",
                                 (item_id,)).fetchall())
        if counts.get("pending"):
            state = "sending"
        elif counts.get("sent"):
            state = "delivered"
        elif counts.get("refused") or counts.get("blocked"):
            state = "failed"
        else:
            state = "confirmed"
        reason = ""
        if state == "failed":
            reasons = [r[0] for r in tx.execute("SELECT DISTINCT reason FROM outbox_instances WHERE item_id = ? AND "
                                                "state IN ('refused', 'blocked')", (item_id,))]
            n = (counts.get("refused") or 0) + (counts.get("blocked") or 0)
            reason = f"{n} of {sum(counts.values())} instances not sent: " + "; ".join(reasons)
        tx.execute("UPDATE outbox_items SET state = ?, reason = ?, updated_at = ?, "
                   "confirmed_at = CASE WHEN ? = 'confirmed' THEN ? ELSE confirmed_at END WHERE id = ?",
                   (state, reason, now, state, now, item_id))
        if state in ("confirmed", "failed"):
            detail = {"destination": item["destination"], "outbox_item": item_id, "state": state,
                      "instances": counts.get("confirmed", 0)}
            if reason:
                detail["reason"] = reason
            notes = failure_notes(study_failures(database, [item["study_uid"]]).get(item["study_uid"], [])) \
                if attach_ai_results else []
            if notes:
                detail["notes"] = notes
            tx.execute("INSERT INTO events (at, kind, study_uid, detail) VALUES (?, ?, ?, ?)",
                       (now, "forwarded" if state == "confirmed" else "forward_failed", item["study_uid"],
                        json.dumps(detail)))
            audit.record_tx(tx, item["requested_by"], "forwarded" if state == "confirmed" else "forward_failed",
                            item["study_uid"], detail)
        if state == "confirmed":
            open_items = tx.execute("SELECT COUNT(*) FROM outbox_items WHERE study_uid = ? AND state NOT IN "
                                    "('confirmed', 'cancelled')", (item["study_uid"],)).fetchone()[0]
            if not open_items:
                tx.execute("UPDATE studies SET state = 'sent' WHERE study_uid = ? AND state != 'report_received'",
                           (item["study_uid"],))
    return state


def note_failure(database: Database, item_ids: int | list[int], destination: str, error: str, cap_s: float) -> float:
    """A transient failure: back the destination off (all its items wait) once, and note the
    error on the items that were being attempted; returns the delay."""
    ids = [item_ids] if isinstance(item_ids, int) else list(item_ids)
    now = utc_now()
    with database.atomic() as tx:
        tx.execute("INSERT OR IGNORE INTO destination_state (name) VALUES (?)", (destination,))
        failures = tx.execute("UPDATE destination_state SET failures = failures + 1, last_error = ?, "
                              "last_attempt_at = ? WHERE name = ? RETURNING failures",
                              (error, now, destination)).fetchone()[0]
        delay = backoff_s(int(failures), cap_s)
        tx.execute("UPDATE destination_state SET next_attempt_at = ? WHERE name = ?", (_later(delay), destination))
        tx.execute(f"UPDATE outbox_items SET last_error = ?, updated_at = ? WHERE id IN ({', '.join('?' * len(ids))})",
                   (error, now, *ids))
    return delay


def note_success(database: Database, destination: str) -> None:
    now = utc_now()
    with database.atomic() as tx:
        tx.execute("INSERT OR IGNORE INTO destination_state (name) VALUES (?)", (destination,))
        tx.execute("UPDATE destination_state SET failures = 0, next_attempt_at = '', last_error = '', "
                   "last_attempt_at = ?, last_success_at = ? WHERE name = ?", (now, now, destination))


def defer(database: Database, item_id: int, seconds: float, error: str = "") -> None:
    """Let other items go first (an urgent one arrived, or the service is stopping)."""
    with database.atomic() as tx:
        tx.execute("UPDATE outbox_items SET next_attempt_at = ?, last_error = CASE WHEN ? != '' THEN ? ELSE "
                   "last_error END WHERE id = ?", (_later(seconds), error, error, item_id))


# -- operator commands ------------------------------------------------------------------------
def cancel_item(database: Database, item_id: int, actor: str = "system") -> None:
    with database.atomic() as tx:
        row = tx.execute("SELECT state, study_uid FROM outbox_items WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            raise ForwardRequestError(f"no outbox item {item_id}")
        if row[0] in ("confirmed", "cancelled"):
            raise ForwardRequestError(f"outbox item {item_id} is already {row[0]}")
        tx.execute("UPDATE outbox_items SET state = 'cancelled', updated_at = ? WHERE id = ?", (utc_now(), item_id))
        audit.record_tx(tx, actor, "forward_cancel", row[1], {"outbox_item": item_id})


def retry_item(database: Database, item_id: int, actor: str = "system") -> None:
    """Send a failed or cancelled item again (refused instances included), or a waiting one now."""
    now = utc_now()
    with database.atomic() as tx:
        row = tx.execute("SELECT state, study_uid, destination FROM outbox_items WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            raise ForwardRequestError(f"no outbox item {item_id}")
        state, study_uid, destination = row
        if state == "confirmed":
            raise ForwardRequestError(f"outbox item {item_id} is already confirmed")
        if state in ("failed", "cancelled"):
            clash = tx.execute(f"SELECT id FROM outbox_items WHERE study_uid = ? AND destination = ? AND state IN "
                               f"{ACTIVE} AND id != ?", (study_uid, destination, item_id)).fetchone()
            if clash:
                raise ForwardRequestError(f"outbox item {clash[0]} already sends this study to {destination}")
            tx.execute("UPDATE outbox_instances SET state = 'pending', reason = '', updated_at = ? WHERE item_id = ? "
                       "AND state IN ('refused', 'blocked')", (now, item_id))
        tx.execute("UPDATE outbox_items SET state = CASE WHEN state IN ('failed', 'cancelled') THEN 'queued' "
                   "ELSE state END, reason = '', next_attempt_at = '', updated_at = ? WHERE id = ?", (now, item_id))
        tx.execute("UPDATE destination_state SET next_attempt_at = '' WHERE name = ?", (destination,))
        audit.record_tx(tx, actor, "forward_retry", study_uid, {"outbox_item": item_id})
