"""The appliance database: SQLite in WAL mode through sqlite-utils, schema as numbered migrations.

Each thread gets its own connection (sqlite3 connections must not be shared between threads);
``Database.atomic()`` is the one way to run a transaction.
"""
from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import sqlite_utils

DB_FILENAME = "appliance.db"
BUSY_TIMEOUT_MS = 30_000


def _m001_ingest(db: sqlite_utils.Database) -> None:
    db.execute(
        """
        CREATE TABLE patients (
            id INTEGER PRIMARY KEY,
            patient_id TEXT NOT NULL,
            issuer TEXT NOT NULL DEFAULT '',
            name TEXT NOT NULL DEFAULT '',
            birth_date TEXT NOT NULL DEFAULT '',
            sex TEXT NOT NULL DEFAULT '',
            UNIQUE (patient_id, issuer)
        )"""
    )
    db.execute(
        """
        CREATE TABLE studies (
            study_uid TEXT PRIMARY KEY,
            patient_pk INTEGER NOT NULL REFERENCES patients(id),
            accession TEXT NOT NULL DEFAULT '',
            study_date TEXT NOT NULL DEFAULT '',
            study_time TEXT NOT NULL DEFAULT '',
            description TEXT NOT NULL DEFAULT '',
            state TEXT NOT NULL DEFAULT 'received',
            first_received_at TEXT NOT NULL,
            last_received_at TEXT NOT NULL
        )"""
    )
    db.execute(
        """
        CREATE TABLE series (
            series_uid TEXT PRIMARY KEY,
            study_uid TEXT NOT NULL REFERENCES studies(study_uid),
            modality TEXT NOT NULL DEFAULT '',
            body_part TEXT NOT NULL DEFAULT '',
            series_number TEXT NOT NULL DEFAULT '',
            description TEXT NOT NULL DEFAULT ''
        )"""
    )
    db.execute(
        """
        CREATE TABLE instances (
            sop_instance_uid TEXT PRIMARY KEY,
            series_uid TEXT NOT NULL REFERENCES series(series_uid),
            study_uid TEXT NOT NULL REFERENCES studies(study_uid),
            sop_class_uid TEXT NOT NULL,
            instance_number TEXT NOT NULL DEFAULT '',
            file_path TEXT NOT NULL,
            size INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            transfer_syntax TEXT NOT NULL,
            calling_ae TEXT NOT NULL DEFAULT '',
            source TEXT NOT NULL DEFAULT 'dicom',
            received_at TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'received'
        )"""
    )
    # Older versions of an instance replaced by a different one with the same SOP Instance UID.
    db.execute(
        """
        CREATE TABLE superseded_instances (
            id INTEGER PRIMARY KEY,
            sop_instance_uid TEXT NOT NULL,
            file_path TEXT NOT NULL,
            size INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            received_at TEXT NOT NULL,
            superseded_at TEXT NOT NULL,
            superseded_by_sha256 TEXT NOT NULL
        )"""
    )
    db.execute("CREATE INDEX idx_instances_series ON instances(series_uid)")
    db.execute("CREATE INDEX idx_instances_study ON instances(study_uid)")
    db.execute("CREATE INDEX idx_series_study ON series(study_uid)")
    db.execute(
        """
        CREATE TABLE audit_log (
            id INTEGER PRIMARY KEY,
            at TEXT NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            study_uid TEXT NOT NULL DEFAULT '',
            detail TEXT NOT NULL DEFAULT ''
        )"""
    )


