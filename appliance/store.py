"""Durable instance storage: files under the data directory plus their rows in the database.

The guarantee: when :meth:`InstanceStore.store` returns, the file is fsynced under its final
name, its directory entry is fsynced, and its row is committed.  Only then may the caller report
success to the sender.  A crash at any earlier point leaves either nothing, a temp file (removed
by :meth:`recover`), or a complete file without a row (indexed by :meth:`recover`).

Layout under the data directory::

    instances/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    superseded/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.<UTC time>.dcm
    tmp/                      temp files, same filesystem, emptied at start-up

Duplicates: the same SOP Instance UID with identical bytes is a success that writes nothing.
With different bytes the newer copy replaces the older one, which is kept under ``superseded/``
and recorded in ``superseded_instances`` for audit.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import shutil
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pydicom
import pydicom.config
from pydicom.dataset import Dataset

from .db import Database
from .errors import InvalidDatasetError, OutOfSpaceError, StoreError

log = logging.getLogger(__name__)

# Real modalities send slightly non-conformant values all the time; we store bytes as received
# and must not flood the log with per-element warnings (which could also quote patient data).
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

# UIDs become path components, so only accept what a UID may contain (PS3.5 9.1) -- this also
# rules out path traversal from a hostile dataset.
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
MIB = 1024 * 1024
LOCK_STRIPES = 64
# Written into every DICOM object the box creates, so it can always tell its own results apart.
AI_MANUFACTURER = "Clinic Edge Appliance"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs_durable(path: Path) -> None:
    """mkdir -p, fsyncing each new directory's parent so the new entry survives power loss."""
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
        _fsync_dir(directory.parent)


@dataclass(frozen=True)
class StoreOutcome:
    """What :meth:`InstanceStore.store` did: ``stored``, ``duplicate`` or ``replaced``."""

    action: str
    sop_instance_uid: str
    study_uid: str
    path: Path


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def parse_part10(data: bytes) -> Dataset:
    """Parse a DICOM Part 10 byte string completely; raise InvalidDatasetError if it is not one.

    pydicom parses lazily, so every element is touched here: a garbled element must fail now,
    at the door, not later in the analysis worker.
    """
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        _check_lengths(ds)
        for _elem in ds.iterall():
            pass
        ds.file_meta.TransferSyntaxUID  # noqa: B018 - must be present
        _check_pixel_data(ds)
    except InvalidDatasetError:
        raise
    except Exception as exc:  # pydicom raises many types on garbage
        raise InvalidDatasetError(f"cannot parse dataset: {type(exc).__name__}: {exc}") from exc
    return ds


UNDEFINED_LENGTH = 0xFFFFFFFF


def _check_lengths(ds: Dataset) -> None:
    """pydicom accepts a value shorter than its declared length at the end of a stream; a
    truncated transfer must not pass for a complete dataset."""
    for tag in ds.keys():
        raw = ds.get_item(tag)
        length = getattr(raw, "length", None)
        value = getattr(raw, "value", None)
        if length not in (None, UNDEFINED_LENGTH) and isinstance(value, bytes) and len(value) != length:
            raise InvalidDatasetError(f"cannot parse dataset: element {tag} truncated ({len(value)} of {length} bytes)")


def _check_pixel_data(ds: Dataset) -> None:
    """Native pixel data must hold every frame; encapsulated fragments must be complete."""
    if "PixelData" not in ds or "Rows" not in ds:
        return
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        from pydicom.encaps import generate_fragments

        try:
            fragments = sum(1 for _ in generate_fragments(ds.PixelData))
        except Exception as exc:  # noqa: BLE001 - malformed item structure
            raise InvalidDatasetError(f"cannot parse dataset: encapsulated pixel data is malformed: {exc}") from exc
        if fragments == 0:
            raise InvalidDatasetError("cannot parse dataset: encapsulated pixel data has no fragments")
        return
    bits = int(ds.get("BitsAllocated", 8) or 8)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    pixels = int(ds.Rows) * int(ds.Columns) * samples * frames
    expected = (pixels * bits + 7) // 8
    if len(ds.PixelData) < expected:
        raise InvalidDatasetError(f"cannot parse dataset: pixel data truncated ({len(ds.PixelData)} of {expected} bytes)")


def identify(ds: Dataset) -> dict[str, str]:
    """The identifiers needed to file an instance; InvalidDatasetError if any is missing or bad."""
    ids: dict[str, str] = {}
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        value = _text(ds, keyword).rstrip("\0")
        if not value:
            raise InvalidDatasetError(f"missing {keyword}")
        if len(value) > 64 or not UID_RE.match(value):
            raise InvalidDatasetError(f"{keyword} is not a valid UID")
        ids[keyword] = value
    return ids


