"""Outbox pieces without a network: requests, idempotency, cancel/retry, windows, backoff, deid."""
from __future__ import annotations

import random
import threading
import time
from datetime import datetime

import pydicom
import pytest
import requests

from appliance.config import Destination, load_config
from appliance.db import open_database
from appliance.errors import ConfigError
from appliance.forward import cancel_item, request_forward, retry_item, study_forwarding
from appliance.forward.deid import UidMap, deidentify
from appliance.forward.errors import ForwardRequestError, PolicyBlocked
from appliance.forward.pacing import backoff_s, in_window
from appliance.forward.transfer import Outcome
from appliance.store import InstanceStore
from tests.helpers import sample


@pytest.fixture
def box(tmp_path):
    site = tmp_path / "site.toml"
    site.write_text(f'[storage]\ndata_dir = "{tmp_path / "data"}"\nmin_free_mb = 0\n'
                    '[[destinations]]\nname = "hub"\nkind = "dicomweb"\nurl = "http://127.0.0.1:9/dicom-web"\n'
                    'attach_ai_results = false\ndeidentify = false\n')
    config = load_config(site, environ={})
    database = open_database(config.data_dir)
    study = InstanceStore(config.data_dir, database).store(sample("CT_small.dcm").read_bytes(), source="import").study_uid
    return config, database, study


def test_request_is_idempotent_and_upgrades_priority(box):
    config, database, study = box
    first = request_forward(database, config, study, "hub", "routine", "nurse")
    assert request_forward(database, config, study, "hub", "urgent", "nurse") == first
    (item,) = study_forwarding(database, study)
    assert item["priority"] == "urgent" and item["state"] == "queued"
    with pytest.raises(ConfigError):
        request_forward(database, config, study, "nowhere")
    with pytest.raises(ForwardRequestError):
        request_forward(database, config, "1.2.3.4", "hub")


def test_cancel_and_retry(box):
    config, database, study = box
    item = request_forward(database, config, study, "hub")
    cancel_item(database, item, "admin")
    assert study_forwarding(database, study)[0]["state"] == "cancelled"
    retry_item(database, item, "admin")
    assert study_forwarding(database, study)[0]["state"] == "queued"
    actions = [r["action"] for r in database.query("SELECT action FROM audit_log ORDER BY id")]
    assert actions == ["forward_request", "forward_cancel", "forward_retry"]


def test_send_window_and_backoff():
    assert in_window("", datetime(2026, 1, 1, 3, 0))
    assert in_window("22:00-06:00", datetime(2026, 1, 1, 3, 0))
    assert not in_window("22:00-06:00", datetime(2026, 1, 1, 12, 0))
    assert in_window("08:00-17:00", datetime(2026, 1, 1, 12, 0))
    rng = random.Random(1)
    delays = [backoff_s(n, 300, rng) for n in range(1, 20)]
    assert all(0 < d <= 300 for d in delays) and delays[-1] >= 150 and delays[0] <= 1
    # A destination down for days: past 1025 failures 2 ** n no longer fits a float.
    assert all(150 <= backoff_s(n, 300, rng) <= 300 for n in (1025, 1100, 10**6))


def test_uids_stable_and_burned_in_blocked(box):
    _, database, _ = box
    ds = pydicom.dcmread(sample("CT_small.dcm"))
    one, two = deidentify(ds, UidMap(database)), deidentify(ds, UidMap(database))
    assert one.SOPInstanceUID == two.SOPInstanceUID != ds.SOPInstanceUID
    assert one.file_meta.MediaStorageSOPInstanceUID == one.SOPInstanceUID
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(PolicyBlocked, match="burned-in"):
        deidentify(ds, UidMap(database))
    assert deidentify(ds, UidMap(database), allow_burned_in=True).PatientIdentityRemoved == "YES"


