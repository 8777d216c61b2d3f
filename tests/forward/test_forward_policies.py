"""Forwarding policy with a real Orthanc: automatic rules (an urgent study goes by itself, once,
first; a reviewed one to its destination; a cancelled one is not re-queued) and burned-in
annotation (held back from a de-identifying destination unless it allows it, and the case says why;
the box's own heatmap, whose burned-in text the box wrote, still goes)."""
from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest

from appliance.forward import cancel_item, request_forward, rules, study_forwarding
from appliance.forward.service import Forwarder
from appliance.store import utc_now
from tests.analyze.toy_package import MODEL_ID, build_package, write_manifest
from tests.forward.conftest import PASSWORD, USER
from tests.forward.local_peers import make_box
from tests.forward.util import new_study
from tests.helpers import sample

SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
ENV = {"APPLIANCE_DESTINATIONS_HUB_PASSWORD": PASSWORD, "APPLIANCE_DESTINATIONS_REVIEW_PASSWORD": PASSWORD}


@pytest.fixture(scope="module")
def urgent_engines(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy chest model with its operating point at 0.01: a real chest CR is deterministically
    positive, so its study is urgent."""
    root = tmp_path_factory.mktemp("forward-engines")
    build_package(root, MODEL_ID, "cxr", int8=False)
    write_manifest(root / MODEL_ID, MODEL_ID, threshold=0.01, kind="cxr")
    return root


def web_destination(name: str, hub, **options) -> str:
    lines = ["[[destinations]]", f'name = "{name}"', 'kind = "dicomweb"', f'url = "{hub.dicomweb_url}"',
             f'username = "{USER}"', "retry_max_s = 60"]
    lines += [f"{k} = {str(v).lower() if isinstance(v, bool) else repr(v)}" for k, v in options.items()]
    return "\n".join(lines) + "\n"


def analysed_box(tmp_path: Path, engines: Path, *tables: str):
    box = make_box(tmp_path, f'[analyze]\nengines_dir = "{engines}"\n', *tables, environ=ENV)
    from appliance.pipeline import Pipeline

    chest = box.store.store(sample("RG1_UNCR.dcm").read_bytes(), calling_ae="MODALITY", source="dicom")
    ct = box.store.store(sample("CT_small.dcm").read_bytes(), calling_ae="MODALITY", source="dicom")
    Pipeline(box.config, box.db, box.store).run_until_idle()
    return box, chest.study_uid, ct.study_uid


def hub_classes(hub) -> list[str]:
    return sorted(str(pydicom.dcmread(io.BytesIO(hub.instance_file(i)), stop_before_pixels=True).SOPClassUID)
                  for i in hub.instance_ids())


def test_rules_queue_urgent_and_reviewed_studies_once(tmp_path, orthanc_factory, urgent_engines):
    hub, review = orthanc_factory("hub").start(), orthanc_factory("review").start()
    box, chest, ct = analysed_box(
        tmp_path, urgent_engines, web_destination("hub", hub, deidentify=True),
        web_destination("review", review, deidentify=False, attach_ai_results=False),
        '[[forward_rules]]\nwhen = "urgent"\nto = "hub"\npriority = "urgent"\n',
        '[[forward_rules]]\nwhen = "reviewed"\nto = "review"\n')
    priorities = {r["study_uid"]: r["priority"] for r in box.db.query("SELECT study_uid, priority FROM studies")}
    assert priorities[chest] == "urgent" and priorities[ct] != "urgent", priorities

    assert rules.evaluate(box.db, box.config) == 1
    (item,) = study_forwarding(box.db, chest)
    assert (item["destination"], item["priority"], item["origin"], item["requested_by"]) == \
        ("hub", "urgent", "rule:urgent", "system")
    assert study_forwarding(box.db, ct) == []
    assert rules.evaluate(box.db, box.config) == 0  # durable and idempotent: no second item

    # A clinician reviews the CT: the "reviewed" rule sends it to the review hub.
    with box.db.atomic() as tx:
        tx.execute("INSERT INTO reviews (study_uid, username, at) VALUES (?, 'dr', ?)", (ct, utc_now()))
    assert rules.evaluate(box.db, box.config) == 1
    (reviewed,) = study_forwarding(box.db, ct)
    assert (reviewed["destination"], reviewed["priority"], reviewed["origin"]) == ("review", "routine", "rule:reviewed")

    # The sender sends the urgent item first, though the routine one is no older.
    forwarder = Forwarder(box.config, box.db, box.store)
    try:
        assert forwarder.run_once()
        assert study_forwarding(box.db, chest)[0]["state"] == "confirmed"
        assert study_forwarding(box.db, ct)[0]["state"] == "queued"
        assert forwarder.run_once()
    finally:
        forwarder.stop()
    assert study_forwarding(box.db, ct)[0]["state"] == "confirmed"
    # The urgent chest went with its AI SR and heatmap; the heatmap carries BurnedInAnnotation YES
    # but its text is the box's own, so the de-identifying hub still gets it.
    classes = hub_classes(hub)
    assert len(classes) == 3 and SECONDARY_CAPTURE in classes and any(c.startswith(SR_PREFIX) for c in classes)
    heatmap = next(i for i in hub.instance_ids() if hub.tags(i)["SOPClassUID"] == SECONDARY_CAPTURE)
    assert hub.tags(heatmap)["BurnedInAnnotation"] == "YES" and hub.tags(heatmap)["PatientIdentityRemoved"] == "YES"
    assert review.instance_count() == 1  # the CT alone (attach_ai_results = false)


def test_a_cancelled_rule_item_is_not_queued_again(tmp_path, urgent_engines):
    box, chest, _ = analysed_box(
        tmp_path, urgent_engines, '[[destinations]]\nname = "hub"\nkind = "dicomweb"\n'
        'url = "http://127.0.0.1:9/dicom-web"\n', '[[forward_rules]]\nwhen = "urgent"\nto = "hub"\n')
    assert rules.evaluate(box.db, box.config) == 1
    (item,) = study_forwarding(box.db, chest)
    cancel_item(box.db, item["id"], "admin")
    assert rules.evaluate(box.db, box.config) == 0
    assert [i["state"] for i in study_forwarding(box.db, chest)] == ["cancelled"]
    # A person can still send it on purpose: a new item.
    assert request_forward(box.db, box.config, chest, "hub", "urgent", "nurse1") != item["id"]


def test_burned_in_images_only_go_where_allowed(tmp_path, orthanc):
    box = make_box(tmp_path,
                   web_destination("strict", orthanc, deidentify=True, attach_ai_results=False),
                   web_destination("allows", orthanc, deidentify=True, allow_burned_in=True, attach_ai_results=False),
                   web_destination("identified", orthanc, deidentify=False, attach_ai_results=False),
                   environ={f"APPLIANCE_DESTINATIONS_{n.upper()}_PASSWORD": PASSWORD
                            for n in ("strict", "allows", "identified")})
    us = new_study(pydicom.dcmread(sample("US1_UNCR.dcm")), tmp_path / "us.dcm", BurnedInAnnotation="YES",
                   PatientName="DOE^JANE", PatientID="P-0042")
    outcome = box.store.store(us.read_bytes(), calling_ae="MODALITY", source="dicom")
    study, sop = outcome.study_uid, outcome.sop_instance_uid

    # strict: nothing leaves, and the case says why.
    request_forward(box.db, box.config, study, "strict", "routine", "nurse1")
    box.drain()
    (strict,) = study_forwarding(box.db, study)
    assert strict["state"] == "failed" and strict["instances"]["blocked"] == 1, strict
    assert "1 of 1 instances not sent: image has burned-in annotation (BurnedInAnnotation YES)" in strict["reason"]
    assert "allow_burned_in" in strict["reason"] and strict["last_error"] == ""
    assert orthanc.instance_count() == 0

    # allows: sent de-identified, flag kept; identified: sent as stored (no de-identification to defeat).
    request_forward(box.db, box.config, study, "allows", "routine", "admin")
    request_forward(box.db, box.config, study, "identified", "routine", "admin")
    box.drain()
    states = {i["destination"]: i["state"] for i in study_forwarding(box.db, study)}
    assert states == {"strict": "failed", "allows": "confirmed", "identified": "confirmed"}
    on_hub = {t["SOPInstanceUID"]: t for t in (orthanc.tags(i) for i in orthanc.instance_ids())}
    assert len(on_hub) == 2 and sop in on_hub
    assert on_hub[sop]["PatientName"] == "DOE^JANE"
    (deid,) = [t for uid, t in on_hub.items() if uid != sop]
    assert deid["PatientIdentityRemoved"] == "YES" and deid["BurnedInAnnotation"] == "YES"
    assert deid["PatientID"] != "P-0042" and "DOE" not in deid["PatientName"]
