"""The report return channel beyond the SR-over-DICOMweb case: an encapsulated PDF report comes back
from Orthanc into the original study (once, however often the box polls), the box's own objects
on the hub are never taken for reports, a report pushed by C-STORE is accepted only from the hub's
allowed AE title, and de-identified UIDs stay the same over time (re-forwarding a study lands on
the same instances, never a second copy)."""
from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from appliance.acquire.scp import start_scp
from appliance.forward import reports, request_forward, study_forwarding, study_reports
from appliance.forward.deid import UidMap
from appliance.forward.dicomweb import DicomWebPeer
from tests.forward.conftest import HUB_AE, PASSWORD, USER
from tests.forward.local_peers import make_box
from tests.forward.test_forward_deid import report_sr
from tests.forward.util import new_study, small_chest
from tests.helpers import CALLING_AE, dcmsend, free_port, sample

ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"


def hub_destination(hub, **extra: str) -> str:
    lines = ['[[destinations]]', 'name = "hub"', 'kind = "dicomweb"', f'url = "{hub.dicomweb_url}"',
             f'username = "{USER}"', "deidentify = true", "attach_ai_results = false", "poll_reports_s = 1"]
    lines += [f'{k} = "{v}"' for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def forwarded_study(box, tmp_path, hub):
    """A chest CR plus the modality's own SR in one study, forwarded de-identified and confirmed.
    Returns (study uid, the chest as stored on the hub)."""
    chest = new_study(small_chest(), tmp_path / "in" / "chest.dcm", PatientName="DOE^JANE", PatientID="P-0042")
    study = str(pydicom.dcmread(chest, stop_before_pixels=True).StudyInstanceUID)
    modality_sr = new_study(pydicom.dcmread(sample("test-SR.dcm")), tmp_path / "in" / "sr.dcm", study,
                            PatientName="DOE^JANE", PatientID="P-0042")
    for path in (chest, modality_sr):
        box.store.store(path.read_bytes(), calling_ae=CALLING_AE, source="dicom")
    request_forward(box.db, box.config, study, "hub", "routine", "nurse1")
    box.drain()
    assert study_forwarding(box.db, study)[0]["state"] == "confirmed"
    assert hub.instance_count() == 2
    image = next(pydicom.dcmread(io.BytesIO(hub.instance_file(i))) for i in hub.instance_ids()
                 if hub.tags(i).get("Modality") == "CR")
    return study, image


def pdf_report(image: Dataset) -> bytes:
    """An encapsulated PDF report as a hub's reporting system files it in the de-identified study."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = ENCAPSULATED_PDF, generate_uid()
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "StudyTime", "AccessionNumber",
                    "StudyID", "ReferringPhysicianName", "PatientBirthDate", "PatientSex"):
        setattr(ds, keyword, image.get(keyword, ""))
    ds.SeriesInstanceUID, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = generate_uid(), "DOC", "901", "1"
    ds.ContentDate, ds.ContentTime, ds.AcquisitionDateTime = "20261128", "120000", "20261128120000"
    ds.Manufacturer, ds.BurnedInAnnotation = "Hub reporting", "NO"
    ds.DocumentTitle, ds.MIMETypeOfEncapsulatedDocument = "Chest radiograph report", "application/pdf"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = "18748-4", "LN", "Diagnostic Imaging Report"
    ds.ConceptNameCodeSequence = Sequence([title])
    ds.EncapsulatedDocument = PDF + b"\0" * (len(PDF) % 2)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def poll(box) -> int:
    dest = box.config.destination("hub")
    return reports.poll(box.db, box.store, UidMap(box.db), dest, DicomWebPeer(dest))


def test_pdf_report_comes_back_once_into_the_original_study(tmp_path, orthanc):
    box = make_box(tmp_path, hub_destination(orthanc), environ={"APPLIANCE_DESTINATIONS_HUB_PASSWORD": PASSWORD})
    study, image = forwarded_study(box, tmp_path, orthanc)
    assert poll(box) == 0  # the box's own instances on the hub (the modality SR included) are not reports
    assert study_reports(box.db, study) == []

    orthanc.upload(pdf_report(image))
    assert poll(box) == 1
    (report,) = study_reports(box.db, study)
    assert report["kind"] == "pdf" and report["received_via"] == "dicomweb" and report["destination"] == "hub"
    assert "Chest radiograph report" in report["text"]
    stored = pydicom.dcmread(report["file_path"])
    assert stored.StudyInstanceUID == study and stored.PatientID == "P-0042" and str(stored.PatientName) == "DOE^JANE"
    assert "PatientIdentityRemoved" not in stored
    assert stored.EncapsulatedDocument.rstrip(b"\0") == PDF
    assert box.db.query("SELECT source, study_uid FROM instances WHERE sop_instance_uid = ?",
                        (report["sop_instance_uid"],)) == [{"source": "report", "study_uid": study}]

    assert poll(box) == 0  # polled again: stored and announced once
    assert len(study_reports(box.db, study)) == 1
    assert box.db.query("SELECT state FROM studies WHERE study_uid = ?", (study,))[0]["state"] == "report_received"
    assert box.db.query("SELECT COUNT(*) AS n FROM events WHERE kind = 'report' AND study_uid = ?",
                        (study,))[0]["n"] == 1
    assert box.db.query("SELECT COUNT(*) AS n FROM studies")[0]["n"] == 1  # no de-identified study on the box


def test_reforwarding_uses_the_same_deidentified_uids(tmp_path, orthanc):
    box = make_box(tmp_path, hub_destination(orthanc), environ={"APPLIANCE_DESTINATIONS_HUB_PASSWORD": PASSWORD})
    study, image = forwarded_study(box, tmp_path, orthanc)
    (first,) = study_forwarding(box.db, study)
    remote = {r["sop_instance_uid"]: r["remote_sop_instance_uid"]
              for r in box.db.query("SELECT * FROM outbox_instances WHERE item_id = ?", (first["id"],))}
    on_hub = sorted(orthanc.tags(i)["SOPInstanceUID"] for i in orthanc.instance_ids())
    assert sorted(remote.values()) == on_hub and not set(remote) & set(remote.values())

    # Weeks later (a new UidMap, as after a restart) someone sends the study again.
    second = request_forward(box.db, box.config, study, "hub", "urgent", "nurse2")
    assert second != first["id"]
    box.drain()
    assert study_forwarding(box.db, study)[0]["state"] == "confirmed"
    again = {r["sop_instance_uid"]: r["remote_sop_instance_uid"]
             for r in box.db.query("SELECT * FROM outbox_instances WHERE item_id = ?", (second,))}
    assert again == remote
    assert box.db.query("SELECT remote_study_uid FROM outbox_items WHERE id = ?", (second,))[0]["remote_study_uid"] \
        == image.StudyInstanceUID
    assert orthanc.instance_count() == 2  # the same instances on the hub, not a second copy
    assert {UidMap(box.db).uid(s) for s in remote} == set(remote.values())
    # Another box (its own secret) would produce other UIDs for the same originals.
    other = make_box(tmp_path / "other-box", hub_destination(orthanc))
    assert not {UidMap(other.db).uid(s) for s in remote} & set(remote.values())


@pytest.fixture
def report_box(tmp_path, orthanc):
    """A box whose SCP (in-process, with the report hook as `appliance serve` wires it) allows
    the modality and the hub's AE title ``HUB``; destination ``hub`` names ``HUB`` as report_ae."""
    port = free_port()
    box = make_box(tmp_path, f'[dicom]\nhost = "127.0.0.1"\nport = {port}\nallowed_calling_aes = ["{CALLING_AE}", '
                             f'"{HUB_AE}"]\n', hub_destination(orthanc, report_ae=HUB_AE),
                   environ={"APPLIANCE_DESTINATIONS_HUB_PASSWORD": PASSWORD})
    server = start_scp(box.config, box.store, report_hook=reports.scp_hook(box.config, box.db, box.store))
    box.port = port  # type: ignore[attr-defined]
    yield box
    server.shutdown()


def test_sr_pushed_by_the_allowed_hub_ae_is_accepted(tmp_path, orthanc, report_box):
    study, image = forwarded_study(report_box, tmp_path, orthanc)
    report = tmp_path / "report.dcm"
    report.write_bytes(report_sr(image, "No acute cardiopulmonary abnormality."))
    sent = dcmsend(report_box.port, [report], aet=HUB_AE)
    assert sent.returncode == 0, sent.stderr
    (back,) = study_reports(report_box.db, study)
    assert back["received_via"] == "c-store" and "No acute cardiopulmonary abnormality." in back["text"]
    stored = pydicom.dcmread(back["file_path"])
    assert stored.StudyInstanceUID == study and stored.PatientID == "P-0042"


def test_sr_pushed_by_another_ae_is_rejected(tmp_path, orthanc, report_box):
    study, image = forwarded_study(report_box, tmp_path, orthanc)
    before = report_box.db.query("SELECT COUNT(*) AS n FROM instances")[0]["n"]
    report = tmp_path / "report.dcm"
    report.write_bytes(report_sr(image, "Pushed by a stranger."))
    sent = dcmsend(report_box.port, [report], aet="STRANGER")
    assert sent.returncode != 0 and "Association Rejected" in sent.stdout + sent.stderr
    assert study_reports(report_box.db, study) == []
    assert report_box.db.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == before
    assert report_box.db.query("SELECT state FROM studies WHERE study_uid = ?", (study,))[0]["state"] != \
        "report_received"


def test_report_ae_must_also_be_an_allowed_calling_ae(tmp_path, orthanc):
    port = free_port()
    box = make_box(tmp_path, f'[dicom]\nhost = "127.0.0.1"\nport = {port}\nallowed_calling_aes = ["{CALLING_AE}"]\n',
                   hub_destination(orthanc, report_ae=HUB_AE), environ={"APPLIANCE_DESTINATIONS_HUB_PASSWORD": PASSWORD})
    server = start_scp(box.config, box.store, report_hook=reports.scp_hook(box.config, box.db, box.store))
    try:
        study, image = forwarded_study(box, tmp_path, orthanc)
        report = tmp_path / "report.dcm"
        report.write_bytes(report_sr(image, "Not on the allow-list."))
        assert dcmsend(port, [report], aet=HUB_AE).returncode != 0
        assert study_reports(box.db, study) == []
    finally:
        server.shutdown()
