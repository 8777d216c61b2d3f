"""Several receiving processes (dicom.processes): balance, storage, and dying with the box."""
from __future__ import annotations

import os
import re
import signal
import sqlite3
import time
from pathlib import Path

import pydicom
from pynetdicom import AE

from tests.helpers import CALLING_AE, dcmsend, sample, write_fresh_copies

STORED_LINE = re.compile(r"appliance\.acquire\.scp(\[receiver-\d+\])?: C-STORE from \S+: stored")


def _children(pid: int) -> set[int]:
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.add(int(entry.name))
    return out


def _receiving_children(pid: int) -> set[int]:
    """The helper processes (not multiprocessing's resource tracker, which exits by itself)."""
    return {c for c in _children(pid) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _stored_rows(data_dir: Path) -> set[str]:
    con = sqlite3.connect(data_dir / "appliance.db")
    try:
        return {r[0] for r in con.execute("SELECT sop_instance_uid FROM instances WHERE source = 'dicom'")}
    finally:
        con.close()


def _wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def _store_over_parallel_associations(port: int, datasets: list) -> None:
    """One association per dataset, all open at once, then one C-STORE on each."""
    ae = AE(ae_title=CALLING_AE)
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
    assocs = [ae.associate("127.0.0.1", port, ae_title="EDGE") for _ in datasets]
    try:
        assert all(a.is_established for a in assocs)
        for assoc, ds in zip(assocs, datasets):
            assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        for assoc in assocs:
            assoc.release()


def test_concurrent_associations_are_spread_over_the_processes(server_factory, tmp_path):
    server = server_factory(extra_env={"APPLIANCE_DICOM_PROCESSES": "3"}).start()
    assert _wait_for(lambda: len(_receiving_children(server.proc.pid)) == 2)
    files = write_fresh_copies([pydicom.dcmread(sample("CT_small.dcm"))] * 3, tmp_path / "send")
    datasets = [pydicom.dcmread(f) for f in files]
    # Three associations open at once: one per process (helpers first, then the main process).
    _store_over_parallel_associations(server.dicom_port, datasets)
    assert _stored_rows(server.data_dir) == {str(ds.SOPInstanceUID) for ds in datasets}
    tags = sorted(m.group(1) or "main" for m in STORED_LINE.finditer(server.log_path.read_text()))
    assert tags == ["[receiver-1]", "[receiver-2]", "main"]


def test_helpers_die_with_the_main_process_and_a_restart_serves_again(server_factory, tmp_path):
    data_dir = tmp_path / "data"
    server = server_factory(data_dir, extra_env={"APPLIANCE_DICOM_PROCESSES": "2"}).start()
    assert _wait_for(lambda: len(_receiving_children(server.proc.pid)) == 1)
    helpers = _receiving_children(server.proc.pid)
    port = server.dicom_port
    server.kill()  # SIGKILL: no chance to stop its helpers itself
    assert _wait_for(lambda: not any(_alive(h) for h in helpers), timeout=10)
    again = server_factory(data_dir, extra_env={"APPLIANCE_DICOM_PROCESSES": "2"}, dicom_port=port).start()
    files = write_fresh_copies([pydicom.dcmread(sample("CT_small.dcm"))] * 4, tmp_path / "send")
    assert dcmsend(again.dicom_port, files).returncode == 0
    assert _stored_rows(data_dir) >= {str(pydicom.dcmread(f).SOPInstanceUID) for f in files}


def test_a_helper_that_dies_is_replaced(server_factory, tmp_path):
    server = server_factory(extra_env={"APPLIANCE_DICOM_PROCESSES": "2"}).start()
    assert _wait_for(lambda: len(_receiving_children(server.proc.pid)) == 1)
    (helper,) = _receiving_children(server.proc.pid)
    os.kill(helper, signal.SIGKILL)
    assert _wait_for(lambda: _receiving_children(server.proc.pid) - {helper} != set())
    assert "DICOM receiving process 1 exited" in server.log_path.read_text()
    # Both processes serve again: two associations at once are both stored.
    files = write_fresh_copies([pydicom.dcmread(sample("CT_small.dcm"))] * 2, tmp_path / "send")
    datasets = [pydicom.dcmread(f) for f in files]
    _store_over_parallel_associations(server.dicom_port, datasets)
    assert _stored_rows(server.data_dir) == {str(ds.SOPInstanceUID) for ds in datasets}
    log = server.log_path.read_text()
    assert len(re.findall(r"scp\[receiver-1\]: C-STORE from \S+: stored", log)) == 1
