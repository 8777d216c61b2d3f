"""Durable instance storage: files under the data directory plus their rows in the database.

The guarantee: when :meth:`InstanceStore.store` returns, the file is fsynced under its final
name, its directory entries are fsynced, and its row is committed.  Only then may the caller
report success to the sender.  A crash at any earlier point leaves either nothing, a temp file
(removed by :meth:`recover`), or a complete file without a row (indexed by :meth:`recover`).

Staging: the temp file is written, fsynced and hashed in background threads while the caller
parses and checks the dataset (:meth:`InstanceStore.stage`, then :meth:`InstanceStore.commit`):
the parse holds the GIL, the write, fsync and hash do not, so they overlap.  A staged file that
is not committed (the dataset was rejected) is removed.

Group commit: each caller stages its own temp file in its own thread (associations run in
parallel), then hands it to one committer thread.  The committer takes
every hand-off waiting at that moment, renames them into place, makes each touched directory
durable once (an fsync each, or one ``syncfs`` when there are several) and commits all their
rows in one transaction, and only then releases the callers.  The
guarantee per instance is unchanged; the directory and database flushes are shared.

Layout under the data directory::

    instances/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    superseded/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.<UTC time>.dcm
    tmp/                      temp files, same filesystem, emptied at start-up

Duplicates: the same SOP Instance UID with identical bytes is a success that writes nothing.
With different bytes the newer copy replaces the older one, which is kept under ``superseded/``
and recorded in ``superseded_instances`` for audit.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import queue
import shutil
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import sqlite_utils
from pydicom.dataset import Dataset

from .db import Database
from .dicomfile import identify, parse_part10
from .errors import InvalidDatasetError, OutOfSpaceError, StoreError
from .index import AI_MANUFACTURER, index_instance
from .lifecycle import Source

__all__ = ["AI_MANUFACTURER", "InstanceStore", "StoreOutcome", "parse_part10", "utc_now"]

log = logging.getLogger(__name__)

INSTANCES_DIRNAME = "instances"  # under the data directory (see the layout above)

MIB = 1024 * 1024
MAX_BATCH = 64
# Free space is measured at most this often while it is well above the floor (statvfs costs a
# system call per C-STORE otherwise); bytes written since the measurement are subtracted.
SPACE_RECHECK_S = 1.0
SPACE_MARGIN = 1024 * MIB
STAGING_THREADS = 8
# Re-indexing commits this many files, or this many bytes of them held in memory, at a time.
RECOVER_BATCH = 256
RECOVER_BATCH_BYTES = 64 * MIB


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _syncfs_function() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syncfs
    except (OSError, AttributeError):
        return None


_SYNCFS = _syncfs_function()


def _sync_directories(data_dir: Path, directories: set[Path]) -> None:
    """Make the entries of ``directories`` durable.  One directory: fsync it.  Several (a new
    study adds its study and series directories): one ``syncfs`` of the data directory's file
    system, which flushes them all with a single device flush instead of one flush per fsync."""
    if len(directories) > 1 and _SYNCFS is not None:
        fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _SYNCFS(fd) == 0:
                return
        finally:
            os.close(fd)
    for directory in directories:
        fsync_dir(directory)


def _makedirs(path: Path, to_sync: set[Path]) -> None:
    """mkdir -p, recording each new directory's parent: its new entry must be fsynced."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            continue
        to_sync.add(directory.parent)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(MIB), b""):
                h.update(chunk)
    except FileNotFoundError:
        return ""
    return h.hexdigest()


@dataclass(frozen=True)
class StoreOutcome:
    """What :meth:`InstanceStore.store` did: ``stored``, ``duplicate`` or ``replaced``."""

    action: str
    sop_instance_uid: str
    study_uid: str
    path: Path


class Staged:
    """A byte string being written to a temp file and hashed (see :meth:`InstanceStore.stage`)."""

    def __init__(self, data: bytes, write: "Future[Path]", digest: "Future[str]"):
        self.data = data
        self._write = write
        self._digest = digest
        self.committed = False

    def result(self) -> tuple[Path, str]:
        """The fsynced temp file and the sha256; raises what writing raised."""
        return self._write.result(), self._digest.result()

    def discard(self) -> None:
        """Remove the temp file unless it was committed (waits for the write to finish)."""
        if self.committed:
            return
        try:
            tmp = self._write.result()
        except Exception:  # noqa: BLE001 - a failed write left nothing behind
            return
        tmp.unlink(missing_ok=True)


