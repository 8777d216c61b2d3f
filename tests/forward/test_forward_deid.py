"""De-identified forwarding to a real Orthanc, scanned against the Basic Profile; burned-in
images held back; a specialist's report (over DICOMweb and by C-STORE) mapped back to the
original study."""
from __future__ import annotations

import io
import sqlite3
import time
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from appliance.db import open_database
from appliance.forward import study_forwarding, study_reports
from appliance.forward.deid import profile_tags
from tests.forward.conftest import HUB_AE, PASSWORD
from tests.forward.util import (box_env, destination_toml, forward_cli, new_study, small_chest, study_uid_of,
                                wait_confirmed, write_config)
from tests.helpers import CALLING_AE, dcmsend, sample
from tests.pipeline.test_pipeline_e2e import wait_until_analyzed

REMOVE = profile_tags("X")
CHANGE = profile_tags("DZU")
FINDING = "Right lower lobe consolidation, compatible with pneumonia. Recommend follow-up film in 6 weeks."


def walk(ds: Dataset, out: list[tuple[int, object]]) -> list[tuple[int, object]]:
    for elem in ds:
        if elem.VR == "SQ":
            out.append((int(elem.tag), None))
            for item in elem.value:
                walk(item, out)
        else:
            out.append((int(elem.tag), elem.value))
    return out


def original_of(data_dir: Path, remote_uid: str) -> Path:
    conn = sqlite3.connect(data_dir / "appliance.db")
    (original,) = conn.execute("SELECT original FROM deid_map WHERE kind = 'uid' AND replacement = ?",
                               (remote_uid,)).fetchone()
    (path,) = conn.execute("SELECT file_path FROM instances WHERE sop_instance_uid = ?", (original,)).fetchone()
    conn.close()
    return Path(path)


