"""Outbox pieces without a network: requests, idempotency, cancel/retry, windows, backoff, deid."""
from __future__ import annotations

import random
from datetime import datetime

import pydicom
import pytest

from appliance.config import load_config
from appliance.db import open_database
from appliance.errors import ConfigError
from appliance.forward import cancel_item, request_forward, retry_item, study_forwarding
from appliance.forward.deid import UidMap, deidentify
from appliance.forward.errors import ForwardRequestError, PolicyBlocked
from appliance.forward.pacing import backoff_s, in_window
from appliance.store import InstanceStore
from tests.helpers import sample


@pytest.fixture
def box(tmp_path):
    site = tmp_path / "site.toml"
    site.write_text(f'[storage]\ndata_dir = "{tmp_path / "data"}"\nmin_free_mb = 0\n'
                    '[[destinations]]\nname = "hub"\nkind = "dicomweb"\nurl = "http://127.0.0.1:9/dicom-web"\n')
    config = load_config(site, environ={})
    database = open_database(config.data_dir)
    study = InstanceStore(config.data_dir, database).store(sample("CT_small.dcm").read_bytes(), source="import").study_uid
    return config, database, study


def test_request_is_idempotent_and_upgrades_priority(box):
    config, database, study = box
    first = request_forward(database, config, study, "hub", "routine", "nurse")
    assert request_forward(database, config, study, "hub", "urgent", "nurse") == first
    (item,) = study_forwarding(database, study)
    assert item["priority"] == "urgent" and item["state"] == "queued"
    with pytest.raises(ConfigError):
        request_forward(database, config, study, "nowhere")
    with pytest.raises(ForwardRequestError):
        request_forward(database, config, "1.2.3.4", "hub")


def test_cancel_and_retry(box):
    config, database, study = box
    item = request_forward(database, config, study, "hub")
    cancel_item(database, item, "admin")
    assert study_forwarding(database, study)[0]["state"] == "cancelled"
    retry_item(database, item, "admin")
    assert study_forwarding(database, study)[0]["state"] == "queued"
    actions = [r["action"] for r in database.query("SELECT action FROM audit_log ORDER BY id")]
    assert actions == ["forward_request", "forward_cancel", "forward_retry"]


def test_send_window_and_backoff():
    assert in_window("", datetime(2026, 1, 1, 3, 0))
    assert in_window("22:00-06:00", datetime(2026, 1, 1, 3, 0))
    assert not in_window("22:00-06:00", datetime(2026, 1, 1, 12, 0))
    assert in_window("08:00-17:00", datetime(2026, 1, 1, 12, 0))
    rng = random.Random(1)
    delays = [backoff_s(n, 300, rng) for n in range(1, 20)]
    assert all(0 < d <= 300 for d in delays) and delays[-1] >= 150 and delays[0] <= 1


def test_uids_stable_and_burned_in_blocked(box):
    _, database, _ = box
    ds = pydicom.dcmread(sample("CT_small.dcm"))
    one, two = deidentify(ds, UidMap(database)), deidentify(ds, UidMap(database))
    assert one.SOPInstanceUID == two.SOPInstanceUID != ds.SOPInstanceUID
    assert one.file_meta.MediaStorageSOPInstanceUID == one.SOPInstanceUID
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(PolicyBlocked, match="burned-in"):
        deidentify(ds, UidMap(database))
    assert deidentify(ds, UidMap(database), allow_burned_in=True).PatientIdentityRemoved == "YES"
