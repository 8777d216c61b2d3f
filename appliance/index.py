"""Index rows for a stored instance: patient, study, series, instance and its analysis job.

Called inside the store's commit transaction, so an instance and its analysis job become
visible together or not at all (the durable hand-off from ingest to analysis).
"""
from __future__ import annotations

from pathlib import Path

import sqlite_utils
from pydicom.dataset import Dataset

from . import lifecycle
from .dicomfile import text
from .lifecycle import InstanceState, JobState, StudyEvent

# Written into every DICOM object the box creates, so it can always tell its own results apart.
AI_MANUFACTURER = "Clinic Edge Appliance"


def index_instance(
    tx: sqlite_utils.Database, ds: Dataset, ids: dict[str, str], path: Path, size: int, sha: str, calling_ae: str, source: str, now: str,
    queue_analysis: bool = True,
) -> None:
    """Upsert patient, study, series and instance rows (inside the caller's transaction), and
    the image's analysis job unless ``queue_analysis`` is False (a rebuilt index)."""
    patient_id = text(ds, "PatientID")
    issuer = text(ds, "IssuerOfPatientID")
    tx.execute(
        "INSERT INTO patients (patient_id, issuer, name, birth_date, sex) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (patient_id, issuer) DO UPDATE SET name = excluded.name, "
        "birth_date = excluded.birth_date, sex = excluded.sex",
        (patient_id, issuer, text(ds, "PatientName"), text(ds, "PatientBirthDate"), text(ds, "PatientSex")),
    )
    patient_pk = tx.execute(
        "SELECT id FROM patients WHERE patient_id = ? AND issuer = ?", (patient_id, issuer)
    ).fetchone()[0]
    study = ids["StudyInstanceUID"]
    tx.execute(
        "INSERT INTO studies (study_uid, patient_pk, accession, study_date, study_time, description, state, "
        "first_received_at, last_received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
        # A late image re-opens a settled study (DICOM has no end-of-study signal).
        "ON CONFLICT (study_uid) DO UPDATE SET last_received_at = excluded.last_received_at, settled_at = ''",
        (
            study,
            patient_pk,
            text(ds, "AccessionNumber"),
            text(ds, "StudyDate"),
            text(ds, "StudyTime"),
            text(ds, "StudyDescription"),
            lifecycle.STUDY_INITIAL.value,
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
            text(ds, "Modality"),
            text(ds, "BodyPartExamined"),
            text(ds, "SeriesNumber"),
            text(ds, "SeriesDescription"),
        ),
    )
    tx.execute(
        "INSERT INTO instances (sop_instance_uid, series_uid, study_uid, sop_class_uid, instance_number, "
        "file_path, size, sha256, transfer_syntax, calling_ae, source, received_at, state) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (sop_instance_uid) DO UPDATE SET file_path = excluded.file_path, size = excluded.size, "
        "sha256 = excluded.sha256, transfer_syntax = excluded.transfer_syntax, calling_ae = excluded.calling_ae, "
        "source = excluded.source, received_at = excluded.received_at, state = excluded.state",
        (
            ids["SOPInstanceUID"],
            ids["SeriesInstanceUID"],
            study,
            ids["SOPClassUID"],
            text(ds, "InstanceNumber"),
            str(path),
            size,
            sha,
            str(ds.file_meta.TransferSyntaxUID),
            calling_ae,
            source,
            now,
            InstanceState.RECEIVED.value,
        ),
    )
    if queue_analysis and needs_analysis(ds, source):
        tx.execute(
            "INSERT INTO analysis_jobs (sop_instance_uid, study_uid, state, created_at, updated_at) "
            "SELECT ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM analysis_jobs "
            f"WHERE sop_instance_uid = ? AND state IN ({lifecycle.marks(lifecycle.JOB_OUTSTANDING)}))",
            (ids["SOPInstanceUID"], study, JobState.PENDING.value, now, now, ids["SOPInstanceUID"],
             *lifecycle.words(lifecycle.JOB_OUTSTANDING)),
        )
        # A late image re-opens an analyzed study until its analysis is done.
        lifecycle.move_study(tx, study, StudyEvent.ANALYSIS_QUEUED)


def needs_analysis(ds: Dataset, source: str) -> bool:
    """The clinic's images (:func:`appliance.lifecycle.is_clinical`: any source but the box's AI
    objects and reports) get an analysis job; the box's own AI results never do."""
    return "PixelData" in ds and lifecycle.is_clinical(source) and text(ds, "Manufacturer") != AI_MANUFACTURER