def report_sr(image: Dataset, text: str) -> bytes:
    """A Basic Text SR a radiologist's system would write in the (de-identified) study on the hub."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.SOPInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "StudyTime", "AccessionNumber",
                    "StudyID", "ReferringPhysicianName", "PatientBirthDate", "PatientSex"):
        setattr(ds, keyword, image.get(keyword, ""))
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "SR", "900", "1"
    ds.ContentDate, ds.ContentTime, ds.Manufacturer = "20261128", "120000", "Hub reporting"
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.ConceptNameCodeSequence = Sequence([_code("18748-4", "LN", "Diagnostic Imaging Report")])
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = image.SOPClassUID, image.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID, series.ReferencedSOPSequence = image.SeriesInstanceUID, Sequence([ref])
    evidence = Dataset()
    evidence.StudyInstanceUID, evidence.ReferencedSeriesSequence = image.StudyInstanceUID, Sequence([series])
    ds.CurrentRequestedProcedureEvidenceSequence = Sequence([evidence])
    item = Dataset()
    item.RelationshipType, item.ValueType, item.TextValue = "CONTAINS", "TEXT", text
    item.ConceptNameCodeSequence = Sequence([_code("121071", "DCM", "Finding")])
    ds.ContentSequence = Sequence([item])
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, scheme, meaning
    return code


def wait_reports(data_dir: Path, study: str, n: int, timeout: float = 60) -> list[dict]:
    database = open_database(data_dir)
    deadline = time.monotonic() + timeout
    while len(found := study_reports(database, study)) < n:
        assert time.monotonic() < deadline, f"{len(found)} of {n} reports came back"
        time.sleep(0.5)
    return found


def test_deidentified_forwarding_and_report_return(tmp_path, server_factory, orthanc_factory):
    hub = orthanc_factory().start()
    config = write_config(tmp_path / "site.toml", destination_toml(
        "hub", "dicomweb", hub, deidentify=True, poll_reports_s=1, report_ae=HUB_AE))
    server = server_factory(config_file=config, extra_env=box_env(PASSWORD, ("hub",)),
                            allowed=f"{CALLING_AE},{HUB_AE}").start()
    chest = new_study(small_chest(), tmp_path / "in" / "chest.dcm", PatientName="DOE^JANE", PatientID="P-0042",
                      InstitutionName="Clinic Kisumu", ReferringPhysicianName="SMITH^ANNA", AccessionNumber="A77")
    ct = new_study(pydicom.dcmread(sample("CT_small.dcm")), tmp_path / "in" / "ct.dcm", study_uid_of(chest))
    burned = new_study(pydicom.dcmread(sample("US1_UNCR.dcm")), tmp_path / "in" / "us.dcm", BurnedInAnnotation="YES")
    study, us_study = study_uid_of(chest), study_uid_of(burned)
    assert dcmsend(server.dicom_port, [chest, ct, burned]).returncode == 0
    wait_until_analyzed(server.data_dir, 3)
    forward_cli(server.data_dir, config, study, "hub")
    forward_cli(server.data_dir, config, us_study, "hub")
    wait_confirmed(server.data_dir, 1)

    # The burned-in ultrasound is held back, and the case says why.
    database = open_database(server.data_dir)
    (us_item,) = study_forwarding(database, us_study)
    assert us_item["state"] == "failed" and "burned-in" in us_item["reason"], us_item
    assert us_item["instances"]["blocked"] == 1

    # Every instance on the hub, scanned against its original.
    remote_studies: dict[str, list[str]] = {}
    for orthanc_id in hub.instance_ids():
        sent = pydicom.dcmread(io.BytesIO(hub.instance_file(orthanc_id)))
        original = pydicom.dcmread(original_of(server.data_dir, sent.SOPInstanceUID))
        assert sent.PatientIdentityRemoved == "YES" and sent.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        sent_values = walk(sent, [])
        assert not [t for t, _ in sent_values if pydicom.tag.Tag(t).is_private], "private attributes sent"
        assert not [t for t, _ in sent_values if t in REMOVE], "attributes the profile removes were sent"
        for tag, value in walk(original, []):
            if tag in CHANGE and value not in (None, "", b""):
                assert (tag, value) not in sent_values, f"{pydicom.tag.Tag(tag)} kept its original value"
        assert sent.SOPInstanceUID != original.SOPInstanceUID and sent.StudyInstanceUID != original.StudyInstanceUID
        assert "DOE" not in str(sent.PatientName) and sent.PatientID != "P-0042"
        remote_studies.setdefault(str(original.StudyInstanceUID), []).append(sent.StudyInstanceUID)
        assert sent.Modality != "US", "the burned-in ultrasound image was sent"
    # Chest, CT, AI SR and heatmap, all in one de-identified study (consistent UIDs); the
    # ultrasound study has only its AI SR on the hub.
    assert len(remote_studies[study]) == 4 and len(set(remote_studies[study])) == 1
    assert set(remote_studies) == {study, us_study}

    # The radiologist reports on the hub; the report comes back to the original study.
    image = next(pydicom.dcmread(io.BytesIO(hub.instance_file(i))) for i in hub.instance_ids()
                 if hub.tags(i).get("Modality") == "CR")
    hub.upload(report_sr(image, FINDING))
    (report,) = wait_reports(server.data_dir, study, 1)
    assert FINDING in report["text"] and report["received_via"] == "dicomweb"
    stored = pydicom.dcmread(report["file_path"])
    assert stored.StudyInstanceUID == study and stored.PatientID == "P-0042" and str(stored.PatientName) == "DOE^JANE"
    evidence = stored.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == str(pydicom.dcmread(chest).SOPInstanceUID)
    assert "PatientIdentityRemoved" not in stored

    # An addendum pushed by C-STORE from the hub's AE title (dcmtk acting as the hub's PACS).
    addendum = tmp_path / "addendum.dcm"
    addendum.write_bytes(report_sr(image, "Addendum: no effusion."))
    assert dcmsend(server.dicom_port, [addendum], aet=HUB_AE).returncode == 0
    reports = wait_reports(server.data_dir, study, 2)
    assert [r["received_via"] for r in reports if "no effusion" in r["text"]] == ["c-store"]
    conn = sqlite3.connect(server.data_dir / "appliance.db")
    assert conn.execute("SELECT state FROM studies WHERE study_uid = ?", (study,)).fetchone()[0] == "report_received"
    assert conn.execute("SELECT COUNT(*) FROM events WHERE kind = 'report' AND study_uid = ?", (study,)).fetchone()[0] == 2
    assert conn.execute("SELECT COUNT(*) FROM studies").fetchone()[0] == 2  # no de-identified study on the box
    conn.close()
