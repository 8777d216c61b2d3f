"""Second stage of analysis: the AI's result as standard DICOM objects in the study.

Triage needs the probabilities within a second; a Comprehensive SR and a full-resolution
heatmap Secondary Capture take ten times longer to build and store.  So the worker commits the
result row first (``objects_state = 'pending'``) and builds the objects here when no analysis
job is waiting.  Building re-runs the same model version on the same image (deterministic: the
same findings) to get the heatmap overlay, stores the SR and SC through the durable store with
deterministic UIDs (a crash and re-run replaces, never duplicates), then records their paths.

Forwarding waits for a study's objects (see ``forward.outbox.claim_next``) so a hub receives
them with the images; so every row ends ``done`` or ``failed`` with a reason, whatever a builder
raises, and a failed row lets the study go without its objects.  As for analysis jobs, an attempt
is counted when the row is claimed, so a build that takes the process down is failed by the
start-up recovery after ``analyze.max_attempts`` instead of crashing the box forever.

Results belong to the bytes they were computed on (``sha256``).  When an image is replaced by
different bytes, :func:`supersede_stale` moves its results on the older bytes from
``analysis_results`` (which holds only current results) into ``superseded_results`` for audit,
and supersedes their SR and SC too: their instance rows move to ``superseded_instances`` and
their files to ``superseded/``, so they are neither shown nor forwarded; the image gets a new job.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Optional

import pydicom

from .. import triage
from ..config import Config
from ..db import Database
from ..errors import InferenceError, StoreError
from ..forward import outbox
from . import build_ai_sr, build_heatmap_sc, write_part10
from .common import derived_uid
from ..store import InstanceStore, utc_now
from ..analyze.runner import failure_reason, get_runner, interrupted_reason

log = logging.getLogger(__name__)

BACKOFF_CAP_S = 300
# Conditions that pass (I/O, a busy database, a full disk): retried with backoff, not failed.
TRANSIENT = (OSError, sqlite3.OperationalError, StoreError)


# analysis_results columns kept in superseded_results (its result_id is the row's id).
RESULT_COLUMNS = ("sop_instance_uid", "study_uid", "model_id", "model_version", "status", "findings_json",
                  "abstention_code", "abstention_reason", "error", "backend", "precision", "sr_sop_instance_uid",
                  "sr_path", "heatmap_sop_instance_uid", "heatmap_path", "objects_state", "objects_error",
                  "sha256", "created_at")
SUPERSEDED_OBJECT = "its AI result was superseded: the image was replaced by different bytes"


def result_uid(source_uid: str, model_id: str, version: str, kind: str, sha256: str = "") -> str:
    """Deterministic UID for an AI object, so a re-run replaces instead of duplicating.

    The source bytes' sha256 is part of it: an object about different pixels is a different
    object (a hub keeps the first instance it got under a UID).  Results recorded before the
    sha256 existed (empty) keep the UIDs they had."""
    return derived_uid(source_uid, model_id, version, kind, *([sha256] if sha256 else []))


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
    retired = store.retire_instance(tx, sop, now, source="ai")
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
    tx.execute("INSERT INTO analysis_jobs (sop_instance_uid, study_uid, state, sha256, created_at, updated_at) "
               "SELECT ?, ?, 'pending', ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM analysis_jobs "
               "WHERE sop_instance_uid = ? AND state IN ('pending', 'running'))", (sop, study, sha, now, now, sop))
    tx.execute("UPDATE instances SET state = 'received' WHERE sop_instance_uid = ?", (sop,))
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
        "SELECT sop_instance_uid FROM instances WHERE source = 'ai' AND sop_instance_uid IN "
        "(SELECT sr_sop_instance_uid FROM superseded_results UNION SELECT heatmap_sop_instance_uid "
        "FROM superseded_results) AND sop_instance_uid NOT IN (SELECT sr_sop_instance_uid FROM analysis_results "
        "UNION SELECT heatmap_sop_instance_uid FROM analysis_results)")]
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


class StaleResultError(Exception):
    """The image a result was computed on has been replaced: its objects are not built."""


class ResultObjects:
    """Builds pending result objects, one result row at a time."""

    def __init__(self, config: Config, database: Database, store: InstanceStore):
        self.config = config
        self.db = database
        self.store = store
        self.max_attempts = int(config["analyze"]["max_attempts"])

    def recover(self) -> None:
        """Rows left 'building' by a crash go back to 'pending', unless they have had their
        ``max_attempts``: those are failed (every one of their attempts ended the process)."""
        with self.db.atomic() as tx:
            exhausted = tx.execute("SELECT id, objects_attempts FROM analysis_results WHERE objects_state = 'building' "
                                   "AND objects_attempts >= ?", (self.max_attempts,)).fetchall()
            for row_id, attempts in exhausted:
                tx.execute("UPDATE analysis_results SET objects_state = 'failed', objects_error = ? WHERE id = ?",
                           (interrupted_reason(attempts, "building the AI objects of this result"), row_id))
            tx.execute("UPDATE analysis_results SET objects_state = 'pending' WHERE objects_state = 'building'")
        for row_id, attempts in exhausted:
            log.error("result %d: objects failed, interrupted %d times, not built again", row_id, attempts)

    def claim(self) -> Optional[dict[str, Any]]:
        now = utc_now()
        with self.db.atomic() as tx:
            row = tx.execute("SELECT id FROM analysis_results WHERE objects_state = 'pending' AND objects_next_at <= ? "
                             "ORDER BY id LIMIT 1", (now,)).fetchone()
            if row is None:
                return None
            # Counted before building: an attempt that kills the process is an attempt.
            tx.execute("UPDATE analysis_results SET objects_state = 'building', "
                       "objects_attempts = objects_attempts + 1 WHERE id = ?", (row[0],))
        return self.db.query("SELECT * FROM analysis_results WHERE id = ?", (row[0],))[0]

    def build_once(self) -> bool:
        """Build the objects of one pending result; False when none is pending."""
        row = self.claim()
        if row is None:
            return False
        try:
            sr_uid, sr_path, hm_uid, hm_path = self._build(row)
        except StaleResultError as exc:
            self._finish(row, "failed", error=str(exc))
        except TRANSIENT as exc:
            self._retry(row, f"{type(exc).__name__}: {exc}")
        except (KeyboardInterrupt, SystemExit):
            raise  # the process is stopping: the row stays 'building' and recovery re-queues it
        except BaseException as exc:  # noqa: BLE001 - whatever a builder raises ends this row
            log.error("result %d (%s): building its objects raised %s", row["id"], row["model_id"],
                      type(exc).__name__)
            self._finish(row, "failed", error=f"result objects cannot be built: {failure_reason(exc)}")
        else:
            self._finish(row, "done", sr_uid=sr_uid, sr_path=sr_path, hm_uid=hm_uid, hm_path=hm_path)
        return True

    def _build(self, row: dict[str, Any]) -> tuple[str, str, str, str]:
        sop, study = row["sop_instance_uid"], row["study_uid"]
        path = Path(self.db.query("SELECT file_path FROM instances WHERE sop_instance_uid = ?", (sop,))[0]["file_path"])
        data, sha = read_instance(path)
        if row["sha256"] and sha != row["sha256"]:
            # The image was replaced since: this result is superseded, and objects built now
            # would show the new pixels under the old result.
            raise StaleResultError("the image was replaced before its AI objects were built")
        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        result = get_runner(row["model_id"], self.config).analyze(data)
        if result.model_version != row["model_version"]:
            raise InferenceError(f"installed {result.model} is {result.model_version}, the result is from "
                                 f"{row['model_version']}")
        model, version = result.model, result.model_version
        sr_uid = result_uid(sop, model, version, "sr", row["sha256"])
        sr = build_ai_sr(header, result, sop_instance_uid=sr_uid,
                         series_instance_uid=result_uid(study, model, version, "sr-series"))
        sr_path = str(self.store.store(write_part10(sr), source="ai").path)
        hm_uid = hm_path = ""
        if result.heatmap is not None:
            hm_uid = result_uid(sop, model, version, "heatmap", row["sha256"])
            sc = build_heatmap_sc(header, result, sop_instance_uid=hm_uid,
                                  series_instance_uid=result_uid(study, model, version, "hm-series"))
            hm_path = str(self.store.store(write_part10(sc), source="ai").path)
        return sr_uid, sr_path, hm_uid, hm_path

    def _finish(self, row: dict[str, Any], state: str, *, error: str = "", sr_uid: str = "", sr_path: str = "",
                hm_uid: str = "", hm_path: str = "") -> None:
        files: list[tuple[Path, str]] = []
        with self.db.atomic() as tx:
            cur = tx.execute("UPDATE analysis_results SET objects_state = ?, objects_error = ?, sr_sop_instance_uid = ?, "
                             "sr_path = ?, heatmap_sop_instance_uid = ?, heatmap_path = ? WHERE id = ?",
                             (state, error, sr_uid, sr_path, hm_uid, hm_path, row["id"]))
            if not cur.rowcount:
                # The result was superseded while its objects were built: they are superseded too.
                tx.execute("UPDATE superseded_results SET objects_state = ?, objects_error = ?, "
                           "sr_sop_instance_uid = ?, sr_path = ?, heatmap_sop_instance_uid = ?, heatmap_path = ? "
                           "WHERE result_id = ?", (state, error, sr_uid, sr_path, hm_uid, hm_path, row["id"]))
                now = utc_now()
                files = [found for uid in (sr_uid, hm_uid) if uid
                         for found in [supersede_ai_instance(tx, self.store, uid, now)] if found]
        remove_superseded_files(files)

    def _retry(self, row: dict[str, Any], error: str) -> None:
        attempts = row["objects_attempts"]  # this attempt included (counted at the claim)
        if attempts >= self.max_attempts:
            self._finish(row, "failed", error=error)
            log.error("result %d: objects failed after %d attempts: %s", row["id"], attempts, error)
            return
        delay = min(BACKOFF_CAP_S, 2 ** attempts)
        next_at = (datetime.now(timezone.utc) + timedelta(seconds=delay)).isoformat(timespec="milliseconds")
        log.warning("result %d: transient failure building objects (%s), retry in %ds", row["id"], error, delay)
        with self.db.atomic() as tx:
            tx.execute("UPDATE analysis_results SET objects_state = 'pending', objects_error = ?, "
                       "objects_next_at = ? WHERE id = ?", (error, next_at, row["id"]))
