"""The outbox: durable state of every send, one item per (study, destination).

Item states (:class:`~appliance.lifecycle.OutboxState`)::

    queued -> sending -> delivered -> confirmed
                 \\-> failed     (a peer refused a dataset, or policy blocked one; reason says which)
    any active state -> cancelled            failed / cancelled -> queued (outbox retry)

Instance states (:class:`~appliance.lifecycle.OutboxInstanceState`): ``pending`` -> ``sent``
(the peer acknowledged it) -> ``confirmed`` (the peer lists it in a query); ``refused``,
``blocked`` and ``superseded`` (an AI object whose result was superseded before it was confirmed:
never sent) are final.  Every transition is one SQLite
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

import sqlite_utils

from .. import audit, lifecycle
from ..catalog import failure_notes, study_failures
from ..config import Config
from ..db import Database
from ..lifecycle import (JOB_OUTSTANDING, OBJECTS_OUTSTANDING, OUTBOX_ACTIVE, OUTBOX_DONE, OUTBOX_INSTANCE_NOT_SENT,
                         OUTBOX_INSTANCE_OPEN, OutboxInstanceState, OutboxState, Source, StudyEvent, marks, words)
from ..store import utc_now
from .errors import ForwardRequestError
from .pacing import backoff_s, in_window

PRIORITIES = {"urgent": 0, "routine": 1}
_ACTIVE_IN = f"IN ({marks(OUTBOX_ACTIVE)})"  # with the parameters words(OUTBOX_ACTIVE)
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
                         f"AND state {_ACTIVE_IN}", (study_uid, destination, *words(OUTBOX_ACTIVE))).fetchone()
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

    What goes is chosen by kind (:func:`appliance.lifecycle.forwarded_sql`): the clinic's images,
    whatever their source, and with ``attach_ai_results`` the box's AI objects, each only while it
    belongs to a current result (one computed on its image's current bytes): the objects of a
    superseded result are never sent."""
    forwarded, params = lifecycle.forwarded_sql("source", attach_ai_results)
    ai_current = (f" AND (source != ? OR sop_instance_uid IN {CURRENT_AI_OBJECTS})" if attach_ai_results else "")
    with database.atomic() as tx:
        tx.execute(
            f"INSERT OR IGNORE INTO outbox_instances (item_id, sop_instance_uid, bytes_original, updated_at) "
            f"SELECT ?, sop_instance_uid, size, ? FROM instances WHERE study_uid = ? AND {forwarded}{ai_current}",
            (item["id"], utc_now(), item["study_uid"], *params,
             *((Source.AI.value, item["study_uid"], item["study_uid"]) if attach_ai_results else ())))


# -- the sender's transitions -----------------------------------------------------------------
# For a destination that takes the AI results, a study is sent once its analysis and its AI
# result objects are done, so the hub gets them together (an urgent study waits seconds for its
# SR and heatmap, instead of arriving without them).  Done includes failed: a study whose AI
# objects failed goes with what exists, and its notes, forwarding status and event say so.
# (Parameters: STUDY_READY_PARAMS.)
STUDY_READY = (
    "(NOT EXISTS (SELECT 1 FROM analysis_jobs j WHERE j.study_uid = o.study_uid "
    f"AND j.state IN ({marks(JOB_OUTSTANDING)})) "
    "AND NOT EXISTS (SELECT 1 FROM analysis_results r WHERE r.study_uid = o.study_uid "
    f"AND r.objects_state IN ({marks(OBJECTS_OUTSTANDING)})))"
)
STUDY_READY_PARAMS = (*words(JOB_OUTSTANDING), *words(OBJECTS_OUTSTANDING))
# A batch: items of one destination and one priority sent together (one STOW-RS request, one
# confirming query for all of them) up to about this many bytes of stored files.  Confirmation
# waits for the whole batch, so it stays a few seconds of link time on slow links.
BATCH_ITEMS = 50
BATCH_BYTES = 8 * 1024 * 1024


def _sendable(config: Config, now: Optional[datetime]) -> tuple[str, tuple[Any, ...]]:
    """WHERE clause (over ``outbox_items o`` joined with ``destination_state d``) and its
    parameters: active items whose destination is open, not backed off, and study ready."""
    stamp = utc_now()
    open_dests = [d.name for d in config.destinations if in_window(d.send_window, now)] or [""]
    without_ai = [d.name for d in config.destinations if not d.attach_ai_results]
    ready = f"AND (o.destination IN ({', '.join('?' * len(without_ai))}) OR {STUDY_READY})" if without_ai \
        else f"AND {STUDY_READY}"
    where = (f"o.state {_ACTIVE_IN} AND o.destination IN ({', '.join('?' * len(open_dests))}) "
             f"AND o.next_attempt_at <= ? AND COALESCE(d.next_attempt_at, '') <= ? {ready}")
    return where, (*words(OUTBOX_ACTIVE), *open_dests, stamp, stamp, *without_ai, *STUDY_READY_PARAMS)


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
        tx.execute(f"UPDATE outbox_items SET state = CASE WHEN state = ? THEN ? ELSE state END, "
                   f"attempts = attempts + 1, updated_at = ? WHERE id IN ({', '.join('?' * len(chosen))})",
                   (OutboxState.QUEUED.value, OutboxState.SENDING.value, stamp, *chosen))
    return [item for item in (get_item(database, i) for i in chosen) if item is not None]