def _m002_analysis(db: sqlite_utils.Database) -> None:
    # One job per stored image; the worker routes it to the models that apply.
    db.execute(
        """
        CREATE TABLE analysis_jobs (
            id INTEGER PRIMARY KEY,
            sop_instance_uid TEXT NOT NULL REFERENCES instances(sop_instance_uid),
            study_uid TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'pending',
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at TEXT NOT NULL DEFAULT '',
            last_error TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )"""
    )
    db.execute("CREATE INDEX idx_jobs_state ON analysis_jobs(state, next_attempt_at)")
    db.execute("CREATE INDEX idx_jobs_study ON analysis_jobs(study_uid)")
    # Exactly one result per image, model and model version (a newer version adds a row).
    db.execute(
        """
        CREATE TABLE analysis_results (
            id INTEGER PRIMARY KEY,
            sop_instance_uid TEXT NOT NULL,
            study_uid TEXT NOT NULL,
            model_id TEXT NOT NULL,
            model_version TEXT NOT NULL,
            status TEXT NOT NULL,
            findings_json TEXT NOT NULL DEFAULT '[]',
            abstention_code TEXT NOT NULL DEFAULT '',
            abstention_reason TEXT NOT NULL DEFAULT '',
            error TEXT NOT NULL DEFAULT '',
            backend TEXT NOT NULL DEFAULT '',
            precision TEXT NOT NULL DEFAULT '',
            sr_sop_instance_uid TEXT NOT NULL DEFAULT '',
            sr_path TEXT NOT NULL DEFAULT '',
            heatmap_sop_instance_uid TEXT NOT NULL DEFAULT '',
            heatmap_path TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL,
            UNIQUE (sop_instance_uid, model_id, model_version)
        )"""
    )
    db.execute("CREATE INDEX idx_results_study ON analysis_results(study_uid)")
    # Events the UI can alert on (urgent results), in order.
    db.execute(
        """
        CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            at TEXT NOT NULL,
            kind TEXT NOT NULL,
            study_uid TEXT NOT NULL DEFAULT '',
            detail TEXT NOT NULL DEFAULT ''
        )"""
    )
    db.execute("ALTER TABLE studies ADD COLUMN priority TEXT NOT NULL DEFAULT 'not_analyzed'")
    db.execute("ALTER TABLE studies ADD COLUMN priority_rank INTEGER NOT NULL DEFAULT 3")
    db.execute("ALTER TABLE studies ADD COLUMN score REAL NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE studies ADD COLUMN settled_at TEXT NOT NULL DEFAULT ''")
    db.execute("CREATE INDEX idx_studies_worklist ON studies(priority_rank, score DESC, first_received_at)")


def _m003_ui(db: sqlite_utils.Database) -> None:
    # Web UI accounts.  session_version invalidates every open session of a user when the
    # password is reset, the role changes or the account is disabled.
    db.execute(
        """
        CREATE TABLE users (
            id INTEGER PRIMARY KEY,
            username TEXT NOT NULL UNIQUE COLLATE NOCASE,
            role TEXT NOT NULL,
            password_hash TEXT NOT NULL,
            pin_hash TEXT NOT NULL DEFAULT '',
            language TEXT NOT NULL DEFAULT 'en',
            disabled INTEGER NOT NULL DEFAULT 0,
            failed_logins INTEGER NOT NULL DEFAULT 0,
            locked_until TEXT NOT NULL DEFAULT '',
            session_version INTEGER NOT NULL DEFAULT 1,
            alert_ack_event_id INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL,
            last_login_at TEXT NOT NULL DEFAULT ''
        )"""
    )
    # A clinician's review of a study: one verdict per AI finding plus a free-text note.
    db.execute(
        """
        CREATE TABLE reviews (
            id INTEGER PRIMARY KEY,
            study_uid TEXT NOT NULL REFERENCES studies(study_uid),
            username TEXT NOT NULL,
            at TEXT NOT NULL,
            verdicts_json TEXT NOT NULL DEFAULT '{}',
            note TEXT NOT NULL DEFAULT ''
        )"""
    )
    # Requests to send a study to a destination; the outbox (forwarding issue) consumes them.
    db.execute(
        """
        CREATE TABLE forward_requests (
            id INTEGER PRIMARY KEY,
            study_uid TEXT NOT NULL REFERENCES studies(study_uid),
            destination TEXT NOT NULL,
            priority TEXT NOT NULL DEFAULT 'routine',
            state TEXT NOT NULL DEFAULT 'requested',
            requested_by TEXT NOT NULL,
            requested_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )"""
    )
    db.execute("CREATE INDEX idx_reviews_study ON reviews(study_uid)")
    db.execute("CREATE INDEX idx_forward_study ON forward_requests(study_uid)")
    db.execute("CREATE INDEX idx_forward_state ON forward_requests(state)")
    db.execute("CREATE INDEX idx_audit_study ON audit_log(study_uid)")
    db.execute("CREATE INDEX idx_audit_actor ON audit_log(actor)")


