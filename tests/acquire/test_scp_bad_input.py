"""Bad input at the DICOM door: clear failure statuses, nothing stored, the server keeps serving."""
from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pydicom
import pytest
from pydicom.filereader import _read_file_meta_info, read_preamble
from pynetdicom import AE, _config
from pynetdicom.association import Association

from appliance.lifecycle import Source
from tests.helpers import CALLING_AE, dcmsend, sample

FAILURE_CLASSES = (0xA900, 0xC000)


def split_part10(path: Path) -> tuple[bytes, bytes]:
    """(preamble + file meta, dataset) of a Part 10 file."""
    raw = path.read_bytes()
    with open(path, "rb") as fh:
        read_preamble(fh, False)
        _read_file_meta_info(fh)
        offset = fh.tell()
    return raw[:offset], raw[offset:]


class RawSender:
    """Sends files' dataset bytes unchanged (pynetdicom chunked mode), re-associating on abort."""

    def __init__(self, port: int, contexts: list[tuple[str, str]]):
        self.port = port
        self.ae = AE(ae_title=CALLING_AE)
        for sop_class, syntax in set(contexts):
            self.ae.add_requested_context(sop_class, syntax)
        self.assoc: Association | None = None

    def send(self, path: Path) -> int | None:
        if self.assoc is None or not self.assoc.is_established:
            self.assoc = self.ae.associate("127.0.0.1", self.port, ae_title="EDGE")
            assert self.assoc.is_established
        status = self.assoc.send_c_store(path)
        return int(status.Status) if "Status" in status else None

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()


@pytest.fixture(autouse=True)
def chunked_send():
    _config.STORE_SEND_CHUNKED_DATASET = True
    yield
    _config.STORE_SEND_CHUNKED_DATASET = False


def stored_count(data_dir: Path) -> int:
    """Instances received (the box's own AI objects, which analysis adds soon after, not counted)."""
    conn = sqlite3.connect(data_dir / "appliance.db")
    (n,) = conn.execute("SELECT COUNT(*) FROM instances WHERE source != ?", (Source.AI,)).fetchone()
    conn.close()
    return n


def files_on_disk(data_dir: Path) -> int:
    return sum(1 for p in (data_dir / "instances").rglob("*") if p.is_file())


def make_bad_payloads(tmp_path: Path) -> dict[str, Path]:
    meta, body = split_part10(sample("CT_small.dcm"))
    bad = {
        "truncated": meta + body[: len(body) // 3],
        "garbled": meta + body[:200] + bytes(random.Random(1).randrange(256) for _ in range(3000)),
        "not dicom": meta + b"This is a discharge letter, not a DICOM dataset.\n" * 20,
        "uid-less": b"".join(split_part10(sample("JPEGLSNearLossless_08.dcm"))),
    }
    paths = {}
    for name, data in bad.items():
        path = tmp_path / f"{name.replace(' ', '_')}.dcm"
        path.write_bytes(data)
        paths[name] = path
    return paths


def test_bad_payloads_get_failure_statuses_and_store_nothing(server_factory, tmp_path):
    server = server_factory().start()
    payloads = make_bad_payloads(tmp_path)
    contexts = []
    for path in payloads.values():
        meta = pydicom.dcmread(path, stop_before_pixels=True, force=True).file_meta
        contexts.append((meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID))
    sender = RawSender(server.dicom_port, contexts)
    statuses = {name: sender.send(path) for name, path in payloads.items()}
    sender.close()
    for name, status in statuses.items():
        assert status is not None and (status & 0xFF00) in FAILURE_CLASSES, f"{name}: 0x{status:04X}"
    assert statuses["uid-less"] == 0xA900
    assert statuses["not dicom"] == 0xC000
    assert stored_count(server.data_dir) == 0 and files_on_disk(server.data_dir) == 0
    assert list((server.data_dir / "tmp").iterdir()) == []
    log = server.log_path.read_text()
    assert "refused (0xA900, dataset_invalid): missing StudyInstanceUID" in log and f"from {CALLING_AE}" in log
    assert "CompressedSamples" not in log  # no patient names in the log
    assert server.echo()


@pytest.mark.slow
def test_a_thousand_mutated_datasets_leave_the_server_serving(server_factory, tmp_path):
    server = server_factory().start()
    rng = random.Random(20261128)
    sources = [sample(n) for n in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "test-SR.dcm", "OBXXXX1A_rle.dcm")]
    parts = [split_part10(p) for p in sources]
    contexts = []
    for p in sources:
        meta = pydicom.dcmread(p, stop_before_pixels=True).file_meta
        contexts.append((meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID))
    sender = RawSender(server.dicom_port, contexts)
    mutated = tmp_path / "mutated.dcm"
    outcomes = {"success": 0, "failure": 0, "no answer": 0}
    for _ in range(1000):
        meta, body = parts[rng.randrange(len(parts))]
        data = bytearray(body)
        if rng.random() < 0.3:
            del data[rng.randrange(len(data)):]
        else:
            # Flip bytes near the start, where the tags, VRs and lengths are.
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(min(len(data), 600))] ^= 1 << rng.randrange(8)
        mutated.write_bytes(meta + bytes(data))
        try:
            status = sender.send(mutated)
        except (RuntimeError, ValueError, AttributeError):
            status = None  # our own sender could not encode the request; the server saw nothing
            sender.assoc = None
        if status == 0:
            outcomes["success"] += 1
        elif status is None:
            outcomes["no answer"] += 1
        else:
            assert (status & 0xFF00) in FAILURE_CLASSES, f"0x{status:04X}"
            outcomes["failure"] += 1
    sender.close()
    assert outcomes["failure"] > 300, outcomes
    # Whatever was accepted parses completely.
    for path in (server.data_dir / "instances").rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        for _elem in ds.iterall():
            pass
    assert list((server.data_dir / "tmp").iterdir()) == []
    # Still answering, and still storing a valid file correctly.
    assert server.echo()
    before = stored_count(server.data_dir)
    assert dcmsend(server.dicom_port, [sample("RG1_UNCR.dcm")]).returncode == 0
    assert stored_count(server.data_dir) == before + 1
