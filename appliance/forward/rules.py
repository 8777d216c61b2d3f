"""Automatic forwarding: ``[[forward_rules]]`` and the UI's ``forward_requests`` rows, turned into
outbox items by the sender thread.

Evaluation is a query, not an event handler, so it is durable by construction: a study that
matches a rule and has never had an item for the rule's destination gets one, whenever the
forwarder next looks (after a crash, after a configuration change).  A study whose item was
cancelled is not queued again by a rule -- cancelling is a decision.
"""
from __future__ import annotations

import logging

from ..config import Config
from ..db import Database
from ..errors import ConfigError
from ..store import utc_now
from .errors import ForwardRequestError
from .outbox import request_forward

log = logging.getLogger(__name__)

SCAN_LIMIT = 500
NO_OUTSTANDING_ANALYSIS = ("NOT EXISTS (SELECT 1 FROM analysis_jobs j WHERE j.study_uid = s.study_uid "
                           "AND j.state IN ('pending', 'running'))")
# when -> the condition a study must meet (alias s = studies).
CONDITIONS = {
    # Urgent as soon as the study's images are analyzed: no waiting for the study to settle.
    "urgent": f"s.priority = 'urgent' AND {NO_OUTSTANDING_ANALYSIS}",
    "reviewed": "(s.state = 'reviewed' OR EXISTS (SELECT 1 FROM reviews r WHERE r.study_uid = s.study_uid))",
    # Analyzed and settled (no new image for analyze.study_quiet_s), so the whole study goes at once.
    "analyzed": f"s.settled_at != '' AND {NO_OUTSTANDING_ANALYSIS} AND EXISTS (SELECT 1 FROM analysis_jobs j "
                f"WHERE j.study_uid = s.study_uid)",
}


def evaluate(database: Database, config: Config) -> int:
    """Queue every study that matches a rule and has no item for its destination yet."""
    created = 0
    for rule in config["forward_rules"]:
        rows = database.query(
            f"SELECT s.study_uid FROM studies s WHERE {CONDITIONS[rule['when']]} AND NOT EXISTS "
            f"(SELECT 1 FROM outbox_items o WHERE o.study_uid = s.study_uid AND o.destination = ?) "
            f"ORDER BY s.priority_rank, s.first_received_at LIMIT {SCAN_LIMIT}", (rule["to"],))
        for row in rows:
            request_forward(database, config, row["study_uid"], rule["to"], rule["priority"],
                            requested_by="system", origin=f"rule:{rule['when']}")
            created += 1
    if created:
        log.info("forward rules queued %d items", created)
    return created


def consume_requests(database: Database, config: Config) -> int:
    """Turn the UI's ``forward_requests`` rows (state 'requested') into outbox items."""
    handled = 0
    for row in database.query("SELECT * FROM forward_requests WHERE state = 'requested' ORDER BY id LIMIT 100"):
        done = database.query("SELECT id FROM outbox_items WHERE origin = ?", (f"ui:{row['id']}",))
        try:
            # A crash between the item's commit and the request's update must not queue it twice.
            item_id = done[0]["id"] if done else request_forward(
                database, config, row["study_uid"], row["destination"], row["priority"],
                requested_by=row["requested_by"], origin=f"ui:{row['id']}")
            state = "queued"
        except (ConfigError, ForwardRequestError) as exc:
            log.warning("forward request %d rejected: %s", row["id"], exc)
            item_id, state = 0, "rejected"
        with database.atomic() as tx:
            tx.execute("UPDATE forward_requests SET state = ?, updated_at = ? WHERE id = ?",
                       (state, utc_now(), row["id"]))
        log.info("forward request %d -> outbox item %d (%s)", row["id"], item_id, state)
        handled += 1
    return handled
