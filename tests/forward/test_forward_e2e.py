"""Happy path with real parts: dcmtk -> `appliance serve` (analysis) -> `appliance forward` ->
Orthanc over C-STORE and over STOW-RS, with the AI SR and heatmap SC."""
from __future__ import annotations

import io

import pydicom

from tests.forward.conftest import PASSWORD
from tests.forward.util import (box_env, destination_toml, forward_cli, new_study, outbox_json, small_chest,
                                study_uid_of, wait_confirmed, write_config)
from tests.helpers import dcmsend
from tests.pipeline.test_pipeline_e2e import wait_until_analyzed

SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def test_forward_over_cstore_and_stowrs(tmp_path, server_factory, orthanc_factory):
    pacs, web = orthanc_factory("pacs").start(), orthanc_factory("web").start()
    config = write_config(tmp_path / "site.toml",
                          destination_toml("pacs", "dicom", pacs, deidentify=False),
                          destination_toml("web", "dicomweb", web, deidentify=False))
    server = server_factory(config_file=config, extra_env=box_env(PASSWORD, ("web",))).start()
    chest = new_study(small_chest(), tmp_path / "in" / "chest.dcm")
    study = study_uid_of(chest)
    assert dcmsend(server.dicom_port, [chest]).returncode == 0
    wait_until_analyzed(server.data_dir, 1)

    forward_cli(server.data_dir, config, study, "pacs")
    forward_cli(server.data_dir, config, study, "web", "--priority", "urgent")
    wait_confirmed(server.data_dir, 2)

    report = outbox_json(server.data_dir, config, "--all")
    assert {i["destination"]: i["state"] for i in report["items"]} == {"pacs": "confirmed", "web": "confirmed"}
    for item in report["items"]:
        assert item["instances"]["confirmed"] == item["instances"]["total"] == 3
    assert outbox_json(server.data_dir, config)["items"] == []  # nothing left to send
    for hub in (pacs, web):
        classes = sorted(pydicom.dcmread(io.BytesIO(hub.instance_file(i)), stop_before_pixels=True).SOPClassUID
                         for i in hub.instance_ids())
        assert len(classes) == 3
        assert any(c.startswith(SR_PREFIX) for c in classes), classes  # the AI SR
        assert SECONDARY_CAPTURE in classes  # the heatmap
        assert hub.get("/studies").json() and hub.tags(hub.instance_ids()[0])["StudyInstanceUID"] == study
    assert {d["name"]: d["queue_length"] for d in report["destinations"]} == {"pacs": 0, "web": 0}
    assert all(d["last_success_at"] for d in report["destinations"])
