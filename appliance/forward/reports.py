"""The report return channel: specialists' reports (SR, encapsulated PDF) back into the clinic's
original study.

Two ways in: polling a DICOMweb destination (QIDO-RS for report instances in every study the box
sent there, WADO-RS to fetch them), and a C-STORE push from a destination's ``report_ae`` (the
SCP hands such objects to :func:`scp_hook`).  Either way the report is mapped back before it is
stored: de-identified UIDs become the originals through the re-identification map, the study and
patient attributes are the original study's, the report keeps its own SOP Instance UID.  The
stored report (source ``report``) marks the study ``report_received``, with an event for the UI.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Optional

from pydicom.dataset import Dataset

from .. import audit, lifecycle
from ..config import Config, Destination
from ..db import Database
from ..lifecycle import OutboxState, Source, StudyEvent, marks, words
from ..store import InstanceStore, StoreOutcome, parse_part10, utc_now
from .deid import UidMap
from .errors import ForwardRequestError
from .transfer import encode

log = logging.getLogger(__name__)

SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
DEID_ATTRIBUTES = ("PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence")


# Items whose study may be on the destination (and so have reports there).
POLLED = (OutboxState.SENDING, OutboxState.DELIVERED, OutboxState.CONFIRMED)


def is_report_class(sop_class_uid: str) -> bool:
    return sop_class_uid.startswith(SR_PREFIX) or sop_class_uid == ENCAPSULATED_PDF


def poll(database: Database, store: InstanceStore, uids: UidMap, dest: Destination, peer: Any) -> int:
    """Fetch new reports from a DICOMweb destination for every study sent there; returns the count."""
    studies = database.query(
        f"SELECT DISTINCT remote_study_uid FROM outbox_items WHERE destination = ? AND remote_study_uid != '' "
        f"AND state IN ({marks(POLLED)})", (dest.name, *words(POLLED)))
    fetched = 0
    try:
        for study in studies:
            remote_study = study["remote_study_uid"]
            candidates = [i for i in peer.instances(remote_study) if is_report_class(i["sop_class_uid"])]
            if not candidates:
                continue
            ours = {r["remote_sop_instance_uid"] for r in database.query(
                "SELECT b.remote_sop_instance_uid FROM outbox_instances b JOIN outbox_items o ON o.id = b.item_id "
                "WHERE o.destination = ? AND o.remote_study_uid = ?", (dest.name, remote_study))}
            for inst in candidates:
                uid = inst["sop_instance_uid"]
                if uid in ours or database.query("SELECT 1 FROM instances WHERE sop_instance_uid = ?", (uid,)):
                    continue  # the box's own AI SR, or a report already brought back
                ingest(database, store, uids, peer.retrieve(remote_study, inst["series_uid"], uid), dest.name,
                       "dicomweb")
                fetched += 1
    finally:
        with database.atomic() as tx:
            tx.execute("INSERT OR IGNORE INTO destination_state (name) VALUES (?)", (dest.name,))
            tx.execute("UPDATE destination_state SET last_report_poll_at = ? WHERE name = ?", (utc_now(), dest.name))
    return fetched


def ingest(database: Database, store: InstanceStore, uids: UidMap, data: bytes, destination: str,
           via: str) -> StoreOutcome:
    """Map a report back to its original study and store it.  ForwardRequestError if the report
    is not about a study this box sent."""
    ds = parse_part10(data)
    known = database.query("SELECT r.sop_instance_uid, r.study_uid, i.file_path FROM forward_reports r JOIN instances i "
                           "ON i.sop_instance_uid = r.sop_instance_uid WHERE r.sop_instance_uid = ?",
                           (str(ds.get("SOPInstanceUID", "")),))
    if known:  # fetched by a poll and pushed as well: one report, one event
        return StoreOutcome("duplicate", known[0]["sop_instance_uid"], known[0]["study_uid"],
                            Path(known[0]["file_path"]))
    remote_study = str(ds.get("StudyInstanceUID", ""))
    original_study = uids.original(remote_study) or remote_study
    rows = database.query(
        "SELECT s.*, p.patient_id, p.issuer, p.name, p.birth_date, p.sex FROM studies s JOIN patients p ON "
        "p.id = s.patient_pk WHERE s.study_uid = ?", (original_study,))
    if not rows:
        raise ForwardRequestError("report refers to a study this box does not hold")
    _map_back(ds, uids)
    study = rows[0]
    ds.StudyInstanceUID = original_study
    for keyword, column in (("PatientID", "patient_id"), ("PatientName", "name"), ("PatientBirthDate", "birth_date"),
                            ("PatientSex", "sex"), ("AccessionNumber", "accession"), ("StudyDate", "study_date"),
                            ("StudyTime", "study_time")):
        setattr(ds, keyword, study[column])
    if study["issuer"]:
        ds.IssuerOfPatientID = study["issuer"]
    for keyword in DEID_ATTRIBUTES:
        if keyword in ds:
            delattr(ds, keyword)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    outcome = store.store(encode(ds), calling_ae=destination, source=Source.REPORT)
    text = report_text(ds)
    now = utc_now()
    detail = {"destination": destination, "sop_instance_uid": outcome.sop_instance_uid, "via": via}
    with database.atomic() as tx:
        tx.execute("INSERT OR IGNORE INTO forward_reports (sop_instance_uid, study_uid, destination, sop_class_uid, "
                   "received_via, text, received_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (outcome.sop_instance_uid, original_study, destination, str(ds.SOPClassUID), via, text, now))
        lifecycle.move_study(tx, original_study, StudyEvent.REPORT_RECEIVED)
        tx.execute("INSERT INTO events (at, kind, study_uid, detail) VALUES (?, 'report', ?, ?)",
                   (now, original_study, json.dumps(detail)))
        audit.record_tx(tx, "system", "report_received", original_study, detail)
    log.info("report %s from %s stored in study %s", outcome.sop_instance_uid, destination, original_study)
    return outcome


def _map_back(ds: Dataset, uids: UidMap) -> None:
    """Replace every de-identified UID the map knows by its original, at any depth."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _map_back(item, uids)
        elif elem.VR == "UI" and elem.value:
            values = list(elem.value) if elem.VM > 1 else [elem.value]
            mapped = [uids.original(str(v)) or str(v) for v in values]
            elem.value = mapped if elem.VM > 1 else mapped[0]


