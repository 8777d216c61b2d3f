"""The results stage: an analysis result as standard DICOM objects in the study.

Triage needs the probabilities within a second; a Comprehensive SR and a full-resolution
heatmap Secondary Capture take ten times longer to build and store.  So the analysis worker
commits the result row first (``objects_state = 'pending'``) and this worker builds the objects
when no analysis job is waiting, from what the row records (``AnalysisResult.from_record``):
the model is never run again, the heatmap is drawn from the activation map of the analysis' own
run.  It stores the SR and SC through the durable store with deterministic UIDs (a crash and
re-run replaces, never duplicates), then records their paths.

Forwarding waits for a study's objects (see ``forward.outbox.claim_next``) so a hub receives
them with the images; so every row ends ``done`` or ``failed`` with a reason, whatever a builder
raises, and a failed row lets the study go without its objects.  As for analysis jobs, an attempt
is counted when the row is claimed, so a build that takes the process down is failed by the
start-up recovery after ``analyze.max_attempts`` instead of crashing the box forever.

A result superseded while its objects are built (its image was replaced) gets them superseded
too (``analyze.supersede``); one whose image was replaced before the build gets none
(:class:`~appliance.errors.StaleResultError`).
"""
from __future__ import annotations

import io
import logging
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import pydicom

from ..analyze.heatmap import evidence_overlay
from ..analyze.result import AnalysisResult
from ..analyze.runner import failure_reason, interrupted_reason
from ..analyze.supersede import read_instance, remove_superseded_files, supersede_ai_instance
from ..analyze.worker import TRANSIENT, IngestDeferral, prepare_worker_thread
from ..background import BackgroundService
from ..config import Config
from ..db import Database
from ..errors import StaleResultError
from ..imaging.decode import decode
from ..lifecycle import OBJECTS_OUTSTANDING, JobState, ObjectsState, Source, marks, words
from ..store import InstanceStore, utc_now
from . import build_ai_sr, build_heatmap_sc, write_part10
from .common import derived_uid

log = logging.getLogger(__name__)

BACKOFF_CAP_S = 300


def result_uid(source_uid: str, model_id: str, version: str, kind: str, sha256: str = "") -> str:
    """Deterministic UID for an AI object, so a re-run replaces instead of duplicating.

    The source bytes' sha256 is part of it: an object about different pixels is a different
    object (a hub keeps the first instance it got under a UID).  Results recorded before the
    sha256 existed (empty) keep the UIDs they had."""
    return derived_uid(source_uid, model_id, version, kind, *([sha256] if sha256 else []))


