"""`appliance serve` against dcmtk's real echoscu / dcmsend / storescu, on loopback."""
from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, _config

from tests.helpers import SAMPLES_BY_SYNTAX, dataset_body, dcmsend, run_cli, sample

SOP_CLASSES = {
    "DX for presentation": "1.2.840.10008.5.1.4.1.1.1.1",
    "DX for processing": "1.2.840.10008.5.1.4.1.1.1.1.1",
    "Digital mammography for presentation": "1.2.840.10008.5.1.4.1.1.1.2",
    "Multi-frame grayscale byte SC": "1.2.840.10008.5.1.4.1.1.7.2",
}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def studies_json(data_dir: Path) -> dict:
    result = run_cli("studies", "--json", "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def instance_rows(data_dir: Path) -> dict[str, dict]:
    conn = sqlite3.connect(data_dir / "appliance.db")
    conn.row_factory = sqlite3.Row
    rows = {r["sop_instance_uid"]: dict(r) for r in conn.execute("SELECT * FROM instances")}
    conn.close()
    return rows


@pytest.fixture
def dcmtk_encoded(tmp_path: Path) -> list[Path]:
    """Syntaxes no shipped sample has with complete UIDs, encoded by dcmtk from real images:
    JPEG lossless process 14 selection value 6 and JPEG-LS near-lossless."""
    made = []
    for tool, options, source, ts in [
        ("dcmcjpeg", ["+el", "+sv", "6"], "CT_small.dcm", "1.2.840.10008.1.2.4.57"),
        ("dcmcjpls", ["+en"], "US1_UNCR.dcm", "1.2.840.10008.1.2.4.81"),
    ]:
        out = tmp_path / f"{ts}.dcm"
        subprocess.run([tool, *options, str(sample(source)), str(out)], check=True, capture_output=True)
        assert pydicom.dcmread(out, stop_before_pixels=True).file_meta.TransferSyntaxUID == ts
        made.append(out)
    return made


@pytest.fixture
def other_sop_classes(tmp_path: Path) -> list[Path]:
    """DX, mammography and multi-frame SC instances built from a real radiograph's pixels."""
    files = []
    for name, sop_class in SOP_CLASSES.items():
        ds = pydicom.dcmread(sample("MR_small.dcm"))
        ds.SOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        path = tmp_path / f"{name.replace(' ', '_')}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def unique_instances(files: list[Path], out: Path) -> list[Path]:
    """pydicom ships one MR instance in several encodings under one SOP Instance UID; give the
    repeats their own UIDs (pydicom re-writes them in their original transfer syntax)."""
    out.mkdir()
    seen: set[str] = set()
    result = []
    for path in files:
        ds = pydicom.dcmread(path)
        if ds.SOPInstanceUID in seen:
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            path = out / path.name
            ds.save_as(path)
        seen.add(str(ds.SOPInstanceUID))
        result.append(path)
    return result


def test_echo_and_every_transfer_syntax_stored_byte_identical(server_factory, dcmtk_encoded, other_sop_classes,
                                                              tmp_path):
    server = server_factory().start()
    assert server.echo()
    files = unique_instances([sample(name) for name in SAMPLES_BY_SYNTAX] + dcmtk_encoded + other_sop_classes,
                             tmp_path / "unique")
    result = dcmsend(server.dicom_port, files)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = instance_rows(server.data_dir)
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        row = rows.get(str(ds.SOPInstanceUID))
        assert row is not None, f"{path.name} not stored"
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            # Compressed data is accepted in its own syntax: never decompressed in transit.
            assert row["transfer_syntax"] == ds.file_meta.TransferSyntaxUID, path.name
        assert row["calling_ae"] == "MODALITY"
        stored = Path(row["file_path"])
        assert stored == server.data_dir / "instances" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        # dcmtk re-encodes the dataset it sends (it drops trailing padding, for example), so
        # its wire bytes are not the file's; the encoded pixel data must still be untouched.
        # Byte identity of the whole dataset is checked with a raw sender below.
        sent, kept = pydicom.dcmread(path), pydicom.dcmread(stored)
        if "PixelData" in sent and ds.file_meta.TransferSyntaxUID.is_compressed:
            assert kept.PixelData == sent.PixelData, path.name
        elif "PixelData" in sent:  # the sender may switch byte order or VR encoding
            assert (kept.pixel_array == sent.pixel_array).all(), path.name
        assert row["sha256"] == sha(stored)
    report = studies_json(server.data_dir)
    assert report["schema_version"] == 1
    # Analysis runs meanwhile and adds AI result objects (source "ai"); count the clinic's images.
    sent = {i["sop_instance_uid"] for s in report["studies"] for se in s["series"] for i in se["instances"]
            if i["source"] != "ai"}
    assert sent == {uid for uid, row in rows.items() if row["source"] != "ai"}
    chest = next(s for s in report["studies"] if "CR" in s["modalities"])
    chest_images = [i for se in chest["series"] for i in se["instances"] if i["source"] != "ai"]
    assert len(chest_images) == 3 and chest["state"] in ("received", "analyzed")
    assert server.stop() == 0  # clean shutdown on SIGTERM


def test_raw_sender_dataset_bytes_hash_identical(server_factory, dcmtk_encoded, tmp_path):
    """pynetdicom in chunked mode puts the file's dataset bytes on the wire unchanged, so the
    stored dataset must hash-identical to the sent file's dataset."""
    server = server_factory().start()
    files = unique_instances([sample(name) for name in SAMPLES_BY_SYNTAX] + dcmtk_encoded, tmp_path / "unique")
    ae = AE(ae_title="MODALITY")
    for path in files:
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title="EDGE")
        assert assoc.is_established
        statuses = [assoc.send_c_store(path).Status for path in files]
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assert statuses == [0] * len(files)
    rows = instance_rows(server.data_dir)
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        stored = Path(rows[ds.SOPInstanceUID]["file_path"])
        assert rows[ds.SOPInstanceUID]["transfer_syntax"] == ds.file_meta.TransferSyntaxUID
        assert hashlib.sha256(dataset_body(stored)).hexdigest() == hashlib.sha256(dataset_body(path)).hexdigest(), path.name