class InstanceStore:
    """Stores DICOM instances durably and indexes them."""

    def __init__(self, data_dir: Path, database: Database, min_free_mb: int = 0):
        self.data_dir = Path(data_dir)
        self.db = database
        self.min_free_mb = min_free_mb
        self.instances_dir = self.data_dir / "instances"
        self.superseded_dir = self.data_dir / "superseded"
        self.tmp_dir = self.data_dir / "tmp"
        for d in (self.instances_dir, self.superseded_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._locks = [threading.Lock() for _ in range(LOCK_STRIPES)]

    # -- space ---------------------------------------------------------------------------
    def check_space(self, incoming_bytes: int = 0) -> None:
        """Raise OutOfSpaceError if writing ``incoming_bytes`` would go below the floor."""
        free = shutil.disk_usage(self.data_dir).free
        if free - incoming_bytes < self.min_free_mb * MIB:
            raise OutOfSpaceError(
                f"free space {free // MIB} MiB minus {incoming_bytes} bytes is below the floor of {self.min_free_mb} MiB"
            )

    # -- storing -------------------------------------------------------------------------
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

    def store(self, data: bytes, calling_ae: str = "", source: str = "dicom", ds: Dataset | None = None) -> StoreOutcome:
        """Store one Part 10 byte string exactly as given.  See the module docstring."""
        self.check_space(len(data))
        if ds is None:
            ds = parse_part10(data)
        ids = identify(ds)
        sha = hashlib.sha256(data).hexdigest()
        tmp = self._write_temp(data)
        try:
            lock = self._locks[hash(ids["SOPInstanceUID"]) % LOCK_STRIPES]
            with lock:
                return self._commit(tmp, data, sha, ds, ids, calling_ae, source)
        finally:
            tmp.unlink(missing_ok=True)

    def _commit(
        self, tmp: Path, data: bytes, sha: str, ds: Dataset, ids: dict[str, str], calling_ae: str, source: str
    ) -> StoreOutcome:
        sop = ids["SOPInstanceUID"]
        final = self.final_path(ids)
        existing = self.db.query("SELECT * FROM instances WHERE sop_instance_uid = ?", (sop,))
        if existing and existing[0]["sha256"] == sha:
            return StoreOutcome("duplicate", sop, existing[0]["study_uid"], Path(existing[0]["file_path"]))
        now = utc_now()
        superseded_row = None
        if existing:
            old = existing[0]
            old_path = Path(old["file_path"])
            if _sha256_file(old_path) != sha:
                # Keep the older version for audit: a hard link costs no copy and leaves the
                # current file in place until the atomic rename below.
                keep = self.superseded_dir / old["study_uid"] / old["series_uid"] / f"{sop}.{now.replace(':', '')}.dcm"
                _makedirs_durable(keep.parent)
                os.link(old_path, keep)
                _fsync_dir(keep.parent)
                superseded_row = {
                    "sop_instance_uid": sop,
                    "file_path": str(keep),
                    "size": old["size"],
                    "sha256": old["sha256"],
                    "received_at": old["received_at"],
                    "superseded_at": now,
                    "superseded_by_sha256": sha,
                }
            # else: a crash after the rename but before the commit left the new bytes in place.
            if old_path != final:
                old_path.unlink(missing_ok=True)
        _makedirs_durable(final.parent)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        with self.db.atomic() as tx:
            _index(tx, ds, ids, final, len(data), sha, calling_ae, source, now)
            if superseded_row:
                tx["superseded_instances"].insert(superseded_row)
        return StoreOutcome("replaced" if existing else "stored", sop, ids["StudyInstanceUID"], final)

    # -- start-up recovery ---------------------------------------------------------------
    def recover(self) -> dict[str, int]:
        """Remove temp files, index complete files that lost their row, report rows without files."""
        removed = 0
        for tmp in self.tmp_dir.iterdir():
            tmp.unlink(missing_ok=True)
            removed += 1
        known = {row["file_path"] for row in self.db.query("SELECT file_path FROM instances")}
        indexed = 0
        for path in self.instances_dir.rglob("*.dcm"):
            if str(path) in known:
                continue
            data = path.read_bytes()
            try:
                ds = parse_part10(data)
                ids = identify(ds)
            except InvalidDatasetError as exc:
                # Cannot happen for files this store wrote; keep the file aside, never delete it.
                log.error("unindexable file %s moved aside: %s", path.name, exc)
                aside = self.data_dir / "quarantine" / path.name
                aside.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, aside)
                continue
            with self.db.atomic() as tx:
                _index(tx, ds, ids, path, len(data), hashlib.sha256(data).hexdigest(), "", "recovered", utc_now())
            indexed += 1
        missing = sum(1 for p in known if not Path(p).exists())
        if missing:
            log.error("%d indexed instances have no file on disk", missing)
        if removed or indexed:
            log.info("recovery: removed %d temp files, indexed %d orphan files", removed, indexed)
        return {"temp_removed": removed, "orphans_indexed": indexed, "rows_without_file": missing}


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(MIB), b""):
                h.update(chunk)
    except FileNotFoundError:
        return ""
    return h.hexdigest()


