"""Screens with real analysed studies: worklist content and filters, study view, review and
forward with their audit entries, images, alerts, status and admin pages."""
from __future__ import annotations

import io
import json
from typing import Any

from PIL import Image

from appliance import accounts
from tests.web.conftest import CHEST, CLIP, CT, HUB_SECRET, login


def test_worklist_triage_order_and_summaries(study_app: Any) -> None:
    client = study_app.test_client()
    login(client, "viewer")
    data = client.get("/api/worklist").json
    rows = data["rows"]
    uids = study_app.config["STUDY_UIDS"]
    assert [r["study_uid"] for r in rows][0] == uids[CHEST]
    top = rows[0]
    assert top["priority"] == "urgent" and top["priority_label"] == "Urgent"
    assert top["ai"]["kind"] == "positive" and top["ai"]["text"].startswith("Bright image 0.")
    assert top["modalities"] == "CR" and top["age"].endswith(" y") and top["patient_id"]
    ct = next(r for r in rows if r["study_uid"] == uids[CT])
    assert ct["ai"]["text"] == "abstained: no AI model for this type of image"
    assert [c["stage"] for c in top["chips"]] == ["received", "analyzed", "reviewed", "sent", "report_received"]
    html = client.get("/").text
    assert html.index(uids[CHEST]) < html.index(uids[CT])
    assert "prio-urgent" in html and ">Urgent<" in html  # colour class and words


def test_worklist_search_filter_pagination(study_app: Any) -> None:
    study_app.config["WORKLIST_PAGE_SIZE"] = 2
    client = study_app.test_client()
    login(client, "viewer")
    first = client.get("/api/worklist").json
    assert first["total"] == 3 and first["pages"] == 2 and len(first["rows"]) == 2
    assert len(client.get("/api/worklist?page=2").json["rows"]) == 1
    urgent = client.get("/api/worklist?priority=urgent").json
    assert [r["priority"] for r in urgent["rows"]] == ["urgent"]
    chest_id = first["rows"][0]["patient_id"]
    found = client.get(f"/api/worklist?q={chest_id}").json["rows"]
    assert [r["patient_id"] for r in found] == [chest_id]
    assert client.get("/api/worklist?q=nobody-has-this").json["total"] == 0
    assert client.get("/api/worklist?state=reviewed").json["total"] == 0
    page = client.get("/?priority=urgent&q=" + chest_id)
    assert page.status_code == 200 and "Page 1 of 1" in page.text


def test_study_view_shows_ai_honestly_and_is_audited(study_app: Any) -> None:
    client = study_app.test_client()
    login(client, "staff")
    uid = study_app.config["STUDY_UIDS"][CHEST]
    html = client.get(f"/study/{uid}").text
    assert "AI assist — not a diagnosis" in html
    assert "Toy model for tests" in html and "0.0.1" in html
    assert "operating point 0.01" in html and "above threshold" in html
    assert "No report yet." in html
    db = study_app.extensions["appliance_db"]
    entry = db.query("SELECT * FROM audit_log WHERE action = 'view_study' ORDER BY id DESC LIMIT 1")[0]
    assert entry["actor"] == "staff" and entry["study_uid"] == uid and entry["at"]
    ct_html = client.get(f"/study/{study_app.config['STUDY_UIDS'][CT]}").text
    assert "no AI model for this type of image" in ct_html


def test_images_and_heatmap_render_as_png(study_app: Any) -> None:
    client = study_app.test_client()
    login(client, "viewer")
    uid = study_app.config["STUDY_UIDS"][CHEST]
    db = study_app.extensions["appliance_db"]
    sop = db.query("SELECT sop_instance_uid FROM instances WHERE study_uid = ? AND source != 'ai'", (uid,))[0]
    result = db.query("SELECT id FROM analysis_results WHERE study_uid = ? AND heatmap_path != ''", (uid,))[0]
    for url in (f"/study/{uid}/image/{sop['sop_instance_uid']}.png",
                f"/study/{uid}/image/{sop['sop_instance_uid']}.png?preset=lungs",
                f"/study/{uid}/heatmap/{result['id']}.png"):
        response = client.get(url)
        assert response.status_code == 200 and response.mimetype == "image/png", url
        assert response.headers["Cache-Control"] == "no-store"
        assert Image.open(io.BytesIO(response.data)).size[0] > 100
    assert client.get(f"/study/{uid}/image/{sop['sop_instance_uid']}.png?preset=bogus").status_code == 400
    assert client.get(f"/study/{uid}/image/1.2.3.png").status_code == 404
    clip_uid = study_app.config["STUDY_UIDS"][CLIP]
    clip_sop = db.query("SELECT sop_instance_uid FROM instances WHERE study_uid = ? AND source != 'ai'",
                        (clip_uid,))[0]["sop_instance_uid"]
    frame = client.get(f"/study/{clip_uid}/image/{clip_sop}.png?frame=7")
    assert frame.status_code == 200
    assert client.get(f"/study/{clip_uid}/image/{clip_sop}.png?frame=9999").status_code == 404
    assert 'id="frame"' in client.get(f"/study/{clip_uid}").text