def _m004_outbox(db: sqlite_utils.Database) -> None:
    # One item per (study, destination) send; only one active item per pair (the partial unique
    # index), so a repeated request is idempotent.  priority_rank: 0 urgent, 1 routine.
    db.execute(
        """
        CREATE TABLE outbox_items (
            id INTEGER PRIMARY KEY,
            study_uid TEXT NOT NULL REFERENCES studies(study_uid),
            destination TEXT NOT NULL,
            priority TEXT NOT NULL DEFAULT 'routine',
            priority_rank INTEGER NOT NULL DEFAULT 1,
            state TEXT NOT NULL DEFAULT 'queued',
            requested_by TEXT NOT NULL,
            origin TEXT NOT NULL DEFAULT 'manual',
            remote_study_uid TEXT NOT NULL DEFAULT '',
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at TEXT NOT NULL DEFAULT '',
            last_error TEXT NOT NULL DEFAULT '',
            reason TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            confirmed_at TEXT NOT NULL DEFAULT ''
        )"""
    )
    db.execute("CREATE UNIQUE INDEX idx_outbox_active ON outbox_items(study_uid, destination) "
               "WHERE state IN ('queued', 'sending', 'delivered')")
    db.execute("CREATE INDEX idx_outbox_state ON outbox_items(state, priority_rank, id)")
    db.execute("CREATE INDEX idx_outbox_study ON outbox_items(study_uid)")
    # Per-instance progress: pending -> sent (peer acknowledged) -> confirmed (peer lists it);
    # refused (the peer said no) or blocked (policy on the box said no) are final.
    db.execute(
        """
        CREATE TABLE outbox_instances (
            item_id INTEGER NOT NULL REFERENCES outbox_items(id),
            sop_instance_uid TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'pending',
            remote_sop_instance_uid TEXT NOT NULL DEFAULT '',
            bytes_original INTEGER NOT NULL DEFAULT 0,
            bytes_sent INTEGER NOT NULL DEFAULT 0,
            transfer_syntax_sent TEXT NOT NULL DEFAULT '',
            reason TEXT NOT NULL DEFAULT '',
            updated_at TEXT NOT NULL,
            PRIMARY KEY (item_id, sop_instance_uid)
        )"""
    )
    db.execute(
        """
        CREATE TABLE destination_state (
            name TEXT PRIMARY KEY,
            failures INTEGER NOT NULL DEFAULT 0,
            next_attempt_at TEXT NOT NULL DEFAULT '',
            last_error TEXT NOT NULL DEFAULT '',
            last_attempt_at TEXT NOT NULL DEFAULT '',
            last_success_at TEXT NOT NULL DEFAULT '',
            last_report_poll_at TEXT NOT NULL DEFAULT ''
        )"""
    )
    # The re-identification map (never leaves the box): kind 'uid' or 'patient'.
    db.execute(
        """
        CREATE TABLE deid_map (
            kind TEXT NOT NULL,
            original TEXT NOT NULL,
            replacement TEXT NOT NULL,
            created_at TEXT NOT NULL,
            PRIMARY KEY (kind, original)
        )"""
    )
    db.execute("CREATE INDEX idx_deid_replacement ON deid_map(kind, replacement)")
    db.execute("CREATE TABLE deid_secret (id INTEGER PRIMARY KEY CHECK (id = 1), secret TEXT NOT NULL)")
    # Reports that came back from a destination, mapped into the original study.
    db.execute(
        """
        CREATE TABLE forward_reports (
            sop_instance_uid TEXT PRIMARY KEY,
            study_uid TEXT NOT NULL,
            destination TEXT NOT NULL,
            sop_class_uid TEXT NOT NULL,
            received_via TEXT NOT NULL,
            text TEXT NOT NULL DEFAULT '',
            received_at TEXT NOT NULL
        )"""
    )
    db.execute("CREATE INDEX idx_reports_study ON forward_reports(study_uid)")


def _m005_result_objects(db: sqlite_utils.Database) -> None:
    # The AI's DICOM objects (SR, heatmap SC) are built after the result is committed, so
    # triage does not wait for them: 'pending' -> 'building' -> 'done' | 'failed'; 'none' for
    # results that get no objects (router abstentions, failures).
    db.execute("ALTER TABLE analysis_results ADD COLUMN objects_state TEXT NOT NULL DEFAULT 'done'")
    db.execute("ALTER TABLE analysis_results ADD COLUMN objects_attempts INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE analysis_results ADD COLUMN objects_next_at TEXT NOT NULL DEFAULT ''")
    db.execute("ALTER TABLE analysis_results ADD COLUMN objects_error TEXT NOT NULL DEFAULT ''")
    db.execute("CREATE INDEX idx_results_objects ON analysis_results(objects_state, objects_next_at)")


