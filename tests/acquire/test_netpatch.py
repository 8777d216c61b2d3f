"""netpatch, the box's own upper layer: P-DATA decoding (the same fragments as pynetdicom's own,
as views; damage refused), bounded reads, and that it is the SCP's alone: with
``dicom.fast_reactor`` on its associations wait instead of polling, with it off they poll as
pynetdicom ships but keep every limit, and the box's own requests (the forwarder's) run plain
pynetdicom in the same process."""
from __future__ import annotations

import pytest
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

from appliance.acquire.netpatch import decode_p_data


def _encoded(pdvs: list[list]) -> bytes:
    primitive = P_DATA()
    primitive.presentation_data_value_list = pdvs
    pdu = P_DATA_TF()
    pdu.from_primitive(primitive)
    return pdu.encode()


def test_fragments_are_those_pynetdicom_decodes_without_copies():
    data = _encoded([[1, b"\x03" + b"command" * 3], [3, b"\x00" + bytes(range(256)) * 40], [5, b"\x02"]])
    ours = decode_p_data(bytearray(data))
    theirs = P_DATA_TF()
    theirs.decode(data)
    assert [(i.presentation_context_id, bytes(i.presentation_data_value)) for i in ours.presentation_data_value_items] \
        == [(i.presentation_context_id, i.presentation_data_value) for i in theirs.presentation_data_value_items]
    assert all(isinstance(i.presentation_data_value, memoryview) for i in ours.presentation_data_value_items)
    assert [(cid, bytes(d)) for cid, d in ours.to_primitive().presentation_data_value_list] \
        == theirs.to_primitive().presentation_data_value_list


@pytest.mark.parametrize("cut, why", [(-1, "impossible length"), (-9, "impossible length"), (4, "header truncated")])
def test_an_item_that_runs_past_the_pdu_is_refused(cut, why):
    data = _encoded([[1, b"\x00" + b"x" * 10]])
    damaged = data[:6 + cut] if cut > 0 else data[:cut]
    with pytest.raises(ValueError, match=why):
        decode_p_data(bytearray(damaged))


def test_an_empty_item_is_refused():
    with pytest.raises(ValueError, match="impossible length 0"):
        decode_p_data(bytearray(b"\x04\x00\x00\x00\x00\x05" + b"\x00\x00\x00\x00\x01"))


def test_receive_grows_with_the_bytes_that_arrive_not_with_the_claim():
    import socket
    import tracemalloc

    from appliance.acquire.netpatch import receive

    ours, theirs = socket.socketpair()
    theirs.sendall(b"x" * 1000)
    theirs.close()
    tracemalloc.start()
    try:
        data = receive(ours, 100 * 1024 * 1024)  # what a header claimed
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        ours.close()
    assert data == b"x" * 1000
    assert peak < 1024 * 1024, peak


def test_receive_gives_up_at_its_deadline():
    import socket
    import time

    from appliance.acquire.netpatch import receive

    ours, theirs = socket.socketpair()
    theirs.sendall(b"x" * 10)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        receive(ours, 100, deadline=started + 0.5)
    assert 0.4 < time.monotonic() - started < 2
    ours.close()
    theirs.close()


@pytest.fixture
def scp(tmp_path):
    """``start_scp`` in this process, for ``dicom.fast_reactor`` = the given value."""
    from appliance.acquire.scp import start_scp
    from appliance.config import load_config
    from appliance.db import open_database
    from appliance.store import InstanceStore
    from tests.helpers import CALLING_AE, free_port

    servers = []

    def start(fast_reactor: bool):
        data = tmp_path / f"data-{len(servers)}"
        config = load_config(overrides={"dicom.fast_reactor": fast_reactor, "dicom.host": "127.0.0.1",
                                        "dicom.port": free_port(), "dicom.allowed_calling_aes": [CALLING_AE],
                                        "storage.data_dir": str(data), "storage.min_free_mb": 0}, environ={})
        database = open_database(data)
        server = start_scp(config, InstanceStore(data, database, 0))
        servers.append((server, database))
        return server

    yield start
    for server, database in servers:
        server.shutdown()
        database.close()


def _requestor():
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made with globals() at import

    from tests.helpers import CALLING_AE

    ae = AE(ae_title=CALLING_AE)
    ae.add_requested_context(Verification)
    return ae


