"""Hostile and careless peers at the DICOM port (issue 11, points 1-3 and 7): `appliance serve`
against raw sockets that idle, trickle, send garbage or claim gigabytes, next to the real dcmtk
peers a modality would be.

One box serves every test of the module (starting one costs seconds); its limits are set low
enough here (association deadline 4 s, PDU deadline 5 s, datasets of 16 MB) that each
deadline fires within the test's time.
"""
from __future__ import annotations

import random
import socket
import sqlite3
import struct
import subprocess
import threading
import time
import zlib
from pathlib import Path

import pydicom
import pydicom.config
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config

from tests.helpers import CALLING_AE, ServerProcess, dcmsend, sample, write_fresh_copies

ASSOCIATION_TIMEOUT_S = 4
PDU_TIMEOUT_S = 5
MAX_DATASET_MB = 16
PER_PEER = 24
MB = 1024 * 1024
VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def start_box(root: Path, extra_env: dict[str, str] | None = None) -> ServerProcess:
    """`appliance serve` with this module's low limits (and ``extra_env``)."""
    engines = root / "no-engines"  # no models: analysis must not move the memory being measured
    engines.mkdir()
    return ServerProcess(root / "data", extra_env={
        "APPLIANCE_DICOM_PROCESSES": "2",
        "APPLIANCE_DICOM_ASSOCIATION_TIMEOUT_S": str(ASSOCIATION_TIMEOUT_S),
        "APPLIANCE_DICOM_PDU_TIMEOUT_S": str(PDU_TIMEOUT_S),
        "APPLIANCE_DICOM_MAX_DATASET_MB": str(MAX_DATASET_MB),
        "APPLIANCE_DICOM_MAX_ASSOCIATIONS": "40",
        "APPLIANCE_DICOM_MAX_ASSOCIATIONS_PER_PEER": str(PER_PEER),
        "APPLIANCE_ANALYZE_ENGINES_DIR": str(engines),
        **(extra_env or {}),
    }).start()


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    server = start_box(tmp_path_factory.mktemp("hostile"))
    yield server
    server.stop()