@dataclass
class _Pending:
    """One fsynced temp file waiting for the committer."""

    tmp: Path
    size: int
    sha: str
    ds: Dataset
    ids: dict[str, str]
    calling_ae: str
    source: str
    future: Future[StoreOutcome] = field(default_factory=Future)


class InstanceStore:
    """Stores DICOM instances durably and indexes them."""

    def __init__(self, data_dir: Path, database: Database, min_free_mb: int = 0):
        self.data_dir = Path(data_dir)
        self.db = database
        self.min_free_mb = min_free_mb
        self.instances_dir = self.data_dir / INSTANCES_DIRNAME
        self.superseded_dir = self.data_dir / "superseded"
        self.tmp_dir = self.data_dir / "tmp"
        for d in (self.instances_dir, self.superseded_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._queue: "queue.Queue[_Pending]" = queue.Queue()
        self._staging = ThreadPoolExecutor(STAGING_THREADS, thread_name_prefix="store-stage")
        self._space_lock = threading.Lock()
        self._space_checked = (-SPACE_RECHECK_S, 0)  # (monotonic time, free bytes then)
        self._written_since = 0
        self._committer: Optional[threading.Thread] = None
        self._committer_lock = threading.Lock()

    # -- space ---------------------------------------------------------------------------
    def check_space(self, incoming_bytes: int = 0) -> None:
        """Raise OutOfSpaceError if writing ``incoming_bytes`` would go below the floor."""
        floor = self.min_free_mb * MIB
        with self._space_lock:
            checked_at, free = self._space_checked
            estimate = free - self._written_since - incoming_bytes
            if time.monotonic() - checked_at > SPACE_RECHECK_S or estimate < floor + SPACE_MARGIN:
                free = shutil.disk_usage(self.data_dir).free
                self._space_checked = (time.monotonic(), free)
                self._written_since = 0
                estimate = free - incoming_bytes
            if estimate < floor:
                raise OutOfSpaceError(
                    f"free space {free // MIB} MiB minus {incoming_bytes} bytes is below the floor of {self.min_free_mb} MiB"
                )
            self._written_since += incoming_bytes

    # -- storing -------------------------------------------------------------------------
    def retire_instance(self, tx: sqlite_utils.Database, sop: str, now: str, source: str) -> Optional[tuple[Path, str]]:
        """Inside ``tx``: retire the current instance ``sop`` of ``source`` (the box's own AI
        object whose result was superseded).  Its file is hard-linked under ``superseded/``
        (durably, before the row goes) and its row moves to ``superseded_instances``.  Returns
        (current path, sha256) for the caller to remove after the commit; None if ``sop`` is not a
        current instance of ``source``."""
        row = tx.execute("SELECT study_uid, series_uid, file_path, size, sha256, received_at FROM instances "
                         "WHERE sop_instance_uid = ? AND source = ?", (sop, source)).fetchone()
        if row is None:
            return None
        study, series, path, size, sha, received_at = row
        keep = self.superseded_dir / study / series / f"{sop}.{sha[:16]}.dcm"
        keep.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, keep)
        except FileExistsError:  # an earlier, interrupted attempt linked the same bytes
            pass
        except FileNotFoundError:  # the file was lost: retire the row, record where it was
            keep = Path(path)
        else:
            fsync_dir(keep.parent)
        tx.execute("DELETE FROM instances WHERE sop_instance_uid = ?", (sop,))
        tx.execute("DELETE FROM series WHERE series_uid = ? AND NOT EXISTS "
                   "(SELECT 1 FROM instances WHERE series_uid = ?)", (series, series))
        if tx.execute("SELECT 1 FROM superseded_instances WHERE sop_instance_uid = ? AND sha256 = ?",
                      (sop, sha)).fetchone() is None:
            tx.execute("INSERT INTO superseded_instances (sop_instance_uid, file_path, size, sha256, received_at, "
                       "superseded_at, superseded_by_sha256) VALUES (?, ?, ?, ?, ?, ?, '')",
                       (sop, str(keep), size, sha, received_at, now))
        return Path(path), sha

    def final_path(self, ids: dict[str, str]) -> Path:
        return self.instances_dir / ids["StudyInstanceUID"] / ids["SeriesInstanceUID"] / f"{ids['SOPInstanceUID']}.dcm"

    def _write_temp(self, data: bytes) -> Path:
        tmp = self.tmp_dir / f"{uuid.uuid4().hex}.part"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno == 28:  # ENOSPC: the floor was not enough
                raise OutOfSpaceError(f"disk full while writing: {exc}") from exc
            raise StoreError(f"cannot write temp file: {exc}") from exc
        return tmp

    def stage(self, data: bytes) -> Staged:
        """Check space, then start writing ``data`` to an fsynced temp file and hashing it in the
        background.  Follow with :meth:`commit`; call ``discard()`` on the result in any case."""
        self.check_space(len(data))
        return Staged(data, self._staging.submit(self._write_temp, data), self._staging.submit(_sha256, data))

    def commit(self, staged: Staged, ds: Dataset, calling_ae: str = "", source: str = Source.DICOM) -> StoreOutcome:
        """Rename the staged file into place and index it; returns when both are durable."""
        ids = identify(ds)
        tmp, sha = staged.result()
        pending = _Pending(tmp, len(staged.data), sha, ds, ids, calling_ae, source)
        try:
            self._ensure_committer()
            self._queue.put(pending)
            return pending.future.result()
        finally:
            staged.committed = True
            tmp.unlink(missing_ok=True)  # still there only if the commit failed before the rename

    def store(self, data: bytes, calling_ae: str = "", source: str = Source.DICOM,
              ds: Dataset | None = None) -> StoreOutcome:
        """Store one Part 10 byte string exactly as given.  See the module docstring."""
        staged = self.stage(data)
        try:
            return self.commit(staged, parse_part10(data) if ds is None else ds, calling_ae, source)
        finally:
            staged.discard()

    def _ensure_committer(self) -> None:
        with self._committer_lock:
            if self._committer is None or not self._committer.is_alive():
                self._committer = threading.Thread(target=self._commit_loop, name="store-commit", daemon=True)
                self._committer.start()

    def _commit_loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._commit_batch(batch)
            except BaseException as exc:  # noqa: BLE001 - every waiting caller must get an answer
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc if isinstance(exc, StoreError) else StoreError(f"commit failed: {exc}"))

    def _commit_batch(self, batch: list[_Pending]) -> None:
        to_sync: set[Path] = set()
        placed: list[tuple[_Pending, Path, str, Optional[dict[str, Any]]]] = []
        in_batch: dict[str, dict[str, Any]] = {}  # rows this batch already placed, by SOP UID
        now = utc_now()
        for p in batch:
            try:
                result = self._place(p, in_batch, to_sync, now)
            except (OSError, StoreError) as exc:
                p.future.set_exception(exc if isinstance(exc, StoreError) else StoreError(f"cannot store: {exc}"))
                continue
            if isinstance(result, StoreOutcome):
                p.future.set_result(result)
            else:
                placed.append((p, *result))
        if not placed:
            return
        _sync_directories(self.data_dir, to_sync)
        with self.db.atomic() as tx:
            for p, final, action, superseded_row in placed:
                index_instance(tx, p.ds, p.ids, final, p.size, p.sha, p.calling_ae, p.source, now)
                if superseded_row:
                    tx.table("superseded_instances").insert(superseded_row)
        for p, final, action, _ in placed:
            p.future.set_result(StoreOutcome(action, p.ids["SOPInstanceUID"], p.ids["StudyInstanceUID"], final))

    def _place(self, p: _Pending, in_batch: dict[str, dict[str, Any]], to_sync: set[Path],
               now: str) -> StoreOutcome | tuple[Path, str, Optional[dict[str, Any]]]:
        """Rename one temp file into place (or decide it is a duplicate); no fsync, no commit."""
        sop = p.ids["SOPInstanceUID"]
        final = self.final_path(p.ids)
        existing = in_batch.get(sop)
        if existing is None:
            rows = self.db.query("SELECT * FROM instances WHERE sop_instance_uid = ?", (sop,))
            existing = rows[0] if rows else None
        if existing and existing["sha256"] == p.sha:
            return StoreOutcome("duplicate", sop, existing["study_uid"], Path(existing["file_path"]))
        superseded_row = None
        if existing:
            old_path = Path(existing["file_path"])
            if _sha256_file(old_path) != p.sha:
                # Keep the older version for audit: a hard link costs no copy and leaves the
                # current file in place until the atomic rename below.
                keep = (self.superseded_dir / existing["study_uid"] / existing["series_uid"]
                        / f"{sop}.{now.replace(':', '')}.{p.sha[:8]}.dcm")
                _makedirs(keep.parent, to_sync)
                os.link(old_path, keep)
                to_sync.add(keep.parent)
                superseded_row = {
                    "sop_instance_uid": sop, "file_path": str(keep), "size": existing["size"],
                    "sha256": existing["sha256"], "received_at": existing["received_at"],
                    "superseded_at": now, "superseded_by_sha256": p.sha,
                }
            # else: a crash after the rename but before the commit left the new bytes in place.
            if old_path != final:
                old_path.unlink(missing_ok=True)
        _makedirs(final.parent, to_sync)
        os.replace(p.tmp, final)
        to_sync.add(final.parent)
        in_batch[sop] = {"sha256": p.sha, "study_uid": p.ids["StudyInstanceUID"],
                         "series_uid": p.ids["SeriesInstanceUID"], "file_path": str(final), "size": p.size,
                         "received_at": now}
        return final, "replaced" if existing else "stored", superseded_row

    # -- start-up recovery and re-indexing ----------------------------------------------
    def recover(self, queue_analysis: bool = True) -> dict[str, int]:
        """Remove temp files, index complete files that lost their row, report rows without files.

        The same code re-indexes a whole data directory into a new database (``appliance db
        rebuild``: every file is then an orphan), which is why it indexes in batches (a
        transaction, and so a device flush, per batch rather than per file) in the order the
        files were written, with each file's modification time as its receive time.
        ``queue_analysis`` False indexes without analysis jobs (a rebuild must not re-run the
        models, and so re-forward, every study the box ever received).  A file that does not
        parse is moved to ``quarantine/``; one that cannot be read is left where it is.  Never
        deletes an instance file.
        """
        removed = 0
        for tmp in self.tmp_dir.iterdir():
            tmp.unlink(missing_ok=True)
            removed += 1
        known = {row["file_path"] for row in self.db.query("SELECT file_path FROM instances")}
        counts = {"indexed": 0, "quarantined": 0, "unreadable": 0}
        batch: list[tuple[Dataset, dict[str, str], Path, bytes, str]] = []
        batch_bytes = 0
        for path in self._orphans(known):
            try:
                data = path.read_bytes()
                received_at = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(
                    timespec="milliseconds")
            except OSError as exc:  # a failing card: report it, keep going, touch nothing
                log.error("unreadable file %s left in place: %s", path.name, exc)
                counts["unreadable"] += 1
                continue
            try:
                ds = parse_part10(data)
                ids = identify(ds)
            except InvalidDatasetError as exc:
                # Cannot happen for files this store wrote; keep the file aside, never delete it.
                log.error("unindexable file %s moved aside: %s", path.name, exc)
                self._quarantine(path)
                counts["quarantined"] += 1
                continue
            batch.append((ds, ids, path, data, received_at))
            batch_bytes += len(data)
            if len(batch) >= RECOVER_BATCH or batch_bytes >= RECOVER_BATCH_BYTES:
                counts["indexed"] += self._index_orphans(batch, queue_analysis)
                batch, batch_bytes = [], 0
        counts["indexed"] += self._index_orphans(batch, queue_analysis)
        missing = sum(1 for p in known if not Path(p).exists())
        if missing:
            log.error("%d indexed instances have no file on disk", missing)
        if removed or counts["indexed"] or counts["quarantined"] or counts["unreadable"]:
            log.info("recovery: removed %d temp files, indexed %d orphan files, quarantined %d, %d unreadable",
                     removed, counts["indexed"], counts["quarantined"], counts["unreadable"])
        return {"temp_removed": removed, "orphans_indexed": counts["indexed"], "quarantined": counts["quarantined"],
                "unreadable": counts["unreadable"], "rows_without_file": missing}

    def _orphans(self, known: set[str]) -> list[Path]:
        """Instance files without a row, oldest first."""
        found = []
        for path in self.instances_dir.rglob("*.dcm"):
            if str(path) in known:
                continue
            try:
                found.append((path.stat().st_mtime, path))
            except OSError:
                found.append((0.0, path))  # read_bytes will report it
        return [path for _mtime, path in sorted(found)]

    def _index_orphans(self, batch: list[tuple[Dataset, dict[str, str], Path, bytes, str]],
                       queue_analysis: bool) -> int:
        if not batch:
            return 0
        with self.db.atomic() as tx:
            for ds, ids, path, data, received_at in batch:
                source = Source.AI if str(ds.get("Manufacturer", "")) == AI_MANUFACTURER else Source.RECOVERED
                index_instance(tx, ds, ids, path, len(data), _sha256(data), "", source, received_at,
                               queue_analysis=queue_analysis)
        return len(batch)

    def _quarantine(self, path: Path) -> None:
        aside = self.data_dir / "quarantine" / path.name
        aside.parent.mkdir(parents=True, exist_ok=True)
        n = 1
        while aside.exists():  # the same name quarantined before: keep both
            aside = aside.with_name(f"{path.stem}.{n}{path.suffix}")
            n += 1
        os.replace(path, aside)
