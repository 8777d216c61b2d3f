"""The UI on top of the real outbox: the forward button, the study view's forwarding and report
sections, cancel/retry with roles and CSRF, and the status screen's outbox and destinations.

Items are made by the real ``request_forward`` (through the button), attempts by the real
forwarder against an unused loopback port, failures and reports by the outbox's and the report
channel's own functions."""
from __future__ import annotations

import re
from typing import Any

import pydicom

from appliance import accounts
from appliance.forward import outbox, reports, request_forward
from appliance.forward.deid import UidMap
from appliance.forward.service import Forwarder
from appliance.store import InstanceStore
from tests.forward.test_forward_deid import report_sr
from tests.web.conftest import CHEST, CT, login

BURNED_IN = ("image has burned-in annotation (BurnedInAnnotation YES): patient text may be in the pixels, "
             "which de-identification cannot remove")


def _section(html: str, section_id: str) -> str:
    match = re.search(rf'<section class="card" id="{section_id}">(.*?)</section>', html, re.DOTALL)
    assert match, f"no #{section_id} section"
    return match.group(1)


def _forward(client: Any, token: str, uid: str, destination: str = "hub", priority: str = "routine") -> Any:
    return client.post(f"/study/{uid}/forward", data={"csrf_token": token, "destination": destination,
                                                      "priority": priority}, follow_redirects=True)


def _actions(db: Any, uid: str) -> list[tuple[str, str]]:
    return [(r["actor"], r["action"]) for r in db.query(
        "SELECT actor, action FROM audit_log WHERE study_uid = ? AND action LIKE 'forward%' ORDER BY id", (uid,))]


def test_forward_button_queues_and_the_study_shows_it(hub_app: Any) -> None:
    client = hub_app.test_client()
    token = login(client, "staff")
    uid = hub_app.config["STUDY_UIDS"][CHEST]
    db = hub_app.extensions["appliance_db"]
    assert "Not forwarded." in _section(client.get(f"/study/{uid}").text, "forwarding")
    page = _forward(client, token, uid)
    assert "Queued for hub." in page.text
    forwarding = _section(page.text, "forwarding")
    assert "<strong>hub</strong>" in forwarding and '<span class="outbox-state">Queued</span>' in forwarding
    assert "Requested by staff" in forwarding and "outbox-cancel" in forwarding and "outbox-retry-btn" not in forwarding
    # The same request again is the same item (request_forward is idempotent), and still audited.
    again = _forward(client, token, uid, priority="urgent")
    assert "Already queued for hub" in again.text
    (item,) = db.query("SELECT * FROM outbox_items WHERE study_uid = ?", (uid,))
    assert item["priority"] == "urgent" and item["requested_by"] == "staff"
    assert _actions(db, uid) == [("staff", "forward_request"), ("staff", "forward_request")]
    row = next(r for r in client.get("/api/worklist").json["rows"] if r["study_uid"] == uid)
    assert {c["stage"]: c["label"] for c in row["chips"]}["sent"] == "Send queued"
    assert [r["study_uid"] for r in client.get("/api/worklist?state=sent").json["rows"]] == [uid]


def test_unknown_destination_or_study_is_a_clear_message(hub_app: Any) -> None:
    client = hub_app.test_client()
    token = login(client, "admin")
    uid = hub_app.config["STUDY_UIDS"][CHEST]
    response = client.post(f"/study/{uid}/forward", data={"csrf_token": token, "destination": "elsewhere",
                                                          "priority": "routine"})
    assert response.status_code == 302 and response.headers["Location"].endswith(f"/study/{uid}")
    assert "“elsewhere” is not a configured destination; nothing was queued." in client.get(f"/study/{uid}").text
    gone = client.post("/study/9.9.9.9/forward", data={"csrf_token": token, "destination": "hub",
                                                       "priority": "routine"})
    assert gone.status_code == 302 and gone.headers["Location"].endswith("/")
    assert "That study is not on this device; nothing was queued." in client.get("/").text
    assert client.post(f"/study/{uid}/forward", data={"csrf_token": token, "destination": "hub",
                                                      "priority": "whenever"}, follow_redirects=True).status_code == 200
    assert hub_app.extensions["appliance_db"].query("SELECT COUNT(*) AS n FROM outbox_items")[0]["n"] == 0


