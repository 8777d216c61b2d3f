"""A peer's explicit refusal of a dataset fails the item permanently with the reason, while the
other instances still arrive; a network error or a busy peer (0xA7xx, HTTP 503) only backs off and
retries.  Peers: a pynetdicom Storage SCP answering chosen C-STORE statuses, and a minimal STOW-RS
server listing chosen instances in FailedSOPSequence (Orthanc cannot be made to refuse one)."""
from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from appliance.forward import destination_status, retry_item, study_forwarding
from appliance.forward.outbox import instances
from tests.forward.local_peers import StoreScp, StowPeer, make_box
from tests.helpers import sample


def dicom_destination(port: int) -> str:
    return ('[[destinations]]\nname = "pacs"\nkind = "dicom"\nhost = "127.0.0.1"\n'
            f'port = {port}\ncalled_ae = "{StoreScp.AE_TITLE}"\ndeidentify = false\nattach_ai_results = false\n'
            "retry_max_s = 60\n")


def dicomweb_destination(url: str) -> str:
    return (f'[[destinations]]\nname = "pacs"\nkind = "dicomweb"\nurl = "{url}"\ndeidentify = false\n'
            "attach_ai_results = false\nretry_max_s = 60\n")


def store_study(box, n: int) -> tuple[str, list[str]]:
    """``n`` CT instances of one new study on the box: (study uid, sop uids in send order)."""
    template = pydicom.dcmread(sample("CT_small.dcm"))
    study, series = generate_uid(), generate_uid()
    sops = []
    for i in range(n):
        ds = template.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        path = box.config.data_dir.parent / "in" / f"{i}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        box.store.store(path.read_bytes(), source="dicom")
        sops.append(str(ds.SOPInstanceUID))
    return study, sops


def states(box, item_id: int) -> dict[str, tuple[str, str]]:
    return {r["sop_instance_uid"]: (r["state"], r["reason"])
            for r in instances(box.db, item_id, ("pending", "sent", "confirmed", "refused", "blocked"))}


def forward(box, study: str) -> int:
    from appliance.forward import request_forward

    return request_forward(box.db, box.config, study, "pacs", "routine", "nurse1")


@pytest.fixture
def scp():
    peer = StoreScp().start()
    yield peer
    peer.stop()


def test_cstore_refusals_fail_the_item_with_reasons_and_the_rest_arrives(tmp_path, scp):
    box = make_box(tmp_path, dicom_destination(scp.port))
    study, (good, mismatch, unreadable) = store_study(box, 3)
    scp.answers = {mismatch: [0xA900], unreadable: [0xC000]}
    item_id = forward(box, study)
    box.drain()

    (item,) = study_forwarding(box.db, study)
    assert item["state"] == "failed", item
    assert item["instances"] == {"pending": 0, "sent": 0, "confirmed": 1, "refused": 2, "blocked": 0, "total": 3}
    assert item["reason"].startswith("2 of 3 instances not sent: ")
    assert "pacs refused the dataset: status 0xA900 test peer answers 0xA900" in item["reason"]
    assert "status 0xC000" in item["reason"]
    assert item["last_error"] == "" and item["next_attempt_at"] == ""  # not waiting for anything
    per_instance = states(box, item_id)
    assert per_instance[good] == ("confirmed", "")
    assert per_instance[mismatch][0] == per_instance[unreadable][0] == "refused"
    assert set(scp.stored[study]) == {good}
    # One attempt each: a refusal is not retried.
    assert scp.attempts == {good: 1, mismatch: 1, unreadable: 1}
    event = box.db.query("SELECT detail FROM events WHERE kind = 'forward_failed' AND study_uid = ?", (study,))
    assert len(event) == 1 and json.loads(event[0]["detail"])["reason"] == item["reason"]
    (audit,) = box.db.query("SELECT actor FROM audit_log WHERE action = 'forward_failed' AND study_uid = ?", (study,))
    assert audit["actor"] == "nurse1"
    (dest,) = destination_status(box.db, box.config)
    assert dest["failed_items"] == 1 and dest["queue_length"] == 0 and dest["consecutive_failures"] == 0
    assert dest["last_success_at"]  # the peer was reachable: a refusal is not a link problem

    # `outbox retry` after the hub's administrator fixed the cause: the refused ones go again.
    scp.answers = {}
    retry_item(box.db, item_id, "admin")
    box.drain()
    assert study_forwarding(box.db, study)[0]["state"] == "confirmed"
    assert set(scp.stored[study]) == {good, mismatch, unreadable}
    assert scp.attempts[good] == 1  # the confirmed one was not sent again