def _index(
    tx: Any, ds: Dataset, ids: dict[str, str], path: Path, size: int, sha: str, calling_ae: str, source: str, now: str
) -> None:
    """Upsert patient, study, series and instance rows (inside the caller's transaction)."""
    patient_id = _text(ds, "PatientID")
    issuer = _text(ds, "IssuerOfPatientID")
    tx.execute(
        "INSERT INTO patients (patient_id, issuer, name, birth_date, sex) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (patient_id, issuer) DO UPDATE SET name = excluded.name, "
        "birth_date = excluded.birth_date, sex = excluded.sex",
        (patient_id, issuer, _text(ds, "PatientName"), _text(ds, "PatientBirthDate"), _text(ds, "PatientSex")),
    )
    patient_pk = tx.execute(
        "SELECT id FROM patients WHERE patient_id = ? AND issuer = ?", (patient_id, issuer)
    ).fetchone()[0]
    study = ids["StudyInstanceUID"]
    tx.execute(
        "INSERT INTO studies (study_uid, patient_pk, accession, study_date, study_time, description, "
        "first_received_at, last_received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
        # A late image re-opens a settled study (DICOM has no end-of-study signal).
        "ON CONFLICT (study_uid) DO UPDATE SET last_received_at = excluded.last_received_at, settled_at = ''",
        (
            study,
            patient_pk,
            _text(ds, "AccessionNumber"),
            _text(ds, "StudyDate"),
            _text(ds, "StudyTime"),
            _text(ds, "StudyDescription"),
            now,
            now,
        ),
    )
    tx.execute(
        "INSERT INTO series (series_uid, study_uid, modality, body_part, series_number, description) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (series_uid) DO NOTHING",
        (
            ids["SeriesInstanceUID"],
            study,
            _text(ds, "Modality"),
            _text(ds, "BodyPartExamined"),
            _text(ds, "SeriesNumber"),
            _text(ds, "SeriesDescription"),
        ),
    )
    tx.execute(
        "INSERT INTO instances (sop_instance_uid, series_uid, study_uid, sop_class_uid, instance_number, "
        "file_path, size, sha256, transfer_syntax, calling_ae, source, received_at, state) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'received') "
        "ON CONFLICT (sop_instance_uid) DO UPDATE SET file_path = excluded.file_path, size = excluded.size, "
        "sha256 = excluded.sha256, transfer_syntax = excluded.transfer_syntax, calling_ae = excluded.calling_ae, "
        "source = excluded.source, received_at = excluded.received_at, state = 'received'",
        (
            ids["SOPInstanceUID"],
            ids["SeriesInstanceUID"],
            study,
            ids["SOPClassUID"],
            _text(ds, "InstanceNumber"),
            str(path),
            size,
            sha,
            str(ds.file_meta.TransferSyntaxUID),
            calling_ae,
            source,
            now,
        ),
    )
    if needs_analysis(ds, source):
        tx.execute(
            "INSERT INTO analysis_jobs (sop_instance_uid, study_uid, state, created_at, updated_at) "
            "SELECT ?, ?, 'pending', ?, ? WHERE NOT EXISTS (SELECT 1 FROM analysis_jobs "
            "WHERE sop_instance_uid = ? AND state IN ('pending', 'running'))",
            (ids["SOPInstanceUID"], study, now, now, ids["SOPInstanceUID"]),
        )


def needs_analysis(ds: Dataset, source: str) -> bool:
    """Images from the clinic get an analysis job; the box's own AI results never do."""
    return "PixelData" in ds and source != "ai" and _text(ds, "Manufacturer") != AI_MANUFACTURER