# -- batching, lanes and association reuse (no network) ---------------------------------------
def _studies(box, tmp_path, n):
    """``n`` more single-instance studies in the box's store; returns their study UIDs."""
    from tests.forward.util import new_study

    config, database, _ = box
    store = InstanceStore(config.data_dir, database)
    template = pydicom.dcmread(sample("CT_small.dcm"))
    return [store.store(new_study(template, tmp_path / f"s{i}.dcm").read_bytes(), source="import").study_uid
            for i in range(n)]


def test_claim_batch_groups_one_destination_and_priority_up_to_a_size(box, tmp_path):
    from appliance.forward import outbox

    config, database, first = box
    others = _studies(box, tmp_path, 4)
    routine = [request_forward(database, config, uid, "hub") for uid in [first] + others[:3]]
    urgent = request_forward(database, config, others[3], "hub", "urgent")
    assert [i["id"] for i in outbox.claim_batch(database, config)] == [urgent]  # urgent alone, first
    outbox.defer(database, urgent, 60)
    size = database.query("SELECT size FROM instances LIMIT 1")[0]["size"]
    batch = outbox.claim_batch(database, config, max_bytes=int(size * 2.5))
    assert [i["id"] for i in batch] == routine[:2] and all(i["state"] == "sending" for i in batch)
    assert [i["id"] for i in outbox.claim_batch(database, config, max_items=1)] == routine[:1]


class FakePeer:
    """Acknowledges everything; lists what it acknowledged, except to many-study queries if
    ``no_list_matching`` (a peer without UID list matching)."""

    def __init__(self, no_list_matching=False):
        self.no_list_matching = no_list_matching
        self.stored: dict[str, str] = {}  # remote SOP UID acknowledged -> its study
        self.sent_batches: list[int] = []
        self.queries: list[list[str]] = []

    def send(self, outgoing, report, should_stop):
        self.sent_batches.append(len(outgoing))
        for o in outgoing:
            self.stored[o.remote_sop_instance_uid] = str(o.load().StudyInstanceUID)
            report([Outcome(o.sop_instance_uid, "sent", 10, "1.2.840.10008.1.2.1")])

    def present(self, remote_study_uids):
        self.queries.append(list(remote_study_uids))
        if self.no_list_matching and len(remote_study_uids) > 1:
            return set()
        return {sop for sop, study in self.stored.items() if study in remote_study_uids}

    def close(self):
        pass


@pytest.mark.parametrize("list_matching", [True, False])
def test_a_batch_is_sent_together_and_confirmed_with_one_query(box, tmp_path, list_matching):
    from appliance.forward.service import Forwarder

    config, database, first = box
    uids = [first] + _studies(box, tmp_path, 3)
    for uid in uids:
        request_forward(database, config, uid, "hub")
    peer = FakePeer(no_list_matching=not list_matching)
    forwarder = Forwarder(config, database, InstanceStore(config.data_dir, database), lambda dest, stop: peer)
    assert forwarder.run_once() and not forwarder.run_once()
    assert peer.sent_batches == [4]  # one send for the four studies
    if list_matching:
        assert peer.queries == [uids]  # one confirming query for all of them
    else:  # the many-study query listed nothing: each study asked on its own, nothing resent
        assert peer.queries[0] == uids and sorted(peer.queries[1:]) == sorted([u] for u in uids)
    assert [i["state"] for u in uids for i in study_forwarding(database, u)] == ["confirmed"] * 4


class FakeAssoc:
    """An established association that stores everything and answers C-FIND with one match."""

    def __init__(self, contexts, log):
        from pynetdicom.presentation import PresentationContext

        self.is_established, self.is_rejected, self.log = True, False, log
        self.accepted_contexts = []
        for cx in contexts:
            accepted = PresentationContext()
            accepted.abstract_syntax, accepted.transfer_syntax = cx.abstract_syntax, cx.transfer_syntax[:1]
            self.accepted_contexts.append(accepted)

    def send_c_store(self, ds):
        self.log.append(("store", id(self), threading.get_ident()))
        time.sleep(0.05)  # a round trip, so that both lanes get work
        return _status(0)

    def send_c_find(self, query, model):
        self.log.append(("find", id(self), query.StudyInstanceUID))
        yield _status(0xFF00), pydicom.Dataset()
        yield _status(0), None

    def release(self):
        self.is_established = False
        self.log.append(("release", id(self)))

    def abort(self):
        self.is_established = False