def test_unknown_calling_ae_is_rejected(server_factory):
    server = server_factory().start()
    assert not server.echo(aet="INTRUDER")
    result = dcmsend(server.dicom_port, [sample("CT_small.dcm")], aet="INTRUDER")
    assert result.returncode != 0
    assert instance_rows(server.data_dir) == {}
    assert "INTRUDER" in server.log_path.read_text() and "rejected" in server.log_path.read_text()


def test_empty_allow_list_rejects_everyone(server_factory):
    server = server_factory(allowed="")
    server.start(wait=False)
    deadline = time.monotonic() + 30
    while "DICOM SCP EDGE listening" not in server.log_path.read_text():
        assert server.proc.poll() is None and time.monotonic() < deadline, server.log_path.read_text()[-2000:]
        time.sleep(0.1)
    assert not server.echo()
    assert not server.echo(aet="ANYONE")
    log = server.log_path.read_text()
    assert "allowed_calling_aes is empty" in log and "association from MODALITY (127.0.0.1) rejected" in log
    assert server.proc.poll() is None  # still serving


def test_duplicate_is_idempotent_and_changed_copy_supersedes(server_factory, tmp_path):
    server = server_factory().start()
    src = sample("CT_small.dcm")
    assert dcmsend(server.dicom_port, [src, src]).returncode == 0
    rows = instance_rows(server.data_dir)
    assert len(rows) == 1
    original = next(iter(rows.values()))
    old_bytes = Path(original["file_path"]).read_bytes()

    changed = pydicom.dcmread(src)
    changed.ImageComments = "corrected by the modality"
    changed_path = tmp_path / "changed.dcm"
    changed.save_as(changed_path)
    assert dcmsend(server.dicom_port, [changed_path]).returncode == 0
    rows = instance_rows(server.data_dir)
    assert len(rows) == 1
    current = next(iter(rows.values()))
    assert current["sha256"] != original["sha256"]
    assert pydicom.dcmread(current["file_path"]).ImageComments == "corrected by the modality"
    conn = sqlite3.connect(server.data_dir / "appliance.db")
    kept = conn.execute("SELECT file_path, sha256, superseded_by_sha256 FROM superseded_instances").fetchall()
    assert len(kept) == 1 and kept[0][1] == original["sha256"] and kept[0][2] == current["sha256"]
    assert Path(kept[0][0]).read_bytes() == old_bytes