class ObjectsWorker(BackgroundService):
    """Builds pending result objects, one result row at a time, on one thread of its own."""

    def __init__(self, config: Config, database: Database, store: InstanceStore,
                 ingest_busy: Optional[Callable[[], bool]] = None):
        super().__init__()
        self.config = config
        self.db = database
        self.store = store
        self.max_attempts = int(config.analyze.max_attempts)
        self.ingest_busy = ingest_busy or (lambda: False)
        self.max_defer_s = float(config.analyze.defer_while_receiving_s)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self.recover()
        self._spawn("result-objects", self._loop)

    def _loop(self) -> None:
        prepare_worker_thread(self.db)
        deferral = IngestDeferral(self.ingest_busy, self.max_defer_s)
        while not self._stop.is_set():
            # Receiving first, then analysis: triage is what the clinic is waiting for.
            if deferral.waiting() or self.analysis_waiting():
                self._stop.wait(0.1)
                continue
            try:
                worked = self.build_once()
            except Exception:  # noqa: BLE001 - a worker thread must survive anything
                log.exception("result objects worker error")
                worked = False
            if not worked:
                self._wake.wait(0.5)
                self._wake.clear()

    def analysis_waiting(self) -> bool:
        return bool(self.db.query("SELECT 1 FROM analysis_jobs WHERE state = ? AND next_attempt_at <= ? LIMIT 1",
                                  (JobState.PENDING, utc_now())))

    def pending(self, study_uid: Optional[str] = None) -> int:
        """Results whose objects are still to be built (of one study, or all)."""
        scope, params = (" AND study_uid = ?", (study_uid,)) if study_uid else ("", ())
        outstanding = words(OBJECTS_OUTSTANDING)
        return int(self.db.query(f"SELECT COUNT(*) AS n FROM analysis_results WHERE objects_state IN "
                                 f"({marks(outstanding)}){scope}", outstanding + params)[0]["n"])

    def run_until_idle(self, study_uid: Optional[str] = None, timeout_s: float = 600) -> None:
        """Build pending objects here until none is left (rows another process is building, or
        that back off, are waited for)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.build_once():
                continue
            if not self.pending(study_uid):
                return
            time.sleep(0.2)

    def recover(self) -> None:
        """Rows left 'building' by a crash go back to 'pending', unless they have had their
        ``max_attempts``: those are failed (every one of their attempts ended the process)."""
        with self.db.atomic() as tx:
            exhausted = tx.execute("SELECT id, objects_attempts FROM analysis_results WHERE objects_state = ? "
                                   "AND objects_attempts >= ?", (ObjectsState.BUILDING, self.max_attempts)).fetchall()
            for row_id, attempts in exhausted:
                tx.execute("UPDATE analysis_results SET objects_state = ?, objects_error = ? WHERE id = ?",
                           (ObjectsState.FAILED, interrupted_reason(attempts, "building the AI objects of this result"),
                            row_id))
            tx.execute("UPDATE analysis_results SET objects_state = ? WHERE objects_state = ?",
                       (ObjectsState.PENDING, ObjectsState.BUILDING))
        for row_id, attempts in exhausted:
            log.error("result %d: objects failed, interrupted %d times, not built again", row_id, attempts)

    def claim(self) -> Optional[dict[str, Any]]:
        now = utc_now()
        with self.db.atomic() as tx:
            row = tx.execute("SELECT id FROM analysis_results WHERE objects_state = ? AND objects_next_at <= ? "
                             "ORDER BY id LIMIT 1", (ObjectsState.PENDING, now)).fetchone()
            if row is None:
                return None
            # Counted before building: an attempt that kills the process is an attempt.
            tx.execute("UPDATE analysis_results SET objects_state = ?, objects_attempts = objects_attempts + 1 "
                       "WHERE id = ?", (ObjectsState.BUILDING, row[0]))
        return self.db.query("SELECT * FROM analysis_results WHERE id = ?", (row[0],))[0]

    def build_once(self) -> bool:
        """Build the objects of one pending result; False when none is pending."""
        row = self.claim()
        if row is None:
            return False
        try:
            sr_uid, sr_path, hm_uid, hm_path = self._build(row)
        except StaleResultError as exc:
            self._finish(row, ObjectsState.FAILED, error=str(exc))
        except TRANSIENT as exc:
            self._retry(row, f"{type(exc).__name__}: {exc}")
        except (KeyboardInterrupt, SystemExit):
            raise  # the process is stopping: the row stays 'building' and recovery re-queues it
        except BaseException as exc:  # noqa: BLE001 - whatever a builder raises ends this row
            log.error("result %d (%s): building its objects raised %s", row["id"], row["model_id"],
                      type(exc).__name__)
            self._finish(row, ObjectsState.FAILED, error=f"result objects cannot be built: {failure_reason(exc)}")
        else:
            self._finish(row, ObjectsState.DONE, sr_uid=sr_uid, sr_path=sr_path, hm_uid=hm_uid, hm_path=hm_path)
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
        result = AnalysisResult.from_record(row)
        if result.heatmap_evidence is not None:
            # The analysis' own activation map over the frame it analysed: no second inference.
            image = decode(data, frame=result.frame_index)
            result.heatmap = evidence_overlay(image, result.heatmap_evidence)
        model, version = result.model, result.model_version
        sr_uid = result_uid(sop, model, version, "sr", row["sha256"])
        sr = build_ai_sr(header, result, sop_instance_uid=sr_uid,
                         series_instance_uid=result_uid(study, model, version, "sr-series"))
        sr_path = str(self.store.store(write_part10(sr), source=Source.AI).path)
        hm_uid = hm_path = ""
        if result.heatmap is not None:
            hm_uid = result_uid(sop, model, version, "heatmap", row["sha256"])
            sc = build_heatmap_sc(header, result, sop_instance_uid=hm_uid,
                                  series_instance_uid=result_uid(study, model, version, "hm-series"))
            hm_path = str(self.store.store(write_part10(sc), source=Source.AI).path)
        return sr_uid, sr_path, hm_uid, hm_path

    def _finish(self, row: dict[str, Any], state: ObjectsState, *, error: str = "", sr_uid: str = "", sr_path: str = "",
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
            self._finish(row, ObjectsState.FAILED, error=error)
            log.error("result %d: objects failed after %d attempts: %s", row["id"], attempts, error)
            return
        delay = min(BACKOFF_CAP_S, 2 ** attempts)
        next_at = (datetime.now(timezone.utc) + timedelta(seconds=delay)).isoformat(timespec="milliseconds")
        log.warning("result %d: transient failure building objects (%s), retry in %ds", row["id"], error, delay)
        with self.db.atomic() as tx:
            tx.execute("UPDATE analysis_results SET objects_state = ?, objects_error = ?, objects_next_at = ? "
                       "WHERE id = ?", (ObjectsState.PENDING, error, next_at, row["id"]))