def test_cstore_out_of_resources_is_retried_not_refused(tmp_path, scp):
    box = make_box(tmp_path, dicom_destination(scp.port))
    study, (first, second) = store_study(box, 2)
    scp.answers = {second: [0xA700, 0x0000]}
    item_id = forward(box, study)
    box.drain()

    (item,) = study_forwarding(box.db, study)
    assert item["state"] == "sending" and item["reason"] == "", item
    assert "temporarily unable to store (status 0xA700)" in item["last_error"]
    assert item["instances"]["refused"] == 0 and item["instances"]["pending"] == 1
    assert destination_status(box.db, box.config)[0]["consecutive_failures"] == 1

    retry_item(box.db, item_id, "test")  # the backoff has passed
    box.drain()
    assert study_forwarding(box.db, study)[0]["state"] == "confirmed"
    assert set(scp.stored[study]) == {first, second} and scp.attempts == {first: 1, second: 2}


def test_cstore_peer_down_keeps_retrying_then_delivers(tmp_path):
    scp = StoreScp()  # not listening yet: the link is down
    box = make_box(tmp_path, dicom_destination(scp.port))
    study, sops = store_study(box, 2)
    item_id = forward(box, study)
    try:
        for attempt in (1, 2, 3):
            box.drain()
            (item,) = study_forwarding(box.db, study)
            assert item["state"] == "sending" and item["attempts"] == attempt and item["reason"] == "", item
            assert f"127.0.0.1:{scp.port}" in item["last_error"]
            assert destination_status(box.db, box.config)[0]["consecutive_failures"] == attempt
            retry_item(box.db, item_id, "test")
        scp.start()
        box.drain()
        assert study_forwarding(box.db, study)[0]["state"] == "confirmed"
        assert set(scp.stored[study]) == set(sops)
    finally:
        scp.stop()


def test_stowrs_failed_sop_sequence_fails_the_item_with_the_reason(tmp_path):
    peer = StowPeer().start()
    try:
        box = make_box(tmp_path, dicomweb_destination(peer.url))
        study, (good, refused) = store_study(box, 2)
        peer.refuse = {refused: 0xA900}
        item_id = forward(box, study)
        box.drain()

        (item,) = study_forwarding(box.db, study)
        assert item["state"] == "failed", item
        assert item["instances"]["confirmed"] == 1 and item["instances"]["refused"] == 1
        assert "pacs refused the dataset (STOW-RS FailureReason 43264)" in item["reason"]
        assert states(box, item_id)[good] == ("confirmed", "")
        assert peer.stored == {study: {good}}
    finally:
        peer.close()


def test_stowrs_single_instance_refused_with_http_409(tmp_path):
    peer = StowPeer().start()
    try:
        box = make_box(tmp_path, dicomweb_destination(peer.url))
        study, (only,) = store_study(box, 1)
        peer.refuse = {only: 0xC000}
        forward(box, study)
        box.drain()
        (item,) = study_forwarding(box.db, study)
        assert item["state"] == "failed" and "FailureReason 49152" in item["reason"], item
        assert peer.stored == {}
    finally:
        peer.close()


def test_stowrs_server_error_keeps_retrying(tmp_path):
    peer = StowPeer(http_status=503).start()
    try:
        box = make_box(tmp_path, dicomweb_destination(peer.url))
        study, sops = store_study(box, 2)
        item_id = forward(box, study)
        box.drain()
        (item,) = study_forwarding(box.db, study)
        assert item["state"] == "sending" and item["reason"] == "" and "HTTP 503" in item["last_error"], item
        assert item["instances"]["pending"] == 2 and item["instances"]["refused"] == 0

        peer.http_status = 0  # the hub recovers
        retry_item(box.db, item_id, "test")
        box.drain()
        assert study_forwarding(box.db, study)[0]["state"] == "confirmed"
        assert peer.stored == {study: set(sops)}
    finally:
        peer.close()


def test_an_unreadable_stored_file_is_blocked_not_retried_forever(tmp_path, scp):
    """The box's own problem with one file must not hold the other instances back."""
    box = make_box(tmp_path, dicom_destination(scp.port))
    study, (good, damaged) = store_study(box, 2)
    (row,) = box.db.query("SELECT file_path FROM instances WHERE sop_instance_uid = ?", (damaged,))
    Path(row["file_path"]).write_bytes(b"not dicom at all")
    item_id = forward(box, study)
    box.drain()
    (item,) = study_forwarding(box.db, study)
    assert item["state"] == "failed" and "stored file unreadable on the box" in item["reason"], item
    assert states(box, item_id)[good] == ("confirmed", "") and states(box, item_id)[damaged][0] == "blocked"
    assert set(scp.stored[study]) == {good}