def test_review_and_forward_are_recorded_and_audited(hub_app: Any) -> None:
    study_app = hub_app
    client = study_app.test_client()
    token = login(client, "staff", method="pin")
    uid = study_app.config["STUDY_UIDS"][CHEST]
    db = study_app.extensions["appliance_db"]
    result_id = db.query("SELECT id FROM analysis_results WHERE study_uid = ? AND status = 'analyzed'", (uid,))[0]["id"]
    response = client.post(f"/study/{uid}/review", data={"csrf_token": token, f"verdict:{result_id}:bright": "agree",
                                                         "note": "agree"})
    assert response.status_code == 302
    assert client.post(f"/study/{uid}/review", data={"csrf_token": token, f"verdict:{result_id}:bright": "maybe"}
                       ).status_code == 400
    review = db.query("SELECT * FROM reviews WHERE study_uid = ?", (uid,))
    assert len(review) == 1 and json.loads(review[0]["verdicts_json"]) == {f"{result_id}:bright": "agree"}
    assert db.query("SELECT state FROM studies WHERE study_uid = ?", (uid,))[0]["state"] == "reviewed"
    assert client.get("/api/worklist?state=sent").json["total"] == 0
    response = client.post(f"/study/{uid}/forward", data={"csrf_token": token, "destination": "hub",
                                                          "priority": "urgent"})
    assert response.status_code == 302
    # The button queues a real outbox item at once; nothing goes through forward_requests any more.
    (item,) = db.query("SELECT * FROM outbox_items WHERE study_uid = ?", (uid,))
    assert (item["destination"], item["priority"], item["state"], item["requested_by"], item["origin"]) == \
        ("hub", "urgent", "queued", "staff", "ui")
    assert db.query("SELECT COUNT(*) AS n FROM forward_requests")[0]["n"] == 0
    entries = db.query("SELECT actor, action, study_uid, at FROM audit_log WHERE study_uid = ? ORDER BY id", (uid,))
    assert [e["action"] for e in entries] == ["review", "forward_request"]
    assert all(e["actor"] == "staff" and e["at"] for e in entries)
    assert "Send queued" in client.get(f"/study/{uid}").text
    assert client.get("/api/worklist?state=sent").json["total"] == 1


def test_urgent_alert_and_acknowledge(study_app: Any) -> None:
    client = study_app.test_client()
    token = login(client, "staff")
    alerts = client.get("/api/alerts").json["alerts"]
    assert [a["study_uid"] for a in alerts] == [study_app.config["STUDY_UIDS"][CHEST]]
    acked = client.post("/api/alerts/ack", json={"upto": alerts[0]["id"]}, headers={"X-CSRF-Token": token}).json
    assert acked["alerts"] == [] and client.get("/api/alerts").json["alerts"] == []
    other = study_app.test_client()
    login(other, "viewer")  # acknowledgement is per user
    assert len(other.get("/api/alerts").json["alerts"]) == 1


def test_status_and_admin_screens(study_app: Any) -> None:
    client = study_app.test_client()
    token = login(client, "admin")
    status = client.get("/status").text
    for words in ("CPU", "Memory", "Temperature", "Disk free", "Analysis waiting", "Outbox", "onnxruntime",
                  "toy-cxr", "No destination configured"):
        assert words in status, words
    assert "toy-us" in client.get("/admin/models").text
    assert "NOT FOR CLINICAL USE" in client.get("/admin/models/toy-cxr/card").text
    assert client.get("/admin/models/nope/card").status_code == 404
    assert "Read-only" in client.get("/admin/connections").text
    response = client.post("/admin/users", data={"csrf_token": token, "username": "nurse2", "password": "nurse-pass-12",
                                                 "role": "staff", "pin": "1357", "language": "fr"})
    assert response.status_code == 302
    db = study_app.extensions["appliance_db"]
    nurse = accounts.find_user(db, "nurse2")
    assert nurse.role == "staff" and nurse.has_pin and nurse.language == "fr"
    client.post(f"/admin/users/{nurse.id}", data={"csrf_token": token, "action": "disable"})
    assert accounts.find_user(db, "nurse2").disabled
    admin = accounts.find_user(db, "admin")
    refused = client.post(f"/admin/users/{admin.id}", data={"csrf_token": token, "action": "role", "value": "staff"},
                          follow_redirects=True)
    assert accounts.find_user(db, "admin").role == "admin"  # the last admin cannot be demoted
    assert "The last active administrator cannot be disabled or demoted." in refused.text
    audit_page = client.get("/admin/audit?user=admin&action=user_add").text
    assert "nurse2" in audit_page
    assert "1 entries" in audit_page or "· 1 " in audit_page