def report_text(ds: Dataset) -> str:
    """The report as readable text: SR content items flattened, one ``Concept: value`` per line."""
    if str(ds.get("SOPClassUID", "")) == ENCAPSULATED_PDF:
        return f"{ds.get('DocumentTitle', '') or 'PDF report'} (PDF, open the attached document)"
    lines: list[str] = []
    title = ds.get("ConceptNameCodeSequence")
    if title:
        lines.append(str(title[0].get("CodeMeaning", "")))
    _walk(ds.get("ContentSequence", []), 0, lines)
    return "\n".join(line for line in lines if line.strip())


def _walk(items: Any, depth: int, lines: list[str]) -> None:
    for item in items:
        concept = item.get("ConceptNameCodeSequence")
        name = str(concept[0].get("CodeMeaning", "")) if concept else ""
        kind = str(item.get("ValueType", ""))
        value = ""
        if kind == "TEXT":
            value = str(item.get("TextValue", ""))
        elif kind == "CODE" and item.get("ConceptCodeSequence"):
            value = str(item.ConceptCodeSequence[0].get("CodeMeaning", ""))
        elif kind == "NUM" and item.get("MeasuredValueSequence"):
            measured = item.MeasuredValueSequence[0]
            units = measured.get("MeasurementUnitsCodeSequence")
            value = f"{measured.get('NumericValue', '')} {units[0].get('CodeValue', '') if units else ''}".strip()
        elif kind == "PNAME":
            value = str(item.get("PersonName", ""))
        elif kind in ("DATE", "TIME", "DATETIME"):
            value = str(item.get({"DATE": "Date", "TIME": "Time", "DATETIME": "DateTime"}[kind], ""))
        if name or value:
            lines.append("  " * depth + (f"{name}: {value}" if name and value else name or value))
        _walk(item.get("ContentSequence", []), depth + 1, lines)


def study_reports(database: Database, study_uid: str) -> list[dict[str, Any]]:
    """Reports that came back for a study, oldest first, with their text (for the study view)."""
    rows = database.query(
        "SELECT r.*, i.file_path FROM forward_reports r LEFT JOIN instances i ON i.sop_instance_uid = "
        "r.sop_instance_uid WHERE r.study_uid = ? ORDER BY r.received_at", (study_uid,))
    return [{"sop_instance_uid": r["sop_instance_uid"], "destination": r["destination"],
             "received_at": r["received_at"], "received_via": r["received_via"],
             "kind": "pdf" if r["sop_class_uid"] == ENCAPSULATED_PDF else "sr", "text": r["text"],
             "file_path": r["file_path"] or ""} for r in rows]


def scp_hook(config: Config, database: Database, store: InstanceStore) -> Callable[..., Optional[StoreOutcome]]:
    """For the SCP: a report pushed by C-STORE from a destination's ``report_ae`` is mapped and
    stored here (returns the outcome); anything else returns None and is stored as usual."""
    by_ae = {d.report_ae: d.name for d in config.destinations if d.report_ae}
    uids = UidMap(database)

    def hook(calling_ae: str, data: bytes, ds: Dataset) -> Optional[StoreOutcome]:
        destination = by_ae.get(calling_ae)
        if destination is None or not is_report_class(str(ds.get("SOPClassUID", ""))):
            return None
        try:
            return ingest(database, store, uids, data, destination, "c-store")
        except ForwardRequestError:
            return None

    return hook