def claim_next(database: Database, config: Config, now: Optional[datetime] = None) -> Optional[dict[str, Any]]:
    """The most pressing item that may be sent now, marked ``sending``; None if there is none."""
    batch = claim_batch(database, config, now, max_items=1)
    return batch[0] if batch else None


def get_item(database: Database, item_id: int) -> Optional[dict[str, Any]]:
    rows = database.query("SELECT * FROM outbox_items WHERE id = ?", (item_id,))
    return rows[0] if rows else None


def instances(database: Database, item_id: int,
              states: tuple[str, ...] = OUTBOX_INSTANCE_OPEN) -> list[dict[str, Any]]:
    """The item's instances in ``states``, the modality's own ones first."""
    return database.query(
        f"SELECT o.*, i.file_path, i.sop_class_uid, i.transfer_syntax, i.source FROM outbox_instances o "
        f"JOIN instances i ON i.sop_instance_uid = o.sop_instance_uid WHERE o.item_id = ? "
        f"AND o.state IN ({marks(states)}) ORDER BY i.source != ?, o.rowid",
        (item_id, *(str(x) for x in states), Source.DICOM.value))


def supersede_instance(tx: sqlite_utils.Database, sop_instance_uid: str, reason: str, now: str) -> None:
    """Inside ``tx``: entries of ``sop_instance_uid`` not yet confirmed become ``superseded``
    (never sent): the instance was retired while queued."""
    tx.execute(f"UPDATE outbox_instances SET state = ?, reason = ?, updated_at = ? "
               f"WHERE sop_instance_uid = ? AND state IN ({marks(OUTBOX_INSTANCE_OPEN)})",
               (OutboxInstanceState.SUPERSEDED.value, reason, now, sop_instance_uid, *words(OUTBOX_INSTANCE_OPEN)))


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
                (OutboxInstanceState(u["state"]).value, u.get("remote_sop_instance_uid"), u.get("bytes_sent"),
                 u.get("transfer_syntax_sent"), u.get("reason"), now, u.get("item_id", item_id), u["sop_instance_uid"]))


def confirm_present(database: Database, item_id: int, remote_present: set[str]) -> int:
    """Mark confirmed every instance whose remote UID the hub lists; the rest that were ``sent``
    go back to ``pending``.  Returns how many are confirmed now."""
    rows = instances(database, item_id, OUTBOX_INSTANCE_OPEN)
    now = utc_now()
    update = "UPDATE outbox_instances SET state = ?, updated_at = ? WHERE item_id = ? AND sop_instance_uid = ?"
    with database.atomic() as tx:
        for r in rows:
            if r["remote_sop_instance_uid"] and r["remote_sop_instance_uid"] in remote_present:
                tx.execute(update, (OutboxInstanceState.CONFIRMED.value, now, item_id, r["sop_instance_uid"]))
            elif r["state"] == OutboxInstanceState.SENT:
                tx.execute(update, (OutboxInstanceState.PENDING.value, now, item_id, r["sop_instance_uid"]))
        return int(tx.execute("SELECT COUNT(*) FROM outbox_instances WHERE item_id = ? AND state = ?",
                              (item_id, OutboxInstanceState.CONFIRMED.value)).fetchone()[0])


