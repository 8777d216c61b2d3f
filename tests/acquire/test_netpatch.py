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