def test_cancel_and_retry_roles_csrf_and_audit(hub_app: Any) -> None:
    uid = hub_app.config["STUDY_UIDS"][CHEST]
    db = hub_app.extensions["appliance_db"]
    item = request_forward(db, hub_app.config["APPLIANCE"], uid, "hub", requested_by="admin")
    viewer = hub_app.test_client()
    viewer_token = login(viewer, "viewer")
    forwarding = _section(viewer.get(f"/study/{uid}").text, "forwarding")
    assert "Queued" in forwarding and "<button" not in forwarding  # sees the state, no buttons
    for action in ("cancel", "retry"):
        assert viewer.post(f"/study/{uid}/outbox/{item}/{action}", data={"csrf_token": viewer_token}).status_code == 403
    assert viewer.post(f"/study/{uid}/forward", data={"csrf_token": viewer_token, "destination": "hub"}
                       ).status_code == 403
    staff = hub_app.test_client()
    token = login(staff, "staff")
    assert staff.post(f"/study/{uid}/outbox/{item}/cancel").status_code == 400  # no CSRF token
    assert staff.post(f"/study/{uid}/outbox/{item}/cancel", data={"csrf_token": "forged"}).status_code == 400
    other = hub_app.config["STUDY_UIDS"][CT]  # an item id cannot be reached through another study
    assert staff.post(f"/study/{other}/outbox/{item}/cancel", data={"csrf_token": token}).status_code == 404
    assert db.query("SELECT state FROM outbox_items WHERE id = ?", (item,))[0]["state"] == "queued"

    page = staff.post(f"/study/{uid}/outbox/{item}/cancel", data={"csrf_token": token}, follow_redirects=True).text
    assert "Forwarding cancelled." in page
    forwarding = _section(page, "forwarding")
    assert '<span class="outbox-state">Cancelled</span>' in forwarding
    assert "outbox-retry-btn" in forwarding and "outbox-cancel" not in forwarding
    again = staff.post(f"/study/{uid}/outbox/{item}/cancel", data={"csrf_token": token}, follow_redirects=True).text
    assert "can no longer be cancelled" in again
    page = staff.post(f"/study/{uid}/outbox/{item}/retry", data={"csrf_token": token}, follow_redirects=True).text
    assert "Forwarding queued again." in page and '<span class="outbox-state">Queued</span>' in page
    refused = staff.post(f"/study/{uid}/outbox/{item}/retry", data={"csrf_token": token}, follow_redirects=True).text
    assert "Only a failed or cancelled forwarding can be retried" in refused
    assert _actions(db, uid) == [("admin", "forward_request"), ("staff", "forward_cancel"), ("staff", "forward_retry")]


