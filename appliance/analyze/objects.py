"""Second stage of analysis: the AI's result as standard DICOM objects in the study.

Triage needs the probabilities within a second; a Comprehensive SR and a full-resolution
heatmap Secondary Capture take ten times longer to build and store.  So the worker commits the
result row first (``objects_state = 'pending'``) and builds the objects here when no analysis
job is waiting.  Building re-runs the same model version on the same image (deterministic: the
same findings) to get the heatmap overlay, stores the SR and SC through the durable store with
deterministic UIDs (a crash and re-run replaces, never duplicates), then records their paths.

Forwarding waits for a study's objects (see ``forward.outbox.claim_next``) so a hub receives
them with the images.
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
from ..errors import InferenceError, ManifestError, StoreError
from ..results import build_ai_sr, build_heatmap_sc, write_part10
from ..results.common import derived_uid
from ..store import InstanceStore, utc_now
from .runner import get_runner

log = logging.getLogger(__name__)

BACKOFF_CAP_S = 300


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
        with self.db.atomic() as tx:
            tx.execute("UPDATE analysis_results SET objects_state = 'pending' WHERE objects_state = 'building'")

    def claim(self) -> Optional[dict[str, Any]]:
        now = utc_now()
        with self.db.atomic() as tx:
            row = tx.execute("SELECT id FROM analysis_results WHERE objects_state = 'pending' AND objects_next_at <= ? "
                             "ORDER BY id LIMIT 1", (now,)).fetchone()
            if row is None:
                return None
            tx.execute("UPDATE analysis_results SET objects_state = 'building' WHERE id = ?", (row[0],))
        return self.db.query("SELECT * FROM analysis_results WHERE id = ?", (row[0],))[0]

    def build_once(self) -> bool:
        """Build the objects of one pending result; False when none is pending."""
        row = self.claim()
        if row is None:
            return False
        try:
            sr_uid, sr_path, hm_uid, hm_path = self._build(row)
        except (OSError, sqlite3.OperationalError, StoreError) as exc:
            self._retry(row, f"{type(exc).__name__}: {exc}")
        except (ManifestError, InferenceError, ValueError) as exc:
            self._finish(row, "failed", error=f"result objects cannot be built: {exc}")
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
        if error:
            log.error("result %d (%s): %s", row["id"], row["model_id"], error[:200])
        with self.db.atomic() as tx:
            tx.execute("UPDATE analysis_results SET objects_state = ?, objects_error = ?, sr_sop_instance_uid = ?, "
                       "sr_path = ?, heatmap_sop_instance_uid = ?, heatmap_path = ? WHERE id = ?",
                       (state, error, sr_uid, sr_path, hm_uid, hm_path, row["id"]))

    def _retry(self, row: dict[str, Any], error: str) -> None:
        attempts = row["objects_attempts"] + 1
        if attempts >= self.max_attempts:
            with self.db.atomic() as tx:
                tx.execute("UPDATE analysis_results SET objects_state = 'failed', objects_attempts = ?, "
                           "objects_error = ? WHERE id = ?", (attempts, error, row["id"]))
            log.error("result %d: objects failed after %d attempts: %s", row["id"], attempts, error)
            return
        delay = min(BACKOFF_CAP_S, 2 ** attempts)
        next_at = (datetime.now(timezone.utc) + timedelta(seconds=delay)).isoformat(timespec="milliseconds")
        log.warning("result %d: transient failure building objects (%s), retry in %ds", row["id"], error, delay)
        with self.db.atomic() as tx:
            tx.execute("UPDATE analysis_results SET objects_state = 'pending', objects_attempts = ?, objects_error = ?, "
                       "objects_next_at = ? WHERE id = ?", (attempts, error, next_at, row["id"]))
