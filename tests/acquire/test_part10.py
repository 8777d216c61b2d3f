"""encoded_part10 writes exactly what pynetdicom's Event.encoded_dataset writes, faster."""
from __future__ import annotations

from io import BytesIO
from types import SimpleNamespace

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from appliance.acquire.part10 import encoded_part10
from tests.helpers import sample


def _event(ds: pydicom.Dataset, transfer_syntax: str, sop_instance_uid: str | None = None) -> Event:
    body = DicomBytesIO()
    body.is_little_endian = transfer_syntax != pydicom.uid.ExplicitVRBigEndian
    body.is_implicit_VR = transfer_syntax == pydicom.uid.ImplicitVRLittleEndian
    write_dataset(body, ds)
    request = C_STORE()
    request.AffectedSOPClassUID = ds.SOPClassUID
    request.AffectedSOPInstanceUID = sop_instance_uid or ds.SOPInstanceUID
    request.DataSet = BytesIO(body.getvalue())
    context = SimpleNamespace(transfer_syntax=pydicom.uid.UID(transfer_syntax), context_id=1, abstract_syntax=ds.SOPClassUID)
    return Event(SimpleNamespace(), evt.EVT_C_STORE, {"request": request, "context": context})


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm"])
def test_same_bytes_as_pynetdicom(name):
    ds = pydicom.dcmread(sample(name))
    event = _event(ds, ds.file_meta.TransferSyntaxUID)
    assert encoded_part10(event) == event.encoded_dataset(include_meta=True)


def test_odd_length_uids_are_padded_like_pynetdicom():
    ds = pydicom.dcmread(sample("CT_small.dcm"))
    event = _event(ds, pydicom.uid.ExplicitVRLittleEndian, sop_instance_uid="1.2.3.45")  # odd length
    data = encoded_part10(event)
    assert data == event.encoded_dataset(include_meta=True)
    assert pydicom.dcmread(BytesIO(data)).file_meta.MediaStorageSOPInstanceUID == "1.2.3.45"
