"""The status screen after real attempts: per destination the queue length, bytes pending, last
successful contact and next retry, for a hub that took the study (Orthanc) and one that is down."""
from __future__ import annotations

import re
from datetime import datetime, timezone

from appliance.forward import destination_status, request_forward
from tests.forward.conftest import PASSWORD, USER
from tests.forward.local_peers import make_box
from tests.helpers import free_port, sample
from tests.web.conftest import add_users, login


def destination_rows(html: str, name: str) -> dict[str, str]:
    match = re.search(rf'<table class="kv destination" data-destination="{name}">(.*?)</table>', html, re.DOTALL)
    assert match, f"no destination {name} on the status screen"
    return {cls: re.sub(r"<[^>]+>", "", text).strip()
            for cls, text in re.findall(r'<td class="(dest-[a-z]+)[^"]*">(.*?)</td>', match.group(1), re.DOTALL)}


def test_status_screen_per_destination_after_real_attempts(tmp_path, orthanc):
    from web import create_app
    from web.core.formatting import human_bytes, local_time

    box = make_box(tmp_path,
                   f'[[destinations]]\nname = "hub"\nkind = "dicomweb"\nurl = "{orthanc.dicomweb_url}"\n'
                   f'username = "{USER}"\ndeidentify = false\nattach_ai_results = false\n',
                   f'[[destinations]]\nname = "down"\nkind = "dicom"\nhost = "127.0.0.1"\nport = {free_port()}\n'
                   'called_ae = "NOBODY"\nretry_max_s = 600\nattach_ai_results = false\n',
                   environ={"APPLIANCE_DESTINATIONS_HUB_PASSWORD": PASSWORD})
    outcome = box.store.store(sample("CT_small.dcm").read_bytes(), source="dicom")
    size = box.db.query("SELECT size FROM instances WHERE sop_instance_uid = ?", (outcome.sop_instance_uid,))[0]["size"]
    for name in ("hub", "down"):
        request_forward(box.db, box.config, outcome.study_uid, name, "routine", "nurse1")

    app = create_app(box.config, {"TESTING": True})
    add_users(app)
    client = app.test_client()
    login(client, "viewer")
    before = client.get("/status").text
    for name in ("hub", "down"):
        rows = destination_rows(before, name)
        assert rows["dest-queue"] == f"1 items · {human_bytes(size)} pending", rows
        assert rows["dest-success"] == "never" and "dest-retry" not in rows and "dest-error" not in rows

    box.drain()
    status = {d["name"]: d for d in destination_status(box.db, box.config)}
    assert (status["hub"]["queue_length"], status["hub"]["bytes_pending"]) == (0, 0)
    assert status["hub"]["last_success_at"] and status["hub"]["next_retry_at"] == ""
    assert (status["down"]["queue_length"], status["down"]["bytes_pending"]) == (1, size)
    assert status["down"]["last_success_at"] == "" and status["down"]["consecutive_failures"] == 1
    assert datetime.fromisoformat(status["down"]["next_retry_at"]) > datetime.now(timezone.utc)

    after = client.get("/status").text
    hub = destination_rows(after, "hub")
    assert hub["dest-queue"] == "0 items · 0 B pending"
    assert hub["dest-success"] == local_time(status["hub"]["last_success_at"]) != "never"
    assert "dest-retry" not in hub and "dest-error" not in hub
    down = destination_rows(after, "down")
    assert down["dest-queue"] == f"1 items · {human_bytes(size)} pending" and down["dest-success"] == "never"
    assert down["dest-retry"] == f"{local_time(status['down']['next_retry_at'])} · 1 failed attempts in a row"
    assert f"127.0.0.1:{box.config.destination('down').port}" in down["dest-error"]
    assert orthanc.instance_count() == 1