def _status(code):
    status = pydicom.Dataset()
    status.Status = code
    return status


class FakeAE:
    def __init__(self, log):
        self.log = log

    def __call__(self, calling_ae):
        return self

    def associate(self, host, port, ae_title, contexts, **kwargs):
        assoc = FakeAssoc(contexts, self.log)
        self.log.append(("open", id(assoc)))
        return assoc


def _outgoing(n, sop_class="1.2.840.10008.5.1.4.1.1.2"):
    from pydicom.uid import generate_uid

    from appliance.forward.transfer import Outgoing

    template = pydicom.dcmread(sample("CT_small.dcm"))
    return [Outgoing(uid, uid, sop_class, str(template.file_meta.TransferSyntaxUID), lambda: template.copy())
            for uid in (generate_uid() for _ in range(n))]


def test_dicom_peer_keeps_associations_across_items_and_finds_on_them():
    from appliance.forward.dicom_peer import DicomPeer

    log, now = [], [0.0]
    peer = DicomPeer(Destination(name="pacs", kind="dicom", host="127.0.0.1", port=104, called_ae="HUB"), "EDGE",
                     ae_factory=FakeAE(log), lanes=2, idle_s=20, clock=lambda: now[0])
    reported = []
    peer.send(_outgoing(4), reported.extend, lambda: False)
    peer.send(_outgoing(3), reported.extend, lambda: False)  # the next item: same associations
    assert [o.state for o in reported] == ["sent"] * 7
    opened = {e[1] for e in log if e[0] == "open"}
    assert len(opened) == 2 and {e[1] for e in log if e[0] == "store"} == opened  # both lanes carried C-STOREs
    assert len({e[2] for e in log if e[0] == "store"}) == 2  # ...from two threads at once
    assert peer.present(["1.2.3", "1.2.4"]) and log[-1] == ("find", log[-1][1], ["1.2.3", "1.2.4"])
    assert log[-1][1] in opened and len([e for e in log if e[0] == "open"]) == 2  # C-FIND on an open one
    now[0] = 30.0  # idle longer than idle_s: released, new associations
    peer.send(_outgoing(1), reported.extend, lambda: False)
    assert len([e for e in log if e[0] == "release"]) == 2 and len([e for e in log if e[0] == "open"]) == 3
    peer.send(_outgoing(1, "1.2.840.10008.5.1.4.1.1.1"), reported.extend, lambda: False)  # new SOP class
    assert len([e for e in log if e[0] == "open"]) == 4
    peer.close()
    assert len([e for e in log if e[0] == "release"]) == 4


def test_a_lane_left_idle_is_released_before_the_peer_would_drop_it():
    """A lane with nothing to send while another carries a long radiograph idles; it is replaced
    once idle for idle_s (below the peer's own idle timeout), the busy one is kept."""
    from appliance.forward.dicom_peer import DicomPeer

    log, now = [], [0.0]
    peer = DicomPeer(Destination(name="pacs", kind="dicom", host="127.0.0.1", port=104, called_ae="HUB"), "EDGE",
                     ae_factory=FakeAE(log), lanes=2, idle_s=20, clock=lambda: now[0])
    peer.send(_outgoing(2), [].extend, lambda: False)
    first, second = [e[1] for e in log if e[0] == "open"]
    now[0] = 15.0
    peer.send(_outgoing(1), [].extend, lambda: False)  # one instance: one lane used
    used = [e[1] for e in log if e[0] == "store"][-1]
    now[0] = 25.0  # the other lane idle for 25 s, this one for 10 s
    peer.send(_outgoing(2), [].extend, lambda: False)
    assert [e[1] for e in log if e[0] == "release"] == [({first, second} - {used}).pop()]
    assert len([e for e in log if e[0] == "open"]) == 3
    assert used in {e[1] for e in log[-2:] if e[0] == "store"}


