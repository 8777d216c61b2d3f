"""Automatic forwarding: ``[[forward_rules]]`` turned into outbox items by the sender thread.

(The web UI calls :func:`~appliance.forward.outbox.request_forward` directly; the
``forward_requests`` table of schema version 3 is no longer written or read.)

Evaluation is a query, not an event handler, so it is durable by construction: a study that
matches a rule and has never had an item for the rule's destination gets one, whenever the
forwarder next looks (after a crash, after a configuration change).  A study whose item was
cancelled is not queued again by a rule -- cancelling is a decision.
"""
from __future__ import annotations

import logging

from ..config import Config
from ..db import Database
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

