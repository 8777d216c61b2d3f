"""Results belong to the bytes they were computed on (``analysis_results.sha256``).

When an image is replaced by different bytes, :func:`supersede_stale` moves its results on the
older bytes from ``analysis_results`` (which holds only current results) into
``superseded_results`` for audit, and supersedes their SR and SC too: their instance rows move to
``superseded_instances`` and their files to ``superseded/``, so they are neither shown nor
forwarded; the image gets a new job.  The analysis worker calls it as soon as a replacement is
seen, at the commit of a new result and at start-up (:func:`recover_superseded`); the results
stage (``appliance.results.worker``) when a result is superseded while its objects are built.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path
from typing import Any, Optional

from .. import triage
from ..db import Database
from ..forward import outbox
from ..lifecycle import JOB_OUTSTANDING, InstanceState, JobState, Source, marks, words
from ..store import InstanceStore, utc_now

log = logging.getLogger(__name__)

# analysis_results columns kept in superseded_results (its result_id is the row's id).
RESULT_COLUMNS = ("sop_instance_uid", "study_uid", "model_id", "model_version", "status", "findings_json",
                  "abstention_code", "abstention_reason", "error", "backend", "precision", "sr_sop_instance_uid",
                  "sr_path", "heatmap_sop_instance_uid", "heatmap_path", "objects_state", "objects_error",
                  "sha256", "created_at", "ood_distance", "frame_index", "fingerprint_json", "notes_json")
SUPERSEDED_OBJECT = "its AI result was superseded: the image was replaced by different bytes"


def read_instance(path: Path) -> tuple[bytes, str]:
    """The bytes of a stored instance and their sha256: what is analysed is what is hashed."""
    data = path.read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def supersede_ai_instance(tx: Any, store: InstanceStore, sop: str, now: str) -> Optional[tuple[Path, str]]:
    """Inside ``tx``: retire the box's AI object ``sop`` (its result was superseded).

    Its file is hard-linked under ``superseded/`` (durably, before the row goes), its row moves to
    ``superseded_instances`` and its not yet confirmed outbox entries become ``superseded`` (never
    sent).  Returns (current path, sha256) for :func:`remove_superseded_files` after the commit;
    a crash before that leaves a file that start-up re-indexes and :func:`recover_superseded`
    retires again.  None if ``sop`` is not a current AI object.
    """
    retired = store.retire_instance(tx, sop, now, source=Source.AI)
    if retired is not None:
        outbox.supersede_instance(tx, sop, SUPERSEDED_OBJECT, now)
    return retired


def remove_superseded_files(files: list[tuple[Path, str]]) -> None:
    """After the commit: remove retired AI objects from ``instances/`` (their copy is under
    ``superseded/``), unless the same name now holds other bytes."""
    for path, sha in files:
        with contextlib.suppress(FileNotFoundError):  # already removed (an earlier, interrupted pass)
            if read_instance(path)[1] == sha:
                path.unlink()


def supersede_stale(tx: Any, store: InstanceStore, sop: str, now: str) -> list[tuple[Path, str]]:
    """Inside ``tx``: supersede the results of image ``sop`` that were computed on other bytes
    than its current ones, with their AI objects; queue the image's analysis if no job is
    waiting and recompute the study's triage.  Returns the files for
    :func:`remove_superseded_files` after the commit (empty if nothing was stale)."""
    row = tx.execute("SELECT sha256, study_uid FROM instances WHERE sop_instance_uid = ?", (sop,)).fetchone()
    if row is None:
        return []
    sha, study = row
    stale = tx.execute("SELECT sr_sop_instance_uid, heatmap_sop_instance_uid FROM analysis_results "
                       "WHERE sop_instance_uid = ? AND sha256 != ?", (sop, sha)).fetchall()
    if not stale:
        return []
    cols = ", ".join(RESULT_COLUMNS)
    tx.execute(f"INSERT INTO superseded_results (result_id, {cols}, superseded_at, superseded_by_sha256) "
               f"SELECT id, {cols}, ?, ? FROM analysis_results WHERE sop_instance_uid = ? AND sha256 != ? ORDER BY id",
               (now, sha, sop, sha))
    tx.execute("DELETE FROM analysis_results WHERE sop_instance_uid = ? AND sha256 != ?", (sop, sha))
    files = [found for uids in stale for uid in uids if uid
             for found in [supersede_ai_instance(tx, store, uid, now)] if found]
    outstanding = words(JOB_OUTSTANDING)
    tx.execute("INSERT INTO analysis_jobs (sop_instance_uid, study_uid, state, sha256, created_at, updated_at) "
               "SELECT ?, ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM analysis_jobs "
               f"WHERE sop_instance_uid = ? AND state IN ({marks(outstanding)}))",
               (sop, study, JobState.PENDING, sha, now, now, sop, *outstanding))
    tx.execute("UPDATE instances SET state = ? WHERE sop_instance_uid = ?", (InstanceState.RECEIVED, sop))
    triage.update_study(tx, study, now)
    log.info("analysis %s: %d results superseded (the image was replaced)", sop, len(stale))
    return files


def recover_superseded(database: Database, store: InstanceStore) -> int:
    """Start-up: supersede every result whose image has other bytes now (a crash between the
    store's commit and the re-analysis), and retire again AI objects of superseded results
    that a crash left in ``instances/`` (re-indexed by the store's recovery).  Returns the
    number of images whose results were superseded."""
    stale = [r["sop_instance_uid"] for r in database.query(
        "SELECT DISTINCT r.sop_instance_uid FROM analysis_results r JOIN instances i "
        "ON i.sop_instance_uid = r.sop_instance_uid WHERE r.sha256 != i.sha256")]
    orphans = [r["sop_instance_uid"] for r in database.query(
        "SELECT sop_instance_uid FROM instances WHERE source = ? AND sop_instance_uid IN "
        "(SELECT sr_sop_instance_uid FROM superseded_results UNION SELECT heatmap_sop_instance_uid "
        "FROM superseded_results) AND sop_instance_uid NOT IN (SELECT sr_sop_instance_uid FROM analysis_results "
        "UNION SELECT heatmap_sop_instance_uid FROM analysis_results)", (Source.AI,))]
    files: list[tuple[Path, str]] = []
    now = utc_now()
    with database.atomic() as tx:
        for sop in stale:
            files += supersede_stale(tx, store, sop, now)
        for sop in orphans:
            found = supersede_ai_instance(tx, store, sop, now)
            if found:
                files.append(found)
    remove_superseded_files(files)
    if stale or orphans:
        log.info("recovery: results of %d replaced images superseded, %d AI objects retired", len(stale),
                 len(orphans))
    return len(stale)
