"""Below the free-space floor C-STORE answers 0xA700 and writes nothing; it recovers when space frees."""
from __future__ import annotations

import os
import shutil
import sqlite3

from pydicom.uid import generate_uid
import pydicom
from pynetdicom import AE

from tests.helpers import CALLING_AE, sample

MIB = 1024 * 1024
MARGIN_MB = 300


def store(port: int, ds) -> int:
    ae = AE(ae_title=CALLING_AE)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="EDGE")
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assoc.release()
    return int(status.Status)


def fresh_instance():
    ds = pydicom.dcmread(sample("CT_small.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def test_out_of_space_refuses_then_recovers(server_factory, tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    # The floor sits MARGIN_MB below the free space now; a filler file of twice the margin
    # pushes the filesystem under it, deleting the filler frees the space again.
    floor = shutil.disk_usage(data_dir).free // MIB - MARGIN_MB
    server = server_factory(data_dir, extra_env={"APPLIANCE_STORAGE_MIN_FREE_MB": str(floor)}).start()
    assert store(server.dicom_port, fresh_instance()) == 0x0000

    filler = tmp_path / "filler"
    with open(filler, "wb") as fh:
        os.posix_fallocate(fh.fileno(), 0, 2 * MARGIN_MB * MIB)
    try:
        files_before = sorted(p for p in data_dir.rglob("*") if p.is_file() and p.suffix == ".dcm")
        refused = fresh_instance()
        assert store(server.dicom_port, refused) == 0xA700
        files_after = sorted(p for p in data_dir.rglob("*") if p.is_file() and p.suffix == ".dcm")
        assert files_after == files_before, "something was written while out of space"
        assert list((data_dir / "tmp").iterdir()) == []
        assert server.echo()  # still serving
    finally:
        filler.unlink()
    assert store(server.dicom_port, refused) == 0x0000
    conn = sqlite3.connect(data_dir / "appliance.db")
    assert conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 2
    conn.close()
    assert "refused (0xA700, out_of_space)" in server.log_path.read_text()
