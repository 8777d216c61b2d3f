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
"""
from __future__ import annotations

import logging
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Optional

import pydicom

from ..config import Config
from ..db import Database
from ..errors import InferenceError, StoreError
from ..results import build_ai_sr, build_heatmap_sc, write_part10
from ..results.common import derived_uid
from ..store import InstanceStore, utc_now
from .runner import failure_reason, get_runner, interrupted_reason

log = logging.getLogger(__name__)

BACKOFF_CAP_S = 300
# Conditions that pass (I/O, a busy database, a full disk): retried with backoff, not failed.
TRANSIENT = (OSError, sqlite3.OperationalError, StoreError)


def result_uid(source_uid: str, model_id: str, version: str, kind: str) -> str:
    """Deterministic UID for an AI object, so a re-run replaces instead of duplicating."""
    return derived_uid(source_uid, model_id, version, kind)


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
        header = pydicom.dcmread(path, stop_before_pixels=True)
        result = get_runner(row["model_id"], self.config).analyze(path)
        if result.model_version != row["model_version"]:
            raise InferenceError(f"installed {result.model} is {result.model_version}, the result is from "
                                 f"{row['model_version']}")
        model, version = result.model, result.model_version
        sr_uid = result_uid(sop, model, version, "sr")
        sr = build_ai_sr(header, result, sop_instance_uid=sr_uid,
                         series_instance_uid=result_uid(study, model, version, "sr-series"))
        sr_path = str(self.store.store(write_part10(sr), source="ai").path)
        hm_uid = hm_path = ""
        if result.heatmap is not None:
            hm_uid = result_uid(sop, model, version, "heatmap")
            sc = build_heatmap_sc(header, result, sop_instance_uid=hm_uid,
                                  series_instance_uid=result_uid(study, model, version, "hm-series"))
            hm_path = str(self.store.store(write_part10(sc), source="ai").path)
        return sr_uid, sr_path, hm_uid, hm_path

    def _finish(self, row: dict[str, Any], state: str, *, error: str = "", sr_uid: str = "", sr_path: str = "",
                hm_uid: str = "", hm_path: str = "") -> None:
        with self.db.atomic() as tx:
            tx.execute("UPDATE analysis_results SET objects_state = ?, objects_error = ?, sr_sop_instance_uid = ?, "
                       "sr_path = ?, heatmap_sop_instance_uid = ?, heatmap_path = ? WHERE id = ?",
                       (state, error, sr_uid, sr_path, hm_uid, hm_path, row["id"]))

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
