"""The durable analysis queue and its workers.

Every stored clinic image gets a row in ``analysis_jobs`` in the same transaction as its
instance row (see ``index.index_instance``).  Workers claim jobs, route each image to the models whose
manifest applies to its modality, run gate -> preprocess -> infer -> postprocess, and commit the result rows,
the job state and the study's triage in one transaction.  Each model runs once per image; its
result row records everything the results stage (``appliance.results.worker``) needs to write
the SR and heatmap SC later (``AnalysisResult.record``), and what a site-QA monitor reads per
result (OOD distance, frame analysed, acquisition fingerprint).  This module knows nothing of
the results stage; ``appliance.pipeline`` runs both.

Exactly once: result rows are unique per (image, model, model version), so a crash anywhere
re-runs the job without duplicating anything.

Results belong to the bytes: a job hashes the bytes it analyses and its results carry that
sha256.  At the commit the image's current sha256 is checked again: if the image was replaced
meanwhile, nothing is recorded and the job runs again on the new bytes.  Results on older bytes
are superseded (``supersede.supersede_stale``) as soon as a replacement is seen (the store records
each one in ``superseded_instances``), at the commit of the new result, and at start-up.
Transient failures (I/O, a busy database, a full disk) retry with capped exponential backoff;
permanent ones (a model that cannot load, pixels that cannot be decoded) become a visible
"failed" result for that image and model and never block other jobs.

Every job ends ``done`` or ``failed`` with a reason, whatever the image makes a library raise: a
model that raises on an image fails that model's result, anything else fails the job.  An attempt
is counted when the job is claimed, before it runs, so an image that takes the whole process down
(a segfault in a decoder, the OOM killer) is counted too: after ``analyze.max_attempts`` the
start-up recovery fails it instead of running the same crash again.
"""
from __future__ import annotations

import io
import json
import os
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import pydicom
import pydicom.errors

from .. import triage
from ..background import BackgroundService
from ..config import Config
from ..db import Database
from ..errors import InferenceError, ManifestError, StoreError
from ..lifecycle import JOB_OUTSTANDING, InstanceState, JobState, ObjectsState, ResultStatus, clinical_sql, marks, words
from ..store import InstanceStore, utc_now
from .manifest import Manifest, discover_models, load_manifest
from .result import AnalysisResult, acquisition_fingerprint
from .runner import failure_reason, get_runner, interrupted_reason
from .supersede import read_instance, recover_superseded, remove_superseded_files, supersede_stale

log = logging.getLogger(__name__)

ROUTER = "router"  # pseudo-model recording "no installed model applies"
BACKOFF_CAP_S = 300
# Conditions that pass (I/O, a busy database, a full disk): retried with backoff, not failed.
TRANSIENT = (OSError, sqlite3.OperationalError, StoreError)


@dataclass
class Route:
    model_id: str
    version: str
    manifest: Optional[Manifest]
    error: str = ""


def _ts(dt: datetime) -> str:
    return dt.isoformat(timespec="milliseconds")


# SQL for "an analysis job not finished yet" (bind OUTSTANDING after the other parameters).
OUTSTANDING = words(JOB_OUTSTANDING)
OUTSTANDING_IN = f"IN ({marks(OUTSTANDING)})"


def _instance_state(statuses: set[str]) -> InstanceState:
    """An image's state from its results' statuses: one analysis is enough to be analyzed."""
    if ResultStatus.ANALYZED in statuses:
        return InstanceState.ANALYZED
    return InstanceState.FAILED if ResultStatus.FAILED in statuses else InstanceState.ABSTAINED


class ModelCatalog:
    """The installed packages, verified once and re-verified only when their files change.

    Verifying hashes every model file; doing it per image would cost more than the inference.
    Even the look at the files (a stat of each) is made at most every ``RECHECK_S``: a package
    installed or changed is used from the next image after that.
    """

    RECHECK_S = 1.0

    def __init__(self, engines_dir: Path):
        self.engines_dir = engines_dir
        self._lock = threading.Lock()
        self._signature: Optional[tuple[tuple[str, int, int], ...]] = None
        self._checked_at = 0.0
        self._found: dict[str, Manifest | ManifestError] = {}

    def _current_signature(self) -> tuple[tuple[str, int, int], ...]:
        if not self.engines_dir.is_dir():
            return ()
        return tuple(sorted((str(p), st.st_mtime_ns, st.st_size) for p in self.engines_dir.glob("*/*")
                            if p.is_file() for st in [p.stat()]))

    def packages(self) -> dict[str, Manifest | ManifestError]:
        with self._lock:
            now = time.monotonic()
            if self._signature is not None and now - self._checked_at < self.RECHECK_S:
                return self._found
            signature = self._current_signature()
            if signature != self._signature:
                self._found = discover_models(self.engines_dir)
                self._signature = signature
            self._checked_at = now
            return self._found