def test_trying_and_failed_items_say_why(hub_app: Any) -> None:
    config = hub_app.config["APPLIANCE"]
    db = hub_app.extensions["appliance_db"]
    uid, ct = hub_app.config["STUDY_UIDS"][CHEST], hub_app.config["STUDY_UIDS"][CT]
    trying = request_forward(db, config, uid, "hub")
    # One real attempt: the hub's port is closed, so the item keeps trying with a last error.
    forwarder = Forwarder(config, db, InstanceStore(config.data_dir, db, 0))
    try:
        assert forwarder.run_once()
    finally:
        forwarder.stop()
    item = outbox.get_item(db, trying)
    assert item is not None and item["state"] == "sending" and item["last_error"]
    # A burned-in image blocked by policy, recorded the way the sender records it.
    failed = request_forward(db, config, ct, "hub")
    outbox.refresh_instances(db, {"id": failed, "study_uid": ct}, attach_ai_results=False)
    sops = [r["sop_instance_uid"] for r in outbox.instances(db, failed)]
    outbox.mark_instances(db, failed, [{"sop_instance_uid": s, "state": "blocked", "reason": BURNED_IN} for s in sops])
    assert outbox.settle(db, failed) == "failed"

    client = hub_app.test_client()
    login(client, "staff")
    forwarding = _section(client.get(f"/study/{uid}").text, "forwarding")
    assert "Sending" in forwarding and f"Last error: {item['last_error']}" in forwarding
    assert "Next attempt: " in forwarding and "Not sent" not in forwarding
    forwarding = _section(client.get(f"/study/{ct}").text, "forwarding")
    assert "Failed" in forwarding and "Not sent: " in forwarding and "burned-in annotation" in forwarding
    assert "Next attempt" not in forwarding and "outbox-retry-btn" in forwarding and "outbox-cancel" in forwarding
    row = next(r for r in client.get("/api/worklist").json["rows"] if r["study_uid"] == ct)
    assert {c["stage"]: c["label"] for c in row["chips"]}["sent"] == "Send failed"

    status = client.get("/status").text
    queues = _section(status, "queues")
    assert re.search(r'id="outbox-sending">1<', queues) and re.search(r'id="outbox-failed" class="bad">1<', queues)
    assert re.search(r'id="outbox-queued">0<', queues)
    destinations = _section(status, "destinations")
    assert 'data-destination="hub"' in destinations and "1 items" in destinations and "1 failed" in destinations
    assert re.search(r"\d+(\.\d)? (kB|MB) pending", destinations), destinations
    assert "Last successful contact" in destinations and "never" in destinations
    assert "Next retry" in destinations and item["last_error"] in destinations


def test_report_text_shows_escaped_and_marks_the_case(hub_app: Any) -> None:
    config = hub_app.config["APPLIANCE"]
    db = hub_app.extensions["appliance_db"]
    uid = hub_app.config["STUDY_UIDS"][CHEST]
    client = hub_app.test_client()
    login(client, "viewer")
    assert "No report yet." in _section(client.get(f"/study/{uid}").text, "report")
    path = db.query("SELECT file_path FROM instances WHERE study_uid = ? AND source != 'ai'", (uid,))[0]["file_path"]
    image = pydicom.dcmread(path, stop_before_pixels=True)
    text = "Consolidation <b>right</b> lower lobe.\nFollow-up in 6 weeks."
    # A report from a destination that does not de-identify: the study UID is the original.
    reports.ingest(db, InstanceStore(config.data_dir, db, 0), UidMap(db), report_sr(image, text), "hub", "dicomweb")
    section = _section(client.get(f"/study/{uid}").text, "report")
    assert "No report yet." not in section and "Structured report" in section and "from hub" in section
    assert "received " in section and '<pre class="report-text">' in section
    assert "Finding: Consolidation &lt;b&gt;right&lt;/b&gt; lower lobe.\nFollow-up in 6 weeks." in section
    row = next(r for r in client.get("/api/worklist").json["rows"] if r["study_uid"] == uid)
    assert row["state"] == "report_received"
    current = [c for c in row["chips"] if c["current"]]
    assert [(c["stage"], c["label"]) for c in current] == [("report_received", "Report back")]
    assert [r["study_uid"] for r in client.get("/api/worklist?state=report_received").json["rows"]] == [uid]
    fr = hub_app.test_client()
    accounts.set_language(db, accounts.find_user(db, "staff").id, "fr")
    login(fr, "staff")
    page = fr.get(f"/study/{uid}").text
    assert "Compte rendu structuré" in page and "Envois" in page and "Non envoyé." in page


def test_sizes_in_words(hub_app: Any) -> None:
    from web.core.formatting import human_bytes

    with hub_app.test_request_context(headers={"Accept-Language": "en"}):
        assert [human_bytes(n) for n in (0, 999, 7_200_056, 812_400, 1_400_000_000, 250_000_000)] == \
            ["0 B", "999 B", "7.2 MB", "812 kB", "1.4 GB", "250 MB"]
    with hub_app.test_request_context(headers={"Accept-Language": "fr"}):
        assert human_bytes(7_200_056) == "7,2 Mo"
