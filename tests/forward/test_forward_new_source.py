"""An instance from a source this version has never heard of (a future capture source, say) is a
clinical image by default (appliance.lifecycle.kind_of): it is analysed, shown as pending by the
outbox read-outs, and forwarded with the box's AI objects to a real Orthanc."""
from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest

from appliance.forward import request_forward, study_forwarding
from appliance.pipeline import Pipeline
from tests.analyze.toy_package import MODEL_ID, build_package, write_manifest
from tests.forward.conftest import PASSWORD, USER
from tests.forward.local_peers import make_box
from tests.forward.util import new_study, small_chest

NEW_SOURCE = "capture"
SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("new-source-engines")
    build_package(root, MODEL_ID, "cxr", int8=False)
    write_manifest(root / MODEL_ID, MODEL_ID, kind="cxr")
    return root


def test_an_image_of_an_unknown_source_is_analysed_and_forwarded(tmp_path, orthanc, engines):
    box = make_box(tmp_path, f'[analyze]\nengines_dir = "{engines}"\n',
                   "[[destinations]]", 'name = "hub"', 'kind = "dicomweb"', f'url = "{orthanc.dicomweb_url}"',
                   f'username = "{USER}"', "deidentify = false", "attach_ai_results = true",
                   environ={"APPLIANCE_DESTINATIONS_HUB_PASSWORD": PASSWORD})
    image = new_study(small_chest(), tmp_path / "in" / "clip.dcm")
    stored = box.store.store(image.read_bytes(), calling_ae="CAPTURE", source=NEW_SOURCE)
    Pipeline(box.config, box.db, box.store).run_until_idle()

    (instance,) = box.db.query("SELECT state FROM instances WHERE sop_instance_uid = ? AND source = ?",
                               (stored.sop_instance_uid, NEW_SOURCE))
    assert instance["state"] == "analyzed"
    results = box.db.query("SELECT status, sr_sop_instance_uid, heatmap_sop_instance_uid FROM analysis_results "
                           "WHERE sop_instance_uid = ? AND model_id = ?", (stored.sop_instance_uid, MODEL_ID))
    assert [r["status"] for r in results] == ["analyzed"]
    assert box.db.query("SELECT state FROM studies WHERE study_uid = ?", (stored.study_uid,))[0]["state"] == \
        "analyzed"

    item_id = request_forward(box.db, box.config, stored.study_uid, "hub")
    (waiting,) = study_forwarding(box.db, stored.study_uid, box.config)
    assert waiting["id"] == item_id and waiting["instances"]["pending"] == 3  # the clip, its SR and heatmap

    box.drain()
    (done,) = study_forwarding(box.db, stored.study_uid, box.config)
    assert done["state"] == "confirmed" and done["instances"]["confirmed"] == done["instances"]["total"] == 3
    on_hub = {tags["SOPInstanceUID"]: tags for tags in (orthanc.tags(i) for i in orthanc.instance_ids())}
    assert stored.sop_instance_uid in on_hub
    assert set(on_hub) == {stored.sop_instance_uid, results[0]["sr_sop_instance_uid"],
                           results[0]["heatmap_sop_instance_uid"]}
    classes = {str(pydicom.dcmread(io.BytesIO(orthanc.instance_file(i)), stop_before_pixels=True).SOPClassUID)
               for i in orthanc.instance_ids()}
    assert any(c.startswith(SR_PREFIX) for c in classes) and SECONDARY_CAPTURE in classes
    assert box.db.query("SELECT state FROM studies WHERE study_uid = ?", (stored.study_uid,))[0]["state"] == "sent"