def _acceptor_of(server, timeout: float = 5.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = server.active_associations
        if found and found[0].is_established:
            return found[0]
        time.sleep(0.02)
    raise AssertionError("the SCP has no established association")


def _idle_loops(dul, seconds: float) -> int:
    """How often the DUL thread of an idle association looks at its socket in ``seconds``."""
    import time

    count = [0]
    original = dul._is_transport_event

    def counted():
        count[0] += 1
        return original()

    dul._is_transport_event = counted
    time.sleep(seconds)
    dul._is_transport_event = original
    return count[0]


@pytest.mark.parametrize("fast_reactor", [True, False], ids=["fast reactor on", "fast reactor off"])
def test_the_scp_s_associations_wait_with_the_switch_on_and_poll_with_it_off(scp, fast_reactor, caplog):
    import logging

    from appliance.acquire.netpatch import FastAssociation, FastDUL, LimitedAssociation, LimitedDUL

    with caplog.at_level(logging.INFO, logger="appliance.acquire.scp"):
        server = scp(fast_reactor)
    switch_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("DICOM receiver: fast reactor")]
    assert switch_lines == [f"DICOM receiver: fast reactor {'on' if fast_reactor else 'off'}"]
    assoc = _requestor().associate("127.0.0.1", server.server_address[1], ae_title="EDGE")
    try:
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        acceptor = _acceptor_of(server)
        loops = _idle_loops(acceptor.dul, 1.0)
        if fast_reactor:
            assert type(acceptor) is FastAssociation and type(acceptor.dul) is FastDUL
            # At most one look per MAX_WAIT_S (50 ms) while nothing happens.
            assert loops <= 30, loops
        else:
            assert type(acceptor) is LimitedAssociation and type(acceptor.dul) is LimitedDUL
            assert not hasattr(acceptor, "work")
            # pynetdicom's own 1 ms poll.
            assert loops >= 200, loops
        assert assoc.send_c_echo().Status == 0
    finally:
        assoc.release()


@pytest.mark.parametrize("fast_reactor", [True, False], ids=["fast reactor on", "fast reactor off"])
def test_an_association_is_cut_at_its_lifetime_even_while_it_keeps_talking(scp, fast_reactor, caplog):
    import time

    from appliance.acquire.limits import Limits

    server = scp(fast_reactor)
    server.ae.edge_limits = Limits(max_association_s=1.5)  # below the configurable minimum, for time
    assoc = _requestor().associate("127.0.0.1", server.server_address[1], ae_title="EDGE")
    started = time.monotonic()
    answered = 0
    while assoc.is_established and time.monotonic() - started < 10:
        status = assoc.send_c_echo()
        answered += bool(status) and status.Status == 0
        time.sleep(0.2)
    lasted = time.monotonic() - started
    assert assoc.is_aborted and answered >= 4
    assert 1.3 < lasted < 4, lasted
    assert any("association open longer than 1.5 s (dicom.max_association_s)" in r.getMessage() for r in caplog.records)


def test_the_forwarder_s_association_in_the_same_process_is_plain_pynetdicom(scp, tmp_path):
    """The box's SCP (fast reactor on) and the forwarder sending to it, in one process: the
    SCP's side of the association is the box's, the forwarder's side is pynetdicom's as it ships,
    and pynetdicom's own classes and modules are untouched."""
    import time as time_module

    import pydicom
    from pynetdicom import dul as pynetdicom_dul
    from pynetdicom import fsm
    from pynetdicom.association import Association
    from pynetdicom.dul import DULServiceProvider
    from pynetdicom.transport import AssociationSocket

    from appliance.acquire.netpatch import FastAssociation
    from appliance.config import Destination
    from appliance.forward.dicom_peer import DicomPeer
    from appliance.forward.transfer import Outgoing
    from tests.helpers import CALLING_AE, sample

    server = scp(True)
    dest = Destination(name="self", kind="dicom", host="127.0.0.1", port=server.server_address[1],
                       called_ae="EDGE", calling_ae=CALLING_AE)
    peer = DicomPeer(dest, CALLING_AE, timeout_s=10, lanes=1)
    ds = pydicom.dcmread(sample("CT_small.dcm"))
    outgoing = Outgoing(str(ds.SOPInstanceUID), str(ds.SOPInstanceUID), str(ds.SOPClassUID),
                        str(ds.file_meta.TransferSyntaxUID), lambda: pydicom.dcmread(sample("CT_small.dcm")))
    outcomes = []
    try:
        peer.send([outgoing], outcomes.extend, lambda: False)
        assert [o.state for o in outcomes] == ["sent"], outcomes
        (requestor,) = [a for a in peer._assocs if a.is_established]
        assert type(requestor) is Association and type(requestor.dul) is DULServiceProvider
        assert type(_acceptor_of(server)) is FastAssociation
    finally:
        peer.close()
    assert pynetdicom_dul.time is time_module
    assert DULServiceProvider._read_pdu_data.__module__ == "pynetdicom.dul"
    assert DULServiceProvider.run_reactor.__module__ == "pynetdicom.dul"
    assert DULServiceProvider.send_pdu.__module__ == "pynetdicom.dul"
    assert AssociationSocket.recv.__module__ == "pynetdicom.transport"
    assert fsm.StateMachine.do_action.__module__ == "pynetdicom.fsm"
    assert Association._run_reactor.__module__ == "pynetdicom.association"