def test_configured_destinations_are_offered(hub_app: Any) -> None:
    client = hub_app.test_client()
    token = login(client, "admin")
    uid = hub_app.config["STUDY_UIDS"][CHEST]
    assert "<option>hub</option>" in client.get(f"/study/{uid}").text
    unknown = client.post(f"/study/{uid}/forward", data={"csrf_token": token, "destination": "elsewhere",
                                                         "priority": "routine"}, follow_redirects=True)
    assert unknown.status_code == 200 and "“elsewhere” is not a configured destination" in unknown.text
    db = hub_app.extensions["appliance_db"]
    assert db.query("SELECT COUNT(*) AS n FROM outbox_items")[0]["n"] == 0
    assert client.post(f"/study/{uid}/forward", data={"csrf_token": token, "destination": "hub",
                                                      "priority": "routine"}).status_code == 302
    assert db.query("SELECT destination FROM outbox_items")[0]["destination"] == "hub"
    page = client.get("/admin/connections").text
    assert "127.0.0.1" in page and HUB_SECRET not in page
    for path in ("/status", f"/study/{uid}"):
        assert HUB_SECRET not in client.get(path).text, path


def test_no_destination_no_forward_form(study_app: Any) -> None:
    """Without [[destinations]] there is nothing to send to: the page says so instead of a form."""
    client = study_app.test_client()
    token = login(client, "staff")
    uid = study_app.config["STUDY_UIDS"][CHEST]
    page = client.get(f"/study/{uid}").text
    assert "No destination is configured on this device" in page and 'id="request-forward"' not in page
    response = client.post(f"/study/{uid}/forward", data={"csrf_token": token, "destination": "hub",
                                                          "priority": "routine"}, follow_redirects=True)
    assert "“hub” is not a configured destination" in response.text
    assert study_app.extensions["appliance_db"].query("SELECT COUNT(*) AS n FROM outbox_items")[0]["n"] == 0


def test_study_view_shows_failed_work_and_superseded_results(study_app: Any, urgent_engines: Any) -> None:
    """A job that ended failed says so on the case (not "no AI result yet"); a replaced image's
    earlier results are listed as not current."""
    import pydicom

    from appliance.pipeline import Pipeline
    from appliance.db import open_database
    from appliance.store import InstanceStore
    from tests.helpers import sample
    from tests.web.conftest import make_config

    data_dir = study_app.config["APPLIANCE"].data_dir
    uids = study_app.config["STUDY_UIDS"]
    database = open_database(data_dir)
    # What start-up recovery leaves after the attempts ran out (tests/pipeline/test_stuck_work.py).
    with database.atomic() as tx:
        tx.execute("DELETE FROM analysis_results WHERE study_uid = ?", (uids[CT],))
        tx.execute("UPDATE analysis_jobs SET state = 'failed', last_error = 'Interrupted: the appliance stopped "
                   "8 times while analysing this image; not tried again' WHERE study_uid = ?", (uids[CT],))
    # The chest CR sent again, corrected (same UIDs, other pixels), and analysed again.
    ds = pydicom.dcmread(sample(CHEST))
    ds.PixelData = ds.pixel_array[:, ::-1].copy().tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer)
    store = InstanceStore(data_dir, database, 0)
    assert store.store(buffer.getvalue(), calling_ae="TEST", source="dicom").action == "replaced"
    Pipeline(make_config(data_dir, urgent_engines), database, store).run_until_idle()
    database.close()

    client = study_app.test_client()
    login(client, "staff")
    ct_page = client.get(f"/study/{uids[CT]}").text
    assert "AI could not finish:" in ct_page and "stopped 8 times" in ct_page
    assert "No AI result yet" not in ct_page
    chest_page = client.get(f"/study/{uids[CHEST]}").text
    assert "Earlier results, not current: the image was replaced (1)" in chest_page
    assert "AI could not finish" not in chest_page
