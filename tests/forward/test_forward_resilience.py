"""Outages and crashes: the hub down while 50 studies are queued, and `appliance serve` SIGKILLed
at random moments while it forwards.  Everything arrives exactly once, the outbox drains."""
from __future__ import annotations

import random
import time
from pathlib import Path

import pydicom
import pytest

from tests.forward.conftest import PASSWORD
from tests.forward.util import box_env, destination_toml, items, new_study, outbox_json, wait_confirmed, write_config
from tests.helpers import dcmsend, sample

RULE = '[[forward_rules]]\nwhen = "analyzed"\nto = "{to}"\n'


def studies(out: Path, n: int) -> list[Path]:
    template = pydicom.dcmread(sample("CT_small.dcm"))
    return [new_study(template, out / f"{i:03d}.dcm", PatientID=f"P{i:03d}") for i in range(n)]


@pytest.mark.slow
def test_hub_outage_with_50_studies_queued(tmp_path, server_factory, orthanc_factory):
    hub = orthanc_factory().start()
    config = write_config(tmp_path / "site.toml",
                          destination_toml("hub", "dicomweb", hub, deidentify=True, retry_max_s=2,
                                           max_rate_kbps=2000),
                          RULE.format(to="hub"))
    server = server_factory(config_file=config, extra_env=box_env(PASSWORD, ("hub",))).start()
    files = studies(tmp_path / "in", 50)
    assert dcmsend(server.dicom_port, files).returncode == 0

    deadline = time.monotonic() + 60
    # Several small studies share one STOW-RS request (sent at the 2000 kbit/s cap over several
    # seconds), so the hub goes down as soon as the first batch is being sent: mid-drain.
    while not any(r["state"] != "queued" for r in items(server.data_dir)):
        assert time.monotonic() < deadline, "forwarding did not start"
        time.sleep(0.1)
    hub.stop()  # the link to the hub goes down mid-drain
    while len(items(server.data_dir)) < 50:
        assert time.monotonic() < deadline + 60, "rules did not queue every study"
        time.sleep(0.5)
    time.sleep(4)  # several failed attempts and backoffs
    waiting = outbox_json(server.data_dir, config)
    assert waiting["items"] and waiting["destinations"][0]["consecutive_failures"] > 0
    assert waiting["destinations"][0]["last_error"]
    hub.start()

    wait_confirmed(server.data_dir, 50, timeout=180)
    assert hub.instance_count() == 50  # each exactly once
    assert outbox_json(server.data_dir, config)["items"] == []


@pytest.mark.slow
def test_sigkill_during_forwarding(tmp_path, server_factory, orthanc_factory):
    rng = random.Random(6)
    web, pacs = orthanc_factory("web").start(), orthanc_factory("pacs").start()
    config = write_config(tmp_path / "site.toml",
                          destination_toml("web", "dicomweb", web, deidentify=True, retry_max_s=2, max_rate_kbps=1500),
                          destination_toml("pacs", "dicom", pacs, deidentify=False, retry_max_s=2,
                                           max_rate_kbps=1500, compress="jpegls-lossless"),
                          RULE.format(to="web"), RULE.format(to="pacs"))
    server = server_factory(config_file=config, extra_env=box_env(PASSWORD, ("web",))).start()
    files = studies(tmp_path / "in", 30)
    assert dcmsend(server.dicom_port, files).returncode == 0
    deadline = time.monotonic() + 60
    while not items(server.data_dir):
        assert time.monotonic() < deadline, "nothing queued"
        time.sleep(0.2)
    kills = mid_send = 0
    while kills < 10:
        time.sleep(rng.uniform(0.3, 1.5))
        mid_send += any(r["state"] != "confirmed" for r in items(server.data_dir))
        server.kill()
        kills += 1
        server.start()
    assert mid_send >= 5, "the kills did not land while forwarding"
    wait_confirmed(server.data_dir, 60, timeout=240)
    assert web.instance_count() == 30 and pacs.instance_count() == 30
    assert outbox_json(server.data_dir, config)["items"] == []
    assert all(r["state"] == "confirmed" for r in items(server.data_dir))