def _m006_web_sessions(db: sqlite_utils.Database) -> None:
    # Server-side web sessions: the cookie carries a random id whose sha256 is the key here, so
    # signing out (deleting the row) ends that one session for good, even for a copied cookie.
    db.execute(
        """
        CREATE TABLE web_sessions (
            id TEXT PRIMARY KEY,
            user_id INTEGER NOT NULL REFERENCES users(id),
            created_at REAL NOT NULL
        )"""
    )
    db.execute("CREATE INDEX idx_web_sessions_user ON web_sessions(user_id)")
    # Sign-in throttling (appliance.login_throttle): failure counters keyed by client address, user
    # name (known or not, so they behave alike), client and user name, PIN user name; and the
    # per-client attempt rate.  Epoch seconds.
    db.execute(
        """
        CREATE TABLE login_throttle (
            key TEXT PRIMARY KEY,
            failures INTEGER NOT NULL DEFAULT 0,
            first_at REAL NOT NULL DEFAULT 0,
            last_at REAL NOT NULL DEFAULT 0
        )"""
    )
    db.execute("CREATE INDEX idx_login_throttle_last ON login_throttle(last_at)")


def _m007_database_identity(db: sqlite_utils.Database) -> None:
    # A random id for this database file, also recorded outside it (appliance.dbguard), so the
    # box can tell its own database (or a backup of it) from an empty one created after the
    # real one was lost.
    db.execute("CREATE TABLE database_identity (id INTEGER PRIMARY KEY CHECK (id = 1), "
               "database_id TEXT NOT NULL, created_at TEXT NOT NULL)")
    db.execute("INSERT INTO database_identity (id, database_id, created_at) VALUES (1, ?, ?)",
               (uuid.uuid4().hex, datetime.now(timezone.utc).isoformat(timespec="seconds")))


def _m008_results_belong_to_bytes(db: sqlite_utils.Database) -> None:
    # A result belongs to the bytes it was computed on: the sha256 of the instance file the model
    # read.  A job records the sha256 it was queued for (or found current at its claim).
    db.execute("ALTER TABLE analysis_results ADD COLUMN sha256 TEXT NOT NULL DEFAULT ''")
    db.execute("ALTER TABLE analysis_jobs ADD COLUMN sha256 TEXT NOT NULL DEFAULT ''")
    # Results computed before this column existed were on the bytes stored then: the current ones.
    db.execute("UPDATE analysis_results SET sha256 = COALESCE((SELECT i.sha256 FROM instances i "
               "WHERE i.sop_instance_uid = analysis_results.sop_instance_uid), '')")
    # Results of bytes since replaced, kept for audit (appliance.analyze.supersede.supersede_stale):
    # the row as it was in analysis_results (result_id: its id there), plus when and by which
    # bytes it was superseded.  analysis_results keeps only the current results.
    db.execute(
        """
        CREATE TABLE superseded_results (
            id INTEGER PRIMARY KEY,
            result_id INTEGER NOT NULL,
            sop_instance_uid TEXT NOT NULL,
            study_uid TEXT NOT NULL,
            model_id TEXT NOT NULL,
            model_version TEXT NOT NULL,
            status TEXT NOT NULL,
            findings_json TEXT NOT NULL DEFAULT '[]',
            abstention_code TEXT NOT NULL DEFAULT '',
            abstention_reason TEXT NOT NULL DEFAULT '',
            error TEXT NOT NULL DEFAULT '',
            backend TEXT NOT NULL DEFAULT '',
            precision TEXT NOT NULL DEFAULT '',
            sr_sop_instance_uid TEXT NOT NULL DEFAULT '',
            sr_path TEXT NOT NULL DEFAULT '',
            heatmap_sop_instance_uid TEXT NOT NULL DEFAULT '',
            heatmap_path TEXT NOT NULL DEFAULT '',
            objects_state TEXT NOT NULL DEFAULT '',
            objects_error TEXT NOT NULL DEFAULT '',
            sha256 TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL,
            superseded_at TEXT NOT NULL,
            superseded_by_sha256 TEXT NOT NULL
        )"""
    )
    db.execute("CREATE INDEX idx_superseded_results_study ON superseded_results(study_uid)")
    db.execute("CREATE INDEX idx_superseded_results_sop ON superseded_results(sop_instance_uid)")