def settle(database: Database, item_id: int, attach_ai_results: bool = False) -> str:
    """Move the item to the state its instances imply and return it; on confirmation the study
    gets its ``sent`` event (once every item of the study is confirmed or cancelled), with an
    event and an audit entry.
    For a destination that takes the AI results, these record what AI output failed and so was
    not sent (``notes``)."""
    now = utc_now()
    with database.atomic() as tx:
        item = dict(zip(("state", "study_uid", "destination", "requested_by"), tx.execute(
            "SELECT state, study_uid, destination, requested_by FROM outbox_items WHERE id = ?", (item_id,)).fetchone()))
        if item["state"] not in OUTBOX_ACTIVE:
            return str(item["state"])
        counts = dict(tx.execute("SELECT state, COUNT(*) FROM outbox_instances WHERE item_id = ? GROUP BY state",
                                 (item_id,)).fetchall())
        not_sent = sum(counts.get(s.value) or 0 for s in OUTBOX_INSTANCE_NOT_SENT)
        if counts.get(OutboxInstanceState.PENDING.value):
            state = OutboxState.SENDING
        elif counts.get(OutboxInstanceState.SENT.value):
            state = OutboxState.DELIVERED
        elif not_sent:
            state = OutboxState.FAILED
        else:
            state = OutboxState.CONFIRMED
        reason = ""
        if state == OutboxState.FAILED:
            reasons = [r[0] for r in tx.execute(f"SELECT DISTINCT reason FROM outbox_instances WHERE item_id = ? AND "
                                                f"state IN ({marks(OUTBOX_INSTANCE_NOT_SENT)})",
                                                (item_id, *words(OUTBOX_INSTANCE_NOT_SENT)))]
            reason = f"{not_sent} of {sum(counts.values())} instances not sent: " + "; ".join(reasons)
        confirmed = state == OutboxState.CONFIRMED
        tx.execute("UPDATE outbox_items SET state = ?, reason = ?, updated_at = ?, "
                   "confirmed_at = CASE WHEN ? THEN ? ELSE confirmed_at END WHERE id = ?",
                   (state.value, reason, now, confirmed, now, item_id))
        if state in (OutboxState.CONFIRMED, OutboxState.FAILED):
            detail = {"destination": item["destination"], "outbox_item": item_id, "state": state.value,
                      "instances": counts.get(OutboxInstanceState.CONFIRMED.value, 0)}
            if reason:
                detail["reason"] = reason
            notes = failure_notes(study_failures(database, [item["study_uid"]]).get(item["study_uid"], [])) \
                if attach_ai_results else []
            if notes:
                detail["notes"] = notes
            tx.execute("INSERT INTO events (at, kind, study_uid, detail) VALUES (?, ?, ?, ?)",
                       (now, "forwarded" if confirmed else "forward_failed", item["study_uid"],
                        json.dumps(detail)))
            audit.record_tx(tx, item["requested_by"], "forwarded" if confirmed else "forward_failed",
                            item["study_uid"], detail)
        if confirmed:
            open_items = tx.execute(f"SELECT COUNT(*) FROM outbox_items WHERE study_uid = ? AND state NOT IN "
                                    f"({marks(OUTBOX_DONE)})", (item["study_uid"], *words(OUTBOX_DONE))).fetchone()[0]
            if not open_items:
                lifecycle.move_study(tx, item["study_uid"], StudyEvent.SENT)
    return state.value


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
        if row[0] in OUTBOX_DONE:
            raise ForwardRequestError(f"outbox item {item_id} is already {row[0]}")
        tx.execute("UPDATE outbox_items SET state = ?, updated_at = ? WHERE id = ?",
                   (OutboxState.CANCELLED.value, utc_now(), item_id))
        audit.record_tx(tx, actor, "forward_cancel", row[1], {"outbox_item": item_id})


# Items a retry queues again (a waiting active item is only tried at once).
RETRIED = (OutboxState.FAILED, OutboxState.CANCELLED)


def retry_item(database: Database, item_id: int, actor: str = "system") -> None:
    """Send a failed or cancelled item again (refused instances included), or a waiting one now."""
    now = utc_now()
    with database.atomic() as tx:
        row = tx.execute("SELECT state, study_uid, destination FROM outbox_items WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            raise ForwardRequestError(f"no outbox item {item_id}")
        state, study_uid, destination = row
        if state == OutboxState.CONFIRMED:
            raise ForwardRequestError(f"outbox item {item_id} is already confirmed")
        if state in RETRIED:
            clash = tx.execute(f"SELECT id FROM outbox_items WHERE study_uid = ? AND destination = ? AND state "
                               f"{_ACTIVE_IN} AND id != ?",
                               (study_uid, destination, *words(OUTBOX_ACTIVE), item_id)).fetchone()
            if clash:
                raise ForwardRequestError(f"outbox item {clash[0]} already sends this study to {destination}")
            tx.execute(f"UPDATE outbox_instances SET state = ?, reason = '', updated_at = ? WHERE item_id = ? "
                       f"AND state IN ({marks(OUTBOX_INSTANCE_NOT_SENT)})",
                       (OutboxInstanceState.PENDING.value, now, item_id, *words(OUTBOX_INSTANCE_NOT_SENT)))
        tx.execute(f"UPDATE outbox_items SET state = CASE WHEN state IN ({marks(RETRIED)}) THEN ? "
                   f"ELSE state END, reason = '', next_attempt_at = '', updated_at = ? WHERE id = ?",
                   (*words(RETRIED), OutboxState.QUEUED.value, now, item_id))
        tx.execute("UPDATE destination_state SET next_attempt_at = '' WHERE name = ?", (destination,))
        audit.record_tx(tx, actor, "forward_retry", study_uid, {"outbox_item": item_id})