def test_run_lanes_reports_in_the_calling_thread_stops_and_reraises():
    from appliance.forward.errors import TransientSendError
    from appliance.forward.transfer import run_lanes

    outgoing = _outgoing(6)
    caller, threads = threading.get_ident(), []

    def send_one(lane, o):
        time.sleep(0.02)  # waiting for the peer's response
        return Outcome(o.sop_instance_uid, "sent")

    def report(outcomes):
        threads.append(threading.get_ident())

    run_lanes(["a", "b"], outgoing, send_one, report, lambda: False)
    assert len(threads) == 6 and set(threads) == {caller}
    reported = []
    run_lanes(["a", "b"], outgoing, send_one, reported.extend, lambda: len(reported) >= 2)
    assert 2 <= len(reported) <= 4  # plus at most what the lanes had already started

    def failing(lane, o):
        if lane == "b":
            raise TransientSendError("link down")
        time.sleep(0.01)
        return Outcome(o.sop_instance_uid, "sent")

    reported.clear()
    with pytest.raises(TransientSendError):
        run_lanes(["a", "b"], outgoing, failing, reported.extend, lambda: False)
    assert len(reported) < 6


def test_dicomweb_confirms_many_studies_per_query_and_paces_the_body():
    from appliance.forward.dicomweb import DicomWebPeer, PacedBody
    from appliance.forward.pacing import Pacer

    class Session:
        def __init__(self):
            self.calls = []

        def request(self, method, url, params=None, **kwargs):
            self.calls.append((url, params))
            response = requests.Response()
            response.status_code, response._content = 200, b"[]"
            return response

    session = Session()
    peer = DicomWebPeer(Destination(name="hub", kind="dicomweb", url="http://127.0.0.1:9/dicom-web"), session=session)
    uids = [f"1.2.{i}" for i in range(30)]
    peer.present(uids)
    assert [c[1]["StudyInstanceUID"] for c in session.calls] == [",".join(uids[:24]), ",".join(uids[24:])]
    assert all(c[0].endswith("/dicom-web/instances") for c in session.calls)

    paced = []
    pacer = Pacer(0)
    pacer.sent = paced.append
    body = PacedBody([b"a" * 100_000, b"b" * 10], pacer)
    assert len(body) == 100_010
    chunks = iter(lambda: body.read(8192), b"")
    assert b"".join(chunks) == b"a" * 100_000 + b"b" * 10 and sum(paced) == 100_010 and max(paced) <= 8192


def test_c_store_response_wait_grows_with_the_dataset_on_slow_links(monkeypatch):
    """The response comes only after the whole dataset has crossed the link: a 7 MB radiograph
    over three lanes of a 64 kbit/s link must not be given up after the usual 30 s."""
    from appliance.forward.dicom_peer import SLOWEST_LINK_BYTES_PER_S, DicomPeer

    log = []
    peer = DicomPeer(Destination(name="pacs", kind="dicom", host="127.0.0.1", port=104, called_ae="HUB"), "EDGE",
                     ae_factory=FakeAE(log), lanes=3, timeout_s=30)
    assert peer.response_timeout_s(0) == 30
    big = peer.response_timeout_s(7_200_000)
    assert big >= 7_200_000 * 3 / SLOWEST_LINK_BYTES_PER_S and big > 2000
    waits = []
    original = FakeAssoc.send_c_store

    def send_c_store(self, ds):
        waits.append(self.dimse_timeout)  # what the association will wait for this response
        assert self.network_timeout == self.dimse_timeout  # and its idle timer will not abort sooner
        return original(self, ds)

    monkeypatch.setattr(FakeAssoc, "send_c_store", send_c_store)
    peer.send(_outgoing(1), [].extend, lambda: False)
    size = len(sample("CT_small.dcm").read_bytes())
    assert len(waits) == 1 and abs(waits[0] - peer.response_timeout_s(size)) < 0.1 * size * 3 / SLOWEST_LINK_BYTES_PER_S