# -- the DICOM upper layer, by hand (PS3.8 9.3), so that the test can break it --------------
def _item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def associate_rq(contexts: list[tuple[int, str, str]], calling: str = CALLING_AE, called: str = "EDGE") -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing ``(context id, abstract syntax, transfer syntax)``s."""
    body = struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16) + bytes(32)
    body += _item(0x10, b"1.2.840.10008.3.1.1.1")
    for context_id, abstract, syntax in contexts:
        syntaxes = _item(0x30, abstract.encode()) + _item(0x40, syntax.encode())
        body += _item(0x20, bytes([context_id, 0, 0, 0]) + syntaxes)
    body += _item(0x50, _item(0x51, struct.pack(">I", 65536)) + _item(0x52, b"1.2.826.0.1.3680043.9.7433.1"))
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def p_data(context_id: int, fragment: bytes, command: bool, last: bool = True) -> bytes:
    control = (1 if command else 0) | (2 if last else 0)
    pdv = struct.pack(">IB", len(fragment) + 2, context_id) + bytes([control]) + fragment
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def command_set(elements: list[tuple[int, bytes]]) -> bytes:
    """Implicit VR little endian group 0000 with its group length; UIDs as given, however long."""
    body = b"".join(struct.pack("<HHI", 0x0000, element, len(value)) + value for element, value in elements)
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


def _ui(uid: str) -> bytes:
    raw = uid.encode()
    return raw + b"\0" if len(raw) % 2 else raw


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def c_echo_rq(message_id: int = 1) -> bytes:
    return command_set([(0x0002, _ui(VERIFICATION)), (0x0100, _us(0x0030)), (0x0110, _us(message_id)),
                        (0x0800, _us(0x0101))])


def c_store_rq(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    return command_set([(0x0002, _ui(sop_class)), (0x0100, _us(0x0001)), (0x0110, _us(message_id)),
                        (0x0700, _us(0)), (0x0800, _us(0)), (0x1000, _ui(sop_instance))])


def read_pdu(sock: socket.socket) -> tuple[int, bytes] | None:
    header = _read(sock, 6)
    if len(header) < 6:
        return None
    pdu_type, _, length = struct.unpack(">BBI", header)
    return pdu_type, _read(sock, length)


def _read(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            break
        data += chunk
    return data


def response_status(sock: socket.socket) -> int | None:
    """The Status of the next DIMSE response (None if the association ends instead)."""
    command = b""
    while True:
        pdu = read_pdu(sock)
        if pdu is None or pdu[0] != 0x04:
            return None
        offset, body = 0, pdu[1]
        while offset < len(body):
            length = struct.unpack_from(">I", body, offset)[0]
            control, fragment = body[offset + 5], body[offset + 6:offset + 4 + length]
            offset += 4 + length
            if control & 1:
                command += fragment
                if control & 2:
                    return _status_of(command)


def _status_of(command: bytes) -> int | None:
    offset = 0
    while offset + 8 <= len(command):
        group, element, length = struct.unpack_from("<HHI", command, offset)
        if (group, element) == (0x0000, 0x0900):
            return struct.unpack_from("<H", command, offset + 8)[0]
        offset += 8 + length
    return None


class RawAssociation:
    """An association made over a plain socket; ``contexts`` as for :func:`associate_rq`."""

    def __init__(self, port: int, contexts: list[tuple[int, str, str]], timeout: float = 10):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.sendall(associate_rq(contexts))
        answer = read_pdu(self.sock)
        assert answer is not None and answer[0] == 0x02, f"not accepted: {answer!r}"

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


def closed_by_peer(sock: socket.socket, within: float) -> float | None:
    """Seconds until the peer closed ``sock`` (what it still sent is read and dropped), None if
    it did not within ``within`` seconds."""
    start = time.monotonic()
    while time.monotonic() - start < within:
        sock.settimeout(max(0.05, within - (time.monotonic() - start)))
        try:
            if not sock.recv(65536):
                return time.monotonic() - start
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - start
        except (TimeoutError, socket.timeout):
            return None
    return None


# -- measuring the box ------------------------------------------------------------------------
def _process_tree(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = [pid], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        tree += children
        frontier = children
    return tree


def tree_rss_mb(pid: int) -> float:
    """VmRSS of ``pid`` and all its descendants (the receiving helper processes), in MB."""
    total_kb = 0
    for member in _process_tree(pid):
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue
    return total_kb / 1024


def settled_rss_mb(pid: int, samples: int = 5, interval: float = 0.2) -> float:
    values = []
    for _ in range(samples):
        values.append(tree_rss_mb(pid))
        time.sleep(interval)
    return sorted(values)[len(values) // 2]


def peak_rss_mb(pid: int, seconds: float) -> float:
    deadline, peak = time.monotonic() + seconds, 0.0
    while time.monotonic() < deadline:
        peak = max(peak, tree_rss_mb(pid))
        time.sleep(0.1)
    return peak


def timed_echo(port: int) -> tuple[bool, float]:
    start = time.monotonic()
    done = subprocess.run(["echoscu", "-aet", CALLING_AE, "-aec", "EDGE", "127.0.0.1", str(port)],
                          capture_output=True, timeout=30)
    return done.returncode == 0, time.monotonic() - start


def timed_dcmsend(port: int, path: Path) -> tuple[bool, float]:
    start = time.monotonic()
    done = dcmsend(port, [path], timeout=30)
    return done.returncode == 0, time.monotonic() - start


def stored(data_dir: Path, sop_instance_uid: str) -> str | None:
    """The SOP class the box stored ``sop_instance_uid`` under, or None."""
    con = sqlite3.connect(data_dir / "appliance.db")
    try:
        row = con.execute("SELECT sop_class_uid FROM instances WHERE sop_instance_uid = ?",
                          (sop_instance_uid,)).fetchone()
    finally:
        con.close()
    return row[0] if row else None


def log_since(server: ServerProcess, offset: int) -> str:
    return server.log_path.read_bytes()[offset:].decode("utf-8", "replace")


# -- 1. connections that never finish association ---------------------------------------------
class Hostile(threading.Thread):
    """One hostile slot: connects, misbehaves as ``kind`` says, notes when the box closes the
    connection, and connects again until told to stop (so the pressure never lets up)."""

    def __init__(self, port: int, kind: str, stop: threading.Event, payload: bytes):
        super().__init__(daemon=True)
        self.port, self.kind, self.stop, self.payload = port, kind, stop, payload
        self.closed_after: list[float] = []  # seconds from connect to the box closing it

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            except OSError:
                time.sleep(0.2)
                continue
            opened = time.monotonic()
            try:
                if self.kind == "malformed":
                    sock.sendall(self.payload)
                if self._wait_for_close(sock):
                    self.closed_after.append(time.monotonic() - opened)
            finally:
                sock.close()
            self.stop.wait(0.5)

    def _wait_for_close(self, sock: socket.socket) -> bool:
        sent = 0
        while not self.stop.is_set():
            if self.kind == "trickle":
                try:
                    sock.send(self.payload[sent % len(self.payload):][:1])
                    sent += 1
                except OSError:
                    return True
            if closed_by_peer(sock, 1.0) is not None:
                return True
        return False


def test_a_flood_of_unfinished_associations_never_locks_the_modality_out(box, tmp_path):
    offset = box.log_path.stat().st_size
    files = write_fresh_copies([pydicom.dcmread(sample("CT_small.dcm"))] * 12, tmp_path / "send")
    rng = random.Random(11)
    garbage = [struct.pack(">BBI", 0x01, 0, 200) + bytes(rng.randrange(256) for _ in range(200)) for _ in range(60)]
    trickled = associate_rq([(1, VERIFICATION, ImplicitVRLittleEndian)])
    stop = threading.Event()
    flood = ([Hostile(box.dicom_port, "idle", stop, b"") for _ in range(60)]
             + [Hostile(box.dicom_port, "trickle", stop, trickled) for _ in range(60)]
             + [Hostile(box.dicom_port, "malformed", stop, garbage[i]) for i in range(60)])
    for hostile in flood:
        hostile.start()
    time.sleep(1.0)  # all 180 connected (and the malformed ones refused and back)
    answers = []
    try:
        started = time.monotonic()
        # Through three association deadlines: the first round of idle and trickling connections
        # is closed and replaced by the next while the modality keeps working.
        while time.monotonic() - started < 3 * ASSOCIATION_TIMEOUT_S + 1:
            answers.append(("echo",) + timed_echo(box.dicom_port))
            answers.append(("dcmsend",) + timed_dcmsend(box.dicom_port, files[len(answers) // 2 % len(files)]))
            time.sleep(0.5)
    finally:
        stop.set()
        for hostile in flood:
            hostile.join(15)
    assert len(answers) >= 8
    failed = [(what, round(seconds, 2)) for what, ok, seconds in answers if not ok or seconds >= 2.0]
    assert not failed, f"{len(failed)} of {len(answers)} echoscu/dcmsend failed or took 2 s or more: {failed}"
    for f in files[:len(answers) // 2]:
        assert stored(box.data_dir, str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)) == CT_IMAGE
    # The box closed every kind of hostile connection, the unfinished ones at the deadline.
    for kind in ("idle", "trickle"):
        closures = [c for hostile in flood if hostile.kind == kind for c in hostile.closed_after]
        assert sum(1 for h in flood if h.kind == kind and h.closed_after) == 60, kind
        assert min(closures) > ASSOCIATION_TIMEOUT_S - 1, (kind, min(closures))
        assert max(closures) < ASSOCIATION_TIMEOUT_S + 3, (kind, max(closures))
    malformed = [c for hostile in flood if hostile.kind == "malformed" for c in hostile.closed_after]
    assert len(malformed) >= 60 * 5 and max(malformed) < 1.5
    log = log_since(box, offset)
    assert f"refused: no complete A-ASSOCIATE-RQ within {ASSOCIATION_TIMEOUT_S} s" in log
    assert "refused: malformed A-ASSOCIATE-RQ (ValueError: Unable to decode" in log
    # Hundreds of refusals, a bounded number of lines (the rest is counted, not written).
    refusal_lines = [line for line in log.splitlines() if "DICOM connection from 127.0.0.1" in line]
    assert 2 <= len(refusal_lines) <= 20, len(refusal_lines)
    assert "Traceback" not in log


def associate_when_free(ae: AE, port: int, within: float = 5.0):
    """An association, asked again while the box answers that its slots are taken: a slot is
    free once the association that held it has ended its thread, moments after its release."""
    deadline = time.monotonic() + within
    assoc = ae.associate("127.0.0.1", port, ae_title="EDGE")
    while assoc.is_rejected and time.monotonic() < deadline:
        time.sleep(0.2)
        assoc = ae.associate("127.0.0.1", port, ae_title="EDGE")
    return assoc


def test_too_many_associations_from_one_address_are_refused_not_queued(box):
    offset = box.log_path.stat().st_size
    ae = AE(ae_title=CALLING_AE)
    ae.add_requested_context(VERIFICATION)
    held = [associate_when_free(ae, box.dicom_port) for _ in range(PER_PEER)]
    try:
        assert all(a.is_established for a in held)
        extra = ae.associate("127.0.0.1", box.dicom_port, ae_title="EDGE")
        assert extra.is_rejected
        answer = extra.acceptor.primitive
        assert (answer.result, answer.result_source, answer.diagnostic) == (0x02, 0x03, 0x02)  # transient, limit
        held.pop().release()
        again = associate_when_free(ae, box.dicom_port)
        assert again.is_established
        held.append(again)
    finally:
        for assoc in held:
            assoc.release()
    log = log_since(box, offset)
    assert f"refused: {PER_PEER} associations from this address already open (dicom.max_associations_per_peer" in log
    time.sleep(0.5)
    ok, seconds = timed_echo(box.dicom_port)
    assert ok and seconds < 2.0


# -- 2. PDU and dataset limits ------------------------------------------------------------------
def test_an_associated_peer_trickling_a_pdu_is_dropped_at_the_pdu_deadline(box):
    offset = box.log_path.stat().st_size
    assoc = RawAssociation(box.dicom_port, [(1, VERIFICATION, ImplicitVRLittleEndian)])
    echo = p_data(1, c_echo_rq(), command=True)
    started = time.monotonic()
    closed = None
    try:
        for byte in echo:  # one byte a second: the whole PDU would take ~90 s
            try:
                assoc.send(bytes([byte]))
            except OSError:
                closed = time.monotonic() - started
                break
            if closed_by_peer(assoc.sock, 1.0) is not None:
                closed = time.monotonic() - started
                break
    finally:
        assoc.close()
    assert closed is not None and PDU_TIMEOUT_S - 1 < closed < PDU_TIMEOUT_S + 3, closed
    assert f"aborted: PDU not complete within {PDU_TIMEOUT_S} s of its first byte (dicom.pdu_timeout_s)" \
        in log_since(box, offset)


def test_pdu_headers_claiming_gigabytes_cost_no_memory(box):
    box.echo()
    before = settled_rss_mb(box.proc.pid)
    # Before association: the box never reads what such a header announces.
    unassociated = [socket.create_connection(("127.0.0.1", box.dicom_port)) for _ in range(22)]
    unassociated[0].sendall(struct.pack(">BBI", 0x01, 0, 0xFFFFFFFF))
    unassociated[1].sendall(struct.pack(">BBI", 0x04, 0, 0xFFFFFFFF) + bytes(1000))
    for sock in unassociated[2:]:
        sock.sendall(struct.pack(">BBI", 0x01, 0, 100 * MB) + bytes(4096))
    # Associated (allowed AE): over the hard cap (4 x the advertised 1 MiB) -> aborted at the
    # header; at the cap -> read, but memory follows the bytes that really arrive.
    associated = [RawAssociation(box.dicom_port, [(1, VERIFICATION, ImplicitVRLittleEndian)]) for _ in range(20)]
    for assoc in associated[:2]:
        assoc.send(struct.pack(">BBI", 0x04, 0, 0xFFFFFFFF) + bytes(1000))
    for assoc in associated[2:4]:
        assoc.send(struct.pack(">BBI", 0x04, 0, 100 * MB) + bytes(1000))
    for assoc in associated[4:]:
        assoc.send(struct.pack(">BBI", 0x04, 0, 4 * MB) + bytes(64 * 1024))
    peak = peak_rss_mb(box.proc.pid, 2.0)
    assert peak - before < 50, f"RSS of the box grew from {before:.0f} MB to {peak:.0f} MB"
    for sock in unassociated + [a.sock for a in associated[:4]]:
        assert closed_by_peer(sock, 2.0) is not None
    # The 16 stalled mid-PDU are dropped at the PDU deadline.
    for assoc in associated[4:]:
        assert closed_by_peer(assoc.sock, PDU_TIMEOUT_S + 3) is not None
    for sock in unassociated + [a.sock for a in associated]:
        sock.close()
    ok, seconds = timed_echo(box.dicom_port)
    assert ok and seconds < 2.0


def test_a_dataset_over_the_limit_is_aborted_before_it_is_held(box):
    offset = box.log_path.stat().st_size
    assoc = RawAssociation(box.dicom_port, [(1, CT_IMAGE, ExplicitVRLittleEndian)])
    assoc.send(p_data(1, c_store_rq(CT_IMAGE, generate_uid()), command=True))
    fragment = p_data(1, bytes(1 * MB - 16), command=False, last=False)
    try:
        for _ in range(MAX_DATASET_MB + 2):
            assoc.send(fragment)
    except OSError:
        pass  # aborted while sending: what is wanted
    assert closed_by_peer(assoc.sock, 5.0) is not None
    assoc.close()
    assert f"aborted: dataset over {MAX_DATASET_MB} MB (dicom.max_dataset_mb)" in log_since(box, offset)
    # A real 7 MB radiograph is still welcome.
    cr = write_fresh_copies([pydicom.dcmread(sample("RG1_UNCR.dcm"))], Path(box.data_dir.parent / "cr"))[0]
    assert dcmsend(box.dicom_port, [cr]).returncode == 0


def explicit_little_endian(ds: Dataset) -> bytes:
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_dataset(out, ds)
    return out.getvalue()


def deflate_bomb(path: Path, inflated: int = 1024 * MB) -> Path:
    """A Part 10 file in Deflated Explicit VR Little Endian whose dataset (a secondary capture
    of zeros) inflates to ``inflated`` bytes from about a thousandth of that.  A deflate stream
    restarts after a full flush, so one compressed MiB of zeros is repeated instead of deflating
    a gigabyte."""
    ds = Dataset()
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "OT"
    ds.Rows = ds.Columns = 32768
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.SamplesPerPixel = 1
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    head = explicit_little_endian(ds)
    pixel_header = struct.pack("<HH2s2xI", 0x7FE0, 0x0010, b"OB", inflated)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    start = deflater.compress(head + pixel_header) + deflater.flush(zlib.Z_FULL_FLUSH)
    zeros = deflater.compress(bytes(MB)) + deflater.flush(zlib.Z_FULL_FLUSH)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    with open(path, "wb") as fh:
        fh.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(fh, meta)
        fh.write(start + zeros * (inflated // MB) + deflater.flush())
    return path


def test_a_deflate_bomb_is_refused_without_inflating_it(box, tmp_path):
    offset = box.log_path.stat().st_size
    bomb = deflate_bomb(tmp_path / "bomb.dcm")
    assert bomb.stat().st_size < 2 * MB
    box.echo()
    before = settled_rss_mb(box.proc.pid)
    ae = AE(ae_title=CALLING_AE)
    ae.add_requested_context(SECONDARY_CAPTURE, DeflatedExplicitVRLittleEndian)
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are
    result: dict = {}

    def send() -> None:
        assoc = ae.associate("127.0.0.1", box.dicom_port, ae_title="EDGE")
        try:
            result["status"] = assoc.send_c_store(bomb)
        finally:
            assoc.release()

    try:
        sender = threading.Thread(target=send)
        sender.start()
        peak = before
        while sender.is_alive():
            peak = max(peak, tree_rss_mb(box.proc.pid))
            time.sleep(0.05)
        sender.join()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assert result["status"].Status == 0xA700
    assert peak - before < 50, f"RSS of the box grew from {before:.0f} MB to {peak:.0f} MB"
    assert "deflated dataset inflates past 256 MB (dicom.max_inflated_mb)" in log_since(box, offset)
    ok, seconds = timed_echo(box.dicom_port)
    assert ok and seconds < 2.0
    # A genuine deflated dataset is still stored.
    assert dcmsend(box.dicom_port, [sample("image_dfl.dcm")]).returncode == 0


# -- 7. retired ultrasound classes; peer text in the log -------------------------------------
@pytest.mark.parametrize("source, retired", [("US1_UNCR.dcm", "1.2.840.10008.5.1.4.1.1.6"),
                                             ("OBXXXX1A_rle_2frame.dcm", "1.2.840.10008.5.1.4.1.1.3")])
def test_retired_ultrasound_classes_are_stored(box, tmp_path, source, retired):
    ds = pydicom.dcmread(sample(source))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = retired
    (path,) = write_fresh_copies([ds], tmp_path / "us")
    sent = dcmsend(box.dicom_port, [path])
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert stored(box.data_dir, str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)) == retired


def ct_with(**values: str) -> bytes:
    """CT_small with ``values`` set, however invalid, encoded explicit VR little endian."""
    ds = pydicom.dcmread(sample("CT_small.dcm"))
    mode = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        return explicit_little_endian(ds)
    finally:
        pydicom.config.settings.writing_validation_mode = mode


@pytest.mark.filterwarnings("ignore:The value length:UserWarning")  # the test's own over-long UIDs
def test_ten_thousand_character_uids_stay_out_of_the_log(box):
    offset = box.log_path.stat().st_size
    long_uid = "1.2." + "3" * 9996
    # In the association request, as an abstract syntax: not a request pynetdicom can decode.
    sock = socket.create_connection(("127.0.0.1", box.dicom_port), timeout=10)
    sock.sendall(associate_rq([(1, VERIFICATION, ImplicitVRLittleEndian), (3, long_uid, ImplicitVRLittleEndian)]))
    assert read_pdu(sock) == (0x07, b"\x00\x00\x02\x00")  # A-ABORT from the service provider
    sock.close()
    # In a C-STORE's command set and dataset.
    assoc = RawAssociation(box.dicom_port, [(1, VERIFICATION, ImplicitVRLittleEndian),
                                            (5, CT_IMAGE, ExplicitVRLittleEndian)])
    assoc.send(p_data(1, c_echo_rq(1), command=True))
    assert response_status(assoc.sock) == 0x0000
    assoc.send(p_data(5, c_store_rq(CT_IMAGE, long_uid, 2), command=True))
    assoc.send(p_data(5, ct_with(SOPInstanceUID=long_uid), command=False))
    assert response_status(assoc.sock) is None  # pynetdicom aborts on the command set's UID
    assoc.close()
    # In the dataset only (the study's UID, then the instance's): the box's own handler answers.
    for keyword in ("StudyInstanceUID", "SOPInstanceUID"):
        uid = generate_uid()
        assoc = RawAssociation(box.dicom_port, [(5, CT_IMAGE, ExplicitVRLittleEndian)])
        assoc.send(p_data(5, c_store_rq(CT_IMAGE, uid, 3), command=True))
        assoc.send(p_data(5, ct_with(**{"SOPInstanceUID": uid, keyword: long_uid}), command=False))
        status = response_status(assoc.sock)
        assoc.close()
        assert status is not None and status != 0x0000, (keyword, status)
    time.sleep(0.5)
    log = log_since(box, offset)
    assert "3" * 100 not in log
    assert "Traceback" not in log
    long_lines = [line for line in log.splitlines() if len(line) > 600]
    assert not long_lines, long_lines[0][:300]
    assert box.echo()


def test_log_lines_quote_peer_text_escaped():
    from appliance.acquire.limits import peer_text

    assert peer_text("CT\n2026-01-01 INFO forged line") == "CT\\n2026-01-01 INFO forged line"
    assert peer_text("\x1b[2J") == "\\x1b[2J"
    cut = peer_text("9" * 10000)
    assert cut.startswith("9" * 64) and cut.endswith("...(10000 chars)") and len(cut) < 90
    assert peer_text(b"AE\x00\xff", 16) == "AE\\x00\\xff"


# -- the gate on its own: who is pushed out when too many connections wait ---------------------
def _connect_from(source: str, port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def test_a_full_gate_pushes_out_the_flooding_address_never_the_modality():
    from appliance.acquire.guard import AssociationGate
    from appliance.acquire.limits import Limits

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    released: list[tuple[str, bytes]] = []

    def release(conn: socket.socket, address) -> None:
        released.append((address[0], conn.recv(65536, socket.MSG_PEEK)))
        conn.close()

    gate = AssociationGate(Limits(max_pending=8, association_timeout_s=30), release)
    gate.start()
    accepted: list[socket.socket] = []

    def accept(count: int) -> None:
        for _ in range(count):
            conn, address = listener.accept()
            accepted.append(conn)
            gate.add(conn, address)

    try:
        flood = [_connect_from("127.0.0.2", port) for _ in range(8)]
        accept(8)
        modality = _connect_from("127.0.0.3", port)  # the gate is full: the flood's oldest goes
        accept(1)
        more = [_connect_from("127.0.0.2", port) for _ in range(12)]
        accept(12)
        time.sleep(0.5)
        request = associate_rq([(1, VERIFICATION, ImplicitVRLittleEndian)])
        modality.sendall(request)
        deadline = time.monotonic() + 5
        while not released and time.monotonic() < deadline:
            time.sleep(0.05)
        assert released == [("127.0.0.3", request)]
        closed = [closed_by_peer(sock, 0.2) is not None for sock in flood + more]
        assert closed == [True] * 13 + [False] * 7  # the 13 oldest of the flood, the 7 newest wait
        assert gate.waiting() == 7
    finally:
        gate.stop()
        listener.close()
        for sock in accepted:
            sock.close()
