"""Read-outs of the outbox for the UI, the CLI (`appliance outbox --json`) and the tests."""
from __future__ import annotations

from typing import Any

from ..catalog import failure_notes, study_failures
from ..config import Config
from ..db import Database
from ..lifecycle import (OUTBOX_ACTIVE, OUTBOX_DONE, OUTBOX_INSTANCE_OPEN, OutboxInstanceState, OutboxState, Source,
                         forwarded_sql, marks, words)

SCHEMA_VERSION = 1
# The per-state instance counts of `appliance outbox --json` (superseded ones are not counted).
INSTANCE_STATES = words((OutboxInstanceState.PENDING, OutboxInstanceState.SENT, OutboxInstanceState.CONFIRMED,
                         OutboxInstanceState.REFUSED, OutboxInstanceState.BLOCKED))
_ACTIVE_IN = f"IN ({marks(OUTBOX_ACTIVE)})"  # with the parameters words(OUTBOX_ACTIVE)


def _unlisted(database: Database, where: str, params: tuple[Any, ...],
              ai_destinations: list[str] | None) -> dict[int, tuple[int, int]]:
    """Per active item matching ``where`` (alias o = outbox_items): (count, bytes) of the study's
    instances the item does not list yet.

    An item lists its instances only from its first attempt on (late images and AI results are
    added at each attempt), so a queue that waits for a send window or a hub that is down would
    otherwise show nothing pending.  They are pending: the next attempt sends them.  AI objects
    count for ``ai_destinations`` (those with attach_ai_results); None = unknown, not counted.
    The instances are chosen by kind, as the outbox chooses them
    (:func:`appliance.lifecycle.forwarded_sql`).
    """
    ai = ai_destinations or []
    forwarded, forwarded_params = forwarded_sql("i.source", False)
    with_ai = f" OR (i.source = ? AND o.destination IN ({marks(ai)}))" if ai else ""
    rows = database.query(
        f"SELECT o.id AS item_id, COUNT(*) AS n, COALESCE(SUM(i.size), 0) AS size FROM outbox_items o "
        f"JOIN instances i ON i.study_uid = o.study_uid WHERE {where} AND o.state {_ACTIVE_IN} "
        f"AND ({forwarded}{with_ai}) "
        f"AND NOT EXISTS (SELECT 1 FROM outbox_instances b WHERE b.item_id = o.id "
        f"AND b.sop_instance_uid = i.sop_instance_uid) GROUP BY o.id",
        (*params, *words(OUTBOX_ACTIVE), *forwarded_params, *((Source.AI.value, *ai) if ai else ())))
    return {r["item_id"]: (int(r["n"]), int(r["size"])) for r in rows}


def _ai_destinations(config: Config | None) -> list[str] | None:
    return None if config is None else [d.name for d in config.destinations if d.attach_ai_results]


def _with_counts(database: Database, items: list[dict[str, Any]],
                 config: Config | None = None) -> list[dict[str, Any]]:
    if not items:
        return []
    ids = [i["id"] for i in items]
    marks = ", ".join("?" * len(ids))
    counts: dict[int, dict[str, Any]] = {}
    for row in database.query(
            f"SELECT item_id, state, COUNT(*) AS n, SUM(bytes_original) AS original, SUM(bytes_sent) AS sent "
            f"FROM outbox_instances WHERE item_id IN ({marks}) GROUP BY item_id, state", tuple(ids)):
        c = counts.setdefault(row["item_id"], {"instances": dict.fromkeys(INSTANCE_STATES, 0), "bytes_original": 0,
                                               "bytes_sent": 0, "bytes_pending": 0})
        c["instances"][row["state"]] = row["n"]
        c["bytes_original"] += row["original"] or 0
        if row["state"] in (OutboxInstanceState.SENT, OutboxInstanceState.CONFIRMED):
            c["bytes_sent"] += row["sent"] or 0
        if row["state"] == OutboxInstanceState.PENDING:
            c["bytes_pending"] += row["original"] or 0
    unlisted = _unlisted(database, f"o.id IN ({marks})", tuple(ids), _ai_destinations(config))
    out = []
    for item in items:
        c = counts.get(item["id"], {"instances": dict.fromkeys(INSTANCE_STATES, 0), "bytes_original": 0,
                                    "bytes_sent": 0, "bytes_pending": 0})
        n, size = unlisted.get(item["id"], (0, 0))
        c["instances"]["pending"] += n
        c["bytes_original"] += size
        c["bytes_pending"] += size
        c["instances"]["total"] = sum(c["instances"].values())
        out.append({
            "id": item["id"], "study_uid": item["study_uid"], "destination": item["destination"],
            "priority": item["priority"], "state": item["state"], "origin": item["origin"],
            "requested_by": item["requested_by"], "created_at": item["created_at"],
            "updated_at": item["updated_at"], "confirmed_at": item["confirmed_at"], "attempts": item["attempts"],
            "last_error": item["last_error"], "reason": item["reason"],
            "next_attempt_at": item.get("next_retry") or item["next_attempt_at"], **c,
        })
    return out


