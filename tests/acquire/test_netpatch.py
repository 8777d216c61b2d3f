"""netpatch's P-DATA decoding: the same fragments as pynetdicom's own, as views; damage refused."""
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


def test_an_association_is_cut_at_its_lifetime_even_while_it_keeps_talking(caplog):
    import time

    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification

    from appliance.acquire.limits import Limits
    from tests.helpers import free_port

    acceptor = AE(ae_title="EDGE")
    acceptor.add_supported_context(Verification)
    acceptor.edge_limits = Limits(max_association_s=1.5)  # below the configurable minimum, for time
    port = free_port()
    server = acceptor.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_ECHO, lambda e: 0)])
    try:
        requestor = AE(ae_title="MODALITY")
        requestor.add_requested_context(Verification)
        assoc = requestor.associate("127.0.0.1", port, ae_title="EDGE")
        started = time.monotonic()
        answered = 0
        while assoc.is_established and time.monotonic() - started < 10:
            status = assoc.send_c_echo()
            answered += bool(status) and status.Status == 0
            time.sleep(0.2)
        lasted = time.monotonic() - started
        assert assoc.is_aborted and answered >= 4
        assert 1.3 < lasted < 4, lasted
    finally:
        server.shutdown()
    assert any("association open longer than 1.5 s (dicom.max_association_s)" in r.getMessage() for r in caplog.records)
