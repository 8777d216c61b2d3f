"""SIGKILL `appliance serve` at random moments while dcmtk streams: nothing acknowledged is lost."""
from __future__ import annotations

import hashlib
import random
import sqlite3
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from tests.helpers import CALLING_AE, sample, write_fresh_copies

N_INSTANCES = 300
MIN_KILLS = 20


def make_instances(out: Path, n: int) -> list[Path]:
    """``n`` distinct instances (10 per study) made from real images with fresh UIDs."""
    sources = [pydicom.dcmread(sample(name)) for name in ("CT_small.dcm", "MR_small.dcm", "US1_UNCR.dcm")]
    return write_fresh_copies([sources[i % len(sources)] for i in range(n)], out, per_study=10)


def acknowledged(storescu_output: str) -> set[str]:
    """Files for which storescu received a success response."""
    done, current = set(), None
    for line in storescu_output.splitlines():
        if line.startswith("I: Sending file: "):
            current = line[len("I: Sending file: "):].strip()
        elif line.startswith("I: Received Store Response (Success)") and current:
            done.add(current)
            current = None
    return done


def start_storescu(port: int, files: list[Path]) -> subprocess.Popen:
    return subprocess.Popen(
        ["storescu", "-v", "-nh", "-aet", CALLING_AE, "-aec", "EDGE", "127.0.0.1", str(port), *map(str, files)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


@pytest.mark.slow
def test_sigkill_during_stream_loses_nothing_acknowledged(server_factory, tmp_path):
    rng = random.Random(7)
    files = make_instances(tmp_path / "send", N_INSTANCES)
    server = server_factory()
    acked: set[str] = set()
    kills = 0
    while kills < MIN_KILLS or len(acked) < len(files):
        remaining = [f for f in files if str(f) not in acked]
        server.start()
        sender = start_storescu(server.dicom_port, remaining)
        if kills < MIN_KILLS:
            time.sleep(rng.uniform(0.05, 0.6))
            server.kill()
            kills += 1
            output, _ = sender.communicate(timeout=120)
        else:
            output, _ = sender.communicate(timeout=300)
            server.stop()
        acked |= acknowledged(output)

    # A final clean start runs recovery; then inspect what is on disk and in the database.
    server.start()
    server.stop()
    data = server.data_dir
    assert list((data / "tmp").iterdir()) == [], "temp files left after recovery"
    conn = sqlite3.connect(data / "appliance.db")
    every_row = {path for (path,) in conn.execute("SELECT file_path FROM instances")}
    # The box's own AI results (source 'ai') are stored too; the clinic's images are the rest.
    rows = {uid: (path, sha) for uid, path, sha in conn.execute(
        "SELECT sop_instance_uid, file_path, sha256 FROM instances WHERE source != 'ai'")}
    conn.close()
    on_disk = {str(p) for p in (data / "instances").rglob("*.dcm")}
    assert on_disk == every_row, "orphan files or rows without files"
    assert len(rows) == len(files)
    for f in files:
        uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        path, sha = rows[uid]
        stored = Path(path)
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == sha
        sent, kept = pydicom.dcmread(f), pydicom.dcmread(stored)
        # storescu re-encodes and drops DataSetTrailingPadding; every other element is equal.
        for ds in (sent, kept):
            ds.pop(0xFFFCFFFC, None)
        assert kept == sent
    assert kills >= MIN_KILLS