def list_items(database: Database, include_done: bool = False, config: Config | None = None) -> list[dict[str, Any]]:
    """Outbox items, most pressing first: active and failed ones, plus confirmed and cancelled
    ones when ``include_done``.  With ``config``, the AI objects a waiting item will also send
    count as pending."""
    states = words((*OUTBOX_ACTIVE, OutboxState.FAILED, *(OUTBOX_DONE if include_done else ())))
    items = database.query(
        f"SELECT o.*, MAX(o.next_attempt_at, COALESCE(d.next_attempt_at, '')) AS next_retry FROM outbox_items o "
        f"LEFT JOIN destination_state d ON d.name = o.destination WHERE o.state IN ({marks(states)}) "
        f"ORDER BY o.state IN ({marks(OUTBOX_DONE)}), o.priority_rank, o.id", (*states, *words(OUTBOX_DONE)))
    return _with_counts(database, items, config)


def study_forwarding(database: Database, study_uid: str, config: Config | None = None) -> list[dict[str, Any]]:
    """Per destination, the latest outbox item of a study: state, last error, next retry, counts.

    For the study view.  ``last_error`` is the last transient problem (the item keeps retrying);
    ``reason`` says why a ``failed`` item was not sent (a refusal or the box's policy); ``notes``
    what AI output of the study failed and so is not among what the item sends (for destinations
    that take the AI results; for every destination when ``config`` is None).
    """
    items = database.query(
        "SELECT o.*, MAX(o.next_attempt_at, COALESCE(d.next_attempt_at, '')) AS next_retry FROM outbox_items o "
        "LEFT JOIN destination_state d ON d.name = o.destination WHERE o.study_uid = ? AND o.id IN "
        "(SELECT MAX(id) FROM outbox_items WHERE study_uid = ? GROUP BY destination) ORDER BY o.destination",
        (study_uid, study_uid))
    out = _with_counts(database, items, config)
    ai_destinations = _ai_destinations(config)
    notes = failure_notes(study_failures(database, [study_uid]).get(study_uid, []))
    for entry in out:
        entry["notes"] = notes if ai_destinations is None or entry["destination"] in ai_destinations else []
        if entry["state"] not in OUTBOX_ACTIVE:
            entry["next_attempt_at"] = ""
            entry["last_error"] = entry["last_error"] if entry["state"] == OutboxState.FAILED else ""
    return out


def destination_status(database: Database, config: Config) -> list[dict[str, Any]]:
    """Per configured destination: queue length, bytes pending, last success, next retry, last
    error.  For the status screen."""
    out = []
    for dest in config.destinations:
        name = dest.name
        state = database.query("SELECT * FROM destination_state WHERE name = ?", (name,))
        st = state[0] if state else {}
        queue = database.query(f"SELECT COUNT(*) AS n FROM outbox_items WHERE destination = ? AND state {_ACTIVE_IN}",
                               (name, *words(OUTBOX_ACTIVE)))[0]["n"]
        pending = database.query(
            f"SELECT COALESCE(SUM(b.bytes_original), 0) AS n FROM outbox_instances b JOIN outbox_items o ON "
            f"o.id = b.item_id WHERE o.destination = ? AND o.state {_ACTIVE_IN} "
            f"AND b.state IN ({marks(OUTBOX_INSTANCE_OPEN)})",
            (name, *words(OUTBOX_ACTIVE), *words(OUTBOX_INSTANCE_OPEN)))[0]["n"]
        pending += sum(size for _, size in _unlisted(database, "o.destination = ?", (name,),
                                                     _ai_destinations(config)).values())
        failed = database.query("SELECT COUNT(*) AS n FROM outbox_items WHERE destination = ? AND state = ?",
                                (name, OutboxState.FAILED.value))[0]["n"]
        out.append({
            "name": name, "kind": dest.kind, "deidentify": dest.deidentify, "compress": dest.compress,
            "send_window": dest.send_window, "queue_length": queue, "failed_items": failed,
            "bytes_pending": int(pending), "last_success_at": st.get("last_success_at", ""),
            "last_attempt_at": st.get("last_attempt_at", ""), "next_retry_at": st.get("next_attempt_at", ""),
            "consecutive_failures": st.get("failures", 0), "last_error": st.get("last_error", ""),
        })
    return out