def route(ds: pydicom.Dataset, catalog: ModelCatalog) -> list[Route]:
    """The installed models whose applicability lists this image's modality (or any modality).

    A package that fails verification is still routed by its (unverified) applicability, so its
    cases are visibly marked failed instead of silently skipped.
    """
    modality = str(ds.get("Modality", "") or "").strip().upper()
    engines_dir = catalog.engines_dir
    routes = []
    for model_id, found in catalog.packages().items():
        if isinstance(found, ManifestError):
            try:
                loose = load_manifest(engines_dir / model_id, verify=False)
            except ManifestError:
                continue  # unreadable manifest: no applicability to route by
            if not loose.applicability.modalities or modality in loose.applicability.modalities:
                routes.append(Route(model_id, loose.version, None, f"model package refused: {found}"))
            continue
        if not found.applicability.modalities or modality in found.applicability.modalities:
            routes.append(Route(model_id, found.version, found))
    return routes


def prepare_worker_thread(database: Database) -> None:
    """For a background thread of the pipeline (analysis, result objects): a lower priority and
    commits that do not wait for the disk.

    Nice (Linux: per-thread priority) so ingest and the UI stay responsive.  synchronous=NORMAL
    on this thread's connection: every write here is redone after a power cut (a lost claim
    leaves the work pending, a lost result re-runs it with the same deterministic outcome), and
    the next synchronous commit of the store flushes these WAL frames too.  Ingest's commits stay
    synchronous=FULL.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # not Linux, or not permitted: run at normal priority
        pass
    database.db.execute("PRAGMA synchronous=NORMAL")


class IngestDeferral:
    """Receiving has priority (an association waiting on us keeps a modality waiting): a
    background thread gives way while images arrive, but never for longer than ``max_defer_s``
    at a time.  One per thread."""

    def __init__(self, ingest_busy: Callable[[], bool], max_defer_s: float) -> None:
        self.ingest_busy = ingest_busy
        self.max_defer_s = max_defer_s
        self._since: Optional[float] = None

    def waiting(self) -> bool:
        """True while the thread should wait for ingest (then call again shortly)."""
        if not self.ingest_busy():
            self._since = None
            return False
        self._since = self._since or time.monotonic()
        return time.monotonic() - self._since < self.max_defer_s


class AnalysisWorker(BackgroundService):
    """Worker threads over the ``analysis_jobs`` table."""

    def __init__(self, config: Config, database: Database, store: InstanceStore,
                 ingest_busy: Optional[Callable[[], bool]] = None):
        super().__init__()
        self.config = config
        self.db = database
        self.store = store
        self.catalog = ModelCatalog(Path(config.analyze.engines_dir))
        self.ingest_busy = ingest_busy or (lambda: False)
        self.max_defer_s = float(config.analyze.defer_while_receiving_s)
        self._last_settle = 0.0
        self.max_attempts = int(config.analyze.max_attempts)
        self.quiet_s = int(config.analyze.study_quiet_s)
        self._replacements_seen = 0  # superseded_instances.id up to which results were checked
        self._replacements_lock = threading.Lock()
        self._warm_up_lock = threading.Lock()
        self._warmed_up = False

    # -- lifecycle ---------------------------------------------------------------------------
    def recover(self) -> int:
        """Jobs left 'running' by a crash go back to 'pending', unless they have had their
        ``max_attempts``: those are failed (every one of their attempts ended the process)."""
        now = utc_now()
        with self.db.atomic() as tx:
            exhausted = tx.execute("SELECT id, sop_instance_uid, study_uid, attempts FROM analysis_jobs "
                                   "WHERE state = ? AND attempts >= ?", (JobState.RUNNING, self.max_attempts)).fetchall()
            for job_id, sop, study, attempts in exhausted:
                self._mark_failed(tx, job_id, sop, study, interrupted_reason(attempts, "analysing this image"), now)
            cur = tx.execute("UPDATE analysis_jobs SET state = ? WHERE state = ?", (JobState.PENDING, JobState.RUNNING))
        for job_id, _, _, attempts in exhausted:
            log.error("analysis job %d failed: interrupted %d times, not run again", job_id, attempts)
        return cur.rowcount

    def start(self) -> None:
        recovered = self.recover()
        self._replacements_seen = self._last_replacement()
        recover_superseded(self.db, self.store)
        if recovered:
            log.info("analysis: %d interrupted jobs re-queued", recovered)
        # Analysis threads never build result objects (the results stage's own thread does), so a
        # new image is never stuck behind a heatmap being rendered.
        for i in range(int(self.config.analyze.workers)):
            self._spawn(f"analysis-{i}", self._loop, self._analysis_step)

    def _analysis_step(self) -> bool:
        worked = self.run_once()
        if time.monotonic() - self._last_settle >= 1.0:  # a sweep a second is plenty
            self._last_settle = time.monotonic()
            self.settle_quiet_studies()
        return worked

    def warm_up(self) -> list[str]:
        """Load every installed, verified model now, so the first image does not wait for it
        (verifying and loading a package takes about a second).  Returns the models loaded; one
        that cannot load is left for its cases to record why."""
        loaded = []
        for model_id, found in self.catalog.packages().items():
            if isinstance(found, ManifestError):
                continue
            try:
                get_runner(model_id, self.config)
            except (ManifestError, InferenceError) as exc:
                log.error("model %s cannot be loaded: %s", model_id, exc)
                continue
            loaded.append(model_id)
        return loaded

    def _loop(self, step: Callable[[], bool]) -> None:
        prepare_worker_thread(self.db)
        with self._warm_up_lock:  # the first thread loads the models; the others wait for it
            if not self._warmed_up:
                try:
                    log.info("analysis: models loaded: %s", ", ".join(self.warm_up()) or "none")
                except Exception:  # noqa: BLE001 - a worker thread must survive anything
                    log.exception("loading the models at start-up failed; they load with the first image")
                self._warmed_up = True
        deferral = IngestDeferral(self.ingest_busy, self.max_defer_s)
        while not self._stop.is_set():
            # Before deferring to ingest: a replaced image must not show its old result meanwhile.
            try:
                self.supersede_replaced()
            except Exception:  # noqa: BLE001 - a worker thread must survive anything
                log.exception("superseding results of replaced images failed")
            if deferral.waiting():
                self._stop.wait(0.05)
                continue
            try:
                worked = step()
            except Exception:  # noqa: BLE001 - a worker thread must survive anything
                log.exception("analysis worker error")
                worked = False
            if not worked:
                self._wake.wait(0.5)
                self._wake.clear()

    # -- replaced images ---------------------------------------------------------------
    def _last_replacement(self) -> int:
        return int(self.db.query("SELECT COALESCE(MAX(id), 0) AS n FROM superseded_instances")[0]["n"])

    def supersede_replaced(self) -> int:
        """Supersede the results of images replaced since the last look (cheap when none was:
        one look at ``superseded_instances``' newest id).  Returns the images looked at."""
        newest = self._last_replacement()
        if newest <= self._replacements_seen:
            return 0
        with self._replacements_lock:
            seen = self._replacements_seen
            if newest <= seen:
                return 0
            sops = [r["sop_instance_uid"] for r in self.db.query(
                "SELECT DISTINCT sop_instance_uid FROM superseded_instances WHERE id > ? AND id <= ?", (seen, newest))]
            files = []
            with self.db.atomic() as tx:
                now = utc_now()
                for sop in sops:
                    files += supersede_stale(tx, self.store, sop, now)
            remove_superseded_files(files)
            self._replacements_seen = newest
            return len(sops)

    # -- queue ---------------------------------------------------------------------------
    def claim(self, study_uid: Optional[str] = None) -> Optional[dict[str, Any]]:
        now = utc_now()
        where = "state = ? AND next_attempt_at <= ?"
        params: list[Any] = [JobState.PENDING, now]
        if study_uid:
            where += " AND study_uid = ?"
            params.append(study_uid)
        with self.db.atomic() as tx:
            row = tx.execute(f"SELECT id FROM analysis_jobs WHERE {where} ORDER BY id LIMIT 1", params).fetchone()
            if row is None:
                return None
            # Counted before the job runs: an attempt that kills the process is an attempt.  A job
            # queued without a sha256 (by the store) is for the bytes current at its claim.
            tx.execute("UPDATE analysis_jobs SET state = ?, attempts = attempts + 1, updated_at = ?, "
                       "sha256 = CASE WHEN sha256 != '' THEN sha256 ELSE COALESCE((SELECT i.sha256 FROM instances i "
                       "WHERE i.sop_instance_uid = analysis_jobs.sop_instance_uid), '') END WHERE id = ?",
                       (JobState.RUNNING, now, row[0]))
        return self.db.query("SELECT * FROM analysis_jobs WHERE id = ?", (row[0],))[0]

    def run_once(self, study_uid: Optional[str] = None) -> bool:
        """Claim and process one analysis job; False when there was nothing to do."""
        job = self.claim(study_uid)
        if job is None:
            return False
        try:
            self.process(job)
        except TRANSIENT as exc:
            self._retry(job, f"{type(exc).__name__}: {exc}")
        except (KeyboardInterrupt, SystemExit):
            raise  # the process is stopping: the job stays 'running' and recovery re-queues it
        except BaseException as exc:  # noqa: BLE001 - whatever an image raises ends its job
            self._fail(job, failure_reason(exc))
            log.error("analysis job %d failed: %s raised outside a model (reason recorded on the case)",
                      job["id"], type(exc).__name__)
        return True

    def run_until_idle(self, study_uid: Optional[str] = None, timeout_s: float = 600) -> None:
        """Run analysis jobs here until none is left (jobs another process runs, or that back
        off, are waited for)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.run_once(study_uid):
                continue
            scope, params = (" AND study_uid = ?", (study_uid,)) if study_uid else ("", ())
            if not self.db.query(f"SELECT 1 FROM analysis_jobs WHERE state {OUTSTANDING_IN}{scope} LIMIT 1",
                                 OUTSTANDING + params):
                return
            time.sleep(0.2)

    def _retry(self, job: dict[str, Any], error: str) -> None:
        attempts = job["attempts"]  # this attempt included (counted at the claim)
        now = datetime.now(timezone.utc)
        if attempts >= self.max_attempts:
            log.error("analysis job %d failed permanently after %d attempts: %s", job["id"], attempts, error)
            self._fail(job, error)
            return
        delay = min(BACKOFF_CAP_S, 2 ** attempts)
        log.warning("analysis job %d: transient failure (%s), retry in %ds", job["id"], error, delay)
        with self.db.atomic() as tx:
            tx.execute("UPDATE analysis_jobs SET state = ?, last_error = ?, next_attempt_at = ?, updated_at = ? "
                       "WHERE id = ?", (JobState.PENDING, error, _ts(now + timedelta(seconds=delay)), _ts(now), job["id"]))

    def _fail(self, job: dict[str, Any], reason: str) -> None:
        with self.db.atomic() as tx:
            self._mark_failed(tx, job["id"], job["sop_instance_uid"], job["study_uid"], reason, utc_now())

    @staticmethod
    def _mark_failed(tx: Any, job_id: int, sop: str, study: str, reason: str, now: str) -> None:
        """The job failed with ``reason``; the image and the study's triage say so."""
        cur = tx.execute("UPDATE analysis_jobs SET state = ?, last_error = ?, updated_at = ? "
                         "WHERE id = ? AND state = ?", (JobState.FAILED, reason, now, job_id, JobState.RUNNING))
        if not cur.rowcount:  # already settled (its results were committed): nothing failed
            return
        statuses = {r[0] for r in tx.execute("SELECT status FROM analysis_results WHERE sop_instance_uid = ?", (sop,))}
        tx.execute("UPDATE instances SET state = ? WHERE sop_instance_uid = ?",
                   (_instance_state(statuses | {ResultStatus.FAILED}), sop))
        triage.update_study(tx, study, now)

    # -- one job -------------------------------------------------------------------------
    def process(self, job: dict[str, Any]) -> None:
        sop = job["sop_instance_uid"]
        instance = self.db.query("SELECT file_path FROM instances WHERE sop_instance_uid = ?", (sop,))[0]
        data, sha = read_instance(Path(instance["file_path"]))
        job = {**job, "read_sha256": sha, "fingerprint": {}}
        rows: list[dict[str, Any]] = []
        source: pydicom.Dataset | bytes
        try:
            # Parsed once: the header routes, and the models decode their frames from this dataset.
            header = source = pydicom.dcmread(io.BytesIO(data))
        except (pydicom.errors.InvalidDicomError, ValueError, EOFError):
            try:  # the pixel data may be what is broken: then each model says so for its result
                header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
                source = data
            except (pydicom.errors.InvalidDicomError, ValueError, EOFError) as exc:
                rows.append(self._row(job, ROUTER, "1", ResultStatus.FAILED, error=f"stored file unreadable: {exc}"))
                self._commit(job, rows)
                return
        job["fingerprint"] = acquisition_fingerprint(header)
        routes = route(header, self.catalog)
        if not routes:
            modality = str(header.get("Modality", "") or "unknown")
            rows.append(self._row(job, ROUTER, "1", ResultStatus.ABSTAINED, code="NO_APPLICABLE_MODEL",
                                  reason=f"no installed model is made for {modality} images"))
        done = {(r["model_id"], r["model_version"]) for r in self.db.query(
            "SELECT model_id, model_version FROM analysis_results WHERE sop_instance_uid = ? AND sha256 = ?", (sop, sha))}
        for r in routes:
            if (r.model_id, r.version) in done:
                continue
            rows.append(self._analyze(job, source, r))
        self._commit(job, rows)

    def _analyze(self, job: dict[str, Any], source: pydicom.Dataset | bytes, r: Route) -> dict[str, Any]:
        if r.manifest is None:
            return self._row(job, r.model_id, r.version, ResultStatus.FAILED, error=r.error)
        try:
            runner = get_runner(r.model_id, self.config)
            # The overlay is drawn by the results stage, from the evidence this run records.
            result = runner.analyze(source, make_heatmap=False, fingerprint=job["fingerprint"])
        except (ManifestError, InferenceError) as exc:
            return self._row(job, r.model_id, r.version, ResultStatus.FAILED, error=f"model cannot run: {exc}")
        except (TRANSIENT + (KeyboardInterrupt, SystemExit)):
            raise
        except BaseException as exc:  # noqa: BLE001 - this model fails on this image; others still run
            log.error("analysis job %d: %s raised %s on this image (reason recorded on the case)",
                      job["id"], r.model_id, type(exc).__name__)
            return self._row(job, r.model_id, r.version, ResultStatus.FAILED,
                             error=f"analysis failed: {failure_reason(exc)}")
        if result.abstention is not None and result.abstention.code == "UNREADABLE_PIXELS" \
                and result.abstention.reason.startswith("cannot decode"):
            # Corrupt pixel data is a failure of this case, not a judgement about the image.
            return self._row(job, r.model_id, r.version, ResultStatus.FAILED, error=result.abstention.reason)
        return self._result_row(job, result)

    def _result_row(self, job: dict[str, Any], result: AnalysisResult) -> dict[str, Any]:
        row = self._row(job, result.model, result.model_version, result.status)
        fingerprint = row["fingerprint_json"]
        row.update(result.record())
        if not result.fingerprint:  # no header decoded: the one the job read
            row["fingerprint_json"] = fingerprint
        row["objects_state"] = ObjectsState.PENDING
        return row

    @staticmethod
    def _row(job: dict[str, Any], model_id: str, version: str, status: str, *, findings: Any = (), code: str = "",
             reason: str = "", error: str = "", backend: str = "", precision: str = "") -> dict[str, Any]:
        return {
            "sop_instance_uid": job["sop_instance_uid"], "study_uid": job["study_uid"], "model_id": model_id,
            "model_version": version, "status": status, "findings_json": json.dumps(list(findings)),
            "abstention_code": code, "abstention_reason": reason, "error": error, "backend": backend,
            "precision": precision, "objects_state": ObjectsState.NONE, "sha256": job["read_sha256"],
            "fingerprint_json": json.dumps(job["fingerprint"]), "created_at": utc_now(),
        }

    def _commit(self, job: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        """Results, job state, instance state and study triage: one transaction.

        Only if the image still has the bytes the job read; otherwise the job waits for another
        run on the new bytes (not counted as an attempt: nothing failed)."""
        now = utc_now()
        sop, sha = job["sop_instance_uid"], job["read_sha256"]
        with self.db.atomic() as tx:
            current = tx.execute("SELECT sha256 FROM instances WHERE sop_instance_uid = ?", (sop,)).fetchone()
            if current is None or current[0] != sha:
                tx.execute("UPDATE analysis_jobs SET state = ?, attempts = MAX(attempts - 1, 0), sha256 = ?, "
                           "updated_at = ? WHERE id = ?", (JobState.PENDING, current[0] if current else "", now, job["id"]))
                log.info("analysis %s: the image was replaced while analysed; analysing the new bytes", sop)
                return
            files = supersede_stale(tx, self.store, sop, now)
            for row in rows:
                tx.execute(
                    f"INSERT OR IGNORE INTO analysis_results ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                    tuple(row.values()),
                )
            statuses = {r[0] for r in tx.execute(
                "SELECT status FROM analysis_results WHERE sop_instance_uid = ?", (job["sop_instance_uid"],))}
            tx.execute("UPDATE analysis_jobs SET state = ?, sha256 = ?, updated_at = ? WHERE id = ?",
                       (JobState.DONE, sha, now, job["id"]))
            tx.execute("UPDATE instances SET state = ? WHERE sop_instance_uid = ?",
                       (_instance_state(statuses), job["sop_instance_uid"]))
            priority = triage.update_study(tx, job["study_uid"], now)
        remove_superseded_files(files)
        for row in rows:
            # An error's kind only (the words before its first colon are ours): the rest may quote
            # a library's message, and that may quote a patient's name.
            log.info("analysis %s: %s %s (%s)", row["sop_instance_uid"], row["model_id"], row["status"],
                     row["abstention_code"] or row["error"].split(":", 1)[0][:80] or "ok")
        if priority == "urgent":
            log.info("study %s is urgent", job["study_uid"])

    # -- study settling ------------------------------------------------------------------
    def settle_quiet_studies(self) -> int:
        """Mark studies settled once quiet for ``study_quiet_s`` with no outstanding jobs."""
        now = datetime.now(timezone.utc)
        cutoff = _ts(now - timedelta(seconds=self.quiet_s))
        with self.db.atomic() as tx:
            cur = tx.execute(
                "UPDATE studies SET settled_at = ? WHERE settled_at = '' AND last_received_at <= ? AND NOT EXISTS "
                f"(SELECT 1 FROM analysis_jobs j WHERE j.study_uid = studies.study_uid AND j.state {OUTSTANDING_IN})",
                (_ts(now), cutoff, *OUTSTANDING),
            )
            return cur.rowcount


def enqueue_study(database: Database, study_uid: str) -> int:
    """Queue every clinic image of a study for (re-)analysis; returns the number of jobs added.

    Models already run at their current version on the image's current bytes are skipped by the
    worker, so this adds results only for newer model versions (or models installed since),
    keeping the older results; results on bytes since replaced are superseded, as always.
    """
    now = utc_now()
    clinical, clinical_params = clinical_sql("i.source")
    with database.atomic() as tx:
        cur = tx.execute(
            "INSERT INTO analysis_jobs (sop_instance_uid, study_uid, state, sha256, created_at, updated_at) "
            "SELECT i.sop_instance_uid, i.study_uid, ?, i.sha256, ?, ? FROM instances i "
            f"WHERE i.study_uid = ? AND {clinical} AND i.sop_instance_uid IN "
            "(SELECT sop_instance_uid FROM analysis_jobs) AND NOT EXISTS (SELECT 1 FROM analysis_jobs j "
            f"WHERE j.sop_instance_uid = i.sop_instance_uid AND j.state {OUTSTANDING_IN})",
            (JobState.PENDING, now, now, study_uid, *clinical_params, *OUTSTANDING),
        )
        return cur.rowcount
