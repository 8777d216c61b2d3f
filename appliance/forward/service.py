"""The forwarder inside `appliance serve`: a sender thread over the outbox and a report poller.

One sender thread sends one item at a time, most pressing first; a routine item yields between
instances when an urgent one is waiting.  Each attempt:

1. adds the study's instances the item does not list yet (late images, AI results);
2. if anything may already be on the hub (an earlier attempt, a crash), asks the hub which
   instances it holds and marks those confirmed, so only the rest is sent;
3. sends the pending instances, committing each peer acknowledgement as it arrives;
4. asks the hub again and confirms what it lists; the item settles (confirmed / failed).

A transient error ends the attempt and backs the destination off; nothing is ever dropped.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Optional

import pydicom
import pydicom.errors

from ..background import BackgroundService
from ..config import Config
from ..db import Database
from ..store import InstanceStore
from . import outbox, reports, rules
from .deid import UidMap, deidentify
from .dicom_peer import DicomPeer
from .dicomweb import DicomWebPeer
from .errors import PolicyBlocked, TransientSendError
from .pacing import Pacer
from .transfer import Outcome, Outgoing, Peer

log = logging.getLogger(__name__)

RULES_EVERY_S = 2.0
PeerFactory = Callable[[dict[str, Any], threading.Event], Peer]


class Forwarder(BackgroundService):
    """Sender and report-poller threads for every configured destination."""

    def __init__(self, config: Config, database: Database, store: InstanceStore,
                 peer_factory: Optional[PeerFactory] = None):
        super().__init__()
        self.config = config
        self.db = database
        self.store = store
        self._peer_factory = peer_factory or self._default_peer
        self._uids: Optional[UidMap] = None
        self._last_rules = 0.0
        # Peers are kept between items of the same destination: on a long-delay link a new TCP
        # connection (handshake, slow start) per study costs seconds.  Dropped after any error.
        self._peers: dict[str, Peer] = {}

    @property
    def uids(self) -> UidMap:
        if self._uids is None:
            self._uids = UidMap(self.db)
        return self._uids

    def _default_peer(self, dest: dict[str, Any], stop: threading.Event) -> Peer:
        pacer = Pacer(int(dest["max_rate_kbps"]), stop)
        if dest["kind"] == "dicom":
            return DicomPeer(dest, self.config["dicom"]["ae_title"], pacer=pacer)
        return DicomWebPeer(dest, pacer=pacer)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if not self.config["destinations"]:
            log.info("forwarding: no destinations configured")
            return
        self._spawn("forward-sender", self._send_loop)
        self._spawn("forward-reports", self._report_loop)

    def stop(self) -> None:
        super().stop()
        for peer in self._peers.values():
            peer.close()
        self._peers.clear()

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            worked = False
            try:
                if time.monotonic() - self._last_rules >= RULES_EVERY_S:
                    self._last_rules = time.monotonic()
                    rules.evaluate(self.db, self.config)
                worked = self.run_once()
            except Exception:  # noqa: BLE001 - the sender thread must survive anything
                log.exception("forwarder error")
            if not worked:
                self._wake.wait(1.0)
                self._wake.clear()

    def _report_loop(self) -> None:
        last: dict[str, float] = {}
        while not self._stop.wait(1.0):
            for dest in self.config["destinations"]:
                if dest["kind"] != "dicomweb" or time.monotonic() - last.get(dest["name"], -1e9) < dest["poll_reports_s"]:
                    continue
                last[dest["name"]] = time.monotonic()
                try:
                    reports.poll(self.db, self.store, self.uids, dest, DicomWebPeer(dest))
                except TransientSendError as exc:
                    log.warning("report poll of %s: %s", dest["name"], exc)
                except Exception:  # noqa: BLE001 - keep polling the other destinations
                    log.exception("report poll of %s failed", dest["name"])

    # -- one attempt -------------------------------------------------------------------------
    def run_once(self) -> bool:
        """Claim and attempt one item; False when nothing may be sent now."""
        item = outbox.claim_next(self.db, self.config)
        if item is None:
            return False
        self.attempt(item)
        return True

    def attempt(self, item: dict[str, Any]) -> str:
        dest = self.config.destination(item["destination"])
        outbox.refresh_instances(self.db, item, dest["attach_ai_results"])
        remote_study = self.uids.uid(item["study_uid"]) if dest["deidentify"] else item["study_uid"]
        if remote_study != item["remote_study_uid"]:
            self.uids.flush()
            outbox.set_remote_study(self.db, item["id"], remote_study)
        peer = self._peers.get(dest["name"]) or self._peer_factory(dest, self._stop)
        self._peers[dest["name"]] = peer
        try:
            rows = outbox.instances(self.db, item["id"])
            self._assign_remote_uids(item, rows, dest)
            if item["attempts"] > 1 or any(r["state"] == "sent" for r in rows):
                outbox.confirm_present(self.db, item["id"], peer.present(remote_study))
            todo = outbox.instances(self.db, item["id"], ("pending",))
            stopped = False

            def should_stop() -> bool:
                nonlocal stopped
                stopped = stopped or self._stop.is_set() or self._interrupted(item)
                return stopped

            if todo:
                peer.send([self._outgoing(r, dest) for r in todo],
                          lambda outcomes: self._record(item["id"], outcomes), should_stop)
            if stopped:
                return "interrupted"
            confirmed = outbox.confirm_present(self.db, item["id"], peer.present(remote_study))
            outbox.note_success(self.db, dest["name"])
        except TransientSendError as exc:
            self._peers.pop(dest["name"], None)
            peer.close()
            delay = outbox.note_failure(self.db, item["id"], dest["name"], str(exc), dest["retry_max_s"])
            log.warning("outbox item %d: %s; retry in %.0fs", item["id"], exc, delay)
            return "retry"
        except BaseException:
            self._peers.pop(dest["name"], None)
            peer.close()
            raise
        state = outbox.settle(self.db, item["id"])
        if state in ("sending", "delivered"):
            # Acknowledged but not listed by the hub: not confirmed, so try again later.
            outbox.note_failure(self.db, item["id"], dest["name"],
                                f"{dest['name']} does not list every acknowledged instance yet", dest["retry_max_s"])
        log.info("outbox item %d to %s: %s (%d confirmed)", item["id"], dest["name"], state, confirmed)
        return state

    def _interrupted(self, item: dict[str, Any]) -> bool:
        """Cancelled meanwhile, or a routine item with an urgent one waiting."""
        row = self.db.query("SELECT state FROM outbox_items WHERE id = ?", (item["id"],))
        if not row or row[0]["state"] not in outbox.ACTIVE:
            return True
        if item["priority_rank"] > 0:
            urgent = self.db.query(f"SELECT 1 FROM outbox_items WHERE state IN {outbox.ACTIVE} AND priority_rank = 0 "
                                   f"AND id != ? LIMIT 1", (item["id"],))
            return bool(urgent)
        return False

    def _assign_remote_uids(self, item: dict[str, Any], rows: list[dict[str, Any]], dest: dict[str, Any]) -> None:
        """Record each instance's UID on the hub before anything is sent, so a crash right after
        the hub stored it can still be recognised by the next attempt's query."""
        updates = []
        for r in rows:
            if not r["remote_sop_instance_uid"]:
                remote = self.uids.uid(r["sop_instance_uid"]) if dest["deidentify"] else r["sop_instance_uid"]
                updates.append({"sop_instance_uid": r["sop_instance_uid"], "state": r["state"],
                                "remote_sop_instance_uid": remote})
                r["remote_sop_instance_uid"] = remote
        self.uids.flush()
        if updates:
            outbox.mark_instances(self.db, item["id"], updates)

    def _outgoing(self, row: dict[str, Any], dest: dict[str, Any]) -> Outgoing:
        def load() -> pydicom.Dataset:
            try:
                ds: pydicom.Dataset = pydicom.dcmread(row["file_path"])
            except (OSError, pydicom.errors.InvalidDicomError) as exc:
                raise PolicyBlocked(f"stored file unreadable on the box: {type(exc).__name__}") from exc
            if dest["deidentify"]:
                ds = deidentify(ds, self.uids, dest["allow_burned_in"])
                self.uids.flush()
            return ds

        return Outgoing(row["sop_instance_uid"], row["remote_sop_instance_uid"], row["sop_class_uid"],
                        row["transfer_syntax"], load)

    def _record(self, item_id: int, outcomes: list[Outcome]) -> None:
        outbox.mark_instances(self.db, item_id, [
            {"sop_instance_uid": o.sop_instance_uid, "state": o.state, "bytes_sent": o.bytes_sent,
             "transfer_syntax_sent": o.transfer_syntax, "reason": o.reason} for o in outcomes])
        for o in outcomes:
            if o.state != "sent":
                log.warning("outbox item %d: instance %s %s: %s", item_id, o.sop_instance_uid, o.state, o.reason)