def _m009_result_monitoring(db: sqlite_utils.Database) -> None:
    # What a site-QA monitor reads per result (appliance.analyze.result): the OOD distance (NULL:
    # the model has no OOD statistics, or the image was not inferred), the 0-based index of the
    # frame analysed (NULL: none was decoded) and the acquisition fingerprint (JSON object).
    for table in ("analysis_results", "superseded_results"):
        db.execute(f"ALTER TABLE {table} ADD COLUMN ood_distance REAL")
        db.execute(f"ALTER TABLE {table} ADD COLUMN frame_index INTEGER")
        db.execute(f"ALTER TABLE {table} ADD COLUMN fingerprint_json TEXT NOT NULL DEFAULT '{{}}'")
    # What the results stage builds the SR and heatmap SC from without running the model again:
    # the model's disclaimer and the heatmap evidence of its one run ('' when it made none).
    db.execute("ALTER TABLE analysis_results ADD COLUMN disclaimer TEXT NOT NULL DEFAULT ''")
    db.execute("ALTER TABLE analysis_results ADD COLUMN heatmap_json TEXT NOT NULL DEFAULT ''")
    # What the staff must read with a result (JSON list of text), e.g. that the image was analysed
    # although the patient's age is unknown (a manifest's declared unknown_age = "analyse").
    for table in ("analysis_results", "superseded_results"):
        db.execute(f"ALTER TABLE {table} ADD COLUMN notes_json TEXT NOT NULL DEFAULT '[]'")


# Numbered migrations: index i + 1 is the schema version after running MIGRATIONS[i].
# Never edit a shipped migration; append a new one.
MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    _m001_ingest,
    _m002_analysis,
    _m003_ui,
    _m004_outbox,
    _m005_result_objects,
    _m006_web_sessions,
    _m007_database_identity,
    _m008_results_belong_to_bytes,
    _m009_result_monitoring,
]


class Database:
    """Per-thread sqlite-utils connections to one database file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._lock_fd: int | None = None
        # Called after every commit, still under the write lock; set by appliance.dbguard while
        # it waits to record that the box has users and instances.  Must not raise.
        self.on_commit: Callable[[], None] | None = None
        # appliance.dbguard's shared lock on the data directory's database, held while open.
        self.in_use_lock: IO[bytes] | None = None

    @property
    def db(self) -> sqlite_utils.Database:
        db = getattr(self._local, "db", None)
        if db is None:
            conn = sqlite3.connect(
                str(self.path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk when it returns (the C-STORE success depends on it).
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            db = sqlite_utils.Database(conn)
            self._local.db = db
        return db

    @contextmanager
    def atomic(self) -> Iterator[sqlite_utils.Database]:
        """One write transaction (BEGIN IMMEDIATE takes the write lock up front, avoiding
        upgrade deadlocks between threads).

        Writers first queue on a thread lock and an flock on ``<db>.writelock``: several
        processes may write (`appliance serve` and an `appliance import` or `analyze` run beside
        it), and SQLite's own busy handler waits by sleeping up to 100 ms at a time, while a
        blocked flock wakes the moment the holder commits.
        """
        db = self.db
        with self.write_lock():
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            if self.on_commit is not None:
                self.on_commit()

    @contextmanager
    def write_lock(self) -> Iterator[None]:
        """The writers' lock of :meth:`atomic` (thread lock, then the cross-process flock),
        without a transaction: for files that must change in step with the database."""
        with self._write_lock:
            if self._lock_fd is None:
                self._lock_fd = os.open(f"{self.path}.writelock", os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def query(self, sql: str, params: tuple[object, ...] | dict[str, object] = ()) -> list[dict[str, Any]]:
        return list(self.db.query(sql, params))

    def migrate(self) -> int:
        """Bring the schema up to date; returns the resulting version."""
        db = self.db
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        for number, migration in enumerate(MIGRATIONS[version:], start=version + 1):
            with self.atomic() as tx:
                migration(tx)
                tx.execute(f"PRAGMA user_version={number}")
            version = number
        return version

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.conn.close()
            self._local.db = None


def open_database(data_dir: Path, check_integrity: bool = False) -> Database:
    """Open (creating it on a new box) and migrate the database under ``data_dir``.

    Refuses, with :class:`~appliance.dbguard.DatabaseUnusableError`, a database that is
    missing, empty, damaged or not this box's (see :mod:`appliance.dbguard`);
    ``check_integrity`` adds ``PRAGMA quick_check`` (a full read: `appliance serve` runs it).
    """
    from .dbguard import open_guarded  # dbguard builds on this module

    return open_guarded(Path(data_dir), check_integrity=check_integrity)
