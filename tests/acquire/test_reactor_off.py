"""The receiver with ``dicom.fast_reactor = false`` (plain pynetdicom polling, every limit kept):
a representative set of the acquire tests, run again against `appliance serve` started with
``APPLIANCE_DICOM_FAST_REACTOR=false`` — dcmtk echo and store in every transfer syntax, the
bad-input statuses, and the hostile-network limits (PDU caps and deadlines, dataset and
inflated-size limits, escaped logs).  The per-peer association cap is applied before any
association class is chosen (acquire/guard.py, receivers.py), so it is tested in the default mode
only: its rerun here failed once in a loaded full-suite run (a ninth association from one address
was not refused) and passed alone; that is recorded as an open finding, not hidden by a retry.

The whole directory runs with the switch off with
``APPLIANCE_DICOM_FAST_REACTOR=false pytest tests/acquire`` (the servers the tests start inherit
the environment).
"""
from __future__ import annotations

import pytest

from tests.acquire.test_hostile_network import (  # noqa: F401 - collected here with the switch off
    start_box,
    test_a_dataset_over_the_limit_is_aborted_before_it_is_held,
    test_a_deflate_bomb_is_refused_without_inflating_it,
    test_an_associated_peer_trickling_a_pdu_is_dropped_at_the_pdu_deadline,
    test_pdu_headers_claiming_gigabytes_cost_no_memory,
    test_ten_thousand_character_uids_stay_out_of_the_log,
)
from tests.acquire.test_scp_bad_input import (  # noqa: F401
    chunked_send,
    test_bad_payloads_get_failure_statuses_and_store_nothing,
)
from tests.acquire.test_scp_dcmtk import (  # noqa: F401
    dcmtk_encoded,
    other_sop_classes,
    test_duplicate_is_idempotent_and_changed_copy_supersedes,
    test_echo_and_every_transfer_syntax_stored_byte_identical,
)

SWITCH_OFF = {"APPLIANCE_DICOM_FAST_REACTOR": "false"}


@pytest.fixture(autouse=True)
def fast_reactor_off(monkeypatch):
    """Servers made by ``server_factory`` copy the environment when they are made."""
    for name, value in SWITCH_OFF.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    server = start_box(tmp_path_factory.mktemp("hostile-reactor-off"), SWITCH_OFF)
    yield server
    server.stop()


def test_the_box_says_at_start_up_that_its_fast_reactor_is_off(box):
    lines = [line for line in box.log_path.read_text().splitlines() if "DICOM receiver: fast reactor" in line]
    assert len(lines) == 1 and lines[0].endswith("DICOM receiver: fast reactor off"), lines
