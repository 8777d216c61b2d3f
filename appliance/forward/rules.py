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
from ..lifecycle import JOB_OUTSTANDING, StudyState, marks, words
from .outbox import request_forward

log = logging.getLogger(__name__)

SCAN_LIMIT = 500
NO_OUTSTANDING_ANALYSIS = ("NOT EXISTS (SELECT 1 FROM analysis_jobs j WHERE j.study_uid = s.study_uid "
                           f"AND j.state IN ({marks(JOB_OUTSTANDING)}))")
# when -> the condition a study must meet (alias s = studies) and its parameters.
CONDITIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    # Urgent as soon as the study's images are analyzed: no waiting for the study to settle.
    "urgent": (f"s.priority = ? AND {NO_OUTSTANDING_ANALYSIS}", ("urgent", *words(JOB_OUTSTANDING))),
    "reviewed": ("(s.state = ? OR EXISTS (SELECT 1 FROM reviews r WHERE r.study_uid = s.study_uid))",
                 (StudyState.REVIEWED.value,)),
    # Analyzed and settled (no new image for analyze.study_quiet_s), so the whole study goes at once.
    "analyzed": (f"s.settled_at != '' AND {NO_OUTSTANDING_ANALYSIS} AND EXISTS (SELECT 1 FROM analysis_jobs j "
                 f"WHERE j.study_uid = s.study_uid)", words(JOB_OUTSTANDING)),
}


def evaluate(database: Database, config: Config) -> int:
    """Queue every study that matches a rule and has no item for its destination yet."""
    created = 0
    for rule in config.forward_rules:
        condition, params = CONDITIONS[rule.when]
        rows = database.query(
            f"SELECT s.study_uid FROM studies s WHERE {condition} AND NOT EXISTS "
            f"(SELECT 1 FROM outbox_items o WHERE o.study_uid = s.study_uid AND o.destination = ?) "
            f"ORDER BY s.priority_rank, s.first_received_at LIMIT ?", (*params, rule.to, SCAN_LIMIT))
        for row in rows:
            request_forward(database, config, row["study_uid"], rule.to, rule.priority,
                            requested_by="system", origin=f"rule:{rule.when}")
            created += 1
    if created:
        log.info("forward rules queued %d items", created)
    return created

