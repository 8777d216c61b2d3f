"""Lossless compression on the way out: the full-size chest CR, JPEG-LS over STOW-RS and JPEG 2000
over C-STORE; the pixels Orthanc holds decode identical to the original's."""
from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest

from appliance.config import load_config
from appliance.db import open_database
from appliance.forward import request_forward, study_forwarding
from appliance.forward.service import Forwarder
from appliance.store import InstanceStore
from tests.forward.conftest import PASSWORD
from tests.forward.util import destination_toml, write_config
from tests.helpers import sample


@pytest.mark.parametrize("kind,method,syntax", [
    ("dicomweb", "jpegls-lossless", "1.2.840.10008.1.2.4.80"),
    ("dicom", "jpeg2000-lossless", "1.2.840.10008.1.2.4.90"),
])
def test_chest_cr_lossless(tmp_path, orthanc, kind, method, syntax):
    site = write_config(tmp_path / "site.toml", f'[storage]\ndata_dir = "{tmp_path / "data"}"\nmin_free_mb = 0\n',
                        destination_toml("hub", kind, orthanc, compress=method, deidentify=False,
                                         attach_ai_results=False))
    config = load_config(site, environ={"APPLIANCE_DESTINATIONS_HUB_PASSWORD": PASSWORD})
    database = open_database(config.data_dir)
    store = InstanceStore(config.data_dir, database)
    original = sample("RG1_UNCR.dcm")
    outcome = store.store(original.read_bytes(), source="import")
    item_id = request_forward(database, config, outcome.study_uid, "hub", "routine", "test")
    forwarder = Forwarder(config, database, store)
    while forwarder.run_once():
        pass

    (item,) = study_forwarding(database, outcome.study_uid)
    assert item["id"] == item_id and item["state"] == "confirmed", item
    ratio = item["bytes_sent"] / item["bytes_original"]
    print(f"{method} over {kind}: sent {item['bytes_sent']} of {item['bytes_original']} bytes ({ratio:.1%})")
    assert item["bytes_sent"] < 0.7 * item["bytes_original"]
    (orthanc_id,) = orthanc.instance_ids()
    on_hub = pydicom.dcmread(io.BytesIO(orthanc.instance_file(orthanc_id)))
    assert on_hub.file_meta.TransferSyntaxUID == syntax
    assert on_hub.SOPInstanceUID == pydicom.dcmread(original, stop_before_pixels=True).SOPInstanceUID
    assert np.array_equal(on_hub.pixel_array, pydicom.dcmread(original).pixel_array)
